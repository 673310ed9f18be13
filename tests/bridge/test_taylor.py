"""torch_qode.bridge.taylor: F0..Fq of a real loss, explicit and matrix-free, against independent references.

References: torch.autograd.functional.hessian / jacobian-of-hessian of a functional_call loss written
here (tests/_models.py), and central finite differences of Hessians.  The BatchNorm references use
PyTorch's fused kernel (exact to second order), so they are independent of the decomposed norms the
expansion uses for third order.
"""
from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from tests._models import (assert_unchanged, cnn_batch, flat_params, mlp_batch, reference_loss, state_snapshot,
                           tiny_cnn, tiny_mlp)
from torch_qode.core.ode import MatrixFreeTerm, NonFiniteError, PolynomialODE
from torch_qode.bridge.taylor import (EXPLICIT_BUDGET_BYTES, TaylorExpansion, UnsupportedGraphError, decomposed_norms,
                               make_loss_fn)

CE = nn.functional.cross_entropy
LR = 0.3


# ------------------------------------------------------------------------------------ fixtures
def _case(kind):
    if kind == "mlp":
        return tiny_mlp(), mlp_batch()
    return tiny_cnn(), cnn_batch()


def _from_loss(model, batch, **kw):
    with decomposed_norms(model):
        loss = CE(model(batch[0]), batch[1])
    return TaylorExpansion.from_loss(loss, list(model.parameters()), **kw)


def _expansions(model, batch, **kw):
    """The three ways to build the same expansion."""
    theta0 = flat_params(model)
    lf = make_loss_fn(model, CE, batch)
    return {
        "from_loss": _from_loss(model, batch, **kw),
        "jvp": TaylorExpansion.from_function(lf, theta0, backend="jvp", **kw),
        "double_backward": TaylorExpansion.from_function(lf, theta0, backend="double_backward", **kw),
    }


_REF = {}


def _reference(kind):
    """(theta0, gradient, Hessian, third-derivative tensor) of the case, exact references, cached."""
    if kind in _REF:
        return _REF[kind]
    model, batch = _case(kind)
    f = reference_loss(model, batch)
    th = flat_params(model)
    hess = lambda t, **kw: torch.autograd.functional.hessian(f, t, vectorize=True, **kw)
    g = torch.autograd.functional.jacobian(f, th)
    H = hess(th)
    n = th.numel()
    if kind == "mlp":  # jacobian of the hessian (the fused kernels of an MLP are exact to all orders)
        T = torch.autograd.functional.jacobian(lambda t: hess(t, create_graph=True), th, vectorize=True)
    else:  # BatchNorm: PyTorch refuses 3rd order, use central differences of exact Hessians
        eps = 1e-4
        E = torch.eye(n, dtype=th.dtype)
        T = torch.stack([(hess(th + eps * E[i]) - hess(th - eps * E[i])) / (2 * eps) for i in range(n)])
    _REF[kind] = (th, g, H, T)
    return _REF[kind]


# ------------------------------------------------------------------------- explicit derivatives
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_gradient_and_hessian_match_autograd_functional(kind):
    model, batch = _case(kind)
    th, g, H, _ = _reference(kind)
    for name, exp in _expansions(model, batch, lr=LR).items():
        assert torch.allclose(exp.gradient(), g, atol=1e-12, rtol=1e-10), name
        assert torch.allclose(exp.derivative(1)[:, 0], g, atol=1e-12, rtol=1e-10), name
        assert torch.allclose(exp.derivative(2), H, atol=1e-11, rtol=1e-9), name
        assert torch.equal(exp.theta0, th)
        assert exp.n == th.numel()


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_third_derivative_matches_reference(kind):
    model, batch = _case(kind)
    th, _, _, T = _reference(kind)
    n = th.numel()
    tol = 1e-9 if kind == "mlp" else 1e-5  # finite differences: O(eps^2) truncation, |T| ~ 10
    for name, exp in _expansions(model, batch, lr=LR).items():
        D3 = exp.derivative(3)
        assert D3.shape == (n, n * n)
        assert torch.allclose(D3, T.reshape(n, n * n), atol=tol, rtol=1e-6), name


