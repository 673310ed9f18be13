"""QODE: the contract of the training cycle, against independent references."""
import io
import math
import warnings
import weakref

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from torch_qode import PolynomialODE
from torch_qode.core.carleman import carleman
from torch_qode.training.qode import QODE


def tiny_mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)


def micro_mlp(seed=0, dtype=torch.float64):
    """13 parameters: small enough for the explicit third derivative of N ≥ 2 windows."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).to(dtype)


def batches(n_steps, seed=1, dtype=torch.float64, size=16, dims=(3, 2)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, dims[0], generator=g, dtype=dtype), torch.randn(size, dims[1], generator=g, dtype=dtype))
            for _ in range(n_steps)]


def closure_for(model, opt, X, Y):
    def closure():
        opt.zero_grad()
        loss = ((model(X) - Y) ** 2).mean()
        loss.backward()
        return loss
    return closure


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def flat_loss(model, X, Y):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def f(theta):
        parts = dict(zip(names, (c.view(s) for c, s in zip(theta.split(sizes), shapes))))
        return ((functional_call(model, parts, (X,)) - Y) ** 2).mean()
    return f


def run(model, opt, data):
    for X, Y in data:
        opt.step(closure_for(model, opt, X, Y))


# ----------------------------------------------------------------------------- classical == SGD
@pytest.mark.parametrize("momentum,wd,nesterov,dampening", [(0.0, 0.0, False, 0.0), (0.9, 1e-3, False, 0.1),
                                                            (0.9, 5e-4, True, 0.0)])
def test_classical_mode_is_bit_identical_to_sgd(momentum, wd, nesterov, dampening):
    data = batches(60, dtype=torch.float32)
    m1, m2 = tiny_mlp(dtype=torch.float32), tiny_mlp(dtype=torch.float32)
    sgd = torch.optim.SGD(m1.parameters(), lr=0.05, momentum=momentum, weight_decay=wd, nesterov=nesterov,
                          dampening=dampening)
    q = QODE(m2.parameters(), lr=0.05, momentum=momentum, weight_decay=wd, nesterov=nesterov, dampening=dampening,
             mode="classical", sparsity=0.0, cycle=7, classical_steps=2)
    for X, Y in data:
        sgd.step(closure_for(m1, sgd, X, Y))
        q.step(closure_for(m2, q, X, Y))
        for a, b in zip(m1.parameters(), m2.parameters()):
            assert torch.equal(a, b)
    assert len(q.reports) == math.ceil(60 / 7) and all(r.mode == "classical" for r in q.reports)


def test_lr_scheduler_and_step_hooks_keep_working():
    data = batches(30, dtype=torch.float32)
    m1, m2 = tiny_mlp(dtype=torch.float32), tiny_mlp(dtype=torch.float32)
    sgd = torch.optim.SGD(m1.parameters(), lr=0.1, momentum=0.5)
    q = QODE(m2.parameters(), lr=0.1, momentum=0.5, mode="classical", sparsity=0.0, cycle=10, classical_steps=1)
    s1 = torch.optim.lr_scheduler.StepLR(sgd, step_size=4, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(q, step_size=4, gamma=0.5)
    calls = []
    q.register_step_post_hook(lambda opt, args, kwargs: calls.append(opt.step_count))
    for X, Y in data:
        sgd.step(closure_for(m1, sgd, X, Y))
        q.step(closure_for(m2, q, X, Y))
        s1.step()
        s2.step()
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert calls == list(range(1, 31))
    assert q.param_groups[0]["lr"] == sgd.param_groups[0]["lr"] < 0.1


# ---------------------------------------------------------------------- the quantum window, exact
def independent_taylor_ode(model, X, Y, lr, theta0, f0=None):
    """F0..F2 of the gradient-descent map from torch.autograd.functional (the test's own reference)."""
    f = flat_loss(model, X, Y)
    n = theta0.numel()
    g = torch.autograd.functional.jacobian(f, theta0)
    H = torch.autograd.functional.hessian(f, theta0)
    T3 = torch.autograd.functional.jacobian(lambda th: torch.autograd.functional.hessian(f, th, create_graph=True),
                                            theta0)
    F0 = -lr * g if f0 is None else f0
    return PolynomialODE([F0, -lr * H, -(lr / 2) * T3.reshape(n, n * n)])


@pytest.mark.parametrize("order", [2, 3])
def test_frozen_window_equals_carleman_of_independent_taylor_model(order):
    model = micro_mlp()
    lr, cycle, cs = 0.2, 7, 2
    data = batches(cycle, dims=(2, 1))
    opt = QODE(model.parameters(), lr=lr, mode="quantum", cycle=cycle, classical_steps=cs, sparsity=0.0,
               carleman_order=order, taylor_degree=2, noise="frozen", shots=None)
    for k, (X, Y) in enumerate(data):
        if k == cs:
            theta0 = flat(model).clone()
            ode = independent_taylor_ode(model, X, Y, lr, theta0)
        opt.step(closure_for(model, opt, X, Y))
        if cs <= k < cycle - 1:
            assert torch.equal(flat(model), theta0)          # the model holds θ0 during the window
    T = cycle - cs
    u_T = carleman(ode, order, "discrete").simulate(torch.zeros(theta0.numel(), dtype=torch.float64), T)[-1]
    torch.testing.assert_close(flat(model), theta0 + u_T, atol=1e-8, rtol=0)
    rep = opt.reports[0]
    assert rep.mode == "quantum" and rep.carleman["order"] == order and rep.carleman["explicit"]
    assert rep.tomography["relative_error"] == 0.0 and rep.tomography["shots"]["total"] == 0


def test_stream_noise_uses_each_batch_gradient_at_theta0():
    model = micro_mlp(3)
    lr, cycle, cs = 0.1, 6, 1
    data = batches(cycle, seed=5, dims=(2, 1))
    opt = QODE(model.parameters(), lr=lr, mode="quantum", cycle=cycle, classical_steps=cs, sparsity=0.0,
               carleman_order=2, noise="stream", shots=None)
    f0s = []
    for k, (X, Y) in enumerate(data):
        if k == cs:
            theta0 = flat(model).clone()
            ode_up = independent_taylor_ode(model, X, Y, lr, theta0)
        if k >= cs:
            f0s.append(-lr * torch.autograd.functional.jacobian(flat_loss(model, X, Y), theta0))
        opt.step(closure_for(model, opt, X, Y))
    ode = PolynomialODE([lambda t: f0s[t], ode_up.term(1).dense(), ode_up.term(2).dense()])
    u_T = carleman(ode, 2).simulate(torch.zeros(theta0.numel(), dtype=torch.float64), cycle - cs)[-1]
    torch.testing.assert_close(flat(model), theta0 + u_T, atol=1e-9, rtol=0)


def test_quadratic_loss_window_reproduces_sgd_exactly():
    """A linear model with MSE on one fixed batch: the Taylor model is exact, so N = 1 is SGD."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    X, Y = torch.randn(32, 5, dtype=torch.float64), torch.randn(32, 3, dtype=torch.float64)
    opt = QODE(model.parameters(), lr=0.1, mode="quantum", cycle=20, classical_steps=3, sparsity=0.0,
               carleman_order=1, track_sgd=True, weight_decay=1e-2)
    run(model, opt, [(X, Y)] * 20)
    d = opt.reports[0].drift
    assert d["l2"] < 1e-12 and d["sgd_displacement"] > 1e-2
    assert d["linearization"] < 1e-12 and d["readout"] == 0.0
    assert d["loss_qode"] == pytest.approx(d["loss_sgd"], abs=1e-12)


@pytest.mark.parametrize("track_sgd", [False, True])
def test_matrix_free_window_equals_explicit(track_sgd):
    """Also with track_sgd: evaluating the SGD shadow must not invalidate the upload graph."""
    outs = []
    for explicit in (True, False):
        model = micro_mlp(7)
        opt = QODE(model.parameters(), lr=0.1, mode="quantum", cycle=6, classical_steps=1, sparsity=0.0,
                   carleman_order=2, explicit=explicit, track_sgd=track_sgd)
        run(model, opt, batches(6, seed=9, dims=(2, 1)))
        assert opt.reports[0].carleman["explicit"] is explicit
        outs.append((flat(model), opt.reports[0].drift))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-10, rtol=0)
    if track_sgd:
        assert outs[0][1]["l2"] == pytest.approx(outs[1][1]["l2"], rel=1e-8)
        assert outs[0][1]["loss_sgd"] == pytest.approx(outs[1][1]["loss_sgd"], rel=1e-12)


@pytest.mark.parametrize("solver,kw", [("direct", {}), ("filtered", {"solver_options": {"kappa_a": 1e12}})])
def test_direct_and_filtered_solvers_match_forward(solver, kw):
    outs = {}
    for s, k in (("forward", {}), (solver, kw)):
        model = tiny_mlp(2)
        opt = QODE(model.parameters(), lr=0.1, mode="quantum", cycle=5, classical_steps=1, sparsity=0.0,
                   carleman_order=1, solver=s, **k)
        run(model, opt, batches(5, seed=4))
        outs[s] = (flat(model), opt.reports[0].solver)
    torch.testing.assert_close(outs[solver][0], outs["forward"][0], atol=1e-9, rtol=0)
    info = outs[solver][1]
    assert info["method"] == solver and info["fidelity"] == pytest.approx(1.0)
    assert info["kappa"] is not None and info["max_abs_diff_vs_forward"] < 1e-9


def test_filtered_solver_with_small_kappa_reports_fidelity():
    model = tiny_mlp(2)
    opt = QODE(model.parameters(), lr=0.5, mode="quantum", cycle=8, classical_steps=1, sparsity=0.0,
               carleman_order=1, solver="filtered", solver_options={"kappa_a": 2.0})
    run(model, opt, batches(8, seed=4))
    info = opt.reports[0].solver
    assert info["dropped"] > 0 and 0 < info["fidelity"] < 1


# ---------------------------------------------------------------------------- sparsity & readout
def test_sparse_upload_leaves_pruned_weights_at_zero():
    model = tiny_mlp(1)
    opt = QODE(model.parameters(), lr=0.05, mode="quantum", cycle=6, classical_steps=2, sparsity=0.5,
               upload="sparse")
    data = batches(6, seed=2)
    for k, (X, Y) in enumerate(data):
        opt.step(closure_for(model, opt, X, Y))
        if k == 2:
            outside = [~m for m in opt.pruner.masks]
            n_out = sum(int(m.sum()) for m in outside)
            assert n_out == opt.pruner.n_pruned_target() > 0
        if k >= 2:
            assert all(bool((p[m] == 0).all()) for p, m in zip(model.parameters(), outside))
    assert opt.reports[0].support_size == sum(p.numel() for p in model.parameters()) - n_out


@pytest.mark.parametrize("readout", ["weights", "displacement"])
def test_top_r_readout_gives_exact_sparsity_on_the_prunable_weights_only(readout):
    """The readout's prune applies to the weights with either readout; the ledger's r is the support of the
    vector read: the r kept weights of θ0 + u(T), or every non-zero of u(T) (all of S here)."""
    model = tiny_mlp(4)
    with torch.no_grad():
        model[0].bias.mul_(1e-3)              # tiny biases: a readout over all of S would prune them
    opt = QODE(model.parameters(), lr=0.05, mode="quantum", cycle=5, classical_steps=2, sparsity=0.5,
               upload="dense", shots=None, readout=readout)
    run(model, opt, batches(5, seed=3))
    keep = opt.pruner.n_prunable - opt.pruner.n_pruned_target()
    weights = [p for p, f in zip(model.parameters(), opt.pruner.prunable) if f]
    others = [p for p, f in zip(model.parameters(), opt.pruner.prunable) if not f]
    assert sum(int((p != 0).sum()) for p in weights) == keep
    assert all(bool((p != 0).all()) for p in others)          # biases are read, never pruned
    assert opt.reports[0].support_size == flat(model).numel()
    assert opt.reports[0].tomography["readout_pruned"] == opt.pruner.n_pruned_target()
    assert opt.reports[0].resources["r"] == (keep + sum(p.numel() for p in others) if readout == "weights"
                                             else flat(model).numel())
    assert opt.reports[0].resources["readout"] == opt.reports[0].tomography["readout"] == readout


def test_shots_make_the_readout_noisy_but_bounded():
    model = tiny_mlp(4)
    opt = QODE(model.parameters(), lr=0.05, mode="quantum", cycle=5, classical_steps=1, sparsity=0.0,
               shots=20_000, seed=3, track_sgd=True, readout="weights")
    run(model, opt, batches(5, seed=3))
    tomo, d = opt.reports[0].tomography, opt.reports[0].drift
    assert tomo["shots"]["total"] == 20_000 and 0 < tomo["relative_error"] < 0.5
    # the readout part of the drift is exactly the tomography error of the weight vector
    # (readout = rel_err · ||θ_lin||, and ||θ_lin|| is within ``readout`` of ||θ̂|| by the triangle inequality)
    theta_lin_norm = d["readout"] / tomo["relative_error"]
    assert abs(theta_lin_norm - float(flat(model).norm())) <= d["readout"] * (1 + 1e-9)
    assert d["readout"] > 3 * d["linearization"]          # 20k shots dominate the N = 1 error here
    assert d["l2"] <= d["readout"] + d["linearization"] + 1e-12
    assert opt.reports[0].resources["qubits"] > 0
    # reading u(T) instead (the default): the same tomography error, now relative to ‖u(T)‖ (θ0 added exactly)
    weights_readout = d["readout"]
    model = tiny_mlp(4)
    opt = QODE(model.parameters(), lr=0.05, mode="quantum", cycle=5, classical_steps=1, sparsity=0.0,
               shots=20_000, seed=3, track_sgd=True)
    run(model, opt, batches(5, seed=3))
    tomo, d = opt.reports[0].tomography, opt.reports[0].drift
    assert tomo["readout"] == "displacement" and 0 < tomo["relative_error"] < 0.5
    assert d["readout"] == pytest.approx(tomo["relative_error"] * tomo["read_norm"], rel=1e-8)
    assert d["readout"] < weights_readout / 3


# ------------------------------------------------------------------------------------- faults
def test_nan_mid_window_restores_theta0_and_trains_classically():
    model = tiny_mlp(5)
    opt = QODE(model.parameters(), lr=0.05, mode="quantum", cycle=8, classical_steps=1, sparsity=0.0)
    data = batches(8, seed=6)
    for k, (X, Y) in enumerate(data):
        if k == 1:
            theta0 = flat(model).clone()
        if k == 4:
            X = X.clone()
            X[0, 0] = float("nan")
        opt.step(closure_for(model, opt, X, Y))
        assert bool(torch.isfinite(flat(model)).all())
        if k == 4:
            assert torch.equal(flat(model), theta0) and not opt.in_quantum_window
    rep = opt.reports[0]
    assert rep.mode == "classical" and "aborted at t=3" in rep.reason and rep.faults
    assert not torch.equal(flat(model), theta0)        # the rest of the window trained classically


def test_nonfinite_classical_step_is_skipped():
    model = tiny_mlp(5)
    opt = QODE(model.parameters(), lr=0.05, mode="classical", sparsity=0.0)
    before = flat(model).clone()
    X, Y = batches(1)[0]
    opt.step(closure_for(model, opt, X * float("inf"), Y))
    assert torch.equal(flat(model), before) and opt.reports[0].skipped_steps == 1


class _Verdict:
    def __init__(self, passed):
        self.passed, self.reason = passed, "stub says " + ("yes" if passed else "no")

    def as_dict(self):
        return {"passed": self.passed, "reason": self.reason}


@pytest.mark.parametrize("passed", [True, False])
def test_auto_mode_follows_the_dissipation_verdict(passed):
    seen = []

    def check(hvp, n, *, lr, T, dtype, device):
        v = torch.ones(n, dtype=torch.float64)
        seen.append((n, T, float(hvp(v).norm())))
        return _Verdict(passed)

    model, ref = tiny_mlp(6), tiny_mlp(6)
    opt = QODE(model.parameters(), lr=0.05, mode="auto", cycle=5, classical_steps=2, sparsity=0.0, dissipation=check)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.05)
    for X, Y in batches(5, seed=8):
        opt.step(closure_for(model, opt, X, Y))
        sgd.step(closure_for(ref, sgd, X, Y))
    rep = opt.reports[0]
    assert seen and seen[0][0] == 26 and seen[0][1] == 3 and seen[0][2] > 0
    assert rep.mode == ("quantum" if passed else "classical") and "stub says" in rep.reason
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters())) is (not passed)


def test_invalid_arguments_name_the_argument():
    ps = list(tiny_mlp().parameters())
    bad = [dict(lr=-1), dict(momentum=-0.1), dict(weight_decay=float("nan")), dict(sparsity=1.0),
           dict(sparsity=-0.1), dict(carleman_order=0), dict(classical_steps=10, cycle=10), dict(cycle=0),
           dict(mode="hybrid"), dict(form="euler"), dict(solver="hhl"), dict(noise="white"), dict(upload="qram"),
           dict(solver="filtered"), dict(solver_options={"kappa_a": 5.0}), dict(shots=0), dict(taylor_degree=0),
           dict(eps=2.0),
           dict(explicit="yes"), dict(nesterov=True)]
    names = ["lr", "momentum", "weight_decay", "sparsity", "sparsity", "carleman_order", "classical_steps", "cycle",
             "mode", "form", "solver", "noise", "upload", "kappa_a", "kappa_a", "shots", "taylor_degree", "eps",
             "explicit", "nesterov"]
    for kwargs, name in zip(bad, names):
        with pytest.raises(ValueError, match=name):
            QODE(ps, **kwargs)
    with pytest.raises(ValueError, match="carleman_order=3"):    # Δ ≈ 26³ fine, but not a 10⁴-weight support
        QODE(nn.Linear(100, 100).parameters(), carleman_order=3, sparsity=0.0)
    with pytest.raises(TypeError, match="track_sgd"):
        QODE(ps, track_sgd="yes")
    with pytest.raises(ValueError, match="lr differ"):
        QODE([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.5}])
    opt = QODE(ps, classical_steps=0)                # step 0 is the upload: it needs a closure
    with pytest.raises(TypeError, match="closure"):
        opt.step()
    with pytest.raises(TypeError, match="closure"):
        opt.step(None)
    with pytest.raises(TypeError, match="closure must be callable"):
        opt.step(3)


# ------------------------------------------------------------------------------- state dict
def interrupted(make, seed, kwargs, steps):
    """Train on ``steps``, checkpoint model + optimizer through torch.save / torch.load(weights_only=True),
    and restore both into freshly built objects (the model initialised differently on purpose)."""
    m1 = make(seed)
    o1 = QODE(m1.parameters(), **kwargs)
    run(m1, o1, steps)
    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": o1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    m2 = make(seed + 91)
    m2.load_state_dict(ckpt["model"])
    o2 = QODE(m2.parameters(), **kwargs)
    o2.load_state_dict(ckpt["opt"])
    return m2, o2


def _untimed(d):
    """A report without its wall-clock fields (everything else must match exactly)."""
    if isinstance(d, dict):
        return {k: _untimed(v) for k, v in d.items() if k != "seconds"}
    if isinstance(d, list):
        return [_untimed(v) for v in d]
    return d


@pytest.mark.parametrize("stop,order", [(3, 1), (5, 1), (9, 1), (4, 2)])
def test_resume_mid_window_is_bit_identical(stop, order):
    """Stops: inside the first window, at its last step, inside the second cycle's classical steps."""
    make = tiny_mlp if order == 1 else micro_mlp
    data = batches(14, seed=11, dims=(3, 2) if order == 1 else (2, 1))
    kwargs = dict(lr=0.05, momentum=0.9, mode="auto" if order == 1 else "quantum", cycle=7, classical_steps=2,
                  sparsity=0.3, carleman_order=order, shots=5000, seed=4, track_sgd=True)
    m_ref = make(8)
    o_ref = QODE(m_ref.parameters(), **kwargs)
    run(m_ref, o_ref, data)
    assert [r.mode for r in o_ref.reports] == ["quantum", "quantum"]

    m2, o2 = interrupted(make, 8, kwargs, data[:stop])
    run(m2, o2, data[stop:])
    for a, b in zip(m_ref.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert [_untimed(r.as_dict()) for r in o_ref.reports] == [_untimed(r.as_dict()) for r in o2.reports]


def test_window_releases_its_graph():
    model = tiny_mlp(1)
    opt = QODE(model.parameters(), lr=0.05, mode="quantum", cycle=4, classical_steps=1, sparsity=0.0)
    data = batches(4)
    run(model, opt, data[:2])
    ref = weakref.ref(opt._expansion)
    assert ref() is not None
    run(model, opt, data[2:])
    import gc
    gc.collect()
    assert ref() is None and opt._system is None and not opt.in_quantum_window


def test_resume_of_a_matrix_free_window_re_expands_and_says_so():
    data = batches(8, seed=12)
    kwargs = dict(lr=0.05, mode="quantum", cycle=8, classical_steps=1, sparsity=0.0, explicit=False)
    m1 = tiny_mlp(3)
    o1 = QODE(m1.parameters(), **kwargs)
    run(m1, o1, data[:4])
    sd = o1.state_dict()
    assert sd["qode"]["window"]["terms"] is None          # matrix-free: no explicit Taylor terms to save
    m2 = tiny_mlp(3)
    m2.load_state_dict(m1.state_dict())
    o2 = QODE(m2.parameters(), **kwargs)
    o2.load_state_dict(sd)
    assert o2.in_quantum_window
    run(m2, o2, data[4:])
    rep = o2.reports[0]
    assert rep.mode == "quantum" and any("re-expanded" in f for f in rep.faults)
    assert bool(torch.isfinite(flat(m2)).all()) and not o2.in_quantum_window and o2._expansion is None


def test_matrix_free_resume_is_exact_given_the_upload_batch():
    data = batches(8, seed=12)
    kwargs = dict(lr=0.05, momentum=0.9, mode="quantum", cycle=8, classical_steps=1, sparsity=0.2,
                  explicit=False, shots=3000, track_sgd=True, carleman_order=1)
    m_ref = tiny_mlp(3)
    o_ref = QODE(m_ref.parameters(), **kwargs)
    run(m_ref, o_ref, data)
    m2, o2 = interrupted(tiny_mlp, 3, kwargs, data[:5])
    with pytest.raises(TypeError, match="closure"):
        o2.restore_expansion(None)
    o2.restore_expansion(closure_for(m2, o2, *data[1]))      # step 1 was the upload
    with pytest.raises(RuntimeError, match="no resumed matrix-free window"):
        o2.restore_expansion(closure_for(m2, o2, *data[1]))
    run(m2, o2, data[5:])
    assert all(torch.equal(a, b) for a, b in zip(m_ref.parameters(), m2.parameters()))
    assert not any("re-expanded" in f for f in o2.reports[0].faults)
    assert [_untimed(r.as_dict()) for r in o_ref.reports] == [_untimed(r.as_dict()) for r in o2.reports]


def test_soak_many_cycles_memory_stays_flat():
    """No autograd graph, Lanczos basis or Carleman state outlives its window."""
    import gc

    model = tiny_mlp(2)
    opt = QODE(model.parameters(), lr=0.05, momentum=0.5, mode="auto", cycle=4, classical_steps=1, sparsity=0.3,
               explicit=False, track_sgd=True, shots=2000)
    data = batches(4, seed=3)
    expansions = []

    def live_tensors():
        gc.collect()
        with warnings.catch_warnings():       # isinstance() on some torch module objects warns
            warnings.simplefilter("ignore")
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    def cycles(n):
        for _ in range(n):
            for k, (X, Y) in enumerate(data):
                opt.step(closure_for(model, opt, X, Y))
                if opt._expansion is not None:
                    expansions.append(weakref.ref(opt._expansion))

    cycles(10)
    before = live_tensors()
    cycles(40)
    after = live_tensors()
    assert len(opt.reports) == 50 and sum(r.mode == "quantum" for r in opt.reports) > 0
    assert after == before, (before, after)
    gc.collect()
    assert all(ref() is None for ref in expansions)


def test_a_window_that_cannot_be_built_trains_classically_with_the_reason():
    model, ref = micro_mlp(1), micro_mlp(1)
    opt = QODE(model.parameters(), lr=0.05, mode="quantum", cycle=4, classical_steps=1, sparsity=0.0,
               carleman_order=3, taylor_degree=3, explicit=False)      # matrix-free terms stop at degree 2
    sgd = torch.optim.SGD(ref.parameters(), lr=0.05)
    for X, Y in batches(4, seed=2, dims=(2, 1)):
        opt.step(closure_for(model, opt, X, Y))
        sgd.step(closure_for(ref, sgd, X, Y))
    rep = opt.reports[0]
    assert rep.mode == "classical" and rep.reason.startswith("Carleman system not built") and "degree" in rep.reason
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    assert opt._expansion is None and not opt.in_quantum_window


def bn_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2)).double()


