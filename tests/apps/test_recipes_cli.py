"""recipes.cli (with recipes.config through the command line): overrides, config files, the output
folder, device, threads and seeds, all checked before anything is written."""
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import pytest
import torch
import yaml

from recipes import cli, config

@dataclass
class Model:
    depth: int = 8
    widen: int = 1


@dataclass
class Data:
    name: str = "digits"
    root: Optional[str] = None
    download: bool = False


@dataclass
class SCHEMA:
    seed: int = 0
    device: str = "cpu"
    lr: float = 0.1
    steps: int = 10
    flag: bool = False
    name: str = "a"
    fs: List[float] = field(default_factory=lambda: [1.0])
    opt: Any = None
    model: Model = field(default_factory=Model)
    data: Data = field(default_factory=Data)


def extend(**fields):
    """SCHEMA with ``fields`` added or their defaults changed (``name=(type, default)``)."""
    return dataclasses.make_dataclass("S", [(k, tp, field(default_factory=lambda d=d: d) if isinstance(d, dict)
                                             else d) for k, (tp, d) in fields.items()], bases=(SCHEMA,))


def toy_main(argv, data=False):
    """A minimal recipe built on cli.setup, as the real ones are."""
    with cli.setup("toy", SCHEMA, argv, data=data) as run:
        run.log.write("step", value=np.float32(1.5), t=torch.tensor(3), arr=np.arange(3), bad=float("nan"))
        for _ in run.progress(range(3)):
            pass
        return run


