"""``QODE(hvp=...)`` (issue 14): a matrix-free window's products from the retained upload graph or from
replays of the upload closure (micro-batch by micro-batch), equal to round-off; ``"auto"`` by memory;
the upload returns a detached loss; replays leave RNG, ``.grad`` and BatchNorm statistics alone."""
import io
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_qode.bridge.recompute import LossMismatchError
from torch_qode.bridge.taylor import decomposed_norms
from torch_qode.training import config as qconfig
from torch_qode.training.qode import QODE
from tests._models import cnn_batch, tiny_cnn
from tests.training.test_order2 import _close
from tests.training.test_qode import _untimed, batches, flat, micro_mlp, tiny_mlp

BASE = dict(lr=0.1, mode="quantum", cycle=6, classical_steps=1, sparsity=0.0, explicit=False, shots=None)


def mlp_dropout(seed=0):
    """An MLP with dropout: a replay must draw the upload's masks."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 2)).double()


def micro_closure(model, opt, X, Y, parts=1, decompose=False, loss="mse"):
    """A closure accumulating ``parts`` micro-batches (each loss scaled by its share of the batch)."""
    def closure():
        opt.zero_grad()
        total = 0.0
        for xs, ys in zip(X.chunk(parts), Y.chunk(parts)):
            with decomposed_norms(model) if decompose else _nothing():
                out = model(xs)
            part = ((out - ys) ** 2).mean() if loss == "mse" else F.cross_entropy(out, ys)
            part = part * (xs.shape[0] / X.shape[0])
            part.backward()
            total = total + part.detach()
        return total
    return closure


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _train(make, data, hvp, parts=1, order=1, decompose=False, loss="mse", **kw):
    model = make(0)
    opt = QODE(model.parameters(), model=model, hvp=hvp, **{**BASE, "carleman_order": order, **kw})
    for X, Y in data:
        opt.step(micro_closure(model, opt, X, Y, parts, decompose, loss))
    return model, opt


def _cnn_data(n):
    return [cnn_batch(n=8, seed=s) for s in range(n)]


@pytest.mark.parametrize("make,order", [(mlp_dropout, 1), (mlp_dropout, 2), (tiny_cnn, 1), (tiny_cnn, 2)])
@pytest.mark.parametrize("parts", [1, 2])
def test_recompute_equals_retain(make, order, parts):
    """Same windows to 1e-10 in float64 (MLP with dropout, CNN with BatchNorm in train mode; order 1 and
    order 2 on the factored state; one batch and a closure of 2 micro-batches), same BN buffers."""
    cnn = make is tiny_cnn
    data = _cnn_data(7) if cnn else batches(7, seed=3)
    kw = dict(parts=parts, order=order, decompose=cnn and order == 2, loss="ce" if cnn else "mse")
    m_ret, o_ret = _train(make, data, "retain", **kw)
    m_rec, o_rec = _train(make, data, "recompute", **kw)
    r_ret, r_rec = o_ret.reports[0], o_rec.reports[0]
    assert r_ret.mode == r_rec.mode == "quantum"
    assert r_ret.carleman["hvp"] == "retain" and r_rec.carleman["hvp"] == "recompute"
    assert r_rec.carleman["state"] == ("factored" if order == 2 else "dense")
    assert torch.allclose(flat(m_rec), flat(m_ret), rtol=1e-10, atol=1e-10)
    assert not torch.equal(flat(m_rec), flat(make(0)))          # the window moved the weights
    for b_ret, b_rec in zip(m_ret.buffers(), m_rec.buffers()):  # replays never touch BN statistics
        assert torch.equal(b_ret, b_rec)
    if order == 2:
        assert r_rec.carleman["order_gap"] == pytest.approx(r_ret.carleman["order_gap"], rel=1e-9)


def test_micro_batches_equal_one_batch():
    """hvp='recompute' with 4 micro-batches (each graph freed before the next) = retain on the whole
    batch at once, to round-off (an MLP without batch statistics: the two losses are the same function)."""
    def make(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()

    data = batches(7, seed=5)
    m1, _ = _train(make, data, "retain", parts=1, order=2)
    m4, o4 = _train(make, data, "recompute", parts=4, order=2)
    assert o4.reports[0].mode == "quantum"
    assert torch.allclose(flat(m4), flat(m1), rtol=1e-10, atol=1e-12)


def test_dissipation_check_products_equal():
    """mode='auto': the dissipation check's Lanczos runs on replayed HVPs, verdict equal to round-off."""
    data = _cnn_data(7)
    reps = [_train(tiny_cnn, data, hvp, parts=2, loss="ce", mode="auto", lr=0.05)[1].reports[0]
            for hvp in ("retain", "recompute")]
    assert reps[0].dissipation is not None
    assert _close(_untimed(reps[0].dissipation), _untimed(reps[1].dissipation), tol=1e-8)
    assert reps[0].mode == reps[1].mode