def test_third_derivative_finite_differences_of_hvps():
    """Independent of autograd.functional: FD of our own Hessian-vector products at shifted points."""
    model, batch = _case("cnn")
    exp = _expansions(model, batch, lr=LR)["jvp"]
    th = flat_params(model)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(th.numel(), generator=g, dtype=th.dtype), torch.randn(th.numel(), generator=g, dtype=th.dtype)
    f = reference_loss(model, batch)
    eps = 1e-5

    def hvp_at(t):
        return torch.autograd.functional.hvp(f, t, b)[1]

    fd = (hvp_at(th + eps * a) - hvp_at(th - eps * a)) / (2 * eps)
    assert torch.allclose(exp.third(a, b), fd, atol=1e-7, rtol=1e-6)


def test_fourth_derivative_degree3_on_a_support():
    model, batch = _case("mlp")
    f = reference_loss(model, batch)
    th = flat_params(model)
    S = torch.tensor([0, 5, 13, 20])
    m = S.numel()

    def fS(u):
        return f(th.index_put((S,), th[S] + u))

    u0 = torch.zeros(m, dtype=th.dtype)
    hess = lambda u: torch.autograd.functional.hessian(fS, u, create_graph=True)
    third = lambda u: torch.autograd.functional.jacobian(hess, u, create_graph=True)
    D4 = torch.autograd.functional.jacobian(third, u0)
    for name, exp in _expansions(model, batch, lr=LR, degree=3, support=S).items():
        assert torch.allclose(exp.derivative(4), D4.reshape(m, m ** 3), atol=1e-10, rtol=1e-8), name
        ode = exp.ode()
        assert ode.degree == 3 and ode.explicit
        assert torch.allclose(ode.term(3).dense(), -LR / 6 * D4.reshape(m, m ** 3), atol=1e-11)


# --------------------------------------------------------------------------------- the ODE
def test_ode_coefficients_are_gradient_descent():
    model, batch = _case("mlp")
    th, g, H, T = _reference("mlp")
    n = th.numel()
    exp = _expansions(model, batch, lr=LR)["from_loss"]
    ode = exp.ode(explicit=True)
    assert isinstance(ode, PolynomialODE) and ode.degree == 2 and ode.explicit
    assert torch.allclose(ode.F0(), -LR * g, atol=1e-13)
    assert torch.allclose(ode.term(1).dense(), -LR * H, atol=1e-12)
    assert torch.allclose(ode.term(2).dense(), -LR / 2 * T.reshape(n, n * n), atol=1e-11)


def test_taylor_remainder_is_third_order():
    """f(u) = -lr * grad L(theta0 + u) up to O(|u|^3) for degree 2: halving u divides the error by ~8."""
    model, batch = _case("cnn")
    f = reference_loss(model, batch)
    th = flat_params(model)
    exp = _expansions(model, batch, lr=LR)["jvp"]
    ode = exp.ode(explicit=True)
    direction = torch.randn(th.numel(), generator=torch.Generator().manual_seed(0), dtype=th.dtype)
    errs = []
    for s in (1e-2, 5e-3):
        u = s * direction
        true = -LR * torch.autograd.functional.jacobian(f, th + u)
        errs.append(float((ode.f(u) - true).norm()))
    assert 6.0 < errs[0] / errs[1] < 10.0


