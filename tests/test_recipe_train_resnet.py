"""train_resnet_cifar100 (and `make demo`) end to end on tiny settings, digits and the CIFAR-100 fixture."""
import json

import pytest

from recipes import demo, train_resnet_cifar100 as recipe
from recipes.common import ConfigError

TINY = ["model.depth=8", "model.widen=1", "pretrain.epochs=1", "pretrain.batch_size=128", "train.steps=12",
        "train.batch_size=64", "qode.cycle=6", "qode.classical_steps=2", "qode.shots=100000",
        "monitor.probe_batch=64", "monitor.steps=16", "dissipation.steps=16", "eval_batch_size=500",
        "--no-progress", "--threads", "1"]


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cpu_config_runs_and_writes_log_table_and_figure(tmp_path, capsys):
    out = tmp_path / "run"
    res = demo.main(["--out", str(out)] + TINY + ["qode.mode=quantum"])
    rows = res["rows"]
    assert [r["cycle"] for r in rows] == [0, 1]
    assert all(r["mode"] == "quantum" for r in rows)            # mode=quantum: every window is quantum
    for r in rows:
        assert r["qubits"] > 0 and r["gates"] > 0 and r["shots"] == 100_000
        assert r["drift"] is not None and r["drift_lin"] is not None and 0 <= r["acc"] <= 1
        assert 0 <= r["acc_sgd"] <= 1
    printed = capsys.readouterr().out
    assert "drift_lin" in printed and "acc_sgd" in printed and "quantum" in printed
    log = _lines(out / "log.jsonl")
    cycles = [l for l in log if l["event"] == "cycle"]
    assert len(cycles) == 2 and cycles[0]["report"]["tomography"]["shots"]["total"] == 100_000
    assert cycles[0]["report"]["download"]["sparsity"] == pytest.approx(0.9, abs=1e-4)
    mon = _lines(out / "monitor.jsonl")
    assert {m["event"] for m in mon} >= {"spectrum", "window_end", "eval"}
    fig = out / "fig2.png"
    assert fig.exists() and fig.stat().st_size > 5000


def test_auto_mode_and_cifar100_fixture_through_the_real_loader(tmp_path):
    from torch_qode.data import write_cifar100_fixture

    root = tmp_path / "cifar"
    write_cifar100_fixture(root, n_train=96, n_test=40, seed=0)
    res = recipe.main(["--config", "configs/train_resnet_cifar100_cpu.yaml", "--out", str(tmp_path / "r"),
                       "--data-root", str(root), "data.name=cifar100", "train.baseline=false",
                       "monitor.enabled=false"] + TINY)
    assert len(res["rows"]) == 2 and all(r["acc_sgd"] is None for r in res["rows"])
    for rep in res["reports"]:
        assert rep["mode"] in ("quantum", "classical") and rep["dissipation"]["lr"] == pytest.approx(0.05)
        assert rep["reason"].startswith("dissipation check ") and not rep["faults"]


def test_missing_cifar_and_bad_overrides_are_clear(tmp_path):
    with pytest.raises(Exception, match="--data-root"):
        recipe.main(["--out", str(tmp_path / "a"), "--data-root", str(tmp_path / "empty"), "data.name=cifar100"]
                    + TINY)
    with pytest.raises(ConfigError, match="qode.nonsense"):
        recipe.main(["--out", str(tmp_path / "b"), "qode.nonsense=1"] + TINY)
    with pytest.raises(ValueError, match="classical_steps"):
        recipe.main(["--config", "configs/train_resnet_cifar100_cpu.yaml", "--out", str(tmp_path / "c")] + TINY
                    + ["qode.classical_steps=6"])