def test_auto_retains_within_budget_and_recomputes_beyond(monkeypatch):
    data = batches(7, seed=3)
    _, o = _train(mlp_dropout, data, "auto")
    rec = o.reports[0].carleman
    assert rec["hvp"] == "retain" and rec["graph_bytes_estimate"] > 0
    monkeypatch.setattr(qconfig, "RETAIN_BUDGET_BYTES_CPU", rec["graph_bytes_estimate"] - 1)
    m2, o2 = _train(mlp_dropout, data, "auto")
    assert o2.reports[0].carleman["hvp"] == "recompute"
    m3, _ = _train(mlp_dropout, data, "retain")
    assert torch.allclose(flat(m2), flat(m3), rtol=1e-10, atol=1e-12)


def test_auto_without_model_retains():
    model = mlp_dropout(0)
    opt = QODE(model.parameters(), hvp="auto", **BASE)
    for X, Y in batches(3, seed=3):
        opt.step(micro_closure(model, opt, X, Y))
    assert opt.reports[0].carleman["hvp"] == "retain"


class _Probe(torch.autograd.Function):
    """Identity whose autograd node holds a sentinel: the sentinel lives exactly as long as the graph."""

    alive: list = []

    @staticmethod
    def forward(ctx, x):
        ctx.sentinel = _Sentinel()
        _Probe.alive.append(weakref.ref(ctx.sentinel))
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g


class _Sentinel:
    pass


def _graphs_alive():
    return sum(r() is not None for r in _Probe.alive)


@pytest.mark.parametrize("hvp", ["retain", "recompute"])
def test_window_holds_a_graph_only_when_retaining(hvp):
    """Between window steps a recompute window holds no autograd graph; a retained one holds the upload's.
    The upload step's returned loss is detached either way."""
    model = tiny_cnn(0)
    opt = QODE(model.parameters(), model=model, hvp=hvp, **BASE)
    _Probe.alive = []

    def closure_for(X, y):
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(_Probe.apply(model(X)), y)
            loss.backward()
            return loss
        return closure

    data = _cnn_data(3)
    opt.step(closure_for(*data[0]))                   # classical
    loss = opt.step(closure_for(*data[1]))            # the upload
    assert opt.in_quantum_window
    assert loss.grad_fn is None and not loss.requires_grad
    opt.step(closure_for(*data[2]))                   # a window step (its own graph is freed)
    assert len(_Probe.alive) >= 3                     # the probe saw every closure call
    assert _graphs_alive() == (1 if hvp == "retain" else 0)


def test_replay_of_another_batch_is_refused():
    """A closure reading a batch the loop replaces (here a shared dict) cannot be replayed: refused with
    the fix, not silently expanded on the wrong batch."""
    model = mlp_dropout(0)
    opt = QODE(model.parameters(), model=model, hvp="recompute", **BASE)
    cur = {}

    def closure():
        opt.zero_grad()
        loss = ((model(cur["X"]) - cur["Y"]) ** 2).mean()
        loss.backward()
        return loss

    data = batches(4, seed=3)
    for X, Y in data[:2]:
        cur["X"], cur["Y"] = X, Y
        opt.step(closure)
    cur["X"], cur["Y"] = data[2]
    with pytest.raises(LossMismatchError, match="make_closure"):
        opt.step(closure)