def read_log(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_overrides_config_file_and_flags(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lr: 0.5\nmodel:\n  depth: 14\n")
    run = toy_main(["--config", str(cfg_file), "--out", str(tmp_path / "o"), "--seed", "3", "--no-progress",
                    "model.widen=2", "lr=0.01", "flag=true", "fs=[1, 0.5]", "name=b", "opt={x: 1}"])
    cfg = run.cfg
    assert cfg["lr"] == 0.01 and isinstance(cfg["lr"], float)         # override beats the file
    assert cfg["model"] == {"depth": 14, "widen": 2}                   # file + dotted override merged
    assert cfg["flag"] is True and cfg["fs"] == [1, 0.5] and cfg["name"] == "b" and cfg["opt"] == {"x": 1}
    assert cfg["seed"] == 3 and run.device == torch.device("cpu")
    saved = yaml.safe_load((tmp_path / "o" / "config.yaml").read_text())
    assert saved == cfg
    recs = read_log(tmp_path / "o" / "log.jsonl")
    assert [r["event"] for r in recs] == ["start", "step"]
    assert recs[0]["config"] == cfg
    step = recs[1]
    assert step["value"] == 1.5 and step["t"] == 3 and step["arr"] == [0, 1, 2] and step["bad"] is None


def test_overrides_may_come_between_options(tmp_path):
    run = toy_main(["steps=4", "--out", str(tmp_path / "o"), "lr=1e-3", "--no-progress"])
    assert run.cfg["steps"] == 4 and run.cfg["lr"] == 1e-3


@pytest.mark.parametrize("argv, match", [
    (["nope=1"], r"unknown config key 'nope'; allowed keys: .*model\.depth"),
    (["model.height=3"], r"unknown config key 'model\.height'"),
    (["model=3"], r"'model' is a section"),
    (["steps=1.5"], r"'steps' must be of type int"),
    (["flag=1"], r"'flag' must be of type bool"),
    (["fs=3"], r"'fs' must be of type list"),
    (["lr"], r"not of the form key=value"),
    (["lr=[1"], r"not valid YAML"),
    (["--device", "tpu"], r"device must be"),
])
def test_bad_overrides_raise_naming_the_key(tmp_path, argv, match):
    with pytest.raises(config.ConfigError, match=match):
        toy_main(argv + ["--out", str(tmp_path / "o")])


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  colour: red\n")
    with pytest.raises(config.ConfigError, match=r"unknown config key 'model\.colour'.*allowed keys"):
        toy_main(["--config", str(bad), "--out", str(tmp_path / "o")])
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(config.ConfigError, match="mapping"):
        config.load_config(lst)
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("seed: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(config.ConfigError, match=r"unsafe\.yaml', line 1.*constructor") as info:
        config.load_config(unsafe)       # safe_load refuses python tags
    assert isinstance(info.value.__cause__, yaml.YAMLError)
    broken = tmp_path / "broken.yaml"
    broken.write_text("seed: 0\nfs: [1, 2\nlr: 0.1\n")
    with pytest.raises(config.ConfigError, match=r"broken\.yaml', line \d+.*not valid \(safe\) YAML"):
        toy_main(["--config", str(broken), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    with pytest.raises(config.ConfigError, match="not found"):
        config.load_config(tmp_path / "missing.yaml")
    assert config.load_config(_empty(tmp_path)) == {}


def _empty(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("")
    return p


@pytest.mark.parametrize("override", ["steps=null", "flag=null", "lr=null", "name=null", "fs=null",
                                      "model.depth=null"])
def test_null_only_where_the_default_is_null(tmp_path, override):
    key = override.split("=")[0]
    with pytest.raises(config.ConfigError, match=rf"'{key}' may not be null"):
        toy_main([override, "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    run = toy_main(["opt=null", "--out", str(tmp_path / "ok"), "--no-progress"])   # an optional key
    assert run.cfg["opt"] is None


def test_an_existing_non_empty_out_folder_is_refused(tmp_path):
    out = tmp_path / "o"
    toy_main(["--out", str(out), "--no-progress"])
    before = (out / "log.jsonl").read_text()
    with pytest.raises(config.ConfigError, match=r"--out .* not empty .*config\.yaml"):
        toy_main(["--out", str(out), "--no-progress", "lr=0.5"])
    assert (out / "log.jsonl").read_text() == before               # the first run is untouched
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 0.1
    (tmp_path / "empty").mkdir()
    toy_main(["--out", str(tmp_path / "empty"), "--no-progress"])   # an empty folder is fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(config.ConfigError, match="not a folder"):
        toy_main(["--out", str(tmp_path / "file")])


def test_config_yaml_keeps_non_finite_floats_and_reruns(tmp_path):
    run = toy_main(["--out", str(tmp_path / "a"), "--no-progress", "lr=.inf", "fs=[-.inf, .nan, 1.0]"])
    text = (tmp_path / "a" / "config.yaml").read_text()
    assert "lr: .inf" in text and "-.inf" in text and ".nan" in text
    again = toy_main(["--config", str(tmp_path / "a" / "config.yaml"), "--out", str(tmp_path / "b"), "--no-progress"])
    assert again.cfg["lr"] == math.inf and again.cfg["fs"][0] == -math.inf and math.isnan(again.cfg["fs"][1])
    assert run.cfg["lr"] == math.inf
    start = read_log(tmp_path / "a" / "log.jsonl")[0]              # strict JSON: null in the log
    assert start["config"]["lr"] is None


def test_strings_in_float_lists_are_read_as_floats(tmp_path):
    run = toy_main(["--out", str(tmp_path / "o"), "--no-progress", "fs=[1, 1e-1]", "lr=1e-3"])
    assert run.cfg["fs"] == [1, 0.1] and run.cfg["lr"] == 1e-3
    with pytest.raises(config.ConfigError, match="'fs' must be of type list"):
        toy_main(["--out", str(tmp_path / "p"), "fs=1e-1"])


def test_open_sections_take_any_sub_key(tmp_path):
    schema = extend(kw=(Dict[str, Any], {"sign_method": "pairs"}))
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("kw:\n  split: {support: 0.5}\n")
    with cli.setup("toy", schema, ["--config", str(cfg_file), "--out", str(tmp_path / "o"), "kw.norm=exact",
                                      "--no-progress"]) as run:
        assert run.cfg["kw"] == {"sign_method": "pairs", "split": {"support": 0.5}, "norm": "exact"}
    assert yaml.safe_load((tmp_path / "o" / "config.yaml").read_text())["kw"]["norm"] == "exact"
    with pytest.raises(config.ConfigError, match="unknown config key 'model.kw'"):   # closed sections stay closed
        cli.setup("toy", schema, ["model.kw=1", "--out", str(tmp_path / "p")])
    with pytest.raises(config.ConfigError, match="'kw' must be a mapping"):
        cli.setup("toy", schema, ["--out", str(tmp_path / "q"), "kw=3"])
    with cli.setup("toy", schema, ["--out", str(tmp_path / "r"), "kw={norm: 2.0}", "--no-progress"]) as run:
        assert run.cfg["kw"] == {"sign_method": "pairs", "norm": 2.0}


@pytest.mark.parametrize("device", ["mps", "meta", "xpu", "cpu:1", "gpu"])
def test_unsupported_devices_are_refused_before_anything_is_written(tmp_path, device):
    with pytest.raises(config.ConfigError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        toy_main(["--device", device, "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_a_gpu_config_needs_cuda_or_an_explicit_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(cli.torch.cuda, "is_available", lambda: False)
    schema = extend(gpu=(bool, False), device=(str, "auto"))
    gpu = tmp_path / "gpu.yaml"
    gpu.write_text("gpu: true\ndevice: auto\n")
    with pytest.raises(config.ConfigError, match=r"gpu\.yaml' is sized for a GPU.*--device cpu"):
        cli.setup("toy", schema, ["--config", str(gpu), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    for i, extra in enumerate((["--device", "cpu"], ["device=cpu"])):
        with cli.setup("toy", schema, ["--config", str(gpu), "--out", str(tmp_path / f"ok{i}")] + extra) as run:
            assert run.device == torch.device("cpu")
    with cli.setup("toy", schema, ["--out", str(tmp_path / "plain")]) as run:   # gpu: false runs anywhere
        assert run.device == torch.device("cpu")


def test_setup_runs_the_recipe_check_before_writing(tmp_path):
    seen = []

    def check(cfg):
        seen.append(cfg["steps"])
        if cfg["steps"] > 5:
            raise config.ConfigError("steps must be <= 5")

    with pytest.raises(config.ConfigError, match="steps must be <= 5"):
        cli.setup("toy", SCHEMA, ["--out", str(tmp_path / "o")], check=check)
    assert seen == [10] and not (tmp_path / "o").exists()
    with cli.setup("toy", SCHEMA, ["steps=3", "--out", str(tmp_path / "p")], check=check) as run:
        assert run.cfg["steps"] == 3


def test_cli_defaults_yield_to_the_command_line_in_every_spelling(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lr: 0.5\n")
    other = tmp_path / "d.yaml"
    other.write_text("lr: 0.25\n")
    with cli.setup("toy", SCHEMA, ["--out", str(tmp_path / "a")], cli_defaults={"config": str(cfg_file)}) as run:
        assert run.cfg["lr"] == 0.5
    for i, argv in enumerate(([f"--config={other}"], ["--config", str(other)])):
        with cli.setup("toy", SCHEMA, argv + [f"--out={tmp_path / f'b{i}'}"],
                          cli_defaults={"config": str(cfg_file)}) as run:
            assert run.cfg["lr"] == 0.25 and run.out == tmp_path / f"b{i}"


def test_data_flags_and_default_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = toy_main(["--data-root", "/some/where", "--download", "--no-progress"], data=True)
    assert run.cfg["data"] == {"name": "digits", "root": "/some/where", "download": True}
    assert run.out.resolve().parent == (tmp_path / "runs" / "toy").resolve()
    assert (run.out / "log.jsonl").is_file()
    with pytest.raises(SystemExit):   # --data-root only exists for data recipes
        toy_main(["--data-root", "x"])


def test_threads_are_restored(tmp_path):
    before = torch.get_num_threads()
    toy_main(["--threads", "1", "--out", str(tmp_path / "o")])
    assert torch.get_num_threads() == before


def test_threads_auto_leaves_busy_cores_alone(monkeypatch):
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    for load, want in ((0.2, 2), (0.9, 1), (1.6, 1), (7.0, 1)):
        monkeypatch.setattr(cli.os, "getloadavg", lambda load=load: (load, 0.0, 0.0))
        assert cli.resolve_threads("auto") == want
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (2.4, 0.0, 0.0))
    assert cli.resolve_threads("auto") == 6
    assert cli.resolve_threads("3") == 3 and cli.resolve_threads(2) == 2
    for bad in ("0", "-1", "two", "1.5", None):
        with pytest.raises(config.ConfigError, match="--threads"):
            cli.resolve_threads(bad)


def test_run_logs_the_threads_it_used(tmp_path):
    run = toy_main(["--threads", "1", "--out", str(tmp_path / "o")])
    start = json.loads((run.out / "log.jsonl").read_text().splitlines()[0])
    assert start["threads"] == 1 == run.threads


def test_seeding_is_reproducible():
    cli.seed_everything(5)
    a = (np.random.rand(), torch.rand(1).item())
    cli.seed_everything(5)
    assert (np.random.rand(), torch.rand(1).item()) == a
    with pytest.raises(config.ConfigError):
        cli.seed_everything(-1)


def test_resolve_device():
    assert cli.resolve_device("cpu") == torch.device("cpu")
    for bad in ("mps", "meta", "cpu:1", None, 0):
        with pytest.raises(config.ConfigError, match="device must be"):
            cli.resolve_device(bad)
    assert cli.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(config.ConfigError, match="CUDA is not available"):
            cli.resolve_device("cuda")
