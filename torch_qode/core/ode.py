"""Polynomial difference equations, the object the quantum solver linearises.

The gradient-descent map of a Taylor-expanded loss is (Eq. II.1, V.5; DESIGN.md step 4)

    u(t+1) = u(t) + f(u(t), t),      f(u, t) = F0(t) + F1 u + F2 u⊗u + … + Fq u^{⊗q},

with ``Fk`` of shape ``(n, n**k)`` acting on the row-major Kronecker power ``u^{⊗k}`` and ``F0``
either a constant vector or a callable ``t -> (n,)`` (the stochastic-gradient noise of each batch).

Every coefficient ``Fk`` (k ≥ 1) is held as a *term*, a :class:`~torch_qode.core.operator.LinearOperator`
of shape ``(n, n**k)`` whose ``matmat(Y)`` maps a ``(n**k, m)`` block of columns to ``(n, m)``.  A term
is either *explicit* (:class:`ExplicitTerm`: a dense or scipy.sparse array, ``explicit = True``, so
``dense()`` and ``to_scipy()`` work) or *matrix-free* (:class:`MatrixFreeTerm`, e.g. Hessian-vector
and third-derivative products from autograd, ``explicit = False``).  Everything downstream (Carleman
step, window solve) only ever calls ``matmat``; what else a term can do is read from its flags.
"""
from __future__ import annotations

import warnings

from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

import numpy as np
import torch

from .._checks import check_int
from .._lazy import lazy_module
from .operator import LinearOperator, NotExplicitError

if TYPE_CHECKING:  # scipy.sparse loads on first use (issue 19)
    import scipy.sparse as sp
else:
    sp = lazy_module("scipy.sparse")

__all__ = ["PolynomialODE", "MatrixFreeTerm", "ExplicitTerm", "NonFiniteError", "as_tensor", "like", "all_finite"]

# the scipy types as forward references: naming them here would load scipy.sparse on import
ArrayLike = Union[np.ndarray, torch.Tensor, "sp.spmatrix", "sp.sparray", Sequence[float]]


class NonFiniteError(ValueError):
    """A coefficient, noise vector or state holds NaN or ±inf."""


# ----------------------------------------------------------------------------------------- helpers
def as_tensor(x, dtype: torch.dtype = torch.float64, device=None, name: str = "array", *,
              copy: bool = False) -> torch.Tensor:
    """Convert real numpy / torch / sequence input to a torch tensor of ``dtype`` on ``device``.

    Complex input raises ``TypeError`` (never silently made real); ``copy=True`` never shares
    memory with ``x``.
    """
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise TypeError(f"{name} must be real: got a complex tensor ({x.dtype})")
        return x.detach().to(dtype=dtype, device=device if device is not None else x.device, copy=copy)
    if sp.issparse(x):
        raise TypeError(f"{name}: a sparse matrix is not accepted here, pass a dense vector")
    bad = f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}"
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise TypeError(bad) from exc
    if np.iscomplexobj(arr):
        raise TypeError(f"{name} must be real: got a complex array ({arr.dtype})")
    try:
        arr = arr.astype(np.float64, copy=copy)
    except (TypeError, ValueError) as exc:
        raise TypeError(bad) from exc
    return torch.as_tensor(arr, dtype=dtype, device=device)


def like(result: torch.Tensor, reference):
    """Return ``result`` as numpy if ``reference`` was not a torch tensor (arrays in, arrays out)."""
    if isinstance(reference, torch.Tensor):
        return result
    return result.detach().cpu().numpy()


def all_finite(t: torch.Tensor) -> bool:
    """True when every entry of ``t`` is finite.

    Fast path: one sum (NaN and ±inf propagate into it); only when the sum is not finite — a bad
    entry, or an overflow of huge finite entries — is the exact element-wise test run.
    """
    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def _check_finite(t: torch.Tensor, name: str) -> None:
    if not all_finite(t):
        raise NonFiniteError(f"{name} contains non-finite entries (NaN or inf)")


