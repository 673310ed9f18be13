"""``"direct"``: scipy's sparse triangular solve of the explicit ``M`` (Theorem II.3's cost)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional


from ..carleman import CarlemanSystem
from ..window import DENSE_LIMIT, WindowSolution, condition_number, out_like, triangular_solvers, window_system
from .base import WindowSolver
from .forward import qlsa_gates
from ..._lazy import lazy_module

if TYPE_CHECKING:  # scipy.sparse loads on first use (issue 19)
    import scipy.sparse as sp
else:
    sp = lazy_module("scipy.sparse")

__all__ = ["DirectSolver"]


class DirectSolver(WindowSolver):
    """``M`` is unit lower triangular: substitution is the exact direct solve (no factorisation, no fill-in)."""

    name = "direct"
    needs_explicit = True

    def solve(self, system: CarlemanSystem, u0, T: int, *, kappa: Optional[str] = "auto",
              dense_limit: int = DENSE_LIMIT, max_bytes: Optional[int] = None) -> WindowSolution:
        M, B = window_system(system, u0, T, explicit=True, max_bytes=max_bytes)
        M = sp.csc_matrix(M)
        x = triangular_solvers(M)[0](B)
        sol = WindowSolution(X=out_like(x.reshape(T + 1, system.dim), u0), method=self.name, n=system.n)
        if kappa == "auto":
            sol.kappa, sol.kappa_exact = condition_number(M, dense_limit=dense_limit)
        return sol

    def gates(self, *, s_M: float, kappa: float, N_b: int, eps: float) -> float:
        return qlsa_gates(s_M, kappa, N_b, eps)
