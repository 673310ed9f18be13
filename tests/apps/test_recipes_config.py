"""recipes.config: the schema on OmegaConf (types, unknown keys with a suggestion, the qode section from
QODE's schema, old spellings), and the value checks name the config key and test numbers the package's way."""
import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import numpy as np
import pytest
import torch

import torch_qode.training.config as tc
from recipes import config, train_char_lm, train_resnet_cifar100


@pytest.mark.parametrize("call, match", [
    (lambda: config.check_int(True, "train.steps", 1), r"^train\.steps must be an integer >= 1, got True$"),
    (lambda: config.check_int(1.0, "n", 1), r"^n must be an integer >= 1, got 1\.0$"),
    (lambda: config.check_int(7, "k", 0, 5), r"^k must be an integer in 0\.\.5, got 7$"),
    (lambda: config.check_int(7, "k", None, 5), r"^k must be an integer <= 5, got 7$"),
    (lambda: config.check_real(0.0, "qode.lr", 0.0, low_open=True),
     r"^qode\.lr must be a finite number > 0, got 0\.0$"),
    (lambda: config.check_real(math.inf, "x", 0.0), r"^x must be a finite number >= 0, got inf$"),
    (lambda: config.check_real(math.nan, "x", allow_inf=True), r"^x must be a number, got nan$"),
    (lambda: config.check_real(1.0, "eps", 0.0, 1.0, low_open=True, high_open=True),
     r"^eps must be a finite number > 0 and < 1, got 1\.0$"),
    (lambda: config.check_real("1", "x"), r"^x must be a finite number, got '1'$"),
    (lambda: config.check_choice(1, "monitor.backend", ("torch", "pyhessian")),
     r"^monitor\.backend must be one of 'torch', 'pyhessian', got 1$"),
    (lambda: config.check_int_list([0, 21], "proxy.report_times", 0, 20, nonempty=False, high_name="proxy.T"),
     r"^proxy\.report_times must be a list of integers in 0\.\.proxy\.T = 0\.\.20, got \[0, 21\]$"),
    (lambda: config.check_int_list([], "layers", 1), r"^layers must be a non-empty list of integers >= 1, got \[\]$"),
    (lambda: config.check_optional_str("  ", "data.root", "a folder"), r"^data\.root must be null or a folder"),
])
def test_value_checks_name_the_key(call, match):
    with pytest.raises(config.ConfigError, match=match):
        call()


def test_value_checks_accept_numbers_the_package_way():
    assert config.check_int(np.int64(3), "n", 1) == 3 and type(config.check_int(np.int64(3), "n", 1)) is int
    assert config.check_int(torch.tensor(4), "n", 1) == 4
    assert config.check_real(np.float32(0.5), "x", 0.0) == 0.5 and config.check_real(2, "x") == 2.0
    assert config.check_real(math.inf, "blowup", 0.0, low_open=True, allow_inf=True) == math.inf
    assert config.check_int_list([1, np.int64(2)], "orders", 1) == [1, np.int64(2)]
    assert config.check_choice("torch", "backend", ("torch", "pyhessian")) == "torch"
    assert config.check_optional_str(None, "checkpoint") is None


def test_keyed_error_names_the_argument_the_library_names():
    err = config.keyed_error("qode", ValueError("lr must be > 0"), ("lr", "cycle"))
    assert isinstance(err, config.ConfigError) and str(err) == "qode.lr: lr must be > 0"
    assert str(config.keyed_error("qode", TypeError("bad thing"), ("lr",))) == "qode: bad thing"


@dataclass
class Sec:
    k: int = 2


@dataclass
class Schema:
    n: int = 1
    x: float = 0.5
    flag: bool = False
    name: str = "a"
    opt: Any = None
    sec: Sec = field(default_factory=Sec)


def test_build_types_follow_the_schema():
    cfg = config.build(Schema, [{"n": 2, "x": 3, "flag": True, "name": "b", "opt": [1], "sec": {"k": 3}}])
    assert cfg == {"n": 2, "x": 3.0, "flag": True, "name": "b", "opt": [1], "sec": {"k": 3}}
    for bad, match in (({"n": True}, "'n' must be of type int"), ({"x": False}, "'x' must be of type float"),
                       ({"flag": 1}, "'flag' must be of type bool"), ({"name": 5}, "'name' must be of type str"),
                       ({"sec": {"k": 2, "j": 1}}, "unknown config key 'sec.j'"),
                       ({"n": None}, "'n' may not be null"), ({"sec": 3}, "'sec' is a section")):
        with pytest.raises(config.ConfigError, match=match):
            config.build(Schema, [bad])


def test_a_misspelt_key_suggests_the_right_one():
    with pytest.raises(config.ConfigError, match=r"unknown config key 'sec\.kk'; allowed keys: .*Did you mean: 'k'\?"):
        config.build(Schema, [], ["sec.kk=3"])
    with pytest.raises(config.ConfigError, match=r"unknown config key 'nmae'.*Did you mean: 'name'\?"):
        config.build(Schema, [{"nmae": "b"}])
    with pytest.raises(config.ConfigError, match=r"unknown config key 'qode\.cylce'.*Did you mean: 'cycle'\?"):
        config.build(train_resnet_cifar100.Config, [], ["qode.cylce=5"])


