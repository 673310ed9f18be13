"""Derivative engines of :class:`~.taylor.TaylorExpansion`: the products behind the Taylor terms
F1 = −η H and F2 = −(η/2) ∇³L (Eq. II.1, V.5) of a real loss.

- :class:`GraphEngine` — repeated backward through ``g = autograd.grad(loss, θ, create_graph=True)``
  (backend ``"double_backward"``, what ``"auto"`` picks);
- :class:`FuncEngine` — torch.func forward-over-reverse ``jvp(grad(L))`` (backend ``"jvp"``).

Both work on rows over the full flat parameter vector ``(m, N)``; the expansion restricts to the support.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["GraphEngine", "FuncEngine"]


class GraphEngine:
    """Derivatives by repeated backward through ``g = autograd.grad(loss, leaves, create_graph=True)``."""

    def __init__(self, leaves: list[torch.Tensor], g_flat: torch.Tensor, chunk: int):
        self.leaves, self.g, self.chunk = leaves, g_flat, chunk
        self.N = g_flat.numel()
        self._bufs: Optional[tuple] = None      # scaled_hvp's v and c·Hv in the model dtype (reused)

    def _vjp(self, out: torch.Tensor, W: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        """Rows ``W_i^T ∂out/∂θ`` for ``W (m, *out.shape)``: ``(m, N)``."""
        m = W.shape[0]
        if not out.requires_grad:
            return W.new_zeros(m, self.N)
        rows = []
        for s in range(0, m, self.chunk):
            Wc = W[s:s + self.chunk]
            batched = Wc.shape[0] > 1
            gs = torch.autograd.grad(out, self.leaves, grad_outputs=Wc if batched else Wc[0],
                                     retain_graph=True, create_graph=create_graph, allow_unused=True,
                                     materialize_grads=True, is_grads_batched=batched)
            m_c = Wc.shape[0]
            # materialize_grads gives unbatched zeros for leaves outside the graph: broadcast them
            rows.append(torch.cat([(t if not batched or t.dim() == lf.dim() + 1
                                    else t.expand(m_c, *lf.shape)).reshape(m_c, -1)
                                   for t, lf in zip(gs, self.leaves)], dim=1))
        return torch.cat(rows) if len(rows) > 1 else rows[0]

    def hvp(self, V: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        return self._vjp(self.g, V, create_graph)

    def scaled_hvp(self, y: torch.Tensor, c: float) -> torch.Tensor:
        """``c·H y`` for a flat ``y (N,)`` (any dtype), in the leaves' dtype, in a buffer that the next
        call reuses: the numbers of ``c * hvp(y)`` before ``taylor_ode._scaled`` casts them (adding it to a
        float64 ``acc`` gives ``acc + _scaled(hvp(y), c, acc)`` bit for bit), without the flat copies:
        ``y`` is converted into a reused vector and each leaf's product written into its slice."""
        if self._bufs is None:
            lf = self.leaves
            v, hv = (torch.empty(self.N, dtype=self.g.dtype, device=self.g.device) for _ in range(2))
            self._bufs = (v, hv, [h.view(p.shape) for h, p in zip(hv.split([p.numel() for p in lf]), lf)])
        v, hv, views = self._bufs
        v.copy_(y)
        with torch.enable_grad():
            gs = torch.autograd.grad(self.g, self.leaves, grad_outputs=v, retain_graph=True, allow_unused=True)
        for g, h in zip(gs, views):
            if g is None:       # a leaf outside the graph: 0·c (−0.0 for c < 0), as materialised zeros give
                h.fill_(0.0 * c)
            else:
                torch.mul(g, c, out=h)
        return hv

    def third(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """Rows ``∇³L[a_i, b_i]``: per pair one HVP with graph and one backward of ``a_i·H(θ)b_i``.

        Pairs are *not* batched: a batched backward through a batched HVP graph costs (batch)² —
        54 s instead of 1.4 s for 8 pairs on the benchmark ResNet.
        """
        out = []
        for i in range(A.shape[0]):
            h = self.hvp(B[i:i + 1], create_graph=True)[0]
            out.append(self._vjp((h * A[i]).sum(), A.new_ones(1))[0])
        return torch.stack(out)

    def sym_sum(self, V: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """``Σ_r lam_r ∇³L[v_r, v_r]`` as ``(N,)``: one backward of ``Σ_r lam_r v_r·H(θ)v_r``."""
        total = V.new_zeros(self.N)
        for s in range(0, V.shape[0], self.chunk):
            Vc = V[s:s + self.chunk]
            h = self.hvp(Vc, create_graph=True)
            val = ((h * Vc).sum(dim=1) * lam[s:s + self.chunk]).sum()
            total += self._vjp(val, val.new_ones(1))[0]
        return total

    def hessian_of_dot(self, w: torch.Tensor, support) -> torch.Tensor:
        """``∂²(w·∇L)/∂θ_S²`` for one row ``w (1, N)``: ``(n, n)`` (an HVP with graph, then its Jacobian)."""
        h = self.hvp(w, create_graph=True)[0]
        h = h if support is None else h[support]
        return self.jacobian_rows(h, support, create_graph=False).detach()

    def jacobian_rows(self, out: torch.Tensor, support, create_graph: bool) -> torch.Tensor:
        """``∂ out / ∂θ_S`` for a vector ``out`` (with graph) as ``(out.numel(), n)``."""
        flat = out.reshape(-1)
        eye = torch.eye(flat.numel(), dtype=flat.dtype, device=flat.device)
        J = self._vjp(flat, eye, create_graph)
        return J if support is None else J[:, support]

    def derivative(self, k: int, support, n: int) -> torch.Tensor:
        """Dense ``∇^k L`` on S, ``(n,)*k``.  The last index is one batched Jacobian of a vector
        with its own small graph; the leading k−2 indices loop over rows, each differentiated on a
        separate single-vector graph (differentiating rows of one batched graph would cost n times
        more)."""
        g = self.g if support is None else self.g[support]
        E = torch.eye(n, dtype=g.dtype, device=g.device)

        def rec(vec, level):
            if level == k - 1:
                return self.jacobian_rows(vec, support, create_graph=False)
            out = []
            for a in range(n):
                nxt = self._vjp(vec, E[a:a + 1], create_graph=True)[0]
                out.append(rec(nxt if support is None else nxt[support], level + 1))
            return torch.stack(out)

        return rec(g, 1)

    def release(self):
        self.leaves = self.g = self._bufs = None


class FuncEngine:
    """Derivatives with torch.func: ``jvp(grad(L))`` (and one more ``jvp`` for third order)."""

    def __init__(self, loss_fn: Callable, theta0: torch.Tensor, chunk: int):
        self.f, self.theta0, self.chunk = loss_fn, theta0, chunk
        self.grad_f = torch.func.grad(loss_fn)
        self.N = theta0.numel()

    def _hvp_at(self, theta, v):
        return torch.func.jvp(self.grad_f, (theta,), (v,))[1]

    def hvp(self, V: torch.Tensor) -> torch.Tensor:
        fn = torch.func.vmap(lambda v: self._hvp_at(self.theta0, v), randomness="same", chunk_size=self.chunk)
        return fn(V)

    def third(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        def one(a, b):
            return torch.func.jvp(lambda t: self._hvp_at(t, b), (self.theta0,), (a,))[1]

        return torch.func.vmap(one, randomness="same", chunk_size=self.chunk)(A, B)

    def sym_sum(self, V: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return lam @ self.third(V, V)

    def derivative_fn(self, k: int, support, n: int) -> torch.Tensor:
        """Dense ``∇^k L`` on S, ``(n,)*k``, by nested torch.func transforms (chunked outer vmap)."""
        theta0 = self.theta0

        def lift(u):  # flat tangent on S -> full tangent
            if support is None:
                return u
            return torch.zeros_like(theta0).index_put((support,), u)

        def restrict(x):
            return x if support is None else x[..., support]

        E = torch.eye(n, dtype=theta0.dtype, device=theta0.device)

        def D(j):
            if j == 1:
                return lambda th: restrict(self.grad_f(th))
            inner = D(j - 1)
            chunk = max(1, (self.chunk * 8) // max(1, n ** (j - 2)))

            def dj(th):
                col = lambda e: torch.func.jvp(inner, (th,), (lift(e),))[1]
                return torch.func.vmap(col, randomness="same", chunk_size=chunk)(E)
            return dj

        return D(k)(theta0)

    def release(self):
        self.f = self.grad_f = self.theta0 = None
