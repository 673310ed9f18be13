"""Carleman linearisation against a brute-force dense Kronecker implementation (tests/reference.py)."""
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings, strategies as st

from tests.reference import carleman_dense, exact_map, lift_dense, random_coefficients
from torch_qode import MatrixFreeTerm, PolynomialODE
from torch_qode.core.carleman import (CarlemanTooLarge, carleman, carleman_error_bound, dissipativity,
                                 required_order)

CASES = [(q, N, n) for q in (2, 3) for N in (1, 2, 3, 4) for n in ((3,) if N < 4 else (2,))]


def _noise(rng, n, T):
    table = rng.normal(size=(T + 1, n)) * 0.1
    return table, (lambda t: table[t])


@pytest.mark.parametrize("form", ["discrete", "continuous"])
@pytest.mark.parametrize("q,N,n", CASES)
@pytest.mark.parametrize("timedep", [False, True])
def test_against_dense_kronecker(form, q, N, n, timedep):
    rng = np.random.default_rng(100 * q + 10 * N + n + timedep)
    coeffs = random_coefficients(rng, n, q)
    T = 6
    table, f0_fn = _noise(rng, n, T)
    ode = PolynomialODE([f0_fn if timedep else coeffs[0]] + coeffs[1:])
    sys_ = carleman(ode, N, form)
    f0_at = (lambda t: table[t]) if timedep else (lambda t: coeffs[0])
    u0 = rng.normal(size=n) * 0.3

    y = lift_dense(u0, N)
    np.testing.assert_allclose(sys_.lift(u0), y, rtol=0, atol=1e-12)
    for t in range(T):
        A_ref, b_ref = carleman_dense(coeffs, f0_at(t), N, form)
        A = sys_.matrix(t)
        assert sp.issparse(A) and A.shape == A_ref.shape == (sys_.dim, sys_.dim)
        np.testing.assert_allclose(A.toarray(), A_ref, rtol=0, atol=1e-12)
        np.testing.assert_allclose(sys_.offset(t), b_ref, rtol=0, atol=1e-12)
        y_next = y + A_ref @ y + b_ref
        np.testing.assert_allclose(sys_.step(y, t), y_next, rtol=0, atol=1e-10)
        y = y_next
    traj = sys_.simulate(u0, T)
    assert traj.shape == (T + 1, n)
    np.testing.assert_allclose(traj[-1], y[:n], rtol=0, atol=1e-10)


def test_discrete_form_is_the_exact_map_at_the_first_steps():
    """Level 1 of the discrete form after one step is exact for N ≥ q; with N ≥ q·2 after two."""
    rng = np.random.default_rng(7)
    n, q = 3, 2
    coeffs = random_coefficients(rng, n, q)
    ode = PolynomialODE(coeffs)
    u0 = rng.normal(size=n) * 0.3
    u1 = exact_map(coeffs, u0, coeffs[0])
    u2 = exact_map(coeffs, u1, coeffs[0])
    traj = carleman(ode, 4, "discrete").simulate(u0, 2)
    np.testing.assert_allclose(traj[1], u1, atol=1e-13)
    np.testing.assert_allclose(traj[2], u2, atol=1e-13)
    np.testing.assert_allclose(ode.iterate(u0, 2)[2], u2, atol=1e-13)


