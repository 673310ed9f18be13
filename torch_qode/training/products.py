"""Counting a window's products through the upload graph: a wrapper operator around each Taylor term.

The ledger's classical cost (:func:`~torch_qode.core.resources.classical_cost`) needs how many
Hessian-vector products and third-order products the simulation took.  :func:`counted` returns the
window's ODE with every matrix-free term wrapped in a :class:`~torch_qode.core.ode.MatrixFreeTerm`
that counts what it applies and passes the numbers through untouched; explicit terms are counted
once, for the products that built them.
"""
from __future__ import annotations

import torch

from ..core.ode import MatrixFreeTerm, PolynomialODE

__all__ = ["counted", "counted_term", "new_counts"]


def new_counts() -> dict:
    """Zero counts: ``hvp`` (Hessian-vector product columns), ``third_order`` (∇³L products)."""
    return {"hvp": 0, "third_order": 0}


def _cols(V) -> int:
    V = torch.as_tensor(V)
    return 1 if V.dim() == 1 else int(V.shape[1])


def _sym_rank(Z) -> int:
    """The third-order products ``third_sym(Z)`` takes: one per non-zero eigenvalue of sym(Z), as it
    computes them (its eigen-decomposition, repeated)."""
    Z = torch.as_tensor(Z).detach().to(dtype=torch.float64, device="cpu")
    return int((torch.linalg.eigh(0.5 * (Z + Z.T))[0] != 0).sum())


def counted_term(term: MatrixFreeTerm, counts: dict) -> MatrixFreeTerm:
    """``term`` (matrix-free ``F1`` or ``F2`` of a Taylor expansion) as a wrapper operator that counts
    into ``counts`` each product it applies.

    ``F1 = −η H``: every column of ``matmat``/``rmatmat`` (also those of its norm estimate) and each
    ``power`` or lean ``matvec_buffer`` call is one HVP.  ``F2 = −(η/2) ∇³L``: a ``matmat`` column
    costs one product per non-zero eigenvalue of its sym(Z) (``third_sym``), ``power`` one, the
    factored state's ``sym_sum`` one per column; ``rmatmat`` (Hessians of ``w·∇L``) is not counted.

    Args:
        term: the term to wrap (its values are returned unchanged).
        counts: the dict (:func:`new_counts`) the products are added to.

    Returns:
        A :class:`MatrixFreeTerm` with the same action, transpose, power and extra capabilities.
    """
    key = "hvp" if term.k == 1 else "third_order"
    n = term.n

    def count(k: int):
        counts[key] += k

    def matmat(Y):
        out = term.matmat(Y)
        count(_cols(Y) if term.k == 1 else sum(_sym_rank(Y[:, j].reshape(n, n)) for j in range(Y.shape[1])))
        return out

    def power(u):
        out = term.power(u)
        count(1)
        return out

    rmat = term._rmatmat if term.k == 1 else None

    def rmatmat(W):
        out = rmat(W)
        count(_cols(W))
        return out

    out = MatrixFreeTerm(n, term.k, matmat, symmetric=term.symmetric, power=power,
                         rmatmat=term._rmatmat if rmat is None else rmatmat, norm=term._norm,
                         row_nnz=term.row_nnz, dtype=term.dtype, device=term.device)
    lean = getattr(term, "matvec_buffer", None)
    if lean is not None:                         # the lean order-1 product counts as one HVP
        def matvec_buffer(y):
            res = lean(y)
            count(1)
            return res
        out.matvec_buffer = matvec_buffer
    sym = getattr(term, "sym_sum", None)
    if callable(sym):                            # the factored state's batched F2 products
        def sym_sum(Z, lam):
            res = sym(Z, lam)
            count(_cols(Z))
            return res
        out.sym_sum = sym_sum
    return out


def counted(ode: PolynomialODE, counts: dict) -> PolynomialODE:
    """``ode`` (a Taylor expansion's, Eq. I.3's polynomial ODE) with its products counted into ``counts``.

    Matrix-free terms are replaced by :func:`counted_term` wrappers; an explicit term ``Fk`` adds,
    once, the products :meth:`~torch_qode.bridge.taylor.TaylorExpansion.derivative` took to build it
    (``n`` HVPs for ``F1``, ``n^k`` third-order products for ``k ≥ 2``).

    Args:
        ode: the window's ODE, freshly built by the expansion (its term list is edited).
        counts: the dict (:func:`new_counts`) the products are added to.

    Returns:
        ``ode``.
    """
    for k in range(1, ode.degree + 1):
        term = ode.terms[k]
        if term is None:
            continue
        if getattr(term, "explicit", True):
            counts["hvp" if k == 1 else "third_order"] += ode.n ** k
        else:
            ode.terms[k] = counted_term(term, counts)
    return ode
