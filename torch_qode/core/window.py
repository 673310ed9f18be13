"""The window's linear system ``M X = B`` (Sec. II C, Eq. II.101–II.106).

Stacking ``X = (y(0), …, y(T))`` turns ``T`` Carleman steps into one linear system (Eq. II.102)::

    [ I                    ] [ y(0) ]   [ y_in   ]
    [ −(I+A(0))  I         ] [ y(1) ] = [ b(0)   ]
    [        …      …      ] [  …   ]   [  …     ]
    [         −(I+A(T−1)) I] [ y(T) ]   [ b(T−1) ]

whose exact solution is the forward recurrence.  ``κ(M) ≤ 2(T+1)`` when ``||I + A|| ≤ 1``
(Eq. II.106).  ``M`` is either an explicit scipy CSR matrix or a :class:`WindowOperator`, a
torch-native :class:`~torch_qode.core.operator.LinearOperator` that applies the matrix-free
Carleman step on the system's device (no numpy round trip per product).  The solvers that use it
are in :mod:`torch_qode.core.solvers`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from .carleman import CarlemanSystem, CarlemanTooLarge
from .carleman.budget import budget as _carleman_budget, gib as _gib
from .ode import _check_T, as_tensor
from .._lazy import lazy_module
from .operator import LinearOperator, NotExplicitError

if TYPE_CHECKING:  # scipy.sparse, scipy.sparse.linalg and scipy.linalg load on first use (issue 19)
    import scipy.sparse as sp
    import scipy.sparse.linalg as spla
else:
    sp = lazy_module("scipy.sparse")

__all__ = ["window_system", "WindowOperator", "WindowSolution", "kappa_bound", "condition_number", "DENSE_LIMIT"]

DENSE_LIMIT = 3000  # (T+1)Δ up to which κ and the filtered solve use a dense SVD


def kappa_bound(T: int) -> int:
    """``κ(M) ≤ 2(T+1)`` of Eq. (II.106), valid when ``||I + A|| ≤ 1``.

    Args:
        T: The window length in steps (an integer ≥ 0).

    Returns:
        The bound ``2(T+1)``.

    Raises:
        ValueError: ``T`` is not an integer ≥ 0.

    Example:
        >>> kappa_bound(10)
        22
    """
    return 2 * (_check_T(T) + 1)


def check_system(system) -> CarlemanSystem:
    if not isinstance(system, CarlemanSystem):
        raise TypeError(f"system must be a CarlemanSystem (from carleman()), got {type(system).__name__}")
    return system


class WindowOperator(LinearOperator):
    """``M`` of Eq. (II.102), matrix-free: ``(MX)_0 = X_0``, ``(MX)_{t+1} = X_{t+1} − (I + A(t)) X_t``.

    Products run in torch on the system's device and dtype; the result comes back on the input's
    device and dtype.  With a constant ``F0`` (``A(t) = A``) the ``T`` slices go through one batched
    Carleman step.  ``to_scipy()`` is refused (``explicit = False``); ``scipy_operator()`` adapts it for
    scipy's iterative solvers.
    """

    explicit = False

    def __init__(self, system: CarlemanSystem, T: int):
        self.system, self.T = check_system(system), _check_T(T)
        N = (self.T + 1) * system.dim
        self.shape = (N, N)
        self.dtype, self.device = system.ode.dtype, system.ode.device
        self.label = f"the window matrix M of Eq. (II.102) (T={self.T}, Δ={system.dim:,})"

    def matmat(self, Y: torch.Tensor) -> torch.Tensor:
        if Y.dim() != 2 or Y.shape[0] != self.shape[1]:
            raise ValueError(f"Y must have shape ({self.shape[1]}, m); got {tuple(Y.shape)}")
        sys_, T, D, m = self.system, self.T, self.system.dim, Y.shape[1]
        X = Y.to(dtype=self.dtype, device=self.device).reshape(T + 1, D, m)
        out = X.clone()
        if T and not sys_.ode.time_dependent:        # A(t) = A: one batched step for all slices
            Z = X[:T].permute(1, 0, 2).reshape(D, T * m)
            out[1:] -= sys_.apply(Z, 0).reshape(D, T, m).permute(1, 0, 2)
        else:
            for t in range(T):
                out[t + 1] -= sys_.apply(X[t], t)
        return out.reshape(-1, m).to(dtype=Y.dtype, device=Y.device)


def window_system(system: CarlemanSystem, u0, T: int, *, explicit: Optional[bool] = None,
                  max_bytes: Optional[int] = None):
    """``(M, B)`` of Eq. (II.102) for a window of ``T`` steps starting from ``y_in = lift(u0)``.

    ``M`` is a scipy CSR matrix when ``explicit`` (default: when ``A`` is explicit and fits in
    ``max_bytes``), otherwise a :class:`WindowOperator` applying the matrix-free step (``M @ x``
    takes numpy or torch).  ``B`` is a float64 numpy vector of length ``(T+1)Δ``.  ``max_bytes``
    defaults to the system's budget; what does not fit is refused (:class:`CarlemanTooLarge`)
    before ``B`` or ``M`` is allocated.

    Args:
        system: The :class:`~torch_qode.core.carleman.CarlemanSystem`.
        u0: The initial state ``u(0)``, shape ``(n,)``.
        T: The number of steps (an integer ≥ 0).
        explicit: Build ``M`` as a scipy matrix (``True``), as a :class:`WindowOperator` (``False``) or
            whichever fits (``None``).
        max_bytes: The memory budget described above.

    Returns:
        The pair ``(M, B)``, ``M`` of shape ``((T+1)Δ, (T+1)Δ)`` and ``B`` of length ``(T+1)Δ``.

    Raises:
        ValueError: A bad ``T`` or ``u0``.
        CarlemanTooLarge: ``M`` or ``B`` does not fit in ``max_bytes``.
    """
    system = check_system(system)
    T = _check_T(T)
    D = system.dim
    budget = window_budget(max_bytes, system)
    if explicit is None:
        explicit = system.ode.explicit and fits(system, T, max_bytes)
    if explicit and not fits(system, T, max_bytes):
        raise CarlemanTooLarge(f"M and B for T={T}, Δ={D:,} need about {_gib(bytes_needed(system, T))} > "
                               f"max_bytes={_gib(budget)}; use window_system(..., explicit=False) or "
                               f"solve_window(method='forward')")
    if B_bytes(system, T) > budget:
        raise CarlemanTooLarge(f"B of Eq. (II.102) for T={T}, Δ={D:,} holds (T+1)Δ = {(T + 1) * D:,} numbers, "
                               f"{_gib(B_bytes(system, T))} > max_bytes={_gib(budget)}; use a shorter window T "
                               f"or the matrix-free CarlemanSystem.step/simulate")
    y_in = as_tensor(system.lift(u0), torch.float64, "cpu").numpy()
    B = np.concatenate([y_in] + [system.offset(t) for t in range(T)])
    if not explicit:
        return WindowOperator(system, T), B
    I_D = sp.identity(D, format="csr")
    if system.ode.time_dependent:
        rows = [[None] * (T + 1) for _ in range(T + 1)]
        for t in range(T + 1):
            rows[t][t] = I_D
            if t < T:
                rows[t + 1][t] = -(I_D + system.matrix(t, max_bytes=max_bytes))
        M = sp.bmat(rows, format="csr")
    else:
        shift = sp.eye(T + 1, k=-1, format="csr")
        M = (sp.identity((T + 1) * D, format="csr")
             - sp.kron(shift, I_D + system.matrix(0, max_bytes=max_bytes), format="csr")).tocsr()
    return M, B


# ------------------------------------------------------------------------------------ budgets
def window_budget(max_bytes, system: CarlemanSystem) -> int:
    """``max_bytes`` (validated), else the system's own budget, else half the available memory."""
    return _carleman_budget(max_bytes, system.max_bytes)


