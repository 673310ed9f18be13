"""Carleman linearisation of a polynomial difference equation (Sec. II A, V B, V E).

The state ``y = (y_1, …, y_N)`` with ``y_j ≈ u^{⊗j}`` (``Δ = n + n² + … + n^N``, Eq. V.103) obeys
``y(t+1) = y(t) + A(t) y(t) + b(t)``.  One module per form over the shared
:class:`~torch_qode.core.carleman.base.CarlemanSystem`; :data:`FORMS` maps a name to its class.
To add a form: a new module with a ``CarlemanSystem`` subclass and one line in ``FORMS`` below.
"""
from __future__ import annotations

from typing import Optional

from ..ode import PolynomialODE
from .base import FORMS, CarlemanSystem
from .bounds import Dissipativity, carleman_error_bound, dissipativity, required_order
from .budget import CarlemanTooLarge, default_max_bytes, refuse_over_budget
from .budget import budget as _budget, check_max_bytes as _check_max_bytes, gib as _gib  # noqa: F401
from .continuous import ContinuousCarleman
from .discrete import DiscreteCarleman

__all__ = ["carleman", "CarlemanSystem", "CarlemanTooLarge", "FORMS", "required_order",
           "carleman_error_bound", "dissipativity", "Dissipativity", "default_max_bytes",
           "DiscreteCarleman", "ContinuousCarleman", "refuse_over_budget"]

#: Carleman forms, name -> CarlemanSystem subclass (prints as the tuple of names; defined in ``base.py``)
FORMS.update({"discrete": DiscreteCarleman, "continuous": ContinuousCarleman})


def carleman(ode: PolynomialODE, order: int, form: str = "discrete", *,
             max_bytes: Optional[int] = None) -> CarlemanSystem:
    """Carleman-linearise ``ode`` to order ``N = order`` in the form registered as ``form``.

    ``max_bytes`` (a positive integer, or ``None`` for half the available memory) bounds the memory
    of the matrix-free state (a few copies of ``Δ`` numbers): a system whose state alone would not
    fit is refused before anything is allocated.  It is also the default budget of the system's
    later allocations (:meth:`CarlemanSystem.matrix`, :meth:`~CarlemanSystem.simulate`, and the
    window solvers).

    Args:
        ode: The :class:`~torch_qode.core.ode.PolynomialODE` to linearise.
        order: The Carleman order ``N`` (an integer ≥ 1): the state is ``y = (u, u⊗u, …, u^{⊗N})``.
        form: A name in ``FORMS``: ``"discrete"`` (default) or ``"continuous"``.
        max_bytes: The memory budget described above.

    Returns:
        The :class:`CarlemanSystem` subclass registered as ``form``.

    Raises:
        TypeError: ``ode`` is not a :class:`~torch_qode.core.ode.PolynomialODE`.
        ValueError: A bad ``order`` or an unknown ``form``.
        CarlemanTooLarge: The state alone would not fit in ``max_bytes``.

    Example:
        >>> import numpy as np
        >>> ode = PolynomialODE([np.zeros(1), -0.5 * np.eye(1), np.array([[0.25]])])   # u + (-u/2 + u²/4)
        >>> system = carleman(ode, 2)
        >>> system.dim                                      # Δ = n + n²
        2
        >>> system.step(system.lift(np.array([1.0])))       # (u, u²) after one step, truncated at N = 2
        array([0.75, 0.25])
    """
    return FORMS.lookup(form, "form")(ode, order, max_bytes=max_bytes)
