"""The one linear-operator protocol (core/operator.py): Taylor terms and the window matrix M."""
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from tests.reference import random_coefficients
from torch_qode import MatrixFreeTerm, PolynomialODE
from torch_qode.core.carleman import carleman
from torch_qode.core.linsolve import window_system
from torch_qode.core.ode import ExplicitTerm
from torch_qode.core.operator import LinearOperator, NotExplicitError
from torch_qode.core.window import WindowOperator, condition_number


def _terms(n=3, k=2, seed=0):
    F = np.random.default_rng(seed).normal(size=(n, n**k))
    Ft = torch.as_tensor(F)
    explicit = PolynomialODE([None] + [None] * (k - 1) + [F]).terms[k]
    free = MatrixFreeTerm(n, k, lambda Y: Ft @ Y, rmatmat=lambda W: Ft.T @ W)
    return F, explicit, free


@pytest.mark.parametrize("sparse", [False, True])
def test_explicit_and_matrix_free_terms_share_the_protocol(sparse):
    F, explicit, free = _terms()
    if sparse:
        explicit = PolynomialODE([None, None, sp.csr_matrix(F)]).terms[2]
    assert isinstance(explicit, ExplicitTerm) and isinstance(explicit, LinearOperator)
    assert isinstance(free, LinearOperator)
    assert explicit.explicit and not free.explicit
    assert explicit.transposable and free.transposable
    assert explicit.shape == free.shape == (3, 9)
    assert explicit.dtype == free.dtype == torch.float64 and explicit.device == free.device
    Y = torch.randn(9, 4, dtype=torch.float64)
    torch.testing.assert_close(explicit.matmat(Y), free.matmat(Y))
    torch.testing.assert_close(explicit.matvec(Y[:, 0]), free.matvec(Y[:, 0]))
    W = torch.randn(3, 2, dtype=torch.float64)
    torch.testing.assert_close(explicit.rmatmat(W), free.rmatmat(W))
    np.testing.assert_allclose(explicit.to_scipy().toarray(), F)
    np.testing.assert_allclose(explicit.dense().numpy(), F)
    assert explicit.norm() == pytest.approx(free.norm(iters=200), rel=1e-6)
    x = np.random.default_rng(1).normal(size=9)
    np.testing.assert_allclose(explicit @ x, F @ x)          # numpy in, numpy out
    np.testing.assert_allclose(free.scipy_operator().matvec(x), F @ x)


def test_matrix_free_refuses_explicit_requests_clearly():
    _, _, free = _terms()
    for ask in (free.to_scipy, free.dense, free.scipy):
        with pytest.raises(NotExplicitError, match="matrix-free"):
            ask()
    assert issubclass(NotExplicitError, TypeError)           # the exception type callers caught before
    no_t = MatrixFreeTerm(2, 1, lambda Y: Y)
    assert not no_t.transposable
    with pytest.raises(NotExplicitError, match="transpose"):
        no_t.rmatmat(torch.ones(2, 1, dtype=torch.float64))
    sym = MatrixFreeTerm(2, 1, lambda Y: 2 * Y, symmetric=True)
    assert sym.symmetric and sym.transposable
    torch.testing.assert_close(sym.rmatmat(torch.ones(2, 1, dtype=torch.float64)), 2 * torch.ones(2, 1,
                                                                                                 dtype=torch.float64))


def test_matrix_free_term_takes_the_odes_dtype_unless_given():
    t = MatrixFreeTerm(2, 1, lambda Y: Y)
    PolynomialODE([None, t], dtype=torch.float32)
    assert t.dtype == torch.float32
    given = MatrixFreeTerm(2, 1, lambda Y: Y, dtype=torch.float64)
    PolynomialODE([None, given], dtype=torch.float32)
    assert given.dtype == torch.float64


def _system(form, timedep, N=2, n=3, T=5, dtype=torch.float64, seed=3):
    rng = np.random.default_rng(seed)
    coeffs = random_coefficients(rng, n, 2)
    coeffs[1] -= 0.3 * np.eye(n)
    table = rng.normal(size=(T + 1, n)) * 0.05
    f0 = (lambda t: table[t]) if timedep else coeffs[0]
    return carleman(PolynomialODE([f0] + coeffs[1:], dtype=dtype), N, form), rng.normal(size=n) * 0.3


@pytest.mark.parametrize("form", ["discrete", "continuous"])
@pytest.mark.parametrize("timedep", [False, True])
def test_window_operator_equals_the_explicit_M(form, timedep):
    T = 5
    s, u0 = _system(form, timedep, T=T)
    M, _ = window_system(s, u0, T, explicit=True)
    op, _ = window_system(s, u0, T, explicit=False)
    assert isinstance(op, WindowOperator) and not op.explicit and op.shape == M.shape
    X = torch.randn(M.shape[0], 3, dtype=torch.float64)
    np.testing.assert_allclose(op.matmat(X).numpy(), M @ X.numpy(), atol=1e-12)
    x = np.random.default_rng(0).normal(size=M.shape[0])
    np.testing.assert_allclose(op @ x, M @ x, atol=1e-12)
    np.testing.assert_allclose(op.scipy_operator() @ x, M @ x, atol=1e-12)   # the scipy boundary
    with pytest.raises(NotExplicitError, match="matrix-free"):
        op.to_scipy()
    with pytest.raises(TypeError, match="explicit M"):
        condition_number(op)


def test_window_operator_makes_no_numpy_round_trip(monkeypatch):
    s, u0 = _system("discrete", True)
    op, _ = window_system(s, u0, 5, explicit=False)
    X = torch.randn(op.shape[0], 2, dtype=torch.float64)
    expected = op.matmat(X)

    def refuse(*_a, **_k):
        raise AssertionError("Tensor.numpy() called inside the window operator")

    monkeypatch.setattr(torch.Tensor, "numpy", refuse)
    torch.testing.assert_close(op.matmat(X), expected)


def test_window_operator_stays_on_the_inputs_dtype_and_device():
    s, u0 = _system("discrete", False, dtype=torch.float32)
    op, _ = window_system(s, u0, 4, explicit=False)
    assert op.dtype == torch.float32
    X = torch.randn(op.shape[0], 2, dtype=torch.float32)
    out = op.matmat(X)
    assert out.dtype == torch.float32 and out.device == X.device
    ref = window_system(_system("discrete", False)[0], u0, 4, explicit=True)[0]
    np.testing.assert_allclose(out.numpy(), ref @ X.double().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_window_operator_on_cuda():
    rng = np.random.default_rng(0)
    n, T = 3, 4
    coeffs = [torch.as_tensor(c, device="cuda") for c in random_coefficients(rng, n, 2)]
    s = carleman(PolynomialODE(coeffs, device="cuda"), 2)
    op, _ = window_system(s, np.zeros(n), T, explicit=False)
    X = torch.randn(op.shape[0], 2, dtype=torch.float64, device="cuda")
    out = op.matmat(X)
    assert out.device.type == "cuda"
    M, _ = window_system(carleman(PolynomialODE([c.cpu() for c in coeffs]), 2), np.zeros(n), T, explicit=True)
    np.testing.assert_allclose(out.cpu().numpy(), M @ X.cpu().numpy(), atol=1e-12)