def B_bytes(system: CarlemanSystem, T: int) -> int:
    """Bytes of the float64 right-hand side ``B`` (length ``(T+1)Δ``)."""
    return 8 * (T + 1) * system.dim


def bytes_needed(system: CarlemanSystem, T: int) -> float:
    """Peak bytes of building the explicit ``M`` (its non-zeros are bounded by ``nnz_bound``) and ``B``."""
    return 40 * (T * system.nnz_bound() + (T + 1) * system.dim) + B_bytes(system, T)


def fits(system: CarlemanSystem, T: int, max_bytes) -> bool:
    return bytes_needed(system, T) <= window_budget(max_bytes, system)


# ------------------------------------------------------------------------------ scipy helpers
def triangular_solvers(M):
    """``M⁻¹ x`` and ``M⁻ᵀ y`` by sparse triangular substitution.

    ``M`` of Eq. (II.102) is unit lower triangular (identity blocks on the diagonal, ``−(I + A)``
    strictly below), so no factorisation — and no fill-in — is ever needed.
    """
    import scipy.sparse.linalg as spla

    L = sp.csr_matrix(M)
    U = sp.csr_matrix(L.T)

    def solve(x):
        return spla.spsolve_triangular(L, np.asarray(x, dtype=np.float64), lower=True, unit_diagonal=True)

    def solve_T(y):
        return spla.spsolve_triangular(U, np.asarray(y, dtype=np.float64), lower=False, unit_diagonal=True)

    return solve, solve_T


