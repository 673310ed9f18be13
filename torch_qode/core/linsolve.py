"""Solve the window's linear system ``M X = B`` (Sec. II C, Eq. II.101–II.118).

:func:`solve_window` is the entry point; the system ``M`` lives in :mod:`torch_qode.core.window`
and each solver in :mod:`torch_qode.core.solvers` (registry ``SOLVERS``).  A quantum linear solver
returns ``|X⟩`` with gate cost ``O(s κ polylog)`` (Theorem II.3); the truncated solver of
Theorem II.4 costs ``O(s² κ_a² polylog)``.  The names below stay importable from here.
"""
from __future__ import annotations

from typing import Mapping, Optional, Union

from .._checks import check_choice
from .carleman import CarlemanSystem
from .ode import _check_T
from .solvers import SOLVERS, WindowSolver, check_kappa_a, filtered_fidelity, make_solver
from .window import (DENSE_LIMIT, WindowOperator, WindowSolution, check_system, condition_number, kappa_bound,
                     window_budget, window_system)

__all__ = ["window_system", "solve_window", "WindowSolution", "WindowOperator", "kappa_bound", "check_kappa_a",
           "condition_number", "filtered_fidelity", "METHODS", "SOLVERS", "make_solver"]

#: the solver names (the registry itself: ``name in METHODS`` and ``f"{METHODS}"`` work as before)
METHODS = SOLVERS


def solve_window(system: CarlemanSystem, u0, T: int, method: Union[str, WindowSolver] = "forward", *,
                 kappa_a: Optional[float] = None, kappa: Optional[str] = "auto",
                 dense_limit: int = DENSE_LIMIT, max_bytes: Optional[int] = None,
                 solver_options: Optional[Mapping] = None) -> WindowSolution:
    """Solve ``M X = B`` (Eq. II.102) over ``T`` steps from ``u0``.

    Args:
        system: The :class:`~torch_qode.core.carleman.CarlemanSystem` whose window is solved.
        u0: The initial state ``u(0)``, shape ``(n,)`` (numpy, torch or a sequence).
        T: The number of steps (an integer ≥ 0).
        method: A name in ``SOLVERS`` or a :class:`~torch_qode.core.solvers.WindowSolver`: ``"forward"`` the
            forward recurrence (exact, matrix-free); ``"direct"`` scipy's sparse triangular solve of the
            explicit ``M`` (unit lower triangular: no factorisation, no fill-in); ``"filtered"`` the
            truncated solver of Theorem II.4 keeping singular values ``σ ≥ σ_max/κ_a`` (option
            ``kappa_a``: ``kappa_a=…`` or ``solver_options={"kappa_a": …}``).
        kappa_a: The filtered solver's cut-off (a shortcut for ``solver_options={"kappa_a": …}``).
        kappa: ``"auto"`` computes ``κ(M)`` when ``M`` is explicit (exact up to ``dense_limit``, estimated
            beyond), ``None`` skips it.
        dense_limit: ``(T+1)Δ`` up to which ``κ`` (and the filtered solve) use a dense SVD.
        max_bytes: Memory budget (default: the system's, else half the available memory); a window that
            does not fit is refused (:class:`~torch_qode.core.carleman.CarlemanTooLarge`) before allocation.
        solver_options: Options of the solver named by ``method`` (its ``option_names``).

    Returns:
        A :class:`~torch_qode.core.window.WindowSolution`: the states ``X`` of shape ``(T+1, Δ)``, the
        level-1 ``final`` state ``u(T)``, ``κ`` and, for the filtered solver, its fidelity.

    Raises:
        ValueError: An unknown ``method``, a bad ``T``, ``u0`` or option.
        TypeError: ``method`` needs the explicit ``M`` but the system is matrix-free.
        CarlemanTooLarge: The window does not fit in ``max_bytes``.

    Example:
        >>> import numpy as np
        >>> from torch_qode import PolynomialODE, carleman
        >>> system = carleman(PolynomialODE([np.zeros(2), -0.1 * np.eye(2)]), 1)   # u(t+1) = 0.9 u(t)
        >>> solve_window(system, np.array([1.0, 2.0]), T=3, method="direct").final
        array([0.729, 1.458])
    """
    system = check_system(system)
    T = _check_T(T)
    if isinstance(method, str) and method not in SOLVERS:
        raise ValueError(f"method must be one of {SOLVERS}, got {method!r}")
    check_choice(kappa, "kappa", ("auto", None))
    options = dict(solver_options or {})
    if kappa_a is not None:
        options["kappa_a"] = kappa_a
    solver = make_solver(method, options or None, name="method")
    window_budget(max_bytes, system)            # validate max_bytes before anything else
    if solver.needs_explicit and not system.ode.explicit:
        raise TypeError(f"method={solver.name!r} needs the explicit matrix M; this system is matrix-free "
                        "(use method='forward')")
    return solver.solve(system, u0, T, kappa=kappa, dense_limit=dense_limit, max_bytes=max_bytes)
