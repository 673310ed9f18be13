"""torch_qode: sparse training through a simulated quantum ODE solver (Liu et al., Nat. Commun. 2024)."""
from .ode import MatrixFreeTerm, NonFiniteError, PolynomialODE

__all__ = ["PolynomialODE", "MatrixFreeTerm", "NonFiniteError"]
__version__ = "0.1.0"