def test_matrix_free_matches_explicit_on_general_columns():
    model, batch = _case("cnn")
    for name, exp in _expansions(model, batch, lr=LR, support=torch.arange(3, 40, 2)).items():
        n = exp.n
        ex, mf = exp.ode(explicit=True), exp.ode(explicit=False)
        assert ex.explicit and not mf.explicit
        F1, F2 = mf.term(1), mf.term(2)
        assert isinstance(F1, MatrixFreeTerm) and isinstance(F2, MatrixFreeTerm)
        g = torch.Generator().manual_seed(5)
        Y1 = torch.randn(n, 3, generator=g, dtype=torch.float64)
        Y2 = torch.randn(n * n, 3, generator=g, dtype=torch.float64)  # general, non-symmetric, full-rank Z
        assert torch.linalg.matrix_rank(Y2[:, 0].reshape(n, n)) == n
        assert torch.allclose(F1.matmat(Y1), ex.term(1).matmat(Y1), atol=1e-12), name
        assert torch.allclose(F2.matmat(Y2), ex.term(2).matmat(Y2), atol=1e-11), name
        u = torch.randn(n, generator=g, dtype=torch.float64) * 0.1
        assert torch.allclose(F2.power(u), ex.term(2).dense() @ torch.kron(u, u), atol=1e-12), name
        W = torch.randn(n, 2, generator=g, dtype=torch.float64)
        assert torch.allclose(F2._rmatmat(W), ex.term(2).dense().T @ W, atol=1e-11), name
        assert torch.allclose(mf.f(u), ex.f(u), atol=1e-12), name
        assert math.isclose(F1.norm(iters=200), ex.term(1).norm(), rel_tol=1e-6)
        assert math.isclose(F2.norm(iters=100), ex.term(2).norm(), rel_tol=1e-4)


