"""The hot paths' lean variants against the generic code they replace, bit for bit: the order-1
window step (``CarlemanSystem.step_into`` with ``GraphEngine.scaled_hvp``, F0 copied from the
parameters' ``.grad``), the classical step's fast mask, and the Lanczos loop."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_qode.bridge.engines import GraphEngine
from torch_qode.bridge.taylor import TaylorExpansion
from torch_qode.bridge.taylor_ode import _scaled
from torch_qode.core.carleman.base import CarlemanSystem
from torch_qode.core.carleman import carleman
from torch_qode.core.state import DenseLevels
from torch_qode.training import window as _w
from torch_qode.training.qode import QODE
from tests._models import ce_closure


def _mlp(seed: int, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)   # 163 weights: matrix-free


def _data(steps: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(12, 6, generator=g, dtype=dtype), torch.randint(0, 3, (12,), generator=g))
            for _ in range(steps)]


_closure = ce_closure


def _generic(monkeypatch) -> None:
    """Force the generic path: no ``step_into``, F0 from the flat gradient."""
    monkeypatch.setattr(CarlemanSystem, "step_into", lambda self, y, t, out: False)
    f0 = _w.Window.f0_from_grads
    monkeypatch.setattr(_w.Window, "f0_from_grads",
                        lambda self, g: f0(self, g if isinstance(g, torch.Tensor) else _w.flat_grads(g)))


def _run(dtype, steps=9, **kw):
    model = _mlp(0, dtype)
    opt = QODE(model.parameters(), lr=0.2, mode="quantum", sparsity=0.0, cycle=8, classical_steps=1,
               carleman_order=1, noise="stream", explicit=False, **kw)
    seen, mid = [], None
    for k, (x, y) in enumerate(_data(steps, dtype)):
        opt.step(_closure(model, opt, x, y))
        if opt.in_quantum_window:
            seen.append(opt._win.state.level1().clone())
            if k == 4:
                mid = opt.state_dict()
    return model, opt, seen, mid


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lean_window_step_is_bit_identical_to_the_generic_one(monkeypatch, dtype):
    lean_model, lean_opt, lean_u, lean_sd = _run(dtype)
    assert lean_opt.reports[0].mode == "quantum" and not lean_opt.reports[0].carleman["explicit"]
    with monkeypatch.context() as m:
        _generic(m)
        ref_model, ref_opt, ref_u, ref_sd = _run(dtype)
    assert len(lean_u) == len(ref_u) >= 5
    assert all(torch.equal(a, b) for a, b in zip(lean_u, ref_u))
    for p, q in zip(lean_model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
    w1, w2 = lean_sd["qode"]["window"], ref_sd["qode"]["window"]
    assert torch.equal(w1["y"], w2["y"]) and w1["products"] == w2["products"] and w1["t"] == w2["t"]
    assert all(torch.equal(w1["tape"][t], w2["tape"][t]) for t in w2["tape"]) and w1["tape"].keys() == w2["tape"].keys()
    assert lean_opt.reports[0].resources == ref_opt.reports[0].resources


def test_lean_window_step_is_taken(monkeypatch):
    """The window step above really runs ``scaled_hvp`` (else the comparison compares nothing)."""
    calls = []
    orig = GraphEngine.scaled_hvp
    monkeypatch.setattr(GraphEngine, "scaled_hvp", lambda self, *a: calls.append(1) or orig(self, *a))
    _, opt, _, _ = _run(torch.float32, steps=4)
    assert len(calls) == 3 and opt._win.products["hvp"] == 3


@pytest.mark.parametrize("unused", [False, True])
def test_scaled_hvp_added_equals_the_generic_product(unused):
    """``acc + F1.matvec_buffer(y)`` is ``acc + _scaled(hvp(y), −η, acc)`` bit for bit, also for a leaf
    outside the graph (the generic path's materialised zeros times c: −0.0)."""
    model, (x, y) = _mlp(1), _data(1)[0]
    extra = nn.Parameter(torch.ones(3))
    params = list(model.parameters()) + ([extra] if unused else [])
    exp = TaylorExpansion.from_loss(F.cross_entropy(model(x), y), params, lr=0.3, degree=1)
    F1 = exp.ode(explicit=False).terms[1]
    g = torch.Generator().manual_seed(0)
    for _ in range(2):                          # twice: the reused buffers
        v = torch.randn(exp.n, generator=g, dtype=torch.float64)
        acc = torch.randn(exp.n, generator=g, dtype=torch.float64)
        if unused:
            acc[-3:] = torch.tensor([0.0, -0.0, 1.0], dtype=torch.float64)
        ref = acc + _scaled(exp.hvp(v[:, None]), -0.3, v[:, None])[:, 0]
        got = acc + F1.matvec_buffer(v)
        assert torch.equal(got, ref) and torch.equal(torch.signbit(got), torch.signbit(ref))
    wd = TaylorExpansion.from_loss(F.cross_entropy(model(x), y), params, lr=0.3, degree=1, weight_decay=1e-2)
    assert not hasattr(wd.ode(explicit=False).terms[1], "matvec_buffer")     # the generic product there
    exp.release()
    with pytest.raises(RuntimeError, match="released"):
        F1.matvec_buffer(v)


def test_dense_levels_double_buffer_matches_step_and_survives_a_failed_step():
    model, (x, y) = _mlp(2), _data(1)[0]
    exp = TaylorExpansion.from_loss(F.cross_entropy(model(x), y), list(model.parameters()), lr=0.3, degree=1)
    rows = [torch.randn(exp.n, dtype=torch.float64, generator=torch.Generator().manual_seed(t)) for t in range(4)]
    rows[3][5] = float("nan")
    sys_ = carleman(exp.ode(F0=lambda t: rows[t], explicit=False), 1, "discrete")
    state, y_ref = DenseLevels.zeros(sys_), torch.zeros(exp.n, dtype=torch.float64)
    for t in range(3):
        state.advance(sys_, t)
        y_ref = sys_.step(y_ref, t)
        assert torch.equal(state.y, y_ref)
    before = state.y.clone()
    with pytest.raises(Exception, match="non-finite"):
        state.advance(sys_, 3)
    assert torch.equal(state.y, before)


@pytest.mark.parametrize("bad", ["grad", "loss"])
@pytest.mark.parametrize("track_sgd", [False, True])
def test_a_nonfinite_step_in_a_lean_window_aborts_as_before(bad, track_sgd):
    """Without shadows the gradients' check is the state's (one reduction); the abort, its reason and
    the skipped step are those of the check before the step (which runs with ``track_sgd``)."""
    model = _mlp(0)
    opt = QODE(model.parameters(), lr=0.2, mode="quantum", sparsity=0.0, cycle=8, classical_steps=1,
               carleman_order=1, noise="stream", explicit=False, track_sgd=track_sgd)
    data = _data(4)
    for x, y in data[:3]:
        opt.step(_closure(model, opt, x, y))
    theta0 = opt._win.theta0.clone()

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(data[3][0]), data[3][1])
        loss.backward()
        if bad == "grad":
            next(model.parameters()).grad[0, 0] = float("nan")
            return loss
        return loss + float("inf")

    opt.step(closure)
    rep = opt.reports[0]
    assert not opt.in_quantum_window and rep.skipped_steps == 1
    assert rep.reason == "quantum window aborted at t=2: non-finite loss or gradient inside the quantum window; " \
                         "parameters restored to θ0"
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), theta0)