# ------------------------------------------------------------------------------------------- terms
class ExplicitTerm(LinearOperator):
    """An explicit coefficient ``Fk`` of shape ``(n, n**k)``: dense or scipy.sparse (Eq. II.1)."""

    explicit = True
    transposable = True

    def __init__(self, value, n: int, k: int, dtype: torch.dtype, device, name: str):
        self.n, self.k = n, k
        expected = (n, n**k)
        self.shape, self.dtype, self.device, self.label = expected, dtype, torch.device(device), name
        if isinstance(value, torch.Tensor) and value.layout != torch.strided:
            value = _torch_sparse_to_scipy(value, name)
        if sp.issparse(value):
            if np.iscomplexobj(value):
                raise TypeError(f"{name} must be real: got a complex sparse matrix ({value.dtype})")
            csr = sp.csr_matrix(value, dtype=np.float64, copy=True)   # a copy: later edits of value do not leak in
            if csr.shape != expected:
                raise ValueError(f"{name} must have shape {expected} (n, n**{k}); got {csr.shape}")
            if not np.all(np.isfinite(csr.data)):
                raise NonFiniteError(f"{name} contains non-finite entries (NaN or inf)")
            csr.eliminate_zeros()
            self._scipy = csr
            with warnings.catch_warnings():  # "sparse CSR support is in beta": we only use CSR @ dense
                warnings.simplefilter("ignore", UserWarning)
                self._torch = torch.sparse_csr_tensor(
                    torch.as_tensor(csr.indptr, dtype=torch.int64),
                    torch.as_tensor(csr.indices, dtype=torch.int64),
                    torch.as_tensor(csr.data, dtype=dtype),
                    size=expected, device=device, check_invariants=True)
            self.nnz = int(csr.nnz)
            self.row_nnz = np.diff(csr.indptr)
        else:
            dense = as_tensor(value, dtype, device, name, copy=True)
            if tuple(dense.shape) != expected:
                raise ValueError(f"{name} must have shape {expected} (n, n**{k}); got {tuple(dense.shape)}")
            _check_finite(dense, name)
            self._torch = dense
            self._scipy = None
            nz = dense != 0
            self.nnz = int(nz.sum())
            self.row_nnz = nz.sum(dim=1).cpu().numpy()

    def matmat(self, Y: torch.Tensor) -> torch.Tensor:
        """``Fk @ Y`` for ``Y`` of shape ``(n**k, m)``."""
        return self._torch @ Y

    def rmatmat(self, W: torch.Tensor) -> torch.Tensor:
        """``Fkᵀ @ W`` for ``W`` of shape ``(n, m)``."""
        return self._torch.t() @ W

    def to_scipy(self) -> sp.csr_matrix:
        """The coefficient as a scipy CSR matrix (float64)."""
        if self._scipy is None:
            self._scipy = sp.csr_matrix(self._torch.detach().cpu().numpy())
        return self._scipy

    scipy = to_scipy   # the name used before the operator protocol

    def power(self, u: torch.Tensor) -> torch.Tensor:
        """``Fk u^{⊗k}`` (forms the Kronecker power)."""
        return self.matmat(_kron_power(u, self.k)[:, None])[:, 0]

    def dense(self) -> torch.Tensor:
        """The coefficient as a dense torch tensor."""
        return self._torch.to_dense() if self._torch.layout != torch.strided else self._torch

    def norm(self) -> float:
        """Operator 2-norm ``||Fk||`` (largest singular value)."""
        if self.nnz == 0:
            return 0.0
        if self.n * self.n**self.k <= 4_000_000:
            return float(torch.linalg.matrix_norm(self.dense().double(), ord=2))
        from scipy.sparse.linalg import svds

        return float(svds(self.scipy(), k=1, return_singular_vectors=False)[0])


