"""recipes.hessian_after_pruning (Fig. 3): CPU config on digits, the CIFAR-100 path on the fixture,
checkpoint loading, and the GPU config's validity."""
import json

import numpy as np
import pytest
import torch

from recipes import config, hessian_after_pruning as rh
from torch_qode.data import DatasetNotFoundError, write_cifar100_fixture
from torch_qode.models import cifar_resnet_num_params

CPU = "configs/hessian_after_pruning_cpu.yaml"
GPU = "configs/hessian_after_pruning.yaml"
TINY = ["pretrain.epochs=2", "hessian.batch_size=64", "hessian.steps=10", "hessian.runs=1",
        "hessian.trace_samples=2", "hessian.top_k=1", "proxy.T=20", "proxy.report_times=[1, 10, 20]",
        "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("hessian_after_pruning")
    return rh.main(["--config", CPU, "--out", str(out)] + TINY)


def test_log_figures_and_checkpoint(result):
    out = result["out"]
    recs = [json.loads(line) for line in open(out / "log.jsonl", encoding="utf-8")]
    events = [r["event"] for r in recs]
    assert events[:3] == ["start", "data", "model"] and events.count("pretrain") == 2 and events[-1] == "summary"
    assert recs[1]["name"] == "digits" and recs[1]["is_fixture"] is False
    assert [r["stage"] for r in recs if r["event"] == "spectrum"] == ["dense", "pruned"]
    spec = next(r for r in recs if r["event"] == "spectrum" and r["stage"] == "pruned")
    assert len(spec["density"]["grid"]) == 256 and len(spec["proxy"]) == 21
    for name in ("density", "proxy"):
        p = result["figures"][name]
        assert p.is_file() and p.stat().st_size > 10_000
    assert (out / "pretrained.pt").is_file()


def test_pruning_and_spectrum_numbers(result):
    sp = result["sparsity"]
    assert sp["global_sparsity"] == pytest.approx(0.9, abs=1e-4)
    st = result["pruned"]
    assert st["positive_mass"] + st["negative_mass"] == pytest.approx(1.0, abs=1e-9)
    assert st["proxy"][0] == 1.0 and np.all(np.isfinite(st["proxy"]) | np.isinf(st["proxy"]))
    assert st["top_eigenvalues"][0] >= st["lambda_max"] - 1e-6 * abs(st["lambda_max"])
    assert 0.0 <= st["positive_fraction"] <= 1.0 and set(st["positive_share_by_band"]) == {"0.001", "0.01", "0.1"}
    # pruning a trained net broadens the spectrum (Fig. 2b/3): the top eigenvalue grows
    assert st["top_eigenvalues"][0] > result["dense"]["top_eigenvalues"][0]
    acc = result["accuracy"]
    assert acc["dense"]["acc"] > 0.3          # 2 epochs on digits already learn something


def test_checkpoint_is_loaded_instead_of_pretraining(result, tmp_path):
    ckpt = result["out"] / "pretrained.pt"
    res = rh.main(["--config", CPU, "--out", str(tmp_path), f"checkpoint={ckpt}", "pretrain.epochs=0",
                   "hessian.before_pruning=false"] + TINY)
    assert res["accuracy"]["dense"]["acc"] == pytest.approx(result["accuracy"]["dense"]["acc"], abs=1e-12)
    assert res["dense"] is None
    recs = [json.loads(line) for line in open(tmp_path / "log.jsonl", encoding="utf-8")]
    assert any(r["event"] == "checkpoint" for r in recs) and not any(r["event"] == "pretrain" for r in recs)


def test_cifar100_path_on_the_fixture(tmp_path, capsys):
    write_cifar100_fixture(tmp_path / "data", n_train=64, n_test=32)
    res = rh.main(["--config", CPU, "--out", str(tmp_path / "out"), "--data-root", str(tmp_path / "data"),
                   "data.name=cifar100", "pretrain.epochs=1", "pretrain.batch_size=32", "hessian.batch_size=16",
                   "hessian.steps=6", "hessian.runs=1", "hessian.trace_samples=2", "hessian.top_k=1",
                   "hessian.before_pruning=false", "hessian.support=kept", "proxy.T=5",
                   "proxy.report_times=[1]", "--no-progress", "--threads", "1"])
    assert res["sparsity"]["global_sparsity"] == pytest.approx(0.9, abs=1e-3)
    data = [json.loads(line) for line in open(tmp_path / "out" / "log.jsonl", encoding="utf-8")][1]
    assert data["event"] == "data" and data["name"] == "cifar100" and data["is_fixture"] is True
    assert data["train_samples"] == 64 and data["test_samples"] == 32
    assert "TEST FIXTURE" in capsys.readouterr().out
    assert res["pruned"]["n"] < 0.2 * cifar_resnet_num_params(8, 1, 100, 3)   # the kept support only


def test_missing_dataset_names_both_remedies(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"--data-root.*--download"):
        rh.main(["--config", CPU, "--out", str(tmp_path / "o"), "--data-root", str(tmp_path / "empty"),
                 "data.name=cifar100"] + TINY)
    with pytest.raises(config.ConfigError, match="--data-root"):
        rh.main(["--config", CPU, "--out", str(tmp_path / "o2"), "data.name=cifar100"] + TINY)


@pytest.mark.parametrize("override, match", [
    ("hessian.lanczos=3", r"unknown config key 'hessian\.lanczos'; allowed keys: .*hessian\.steps"),
    ("hessian.mode=test", r"hessian\.mode must be"),
    ("prune.sparsity=1.0", r"prune\.sparsity must lie"),
    ("data.name=mnist", r"data\.name must be"),
    ("hessian.top_k=100000", r"hessian\.top_k must be at most the Hessian's size n = 77,754"),
    ("hessian.grid=1", r"hessian\.grid must be an integer >= 2"),
    ("proxy.report_times=[a]", r"proxy\.report_times must be a list of integers in 0\.\.proxy\.T = 0\.\.20"),
    ("proxy.report_times=[1.5]", r"proxy\.report_times must be"),
    ("proxy.report_times=[-1, 5]", r"proxy\.report_times must be"),
    ("proxy.report_times=[21]", r"proxy\.report_times must be"),
    ("proxy.lr=.nan", r"proxy\.lr must be a finite number > 0"),
    ("pretrain.epochs=-3", r"pretrain\.epochs must be an integer >= 0"),
    ("data.test_fraction=0.999", r"data\.test_fraction: .*training split empty"),
    ("checkpoint=5", r"checkpoint must be null or a file path"),
    ("data.root=5", r"data\.root must be null or a folder"),
])
def test_bad_config_raises(tmp_path, override, match):
    with pytest.raises(config.ConfigError, match=match):
        rh.main(["--config", CPU, "--out", str(tmp_path / "o")] + TINY + [override])
    assert not (tmp_path / "o").exists()          # before the output folder and any pre-training


def test_hessian_top_k_is_checked_against_the_kept_support(tmp_path):
    with pytest.raises(config.ConfigError,
                       match=r"hessian\.top_k must be at most the Hessian's size n = 8,389 \(kept parameters"):
        rh.main(["--config", CPU, "--out", str(tmp_path / "o")] + TINY
                + ["hessian.support=kept", "hessian.top_k=70000"])


def test_checkpoint_must_fit_and_be_finite(result, tmp_path):
    ckpt = result["out"] / "pretrained.pt"
    with pytest.raises(config.ConfigError, match=r"checkpoint .* does not fit the model cifar_resnet\(depth=14, .* "
                                                 r"model\.depth, model\.widen and data\.name"):
        rh.main(["--config", CPU, "--out", str(tmp_path / "a"), f"checkpoint={ckpt}", "model.depth=14"] + TINY)
    recs = [json.loads(line) for line in open(tmp_path / "a" / "log.jsonl", encoding="utf-8")]
    assert not any(r["event"] in ("pretrain", "spectrum") for r in recs) and recs[-1]["event"] == "error"
    state = torch.load(ckpt, weights_only=True)
    state["fc.bias"][0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(config.ConfigError, match=r"nan\.pt' holds non-finite values .*fc\.bias"):
        rh.main(["--config", CPU, "--out", str(tmp_path / "b"), f"checkpoint={tmp_path / 'nan.pt'}"] + TINY)


def test_an_existing_run_folder_is_not_reused(result):
    log = (result["out"] / "log.jsonl").read_text()
    with pytest.raises(config.ConfigError, match="not empty"):
        rh.main(["--config", CPU, "--out", str(result["out"])] + TINY)
    assert (result["out"] / "log.jsonl").read_text() == log


def test_single_point_proxy_is_drawn(tmp_path, monkeypatch):
    import torch_qode.plotting as plotting

    figs = []
    real_save = plotting.save
    monkeypatch.setattr(plotting, "save", lambda fig, path, **kw: (figs.append(fig), real_save(fig, path, **kw))[1])
    rh.main(["--config", CPU, "--out", str(tmp_path / "o")] + TINY
            + ["proxy.T=0", "proxy.report_times=[0]", "pretrain.epochs=0", "hessian.before_pruning=false"])
    proxy_fig = figs[-1]
    (line,) = proxy_fig.axes[0].lines
    assert len(line.get_xdata()) == 1 and line.get_marker() == "o"   # visible, not an empty plot


def test_gpu_config_is_valid_and_marked():
    cfg = config.build(rh.Config, [config.load_config(GPU)])
    rh._check(cfg)
    assert cfg["gpu"] is True and "GPU-SIZED" in open(GPU, encoding="utf-8").read()
    assert cfg["data"]["name"] == "cifar100" and cfg["prune"]["sparsity"] == 0.9
    assert cifar_resnet_num_params(cfg["model"]["depth"], cfg["model"]["widen"], 100) == 103_024_340
    cpu = config.build(rh.Config, [config.load_config(CPU)])
    assert cpu["gpu"] is False
