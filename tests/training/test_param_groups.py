"""Parameter groups as ``torch.optim.SGD`` takes them (issue 20): classical steps train every group as
SGD does, bit for bit; a window applies each group's weight decay to its own coordinates (F0 gets
``wd_i·θ0_i``, F1 ``−η·wd_i`` on its diagonal); groups whose ``lr`` differ are refused outside
``mode="classical"``, naming ``lr``."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.optim import lr_scheduler

from torch_qode.training.qode import QODE
from tests.training.test_qode import batches, closure_for, flat, flat_loss

WD, NO_WD = 0.3, 0.0


def _model(seed: int = 0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)


def _groups(model, lr2=None, momentum2=None) -> list:
    """The common split: weight decay on the matrices, none on biases and norms."""
    decay = [p for p in model.parameters() if p.dim() > 1]
    other = {"params": [p for p in model.parameters() if p.dim() <= 1], "weight_decay": NO_WD}
    if lr2 is not None:
        other["lr"] = lr2
    if momentum2 is not None:
        other["momentum"] = momentum2
    return [{"params": decay}, other]


def _flat_wd(model) -> torch.Tensor:
    """The per-coordinate weight decay of :func:`_groups`, in the flat order of the groups."""
    ps = _groups(model)
    return torch.cat([torch.full((p.numel(),), WD if i == 0 else NO_WD, dtype=torch.float64)
                      for i, g in enumerate(ps) for p in g["params"]])


def _group_flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for g in _groups(model) for p in g["params"]])


# ------------------------------------------------------------------------------ classical == SGD
@pytest.mark.parametrize("kw", [dict(momentum=0.0), dict(momentum=0.9), dict(momentum=0.9, nesterov=True),
                                dict(momentum=0.9, foreach=True), dict(momentum=0.5, dampening=0.2, fused=True)])
@pytest.mark.parametrize("closure", [True, False], ids=["closure", "no-closure"])
def test_two_groups_train_as_sgd_bit_for_bit_with_a_scheduler_and_a_resume(kw, closure):
    """No decay on biases and norms, its own lr and momentum: 12 classical steps (SGD's way: backward
    outside, ``step()``; or a closure), a per-group LambdaLR; a state_dict taken at step 6 resumes
    into a fresh optimizer that continues bit for bit."""
    data = batches(12, dtype=torch.float32)
    m_q, m_s = _model(dtype=torch.float32), _model(dtype=torch.float32)
    q = QODE(_groups(m_q, lr2=0.03, momentum2=0.5), lr=0.1, weight_decay=WD, mode="classical", sparsity=0.0,
             cycle=4, classical_steps=1, **kw)
    s = torch.optim.SGD(_groups(m_s, lr2=0.03, momentum2=0.5), lr=0.1, weight_decay=WD, **kw)
    lam = [lambda e: 0.9 ** e, lambda e: 1.0 / (1 + e)]
    sq, ss = lr_scheduler.LambdaLR(q, lam), lr_scheduler.LambdaLR(s, lam)
    resumed = None
    for k, (X, Y) in enumerate(data):
        for opt, m in ((q, m_q), (s, m_s)) + (((resumed[0], resumed[1]),) if resumed else ()):
            if closure:
                opt.step(closure_for(m, opt, X, Y))
            else:
                opt.zero_grad()
                ((m(X) - Y) ** 2).mean().backward()
                opt.step()
        sq.step()
        ss.step()
        if resumed:
            resumed[2].step()
            assert torch.equal(flat(resumed[1]), flat(m_q))
        assert torch.equal(flat(m_q), flat(m_s)), k
        assert [g["lr"] for g in q.param_groups] == [g["lr"] for g in s.param_groups]
        if k == 5:
            m_r = copy.deepcopy(m_q)
            r = QODE(_groups(m_r, lr2=0.03, momentum2=0.5), lr=0.1, weight_decay=WD, mode="classical",
                     sparsity=0.0, cycle=4, classical_steps=1, **kw)
            sr = lr_scheduler.LambdaLR(r, lam)
            r.load_state_dict(copy.deepcopy(q.state_dict()))
            sr.load_state_dict(sq.state_dict())
            resumed = (r, m_r, sr)
    assert [len(g["params"]) for g in q.param_groups] == [2, 4]


# ------------------------------------------------------------------------------ window
def _reference_order1(model, data, lr: float, cs: int, wd: torch.Tensor) -> torch.Tensor:
    """Gradient descent on the first-order Taylor model of ``L + Σ (wd_i/2) θ_i²`` at θ0 (the window's
    ODE at N = 1, stream noise), computed explicitly: u(t+1) = u − η(∇L_t(θ0) + wd⊙θ0 + (H_0 + diag wd) u)."""
    theta0 = flat(model).clone()
    X0, Y0 = data[cs]
    H = torch.autograd.functional.hessian(flat_loss(model, X0, Y0), theta0)
    F1 = -lr * (H + torch.diag(wd))
    u = torch.zeros_like(theta0)
    for X, Y in data[cs:]:
        g = torch.autograd.functional.jacobian(flat_loss(model, X, Y), theta0)
        u = u + (-lr * (g + wd * theta0)) + F1 @ u
    return theta0 + u


@pytest.mark.parametrize("explicit", [True, False], ids=["explicit", "matrix-free"])
def test_a_window_applies_each_groups_weight_decay_to_its_own_coordinates(explicit):
    """Order 1, stream noise: the window's result equals the explicit per-coordinate reference (and
    differs from the one-decay-for-all reference, so the test sees the groups)."""
    lr, cycle, cs = 0.1, 6, 1
    data = batches(cycle)
    model = _model()
    ref_model = copy.deepcopy(model)
    opt = QODE(_groups(model), lr=lr, weight_decay=WD, mode="quantum", cycle=cycle, classical_steps=cs,
               sparsity=0.0, carleman_order=1, shots=None, explicit=explicit)
    opt.step(closure_for(model, opt, *data[0]))          # a classical step: both groups as SGD
    sgd = torch.optim.SGD(_groups(ref_model), lr=lr, weight_decay=WD)
    sgd.step(closure_for(ref_model, sgd, *data[0]))
    assert torch.equal(flat(model), flat(ref_model))
    wd = torch.cat([torch.full((p.numel(),), WD if p.dim() > 1 else NO_WD, dtype=torch.float64)
                    for p in ref_model.parameters()])     # in the model's order (flat(model))
    expected = _reference_order1(ref_model, data, lr, cs, wd)
    uniform = _reference_order1(ref_model, data, lr, cs, torch.full_like(wd, WD))
    for X, Y in data[cs:]:
        opt.step(closure_for(model, opt, X, Y))
    rep = opt.reports[0]
    assert rep.mode == "quantum" and rep.carleman["explicit"] == explicit
    got = _group_flat(model)                             # the optimizer's order (its groups)
    torch.testing.assert_close(got, _in_group_order(ref_model, expected), atol=1e-10, rtol=0)
    assert (got - _in_group_order(ref_model, uniform)).abs().max() > 1e-4


def _in_group_order(model, vec: torch.Tensor) -> torch.Tensor:
    """``vec`` (in the model's parameter order) re-ordered as the groups of :func:`_groups` list them."""
    params = list(model.parameters())
    parts = dict(zip(map(id, params), vec.split([p.numel() for p in params])))
    return torch.cat([parts[id(p)] for g in _groups(model) for p in g["params"]])


def test_a_window_with_per_group_weight_decay_resumes_bit_for_bit_mid_window():
    lr, cycle, cs = 0.1, 6, 1
    data = batches(2 * cycle, seed=4)
    kw = dict(lr=lr, weight_decay=WD, mode="quantum", cycle=cycle, classical_steps=cs, sparsity=0.0,
              carleman_order=1, shots=None, track_sgd=True, momentum=0.9)
    model = _model()
    opt = QODE(_groups(model, momentum2=0.0), **kw)
    for X, Y in data[:3]:
        opt.step(closure_for(model, opt, X, Y))
    assert opt.in_quantum_window and isinstance(opt._win.wd, torch.Tensor)
    twin = copy.deepcopy(model)
    opt_t = QODE(_groups(twin, momentum2=0.0), **kw)
    opt_t.load_state_dict(copy.deepcopy(opt.state_dict()))
    for X, Y in data[3:]:
        for o, m in ((opt, model), (opt_t, twin)):
            o.step(closure_for(m, o, X, Y))
        assert torch.equal(flat(model), flat(twin))
    assert [r.mode for r in opt.reports] == ["quantum", "quantum"]
    assert opt.reports[0].drift                          # the shadows ran over both groups


# ------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("mode", ["auto", "quantum"])
def test_groups_whose_lr_differ_are_refused_outside_classical_mode_naming_lr(mode):
    model = _model()
    with pytest.raises(ValueError, match=r"lr differ \(0\.1, 0\.03\).*mode='classical'"):
        QODE(_groups(model, lr2=0.03), lr=0.1, mode=mode, sparsity=0.0)
    QODE(_groups(model, momentum2=0.9), lr=0.1, momentum=0.0, mode=mode, sparsity=0.0)   # momentum may differ


def test_a_scheduler_that_parts_the_groups_lr_trains_that_window_classically_naming_lr():
    model, data = _model(), batches(6)
    opt = QODE(_groups(model), lr=0.1, weight_decay=WD, mode="quantum", cycle=3, classical_steps=1, sparsity=0.0,
               shots=None)
    sched = lr_scheduler.LambdaLR(opt, [lambda e: 1.0, lambda e: 1.0 if e < 3 else 0.5])
    for X, Y in data:
        opt.step(closure_for(model, opt, X, Y))
        sched.step()
    assert opt.reports[0].mode == "quantum"              # the upload at step 1: both at 0.1
    assert opt.reports[1].mode == "classical" and "lr differ" in opt.reports[1].reason


def test_add_param_group_after_construction_is_refused_with_the_fix():
    model = _model()
    params = list(model.parameters())
    opt = QODE(params[:2], lr=0.1, sparsity=0.0)
    with pytest.raises(ValueError, match=r"add_param_group after construction.*pass every group to QODE"):
        opt.add_param_group({"params": params[2:], "weight_decay": 0.0})
    assert len(opt.param_groups) == 1
