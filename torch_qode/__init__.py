"""torch_qode: sparse training through a simulated quantum ODE solver (Liu et al., Nat. Commun. 2024).

Four floors, one package each, each importing only the ones below (``tests/test_layout.py``):
``core`` (the math), ``bridge`` (autograd), ``training`` (QODE, the monitor) and the applications
(``models``, ``data``, ``plotting``, ``recipes/``).
"""
from .training.monitor import DissipationMonitor
from .core.carleman import CarlemanSystem, CarlemanTooLarge, carleman, dissipativity, required_order
from .bridge.dissipation import (DissipationCheck, Verdict, error_proxy, hessian_spectrum, positive_fraction,
                                 slq_density)
from .core.linsolve import kappa_bound, solve_window, window_system
from .core.ode import MatrixFreeTerm, NonFiniteError, PolynomialODE
from .training.qode import QODE, CycleReport
from .training.distributed import DistComm
from .bridge.pruning import MagnitudePruner
from .core.resources import Resources, estimate_resources
from .bridge.taylor import TaylorExpansion, UnsupportedGraphError, decomposed_norms, make_loss_fn
from .core.tomography import TomographyResult, coupon_collector_expected_draws, tomography

__all__ = [
    "PolynomialODE", "MatrixFreeTerm", "NonFiniteError",
    "carleman", "CarlemanSystem", "CarlemanTooLarge", "dissipativity", "required_order",
    "solve_window", "window_system", "kappa_bound",
    "tomography", "TomographyResult", "coupon_collector_expected_draws",
    "Resources", "estimate_resources",
    "TaylorExpansion", "UnsupportedGraphError", "decomposed_norms", "make_loss_fn", "MagnitudePruner",
    "DissipationCheck", "Verdict", "hessian_spectrum", "slq_density", "error_proxy", "positive_fraction",
    "PyHessianAdapter",
    "QODE", "CycleReport", "DissipationMonitor", "DistComm",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    """``PyHessianAdapter`` and ``QODECallback`` on first use: ``import torch_qode`` loads neither
    ``pyhessian`` nor ``lightning`` (an optional extra, so ``QODECallback`` stays out of ``__all__``)."""
    if name == "PyHessianAdapter":
        from .bridge.pyhessian import PyHessianAdapter

        return PyHessianAdapter
    if name == "QODECallback":
        from .lightning import QODECallback

        return QODECallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
