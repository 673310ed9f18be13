"""``"forward"``: the forward recurrence, exact and matrix-free; costed as the QLSA of Theorem II.3."""
from __future__ import annotations

from typing import Optional

import torch

from ..carleman import CarlemanSystem
from ..carleman.budget import refuse_over_budget
from ..ode import as_tensor, like
from ..window import DENSE_LIMIT, WindowSolution, condition_number, fits, window_budget, window_system
from .base import WindowSolver, polylog

__all__ = ["ForwardSolver", "qlsa_gates"]


def qlsa_gates(s_M: float, kappa: float, N_b: int, eps: float) -> float:
    """``s_M κ log2(N_b/ε)``: Theorem II.3, Eq. (II.100)."""
    return s_M * kappa * polylog(N_b, eps)


class ForwardSolver(WindowSolver):
    """``X`` by ``y(t+1) = (I + A(t)) y(t) + b(t)``: what an exact QLSA (Theorem II.3) returns."""

    name = "forward"
    replaces_forward = False   # the recurrence is its own solution: training reads the state's u(T)

    def solve(self, system: CarlemanSystem, u0, T: int, *, kappa: Optional[str] = "auto",
              dense_limit: int = DENSE_LIMIT, max_bytes: Optional[int] = None) -> WindowSolution:
        budget = window_budget(max_bytes, system)
        refuse_over_budget((T + 1) * system.dim * (torch.finfo(system.ode.dtype).bits // 8), budget,
                           f"the forward solve keeps X = (y(0), …, y(T)), (T+1)Δ = {T + 1:,}×{system.dim:,} "
                           "numbers: it", "use a shorter window T, CarlemanSystem.simulate (keeps only the "
                           "(T+1)×n level-1 trajectory) or step with CarlemanSystem.step")
        X = forward(system, u0, T)
        sol = WindowSolution(X=like(X, u0), method=self.name, n=system.n)
        if kappa == "auto" and system.ode.explicit and fits(system, T, max_bytes):
            M, _ = window_system(system, u0, T, explicit=True, max_bytes=max_bytes)
            sol.kappa, sol.kappa_exact = condition_number(M, dense_limit=dense_limit)
        elif kappa == "auto":
            sol.notes.append("kappa not computed: M is matrix-free or too large to build")
        return sol

    def gates(self, *, s_M: float, kappa: float, N_b: int, eps: float) -> float:
        return qlsa_gates(s_M, kappa, N_b, eps)


def forward(system: CarlemanSystem, u0, T: int) -> torch.Tensor:
    """The ``(T+1, Δ)`` stacked states of the forward recurrence from ``lift(u0)``."""
    y = as_tensor(system.lift(as_tensor(u0, system.ode.dtype, system.ode.device, "u0")),
                  system.ode.dtype, system.ode.device)
    X = torch.empty(T + 1, system.dim, dtype=y.dtype, device=y.device)
    X[0] = y
    for t in range(T):
        y = system.apply(y[:, None], t, offset=True)[:, 0]
        X[t + 1] = y
    return X