def test_the_qode_section_is_qodes_schema():
    """The ``qode:`` section lists every setting of QODEConfig (but the run's seed) and QODE's SGD keys, with
    QODEConfig's defaults unless the recipe sets its own; its values are checked by QODEConfig itself."""
    q = config.defaults(train_resnet_cifar100.Config)["qode"]
    names = [f.name for f in tc.settings_fields() if f.name != "seed"]
    assert list(q) == ["lr", "momentum", "weight_decay"] + names
    assert q["track_sgd"] is True and q["tomography_kwargs"] == {"sign_method": "hadamard"}   # the recipe's
    assert q["carleman_state"] == "auto" and q["solver_options"] == {}                         # the schema's
    assert list(config.defaults(train_char_lm.Config)["qode"]) == list(q)
    assert isinstance(config.check_qode({**q, "seed": 0}), tc.QODEConfig)
    with pytest.raises(config.ConfigError, match=r"^qode\.cycle: cycle must be an integer"):
        config.check_qode({**q, "cycle": 0})


def test_adding_a_setting_to_qodes_schema_adds_it_to_the_recipes(monkeypatch):
    """One place: a new field of QODEConfig appears in the recipes' qode section, typed and with its default."""
    @dataclass(frozen=True)
    class Extended(tc.QODEConfig):
        bonus: Literal["a", "b"] = tc.setting("a", "a new setting.", tc._literal, section="measure")
        budget: Optional[int] = tc.setting(None, "another.", lambda v, name: v, section="measure")

    fields = tuple(f for f in dataclasses.fields(Extended) if f.init)
    monkeypatch.setattr(tc, "settings_fields", lambda: fields)
    monkeypatch.setattr(tc, "QODEConfig", Extended)
    section = config.qode_section(lr=0.05)
    cfg = config.build(section, [], ["bonus=b", "budget=3"])
    assert cfg["bonus"] == "b" and cfg["budget"] == 3 and cfg["lr"] == 0.05
    assert config.defaults(section)["bonus"] == "a"
    with pytest.raises(config.ConfigError, match="'budget' must be of type int"):
        config.build(section, [], ["budget=x"])


def test_the_old_kappa_a_spelling_still_loads(tmp_path):
    """``qode.kappa_a`` (now ``qode.solver_options.kappa_a``): a null is dropped, a value moves with a
    DeprecationWarning, in a file (an old run's config.yaml) and in an override."""
    old = tmp_path / "old.yaml"
    old.write_text("qode:\n  solver: filtered\n  kappa_a: 50\n")
    msg = r"'qode\.kappa_a' is deprecated: write qode\.solver_options\.kappa_a=50"
    with pytest.warns(DeprecationWarning, match=msg):
        cfg = config.build(train_resnet_cifar100.Config, [config.load_config(old)])
    assert cfg["qode"]["solver_options"] == {"kappa_a": 50} and "kappa_a" not in cfg["qode"]
    with pytest.warns(DeprecationWarning, match="kappa_a"):
        cfg = config.build(train_resnet_cifar100.Config, [], ["qode.solver=filtered", "qode.kappa_a=20"])
    assert config.check_qode({**cfg["qode"], "seed": 0}).kappa_a == 20.0
    null = tmp_path / "null.yaml"
    null.write_text("qode:\n  kappa_a: null\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert config.build(train_resnet_cifar100.Config, [config.load_config(null)], ["qode.kappa_a=null"]) \
            == config.defaults(train_resnet_cifar100.Config)
    with pytest.warns(DeprecationWarning), pytest.raises(config.ConfigError, match=r"qode\.solver_options\.kappa_a: "):
        config.check_qode(config.build(train_resnet_cifar100.Config, [], ["qode.kappa_a=abc"])["qode"])


def test_no_import_cycle_in_recipes():
    """Every ``recipes`` module's imports of other ``recipes`` modules (at any level, in functions too; not
    the annotations-only ones under ``if TYPE_CHECKING:``) form no cycle: cli imports launch, never back."""
    import ast
    from pathlib import Path

    root = Path(config.__file__).parent
    graph = {}
    for path in root.glob("*.py"):
        deps, tree = set(), ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {id(n) for b in ast.walk(tree) if isinstance(b, ast.If) and getattr(b.test, "id", "") ==
                       "TYPE_CHECKING" for n in ast.walk(b)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            elif isinstance(node, ast.ImportFrom) and node.module == "recipes":
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("recipes."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("recipes.")}
        graph[path.stem] = deps - {path.stem}
    assert "cli" in graph["train_resnet_cifar100"] and "launch" in graph["cli"]     # the scan sees imports

    def visit(mod, stack):
        assert mod not in stack, f"import cycle: {' -> '.join(stack + [mod])}"
        for dep in sorted(graph.get(mod, ())):
            visit(dep, stack + [mod])

    for mod in graph:
        visit(mod, [])