class MatrixFreeTerm(LinearOperator):
    """A coefficient ``Fk`` known only by its action (``explicit = False``).

    Args:
        n: The term maps ``(n**k, m)`` column blocks to ``(n, m)``.
        k: See ``n``.
        matmat: ``Y -> Fk @ Y`` on torch tensors.
        rmatmat: Optional ``W -> Fk.T @ W`` (then ``transposable = True``).
        symmetric: ``Fk = Fkᵀ`` (only meaningful for ``k == 1``: a Hessian).
        norm: ``||Fk||`` if known (used by the error bounds); otherwise :meth:`norm` estimates it by power iteration
            when ``rmatmat`` is given, or for ``k == 1`` when ``symmetric`` is true.
        power: Optional fast path ``u -> Fk u^{⊗k}`` (e.g. one third-order directional derivative) that avoids forming
            ``u^{⊗k}``.
        row_nnz: Optional non-zeros per row (for the sparsity bound of Theorem V.1); default: dense rows.
        dtype: Where ``matmat`` computes; default: those of the :class:`PolynomialODE` the term joins.
        device: See ``dtype``.
    """

    explicit = False

    def __init__(self, n: int, k: int, matmat: Callable[[torch.Tensor], torch.Tensor], *,
                 rmatmat: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 symmetric: bool = False, norm: Optional[float] = None,
                 power: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 row_nnz: Optional[np.ndarray] = None, dtype: Optional[torch.dtype] = None, device=None):
        n, k = check_int(n, "n", 1), check_int(k, "k", 1)
        if not callable(matmat):
            raise TypeError("matmat must be callable: Y (n**k, m) -> (n, m)")
        self.n, self.k = n, k
        self.shape, self.label = (n, n**k), f"the degree-{k} term"
        #: dtype/device given by the caller (else set by the PolynomialODE the term joins)
        self._placed = dtype is not None or device is not None
        self.dtype = torch.float64 if dtype is None else dtype
        self.device = torch.device("cpu" if device is None else device)
        self._matmat, self._rmatmat, self._power = matmat, rmatmat, power
        self.symmetric = symmetric and k == 1
        self.transposable = rmatmat is not None or self.symmetric
        self._norm = norm
        self.row_nnz = row_nnz
        self.nnz = None if row_nnz is None else int(np.sum(row_nnz))

    def matmat(self, Y: torch.Tensor) -> torch.Tensor:
        """``Fk @ Y`` by the user's callable; its output shape is checked.

        Args:
            Y: A ``(n**k, m)`` block of columns.

        Returns:
            ``Fk @ Y``, of shape ``(n, m)``.

        Raises:
            ValueError: The callable returned a shape other than ``(n, m)``.
        """
        out = self._matmat(Y)
        if tuple(out.shape) != (self.n, Y.shape[1]):
            raise ValueError(f"matmat of the degree-{self.k} term returned shape {tuple(out.shape)}, "
                             f"expected {(self.n, Y.shape[1])}")
        return out

    def rmatmat(self, W: torch.Tensor) -> torch.Tensor:
        """``Fkᵀ @ W`` (given ``rmatmat=``, or ``symmetric``).

        Args:
            W: A ``(n, m)`` block of columns.

        Returns:
            ``Fkᵀ @ W``, of shape ``(n**k, m)``.

        Raises:
            NotExplicitError: The term has neither ``rmatmat=`` nor ``symmetric`` (``transposable = False``).
        """
        if self._rmatmat is not None:
            return self._rmatmat(W)
        return super().rmatmat(W)

    def power(self, u: torch.Tensor) -> torch.Tensor:
        """``Fk u^{⊗k}``, by the ``power`` fast path when given.

        Args:
            u: The state, of shape ``(n,)``.

        Returns:
            ``Fk u^{⊗k}``, of shape ``(n,)``.
        """
        if self._power is not None:
            return self._power(u)
        return self.matmat(_kron_power(u, self.k)[:, None])[:, 0]

    def _not_explicit(self) -> NotExplicitError:
        return NotExplicitError(f"the degree-{self.k} term is matrix-free: it has no explicit matrix; "
                                "use the matrix-free CarlemanSystem.step/simulate instead")

    scipy = LinearOperator.to_scipy   # the name used before the operator protocol (raises here)

    def norm(self, iters: int = 50, seed: int = 0) -> float:
        """``||Fk||``: the given value, else power iteration on ``FkᵀFk`` (cached).

        Args:
            iters: Power-iteration steps.
            seed: Seed of the random start vector.

        Returns:
            The operator 2-norm (largest singular value), or its power-iteration estimate.

        Raises:
            ValueError: No ``norm=`` was given and the term has neither ``rmatmat=`` nor ``symmetric``.
        """
        if self._norm is not None:
            return float(self._norm)
        if self._rmatmat is None and not self.symmetric:
            raise ValueError(f"||F{self.k}|| of a matrix-free term needs norm= or rmatmat=")
        rmat = self._rmatmat if self._rmatmat is not None else self._matmat
        g = torch.Generator().manual_seed(seed)
        probe = self._matmat(torch.zeros(self.n**self.k, 1, dtype=torch.float64))
        x = torch.randn(self.n**self.k, 1, generator=g, dtype=probe.dtype).to(probe.device)
        x /= x.norm()
        sigma = 0.0
        for _ in range(iters):  # power iteration on Fk^T Fk
            y = self._matmat(x)
            sigma = float(y.norm())
            if sigma == 0.0:
                break
            x = rmat(y)
            x /= x.norm()
        self._norm = sigma
        return sigma


