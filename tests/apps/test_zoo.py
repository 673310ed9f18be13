"""A model zoo through QODE's drop-in settings (benchmarks/zoo.py): torchvision, Hugging Face and timm models
built from their public constructors, two cycles each on random batches.  What is asserted is what the
default pruning must give today: no tensor emptied by a download, a model that does not output a constant
and whose loss moves, finite weights, and a mode and a reason for every cycle."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from torch_qode.bridge.dissipation import DissipationCheck
from torch_qode.training.config import QODEConfig

_spec = importlib.util.spec_from_file_location("_zoo", Path(__file__).resolve().parents[2] / "benchmarks" / "zoo.py")
zoo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo)

#: a window fell back to classical training for a limitation another issue lifts: the reason QODE reports
FALLBACK = {"mobilenet_v3_small": "hardsigmoid_backward has no double backward"}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _run(name, **qode):
    # the drop-in settings with the default dissipation check: bounded by check_budget (its predicted
    # criterion: about check_budget·T/2 HVPs and four gradients), which keeps ResNet-18's check in seconds
    return zoo.run(name, **qode)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(zoo.MODELS))
def test_zoo_model_trains_two_cycles_without_an_emptied_tensor(name):
    r = _run(name)
    assert r["emptied"] == [], f"the default pruning emptied {r['emptied']}"
    assert r["zero_now"] == [], f"prunable tensors all zero after training: {r['zero_now']}"
    assert not [w for w in r["warnings"] if "zeroes every entry" in w]
    assert r["finite"]
    assert len(set(r["losses"])) > 1 and max(r["losses"]) - min(r["losses"]) > 1e-6, r["losses"]
    # from the second step on (at step 0 a ViT's zero-initialised head outputs a constant, under SGD too)
    assert min(r["spreads"][1:]) > 1e-6, f"the model outputs a constant at some step: {r['spreads']}"
    assert len(r["modes"]) == 2 and all(m in ("quantum", "classical") for m in r["modes"]), r["modes"]
    assert all(isinstance(why, str) and why for why in r["reasons"]), r["reasons"]
    if name in FALLBACK:
        assert r["modes"] == ["classical", "classical"]
        assert all(FALLBACK[name] in why for why in r["reasons"]), r["reasons"]
    for m, d in zip(r["modes"], r["drift"]):
        assert (d is not None) == (m == "quantum")     # track_sgd: a quantum window reports its drift
    # the check's cost within its default bound (the predicted criterion: about check_budget·T/2 products)
    bound = DissipationCheck().max_hvps(r["window_T"], int(QODEConfig().check_budget * r["window_T"]))
    ran = [h for h in r["check_hvps"] if h is not None]
    assert ran or name in FALLBACK, r["reasons"]
    assert all(0 < h <= bound for h in ran), (ran, bound)


@pytest.mark.slow
def test_zoo_before_global_pruning_emptied_the_vit_head_and_tokens():
    """The behaviour the issue measured, kept reproducible: global magnitude pruning without a floor and with
    every dim() > 1 tensor prunable empties the ViT's zero-initialised head and warns, naming it."""
    r = _run("vit", pruning="global", min_density=0.0, prunable=lambda n, p: p.dim() > 1)
    assert "heads.head.weight" in r["emptied"]
    assert any("heads.head.weight" in w and "zeroes every entry" in w for w in r["warnings"])
    assert r["spreads"][zoo.DROP_IN["cycle"]] < 1e-6   # after the second download the model outputs a constant
