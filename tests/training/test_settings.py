"""The one schema of QODE's settings (issue 19): every view of the settings is derived from it."""
import dataclasses
import inspect
import typing
import warnings

import pytest
import torch

from torch_qode import QODE
from torch_qode.training import config as C
from torch_qode.training.config import QODEConfig, _int, setting, settings_fields, settings_table
from torch_qode.training.distributed import settings_of
from torch_qode.training.qode import signature


@dataclasses.dataclass(frozen=True)
class Extended(QODEConfig):
    """The schema with one more setting, declared only here."""

    extra_knob: int = setting(3, "a setting that only this schema declares.", _int(1), section="measure")


def test_a_setting_declared_once_reaches_the_signature_the_docs_and_the_saved_state():
    def init(self, params, lr=0.01, *, model=None, **settings):
        pass

    sig = signature(init, Extended)
    assert sig.parameters["extra_knob"].default == 3
    assert sig.parameters["extra_knob"].kind is inspect.Parameter.KEYWORD_ONLY
    assert sig.parameters["extra_knob"].annotation is int
    assert "**" not in str(sig)
    assert "extra_knob: a setting that only this schema declares. Default: ``3``." in settings_table(schema=Extended)
    assert Extended().saved()["extra_knob"] == 3 and "extra_knob" not in QODEConfig().saved()
    assert Extended(extra_knob=5).saved()["extra_knob"] == 5
    with pytest.raises(ValueError, match=r"extra_knob must be an integer ≥ 1, got 0"):
        Extended(extra_knob=0)
    assert Extended.from_saved(Extended(extra_knob=7).saved()) == Extended(extra_knob=7)


def test_qode_signature_and_docstring_are_the_schemas():
    sig = inspect.signature(QODE)
    hints = typing.get_type_hints(QODEConfig)
    for f in settings_fields():
        p = sig.parameters[f.name]
        assert p.kind is inspect.Parameter.KEYWORD_ONLY and p.default == f.default and p.annotation == hints[f.name]
        assert f"        {f.name}: " in QODE.__doc__, f.name
        assert f.metadata["doc"] and f.metadata["section"] in C.SECTIONS
    assert "<settings>" not in QODE.__doc__


def test_choices_are_the_literals():
    hints = typing.get_type_hints(QODEConfig)
    assert C.MODES == typing.get_args(hints["mode"]) == ("auto", "quantum", "classical")
    assert C.HVPS == ("auto", "retain", "recompute") and C.CARLEMAN_STATES == ("auto", "factored", "dense")
    assert C.choices("form") == ("discrete", "continuous") and C.choices("cycle") is None
    with pytest.raises(ValueError, match=r"upload must be one of \('dense', 'sparse'\), got 'qram'"):
        QODEConfig(upload="qram")


def test_the_optimizer_reads_its_settings_from_the_schema_never_a_copy():
    opt = QODE(torch.nn.Linear(3, 2).parameters(), cycle=7, classical_steps=2, mode="quantum")
    assert (opt.cycle, opt.classical_steps, opt.mode, opt.window_length, opt.degree) == (7, 2, "quantum", 5, 1)
    assert not set(C.SETTINGS) & set(vars(opt))
    with pytest.raises(AttributeError, match="no attribute 'cylce'"):
        opt.cylce
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'cylce'; did you mean 'cycle'\?"):
        QODE(torch.nn.Linear(3, 2).parameters(), cylce=7)


def test_old_spellings_keep_loading():
    with pytest.warns(DeprecationWarning, match="kappa_a=.*deprecated.*solver_options"):
        cfg = C.make_config(solver="filtered", kappa_a=20.0)
    assert cfg.solver_options == {"kappa_a": 20.0} and cfg.kappa_a == 20.0
    old = {k: v for k, v in cfg.saved().items() if k not in ("solver_options", "carleman_state", "max_rank")}
    old["kappa_a"] = 20.0                        # a state saved before solver_options and the factored state
    C.check_saved_config(old, cfg.saved())       # loads
    with pytest.raises(ValueError,
                       match=r"kappa_a.*30.0 there vs .*20.0 here|solver_options=\{'kappa_a': 30.0\} there"):
        C.check_saved_config({**old, "kappa_a": 30.0}, cfg.saved())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert QODEConfig.from_saved(old) == cfg


#: a value other than the default for every saved setting (with what it needs to be valid)
OTHER = {"mode": {"mode": "classical"}, "window": {"window": "auto"}, "cycle": {"cycle": 12},
         "classical_steps": {"classical_steps": 3},
         "sparsity": {"sparsity": 0.5}, "pruning": {"pruning": "global"}, "min_density": {"min_density": 0.05},
         "keep_dense": {"keep_dense": False},
         "upload": {"upload": "sparse"}, "noise": {"noise": "frozen"},
         "carleman_order": {"carleman_order": 2}, "taylor_degree": {"taylor_degree": 3},
         "form": {"form": "continuous"}, "carleman_state": {"carleman_state": "dense"},
         "max_rank": {"max_rank": 4, "carleman_order": 2}, "explicit": {"explicit": True},
         "solver": {"solver": "direct"}, "solver_options": {"solver": "filtered", "solver_options": {"kappa_a": 9.0}},
         "shots": {"shots": 1000}, "readout_error": {"readout_error": 0.05}, "max_shots": {"max_shots": 1000},
         "tomography_kwargs": {"tomography_kwargs": {"sign_method": "pairs"}},
         "readout": {"readout": "weights"},
         "eps": {"eps": 0.05}, "track_sgd": {"track_sgd": True}, "seed": {"seed": 4}}


def test_every_rank_compares_every_saved_setting_and_every_sgd_setting():
    """The ranks' settings check is derived from the schema and the parameter group: a difference in any
    saved setting or SGD hyperparameter (dampening included) is one that it names."""
    saved = [f.name for f in settings_fields() if f.metadata["saved"]]
    assert sorted(OTHER) == sorted(saved), "give a new saved setting a value in OTHER"

    def settings(**kw):
        torch.manual_seed(0)
        return settings_of(QODE(torch.nn.Linear(3, 2).parameters(), **kw))

    base = settings()
    for name, kw in OTHER.items():
        diff = {k for k in base if settings(**kw).get(k) != base[k]}
        assert name in diff, name
    for name, kw in {"lr": {"lr": 0.1}, "momentum": {"momentum": 0.9}, "weight_decay": {"weight_decay": 1e-4},
                     "dampening": {"dampening": 0.1}, "nesterov": {"nesterov": True, "momentum": 0.9},
                     "foreach": {"foreach": True}}.items():
        assert {k for k in base if settings(**kw).get(k) != base[k]} >= {name}, name
