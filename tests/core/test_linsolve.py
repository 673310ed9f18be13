"""The window system M X = B (Eq. II.102) and its three solvers, against dense references."""
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from tests.reference import carleman_dense, lift_dense, random_coefficients
from torch_qode import MatrixFreeTerm, PolynomialODE
from torch_qode.core.carleman import CarlemanTooLarge, carleman
from torch_qode.core.linsolve import condition_number, kappa_bound, solve_window, window_system


def _system(seed, n=3, q=2, N=2, form="discrete", timedep=True, T=8):
    rng = np.random.default_rng(seed)
    coeffs = random_coefficients(rng, n, q)
    coeffs[1] -= 0.3 * np.eye(n)
    table = rng.normal(size=(T + 1, n)) * 0.05
    f0 = (lambda t: table[t]) if timedep else coeffs[0]
    f0_at = (lambda t: table[t]) if timedep else (lambda t: coeffs[0])
    return carleman(PolynomialODE([f0] + coeffs[1:]), N, form), coeffs, f0_at, rng.normal(size=n) * 0.3


def dense_window(coeffs, f0_at, N, form, u0, T):
    """Brute-force M and B of Eq. (II.102) from dense blocks."""
    D = sum(coeffs[1].shape[0] ** j for j in range(1, N + 1))
    M = np.eye((T + 1) * D)
    B = [lift_dense(u0, N)]
    for t in range(T):
        A, b = carleman_dense(coeffs, f0_at(t), N, form)
        M[(t + 1) * D:(t + 2) * D, t * D:(t + 1) * D] = -(np.eye(D) + A)
        B.append(b)
    return M, np.concatenate(B)


@pytest.mark.parametrize("form", ["discrete", "continuous"])
@pytest.mark.parametrize("timedep", [False, True])
def test_window_system_matches_dense(form, timedep):
    T = 6
    s, coeffs, f0_at, u0 = _system(1, form=form, timedep=timedep, T=T)
    M, B = window_system(s, u0, T)
    M_ref, B_ref = dense_window(coeffs, f0_at, 2, form, u0, T)
    assert sp.issparse(M)
    np.testing.assert_allclose(M.toarray(), M_ref, atol=1e-12)
    np.testing.assert_allclose(B, B_ref, atol=1e-12)
    Mop, B2 = window_system(s, u0, T, explicit=False)
    x = np.random.default_rng(0).normal(size=B.size)
    np.testing.assert_allclose(Mop @ x, M_ref @ x, atol=1e-11)
    np.testing.assert_allclose(B2, B_ref)


@pytest.mark.parametrize("form", ["discrete", "continuous"])
@pytest.mark.parametrize("N", [1, 2, 3])
def test_forward_direct_filtered_agree(form, N):
    T = 7
    s, coeffs, f0_at, u0 = _system(2 + N, N=N, form=form, T=T)
    fw = solve_window(s, u0, T, "forward")
    di = solve_window(s, u0, T, "direct")
    fi = solve_window(s, u0, T, "filtered", kappa_a=1e12)
    M_ref, B_ref = dense_window(coeffs, f0_at, N, form, u0, T)
    X_ref = np.linalg.solve(M_ref, B_ref).reshape(T + 1, -1)
    for sol in (fw, di, fi):
        assert sol.X.shape == (T + 1, s.dim)
        np.testing.assert_allclose(sol.X, X_ref, atol=1e-9)
    np.testing.assert_allclose(fw.trajectory, s.simulate(u0, T), atol=1e-12)
    np.testing.assert_allclose(fw.final, X_ref[-1, :3], atol=1e-9)
    assert fi.fidelity == pytest.approx(1.0) and fi.dropped == 0
    assert fw.kappa == pytest.approx(np.linalg.cond(M_ref), rel=1e-9) and fw.kappa_exact


def test_filtered_small_kappa_matches_dense_svd_reference():
    T = 8
    s, coeffs, f0_at, u0 = _system(5, N=2, T=T)
    M_ref, B_ref = dense_window(coeffs, f0_at, 2, "discrete", u0, T)
    U, sig, Vt = np.linalg.svd(M_ref)
    kappa = sig[0] / sig[-1]
    kappa_a = kappa / 3
    keep = sig >= sig[0] / kappa_a
    assert 0 < (~keep).sum() < keep.size
    beta = U.T @ B_ref
    x_ref = Vt[keep].T @ (beta[keep] / sig[keep])
    a_kept = np.sum((beta[keep] / sig[keep]) ** 2)
    a_all = np.sum((beta / sig) ** 2)
    ill = np.sum(beta[~keep] ** 2)
    fid_ref = a_kept / np.sqrt(a_all * (a_kept + ill))   # Eq. (II.110)
    sol = solve_window(s, u0, T, "filtered", kappa_a=kappa_a)
    np.testing.assert_allclose(sol.X.reshape(-1), x_ref, atol=1e-10)
    assert 0 < sol.fidelity < 1 and sol.fidelity == pytest.approx(fid_ref, rel=1e-10)
    assert sol.dropped == int((~keep).sum())
    assert sol.well_probability == pytest.approx(a_kept / (a_kept + ill))
    # the large-system path (shift-invert Lanczos on the small singular values) agrees
    sparse = solve_window(s, u0, T, "filtered", kappa_a=kappa_a, dense_limit=0)
    np.testing.assert_allclose(sparse.X, sol.X, atol=1e-8)
    assert sparse.fidelity == pytest.approx(sol.fidelity, rel=1e-8)
    assert sparse.kappa == pytest.approx(kappa, rel=1e-6) and not sparse.kappa_exact
    # fidelity falls as more is filtered
    f = [solve_window(s, u0, T, "filtered", kappa_a=k).fidelity for k in (kappa * 2, kappa / 2, kappa / 6)]
    assert f[0] == pytest.approx(1.0) and f[0] > f[1] > f[2]


