"""PolynomialODE: the map, the norms, validation (Eq. II.1, V.5)."""
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings, strategies as st

from tests.reference import exact_map, random_coefficients
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


# ------------------------------------------------------------------------------ input hygiene
F1_REAL = np.array([[-0.1, 0.02], [0.01, -0.2]])


@pytest.mark.parametrize("make", [np.asarray, torch.as_tensor, sp.csr_matrix,
                                  lambda a: torch.as_tensor(a).to_sparse()],
                         ids=["numpy", "torch", "scipy", "torch-sparse"])
def test_complex_coefficients_are_refused(make):
    with pytest.raises(TypeError, match="F1 must be real"):
        PolynomialODE([None, make(F1_REAL + 1j * F1_REAL)])
    with pytest.raises(TypeError, match="F2 must be real"):
        PolynomialODE([None, F1_REAL, make(np.ones((2, 4)) * (0.01 + 0.01j))])


def test_complex_F0_is_refused_constant_or_callable():
    with pytest.raises(TypeError, match="F0 must be real"):
        PolynomialODE([np.array([1j, 2j]), F1_REAL])
    with pytest.raises(TypeError, match="F0 must be real"):
        PolynomialODE([torch.tensor([1j, 2j]), F1_REAL])
    ode = PolynomialODE([lambda t: np.array([1j, 0.0]), F1_REAL])
    with pytest.raises(TypeError, match=r"F0\(2\) must be real"):
        ode.F0(2)
    with pytest.raises(TypeError, match="u must be real"):
        PolynomialODE([None, F1_REAL]).f(np.array([1j, 0.0]))


@pytest.mark.parametrize("kind", ["numpy", "torch", "scipy"])
def test_coefficients_are_copied_at_construction(kind):
    """Editing the caller's arrays afterwards changes neither the step nor A(t), b(t) nor the cached nnz."""
    from torch_qode.core.carleman import carleman

    F0, F1 = np.zeros(2), F1_REAL * np.eye(2)
    F2 = np.zeros((2, 4))
    F2[0, 3] = 0.1
    if kind == "numpy":
        args = [F0, F1, F2]
    elif kind == "torch":
        args = [torch.as_tensor(F0), torch.as_tensor(F1), torch.as_tensor(F2)]
    else:
        args = [F0, sp.csr_matrix(F1), sp.csr_matrix(F2)]
    ode = PolynomialODE(args)
    s = carleman(ode, 2)
    F1_before = F1.copy()
    nnz = [ode.terms[1].nnz, ode.terms[2].nnz]
    if kind == "scipy":
        args[1].data[:] = 0.3
        args[2].data[:] = 5.0
    else:
        args[1][0, 1] = 0.3
        args[2][1, 0] = 5.0
    args[0][:] = 0.5                       # the user reuses their F0 buffer
    assert ode.F0_is_zero and not ode.F0().any()
    np.testing.assert_array_equal(ode.terms[1].dense().numpy(), F1_before)
    assert [ode.terms[1].nnz, ode.terms[2].nnz] == nnz == [2, 1]
    y = np.random.default_rng(0).normal(size=s.dim)
    np.testing.assert_allclose(s.step(y), y + s.matrix() @ y + s.offset(), atol=1e-14)


def test_scipy_coefficient_of_the_caller_is_not_modified():
    F1 = sp.csr_matrix((np.array([0.0, -0.1]), np.array([0, 1]), np.array([0, 1, 2])), shape=(2, 2))
    PolynomialODE([None, F1])
    assert F1.nnz == 2                     # eliminate_zeros ran on a copy


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex128, torch.complex64])
def test_non_real_floating_dtype_is_refused(dtype):
    with pytest.raises(ValueError, match=f"dtype must be a real floating.*{dtype}"):
        PolynomialODE([np.array([0.3, 0.7]), F1_REAL], dtype=dtype)


def test_dtype_must_be_a_torch_dtype_and_float32_still_works():
    with pytest.raises(TypeError, match="dtype must be a torch dtype"):
        PolynomialODE([None, F1_REAL], dtype="float64")
    ode = PolynomialODE([np.array([0.3, 0.7]), F1_REAL], dtype=torch.float32)
    assert ode.F0().dtype == torch.float32
    np.testing.assert_allclose(ode.f(np.zeros(2)), [0.3, 0.7], rtol=1e-6)


@pytest.mark.parametrize("layout", ["coo", "csr", "csc"])
def test_torch_sparse_coefficients_match_dense(layout):
    from torch_qode.core.carleman import carleman

    rng = np.random.default_rng(0)
    n = 3
    F1 = rng.normal(size=(n, n)) * 0.1
    F1[0, 1] = 0
    F2 = rng.normal(size=(n, n * n)) * 0.05
    F2[:, ::2] = 0
    F0 = rng.normal(size=n) * 0.1
    conv = {"coo": lambda a: torch.as_tensor(a).to_sparse(),
            "csr": lambda a: torch.as_tensor(a).to_sparse_csr(),
            "csc": lambda a: torch.as_tensor(a).to_sparse_csc()}[layout]
    ref = carleman(PolynomialODE([F0, F1, F2]), 2)
    s = carleman(PolynomialODE([F0, conv(F1), conv(F2.astype(np.float32))]), 2)
    assert s.ode.terms[1].nnz == np.count_nonzero(F1) and s.ode.terms[2].nnz == np.count_nonzero(F2)
    np.testing.assert_allclose(s.matrix().toarray(), ref.matrix().toarray(), atol=1e-8)
    y = rng.normal(size=s.dim)
    np.testing.assert_allclose(s.step(y), ref.step(y), atol=1e-8)
    with pytest.raises(ValueError, match=r"F1 must have shape \(3, 3\)"):
        PolynomialODE([None, torch.ones(3, 4).to_sparse()])
