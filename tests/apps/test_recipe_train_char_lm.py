"""recipes.train_char_lm end to end on a tiny config: a character-level transformer (default attention)
on the Python standard library's sources, QODE beside sparse SGD, Fig. 2's panels and perplexity."""
import json

import pytest

from recipes import train_char_lm as recipe
from recipes.config import ConfigError, build, load_config
from torch_qode.bridge.kernels import KERNELS

CPU = "configs/train_char_lm_cpu.yaml"
GPU = "configs/train_char_lm.yaml"
TINY = ["data.max_files=20", "data.max_chars=40000", "model.d_model=16", "model.heads=2", "model.ff=32",
        "model.context=16", "pretrain.steps=20", "pretrain.batch_size=16", "train.steps=12", "train.batch_size=16",
        "qode.cycle=6", "qode.classical_steps=2", "qode.shots=1000000", "monitor.probe_batch=8", "monitor.steps=16",
        "dissipation.steps=16", "eval.batches=2", "eval.batch_size=16", "--no-progress", "--threads", "1"]


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tiny_run_writes_log_table_and_figures(tmp_path, capsys):
    out = tmp_path / "run"
    res = recipe.main(["--config", CPU, "--out", str(out)] + TINY + ["qode.mode=quantum", "train.twin=true"])
    rows = res["rows"]
    assert [r["cycle"] for r in rows] == [0, 1] and all(r["mode"] == "quantum" for r in rows)
    for r in rows:
        assert r["drift"] is not None and r["drift_lin"] is not None and r["shots"] == 1_000_000
        assert r["ppl"] > 1 and r["ppl_sgd"] > 1 and 0 <= r["acc"] <= 1
        assert r["ppl_twin"] > 1 and 0 <= r["acc_twin"] <= 1 and r["ppl_twin"] != r["ppl"]
    for rep in res["reports"]:      # default attention: the upload ran on the math kernel, and says so
        assert rep["carleman"]["kernels"] == KERNELS and not rep["faults"]
    printed = capsys.readouterr().out
    assert "data: the Python standard library's sources" in printed and "ppl_sgd" in printed
    header = res["table"].splitlines()[0].split()
    assert header[-3:] == ["ppl", "ppl_sgd", "ppl_twin"] and header[header.index("acc_sgd") + 1] == "acc_twin"
    log = _lines(out / "log.jsonl")
    data = next(x for x in log if x["event"] == "data")
    assert data["name"] == "python-stdlib" and data["train_files"] == 18 and data["val_files"] == 2
    assert data["train_chars"] == 40000 and [x["event"] for x in log].count("cycle") == 2
    assert any(x["event"] == "pretrain" for x in log) and any(x["event"] == "dense" for x in log)
    mon = _lines(out / "monitor.jsonl")
    assert {m["event"] for m in mon} >= {"spectrum", "window_end", "eval"}
    for name in ("fig2.png", "perplexity.png"):
        assert (out / name).stat().st_size > 5000


def test_the_split_is_deterministic_and_by_file():
    from torch_qode.data import stdlib_corpus, stdlib_files

    a, b = stdlib_corpus(20, max_chars=5000), stdlib_corpus(20, max_chars=5000)
    assert a.vocab == b.vocab and (a.train == b.train).all() and (a.val == b.val).all()
    names = [f.name for f in stdlib_files()[:20]]
    assert a.val_files == [names[9], names[19]] and not set(a.val_files) & set(a.train_files)
    assert a.decode(a.train[:200]) == stdlib_files()[0].read_text(encoding="utf-8")[:200]


@pytest.mark.parametrize("override, match", [
    ("model.heads=3", r"model: d_model must be a multiple of heads"),
    ("data.max_files=1", r"data\.max_files must be an integer >= 2"),
    ("pretrain.lr=0", r"pretrain\.lr must be a finite number > 0"),
    ("qode.classical_steps=6", r"qode\.classical_steps: classical_steps must be < cycle \(leaving a window"),
    ("qode.tomography_kwargs.sign_method=nope", r"qode\.tomography_kwargs: .*sign_method must be one of"),
])
def test_options_are_checked_before_anything_is_written(tmp_path, override, match):
    out = tmp_path / "o"
    with pytest.raises(ConfigError, match=match):
        recipe.main(["--config", CPU, "--out", str(out)] + TINY + [override])
    assert not out.exists()


def test_gpu_config_is_the_documented_size():
    cfg = build(recipe.Config, [load_config(GPU)])
    recipe._check(cfg)
    assert cfg["gpu"] is True and cfg["model"] == {"d_model": 256, "heads": 8, "layers": 4, "ff": 1024, "context": 256}