def test_condition_number_estimate_and_bound():
    T = 20
    n = 4
    rng = np.random.default_rng(9)
    F1 = -0.5 * np.eye(n) + 0.05 * rng.normal(size=(n, n))
    s = carleman(PolynomialODE([rng.normal(size=n), F1]), 1)
    assert np.linalg.norm(np.eye(n) + F1, 2) <= 1
    M, _ = window_system(s, np.zeros(n), T)
    exact, is_exact = condition_number(M)
    est, est_exact = condition_number(M, dense_limit=0)
    assert is_exact and not est_exact
    assert est == pytest.approx(exact, rel=1e-6)
    assert exact <= kappa_bound(T) == 2 * (T + 1)


def test_torch_in_torch_out_and_matrix_free_forward():
    n = 3
    rng = np.random.default_rng(4)
    F1 = torch.as_tensor(-0.2 * np.eye(n) + 0.05 * rng.normal(size=(n, n)))
    ode = PolynomialODE([None, MatrixFreeTerm(n, 1, lambda Y: F1 @ Y), torch.zeros(n, n * n)])
    s = carleman(ode, 2)
    u0 = torch.as_tensor(rng.normal(size=n))
    sol = solve_window(s, u0, 5)
    assert isinstance(sol.X, torch.Tensor) and sol.kappa is None and sol.notes
    with pytest.raises(TypeError, match="forward"):
        solve_window(s, u0, 5, "direct")
    ode_ex = PolynomialODE([None, F1, torch.zeros(n, n * n)])
    di = solve_window(carleman(ode_ex, 2), u0, 5, "direct")
    assert isinstance(di.X, torch.Tensor)
    torch.testing.assert_close(di.X, sol.X, atol=1e-12, rtol=0)


def test_bad_arguments():
    s, _, _, u0 = _system(0)
    with pytest.raises(ValueError, match="method"):
        solve_window(s, u0, 3, "hhl")
    with pytest.raises(ValueError, match="kappa_a"):
        solve_window(s, u0, 3, "filtered")
    with pytest.raises(ValueError, match="kappa_a"):
        solve_window(s, u0, 3, "filtered", kappa_a=0.5)
    with pytest.raises(ValueError, match="kappa_a"):
        solve_window(s, u0, 3, "forward", kappa_a=10)
    with pytest.raises(ValueError, match="T must be"):
        solve_window(s, u0, -2)
    with pytest.raises(TypeError, match="CarlemanSystem"):
        solve_window("not a system", u0, 3)
    with pytest.raises(ValueError, match="T must be"):
        kappa_bound(-1)


def test_direct_solve_on_a_larger_window_is_substitution_not_factorisation():
    """(T+1)Δ = 21,420 unknowns: the old LU path ran out of memory on systems like this one."""
    rng = np.random.default_rng(21)
    n, T = 20, 50
    coeffs = random_coefficients(rng, n, 2, scale=0.05)
    coeffs[1] -= 0.2 * np.eye(n)
    s = carleman(PolynomialODE(coeffs), 2)
    u0 = rng.normal(size=n) * 0.1
    di = solve_window(s, u0, T, "direct", kappa=None)
    np.testing.assert_allclose(di.X, solve_window(s, u0, T, "forward", kappa=None).X, atol=1e-12)
    with pytest.raises(ValueError, match="kappa_a"):
        solve_window(s, u0, T, "filtered", kappa_a="x")


# ---------------------------------------------------------------------------- memory budget
def _wide_system(n=50, N=2, **kw):
    """Δ = n + n² = 2550 for n = 50, N = 2 (B of a T-step window is 8·(T+1)·Δ bytes)."""
    return carleman(PolynomialODE([np.full(n, 1e-3), -0.1 * np.eye(n), np.full((n, n * n), 1e-4)]), N, **kw)


