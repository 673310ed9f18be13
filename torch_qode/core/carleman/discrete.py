"""The paper's discrete Carleman form (Sec. V B, Eq. V.12–V.17).

``y_j(t+1) = (u + f(u))^{⊗j}`` expanded exactly with ``G0 = F0, G1 = I + F1, Gk = Fk`` and truncated
at total degree ``N``: ``y_j(t+1) = Σ_{d=0}^{N} P(j, d) y_d``,
``P(j, d) = Σ_{k1+…+kj=d} G_{k1} ⊗ … ⊗ G_{kj}``, ``y_0 = 1``; ``b(t) = (F0, F0⊗F0, …)``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from .base import CarlemanSystem, compositions_up_to
from ..._lazy import lazy_module

if TYPE_CHECKING:  # scipy.sparse loads on first use (issue 19)
    import scipy.sparse as sp
else:
    sp = lazy_module("scipy.sparse")

__all__ = ["DiscreteCarleman"]


class DiscreteCarleman(CarlemanSystem):
    """``form="discrete"``: the exact power ``(u + f(u))^{⊗j}`` truncated at degree ``N``."""

    name = "discrete"

    # ---------------------------------------------------------------------------- matrix-free
    def _G(self, k: int, X: torch.Tensor) -> torch.Tensor:
        """``G_k X`` for k ≥ 1 (``G1 = I + F1``, ``Gk = Fk``) on a ``(n**k, c)`` block."""
        term = self.ode.terms[k]
        if k == 1:
            return X if term is None else X + term.matmat(X)
        return term.matmat(X)

    def _P(self, j: int, d: int, X: torch.Tensor, f0) -> Optional[torch.Tensor]:
        """``P(j, d) X`` for ``X`` of shape ``(n**d, m)``; ``None`` when the block is zero."""
        n, q = self.n, self.degree
        if j == 0:
            return X if d == 0 else None
        m = X.shape[1]
        out = None
        for k in range(0, min(q, d) + 1):
            e = d - k
            if e > q * (j - 1) or (j == 1 and e > 0):
                continue
            if k == 0:
                if f0 is None:
                    continue
                inner = self._P(j - 1, e, X, f0)
                if inner is None:
                    continue
                term = (f0[:, None, None] * inner[None]).reshape(n**j, m)
            else:
                if k >= 2 and self.ode.terms[k] is None:
                    continue
                Xk = X.reshape(n**k, n**e, m)
                if e <= j - 1:   # fewer columns for G_k when it goes first
                    Z = self._G(k, Xk.reshape(n**k, n**e * m)).reshape(n, n**e, m)
                    Z = Z.permute(1, 0, 2).reshape(n**e, n * m)
                    W = self._P(j - 1, e, Z, f0)
                    if W is None:
                        continue
                    term = W.reshape(n**(j - 1), n, m).permute(1, 0, 2).reshape(n**j, m)
                else:
                    Z = Xk.permute(1, 0, 2).reshape(n**e, n**k * m)
                    W = self._P(j - 1, e, Z, f0)
                    if W is None:
                        continue
                    W = W.reshape(n**(j - 1), n**k, m).permute(1, 0, 2).reshape(n**k, n**(j - 1) * m)
                    term = self._G(k, W).reshape(n**j, m)
            out = term if out is None else out + term
        return out

    def _level(self, j: int, levels, f0) -> torch.Tensor:
        m = levels[1].shape[1]
        acc = torch.zeros(self.n**j, m, dtype=levels[1].dtype, device=levels[1].device)
        for d in range(0, self.order + 1):
            if levels[d] is None:
                continue
            term = self._P(j, d, levels[d], f0)
            if term is not None:
                acc = acc + term
        return acc

    # ------------------------------------------------------------------------------- explicit
    def offset(self, t: int = 0) -> np.ndarray:
        """``b(t) = (F0, F0⊗F0, …, F0^{⊗N})`` as a ``(Δ,)`` numpy vector."""
        f0 = self.ode.F0(t).detach().cpu().numpy()
        parts, cur = [f0], f0
        for _ in range(1, self.order):
            cur = np.kron(cur, f0)
            parts.append(cur)
        return np.concatenate(parts)

    def _nnz_bound(self, g: list) -> float:
        n, q, N = self.n, self.degree, self.order
        g = list(g)
        g[1] += n
        nnz = {(0, 0): 1.0}
        for j in range(1, N + 1):
            for d in range(0, N + 1):
                v = sum(g[k] * nnz.get((j - 1, d - k), 0.0) for k in range(0, min(q, d) + 1))
                nnz[(j, d)] = min(v, float(n) ** (j + d))   # a block cannot hold more than its size
        return sum(nnz[(j, d)] for j in range(1, N + 1) for d in range(1, N + 1)) + self.dim

    def _blocks(self, F: list, f0: sp.csr_matrix):
        n, q, N = self.n, self.degree, self.order
        blocks = [[None] * N for _ in range(N)]
        G = [f0, (sp.identity(n, format="csr") + (F[1] if F[1] is not None else 0)).tocsr()] + F[2:]
        P = {(0, 0): sp.identity(1, format="csr")}
        for j in range(1, N + 1):
            for d in range(0, N + 1):
                acc = None
                for k in range(0, min(q, d) + 1):
                    prev = P.get((j - 1, d - k))
                    if prev is None or G[k] is None:
                        continue
                    blk = sp.kron(G[k], prev, format="csr")
                    acc = blk if acc is None else acc + blk
                if acc is not None:
                    P[(j, d)] = acc
        for j in range(1, N + 1):
            for d in range(1, N + 1):
                blocks[j - 1][d - 1] = P.get((j, d))
        return sp.bmat(blocks, format="csr", dtype=np.float64) - sp.identity(self.dim, format="csr")

    def _sparsity(self, S: np.ndarray) -> float:
        """Our extension of Theorem V.1 (products, not sums, of the terms of ``u + f(u)``): at most
        ``Σ_{k1+…+kJ ≤ N} Π_j max_i S'^{(kj)}_i`` with ``S'^{(1)} = S^{(1)} + 1``."""
        q, N = self.degree, self.order
        best = 0.0
        smax = S.max(axis=1)
        smax[1] = (S[1] + 1).max()
        for J in range(1, N + 1):
            total = 0.0
            for comp in compositions_up_to(J, q, N):
                if sum(comp) == 0:
                    continue
                total += float(np.prod([smax[k] for k in comp]))
            best = max(best, total)
        return best
