"""The factored level-2 Carleman state (torch_qode/core/factored.py) against the dense order-2 system
(``carleman(ode, 2, "discrete").step``) and the brute-force ``np.kron`` reference (tests/reference.py)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from tests.reference import carleman_dense, random_coefficients
from torch_qode import MatrixFreeTerm, NonFiniteError, PolynomialODE
from torch_qode.core.carleman import CarlemanTooLarge, carleman
from torch_qode.core.factored import FactoredLevel2, factored_simulate


# ----------------------------------------------------------------------------------- helpers
def _problem(seed, n, T, scale=0.3, timedep=True):
    rng = np.random.default_rng(seed)
    coeffs = random_coefficients(rng, n, 2, scale=scale)
    table = rng.normal(size=(T + 1, n)) * scale
    table[min(2, T)] = 0.0                     # a step without noise: g = 0 adds no rank
    f0 = (lambda t: table[t]) if timedep else coeffs[0]
    f0_at = (lambda t: table[t]) if timedep else (lambda t: coeffs[0])
    return coeffs, f0, f0_at


def _matrix_free(coeffs, *, power_only_F2=False, sym_sum=False):
    """F1, F2 of ``coeffs`` as MatrixFreeTerms (F2 by power only, or with a batched sym_sum)."""
    n = coeffs[1].shape[0]
    F1 = torch.as_tensor(coeffs[1])
    F2 = torch.as_tensor(coeffs[2])
    t1 = MatrixFreeTerm(n, 1, lambda Y: F1.to(Y.dtype) @ Y)

    def power(u):
        return F2.to(u.dtype) @ torch.outer(u, u).reshape(-1)

    if power_only_F2:
        def refuse(Y):
            raise AssertionError("F2.matmat must not be called: power is enough")
        t2 = MatrixFreeTerm(n, 2, refuse, power=power)
    else:
        t2 = MatrixFreeTerm(n, 2, lambda Y: F2.to(Y.dtype) @ Y, power=power)
    if sym_sum:
        calls = []

        def batched(Z, lam):
            calls.append(Z.shape[1])
            K = (Z[:, None, :] * Z[None, :, :]).reshape(n * n, -1)   # columns z_l ⊗ z_l
            return F2.to(Z.dtype) @ (K @ lam)
        t2.sym_sum = batched
        t2.calls = calls
    return t1, t2


def _run_both(ode, T, dtype=torch.float64, dense_ode=None, **kw):
    """Step the factored and the dense system side by side; yield (t, factored, dense y)."""
    fs = FactoredLevel2(ode, **kw)
    sys_ = carleman(ode if dense_ode is None else dense_ode, 2, "discrete")
    y = torch.zeros(sys_.dim, dtype=dtype)
    for t in range(T):
        y = sys_.step(y, t)
        fs.step()
        yield t + 1, fs, y


def _err(fs, y, n):
    y = torch.as_tensor(y, dtype=torch.float64)
    e1 = float((fs.level1().double() - y[:n]).abs().max())
    e2 = float((fs.Y2().double().reshape(-1) - y[n:]).abs().max())
    return max(e1, e2)


# ------------------------------------------------------------------------ factored == dense
@pytest.mark.parametrize("kind", ["explicit", "matrix_free", "power_only_F2", "sym_sum", "sparse"])
@pytest.mark.parametrize("timedep", [True, False])
def test_factored_equals_dense_and_kron_reference(kind, timedep):
    n, T = 4, 9
    coeffs, f0, f0_at = _problem(7 + timedep, n, T, timedep=timedep)
    if kind == "explicit":
        terms = coeffs[1:]
    elif kind == "sparse":
        import scipy.sparse as sp
        F2 = coeffs[2] * (np.random.default_rng(3).random(coeffs[2].shape) < 0.2)
        coeffs = [coeffs[0], coeffs[1], F2]
        terms = [coeffs[1], sp.csr_matrix(F2)]
    else:
        terms = list(_matrix_free(coeffs, power_only_F2=kind == "power_only_F2", sym_sum=kind == "sym_sum"))
    ode = PolynomialODE([f0] + terms)
    dense_ode = PolynomialODE([f0] + coeffs[1:]) if kind == "power_only_F2" else None  # needs F2.matmat
    yb = np.zeros(n + n * n)
    for t, fs, y in _run_both(ode, T, dense_ode=dense_ode):
        A, b = carleman_dense(coeffs, f0_at(t - 1), 2, "discrete")
        yb = yb + A @ yb + b
        assert fs.k <= min(2 * t, n) and fs.rank <= 2 * t
        assert _err(fs, y, n) < 1e-12, (t, _err(fs, y, n))
        assert _err(fs, yb, n) < 1e-12
        assert np.abs(np.asarray(y) - yb).max() < 1e-12     # the dense path is the reference's
    if kind == "sparse":
        assert fs._sparse_F2 is not None and len(fs._sparse_F2[0]) == ode.term(2).nnz   # touched entries only
    if kind == "sym_sum":
        assert terms[1].calls and max(terms[1].calls) <= 2 * T   # one batched call per step


def test_float32_matches_dense_float32_and_float64():
    """float32 state against the float32 dense path: 2e-6 relative to the state's size (round-off of
    a few dozen float32 operations); against float64: 1e-5."""
    n, T = 5, 10
    coeffs, f0, _ = _problem(11, n, T)
    ode32 = PolynomialODE([f0] + list(_matrix_free(coeffs)), dtype=torch.float32)
    ode64 = PolynomialODE([f0] + coeffs[1:])
    ref = FactoredLevel2(ode64)
    for t, fs, y in _run_both(ode32, T, dtype=torch.float32):
        ref.step()
        scale = float(torch.as_tensor(y).abs().max())
        assert fs.level1().dtype == torch.float32 and fs.W.dtype == torch.float32
        assert _err(fs, y, n) < 2e-6 * scale
        assert float((fs.level1().double() - ref.level1()).abs().max()) < 1e-5 * scale
        assert float((fs.Y2().double() - ref.Y2()).abs().max()) < 1e-5 * scale


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), T=st.integers(0, 8), scale=st.floats(0.01, 0.6), seed=st.integers(0, 10_000),
       zero_f0=st.booleans())
def test_property_random_quadratic_odes(n, T, scale, seed, zero_f0):
    coeffs, f0, f0_at = _problem(seed, n, T, scale=scale)
    if zero_f0:
        f0 = np.zeros(n)
        f0_at = lambda t: np.zeros(n)   # noqa: E731
    ode = PolynomialODE([f0] + coeffs[1:])
    fs = FactoredLevel2(ode)
    yb = np.zeros(n + n * n)
    for t in range(T):
        A, b = carleman_dense(coeffs, f0_at(t), 2, "discrete")
        yb = yb + A @ yb + b
        fs.step()
        size = max(1.0, np.abs(yb).max())
        assert _err(fs, yb, n) < 1e-10 * size
        assert fs.k <= 2 * (t + 1)
    if zero_f0:
        assert fs.k == 0 and float(fs.level1().abs().max()) == 0.0
    traj = factored_simulate(ode, T)
    dense = carleman(ode, 2, "discrete").simulate(np.zeros(n), T)
    assert traj.shape == (T + 1, n)
    assert np.abs(traj.numpy() - dense).max() < 1e-10 * max(1.0, np.abs(dense).max())


def test_the_comparison_can_fail():
    """A wrong level-2 update (g wᵀ dropped) is caught by the same comparison."""
    n, T = 3, 4
    coeffs, f0, f0_at = _problem(5, n, T)
    ode = PolynomialODE([f0] + coeffs[1:])
    broken = PolynomialODE([f0, coeffs[1], coeffs[2] * 1.01])   # a 1 % error in F2
    fs = FactoredLevel2(broken)
    y = np.zeros(n + n * n)
    sys_ = carleman(ode, 2, "discrete")
    for t in range(T):
        y = sys_.step(y, t)
        fs.step()
    assert _err(fs, y, n) > 1e-6


# --------------------------------------------------------------------------------- truncation
def test_max_rank_bound_holds_against_the_exact_state():
    n, T, r = 12, 10, 3
    rng = np.random.default_rng(2)
    Q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    F1 = -(Q * rng.uniform(0.05, 0.6, n)) @ Q.T          # dissipative: ‖I + F1‖ < 1
    F2 = rng.uniform(-0.02, 0.02, (n, n * n))
    table = rng.normal(size=(T, n)) * 0.2
    ode = PolynomialODE([lambda t: table[t], F1, F2])
    exact, cut = FactoredLevel2(ode), FactoredLevel2(ode, max_rank=r)
    norm_G1 = float(np.linalg.norm(np.eye(n) + F1, 2))
    norm_F2 = float(np.linalg.norm(F2, 2))
    for t in range(T):
        exact.step()
        cut.step()
        assert cut.k <= r and cut.rank <= r and exact.rank <= 2 * (t + 1)
        dY = float(torch.linalg.matrix_norm(exact.Y2() - cut.Y2()))
        du = float(torch.linalg.vector_norm(exact.level1() - cut.level1()))
        e, d = cut.truncation_bound(norm_G1, norm_F2)
        assert dY <= e * (1 + 1e-9) + 1e-13 and du <= d * (1 + 1e-9) + 1e-13
        assert dY <= cut.truncation * (1 + 1e-9) + 1e-13   # non-expansive here: the plain sum bounds too
    assert cut.truncation > 0 and dY > 0                  # the bound is not vacuous: something was cut
    assert exact.truncation == 0.0 and exact.truncation_bound(norm_G1, norm_F2) == (0.0, 0.0)


def test_one_step_truncation_is_exactly_the_discarded_eigenvalues():
    n = 6
    coeffs, f0, _ = _problem(4, n, 8, timedep=False)
    ode = PolynomialODE([f0] + coeffs[1:])
    exact, cut = FactoredLevel2(ode), FactoredLevel2(ode, max_rank=3)
    for _ in range(2):
        exact.step()
    cut.load_state_dict({**exact.state_dict(), "max_rank": 3})
    exact.step()
    cut.step()
    lam = torch.linalg.eigvalsh(exact.Y2())
    dropped = lam[torch.argsort(lam.abs(), descending=True)][3:]
    assert math.isclose(cut.truncation, float(torch.linalg.vector_norm(dropped)), rel_tol=1e-9)
    assert math.isclose(float(torch.linalg.matrix_norm(exact.Y2() - cut.Y2())), cut.truncation, rel_tol=1e-8)


# -------------------------------------------------------------------------------- order gap
def test_order_gap_zero_without_F2_and_positive_with_it():
    n, T = 5, 6
    coeffs, f0, _ = _problem(9, n, T)
    lin = FactoredLevel2(PolynomialODE([f0, coeffs[1], np.zeros((n, n * n))]), embedded=True)
    quad = FactoredLevel2(PolynomialODE([f0] + coeffs[1:]), embedded=True)
    for _ in range(T):
        lin.step()
        quad.step()
    assert lin.order_gap == 0.0
    assert quad.order_gap > 1e-3
    # the embedded state is the order-1 Carleman system (linearised gradient descent)
    u1 = carleman(PolynomialODE([f0] + coeffs[1:]), 1, "discrete").simulate(np.zeros(n), T)[-1]
    np.testing.assert_allclose(quad.level1_order1().numpy(), u1, rtol=0, atol=1e-13)
    gap = np.linalg.norm(quad.level1().numpy() - u1) / np.linalg.norm(quad.level1().numpy())
    assert math.isclose(quad.order_gap, gap, rel_tol=1e-9)
    with pytest.raises(ValueError, match="embedded=True"):
        FactoredLevel2(PolynomialODE([f0] + coeffs[1:])).order_gap


# ------------------------------------------------------------------------------- memory O(nT)
def test_sixty_thousand_dimensions_never_form_n_squared():
    n, T = 60_000, 10
    g = torch.Generator().manual_seed(0)
    d = -torch.rand(n, generator=g, dtype=torch.float64) * 0.5        # diagonal F1 = -η H
    f0 = torch.randn(n, generator=g, dtype=torch.float64) * 1e-2
    largest = [0]

    def seen(*ts):
        largest[0] = max([largest[0]] + [x.numel() for x in ts])

    def mm1(Y):
        out = d[:, None] * Y
        seen(Y, out)
        return out

    def power(u):                                                      # F2(u, u) = 0.01 u ∘ roll(u)
        out = 0.01 * u * torch.roll(u, 1)
        seen(u, out)
        return out

    def mm2(Y):
        raise AssertionError(f"F2.matmat called with a (n², {Y.shape[1]}) block")

    ode = PolynomialODE([f0, MatrixFreeTerm(n, 1, mm1), MatrixFreeTerm(n, 2, mm2, power=power)])
    fs = FactoredLevel2(ode, embedded=True)
    peak = 0
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(T):
            fs.step()
            peak = max(peak, fs.nbytes)
    # every allocation torch made during the window (an op's count includes its children's)
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < biggest <= 8 * 8 * n * (2 * T + 2), biggest      # ≤ 84 MB, while n² float64 = 28.8 GB
    assert fs.rank <= 2 * T and fs.k <= 2 * T
    assert peak <= 8 * n * (2 * T + 2) + 8 * (2 * T) ** 2
    assert largest[0] <= n * (2 * T + 2)                   # no operand of the terms is n² (3.6e9)
    assert fs.order_gap > 0 and math.isfinite(fs.order_gap)
    with pytest.raises(CarlemanTooLarge, match=r"factors\(\)"):
        fs.Y2()
    # the same kind of ODE (diagonal F1, F2(u, u) = 0.01 u ∘ roll(u)) at n = 30 against the dense path
    m = 30
    F1 = torch.diag(d[:m])
    F2 = torch.zeros(m, m * m, dtype=torch.float64)
    for i in range(m):
        F2[i, i * m + (i - 1) % m] = 0.01
    small = PolynomialODE([f0[:m], F1, F2])
    traj = factored_simulate(small, T)
    dense = carleman(small, 2, "discrete").simulate(np.zeros(m), T)
    assert np.abs(traj.numpy() - dense).max() < 1e-12


# ------------------------------------------------------------------------ checkpoint / resume
@pytest.mark.parametrize("max_rank,embedded", [(None, True), (3, False)])
def test_state_dict_round_trip_continues_bit_for_bit(max_rank, embedded):
    n, T = 6, 10
    coeffs, f0, _ = _problem(13, n, T)
    ode = PolynomialODE([f0] + list(_matrix_free(coeffs)))
    a = FactoredLevel2(ode, max_rank=max_rank, embedded=embedded)
    for _ in range(4):
        a.step()
    sd = a.state_dict()
    buf = __import__("io").BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    b = FactoredLevel2(ode, max_rank=max_rank, embedded=embedded)
    b.load_state_dict(torch.load(buf, weights_only=True))
    ta, tb = a.run(T - 4), b.run(T - 4)
    assert torch.equal(ta, tb) and torch.equal(a.W, b.W) and torch.equal(a.C, b.C)
    assert a.t == b.t == T and a.truncation == b.truncation and a.rank == b.rank
    if embedded:
        assert a.order_gap == b.order_gap
    sd2 = a.state_dict()
    sd2["W"].add_(1.0)                                      # state_dict hands out copies
    assert not torch.equal(sd2["W"], a.W)
    with pytest.raises(ValueError, match="max_rank"):
        FactoredLevel2(ode, max_rank=5, embedded=embedded).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="missing"):
        b.load_state_dict({"W": a.W})


# -------------------------------------------------------------------------------- bad input
def test_bad_arguments_name_the_argument():
    n = 3
    coeffs, f0, _ = _problem(1, n, 3)
    ode = PolynomialODE([f0] + coeffs[1:])
    with pytest.raises(TypeError, match="ode"):
        FactoredLevel2(coeffs)
    with pytest.raises(ValueError, match="order must be 2"):
        FactoredLevel2(ode, order=3)
    with pytest.raises(ValueError, match="order"):
        FactoredLevel2(ode, order=True)
    with pytest.raises(ValueError, match="continuous.*may follow"):
        FactoredLevel2(ode, form="continuous")
    with pytest.raises(ValueError, match="form"):
        FactoredLevel2(ode, form="kron")
    cubic = PolynomialODE([f0, coeffs[1], coeffs[2], np.zeros((n, n**3)) + 1e-3])
    with pytest.raises(ValueError, match="degree"):
        FactoredLevel2(cubic)
    with pytest.raises(ValueError, match="u0"):
        FactoredLevel2(ode, u0=np.ones(n))
    FactoredLevel2(ode, u0=np.zeros(n))
    with pytest.raises(ValueError, match="u0"):
        FactoredLevel2(ode, u0=np.zeros(n + 1))
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(ValueError, match="max_rank"):
            FactoredLevel2(ode, max_rank=bad)
    with pytest.raises(TypeError, match="embedded"):
        FactoredLevel2(ode, embedded=1)
    with pytest.raises(ValueError, match="T must"):
        factored_simulate(ode, -1)
    fs = FactoredLevel2(ode)
    with pytest.raises(ValueError, match="max_bytes"):
        fs.Y2(max_bytes=0)
    with pytest.raises(ValueError, match="norm_G1"):
        fs.truncation_bound(-1.0, 0.0)
    with pytest.raises(ValueError, match="embedded=True"):
        fs.level1_order1()


@pytest.mark.parametrize("where", ["F0", "F1", "F2"])
def test_non_finite_values_raise_naming_them_and_leave_the_state(where):
    n = 4
    coeffs, _, _ = _problem(3, n, 5)
    bad_at = 2
    f0 = lambda t: np.full(n, np.nan) if (where == "F0" and t == bad_at) else coeffs[0]   # noqa: E731
    F1 = torch.as_tensor(coeffs[1])
    F2 = torch.as_tensor(coeffs[2])
    state = {"t": 0}

    def mm1(Y):
        out = F1 @ Y
        return out * np.inf if where == "F1" and state["t"] == bad_at else out

    def power(u):
        out = F2 @ torch.outer(u, u).reshape(-1)
        return out * np.nan if where == "F2" and state["t"] == bad_at else out

    ode = PolynomialODE([f0, MatrixFreeTerm(n, 1, mm1), MatrixFreeTerm(n, 2, lambda Y: F2 @ Y, power=power)])
    fs = FactoredLevel2(ode)
    for t in range(bad_at):
        state["t"] = t
        fs.step()
    state["t"] = bad_at
    before = fs.state_dict()
    msg = {"F0": r"F0\(2\)", "F1": "F1", "F2": "F2"}[where]
    with pytest.raises(NonFiniteError, match=msg):
        fs.step()
    assert fs.t == bad_at and torch.equal(fs.W, before["W"]) and torch.equal(fs.y1, before["y1"])


# ------------------------------------------------------------------------- a real expansion
@pytest.mark.parametrize("model_kind,wd,streamed", [("mlp", 1e-3, True), ("mlp", 0.0, False),
                                                    ("cnn_batchnorm", 1e-3, True)])
def test_real_taylor_expansion_window_matches_dense_order2(model_kind, wd, streamed):
    """A matrix-free window of a real expansion (HVPs, third-order products through the graph): the
    factored state equals the dense order-2 state (and the explicit-coefficient factored state)."""
    import torch.nn.functional as F

    from tests._models import cnn_batch, flat_params, mlp_batch, reference_loss, tiny_cnn, tiny_mlp
    from torch_qode import TaylorExpansion

    if model_kind == "mlp":
        model, batch = tiny_mlp(0), mlp_batch(12)
        exp = TaylorExpansion.from_function(reference_loss(model, batch), flat_params(model), lr=0.5,
                                            weight_decay=wd)
        T = 4
    else:   # Conv -> BatchNorm (decomposed, batch statistics) -> tanh -> Linear
        model, batch = tiny_cnn(0), cnn_batch(6)
        exp = TaylorExpansion.from_model(model, F.cross_entropy, batch, lr=0.5, weight_decay=wd)
        T = 3
    noise = torch.randn(T + 1, exp.n, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 1e-2
    with exp:
        g0 = -0.5 * exp.gradient()
        F0 = (lambda t: g0 + noise[t]) if streamed else g0   # noqa: E731
        mf = exp.ode(F0=F0, explicit=False)
        ex = exp.ode(F0=F0, explicit=True)
        n = exp.n
        fs = FactoredLevel2(mf, embedded=True)
        fe = FactoredLevel2(ex)
        sys_ = carleman(mf, 2, "discrete")
        y = torch.zeros(sys_.dim, dtype=torch.float64)
        for t in range(T):
            y = sys_.step(y, t)
            fs.step()
            fe.step()
        scale = max(1.0, float(y.abs().max()))
        assert _err(fs, y, n) < 1e-10 * scale
        assert _err(fe, y, n) < 1e-10 * scale
        assert fs.products["F2"] >= 1 and fs.order_gap > 0


def test_linear_ode_degree_one_and_F1_absent():
    """Degree 1 (F2 ≡ 0): level 2 is still carried (g gᵀ terms) and equals the dense order-2 state;
    F1 = None (G1 = I) works too."""
    n, T = 4, 5
    coeffs, f0, _ = _problem(21, n, T)
    for ode in (PolynomialODE([f0, coeffs[1]]), PolynomialODE([f0, None, coeffs[2]])):
        for t, fs, y in _run_both(ode, T):
            assert _err(fs, y, n) < 1e-12
        assert fs.k > 0