def _torch_sparse_to_scipy(value: torch.Tensor, name: str) -> sp.coo_matrix:
    """A 2-D torch sparse tensor (COO, CSR, CSC, BSR, BSC) as a float64 scipy COO matrix."""
    if value.is_complex():
        raise TypeError(f"{name} must be real: got a complex sparse tensor ({value.dtype})")
    if value.dim() != 2:
        raise ValueError(f"{name} must be 2-D; got a sparse tensor of shape {tuple(value.shape)}")
    coo = value.detach().cpu().to_sparse().coalesce()   # any sparse layout -> COO
    if coo.dense_dim() != 0:
        raise ValueError(f"{name}: a hybrid sparse tensor (dense_dim={coo.dense_dim()}) is not accepted; "
                         "pass a plain 2-D sparse or dense matrix")
    idx = coo.indices().numpy()
    return sp.coo_matrix((coo.values().to(torch.float64).numpy(), (idx[0], idx[1])), shape=tuple(coo.shape))


def _kron_power(u: torch.Tensor, k: int) -> torch.Tensor:
    """Row-major Kronecker power ``u^{⊗k}`` (length ``n**k``); ``u^{⊗0} = [1]``."""
    out = torch.ones(1, dtype=u.dtype, device=u.device)
    for _ in range(k):
        out = torch.outer(out, u).reshape(-1)
    return out


