"""Taylor-term products without holding the loss graph: the closure replayed once per product block.

The ``"double_backward"`` engine (:class:`~.engines.GraphEngine`) keeps ``g = ∇L`` with its
``create_graph`` graph for the whole window; every product of F1 = −η H and F2 = −(η/2) ∇³L
(Eq. II.1, V.5) is one more backward through it.  That graph is the window's memory: at the paper's
Fig. 2 batch it alone outgrows an 80 GB device.  :class:`RecomputeEngine` keeps only a *replay* —
a function that re-runs the closure of the upload batch — and computes each product block (a whole
``(m, N)`` block of columns: one replay per block, not per column) as

    H V = Σ_b H_b V,    ∇³L[a, b] = Σ_b ∇³L_b[a, b],

over the closure's backward calls ``b`` (its micro-batches): each micro-batch's loss is
differentiated with ``create_graph`` when its backward is called, its contribution taken through a
:class:`~.engines.GraphEngine` on that micro-batch's graph alone, and the graph freed before the
next micro-batch runs.  The peak is one micro-batch's double backward; between products no graph
is held.  The sum equals the retained graph's products to round-off (the loss of a closure with
several backward calls is the sum of its losses, as :func:`~torch_qode.training.capture.capture_backward`
expands it).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional, Sequence

import torch

from . import flat as _flat
from .engines import GraphEngine

__all__ = ["RecomputeEngine", "backward_losses", "intercepting_backward", "replaying_backward", "LossMismatchError"]


class LossMismatchError(RuntimeError):
    """A replay of the closure did not reproduce the losses of the batch it is meant to re-evaluate."""


def backward_losses(tensors, grad_tensors=None, grad_variables=None) -> list:
    """The scalar losses that ``torch.autograd.backward(tensors, grad_tensors)`` differentiates:
    ``t`` for a tensor without a gradient argument, ``(t * g).sum()`` with one."""
    ts = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    gs = grad_tensors if grad_tensors is not None else grad_variables
    gs = (None,) * len(ts) if gs is None else ((gs,) if isinstance(gs, torch.Tensor) else tuple(gs))
    return [t if g is None else (t * g).sum() for t, g in zip(ts, gs) if isinstance(t, torch.Tensor)]


@contextlib.contextmanager
def intercepting_backward(handle: Callable[[list, Callable], object]):
    """Inside, each backward call of the closure (``loss.backward()``, ``torch.autograd.backward``)
    goes to ``handle(losses, run)``: ``losses`` the scalar losses it differentiates
    (:func:`backward_losses`), ``run(retain_graph=...)`` the backward as the call asked.  Backward calls
    made while one is handled (from inside a backward pass: reentrant checkpointing) pass through."""
    original = torch.autograd.backward
    depth = [0]

    def backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False, grad_variables=None,
                 inputs=None):
        if depth[0]:
            return original(tensors, grad_tensors, retain_graph, create_graph, grad_variables, inputs=inputs)

        def run(retain_graph=retain_graph):
            return original(tensors, grad_tensors, retain_graph, create_graph, grad_variables, inputs=inputs)
        depth[0] += 1
        try:
            return handle(backward_losses(tensors, grad_tensors, grad_variables), run)
        finally:
            depth[0] -= 1

    torch.autograd.backward = backward
    try:
        yield
    finally:
        torch.autograd.backward = original


def replaying_backward(on_loss: Callable[[torch.Tensor], None]):
    """Inside, a backward call of the closure hands its loss to ``on_loss`` instead of backwarding it
    (:func:`intercepting_backward`)."""
    return intercepting_backward(lambda losses, run: on_loss(losses[0] if len(losses) == 1 else sum(losses)))


class RecomputeEngine:
    """The products of :class:`~.engines.GraphEngine` as sums over a replay's micro-batch losses.

    ``replay(on_loss)`` re-runs the closure (buffers, RNG and ``.grad`` left alone by the caller)
    inside :func:`replaying_backward`.  ``losses``: the values (detached scalars) of the micro-batch
    losses the replay must reproduce; ``None`` takes those of the first replay.  A replay whose
    losses differ (beyond ``rtol``: kernels may sum in another order) raises
    :class:`LossMismatchError` — the closure re-evaluated another batch.
    """

    def __init__(self, replay: Callable, leaves: list, chunk: int, losses: Optional[Sequence] = None,
                 rtol: float = 1e-5):
        self.replay, self.leaves, self.chunk, self.rtol = replay, leaves, chunk, rtol
        self.N = _flat.numel(leaves)
        self.losses = None if losses is None else [float(v) for v in losses]
        self.replays = 0                          # products blocks computed (one replay each)

    def _sum(self, op: Callable[[GraphEngine], torch.Tensor]) -> torch.Tensor:
        """``Σ_b op(GraphEngine on micro-batch b's graph)``, each graph freed before the next."""
        acc, seen = [], []
        leaves, chunk = self.leaves, self.chunk

        def on_loss(loss: torch.Tensor) -> None:
            seen.append(loss.detach())
            g = torch.autograd.grad(loss.reshape(()), leaves, create_graph=True, allow_unused=True,
                                    materialize_grads=True)
            out = op(GraphEngine(leaves, _flat.flatten(g), chunk))
            acc[:] = [out if not acc else acc[0] + out]
            for p, gi in zip(leaves, g):          # .grad as the closure's own backward would fill it
                p.grad = gi.detach() if p.grad is None else p.grad + gi.detach()

        with torch.enable_grad():
            self.replay(on_loss)
        self._check(seen)
        self.replays += 1
        if not acc:
            raise RuntimeError("the replayed closure did not call loss.backward(): there is no loss to "
                               "differentiate")
        return acc[0]

    def _check(self, seen: list) -> None:
        values = [float(v) for v in seen]
        if self.losses is None:
            self.losses = values
            return
        bad = len(values) != len(self.losses) or any(
            not math.isclose(a, b, rel_tol=self.rtol, abs_tol=1e-30) for a, b in zip(values, self.losses))
        if bad:
            raise LossMismatchError(
                f"replaying the upload closure gave the micro-batch losses {values}, the upload gave "
                f"{self.losses}: the closure does not re-evaluate the upload batch (does it read a variable "
                "that the training loop rebinds, e.g. a global x?). Build the closure over its own batch, "
                "`def make_closure(x, y): def closure(): ...; return closure`, or use hvp='retain'")

    # ------------------------------------------------------------------ GraphEngine's interface
    def hvp(self, V: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        if create_graph:
            raise ValueError("a recomputed product cannot keep its graph (create_graph=True)")
        return self._sum(lambda e: e.hvp(V))

    def third(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return self._sum(lambda e: e.third(A, B))

    def sym_sum(self, V: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return self._sum(lambda e: e.sym_sum(V, lam))

    def hessian_of_dot(self, w: torch.Tensor, support) -> torch.Tensor:
        return self._sum(lambda e: e.hessian_of_dot(w, support))

    def derivative(self, k: int, support, n: int) -> torch.Tensor:
        return self._sum(lambda e: e.derivative(k, support, n).detach())

    def release(self):
        self.replay = self.leaves = None
