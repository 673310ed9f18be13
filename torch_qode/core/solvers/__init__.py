"""Window solvers of ``M X = B`` (Eq. II.102): one module per method over :class:`WindowSolver`.

:data:`SOLVERS` maps a name to its class; :func:`make_solver` builds one from a name and its options
(``make_solver("filtered", {"kappa_a": 50})``).  A solver carries its options and its gate-count
formula for the ledger (:func:`~torch_qode.core.resources.estimate_resources`).  To add a solver: a
new module with a ``WindowSolver`` subclass and one line in ``SOLVERS`` below — nothing else.
"""
from __future__ import annotations

from typing import Mapping, Optional, Union

from ..registry import Registry
from .base import WindowSolver
from .direct import DirectSolver
from .filtered import FilteredSolver, filtered_fidelity, filtered_gates
from .forward import ForwardSolver, qlsa_gates

__all__ = ["SOLVERS", "WindowSolver", "make_solver", "check_kappa_a", "ForwardSolver", "DirectSolver",
           "FilteredSolver", "qlsa_gates", "filtered_gates", "filtered_fidelity"]

#: window solvers, name -> WindowSolver subclass (prints as the tuple of names)
SOLVERS = Registry("window solver", {"forward": ForwardSolver, "direct": DirectSolver, "filtered": FilteredSolver})


def make_solver(method: Union[str, WindowSolver], options: Optional[Mapping] = None, *,
                name: str = "solver") -> WindowSolver:
    """The solver registered as ``method`` built with ``options`` (a dict, e.g. ``{"kappa_a": 50}``).

    ``method`` may already be a :class:`WindowSolver` (returned as is; it carries its options, so
    ``options`` must be empty).  ``name`` is the argument that chose it, for messages: an unknown
    name, a non-dict ``{name}_options``, an option the solver does not take and a bad option value
    each raise with the argument named and the allowed values listed.
    """
    opt_name = f"{name}_options"
    if isinstance(method, WindowSolver):
        if options:
            raise ValueError(f"{opt_name} must be empty when {name} is a WindowSolver object (it carries its "
                             f"options: {method!r}), got {dict(options)!r}")
        return method
    cls = SOLVERS.lookup(method, name)
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise TypeError(f"{opt_name} must be a dict of options or None, got {type(options).__name__}")
    for key in options:
        if key not in cls.option_names:
            owners = tuple(n for n, c in SOLVERS.items() if key in c.option_names)
            if len(owners) == 1:
                raise ValueError(f"{key} applies only to {name}={owners[0]!r} ({name}={method!r})")
            if owners:
                raise ValueError(f"{key} applies only to {name} in {owners} ({name}={method!r})")
            raise ValueError(f"{opt_name}: unknown option {key!r} for {name}={method!r}; its options: "
                             f"{cls.option_names or 'none'}")
    return cls(**options, argname=name)


def check_kappa_a(kappa_a, method: str, name: str = "method") -> None:
    """``kappa_a`` must be a finite number ≥ 1 with a solver that takes it and ``None`` otherwise."""
    make_solver(method, None if kappa_a is None else {"kappa_a": kappa_a}, name=name)