def test_third_sym_rank_deficient_and_zero():
    model, batch = _case("mlp")
    exp = _expansions(model, batch, lr=LR)["from_loss"]
    n = exp.n
    D3 = exp.derivative(3)
    g = torch.Generator().manual_seed(2)
    a = torch.randn(n, generator=g, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    Z = torch.outer(a, b)  # rank one, non-symmetric: sym(Z) has rank two
    assert torch.allclose(exp.third_sym(Z), D3 @ Z.reshape(-1), atol=1e-12)
    assert torch.equal(exp.third_sym(torch.zeros(n, n)), torch.zeros(n, dtype=torch.float64))
    A = torch.randn(n, 4, generator=g, dtype=torch.float64)
    B = torch.randn(n, 4, generator=g, dtype=torch.float64)
    T3 = D3.reshape(n, n, n)
    assert torch.allclose(exp.third(A, B), torch.einsum("iab,am,bm->im", T3, A, B), atol=1e-12)


def test_ode_explicit_auto_by_memory_budget():
    model, batch = _case("mlp")
    exp = _expansions(model, batch, lr=LR)["from_loss"]
    assert exp.ode().explicit  # n = 31: tiny
    assert not exp.ode(budget_bytes=0).explicit
    n = exp.n
    assert exp.ode(budget_bytes=8 * (n ** 2 + n ** 3)).explicit
    assert not exp.ode(budget_bytes=8 * (n ** 2 + n ** 3) - 1).explicit
    assert EXPLICIT_BUDGET_BYTES == 32 * 2 ** 20
    deg3 = _from_loss(*_case("mlp"), lr=LR, degree=3)
    with pytest.raises(ValueError, match="degree <= 2"):
        deg3.ode(explicit=False)
    with pytest.raises(ValueError, match="degree <= 2"):
        deg3.ode(budget_bytes=0)


def test_ode_F0_override_vector_and_callable():
    model, batch = _case("mlp")
    exp = _expansions(model, batch, lr=LR)["from_loss"]
    v = torch.ones(exp.n, dtype=torch.float64)
    assert torch.equal(exp.ode(F0=v).F0(), v)
    ode = exp.ode(F0=lambda t: (t + 1) * v)
    assert ode.time_dependent and torch.equal(ode.F0(2), 3 * v)


# ------------------------------------------------------------------------- support and dtypes
def test_support_restriction():
    model, batch = _case("cnn")
    th, g, H, T = _reference("cnn")
    S = torch.tensor([0, 1, 7, 18, 19, 30, 35, 44])
    for name, exp in _expansions(model, batch, lr=LR, support=S).items():
        assert exp.n == S.numel()
        assert torch.equal(exp.theta0, th[S])
        assert torch.allclose(exp.gradient(), g[S], atol=1e-12)
        assert torch.allclose(exp.derivative(2), H[S][:, S], atol=1e-11)
        assert torch.allclose(exp.derivative(3), T[S][:, S][:, :, S].reshape(S.numel(), -1), atol=1e-6), name
        V = torch.randn(S.numel(), 2, dtype=torch.float64)
        assert torch.allclose(exp.hvp(V), H[S][:, S] @ V, atol=1e-11)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_float32_matches_float64(kind):
    m64, b64 = _case(kind)
    m32 = (tiny_mlp if kind == "mlp" else tiny_cnn)(dtype=torch.float32)
    b32 = tuple(t.float() if t.is_floating_point() else t for t in b64)
    e64 = _from_loss(m64, b64, lr=LR)
    for e32 in (_from_loss(m32, b32, lr=LR),
                TaylorExpansion.from_model(m32, CE, b32, lr=LR, backend="jvp")):
        assert e32.dtype == torch.float32 and e32.gradient().dtype == torch.float32
        assert torch.allclose(e32.gradient().double(), e64.gradient(), atol=1e-5)
        assert torch.allclose(e32.derivative(2).double(), e64.derivative(2), atol=1e-4)
        assert torch.allclose(e32.derivative(3).double(), e64.derivative(3), atol=1e-3)
        ode = e32.ode(explicit=False)  # float64 ODE on float32 products
        u = torch.randn(e32.n, dtype=torch.float64) * 0.1
        assert ode.f(u).dtype == torch.float64
        assert torch.allclose(ode.f(u), e64.ode(explicit=False).f(u), atol=1e-5)


def test_chunking_does_not_change_results():
    model, batch = _case("mlp")
    V = torch.randn(31, 5, dtype=torch.float64)
    a = _from_loss(model, batch, lr=LR, chunk=1)
    b = _from_loss(model, batch, lr=LR, chunk=32)
    assert torch.allclose(a.hvp(V), b.hvp(V), atol=1e-14)
    assert torch.allclose(a.third(V, V), b.third(V, V), atol=1e-14)
    assert torch.allclose(a.derivative(3), b.derivative(3), atol=1e-14)


def test_weight_decay():
    model, batch = _case("mlp")
    th, g, H, T = _reference("mlp")
    n = th.numel()
    wd = 0.05
    for exp in _expansions(model, batch, lr=LR, weight_decay=wd).values():
        assert torch.allclose(exp.gradient(), g + wd * th, atol=1e-12)
        assert torch.allclose(exp.derivative(2), H + wd * torch.eye(n, dtype=th.dtype), atol=1e-11)
        assert torch.allclose(exp.derivative(3), T.reshape(n, -1), atol=1e-9)
        V = torch.randn(n, dtype=th.dtype)
        assert torch.allclose(exp.hvp(V), H @ V + wd * V, atol=1e-11)
        assert torch.allclose(exp.ode(explicit=False).term(1).matmat(V[:, None])[:, 0], -LR * (H @ V + wd * V),
                              atol=1e-12)
    per_tensor = [0.1, 0.0, 0.1, 0.0]  # weights decayed, biases not
    exp = _from_loss(model, batch, lr=LR, weight_decay=per_tensor)
    flat = torch.cat([torch.full((p.numel(),), w, dtype=th.dtype) for w, p in zip(per_tensor, model.parameters())])
    assert torch.allclose(exp.gradient(), g + flat * th, atol=1e-12)


# ---------------------------------------------------------------------- normalisation layers
def test_fused_batchnorm_graph_refused_for_third_order():
    model, batch = _case("cnn")
    loss = CE(model(batch[0]), batch[1])  # fused training-mode batch norm in the graph
    with pytest.raises(UnsupportedGraphError, match="decomposed_norms"):
        TaylorExpansion.from_loss(loss, list(model.parameters()), lr=LR)
    th, g, H, _ = _reference("cnn")
    exp = TaylorExpansion.from_loss(loss, list(model.parameters()), lr=LR, degree=1)  # HVPs are exact
    assert torch.allclose(exp.derivative(2), H, atol=1e-11)
    model.eval()  # eval-mode batch norm is affine: allowed
    TaylorExpansion.from_loss(CE(model(batch[0]), batch[1]), list(model.parameters()), lr=LR).release()


@pytest.mark.parametrize("make", [
    lambda: nn.BatchNorm2d(3), lambda: nn.BatchNorm2d(3).eval(), lambda: nn.LayerNorm([5]),
    lambda: nn.GroupNorm(1, 3), lambda: nn.InstanceNorm2d(3, affine=True), lambda: nn.RMSNorm([5]),
    lambda: nn.BatchNorm2d(3, momentum=None), lambda: nn.InstanceNorm2d(3, affine=True, track_running_stats=True),
    lambda: nn.InstanceNorm2d(3, track_running_stats=True, momentum=None),
    lambda: nn.InstanceNorm2d(3, track_running_stats=True).eval()])
def test_decomposed_norms_equal_fused_forward(make):
    torch.manual_seed(0)
    m = make().double()
    for p in m.parameters():
        p.data.normal_()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    bufs = [b.clone() for b in m.buffers()]
    with decomposed_norms(m, update_running_stats=True):
        y = m(x)
    upd = [b.clone() for b in m.buffers()]
    for b, v in zip(m.buffers(), bufs):
        b.copy_(v)
    ref = m(x)
    assert torch.allclose(y, ref, atol=1e-12)
    for a, b in zip(upd, m.buffers()):  # update_running_stats=True reproduces the fused layers' update
        assert torch.allclose(a.double(), b.double(), atol=1e-12)
    if m.training and getattr(m, "momentum", None) is not None and m.running_mean is not None:
        assert not torch.equal(upd[0], bufs[0])  # the update did happen
    for b, v in zip(m.buffers(), bufs):
        b.copy_(v)
    with decomposed_norms(m):
        m(x)
    assert all(torch.equal(a, b) for a, b in zip(m.buffers(), bufs))
    assert "forward" not in m.__dict__  # restored


def test_make_loss_fn_dropout_is_fixed_and_global_rng_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 3)).double()
    batch = mlp_batch()
    lf = make_loss_fn(model, CE, batch)
    th = flat_params(model)
    state = torch.get_rng_state()
    assert lf(th) == lf(th)
    assert torch.equal(state, torch.get_rng_state())
    exp = TaylorExpansion.from_function(lf, th, lr=LR, backend="jvp")
    H = torch.autograd.functional.hessian(lf, th)
    assert torch.allclose(exp.derivative(2), H, atol=1e-12)


