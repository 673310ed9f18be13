"""The continuous Carleman form: the Kronecker sums of ref. [36] (Eq. V.10–V.11).

``A^j_{j+k−1} = Σ_{i=0}^{j−1} I^{⊗i} ⊗ Fk ⊗ I^{⊗(j−1−i)}``; the ``k = 0`` term of level 1 is
``b(t) = (F0, 0, …, 0)``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING
import numpy as np
import torch

from .base import CarlemanSystem
from ..._lazy import lazy_module

if TYPE_CHECKING:  # scipy.sparse loads on first use (issue 19)
    import scipy.sparse as sp
else:
    sp = lazy_module("scipy.sparse")

__all__ = ["ContinuousCarleman"]


class ContinuousCarleman(CarlemanSystem):
    """``form="continuous"``: Kronecker sums of each ``Fk`` over the ``j`` factors of level ``j``."""

    name = "continuous"

    def _level(self, j: int, levels, f0) -> torch.Tensor:
        n, q = self.n, self.degree
        acc = levels[j].clone()
        m = acc.shape[1]
        for k in range(0, q + 1):
            s = j + k - 1
            if s > self.order or levels[s] is None:
                continue
            X = levels[s]
            for i in range(j):
                r = j - 1 - i
                if k == 0:
                    if f0 is None:
                        continue
                    Z = X.reshape(n**i, 1, n**r * m) * f0[None, :, None]
                else:
                    term = self.ode.terms[k]
                    if term is None:
                        continue
                    Xi = X.reshape(n**i, n**k, n**r * m).permute(1, 0, 2).reshape(n**k, n**(i + r) * m)
                    Z = term.matmat(Xi).reshape(n, n**i, n**r * m).permute(1, 0, 2)
                acc = acc + Z.reshape(n**j, m)
        return acc

    def offset(self, t: int = 0) -> np.ndarray:
        """``b(t) = (F0, 0, …, 0)`` as a ``(Δ,)`` numpy vector."""
        b = np.zeros(self.dim)
        b[: self.n] = self.ode.F0(t).detach().cpu().numpy()
        return b

    def _nnz_bound(self, g: list) -> float:
        n, q, N = self.n, self.degree, self.order
        block = {}
        for j in range(1, N + 1):
            for k in range(0, q + 1):
                s = j + k - 1
                if 1 <= s <= N:
                    block[(j, s)] = block.get((j, s), 0.0) + j * g[k] * float(n) ** (j - 1)
        return sum(min(v, float(n) ** (j + s)) for (j, s), v in block.items())

    def _blocks(self, F: list, f0: sp.csr_matrix):
        n, q, N = self.n, self.degree, self.order
        blocks = [[None] * N for _ in range(N)]
        for j in range(1, N + 1):
            for k in range(0, q + 1):
                s = j + k - 1
                if s < 1 or s > N:
                    continue
                Fk = f0 if k == 0 else F[k]
                if Fk is None:
                    continue
                blk = _kron_sum(Fk, n, j)
                blocks[j - 1][s - 1] = blk if blocks[j - 1][s - 1] is None else blocks[j - 1][s - 1] + blk
        if not any(b is not None for r in blocks for b in r):
            return None
        return sp.bmat(blocks, format="csr", dtype=np.float64)

    def _sparsity(self, S: np.ndarray) -> float:
        """Theorem V.1: a level-``J`` row has at most ``Σ_{j≤J} Σ_k S_{i_j}^{(k)}`` entries, ``k``
        running over the degrees kept at that level (Eq. V.104/V.105)."""
        q, N = self.degree, self.order
        best = 0.0
        for J in range(1, N + 1):
            ks = [k for k in range(0, q + 1) if 1 <= J + k - 1 <= N and not (k == 0 and J == 1)]
            if ks:
                best = max(best, J * float(S[ks].sum(axis=0).max()))
        return best


def _kron_sum(Fk: sp.csr_matrix, n: int, j: int) -> sp.csr_matrix:
    """``Σ_{i=0}^{j-1} I^{⊗i} ⊗ Fk ⊗ I^{⊗(j-1-i)}`` (Eq. V.11)."""
    acc = None
    for i in range(j):
        blk = sp.kron(sp.kron(sp.identity(n**i, format="csr"), Fk, format="csr"),
                      sp.identity(n**(j - 1 - i), format="csr"), format="csr")
        acc = blk if acc is None else acc + blk
    return acc
