"""The polynomial ODE of a Taylor expansion (Eq. II.1, V.5): explicit coefficients, or matrix-free
terms whose products run through the expansion's autograd engine (F1 by Hessian-vector products, F2
by third-order products).  Split from :mod:`~torch_qode.bridge.taylor` by concern: that module
differentiates, this one assembles ``[F0, F1, …, Fq]``."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch

from . import flat as _flat
from .._checks import check_int
from .engines import FuncEngine, GraphEngine
from ..core.ode import MatrixFreeTerm, PolynomialODE

if TYPE_CHECKING:
    from .taylor import TaylorExpansion

__all__ = ["expansion_ode"]


def expansion_ode(self: "TaylorExpansion", F0=None, explicit: Optional[bool] = None, *,
                  dtype: torch.dtype = torch.float64, device=None, budget_bytes: int) -> PolynomialODE:
    """The gradient-descent ODE on S of the expansion ``self`` (:meth:`TaylorExpansion.ode`).

    Args:
        self: The expansion.
        F0: ``None`` -> ``−lr·gradient()``; otherwise the ``(n,)`` vector or callable ``t -> (n,)`` used
            as F0 itself (already multiplied by −lr).
        explicit: ``True``: dense coefficients from ``derivative``; ``False``: matrix-free terms;
            ``None``: explicit iff ``8·Σ_k n**(k+1)`` bytes ≤ ``budget_bytes``.
        dtype: The ODE's dtype.
        device: The ODE's device (default: the parameters').
        budget_bytes: The most bytes of float64 F1..Fq that ``explicit=None`` builds densely.

    Returns:
        ``PolynomialODE([F0, F1, …, Fq])`` with ``Fk = −(η/k!) ∇^{k+1}L`` on S.

    Raises:
        RuntimeError: The expansion was released.
        ValueError: A bad ``explicit``, or matrix-free coefficients asked for (or needed) at degree > 2.
    """
    self._live()
    if explicit not in (None, True, False):
        raise ValueError(f"explicit must be None (decide by memory), True or False; got {explicit!r}")
    budget_bytes = check_int(budget_bytes, "budget_bytes", 0)
    device = self.device if device is None else torch.device(device)
    n, q = self.n, self.degree
    need = 8 * sum(n ** (k + 1) for k in range(1, q + 1))
    if explicit is None:
        explicit = need <= budget_bytes
        if not explicit and q > 2:
            raise ValueError(f"degree {q} needs explicit coefficients ({need / 2**20:.1f} MiB > budget "
                             f"{budget_bytes / 2**20:.1f} MiB); matrix-free supports degree <= 2: lower degree "
                             "or raise budget_bytes")
    if not explicit and q > 2:
        raise ValueError(f"explicit=False (matrix-free) supports degree <= 2, this expansion has degree {q}")
    if F0 is None:
        F0 = (-self.lr * self.gradient()).to(dtype=dtype, device=device)
    coeffs = [F0]
    if explicit:
        for k in range(1, q + 1):
            Dk = self.derivative(k + 1).to(dtype=dtype, device=device)
            coeffs.append(Dk * (-self.lr / math.factorial(k)))
    else:
        coeffs.append(_term_F1(self))
        if q == 2:
            coeffs.append(_term_F2(self))
    return PolynomialODE(coeffs, dtype=dtype, device=device)



def _term_F1(self: "TaylorExpansion") -> MatrixFreeTerm:
    lr = self.lr

    def matmat(Y):
        return _scaled(self.hvp(Y), -lr, Y)

    def power(u):
        return matmat(u[:, None])[:, 0]

    return _lean_F1(self, MatrixFreeTerm(self.n, 1, matmat, symmetric=True, rmatmat=matmat, power=power), -lr)

def _term_F2(self: "TaylorExpansion") -> MatrixFreeTerm:
    n, c = self.n, -self.lr / 2.0

    def matmat(Y):
        cols = [self.third_sym(Y[:, j].reshape(n, n)) for j in range(Y.shape[1])]
        return _scaled(torch.stack(cols, dim=1), c, Y)

    def rmatmat(W):
        cols = [_hessian_of_dot(self, W[:, j]).reshape(-1) for j in range(W.shape[1])]
        return _scaled(torch.stack(cols, dim=1), c, W)

    def power(u):
        return _scaled(self.third(u, u), c, u)

    term = MatrixFreeTerm(n, 2, matmat, rmatmat=rmatmat, power=power)
    # Σ_l λ_l F2(z_l ⊗ z_l) in one batched call (the factored level-2 state's product)
    term.sym_sum = lambda Z, lam: _scaled(self.third_sym_sum(Z, lam), c, Z)
    return term


def _hessian_of_dot(self: "TaylorExpansion", w) -> torch.Tensor:
    """``∂²(w·∇L)/∂θ_S²`` = ``Σ_i ∇³L_{i··} w_i`` as ``(n, n)`` (F2ᵀ w up to the factor)."""
    eng = self._live()
    self._need_third()
    rows, _ = self._cols(w, "w")
    with torch.enable_grad():
        if not isinstance(eng, FuncEngine):
            M = eng.hessian_of_dot(rows, self.support)
        else:
            E = _flat.scatter_rows(torch.eye(self.n, dtype=self.dtype, device=self.device), self.support, self.N)
            M = self._restrict(eng.third(E, rows.expand(self.n, -1))).detach()
    return M


def _lean_F1(exp: "TaylorExpansion", term: MatrixFreeTerm, c: float) -> MatrixFreeTerm:
    """F1 with ``matvec_buffer``: ``y -> c·H y`` in the model dtype in a reused buffer
    (:meth:`GraphEngine.scaled_hvp`), which the lean order-1 window step adds to its float64 state
    (``CarlemanSystem.step_into``).  Only on all weights, without weight decay, on a retained graph
    whose leaves share one dtype (the generic product multiplies in the flat vector's dtype)."""
    eng = exp._engine
    if exp.support is None and exp._wd_zero and isinstance(eng, GraphEngine) \
            and all(p.dtype == exp.dtype for p in eng.leaves):
        term.matvec_buffer = lambda y: exp._live().scaled_hvp(y, c)
    return term


def _scaled(x: torch.Tensor, c: float, like: torch.Tensor) -> torch.Tensor:
    """``(c * x).to(like's dtype and device)`` in one pass: the product in ``x``'s dtype, cast on
    write (the same numbers as multiplying first and converting after, without the temporary)."""
    if x.device != like.device:
        return (c * x).to(dtype=like.dtype, device=like.device)
    return torch.mul(x, c, out=torch.empty(x.shape, dtype=like.dtype, device=x.device))