def test_track_sgd_measures_without_changing_the_trained_model():
    data = batches(10, seed=4)
    out = []
    for track in (False, True):
        model = bn_net(1)
        opt = QODE(model.parameters(), lr=0.05, mode="quantum", cycle=5, classical_steps=1, sparsity=0.0,
                   track_sgd=track, model=model)
        run(model, opt, data)
        out.append((flat(model), [b.clone() for b in model.buffers()]))
        assert (opt.reports[0].drift is not None) is track
    assert torch.equal(out[0][0], out[1][0])
    assert all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1]))


@pytest.mark.parametrize("case", ["momentum", "sparse"])
def test_linearisation_drift_isolates_the_carleman_error(case):
    """Quadratic loss, one batch: the Carleman N = 1 solution is the window's exact dynamics, so the
    linearisation drift vanishes even when momentum SGD (or dense SGD) lands elsewhere."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3).double()
    X, Y = torch.randn(32, 6, dtype=torch.float64), torch.randn(32, 3, dtype=torch.float64)
    kw = dict(momentum=0.9, sparsity=0.0) if case == "momentum" else dict(sparsity=0.5, upload="sparse")
    opt = QODE(model.parameters(), lr=0.1, mode="quantum", cycle=12, classical_steps=2, carleman_order=1,
               track_sgd=True, **kw)
    run(model, opt, [(X, Y)] * 12)
    d = opt.reports[0].drift
    assert d["linearization"] < 1e-12 and d["gd_displacement"] > 1e-2
    assert d["relative"] > 0.05                      # SGD itself (momentum / all weights) went elsewhere


def test_lr_zero_at_upload_trains_classically():
    model = tiny_mlp(1)
    opt = QODE(model.parameters(), lr=0.05, mode="quantum", cycle=4, classical_steps=1, sparsity=0.0)
    opt.param_groups[0]["lr"] = 0.0                  # e.g. a scheduler that reached 0
    run(model, opt, batches(4))
    assert opt.reports[0].mode == "classical" and "lr = 0" in opt.reports[0].reason


def test_bad_readout_settings_are_refused_at_construction():
    ps = list(tiny_mlp().parameters())
    with pytest.raises(ValueError, match="shots=2"):
        QODE(ps, shots=2)
    with pytest.raises(ValueError, match="sign_method"):
        QODE(ps, shots=1000, tomography_kwargs={"sign_method": "nope"})
    with pytest.raises(ValueError, match="split"):
        QODE(ps, shots=1000, tomography_kwargs={"split": {"bogus": 1}})
    with pytest.raises(ValueError, match="tomography_kwargs may not set"):
        QODE(ps, tomography_kwargs={"top_r": 3})
    with pytest.raises(ValueError, match="solver='direct'"):
        QODE(nn.Linear(100, 100).parameters(), solver="direct", sparsity=0.0)
    QODE(ps, momentum=np.float32(0.9))               # any real number type


def test_load_state_dict_refuses_other_settings():
    model = tiny_mlp(1)
    opt = QODE(model.parameters(), lr=0.05, mode="quantum", cycle=4, classical_steps=1, sparsity=0.0)
    run(model, opt, batches(2))
    other = QODE(model.parameters(), lr=0.05, mode="quantum", cycle=5, classical_steps=1, sparsity=0.0)
    with pytest.raises(ValueError, match="cycle=4 there vs 5 here"):
        other.load_state_dict(opt.state_dict())


def test_gradient_accumulation_closure_expands_the_summed_loss():
    """Two backward calls in the upload closure: F0 and F1 are those of the sum of the two losses."""
    model = micro_mlp(5)
    lr, cycle, cs = 0.1, 5, 1
    data = batches(cycle, seed=8, dims=(2, 1), size=32)
    opt = QODE(model.parameters(), lr=lr, mode="quantum", cycle=cycle, classical_steps=cs, sparsity=0.0,
               carleman_order=1, noise="frozen")

    def accumulating(X, Y):
        def closure():
            opt.zero_grad()
            total = 0.0
            for part in (slice(0, 16), slice(16, 32)):
                loss = ((model(X[part]) - Y[part]) ** 2).mean()
                loss.backward()
                total = total + loss.detach()
            return total
        return closure

    for k, (X, Y) in enumerate(data):
        if k == cs:
            theta0 = flat(model).clone()
            f1, f2 = flat_loss(model, X[:16], Y[:16]), flat_loss(model, X[16:], Y[16:])
            fsum = lambda th: f1(th) + f2(th)  # noqa: E731
            g = torch.autograd.functional.jacobian(fsum, theta0)
            H = torch.autograd.functional.hessian(fsum, theta0)
        opt.step(accumulating(X, Y))
    u = torch.zeros_like(theta0)
    for _ in range(cycle - cs):
        u = u - lr * g - lr * (H @ u)
    torch.testing.assert_close(flat(model), theta0 + u, atol=1e-10, rtol=0)


def test_momentum_helpers_over_the_optimizers_state():
    """classical.py's helpers: with momentum 0 nothing is stored per parameter (as SGD); a restart
    drops the buffers and the entries they leave empty, never another key."""
    from collections import defaultdict

    from torch_qode.training.classical import keep_buffers, momentum_buffers, reset_momentum

    a, b = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    a.grad, b.grad = torch.ones(2), None
    state = defaultdict(dict)
    keep_buffers([a, b], state, {"momentum": 0.0}, [torch.ones(2), None])
    assert len(state) == 0 and momentum_buffers([a, b], state) == [None, None]
    keep_buffers([a, b], state, {"momentum": 0.9}, [torch.ones(2), torch.ones(3)])
    assert list(state) == [a] and momentum_buffers([a, b], state)[1] is None   # b had no gradient
    state[b]["other"] = 1
    reset_momentum([a, b], state)
    assert a not in state and state[b] == {"other": 1}
