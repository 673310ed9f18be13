"""One torch-native linear-operator protocol for the math core (in the spirit of scipy's
``LinearOperator`` and curvlinops).

An operator has a ``shape`` ``(rows, cols)``, a ``dtype`` and a ``device`` and maps a ``(cols, m)``
torch block to ``(rows, m)`` with :meth:`LinearOperator.matmat`.  What else it can do is stated by
capability flags, never discovered by catching exceptions:

* ``explicit`` — it holds a matrix: :meth:`~LinearOperator.dense` and
  :meth:`~LinearOperator.to_scipy` work (on a matrix-free operator they raise
  :class:`NotExplicitError`, a ``TypeError``, with a clear message);
* ``transposable`` — :meth:`~LinearOperator.rmatmat` (``Aᵀ W``) is available;
* ``symmetric`` — ``A = Aᵀ``.

The Taylor terms ``Fk`` of a :class:`~torch_qode.core.ode.PolynomialODE` (explicit arrays or
autograd products) and the window matrix ``M`` of Eq. (II.102) are all such operators.  Scipy's
solvers see them only through :meth:`LinearOperator.scipy_operator`, the one numpy boundary.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from .._lazy import lazy_module

if TYPE_CHECKING:  # scipy.sparse and scipy.sparse.linalg (with scipy.linalg) load on first use (issue 19)
    import scipy.sparse as sp
    import scipy.sparse.linalg as spla
else:
    sp = lazy_module("scipy.sparse")

__all__ = ["LinearOperator", "NotExplicitError"]


class NotExplicitError(TypeError):
    """An explicit matrix was asked of a matrix-free operator."""


class LinearOperator:
    """Abstract torch-native linear operator (see the module docstring)."""

    #: capability flags (class defaults; implementations override)
    explicit: bool = False
    transposable: bool = False
    symmetric: bool = False
    #: a short description used in messages
    label: str = "operator"

    shape: tuple
    dtype: torch.dtype = torch.float64
    device: torch.device = torch.device("cpu")

    # ------------------------------------------------------------------ the one required operation
    def matmat(self, Y: torch.Tensor) -> torch.Tensor:   # pragma: no cover - abstract
        """``A @ Y`` for a ``(cols, m)`` tensor."""
        raise NotImplementedError

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        """``A @ x`` for a ``(cols,)`` tensor."""
        return self.matmat(x[:, None])[:, 0]

    def rmatmat(self, W: torch.Tensor) -> torch.Tensor:
        """``Aᵀ @ W``; only when ``transposable`` (or ``symmetric``)."""
        if self.symmetric:
            return self.matmat(W)
        raise NotExplicitError(f"{self.label} has no transpose product (transposable=False)")

    def __matmul__(self, other):
        """``A @ x`` / ``A @ X``, arrays in, arrays out (numpy in gives numpy out)."""
        is_torch = isinstance(other, torch.Tensor)
        x = other if is_torch else torch.as_tensor(np.asarray(other, dtype=np.float64))
        x = x.to(dtype=self.dtype, device=self.device)
        out = self.matvec(x) if x.dim() == 1 else self.matmat(x)
        return out if is_torch else out.detach().cpu().numpy()

    # ------------------------------------------------------------------ explicit capabilities
    def dense(self) -> torch.Tensor:
        """The matrix as a dense torch tensor (only when ``explicit``)."""
        raise self._not_explicit()

    def to_scipy(self) -> sp.csr_matrix:
        """The matrix as a float64 scipy CSR matrix (only when ``explicit``).

        Returns:
            The CSR matrix (explicit subclasses override this method).

        Raises:
            NotExplicitError: The operator is matrix-free (``explicit = False``).
        """
        raise self._not_explicit()

    def _not_explicit(self) -> NotExplicitError:
        return NotExplicitError(f"{self.label} is matrix-free: it has no explicit matrix (explicit=False)")

    def norm(self) -> float:
        """Operator 2-norm (largest singular value)."""
        if self.explicit:
            A = self.dense().double()
            return float(torch.linalg.matrix_norm(A, ord=2)) if A.numel() else 0.0
        raise NotImplementedError(f"{self.label}: norm() is not available")

    # ------------------------------------------------------------------ the scipy boundary
    def scipy_operator(self) -> spla.LinearOperator:
        """A float64 :class:`scipy.sparse.linalg.LinearOperator` for scipy's solvers.

        Every product converts numpy <-> torch here, at the boundary, and nowhere else.
        """
        import scipy.sparse.linalg as spla

        def mv(x):
            X = torch.as_tensor(np.asarray(x, dtype=np.float64)).to(dtype=self.dtype, device=self.device)
            out = self.matmat(X.reshape(self.shape[1], -1))
            return out.detach().to("cpu", torch.float64).numpy().reshape(-1)

        rmv = None
        if self.transposable or self.symmetric:
            def rmv(y):
                W = torch.as_tensor(np.asarray(y, dtype=np.float64)).to(dtype=self.dtype, device=self.device)
                out = self.rmatmat(W.reshape(self.shape[0], -1))
                return out.detach().to("cpu", torch.float64).numpy().reshape(-1)
        return spla.LinearOperator(tuple(self.shape), matvec=mv, rmatvec=rmv, dtype=np.float64)

    def __repr__(self) -> str:
        flags = [f for f in ("explicit", "transposable", "symmetric") if getattr(self, f)]
        return (f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
                f"flags={flags})")