@pytest.mark.parametrize("form", ["discrete", "continuous"])
@pytest.mark.parametrize("N", [1, 2, 3])
def test_linear_ode_is_reproduced_at_any_order(form, N):
    rng = np.random.default_rng(N)
    n = 4
    F1 = rng.normal(size=(n, n)) * 0.2
    table = rng.normal(size=(21, n))
    ode = PolynomialODE([lambda t: table[t], F1])
    u0 = rng.normal(size=n)
    u, ref = u0.copy(), [u0.copy()]
    for t in range(20):
        u = u + table[t] + F1 @ u
        ref.append(u.copy())
    np.testing.assert_allclose(carleman(ode, N, form).simulate(u0, 20), np.array(ref), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", ["discrete", "continuous"])
def test_pure_quadratic_from_zero_stays_zero(form):
    rng = np.random.default_rng(3)
    n = 3
    ode = PolynomialODE([None, rng.normal(size=(n, n)), rng.normal(size=(n, n * n))])
    assert np.all(carleman(ode, 3, form).simulate(np.zeros(n), 30) == 0)


def fig4_ode(n, f, seed):
    """The paper's Fig. 4 system (DESIGN.md): F1 = −H, F2 ~ U(−0.015, 0.015), F0 = 0."""
    rng = np.random.default_rng(seed)
    npos = int(round(f * n))
    lam = np.concatenate([rng.uniform(0, 1, npos), rng.uniform(-0.01, 0, n - npos)])
    Q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    F2 = rng.uniform(-0.015, 0.015, (n, n * n))
    return PolynomialODE([None, -(Q * lam) @ Q.T, F2])


def test_fig4_discrete_error_falls_with_order_and_continuous_blows_up():
    n, T = 8, 40
    ode = fig4_ode(n, 1.0, 0)
    u0 = np.random.default_rng(1).uniform(-1, 1, n)
    exact = ode.iterate(u0, T)
    err = {}
    for form in ("discrete", "continuous"):
        for N in (1, 2, 3, 4):
            traj = carleman(ode, N, form).simulate(u0, T)
            err[form, N] = np.abs(traj[:, 0] - exact[:, 0])
    t = 10
    d = [err["discrete", N][t] for N in (1, 2, 3, 4)]
    assert d[0] > d[1] > d[2] > d[3], d
    assert d[3] < d[0] / 20
    # the continuous form's level-j block has eigenvalues 1 + λ1 + … + λj, which leave the unit disc
    assert err["continuous", 4][T] > 1e3 and err["discrete", 4][T] < 0.1
    sys_c = carleman(ode, 4, "continuous")
    y = sys_c.lift(u0)
    for s in range(T):
        y = sys_c.step(y, s)
    assert np.abs(sys_c.levels(y)[3]).max() > 1e6


@pytest.mark.parametrize("form", ["discrete", "continuous"])
def test_matrix_free_term_matches_explicit(form):
    rng = np.random.default_rng(11)
    n = 3
    coeffs = random_coefficients(rng, n, 2)
    F1t, F2t = (torch.as_tensor(c) for c in coeffs[1:])
    mf = PolynomialODE([coeffs[0], MatrixFreeTerm(n, 1, lambda Y: F1t @ Y, symmetric=False),
                        MatrixFreeTerm(n, 2, lambda Y: F2t @ Y)])
    ex = PolynomialODE(coeffs)
    u0 = rng.normal(size=n) * 0.3
    np.testing.assert_allclose(carleman(mf, 3, form).simulate(u0, 8), carleman(ex, 3, form).simulate(u0, 8),
                               atol=1e-13)
    with pytest.raises(TypeError, match="matrix-free"):
        carleman(mf, 2, form).matrix()


def test_inputs_sparse_torch_numpy_and_output_types():
    rng = np.random.default_rng(5)
    n = 4
    coeffs = random_coefficients(rng, n, 2)
    F1s = sp.random(n, n, density=0.5, random_state=1, format="csr")
    ode_np = PolynomialODE([coeffs[0], F1s.toarray(), coeffs[2]])
    ode_sp = PolynomialODE([coeffs[0], F1s, sp.csr_matrix(coeffs[2])])
    ode_t = PolynomialODE([torch.as_tensor(coeffs[0]), torch.as_tensor(F1s.toarray()), torch.as_tensor(coeffs[2])])
    u0 = rng.normal(size=n) * 0.2
    ref = carleman(ode_np, 2).simulate(u0, 5)
    assert isinstance(ref, np.ndarray)
    np.testing.assert_allclose(carleman(ode_sp, 2).simulate(u0, 5), ref, atol=1e-14)
    out_t = carleman(ode_t, 2).simulate(torch.as_tensor(u0), 5)
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float64
    np.testing.assert_allclose(out_t.numpy(), ref, atol=1e-14)
    np.testing.assert_allclose(carleman(ode_sp, 2).matrix().toarray(), carleman(ode_np, 2).matrix().toarray())


def test_memory_guard_refuses_before_allocating():
    rng = np.random.default_rng(0)
    n = 6
    ode = PolynomialODE(random_coefficients(rng, n, 2))
    s = carleman(ode, 3)
    with pytest.raises(CarlemanTooLarge, match="matrix-free") as info:
        s.matrix(max_bytes=10_000)
    assert "non-zeros" in str(info.value)
    # the bound is an upper bound on what actually gets built
    assert s.matrix().nnz <= s.nnz_bound()
    big = PolynomialODE([None, MatrixFreeTerm(10_000, 1, lambda Y: Y)])
    with pytest.raises(CarlemanTooLarge, match="Δ="):
        carleman(big, 3)


def test_simulate_refuses_a_trajectory_over_budget():
    """The (T+1)×n trajectory is checked against max_bytes (the system's by default) before allocation."""
    n = 2000
    ode = PolynomialODE([None, MatrixFreeTerm(n, 1, lambda Y: -0.01 * Y, symmetric=True)])
    s = carleman(ode, 1, max_bytes=2**20)          # the state fits in 1 MiB
    assert s.max_bytes == 2**20
    u0 = np.full(n, 0.01)
    with pytest.raises(CarlemanTooLarge, match="shorter T.*CarlemanSystem.step") as info:
        s.simulate(u0, 10**10)                     # 149,000 GiB: would be a raw allocator error
    assert "trajectory" in str(info.value) and "max_bytes" in str(info.value)
    with pytest.raises(CarlemanTooLarge, match="trajectory"):
        s.simulate(u0, 100)                        # 101×2000×8 B = 1.5 MiB > the system's 1 MiB
    assert s.simulate(u0, 100, max_bytes=2**21).shape == (101, n)   # an explicit budget wins
    assert s.simulate(u0, 50).shape == (51, n)


@pytest.mark.parametrize("bad", [-1, 0, "x", 1.5, True, 2.0**30])
def test_max_bytes_is_validated_everywhere(bad):
    ode = PolynomialODE([None, -0.1 * np.eye(3)])
    with pytest.raises(ValueError, match="max_bytes must be a positive integer"):
        carleman(ode, 1, max_bytes=bad)
    s = carleman(ode, 1, max_bytes=np.int64(2**20))
    for call in (lambda: s.matrix(max_bytes=bad), lambda: s.row_sparsity(max_bytes=bad),
                 lambda: dissipativity(s, max_bytes=bad), lambda: s.simulate(np.zeros(3), 2, max_bytes=bad)):
        with pytest.raises(ValueError, match="max_bytes"):
            call()


def test_system_budget_is_the_default_for_the_matrix():
    rng = np.random.default_rng(0)
    ode = PolynomialODE(random_coefficients(rng, 6, 2))
    s = carleman(ode, 3, max_bytes=10_000)
    with pytest.raises(CarlemanTooLarge, match="non-zeros"):
        s.matrix()
    assert s.matrix(max_bytes=1 << 30).shape == (s.dim, s.dim)


@pytest.mark.parametrize("form", ["discrete", "continuous"])
def test_row_sparsity_within_theorem_V1_bound(form):
    rng = np.random.default_rng(2)
    n = 4
    F1 = sp.random(n, n, density=0.4, random_state=3).toarray()
    F2 = sp.random(n, n * n, density=0.2, random_state=4).toarray()
    ode = PolynomialODE([rng.normal(size=n), F1, F2])
    for N in (1, 2, 3):
        s = carleman(ode, N, form)
        assert 0 < s.row_sparsity() <= s.sparsity_bound()


def test_row_sparsity_bound_is_tight_for_linear_level():
    F1 = np.array([[1.0, 2.0, 0.0], [0.0, 3.0, 0.0], [1.0, 1.0, 1.0]])
    ode = PolynomialODE([None, F1, np.zeros((3, 9)) + 0.0 * np.ones((3, 9))])
    s = carleman(ode, 1, "continuous")
    assert s.row_sparsity() == s.sparsity_bound() == 3


def test_required_order_and_error_bound():
    norms = [0.0, 0.5, 0.2, 0.1]          # Σ (ℓ−1)||Fℓ|| = 0.2 + 0.2 = 0.4
    # hand check: bound(N) = 3·N·0.5^(N+1)·0.4/0.5 = 2.4·N/2^(N+1): N=14 -> 1.025e-3 > 1e-3, N=15 -> 5.49e-4
    # (the closed form ⌈log(2400)/log 2⌉ = 12, which drops the factor N, gives bound(12) = 3.5e-3 > ε)
    assert required_order(1e-3, 0.5, norms, 0.5) == 15
    assert carleman_error_bound(14, 0.5, norms, 0.5) == pytest.approx(2.4 * 14 / 2**15)
    assert required_order(1e-6, 0.5, norms, 0.5) > required_order(1e-3, 0.5, norms, 0.5)
    assert required_order(1e-3, 0.1, norms, 0.5) < required_order(1e-3, 0.5, norms, 0.5)
    assert required_order(1e-9, 0.5, [0.0, 0.5], 0.5) == 1
    b = [carleman_error_bound(N, 0.5, norms, 0.5) for N in range(2, 12)]
    assert all(x > y for x, y in zip(b, b[1:]))
    assert carleman_error_bound(3, 0.5, norms, 0.5) == pytest.approx(3 * 3 * 0.5**4 * 0.4 / 0.5)
    with pytest.raises(ValueError, match="u_norm"):
        required_order(1e-3, 1.5, norms, 0.5)
    with pytest.raises(ValueError, match="eps"):
        required_order(0.0, 0.5, norms, 0.5)
    with pytest.raises(ValueError, match="rate"):
        required_order(1e-3, 0.5, norms, 0.0)
    # unreachable within the cap: a clear error, not a wrong N
    with pytest.raises(ValueError, match="max_order=10000"):
        required_order(1e-3, 1 - 1e-7, norms, 0.5)
    assert required_order(1e-3, 0.99, norms, 0.5, max_order=2000) <= 2000
    with pytest.raises(ValueError, match="max_order"):
        required_order(1e-3, 0.5, norms, 0.5, max_order=0)


@settings(max_examples=200, deadline=None)
@given(eps=st.floats(1e-12, 10.0), u=st.floats(0.0, 0.97), rate=st.floats(1e-4, 10.0),
       norms=st.lists(st.floats(0.0, 5.0), min_size=2, max_size=5))
def test_property_required_order_is_the_smallest_N_meeting_the_bound(eps, u, rate, norms):
    """Eq. (II.76) as solved here: bound(N) ≤ ε at N = required_order and > ε at N − 1."""
    N = required_order(eps, u, norms, rate)
    assert N >= 1
    assert carleman_error_bound(N, u, norms, rate) <= eps
    if N > 1:
        assert carleman_error_bound(N - 1, u, norms, rate) > eps


def test_dissipativity_test():
    n = 3
    ode = PolynomialODE([None, -0.5 * np.eye(n), np.zeros((n, n * n))])
    d = dissipativity(carleman(ode, 2, "discrete"))
    assert d.fully_dissipative and d.norm_I_plus_A == pytest.approx(0.5)
    np.testing.assert_allclose(np.sort(d.level1_eigenvalues), 0.5)
    assert d.dissipative_fraction == 1.0
    ode2 = PolynomialODE([None, np.diag([-0.5, 0.2, -2.5]), np.zeros((n, n * n))])
    d2 = dissipativity(carleman(ode2, 1))
    assert not d2.fully_dissipative and d2.norm_I_plus_A == pytest.approx(1.5)
    assert d2.dissipative_fraction == pytest.approx(1 / 3)
    assert d2.as_dict()["level1_eigenvalues"]


# ---------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clearly():
    F1 = np.eye(2)
    with pytest.raises(ValueError, match="at least"):
        PolynomialODE([np.zeros(2)])
    with pytest.raises(ValueError, match=r"F2 must have shape \(2, 4\)"):
        PolynomialODE([None, F1, np.zeros((2, 3))])
    with pytest.raises(ValueError, match="F0 must have shape"):
        PolynomialODE([np.zeros(3), F1])
    with pytest.raises(ValueError, match="non-finite"):
        PolynomialODE([None, np.array([[np.nan, 0], [0, 1]])])
    with pytest.raises(ValueError, match="non-finite"):
        PolynomialODE([np.array([np.inf, 0]), F1])
    with pytest.raises(ValueError, match="top-degree"):
        PolynomialODE([None, F1, None])
    with pytest.raises(TypeError, match="list"):
        PolynomialODE(np.zeros((2, 2)))
    ode = PolynomialODE([lambda t: np.array([np.nan, 0.0]), F1])
    with pytest.raises(ValueError, match=r"F0\(3\)"):
        ode.F0(3)
    good = PolynomialODE([None, F1])
    with pytest.raises(ValueError, match="order"):
        carleman(good, 0)
    with pytest.raises(ValueError, match="form"):
        carleman(good, 1, form="euler")
    with pytest.raises(TypeError, match="PolynomialODE"):
        carleman(F1, 1)
    s = carleman(good, 2)
    with pytest.raises(ValueError, match="u0 must have shape"):
        s.lift(np.zeros(3))
    with pytest.raises(ValueError, match=r"y must have shape \(6,\)"):
        s.step(np.zeros(5))
    with pytest.raises(ValueError, match="T must be"):
        s.simulate(np.zeros(2), -1)
    # complex states are refused, never silently made real
    with pytest.raises(TypeError, match="u0 must be real"):
        s.lift(np.array([0.1 + 1j, 0.2]))
    with pytest.raises(TypeError, match="u0 must be real"):
        s.simulate(torch.tensor([0.1 + 1j, 0.2]), 2)
    with pytest.raises(TypeError, match="y must be real"):
        s.step(np.zeros(6, dtype=complex))


def test_nonfinite_state_is_reported():
    ode = PolynomialODE([None, 1e200 * np.eye(2)])
    s = carleman(ode, 1)
    with pytest.raises(ValueError, match="non-finite"):
        s.simulate(np.ones(2), 5)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3), q=st.integers(1, 3), N=st.integers(1, 3),
       form=st.sampled_from(["discrete", "continuous"]), seed=st.integers(0, 2**31 - 1),
       timedep=st.booleans())
def test_property_matrix_free_step_equals_explicit(n, q, N, form, seed, timedep):
    rng = np.random.default_rng(seed)
    coeffs = random_coefficients(rng, n, q)
    f0 = (lambda t: coeffs[0] * (t + 1)) if timedep else coeffs[0]
    s = carleman(PolynomialODE([f0] + coeffs[1:]), N, form)
    assert s.dim == sum(n**j for j in range(1, N + 1))
    y = rng.normal(size=s.dim)
    for t in (0, 2):
        A, b = carleman_dense(coeffs, coeffs[0] * (t + 1) if timedep else coeffs[0], N, form)
        np.testing.assert_allclose(s.step(y, t), y + A @ y + b, atol=1e-10)
        np.testing.assert_allclose(s.matrix(t).toarray(), A, atol=1e-12)
    assert s.row_sparsity() <= s.sparsity_bound()
