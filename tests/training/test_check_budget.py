"""Issue 20, item 3: the dissipation check costs a bounded share of the window it guards.  Its Lanczos
steps are bounded by ``check_budget`` HVPs per window HVP unless ``steps=`` is explicit (then the verdict
is the one before issue 20, bit for bit), its products are the window's own (replayed per micro-batch
with ``hvp="recompute"``), and the report states its cost against the window's HVPs."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from torch_qode.bridge.dissipation import MIN_STEPS, DissipationCheck
from torch_qode.bridge.taylor import TaylorExpansion
from torch_qode.training import window as _w
from torch_qode.training.comm import LocalComm
from torch_qode.training.qode import QODE


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).to(torch.float64)   # 123 weights


def _data(steps, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 6, generator=g, dtype=torch.float64), torch.randn(size, 3, generator=g,
                                                                             dtype=torch.float64))
            for _ in range(steps)]


def _expansion(X, Y):
    model = _mlp()
    loss = ((model(X) - Y) ** 2).mean()
    return TaylorExpansion.from_loss(loss, list(model.parameters()), lr=0.05, degree=1)


def test_a_bounded_check_runs_budget_times_T_steps_and_an_explicit_one_is_todays_bit_for_bit():
    X, Y = _data(1)[0]
    exp = _expansion(X, Y)
    comm = LocalComm()
    for T, budget, want in ((20, 1.0, 20), (3, 1.0, MIN_STEPS), (200, 1.0, 64), (20, 0.5, 10), (20, None, 64)):
        v = _w.check_dissipation(exp, DissipationCheck(criterion="proxy"), 0.05, T, comm, None, budget)
        assert v.hvps == want, (T, budget, v.hvps)
    today = DissipationCheck(steps=64, criterion="proxy")(exp.hvp, exp.n, lr=0.05, T=20)   # before issue 20
    bounded = _w.check_dissipation(exp, DissipationCheck(steps=64, criterion="proxy"), 0.05, 20, comm, None, 1.0)
    standalone = DissipationCheck(criterion="proxy")(exp.hvp, exp.n, lr=0.05, T=20)    # no caller's bound: 64
    for v in (bounded, standalone):
        assert v.hvps == today.hvps == 64 and v.reason == today.reason and v.passed == today.passed
        np.testing.assert_array_equal(v.proxy, today.proxy)
        assert v.top_eigenvalue == today.top_eigenvalue and v.positive_fraction == today.positive_fraction


def test_qode_reports_the_checks_cost_against_the_window_and_keeps_it_within_budget():
    model = _mlp()
    T = 20
    opt = QODE(model.parameters(), lr=0.05, mode="auto", cycle=T + 1, classical_steps=1, sparsity=0.0,
               shots=None, explicit=False, dissipation=DissipationCheck(max_error_proxy=1e300, min_positive_fraction=0,
                                                                 criterion="proxy"))
    for X, Y in _data(T + 1):
        def closure(X=X, Y=Y):
            opt.zero_grad()
            loss = ((model(X) - Y) ** 2).mean()
            loss.backward()
            return loss
        opt.step(closure)
    d = opt.reports[0].dissipation
    assert opt.reports[0].mode == "quantum"
    assert d["hvps"] == T and d["window_hvps"] >= T                      # order 1: ≥ one HVP per step
    assert d["cost_ratio"] == d["hvps"] / d["window_hvps"] <= opt.cfg.check_budget


def test_with_recompute_the_checks_products_replay_the_closure_one_micro_batch_at_a_time(monkeypatch):
    """Every check product and gradient re-runs the closure (two micro-batches of 8): 2 forwards of 8 samples each,
    never a forward of the whole batch during the check."""
    model = _mlp()
    sizes, during = [], []
    model.register_forward_hook(lambda m, inp, out: sizes.append(inp[0].shape[0]))
    call = DissipationCheck.__call__

    def watched(self, hvp, n, **kw):
        start = len(sizes)
        v = call(self, hvp, n, **kw)
        during.append((sizes[start:], v.hvps, v.prediction.grads))
        return v
    monkeypatch.setattr(DissipationCheck, "__call__", watched)
    T = 12
    opt = QODE(model.parameters(), lr=0.05, mode="auto", cycle=T + 1, classical_steps=1, sparsity=0.0, shots=None,
               explicit=False, model=model, hvp="recompute", taylor_degree=1)

    def closure_for(X, Y):
        def closure():
            opt.zero_grad()
            loss = None
            for xb, yb in zip(X.split(8), Y.split(8)):      # micro-batches: one backward each
                part = ((model(xb) - yb) ** 2).mean() / 2
                part.backward()
                loss = part.detach() if loss is None else loss + part.detach()
            return loss
        return closure
    for X, Y in _data(2):
        opt.step(closure_for(X, Y))
    (seen, hvps, grads), = during
    # the predicted criterion: its path, probes and quadrature, and a gradient at each of its two probes
    path, q = DissipationCheck().plan(T, T)
    assert hvps == path + 2 + q and grads == 2                      # the noise's quadrature comes at t = 1
    assert len(seen) == 2 * (hvps + grads) and set(seen) == {8}