# -------------------------------------------------------------------------------------------- ODE
class PolynomialODE:
    """``u(t+1) = u(t) + F0(t) + Σ_{k=1}^q Fk u^{⊗k}`` (Eq. II.1, V.5).

    Args:
        coefficients: ``[F0, F1, …, Fq]`` with ``q ≥ 1``.  ``F0``: ``(n,)`` array, callable ``t -> (n,)`` or ``None``
            (zero).  ``Fk`` (k ≥ 1): ``(n, n**k)`` numpy / torch / scipy.sparse array, a :class:`MatrixFreeTerm`, or
            ``None`` (zero).  The top-degree term may not be ``None``. Arrays are copied (later in-place edits do not
            reach the ODE); torch sparse tensors are converted to scipy.sparse; complex input raises ``TypeError``.
        dtype: Where the math runs (float64 on the CPU by default); ``dtype`` must be a real floating dtype.
        device: See ``dtype``.

    Raises:
        TypeError: ``coefficients`` is not a list, a coefficient is complex or of an unknown type, or
            ``dtype`` is not a torch dtype.
        ValueError: Fewer than two coefficients, a ``None`` top-degree term, shapes that disagree with
            ``n``, or a non-floating ``dtype``.
        NonFiniteError: A coefficient holds NaN or ±inf.

    Example:
        >>> import numpy as np
        >>> ode = PolynomialODE([np.zeros(1), -0.5 * np.eye(1), np.array([[0.25]])])   # u + (-u/2 + u²/4)
        >>> ode
        PolynomialODE(n=1, degree=2, F0=constant, terms=['explicit', 'explicit'])
        >>> ode.f(np.array([1.0]))                  # -1/2 + 1/4
        array([-0.25])
        >>> ode.iterate(np.array([1.0]), 2).ravel()      # u(0), u(1), u(2), like the input (numpy)
        array([1.      , 0.75    , 0.515625])
    """

    def __init__(self, coefficients: Sequence, *, dtype: torch.dtype = torch.float64, device=None):
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch dtype (e.g. torch.float64), got {dtype!r}")
        if not dtype.is_floating_point:   # False for integer, bool and complex dtypes
            raise ValueError(f"dtype must be a real floating torch dtype (torch.float64, torch.float32, ...), "
                             f"got {dtype}")
        if isinstance(coefficients, (np.ndarray, torch.Tensor)) or not isinstance(coefficients, Sequence):
            raise TypeError("coefficients must be a list [F0, F1, ..., Fq]")
        coefficients = list(coefficients)
        if len(coefficients) < 2:
            raise ValueError("coefficients must hold at least [F0, F1]: a degree q = 0 ODE "
                             f"(only F0) has nothing to linearise; got {len(coefficients)} entries")
        if coefficients[-1] is None:
            raise ValueError(f"the top-degree coefficient F{len(coefficients) - 1} may not be None")
        if device is None:
            device = next((c.device for c in coefficients if isinstance(c, torch.Tensor)), torch.device("cpu"))
        self.dtype, self.device = dtype, torch.device(device)
        self.n = self._infer_n(coefficients)
        self.degree = len(coefficients) - 1
        self.terms: list = [None]
        for k, c in enumerate(coefficients[1:], start=1):
            name = f"F{k}"
            if c is None:
                self.terms.append(None)
            elif isinstance(c, MatrixFreeTerm):
                if (c.n, c.k) != (self.n, k):
                    raise ValueError(f"{name} is a matrix-free term for (n, k) = {(c.n, c.k)}, "
                                     f"expected {(self.n, k)}")
                if not c._placed:
                    c.dtype, c.device = dtype, self.device
                self.terms.append(c)
            else:
                self.terms.append(ExplicitTerm(c, self.n, k, dtype, self.device, name))
        self._F0 = coefficients[0]
        self.time_dependent = callable(self._F0)
        if not self.time_dependent:
            self._F0_const = self._coerce_F0(self._F0, "F0", copy=True)
        #: True when F0 is identically zero (then no k = 0 Carleman terms are formed)
        self.F0_is_zero = not self.time_dependent and not bool(self._F0_const.any())

    # -- construction helpers
    @staticmethod
    def _infer_n(coefficients) -> int:
        for k, c in enumerate(coefficients[1:], start=1):
            if c is None:
                continue
            if isinstance(c, MatrixFreeTerm):
                return c.n
            shape = c.shape if hasattr(c, "shape") else np.shape(c)
            if len(shape) != 2:
                raise ValueError(f"F{k} must be 2-D of shape (n, n**{k}); got shape {tuple(shape)}")
            return int(shape[0])
        c0 = coefficients[0]
        if c0 is not None and not callable(c0):
            return int(np.shape(c0)[0])
        raise ValueError("cannot infer n: all of F1..Fq are None and F0 is not an array")

    def _coerce_F0(self, value, name: str, copy: bool = False, check: bool = True) -> torch.Tensor:
        if value is None:
            return torch.zeros(self.n, dtype=self.dtype, device=self.device)
        v = as_tensor(value, self.dtype, self.device, name, copy=copy)
        if tuple(v.shape) != (self.n,):
            raise ValueError(f"{name} must have shape ({self.n},); got {tuple(v.shape)}")
        if check:
            _check_finite(v, name)
        return v

    # -- the ODE
    @property
    def explicit(self) -> bool:
        """True when every Fk (k ≥ 1) is an explicit array."""
        return all(t is None or t.explicit for t in self.terms[1:])

    def F0(self, t: int = 0, *, check: bool = True) -> torch.Tensor:
        """The constant term at step ``t`` as a torch tensor ``(n,)``.

        Args:
            t: The step (only read when F0 is a callable).
            check: ``False`` skips the finiteness test of a time-dependent F0 (for a caller that tests
                what it computes from it).

        Returns:
            ``F0(t)``, of shape ``(n,)`` (zeros when F0 is ``None``).

        Raises:
            ValueError: A callable F0 returned a shape other than ``(n,)``.
            NonFiniteError: It returned NaN or ±inf (with ``check=True``).
        """
        if self.time_dependent:
            return self._coerce_F0(self._F0(t), f"F0({t})", check=check)
        return self._F0_const

    def term(self, k: int):
        """The degree-``k`` term.

        Args:
            k: The degree, ``1 ≤ k ≤ degree``.

        Returns:
            The term ``Fk`` (an :class:`ExplicitTerm` or :class:`MatrixFreeTerm`), or ``None`` when zero.

        Raises:
            ValueError: ``k`` is outside ``1..degree``.
        """
        if not 1 <= k <= self.degree:
            raise ValueError(f"k must be in 1..{self.degree}, got {k}")
        return self.terms[k]

    def f(self, u, t: int = 0):
        """``f(u, t) = F0(t) + Σ_k Fk u^{⊗k}`` (arrays in, arrays out).

        Args:
            u: The state, of shape ``(n,)``.
            t: The step (for a time-dependent F0).

        Returns:
            ``f(u, t)``, of shape ``(n,)``: numpy when ``u`` is not a torch tensor.
        """
        x = self._vec(u, "u")
        out = self.F0(t).clone()
        for k in range(1, self.degree + 1):
            term = self.terms[k]
            if term is None:
                continue
            out += term.power(x)
        return like(out, u)

    def iterate(self, u0, T: int):
        """The exact nonlinear trajectory ``u(0..T)`` of the map ``u ↦ u + f(u, t)``.

        Args:
            u0: The initial state, of shape ``(n,)``.
            T: The number of steps, ``T ≥ 0``.

        Returns:
            The trajectory, of shape ``(T+1, n)``: numpy when ``u0`` is not a torch tensor.
        """
        T = _check_T(T)
        u = self._vec(u0, "u0")
        traj = torch.empty(T + 1, self.n, dtype=self.dtype, device=self.device)
        traj[0] = u
        for t in range(T):
            u = u + self.f(u, t)
            traj[t + 1] = u
        return like(traj, u0)

    def norms(self) -> list[float]:
        """Operator 2-norms ``[||F0||, ||F1||, …, ||Fq||]`` used by the error bounds (Eq. II.69–II.76).

        For a time-dependent F0 the norm at t = 0 is reported.

        Returns:
            ``[||F0||, ||F1||, …, ||Fq||]``, with 0.0 for a ``None`` term.
        """
        out = [float(self.F0(0).norm())]
        for term in self.terms[1:]:
            out.append(0.0 if term is None else term.norm())
        return out

    def _vec(self, u, name: str) -> torch.Tensor:
        x = as_tensor(u, self.dtype, self.device, name)
        if tuple(x.shape) != (self.n,):
            raise ValueError(f"{name} must have shape ({self.n},); got {tuple(x.shape)}")
        return x

    def __repr__(self) -> str:
        kinds = ["explicit" if t is not None and t.explicit else ("0" if t is None else "matrix-free")
                 for t in self.terms[1:]]
        f0 = 'callable' if self.time_dependent else 'constant'
        return f"PolynomialODE(n={self.n}, degree={self.degree}, F0={f0}, terms={kinds})"


def _check_T(T) -> int:
    return check_int(T, "T", 0, hint=" (a non-negative number of steps)")
