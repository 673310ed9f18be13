"""PolynomialODE: the map, the norms, validation (Eq. II.1, V.5)."""
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings, strategies as st

from reference import exact_map, random_coefficients
from torch_qode import MatrixFreeTerm, NonFiniteError, PolynomialODE


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 4), q=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_property_f_and_iterate_match_reference(n, q, seed):
    rng = np.random.default_rng(seed)
    coeffs = random_coefficients(rng, n, q)
    ode = PolynomialODE(coeffs)
    assert (ode.n, ode.degree) == (n, q)
    u = rng.normal(size=n) * 0.5
    np.testing.assert_allclose(ode.f(u) + u, exact_map(coeffs, u, coeffs[0]), atol=1e-12)
    traj = ode.iterate(u, 3)
    v = u
    for t in range(3):
        v = exact_map(coeffs, v, coeffs[0])
    np.testing.assert_allclose(traj[-1], v, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 4), k=st.integers(1, 3), bad=st.integers(-2, 2).filter(lambda x: x != 0))
def test_property_wrong_shapes_raise(n, k, bad):
    coeffs = [None] + [np.zeros((n, n**j)) for j in range(1, k + 1)]
    coeffs[k] = np.zeros((n, max(1, n**k + bad)))
    if coeffs[k].shape == (n, n**k):
        return
    with pytest.raises(ValueError, match=f"F{k} must have shape"):
        PolynomialODE(coeffs)


def test_norms_are_operator_two_norms():
    rng = np.random.default_rng(0)
    coeffs = random_coefficients(rng, 4, 2)
    ode = PolynomialODE(coeffs)
    ref = [np.linalg.norm(coeffs[0])] + [np.linalg.norm(c, 2) for c in coeffs[1:]]
    np.testing.assert_allclose(ode.norms(), ref, rtol=1e-12)
    assert PolynomialODE([None, sp.csr_matrix(coeffs[1])]).norms()[1] == pytest.approx(ref[1])


def test_matrix_free_norm_by_power_iteration():
    rng = np.random.default_rng(1)
    S = rng.normal(size=(5, 5))
    H = torch.as_tensor(S + S.T)
    term = MatrixFreeTerm(5, 1, lambda Y: H @ Y, symmetric=True)
    assert term.norm(iters=300) == pytest.approx(np.linalg.norm(H.numpy(), 2), rel=1e-6)
    F2 = torch.as_tensor(rng.normal(size=(5, 25)))
    t2 = MatrixFreeTerm(5, 2, lambda Y: F2 @ Y, rmatmat=lambda W: F2.T @ W)
    assert t2.norm(iters=300) == pytest.approx(np.linalg.norm(F2.numpy(), 2), rel=1e-6)
    with pytest.raises(ValueError, match="norm"):
        MatrixFreeTerm(5, 2, lambda Y: F2 @ Y).norm()
    bad = MatrixFreeTerm(5, 1, lambda Y: Y[:2])
    with pytest.raises(ValueError, match="returned shape"):
        bad.matmat(torch.zeros(5, 1, dtype=torch.float64))


def test_time_dependent_noise_and_nonfinite():
    table = np.arange(6.0).reshape(3, 2)
    ode = PolynomialODE([lambda t: table[t], np.zeros((2, 2))])
    assert ode.time_dependent
    np.testing.assert_array_equal(ode.f(np.zeros(2), 2), table[2])
    bad = PolynomialODE([lambda t: [np.nan, 1.0], np.zeros((2, 2))])
    with pytest.raises(NonFiniteError):
        bad.f(np.zeros(2), 0)
    with pytest.raises(ValueError, match="u must have shape"):
        ode.f(np.zeros(3))
    with pytest.raises(TypeError, match="numpy array or torch tensor"):
        ode.f(object())