# ---------------------------------------------------------------------------- side effects
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_no_side_effects(kind):
    model, batch = _case(kind)
    model[0].weight.grad = torch.full_like(model[0].weight, 7.0)  # a pre-existing gradient
    if kind == "cnn":
        model[1].eval()  # a mixed-mode model
        model[1].train()
        model[2].eval()
    snap = state_snapshot(model)
    S = torch.arange(0, 30, 3)
    for exp in list(_expansions(model, batch, lr=LR, support=S).values()) + [
            TaylorExpansion.from_model(model, CE, batch, lr=LR, support=S, backend="jvp"),
            TaylorExpansion.from_model(model, CE, batch, lr=LR, degree=1)]:
        V = torch.randn(exp.n, 2, dtype=torch.float64)
        exp.hvp(V)
        if exp.degree >= 2:
            exp.third(V, V)
        else:
            with pytest.raises(ValueError, match="degree >= 2"):
                exp.third(V, V)
        exp.derivative(exp.degree + 1)
        exp.ode(explicit=False).f(V[:, 0])
        exp.ode(explicit=True)
        exp.release()
        assert_unchanged(model, snap)


def test_loss_can_still_be_backwarded_and_graph_released():
    model, batch = _case("mlp")
    loss = CE(model(batch[0]), batch[1])
    exp = TaylorExpansion.from_loss(loss, list(model.parameters()), lr=LR)
    ref = weakref.ref(exp._engine.g)
    exp.hvp(torch.ones(exp.n, dtype=torch.float64))
    loss.backward()  # the caller's training step still works
    assert model[0].weight.grad is not None
    exp.release()
    exp.release()  # idempotent
    gc.collect()
    assert ref() is None, "the gradient graph outlived release()"
    with pytest.raises(RuntimeError, match="released"):
        exp.hvp(torch.ones(exp.n))
    with pytest.raises(RuntimeError, match="released"):
        exp.ode()
    with _from_loss(model, batch, lr=LR) as exp2:
        pass
    assert exp2.released


