"""Graph capture of the closure's backward, the window's noise tape, the closure's loss value."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .._checks import as_real
from ..bridge import flat as _flat

__all__ = ["capture_backward", "NoiseTape", "loss_value", "holding", "own_grads", "measuring",
           "upload_graph", "NEEDS_CLOSURE", "checked_closure"]

#: ``QODE.step()`` without a closure: why one is needed, and the two-line fix.
NEEDS_CLOSURE = (
    "QODE.step() needs a closure that re-evaluates the loss and calls loss.backward(), as torch.optim.LBFGS "
    "does: a quantum window re-evaluates every batch's gradient at θ0, and the upload differentiates the "
    "loss graph twice. Move the forward and backward into a closure:\n"
    "    def closure(): opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); return loss\n"
    "    opt.step(closure)")


def checked_closure(closure, params: list):
    """``closure`` that raises, once it has run, if it left every ``.grad`` of ``params`` as it found
    it (it never called ``backward()``).  QODE wraps the closure of its first step only: the classical
    hot path pays nothing."""
    def run():
        before = [p.grad for p in params]        # held: an accumulation then replaces the tensor
        versions = [None if g is None else g._version for g in before]
        out = closure()
        if all(p.grad is g and (g is None or g._version == v) for p, g, v in zip(params, before, versions)):
            raise RuntimeError("QODE: the closure did not call loss.backward(): no parameter's .grad changed. "
                               "The closure must compute the loss and backward it (def closure(): "
                               "opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); return loss)")
        return out
    return run


@contextlib.contextmanager
def capture_backward():
    """Keep the graph of the loss that the closure backwards (``retain_graph=True``).

    QODE needs second and third derivatives of the upload step's loss; a standard closure calls
    ``loss.backward()`` (or ``torch.autograd.backward(loss)``), which would free the graph.  Inside
    this context ``torch.autograd.backward`` — which ``Tensor.backward`` calls — still fills ``.grad``
    exactly as usual but retains the graph and records the loss.  A closure that accumulates
    gradients over several backward calls gets the sum of its losses, whose gradient is exactly what
    ``.grad`` accumulated.  Backward calls made from inside a backward pass are not the closure's
    and pass through untouched.
    """
    captured: dict = {"losses": []}
    original = torch.autograd.backward
    depth = [0]

    def backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False, grad_variables=None,
                 inputs=None):
        if depth[0]:
            return original(tensors, grad_tensors, retain_graph, create_graph, grad_variables, inputs=inputs)
        ts = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
        gs = grad_tensors if grad_tensors is not None else grad_variables
        gs = (None,) * len(ts) if gs is None else ((gs,) if isinstance(gs, torch.Tensor) else tuple(gs))
        for t, g in zip(ts, gs):
            if isinstance(t, torch.Tensor):
                captured["losses"].append(t if g is None else (t * g).sum())
        if captured["losses"]:
            losses = captured["losses"]
            captured["loss"] = losses[0] if len(losses) == 1 else sum(losses)
        depth[0] += 1
        try:
            return original(tensors, grad_tensors, True, create_graph, grad_variables, inputs=inputs)
        finally:
            depth[0] -= 1

    torch.autograd.backward = backward
    try:
        yield captured
    finally:
        torch.autograd.backward = original


class NoiseTape:
    """``F0(t)`` of the window: recorded step by step (kept whole only when a solver needs it)."""

    def __init__(self, keep: bool):
        self.keep = keep
        self.rows: dict = {}

    def record(self, t: int, f0: torch.Tensor) -> None:
        if not self.keep:
            self.rows.clear()
        self.rows[t] = f0

    def __call__(self, t: int) -> torch.Tensor:
        try:
            return self.rows[t]
        except KeyError:
            raise RuntimeError(f"F0({t}) was not recorded in this window") from None


def loss_value(loss) -> Optional[float]:
    """The closure's return value as a float when it is one number (a one-element tensor or a real
    number), else ``None``: like ``torch.optim.SGD``, QODE accepts whatever the closure returns."""
    if isinstance(loss, torch.Tensor):
        return float(loss.detach()) if loss.numel() == 1 and not loss.is_complex() else None
    return as_real(loss)


# ------------------------------------------------------------------- closures evaluated only to measure
@contextlib.contextmanager
def holding(params: list, tensors):
    """Let the model hold ``tensors`` for a moment without an in-place write.

    During a window the upload batch's autograd graph holds the parameters; writing them in place
    would bump their version counters and invalidate every later Hessian-vector product.  Swapping
    ``.data`` leaves the version counters alone, and the original storage comes back afterwards.
    """
    saved = [p.data for p in params]
    for p, t in zip(params, tensors):
        p.data = t if t.dtype == p.dtype and t.device == p.device else t.to(p)
    try:
        yield
    finally:
        for p, d in zip(params, saved):
            p.data = d


@contextlib.contextmanager
def own_grads(params: list):
    """Run a measuring closure on fresh ``.grad`` slots: gradients accumulated outside the closure
    neither leak into it nor get overwritten (``zero_grad(set_to_none=False)`` would otherwise
    zero and refill the model's own gradient tensors in place)."""
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, g in zip(params, saved):
            p.grad = g


def measuring(params: list, model: Optional[torch.nn.Module]):
    """Context for closures evaluated only to measure: the global RNG (dropout, random augmentation)
    is forked, so training draws exactly the numbers it would without them, and with ``model``
    the BatchNorm running statistics are frozen."""
    stack = contextlib.ExitStack()
    stack.enter_context(_flat.forked_rng(params))
    if model is not None:
        stack.enter_context(_flat.batch_stats_no_update(model))
    return stack


def upload_graph(params: list, cap: dict) -> torch.Tensor:
    """The loss graph :func:`capture_backward` kept at the upload (``cap`` is emptied); refuses sparse
    gradients and a closure that did not backward through ``torch.autograd.backward``."""
    sparse = [i for i, p in enumerate(params) if p.grad is not None and p.grad.is_sparse]
    if sparse:
        raise RuntimeError(f"QODE: params[{sparse[0]}] has a sparse gradient (e.g. nn.Embedding(sparse=True)); "
                           "the quantum window expands the loss densely: use sparse=False, or mode='classical'")
    graph = cap.pop("loss", None)
    cap.clear()
    if graph is None:
        raise RuntimeError("QODE: the closure did not call loss.backward() or torch.autograd.backward(loss); "
                           "the upload step needs the loss graph for the Taylor expansion (a backward "
                           "imported by name, `from torch.autograd import backward`, is not seen)")
    return graph
