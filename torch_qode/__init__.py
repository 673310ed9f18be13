"""torch_qode: sparse training through a simulated quantum ODE solver (Liu et al., Nat. Commun. 2024).

Floors (each imports only the ones below): the math core (``ode``, ``carleman``, ``linsolve``,
``tomography``, ``resources``), the autograd bridge (``taylor``, ``dissipation``, ``pruning``),
training (``optim``, ``callbacks``) and applications (``models``, ``data``, ``plotting``, ``recipes/``).
"""
from .callbacks import DissipationMonitor
from .carleman import CarlemanSystem, CarlemanTooLarge, carleman, dissipativity, required_order
from .dissipation import (DissipationCheck, PyHessianAdapter, Verdict, error_proxy, hessian_spectrum,
                          positive_fraction, slq_density)
from .linsolve import kappa_bound, solve_window, window_system
from .ode import MatrixFreeTerm, NonFiniteError, PolynomialODE
from .optim import QODE, CycleReport
from .pruning import MagnitudePruner
from .resources import Resources, estimate_resources
from .taylor import TaylorExpansion, UnsupportedGraphError, decomposed_norms, make_loss_fn
from .tomography import TomographyResult, coupon_collector_expected_draws, tomography

__all__ = [
    "PolynomialODE", "MatrixFreeTerm", "NonFiniteError",
    "carleman", "CarlemanSystem", "CarlemanTooLarge", "dissipativity", "required_order",
    "solve_window", "window_system", "kappa_bound",
    "tomography", "TomographyResult", "coupon_collector_expected_draws",
    "Resources", "estimate_resources",
    "TaylorExpansion", "UnsupportedGraphError", "decomposed_norms", "make_loss_fn", "MagnitudePruner",
    "DissipationCheck", "Verdict", "hessian_spectrum", "slq_density", "error_proxy", "positive_fraction",
    "PyHessianAdapter",
    "QODE", "CycleReport", "DissipationMonitor",
]
__version__ = "0.1.0"
