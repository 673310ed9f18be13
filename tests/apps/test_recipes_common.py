"""recipes.common: command line, config merging/validation, JSON-lines log, checkpoints; plotting helpers."""
import json
import math
import pickle

import numpy as np
import pytest
import torch
import yaml

from recipes import common

SCHEMA = {"seed": 0, "device": "cpu", "lr": 0.1, "steps": 10, "flag": False, "name": "a", "fs": [1.0],
          "opt": None, "model": {"depth": 8, "widen": 1},
          "data": {"name": "digits", "root": None, "download": False}}


def toy_main(argv, data=False):
    """A minimal recipe built on common.setup, as the real ones are."""
    with common.setup("toy", SCHEMA, argv, data=data) as run:
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
    with pytest.raises(common.ConfigError, match=match):
        toy_main(argv + ["--out", str(tmp_path / "o")])


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  colour: red\n")
    with pytest.raises(common.ConfigError, match=r"unknown config key 'model\.colour'.*allowed keys"):
        toy_main(["--config", str(bad), "--out", str(tmp_path / "o")])
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(common.ConfigError, match="mapping"):
        common.load_config(lst)
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("seed: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(common.ConfigError, match=r"unsafe\.yaml', line 1.*constructor") as info:
        common.load_config(unsafe)       # safe_load refuses python tags
    assert isinstance(info.value.__cause__, yaml.YAMLError)
    broken = tmp_path / "broken.yaml"
    broken.write_text("seed: 0\nfs: [1, 2\nlr: 0.1\n")
    with pytest.raises(common.ConfigError, match=r"broken\.yaml', line \d+.*not valid \(safe\) YAML"):
        toy_main(["--config", str(broken), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    with pytest.raises(common.ConfigError, match="not found"):
        common.load_config(tmp_path / "missing.yaml")
    assert common.load_config(_empty(tmp_path)) == {}


def _empty(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("")
    return p


@pytest.mark.parametrize("override", ["steps=null", "flag=null", "lr=null", "name=null", "fs=null",
                                      "model.depth=null"])
def test_null_only_where_the_default_is_null(tmp_path, override):
    key = override.split("=")[0]
    with pytest.raises(common.ConfigError, match=rf"'{key}' may not be null"):
        toy_main([override, "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    run = toy_main(["opt=null", "--out", str(tmp_path / "ok"), "--no-progress"])   # an optional key
    assert run.cfg["opt"] is None


def test_an_existing_non_empty_out_folder_is_refused(tmp_path):
    out = tmp_path / "o"
    toy_main(["--out", str(out), "--no-progress"])
    before = (out / "log.jsonl").read_text()
    with pytest.raises(common.ConfigError, match=r"--out .* not empty .*config\.yaml"):
        toy_main(["--out", str(out), "--no-progress", "lr=0.5"])
    assert (out / "log.jsonl").read_text() == before               # the first run is untouched
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 0.1
    (tmp_path / "empty").mkdir()
    toy_main(["--out", str(tmp_path / "empty"), "--no-progress"])   # an empty folder is fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(common.ConfigError, match="not a folder"):
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
    with pytest.raises(common.ConfigError, match="'fs' must be of type list"):
        toy_main(["--out", str(tmp_path / "p"), "fs=1e-1"])


def test_open_sections_take_any_sub_key(tmp_path):
    schema = dict(SCHEMA, kw=common.OpenSection({"sign_method": "pairs"}))
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("kw:\n  split: {support: 0.5}\n")
    with common.setup("toy", schema, ["--config", str(cfg_file), "--out", str(tmp_path / "o"), "kw.norm=exact",
                                      "--no-progress"]) as run:
        assert run.cfg["kw"] == {"sign_method": "pairs", "split": {"support": 0.5}, "norm": "exact"}
    assert yaml.safe_load((tmp_path / "o" / "config.yaml").read_text())["kw"]["norm"] == "exact"
    with pytest.raises(common.ConfigError, match="unknown config key 'model.kw'"):   # closed sections stay closed
        common.setup("toy", schema, ["model.kw=1", "--out", str(tmp_path / "p")])
    with pytest.raises(common.ConfigError, match="'kw' must be a mapping"):
        common.setup("toy", schema, ["--out", str(tmp_path / "q"), "kw=3"])
    with common.setup("toy", schema, ["--out", str(tmp_path / "r"), "kw={norm: 2.0}", "--no-progress"]) as run:
        assert run.cfg["kw"] == {"sign_method": "pairs", "norm": 2.0}


@pytest.mark.parametrize("device", ["mps", "meta", "xpu", "cpu:1", "gpu"])
def test_unsupported_devices_are_refused_before_anything_is_written(tmp_path, device):
    with pytest.raises(common.ConfigError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        toy_main(["--device", device, "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_a_gpu_config_needs_cuda_or_an_explicit_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(common.torch.cuda, "is_available", lambda: False)
    schema = dict(SCHEMA, gpu=False, device="auto")
    gpu = tmp_path / "gpu.yaml"
    gpu.write_text("gpu: true\ndevice: auto\n")
    with pytest.raises(common.ConfigError, match=r"gpu\.yaml' is sized for a GPU.*--device cpu"):
        common.setup("toy", schema, ["--config", str(gpu), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    for i, extra in enumerate((["--device", "cpu"], ["device=cpu"])):
        with common.setup("toy", schema, ["--config", str(gpu), "--out", str(tmp_path / f"ok{i}")] + extra) as run:
            assert run.device == torch.device("cpu")
    with common.setup("toy", schema, ["--out", str(tmp_path / "plain")]) as run:   # gpu: false runs anywhere
        assert run.device == torch.device("cpu")


def test_setup_runs_the_recipe_check_before_writing(tmp_path):
    seen = []

    def check(cfg):
        seen.append(cfg["steps"])
        if cfg["steps"] > 5:
            raise common.ConfigError("steps must be <= 5")

    with pytest.raises(common.ConfigError, match="steps must be <= 5"):
        common.setup("toy", SCHEMA, ["--out", str(tmp_path / "o")], check=check)
    assert seen == [10] and not (tmp_path / "o").exists()
    with common.setup("toy", SCHEMA, ["steps=3", "--out", str(tmp_path / "p")], check=check) as run:
        assert run.cfg["steps"] == 3


def test_cli_defaults_yield_to_the_command_line_in_every_spelling(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lr: 0.5\n")
    other = tmp_path / "d.yaml"
    other.write_text("lr: 0.25\n")
    with common.setup("toy", SCHEMA, ["--out", str(tmp_path / "a")], cli_defaults={"config": str(cfg_file)}) as run:
        assert run.cfg["lr"] == 0.5
    for i, argv in enumerate(([f"--config={other}"], ["--config", str(other)])):
        with common.setup("toy", SCHEMA, argv + [f"--out={tmp_path / f'b{i}'}"],
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
    monkeypatch.setattr(common.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    for load, want in ((0.2, 2), (0.9, 1), (1.6, 1), (7.0, 1)):
        monkeypatch.setattr(common.os, "getloadavg", lambda load=load: (load, 0.0, 0.0))
        assert common.resolve_threads("auto") == want
    monkeypatch.setattr(common.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(common.os, "getloadavg", lambda: (2.4, 0.0, 0.0))
    assert common.resolve_threads("auto") == 6
    assert common.resolve_threads("3") == 3 and common.resolve_threads(2) == 2
    for bad in ("0", "-1", "two", "1.5", None):
        with pytest.raises(common.ConfigError, match="--threads"):
            common.resolve_threads(bad)


def test_run_logs_the_threads_it_used(tmp_path):
    run = toy_main(["--threads", "1", "--out", str(tmp_path / "o")])
    start = json.loads((run.out / "log.jsonl").read_text().splitlines()[0])
    assert start["threads"] == 1 == run.threads


def test_seeding_is_reproducible():
    common.seed_everything(5)
    a = (np.random.rand(), torch.rand(1).item())
    common.seed_everything(5)
    assert (np.random.rand(), torch.rand(1).item()) == a
    with pytest.raises(common.ConfigError):
        common.seed_everything(-1)


def test_to_jsonable_and_table():
    obj = {"a": np.float64(2.0), "b": torch.ones(2), "c": (1, np.int64(2)), "d": math.inf, "e": None}
    assert json.loads(json.dumps(common.to_jsonable(obj), allow_nan=False)) == \
        {"a": 2.0, "b": [1.0, 1.0], "c": [1, 2], "d": None, "e": None}
    table = common.format_table([{"x": 1, "y": 0.123456, "z": None}, {"x": 22, "y": 1e-9, "z": "s"}])
    lines = table.splitlines()
    assert lines[0].split() == ["x", "y", "z"] and "0.123" in lines[2] and "-" in lines[2] and "1e-09" in lines[3]


def test_resolve_device():
    assert common.resolve_device("cpu") == torch.device("cpu")
    for bad in ("mps", "meta", "cpu:1", None, 0):
        with pytest.raises(common.ConfigError, match="device must be"):
            common.resolve_device(bad)
    assert common.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(common.ConfigError, match="CUDA is not available"):
            common.resolve_device("cuda")


def test_load_checkpoint_weights_only(tmp_path):
    model = torch.nn.Linear(3, 2)
    other = torch.nn.Linear(3, 2)
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "wrapped.pt")
    for name in ("bare.pt", "wrapped.pt"):
        torch.nn.init.zeros_(other.weight)
        common.load_checkpoint(other, tmp_path / name)
        assert torch.equal(other.weight, model.weight)

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled code ran",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError):   # weights_only=True refuses arbitrary objects
        common.load_checkpoint(other, tmp_path / "evil.pt")
    with pytest.raises(common.ConfigError, match="not found"):
        common.load_checkpoint(other, tmp_path / "missing.pt")


def test_load_checkpoint_refuses_misfits_and_non_finite_weights(tmp_path):
    model = torch.nn.Linear(3, 2)
    torch.save(torch.nn.Linear(4, 2).state_dict(), tmp_path / "shape.pt")
    torch.save({"weight": model.weight.detach()}, tmp_path / "missing.pt")
    nan = {k: v.clone() for k, v in model.state_dict().items()}
    nan["bias"][0] = float("nan")
    torch.save(nan, tmp_path / "nan.pt")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(common.ConfigError, match=r"checkpoint .*shape\.pt' does not fit the model built from "
                                                 r"model\.width: 1 shape mismatch.*weight \(2, 4\) vs \(2, 3\)"):
        common.load_checkpoint(model, tmp_path / "shape.pt", describe="built from model.width")
    with pytest.raises(common.ConfigError, match=r"does not fit the model: 1 missing key\(s\), e\.g\. bias"):
        common.load_checkpoint(model, tmp_path / "missing.pt")
    with pytest.raises(common.ConfigError, match=r"checkpoint .*nan\.pt' holds non-finite values .* bias"):
        common.load_checkpoint(model, tmp_path / "nan.pt")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))   # left unchanged


def test_training_panels_figure(tmp_path):
    from torch_qode.plotting import plot_training_panels

    grid = np.linspace(-5, 20, 64)
    records = []
    for step in range(0, 301, 10):
        rec = {"step": step, "error_proxy": 1.0 if step % 100 < 10 else 0.9 ** (step % 100),
               "download": step % 100 == 0, "drift": 1e-3 * (step % 100)}
        rec["spectrum"] = {"grid": grid.tolist(), "density": np.exp(-(grid - step / 100) ** 2).tolist()}
        if step % 50 == 0:
            rec["test_acc"], rec["test_acc_sgd"] = 0.5 + step / 1000, 0.52 + step / 1000
        records.append(rec)
    p = plot_training_panels(records, tmp_path / "fig2.png")
    assert p.is_file() and p.stat().st_size > 10_000
    from torch_qode.bridge.dissipation import smooth_density

    dens = smooth_density(np.array([-1.0, 0.0, 5.0]), np.array([0.2, 0.5, 0.3]))
    p1 = plot_training_panels([{"step": 0, "spectrum": dens}, {"step": 10, "spectrum": dens}], tmp_path / "d.png")
    assert p1.stat().st_size > 10_000                                  # a Density object works as well
    p2 = plot_training_panels([{"step": 0}], tmp_path / "empty.png")   # every panel says "no data"
    assert p2.is_file() and p2.stat().st_size > 0
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        plot_training_panels(records, tmp_path / "e.png", every=0)
    with pytest.raises(ValueError, match="early_steps must be an integer >= 0"):
        plot_training_panels(records, tmp_path / "e.png", early_steps=-1)
    with pytest.raises(ValueError, match=r"records\[1\] needs an integer 'step'"):
        plot_training_panels([{"step": 0}, {"test_acc": 0.5}], tmp_path / "e.png")
    with pytest.raises(ValueError, match="step 0 needs 1-D 'grid' and 'density' of the same length"):
        plot_training_panels([{"step": 0, "spectrum": {"grid": [0.0, 1.0], "density": [1.0]}}], tmp_path / "e.png")
