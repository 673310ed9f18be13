"""The abstract window solver: solves ``M X = B`` (Eq. II.102) and states its own gate cost."""
from __future__ import annotations

import math
from typing import ClassVar, Optional

from ..carleman import CarlemanSystem
from ..window import DENSE_LIMIT, WindowSolution

__all__ = ["WindowSolver"]


class WindowSolver:
    """A window solver (one per module; registered by name in ``SOLVERS``).

    A solver object carries its options (e.g. ``kappa_a`` of the filtered solver) and its cost
    formula for the resource ledger; :meth:`solve` does the classical simulation.

    Attributes:
        name: The registry name (``solve_window(method=name)``, ``QODE(solver=name)``).
        option_names: The options its constructor takes (``solver_options`` keys).
        needs_explicit: Whether :meth:`solve` needs the explicit ``M`` (hence explicit Taylor terms).
        filtering: Whether it post-selects a ``|well>`` flag (Eq. II.109): the ledger then counts that ancilla and
            ``P(|well>)``.
        replaces_forward: Whether its solution ``u(T)`` replaces the forward recurrence's in training (``False``: the
            solve is reported, e.g. κ and its difference from the recurrence, and the recurrence's ``u(T)`` is read
            out).
    """

    name: ClassVar[str] = ""
    option_names: ClassVar[tuple] = ()
    needs_explicit: ClassVar[bool] = False
    filtering: ClassVar[bool] = False
    replaces_forward: ClassVar[bool] = True

    def __init__(self, *, argname: str = "solver"):
        #: the argument the solver was chosen by (for messages: "solver", "method")
        self.argname = argname

    @property
    def options(self) -> dict:
        """The solver's options, ``{name: value}`` (what ``make_solver`` would be given back)."""
        return {k: getattr(self, k) for k in self.option_names}

    @property
    def kappa_a(self) -> Optional[float]:
        """The effective condition number of a filtering solver (Theorem II.4), else ``None``."""
        return None

    def solve(self, system: CarlemanSystem, u0, T: int, *, kappa: Optional[str] = "auto",
              dense_limit: int = DENSE_LIMIT, max_bytes: Optional[int] = None) -> WindowSolution:
        """Solve the ``T``-step window from ``u0`` (``system``/``T`` already validated)."""
        raise NotImplementedError   # pragma: no cover - abstract

    def gates(self, *, s_M: float, kappa: float, N_b: int, eps: float) -> float:
        """Gate count of one solve (constants = 1; ``polylog = log2(N_b/ε)``)."""
        raise NotImplementedError   # pragma: no cover - abstract

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts})"

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.options == self.options

    __hash__ = None


def polylog(N_b: int, eps: float) -> float:
    """``log2(N_b/ε)``: the polylog factor of Theorems II.3/II.4, to the first power."""
    return math.log2(N_b / eps)
