"""``"filtered"``: the truncated solver of Theorem II.4 (Eq. II.107–II.118).

It keeps the well-conditioned part of ``M`` (Eq. II.109): here the singular values
``σ ≥ σ_max/κ_a`` (``M`` normalised to ``||M|| = 1`` as in the theorem), by a truncated-SVD
pseudo-inverse — a dense SVD up to ``dense_limit`` unknowns, shift-invert Lanczos on the small
singular values beyond.  Gate cost ``O(s² κ_a² polylog)`` (Eq. II.118).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np

from ..._checks import check_real
from ..._lazy import lazy_module
from ..carleman import CarlemanSystem
from ..carleman.budget import refuse_over_budget
from ..window import (DENSE_LIMIT, WindowSolution, inverse_normal_operator, out_like, triangular_solvers,
                      window_budget, window_system)
from .base import WindowSolver, polylog

if TYPE_CHECKING:  # scipy.sparse loads on first use (issue 19)
    import scipy.sparse as sp
else:
    sp = lazy_module("scipy.sparse")

__all__ = ["FilteredSolver", "filtered_gates", "filtered_fidelity"]


def filtered_gates(s_M: float, kappa_a: float, N_b: int, eps: float) -> float:
    """``s_M² κ_a² log2(N_b/ε)``: Theorem II.4, Eq. (II.118)."""
    return s_M**2 * kappa_a**2 * polylog(N_b, eps)


class FilteredSolver(WindowSolver):
    """Keep the singular values ``σ ≥ σ_max/κ_a`` of ``M``; option ``kappa_a`` (a finite number ≥ 1)."""

    name = "filtered"
    option_names = ("kappa_a",)
    needs_explicit = True
    filtering = True

    def __init__(self, kappa_a: Optional[float] = None, *, argname: str = "solver"):
        super().__init__(argname=argname)
        self._kappa_a = check_real(kappa_a, "kappa_a", 1.0, hint=f" with {argname}='filtered'")

    @property
    def kappa_a(self) -> float:
        return self._kappa_a

    def solve(self, system: CarlemanSystem, u0, T: int, *, kappa: Optional[str] = "auto",
              dense_limit: int = DENSE_LIMIT, max_bytes: Optional[int] = None) -> WindowSolution:
        budget = window_budget(max_bytes, system)
        M, B = window_system(system, u0, T, explicit=True, max_bytes=max_bytes)
        M = sp.csc_matrix(M)
        kappa_a, notes = self._kappa_a, []
        res = _filtered_sparse(M, B, kappa_a) if M.shape[0] > dense_limit else None
        if res is None:
            if M.shape[0] > dense_limit:
                notes.append(f"filtered: more singular values lie below σ_max/κ_a than Lanczos can return "
                             f"(k ≤ {M.shape[0]} − 2); solved by the dense SVD instead")
            refuse_over_budget(_dense_svd_bytes(M.shape[0]), budget,
                               f"the dense filtered solve of a {M.shape[0]:,}-unknown M",
                               "raise kappa_a (fewer singular values dropped) or use method='direct'")
            res = _filtered_dense(M, B, kappa_a)
        x, s_kept, s_all, d_ill, kap, dropped, exact = res
        fid, p_well = filtered_fidelity(s_kept, s_all, d_ill)
        return WindowSolution(X=out_like(x.reshape(T + 1, system.dim), u0), method=self.name, n=system.n,
                              kappa=kap, kappa_exact=exact, fidelity=fid, kappa_a=kappa_a, dropped=dropped,
                              well_probability=p_well, notes=notes)

    def gates(self, *, s_M: float, kappa: float, N_b: int, eps: float) -> float:
        return filtered_gates(s_M, self._kappa_a, N_b, eps)


def _dense_svd_bytes(N: int) -> int:
    """Peak bytes of the dense filtered solve: the dense ``M``, ``U``, ``Vᵀ`` and LAPACK's workspace."""
    return 4 * 8 * N * N


def _filtered_dense(M, B: np.ndarray, kappa_a: float):
    """Filtered solve from the full dense SVD of ``M`` (exact)."""
    import scipy.linalg  # on first use, like every heavy scipy submodule (issue 19)

    U, s, Vt = scipy.linalg.svd(M.toarray())
    beta = U.T @ B
    keep = s >= s[0] / kappa_a
    coef = beta / s
    x = Vt[keep].T @ coef[keep]
    s_kept, s_all = float(np.sum(coef[keep] ** 2)), float(np.sum(coef ** 2))
    d_ill = float(np.sum(beta[~keep] ** 2))
    return x, s_kept, s_all, d_ill, float(s[0] / s[-1]), int((~keep).sum()), True


def filtered_fidelity(s_kept: float, s_all: float, d_ill: float) -> tuple[float, float]:
    """Eq. (II.110) and the ``|well⟩`` post-selection probability.

    With ``β_j = u_jᵀ B``: ``s_kept = Σ_{σ_j ≥ σ_max/κ_a} |β_j/σ_j|²``, ``s_all`` the same sum over
    all ``j`` (``= ||M⁻¹B||²``) and ``d_ill = Σ_{σ_j < σ_max/κ_a} |β_j|²``;
    ``⟨x|x̃⟩ = s_kept / sqrt(s_all · (s_kept + d_ill))`` and ``P(well) = s_kept / (s_kept + d_ill)``.
    """
    if s_all <= 0:
        return 1.0, 1.0
    denom = s_kept + d_ill
    if denom <= 0:
        return 0.0, 0.0
    return float(s_kept / np.sqrt(s_all * denom)), float(s_kept / denom)


def _filtered_sparse(M: sp.csc_matrix, B: np.ndarray, kappa_a: float, max_k: int = 512):
    """Filtered solve for large ``M``: remove the singular triplets with ``σ < σ_max/κ_a``.

    ``x_f = x − Σ_dropped (β_j/σ_j) v_j`` with ``x = M⁻¹B``; the dropped triplets come from
    shift-invert Lanczos on ``MᵀM`` (eigenvalues ``σ²``), enlarging ``k`` until one kept value is seen.
    Returns ``None`` when ``k`` reaches its cap ``N − 2`` without a kept value (the two values
    Lanczos cannot return might be dropped too): the caller then uses the dense SVD.
    """
    import scipy.sparse.linalg as spla

    N = M.shape[0]
    if N < 4:   # eigsh needs 1 ≤ k ≤ N − 2
        return None
    x = triangular_solvers(M)[0](B)
    smax = float(spla.svds(M, k=1, return_singular_vectors=False, random_state=0)[0])
    thr = smax / kappa_a
    inv = inverse_normal_operator(M)
    k = 8
    while True:
        k = min(k, N - 2)
        lam, V = spla.eigsh(inv, k=k, which="LM", v0=np.ones(N))
        sig = 1.0 / np.sqrt(lam)
        if sig.max() >= thr:
            break
        if k >= N - 2:
            return None
        if k >= max_k:
            raise ValueError(f"more than {max_k} singular values of M lie below σ_max/κ_a = {thr:.3g}: "
                             "raise kappa_a or use a smaller system for the dense filtered solve")
        k *= 2
    drop = sig < thr
    sig_d, V_d = sig[drop], V[:, drop]
    U_d = (M @ V_d) / sig_d
    beta_d = U_d.T @ B
    coef_d = beta_d / sig_d
    x_f = x - V_d @ coef_d
    s_all = float(x @ x)
    s_kept = s_all - float(np.sum(coef_d ** 2))
    return x_f, s_kept, s_all, float(np.sum(beta_d ** 2)), smax / float(sig.min()), int(drop.sum()), False
