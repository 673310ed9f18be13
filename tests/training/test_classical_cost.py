"""The window's classical cost beside its quantum ledger (issue 11): FLOPs of the upload closure
(FlopCounterMode) × T, and the simulation's products through the upload graph in HVP units."""
import contextlib

import pytest
import torch
import torch.nn as nn

from torch_qode.bridge.dissipation import DissipationCheck
from torch_qode.bridge.engines import GraphEngine
from torch_qode.core.resources import THIRD_ORDER_HVPS, classical_cost
from torch_qode.training import window as _w
from torch_qode.training.qode import QODE
from tests.training.test_qode import _untimed, batches, closure_for, flat

B, IN, HID, OUT = 16, 3, 4, 2
BASE = dict(lr=0.1, mode="quantum", cycle=6, classical_steps=1, sparsity=0.0, shots=None)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, OUT)).double()


def _train(seed=0, **kw):
    model = _mlp(seed)
    opt = QODE(model.parameters(), **{**BASE, **kw})
    for X, Y in batches(6, seed=7, size=B, dims=(IN, OUT)):
        opt.step(closure_for(model, opt, X, Y))
    return model, opt


def test_closure_flops_match_the_hand_count_of_a_linear_mlp():
    # FlopCounterMode counts 2·m·k·n per matmul: forward x·W1ᵀ and h·W2ᵀ; backward the two weight
    # gradients and the input gradient of layer 2 only (layer 1's input needs none); biases,
    # tanh and the loss count 0
    fwd = 2 * B * IN * HID + 2 * B * HID * OUT
    hand = fwd + (2 * B * IN * HID + 2 * B * HID * OUT) + 2 * B * HID * OUT
    for order in (1, 2):
        _, opt = _train(carleman_order=order, explicit=False)
        rep = opt.reports[0]
        assert rep.mode == "quantum", rep.reason
        c = rep.resources["classical"]
        T = BASE["cycle"] - BASE["classical_steps"]
        assert c["closure_flops"] == hand and c["flops"] == T * hand and c["closures"] == T
        assert c["gates"] == rep.resources["gates_qlsa"]             # forward solver: Theorem II.3
        assert c["gates_per_flop"] == pytest.approx(c["gates"] / c["flops"], rel=1e-15)


def test_counting_flops_leaves_training_bit_identical(monkeypatch):
    kw = dict(carleman_order=2, explicit=False, track_sgd=True, shots=5000)
    m1, o1 = _train(**kw)

    @contextlib.contextmanager
    def not_counting():
        yield {"flops": None}
    monkeypatch.setattr(_w, "flop_count", not_counting)
    m2, o2 = _train(**kw)
    assert torch.equal(flat(m1), flat(m2)) and not torch.equal(flat(m1), flat(_mlp(0)))
    r1, r2 = _untimed(o1.reports[0].as_dict()), _untimed(o2.reports[0].as_dict())
    assert r1["resources"]["classical"]["closure_flops"] > 0
    assert r2["resources"]["classical"]["closure_flops"] is None
    for r in (r1, r2):
        r["resources"].pop("classical")
    assert r1 == r2


@pytest.fixture
def engine_counts(monkeypatch):
    """Rows through GraphEngine's plain HVPs and third-order sums (an instrumentation independent of
    the window's own counters)."""
    counts = {"hvp": 0, "sym": 0}
    hvp, sym, scaled = GraphEngine.hvp, GraphEngine.sym_sum, GraphEngine.scaled_hvp

    def hvp_counted(self, V, create_graph=False):
        if not create_graph:          # sym_sum's inner HVPs keep their graph: part of a third-order product
            counts["hvp"] += V.shape[0]
        return hvp(self, V, create_graph)

    def sym_counted(self, V, lam):
        counts["sym"] += V.shape[0]
        return sym(self, V, lam)
    def scaled_counted(self, y, c):   # the lean order-1 window step's product: one vector
        counts["hvp"] += 1
        return scaled(self, y, c)
    monkeypatch.setattr(GraphEngine, "hvp", hvp_counted)
    monkeypatch.setattr(GraphEngine, "sym_sum", sym_counted)
    monkeypatch.setattr(GraphEngine, "scaled_hvp", scaled_counted)
    return counts


@pytest.mark.parametrize("kw", [dict(carleman_order=1, mode="auto"), dict(carleman_order=2),
                                dict(carleman_order=2, carleman_state="dense", mode="auto")])
def test_product_counts_match_an_instrumented_engine(engine_counts, kw):
    _, opt = _train(explicit=False, **kw)
    rep = opt.reports[0]
    assert rep.mode == "quantum", rep.reason
    c = rep.resources["classical"]
    assert c["hvps"] + c["lanczos_hvps"] == engine_counts["hvp"]
    assert c["third_order"] == engine_counts["sym"]
    assert c["hvp_equivalents"] == c["hvps"] + c["lanczos_hvps"] + THIRD_ORDER_HVPS * c["third_order"]
    T = BASE["cycle"] - BASE["classical_steps"]
    if kw.get("mode") == "auto":
        # the predicted criterion: the path, two probes, two quadratures (bounded by check_budget·T/2)
        assert c["lanczos_hvps"] == rep.dissipation["hvps"] == DissipationCheck().max_hvps(T, T)
    else:
        assert c["lanczos_hvps"] == 0
    if kw["carleman_order"] == 1:
        assert c["hvps"] == T and c["third_order"] == 0               # one HVP per step
    else:
        assert c["third_order"] > 0


def test_explicit_windows_count_the_products_that_build_the_terms():
    n = IN * HID + HID + HID * OUT + OUT
    for order, want in ((1, (n, 0)), (2, (n, n * n))):
        _, opt = _train(carleman_order=order, explicit=True)
        c = opt.reports[0].resources["classical"]
        assert (c["hvps"], c["third_order"]) == want


def test_classical_cost_from_numbers_and_its_checks():
    c = classical_cost(10, 1000, hvps=12, third_order=3, lanczos_hvps=64, gates=5e4)
    assert c.flops == 1e4 and c.gates_per_flop == 5.0 and c.hvp_equivalents == 12 + 64 + 3 * THIRD_ORDER_HVPS
    assert classical_cost(10, None).gates_per_flop is None and classical_cost(0, 5, gates=1.0).gates_per_flop is None
    for kw, name in ((dict(T=-1, closure_flops=1), "T"), (dict(T=1, closure_flops=-2), "closure_flops"),
                     (dict(T=1, closure_flops=1, hvps=1.5), "hvps"),
                     (dict(T=1, closure_flops=1, gates=float("nan")), "gates")):
        with pytest.raises((ValueError, TypeError), match=name):
            classical_cost(**kw)