@pytest.mark.parametrize("call", ["window_system", "window_system-operator", "direct", "filtered"])
def test_window_refused_before_B_is_allocated(call):
    import tracemalloc

    s = _wide_system()
    T, u0 = 400, np.zeros(50)                  # B alone: 401·2550·8 B = 7.8 MiB
    run = {"window_system": lambda: window_system(s, u0, T, explicit=True, max_bytes=2**20),
           "window_system-operator": lambda: window_system(s, u0, T, explicit=False, max_bytes=2**20),
           "direct": lambda: solve_window(s, u0, T, "direct", max_bytes=2**20),
           "filtered": lambda: solve_window(s, u0, T, "filtered", kappa_a=10.0, max_bytes=2**20)}[call]
    tracemalloc.start()
    try:
        with pytest.raises(CarlemanTooLarge, match="T=400, Δ=2,550") as info:
            run()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"{peak / 2**20:.1f} MiB allocated before the refusal"
    assert "max_bytes" in str(info.value) and ("forward" in str(info.value) or "step" in str(info.value))
    M, B = window_system(s, u0, 3, max_bytes=2**30)     # a short window fits
    assert B.shape == (4 * s.dim,) and M.shape == (4 * s.dim,) * 2


def test_forward_solve_is_budgeted():
    n = 2000
    s = carleman(PolynomialODE([np.zeros(n), MatrixFreeTerm(n, 1, lambda Y: -0.01 * Y, symmetric=True)]), 1,
                 max_bytes=2**20)
    u0 = np.full(n, 0.01)
    with pytest.raises(CarlemanTooLarge, match="shorter window T.*simulate") as info:
        solve_window(s, u0, 10**9)          # would be a raw 16 TB allocator error
    assert "(T+1)Δ" in str(info.value)
    with pytest.raises(CarlemanTooLarge, match="forward"):
        solve_window(s, u0, 100)            # 101·2000·8 B > the system's 1 MiB
    sol = solve_window(s, u0, 100, max_bytes=2**22)
    np.testing.assert_allclose(sol.trajectory, s.simulate(u0, 100, max_bytes=2**22), atol=1e-15)


@pytest.mark.parametrize("bad", [-1, 0, "x", 1.5, False])
def test_max_bytes_validated_in_window_solvers(bad):
    s, _, _, u0 = _system(0)
    for call in (lambda: window_system(s, u0, 3, max_bytes=bad),
                 lambda: solve_window(s, u0, 3, "forward", max_bytes=bad),
                 lambda: solve_window(s, u0, 3, "direct", max_bytes=bad)):
        with pytest.raises(ValueError, match="max_bytes must be a positive integer"):
            call()


def test_filtered_large_path_never_keeps_values_lanczos_could_not_return():
    """κ_a = 1 drops all but σ_max: more than the k ≤ N − 2 eigsh can give; the dense SVD takes over."""
    T = 6
    s, coeffs, f0_at, u0 = _system(3, N=2, T=T, timedep=False)
    M_ref, B_ref = dense_window(coeffs, f0_at, 2, "discrete", u0, T)
    U, sig, Vt = np.linalg.svd(M_ref)
    def ref(kappa_a):
        keep = sig >= sig[0] / kappa_a
        return Vt[keep].T @ ((U.T @ B_ref)[keep] / sig[keep]), int((~keep).sum())

    for kappa_a, dropped in ((1.0, sig.size - 1), (sig[0] / sig[1] * 1.0001, sig.size - 2)):
        x_ref, n_drop = ref(kappa_a)
        assert n_drop == dropped
        sol = solve_window(s, u0, T, "filtered", kappa_a=kappa_a, dense_limit=10)
        assert sol.dropped == dropped      # before: 82 of 83 at κ_a = 1, error 0.04
        np.testing.assert_allclose(sol.X.reshape(-1), x_ref, atol=1e-12)
        assert sol.kappa_exact and any("dense SVD" in note for note in sol.notes)
    # with one kept value among the N − 2 Lanczos returns, the large-system path is still used
    x_ref, n_drop = ref(sig[0] / sig[2] * 1.0001)
    sol = solve_window(s, u0, T, "filtered", kappa_a=sig[0] / sig[2] * 1.0001, dense_limit=10)
    assert not sol.kappa_exact and not sol.notes and sol.dropped == n_drop == sig.size - 3
    np.testing.assert_allclose(sol.X.reshape(-1), x_ref, atol=1e-9)
    # a tiny window (N < 4 unknowns) goes straight to the dense SVD
    tiny = carleman(PolynomialODE([None, np.array([[-0.5]])]), 1)
    sol = solve_window(tiny, np.array([0.3]), 1, "filtered", kappa_a=1.0, dense_limit=0)
    assert sol.dropped == 1 and sol.kappa_exact


def test_filtered_dense_svd_is_budgeted():
    T = 6
    s, _, _, u0 = _system(3, N=2, T=T, timedep=False)
    # 84 unknowns: the dense SVD needs 4·8·84² B ≈ 220 KiB
    with pytest.raises(CarlemanTooLarge, match="dense filtered solve.*kappa_a"):
        solve_window(s, u0, T, "filtered", kappa_a=2.0, max_bytes=150_000)
