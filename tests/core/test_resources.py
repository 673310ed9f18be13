"""The quantum resource ledger (torch_qode.core.resources; Theorems II.3/II.4, Eq. II.76, II.106, Sec. II D)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from torch_qode.core.carleman import carleman, carleman_error_bound
from torch_qode.core.linsolve import solve_window
from torch_qode.core.ode import MatrixFreeTerm, PolynomialODE
from torch_qode.core.resources import Resources, estimate_resources


def small_ode():
    """n = 2: F1 upper-triangular, F2 with a single non-zero in row 0."""
    F1 = np.array([[-0.5, 0.1], [0.0, -0.5]])
    F2 = np.zeros((2, 4))
    F2[0, 3] = 0.2                       # u_1² in the equation of u_0
    return PolynomialODE([np.zeros(2), F1, F2])


# ------------------------------------------------------------------------- hand-checked numbers
def test_from_numbers_hand_checked():
    res = Resources.from_numbers(4, 2, 3, 5, 0.01)
    # Δ = 4 + 16 = 20, N_b = 4·20 = 80 -> ceil(log2 80) = 7 system qubits
    assert (res.dim, res.N_b, res.system_qubits) == (20, 80, 7)
    # s_M ≤ s + 2 = 7 -> block encoding ceil(log2 7) + 1 = 4, qlsa 1, no filter flag
    assert res.s_M == 7 and res.s_M_source == "bound"
    assert res.ancillas == {"block_encoding": 4, "qlsa": 1, "well_ill_flag": 0}
    assert res.qubits == 12 and not res.filtering
    assert res.kappa == 8 == res.kappa_bound and res.kappa_source == "bound" and res.kappa_a == 8
    polylog = math.log2(80 / 0.01)
    assert res.gates_qlsa == pytest.approx(7 * 8 * polylog)
    assert res.gates_filtered == pytest.approx(49 * 64 * polylog)
    assert res.success_probability == 0.25 and res.success_source == "uniform"
    assert res.r == 4 and res.m == 2
    assert res.tomography_support_draws == pytest.approx(4 * (1 + 1 / 2 + 1 / 3 + 1 / 4))
    assert res.tomography_shadow_shots == pytest.approx(2**2 * 4**3 / 0.01**2)
    assert res.total_gates == pytest.approx(res.gates_qlsa * (res.tomography_support_draws
                                                              + res.tomography_shadow_shots) / 0.25)
    line = str(res)
    assert "\n" not in line and "12 qubits" in line and "[II.118]" in line
    d = res.as_dict()
    assert d["ancillas"] == res.ancillas and d["gates_qlsa"] == res.gates_qlsa


def test_from_numbers_filtering_and_overrides():
    res = Resources.from_numbers(8, 1, 0, 3, 0.5, kappa_a=10.0, kappa=1.0, r=2,
                                 block_encoding_ancillas=0, success_probability=1.0,
                                 level1_fraction=0.5, well_probability=0.5)
    # T = 0: M = I, s_M = 1; N_b = 8 -> 3 qubits + 0 + 1 + 1 (filter flag)
    assert res.s_M == 1 and res.qubits == 5 and res.filtering
    assert res.gates_filtered == pytest.approx(1 * 100 * math.log2(16))
    assert res.total_gates == pytest.approx(res.gates_filtered * (res.tomography_support_draws
                                                                  + res.tomography_shadow_shots) / 0.25)
    assert res.tomography_support_draws == 3.0 and res.tomography_shadow_shots == 9 * 8 / 0.25


def test_estimate_resources_measures_sparsity_by_hand():
    sys_ = carleman(small_ode(), order=2, form="discrete")
    res = estimate_resources(sys_, T=3, eps=1e-2)
    # Discrete form, A = P − I.  Level-2 row (0,0): (G1⊗G1) row 0 with G1 = I + F1 = [[.5,.1],[0,.5]]
    # has 4 non-zeros (its diagonal .25 ≠ 1 survives the −I); level-1 row 0: F1 row 0 (2) + F2 (1) = 3.
    assert res.s == 4 and res.sparsity_source == "measured"
    assert res.s_M == 1 + 4                       # rows of M: I and −(I + A), I + A = P has 4 there
    assert res.s_bound >= res.s
    assert res.dim == 6 and res.N_b == 24 and res.system_qubits == 5
    assert res.form == "discrete" and res.kappa == 8


def test_linear_n2_order1():
    ode = PolynomialODE([np.zeros(2), np.diag([-0.5, -0.25])])
    res = estimate_resources(carleman(ode, order=1), T=1, eps=0.5, r=1)
    # A = F1 diagonal: s = 1; I + A diagonal: s_M = 1 + 1 = 2; N_b = 4 -> 2 qubits
    assert (res.s, res.s_M, res.system_qubits, res.dim) == (1, 2, 2, 2)
    assert res.ancillas["block_encoding"] == 2     # ceil(log2 2) + 1
    assert res.gates_qlsa == pytest.approx(2 * 4 * math.log2(8))
    assert res.tomography_support_draws == 1.0 and res.required_order is None   # linear: no u_norm


def test_sparsity_falls_back_to_theorem_v1_bound():
    n = 3
    mf = MatrixFreeTerm(n, 1, lambda Y: -0.5 * Y, norm=0.5, symmetric=True)
    ode = PolynomialODE([np.zeros(n), mf])
    res = estimate_resources(carleman(ode, order=2), T=2)
    assert res.sparsity_source == "bound" and res.s == res.s_bound
    assert res.s_M == res.s + 2 and res.s_M_source == "bound"
    assert any("Theorem V.1" in note for note in res.notes)
    big = estimate_resources(carleman(small_ode(), order=2), T=2, max_bytes=10)
    assert big.sparsity_source == "bound"


def test_solution_gives_success_probability_and_kappa():
    # Linear, N = 1: X[t] = (I + F1)^t u0; the success probability is the last slice's share.
    F1 = np.array([[-0.3, 0.1], [0.0, -0.2]])
    ode = PolynomialODE([np.zeros(2), F1])
    sys_ = carleman(ode, order=1)
    u0 = np.array([0.4, -0.3])
    T = 4
    sol = solve_window(sys_, u0, T)
    G = np.eye(2) + F1
    traj = [np.linalg.matrix_power(G, t) @ u0 for t in range(T + 1)]
    expect = np.sum(traj[-1] ** 2) / sum(np.sum(x**2) for x in traj)
    res = estimate_resources(sys_, T, solution=sol)
    assert res.success_probability == pytest.approx(expect, rel=1e-12)
    assert res.success_source == "solution" and res.level1_fraction == pytest.approx(1.0)
    M = np.eye((T + 1) * 2) - np.kron(np.eye(T + 1, k=-1), G)
    assert res.kappa == pytest.approx(np.linalg.cond(M), rel=1e-8) and res.kappa_source == "measured"
    assert res.kappa <= res.kappa_bound
    with pytest.raises(ValueError, match="solution"):
        estimate_resources(sys_, T + 1, solution=sol)


def test_required_order_eq_II_76():
    sys_ = carleman(small_ode(), order=2)
    # ||F2|| = 0.2; Σ_{ℓ=2}^q (ℓ−1)||F_ℓ|| = 0.2; N = the smallest N with 3N·u^(N+1)·0.2/rate ≤ ε:
    # 2.4·N/2^(N+1) is 1.03e-3 at N = 14 and 5.5e-4 at N = 15
    res = estimate_resources(sys_, 3, eps=1e-3, u_norm=0.5, rate=0.25)
    assert res.required_order == 15
    # level-1 share of a lifted state with ||u|| = 0.5: u²/(u² + u⁴)
    assert res.level1_fraction == pytest.approx(0.25 / (0.25 + 0.0625))
    # default rate 1 − ||I + F1||₂ (positive here)
    default = estimate_resources(sys_, 3, eps=1e-3, u_norm=0.5)
    rate = 1 - np.linalg.norm(np.array([[0.5, 0.1], [0.0, 0.5]]), 2)
    N = default.required_order
    assert carleman_error_bound(N, 0.5, sys_.ode.norms(), rate) <= 1e-3 < \
        carleman_error_bound(N - 1, 0.5, sys_.ode.norms(), rate)
    missing = estimate_resources(sys_, 3)
    assert missing.required_order is None and any("u_norm" in note for note in missing.notes)


# ------------------------------------------------------------------------- monotonicity
@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 50), N=st.integers(1, 4), T=st.integers(0, 200), s=st.integers(0, 60),
       eps=st.floats(1e-6, 0.5), ka=st.floats(1.0, 1e3))
def test_monotone_in_T_N_kappa_a(n, N, T, s, eps, ka):
    base = Resources.from_numbers(n, N, T, s, eps, kappa_a=ka)
    later = Resources.from_numbers(n, N, T + 1, s, eps, kappa_a=ka)
    deeper = Resources.from_numbers(n, N + 1, T, s, eps, kappa_a=ka)
    wider = Resources.from_numbers(n, N, T, s, eps, kappa_a=2 * ka)
    for other in (later, deeper):
        assert other.qubits >= base.qubits and other.dim >= base.dim
        assert other.gates_qlsa >= base.gates_qlsa and other.gates_filtered >= base.gates_filtered
        assert other.total_gates >= base.total_gates
    assert later.success_probability < base.success_probability and later.kappa > base.kappa
    assert wider.gates_filtered == pytest.approx(4 * base.gates_filtered)
    assert wider.gates_qlsa == base.gates_qlsa and wider.total_gates >= base.total_gates


def test_monotone_on_real_systems():
    ode = small_ode()
    by_order = [estimate_resources(carleman(ode, order=N), T=4, kappa_a=5.0) for N in (1, 2, 3)]
    by_T = [estimate_resources(carleman(ode, order=2), T=T) for T in (0, 1, 5, 20)]
    by_ka = [estimate_resources(carleman(ode, order=2), T=4, kappa_a=k) for k in (1.0, 3.0, 10.0)]
    for seq in (by_order, by_T, by_ka):
        for a, b in zip(seq, seq[1:]):
            assert b.qubits >= a.qubits and b.gates_filtered >= a.gates_filtered
            assert b.total_gates >= a.total_gates
    for a, b in zip(by_order, by_order[1:]):
        assert b.s >= a.s and b.gates_qlsa >= a.gates_qlsa
    for a, b in zip(by_T, by_T[1:]):
        assert b.gates_qlsa > a.gates_qlsa and b.success_probability < a.success_probability


# ------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args, kwargs, exc, match", [
    ((0, 1, 1, 1, 0.1), {}, ValueError, "n"),
    ((4, 0, 1, 1, 0.1), {}, ValueError, "order"),
    ((4, 1, -1, 1, 0.1), {}, ValueError, "T"),
    ((4, 1, 1.5, 1, 0.1), {}, TypeError, "T"),
    ((4, 1, 1, -1, 0.1), {}, ValueError, "s"),
    ((4, 1, 1, 1, 0.0), {}, ValueError, "eps"),
    ((4, 1, 1, 1, 1.0), {}, ValueError, "eps"),
    ((4, 1, 1, 1, float("nan")), {}, ValueError, "eps"),
    ((4, 1, 1, 1, 0.1), {"kappa_a": 0.5}, ValueError, "kappa_a"),
    ((4, 1, 1, 1, 0.1), {"kappa": float("inf")}, ValueError, "kappa"),
    ((4, 1, 1, 1, 0.1), {"r": 5}, ValueError, "r"),
    ((4, 1, 1, 1, 0.1), {"r": 0}, ValueError, "r"),
    ((4, 1, 1, 1, 0.1), {"success_probability": 1.5}, ValueError, "success_probability"),
    ((4, 1, 1, 1, 0.1), {"filtering": "yes"}, TypeError, "filtering"),
    ((4, 1, 1, 1, 0.1), {"block_encoding_ancillas": -1}, ValueError, "block_encoding_ancillas"),
])
def test_from_numbers_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Resources.from_numbers(*args, **kwargs)


def test_estimate_resources_bad_input():
    sys_ = carleman(small_ode(), order=1)
    with pytest.raises(TypeError, match="system"):
        estimate_resources(small_ode(), 3)
    with pytest.raises(ValueError, match="T"):
        estimate_resources(sys_, -1)
    with pytest.raises(ValueError, match="eps"):
        estimate_resources(sys_, 3, eps=2.0)
    with pytest.raises(ValueError, match="u_norm"):
        estimate_resources(sys_, 3, u_norm=1.5)
    with pytest.raises(TypeError, match="solution"):
        estimate_resources(sys_, 3, solution=object())
    bad = type("S", (), {"X": torch.full((4, 2), float("nan"))})()
    with pytest.raises(ValueError, match="solution"):
        estimate_resources(sys_, 3, solution=bad)