def test_inplace_write_inside_a_recompute_window_aborts_it():
    """The write is seen (the parameter's version moved, the replay refuses): the window ends at θ0
    with the fault's clear message in the report, and the rest of the window trains classically."""
    model = mlp_dropout(0)
    opt = QODE(model.parameters(), model=model, hvp="recompute", **BASE)
    data = batches(4, seed=3)
    for X, Y in data[:2]:
        opt.step(micro_closure(model, opt, X, Y))
    theta0 = opt._win.theta0.clone()
    with torch.no_grad():
        next(model.parameters()).mul_(1.0)
    opt.step(micro_closure(model, opt, *data[2]))
    rep = opt.reports[0]
    assert not opt.in_quantum_window and torch.equal(flat(model), theta0.to(flat(model)))
    assert rep.mode == "classical" and "aborted at t=1" in rep.reason and "modified in place" in rep.reason
    assert any(f.startswith("step 2: QODE: the parameters or buffers") for f in rep.faults)
    opt.step(micro_closure(model, opt, *data[3]))            # a classical step, no error raised again
    assert not opt.in_quantum_window and opt.step_count == 4


def test_recompute_resume_with_restore_expansion_is_bit_identical():
    """A recompute window resumed mid-window through state_dict + restore_expansion (closure over the
    upload batch) ends bit-for-bit where the uninterrupted run ends (a model without dropout)."""
    data = batches(10, seed=8)
    m_ref, o_ref = _train(tiny_mlp, data, "recompute", parts=2)
    m1 = tiny_mlp(0)
    o1 = QODE(m1.parameters(), model=m1, hvp="recompute", **BASE)
    for X, Y in data[:4]:
        o1.step(micro_closure(m1, o1, X, Y, 2))
    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": o1.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m2 = tiny_mlp(5)
    m2.load_state_dict(ck["model"])
    o2 = QODE(m2.parameters(), model=m2, hvp="recompute", **BASE)
    o2.load_state_dict(ck["opt"])
    o2.restore_expansion(micro_closure(m2, o2, *data[1], 2))
    for X, Y in data[4:]:
        o2.step(micro_closure(m2, o2, X, Y, 2))
    assert o2.reports[0].mode == "quantum" and not o2.reports[0].faults
    assert torch.equal(flat(m2), flat(m_ref))
    assert _untimed(o2.reports[0].as_dict()) == _untimed(o_ref.reports[0].as_dict())


def test_bad_hvp_arguments_name_the_fix():
    model = mlp_dropout(0)
    with pytest.raises(ValueError, match="hvp must be one of"):
        QODE(model.parameters(), hvp="keep")
    with pytest.raises(ValueError, match="model="):
        QODE(model.parameters(), hvp="recompute")


@pytest.mark.parametrize("order", [1, 2])
def test_explicit_windows_build_the_same_terms_from_replays(order):
    """|S| ≤ 128: the dense Taylor terms summed over replayed micro-batches equal the retained graph's."""
    make = mlp_dropout if order == 1 else micro_mlp
    data = batches(7, seed=3, dims=(3, 2) if order == 1 else (2, 1))
    m_ret, o_ret = _train(make, data, "retain", parts=2, order=order, explicit=None)
    m_rec, o_rec = _train(make, data, "recompute", parts=2, order=order, explicit=None)
    assert o_rec.reports[0].carleman["explicit"] and o_rec.reports[0].carleman["hvp"] == "recompute"
    assert torch.allclose(flat(m_rec), flat(m_ret), rtol=1e-10, atol=1e-12)
    assert not torch.equal(flat(m_rec), flat(make(0)))


def test_recompute_is_refused_and_auto_retains_under_a_distributed_comm(monkeypatch):
    """A replay of a DDP closure would all-reduce gradients inside each product: refused, auto retains."""
    from tests.training.test_window_core import RecordingComm
    model = mlp_dropout(0)
    with pytest.raises(ValueError, match="hvp='recompute' under torch.distributed"):
        QODE(model.parameters(), hvp="recompute", model=model, comm=RecordingComm(), **BASE)
    monkeypatch.setattr(qconfig, "RETAIN_BUDGET_BYTES_CPU", 0)     # auto would recompute in one process
    opt = QODE(model.parameters(), hvp="auto", model=model, comm=RecordingComm(), **BASE)
    for X, Y in batches(3, seed=3):
        opt.step(micro_closure(model, opt, X, Y))
    assert opt.reports[0].carleman["hvp"] == "retain"