def inverse_normal_operator(M) -> spla.LinearOperator:
    """``(MᵀM)⁻¹`` as a scipy LinearOperator (two triangular solves per product)."""
    import scipy.sparse.linalg as spla

    solve, solve_T = triangular_solvers(M)
    N = M.shape[0]
    return spla.LinearOperator((N, N), dtype=np.float64, matvec=lambda x: solve(solve_T(x)))


def condition_number(M, *, dense_limit: int = DENSE_LIMIT) -> tuple[float, bool]:
    """``(κ(M), exact)``: exact from a dense SVD when small, else an ARPACK estimate.

    The estimate takes ``σ_max`` from ``svds`` and ``σ_min`` from Lanczos on ``(MᵀM)⁻¹``, applied by
    two sparse triangular solves (``M`` is unit lower triangular).
    """
    import scipy.linalg
    import scipy.sparse.linalg as spla

    if isinstance(M, LinearOperator):
        if not M.explicit:
            raise NotExplicitError("condition_number needs an explicit M (scipy.sparse); a matrix-free "
                                   "operator has no transpose here")
        M = M.to_scipy()
    elif isinstance(M, spla.LinearOperator) and not sp.issparse(M):
        raise TypeError("condition_number needs an explicit M (scipy.sparse); a matrix-free operator "
                        "has no transpose here")
    if M.shape[0] <= dense_limit:
        s = scipy.linalg.svdvals(M.toarray() if sp.issparse(M) else np.asarray(M))
        return float(s[0] / s[-1]) if s[-1] > 0 else float("inf"), True
    smax, smin = _sigma_extremes(sp.csc_matrix(M))
    return smax / smin, False


def _sigma_extremes(M: sp.csc_matrix) -> tuple[float, float]:
    import scipy.sparse.linalg as spla

    smax = float(spla.svds(M, k=1, return_singular_vectors=False, random_state=0)[0])
    # largest eigenvalue of (MᵀM)^{-1} = 1/σ_min²
    lam = spla.eigsh(inverse_normal_operator(M), k=1, which="LM", return_eigenvectors=False,
                     v0=np.ones(M.shape[0]))[0]
    return smax, float(1.0 / np.sqrt(lam))


# ------------------------------------------------------------------------------------ solution
@dataclass
class WindowSolution:
    """The solved window: ``X`` is ``(T+1, Δ)``; the level-1 trajectory is ``X[:, :n]``."""

    X: object
    method: str
    n: int
    kappa: Optional[float] = None        # κ(M) (exact when kappa_exact)
    kappa_exact: bool = False
    fidelity: float = 1.0               # Eq. (II.110) of the returned vs the full solution
    kappa_a: Optional[float] = None
    dropped: int = 0                    # singular values filtered out (σ < σ_max/κ_a)
    well_probability: float = 1.0       # post-selecting |well⟩ in Eq. (II.109)
    notes: list = field(default_factory=list)

    @property
    def trajectory(self):
        """Level-1 trajectory ``u(0..T)``: ``(T+1, n)``."""
        return self.X[:, : self.n]

    @property
    def final(self):
        """``u(T)``, the level-1 block at the last time slice (what tomography reads)."""
        return self.X[-1, : self.n]

    def as_dict(self) -> dict:
        return {"method": self.method, "kappa": self.kappa, "kappa_exact": self.kappa_exact,
                "fidelity": self.fidelity, "kappa_a": self.kappa_a, "dropped": self.dropped,
                "well_probability": self.well_probability, "notes": list(self.notes)}


def out_like(x: np.ndarray, ref):
    """``x`` as a torch tensor when ``ref`` is one (arrays in, arrays out)."""
    return torch.as_tensor(x) if isinstance(ref, torch.Tensor) else x
