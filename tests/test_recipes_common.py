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
    with pytest.raises(yaml.YAMLError):   # safe_load refuses python tags
        common.load_config(unsafe)
    with pytest.raises(common.ConfigError, match="not found"):
        common.load_config(tmp_path / "missing.yaml")
    assert common.load_config(_empty(tmp_path)) == {}


def _empty(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("")
    return p


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
    from torch_qode.dissipation import smooth_density

    dens = smooth_density(np.array([-1.0, 0.0, 5.0]), np.array([0.2, 0.5, 0.3]))
    p1 = plot_training_panels([{"step": 0, "spectrum": dens}, {"step": 10, "spectrum": dens}], tmp_path / "d.png")
    assert p1.stat().st_size > 10_000                                  # a Density object works as well
    p2 = plot_training_panels([{"step": 0}], tmp_path / "empty.png")   # every panel says "no data"
    assert p2.is_file() and p2.stat().st_size > 0