# ------------------------------------------------------------------------------- bad input
def test_bad_input_errors():
    model, batch = _case("mlp")
    params = list(model.parameters())
    th = flat_params(model)
    lf = make_loss_fn(model, CE, batch)
    loss = lambda: CE(model(batch[0]), batch[1])
    for lr in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lr"):
            TaylorExpansion.from_loss(loss(), params, lr=lr)
    with pytest.raises(TypeError, match="lr"):
        TaylorExpansion.from_loss(loss(), params, lr="0.1")
    with pytest.raises(ValueError, match="degree"):
        TaylorExpansion.from_loss(loss(), params, lr=LR, degree=0)
    for bad, exc, msg in [(torch.tensor([3, 1]), ValueError, "increasing"),
                          (torch.tensor([0, 0]), ValueError, "increasing"),
                          (torch.tensor([0, 31]), ValueError, r"\[0, 31\)"), (torch.tensor([-1]), ValueError, "lie in"),
                          (torch.tensor([0.0, 1.0]), TypeError, "integer"),
                          (torch.tensor([], dtype=torch.long), ValueError, "empty"),
                          (torch.tensor([[0, 1]]), ValueError, "1-D")]:
        with pytest.raises(exc, match=msg):
            TaylorExpansion.from_loss(loss(), params, lr=LR, support=bad)
    with pytest.raises(ValueError, match="scalar"):
        TaylorExpansion.from_loss(model(batch[0]).sum(0), params, lr=LR)
    with pytest.raises(TypeError, match="loss"):
        TaylorExpansion.from_loss(1.0, params, lr=LR)
    with pytest.raises(ValueError, match="does not require grad"):
        with torch.no_grad():
            TaylorExpansion.from_loss(loss(), params, lr=LR)
    used = loss()
    used.backward()
    with pytest.raises(ValueError, match="already freed"):
        TaylorExpansion.from_loss(used, params, lr=LR)
    with pytest.raises(NonFiniteError):
        TaylorExpansion.from_loss(loss() * float("nan"), params, lr=LR)
    with pytest.raises(ValueError, match="empty"):
        TaylorExpansion.from_loss(loss(), [], lr=LR)
    with pytest.raises(ValueError, match=r"params\[4\] do not require grad"):
        TaylorExpansion.from_loss(loss(), params + [torch.zeros(2, dtype=torch.float64)], lr=LR)
    with pytest.raises(TypeError, match="single tensor"):
        TaylorExpansion.from_loss(loss(), params[0], lr=LR)
    with pytest.raises(ValueError, match="backend"):
        TaylorExpansion.from_function(lf, th, lr=LR, backend="fast")
    with pytest.raises(ValueError, match="theta0"):
        TaylorExpansion.from_function(lf, th.reshape(1, -1), lr=LR)
    with pytest.raises(ValueError, match="weight_decay"):
        TaylorExpansion.from_loss(loss(), params, lr=LR, weight_decay=-1.0)
    with pytest.raises(ValueError, match="one float per parameter"):
        TaylorExpansion.from_loss(loss(), params, lr=LR, weight_decay=[0.1])
    exp = TaylorExpansion.from_loss(loss(), params, lr=LR)
    with pytest.raises(ValueError, match=r"V must have shape \(31,\)"):
        exp.hvp(torch.ones(30))
    with pytest.raises(ValueError, match="same shape"):
        exp.third(torch.ones(31), torch.ones(31, 2))
    with pytest.raises(ValueError, match="k must be"):
        exp.derivative(4)
    with pytest.raises(ValueError, match="explicit"):
        exp.ode(explicit="yes")
    with pytest.raises(ValueError, match="Z must have shape"):
        exp.third_sym(torch.ones(3, 3))


def test_unused_parameters_and_constant_hessian():
    """A parameter outside the graph has zero derivatives; a quadratic loss has zero third derivative."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 1).double()
    extra = nn.Parameter(torch.ones(2, dtype=torch.float64))
    x = torch.randn(5, 3, dtype=torch.float64)
    loss = ((lin(x) - 1) ** 2).mean()
    exp = TaylorExpansion.from_loss(loss, list(lin.parameters()) + [extra], lr=LR)
    assert torch.equal(exp.gradient()[-2:], torch.zeros(2, dtype=torch.float64))
    assert torch.equal(exp.derivative(3), torch.zeros(6, 36, dtype=torch.float64))
    X = torch.cat([x, torch.ones(5, 1, dtype=torch.float64)], 1)
    H = torch.zeros(6, 6, dtype=torch.float64)
    H[:4, :4] = 2 * X.T @ X / 5
    assert torch.allclose(exp.derivative(2), H, atol=1e-13)


# ------------------------------------------------------------------------------- properties
@settings(max_examples=15, deadline=None)
@given(idx=st.sets(st.integers(0, 30), min_size=1, max_size=8), seed=st.integers(0, 2 ** 16))
def test_property_support_blocks_and_third_sym(idx, seed):
    """For any support S and any (non-symmetric) Z: the expansion's blocks are the full tensors' S-blocks,
    F2 is symmetric in its two inputs, and third_sym(Z) = ∇³L_S · vec(Z)."""
    model, batch = _case("mlp")
    th, g, H, T = _reference("mlp")
    S = torch.tensor(sorted(idx))
    exp = _from_loss(model, batch, lr=LR, support=S)
    m = S.numel()
    TS = T[S][:, S][:, :, S]
    gen = torch.Generator().manual_seed(seed)
    Z = torch.randn(m, m, generator=gen, dtype=torch.float64)
    assert torch.allclose(exp.hvp(torch.eye(m, dtype=torch.float64)), H[S][:, S], atol=1e-12)
    assert torch.allclose(exp.third_sym(Z), TS.reshape(m, -1) @ Z.reshape(-1), atol=1e-11)
    a, b = torch.randn(m, generator=gen, dtype=torch.float64), torch.randn(m, generator=gen, dtype=torch.float64)
    assert torch.allclose(exp.third(a, b), exp.third(b, a), atol=1e-12)
    exp.release()


@pytest.mark.parametrize("order", [1, 2])
def test_carleman_accepts_matrix_free_terms(order):
    """The math core's Carleman system runs on the matrix-free F1/F2 and matches the explicit ones."""
    from torch_qode.core.carleman import carleman

    model, batch = _case("cnn")
    exp = _from_loss(model, batch, lr=LR, support=torch.arange(0, 51, 2))
    u0 = torch.randn(exp.n, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.05
    for form in ("discrete", "continuous"):
        ref = carleman(exp.ode(explicit=True), order, form).simulate(u0, 5)
        got = carleman(exp.ode(explicit=False), order, form).simulate(u0, 5)
        assert torch.allclose(torch.as_tensor(got), torch.as_tensor(ref), atol=1e-12), form


def test_from_model_weight_decay_forms_match_from_loss():
    import numpy as np

    model, batch = _case("mlp")
    th = flat_params(model)
    n = th.numel()
    V = torch.randn(n, 3, generator=torch.Generator().manual_seed(0), dtype=th.dtype)
    per_tensor = [0.1, 0.0, 0.2, 0.0]
    flat = torch.cat([torch.full((p.numel(),), w, dtype=th.dtype) for w, p in zip(per_tensor, model.parameters())])
    ref = _from_loss(model, batch, lr=LR, weight_decay=per_tensor)
    for wd in (per_tensor, [np.float32(0.1), 0, torch.tensor(0.2), np.float64(0.0)], flat.numpy(), flat):
        for backend in ("jvp", "double_backward"):
            exp = TaylorExpansion.from_model(model, CE, batch, lr=LR, weight_decay=wd, backend=backend)
            assert torch.allclose(exp.gradient(), ref.gradient(), atol=1e-12)
            assert torch.allclose(exp.hvp(V), ref.hvp(V), atol=1e-11)
    S = torch.tensor([0, 13, 16, 30])            # one entry of each tensor: its own decay on the support
    exp = TaylorExpansion.from_model(model, CE, batch, lr=LR, weight_decay=per_tensor, support=S, degree=1)
    ref0 = TaylorExpansion.from_model(model, CE, batch, lr=LR, support=S, degree=1)
    E = torch.eye(4, dtype=th.dtype)
    assert torch.allclose(exp.hvp(E) - ref0.hvp(E), torch.diag(flat[S]), atol=1e-12)
    plain = TaylorExpansion.from_model(model, CE, batch, lr=LR, degree=1)
    for wd in (0.05, np.float32(0.05), torch.tensor(0.05, dtype=torch.float64), np.array(0.05)):
        exp = TaylorExpansion.from_model(model, CE, batch, lr=LR, weight_decay=wd, degree=1)
        assert torch.allclose(exp.hvp(V) - plain.hvp(V), float(wd) * V, atol=1e-12)
    with pytest.raises(ValueError, match=r"one float per parameter tensor \(4\), got 1"):
        TaylorExpansion.from_model(model, CE, batch, lr=LR, weight_decay=[0.1])
    with pytest.raises(ValueError, match=r"\(31,\)"):
        TaylorExpansion.from_model(model, CE, batch, lr=LR, weight_decay=np.zeros(30))
    with pytest.raises(TypeError, match="weight_decay"):
        TaylorExpansion.from_model(model, CE, batch, lr=LR, weight_decay=[0.1, "a", 0.0, 0.0])


@pytest.mark.parametrize("backend", ["jvp", "double_backward"])
def test_empty_column_blocks_support_and_nonfinite_Z(backend):
    model, batch = _case("mlp")
    exp = TaylorExpansion.from_model(model, CE, batch, lr=LR, support=[0, 5, 20], backend=backend)
    empty = torch.ones(3, 0, dtype=torch.float64)
    assert exp.hvp(empty).shape == (3, 0) and exp.third(empty, empty).shape == (3, 0)
    assert exp.ode(explicit=False).term(1).matmat(empty).shape == (3, 0)
    for Z in (torch.full((3, 3), float("nan")), torch.eye(3) * float("inf")):
        with pytest.raises(NonFiniteError, match="Z"):
            exp.third_sym(Z)
    for empty_support in ([], (), torch.tensor([]), torch.tensor([], dtype=torch.long)):
        with pytest.raises(ValueError, match="support is empty"):
            TaylorExpansion.from_model(model, CE, batch, lr=LR, support=empty_support, backend=backend)


def test_decomposed_instance_norm_unbatched_input():
    torch.manual_seed(0)
    for m, x in ((nn.InstanceNorm1d(3, affine=True), torch.randn(3, 7)),
                 (nn.InstanceNorm2d(3, track_running_stats=True), torch.randn(3, 4, 5))):
        m = m.double()
        for p in m.parameters():
            p.data.normal_()
        bufs = [b.clone() for b in m.buffers()]
        with decomposed_norms(m, update_running_stats=True):
            y = m(x.double())
        upd = [b.clone() for b in m.buffers()]
        for b, v in zip(m.buffers(), bufs):
            b.copy_(v)
        assert torch.allclose(y, m(x.double()), atol=1e-12)      # the fused layer treats it as a batch of one
        assert all(torch.allclose(a.double(), b.double(), atol=1e-12) for a, b in zip(upd, m.buffers()))


def test_taylor_backends_are_a_registry():
    """``backend=`` resolves through one registry ("auto" is the measured choice); an unknown name lists them."""
    from torch_qode.bridge.taylor import AUTO_BACKEND, TAYLOR_BACKENDS
    assert TAYLOR_BACKENDS.names() == ("auto", "jvp", "double_backward")
    assert TAYLOR_BACKENDS["auto"] is TAYLOR_BACKENDS[AUTO_BACKEND]
    model, batch = _case("mlp")
    th = flat_params(model)
    with pytest.raises(ValueError, match=r"^backend must be one of \('auto', 'jvp', 'double_backward'\), got 'fd'$"):
        TaylorExpansion.from_function(make_loss_fn(model, CE, batch), th, lr=LR, backend="fd")
    for name in ("auto", "jvp", "double_backward"):
        exp = TaylorExpansion.from_function(make_loss_fn(model, CE, batch), th, lr=LR, degree=1, backend=name)
        assert exp.backend == (AUTO_BACKEND if name == "auto" else name)
        exp.release()
