"""Graph capture of the closure's backward, the window's noise tape, the closure's loss value."""
from __future__ import annotations

import contextlib
import enum
import types
from typing import Callable, Optional

import torch

from .._checks import as_real
from ..bridge import flat as _flat
from ..bridge.kernels import double_backward_kernels
from ..bridge.norms import fused_norm_nodes
from ..bridge.recompute import intercepting_backward, replaying_backward
from .config import choose_hvp

__all__ = ["Products", "capture_backward", "NoiseTape", "loss_value", "holding", "own_grads", "measuring",
           "upload_graph", "Replay", "rng_state", "frozen_closure", "saved_bytes", "saving", "NEEDS_CLOSURE",
           "checked_closure"]

#: ``QODE.step()`` without a closure: why one is needed, and the two-line fix.
NEEDS_CLOSURE = (
    "QODE.step() needs a closure that re-evaluates the loss and calls loss.backward(), as torch.optim.LBFGS "
    "does: a quantum window re-evaluates every batch's gradient at θ0, and the upload differentiates the "
    "loss graph twice. Move the forward and backward into a closure:\n"
    "    def closure(): opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); return loss\n"
    "    opt.step(closure)")


class Products(enum.Enum):
    """How a window takes its Hessian products (the ``hvp`` setting, chosen once per expansion).

    ``RETAIN`` keeps the upload loss graph for the window; ``RECOMPUTE`` keeps none and replays the
    closure per product (:class:`Replay`); ``AUTO`` retains while measuring the graph's saved bytes,
    then :meth:`decided` picks one of the two.
    """

    RETAIN = "retain"
    RECOMPUTE = "recompute"
    AUTO = "auto"

    @classmethod
    def of(cls, hvp: str, model, local: bool) -> "Products":
        """The strategy for ``hvp``: a replay needs ``model`` (BatchNorm statistics left alone) and one
        process (a replay of a DDP closure would all-reduce inside each product); else ``RETAIN``."""
        return cls(hvp) if model is not None and local else cls.RETAIN

    @property
    def retains(self) -> bool:
        """The closure's backward keeps its graph."""
        return self is not Products.RECOMPUTE

    @property
    def may_replay(self) -> bool:
        """A replay may follow (``RECOMPUTE``, ``AUTO``): the global RNG's state is kept for it."""
        return self is not Products.RETAIN

    @property
    def replays(self) -> bool:
        """Products replay the closure (no graph between them)."""
        return self is Products.RECOMPUTE

    @property
    def measures(self) -> bool:
        """The forward's saved bytes are measured, to decide after the closure."""
        return self is Products.AUTO

    def decided(self, meter: dict, device) -> tuple:
        """``(strategy, report info)`` after the closure: ``AUTO`` chooses by the measured bytes
        (:func:`~.config.choose_hvp`), the others stay."""
        if not self.measures:
            return self, {"hvp": self.value}
        hvp, need = choose_hvp(meter["bytes"], device)
        return Products(hvp), {"hvp": hvp, "graph_bytes_estimate": need}

    def capture(self, inspect_fused: bool, model: Optional[torch.nn.Module] = None):
        """The context the closure runs in: :func:`capture_backward` (retaining or not; with the
        fused-norm check ``inspect`` for a replay at degree ≥ 2 when ``inspect_fused``) and
        :func:`saving` (a retained graph keeps ``model``'s buffers as snapshots; ``AUTO`` measures
        the saved bytes); yields the capture dict with its ``"meter"``."""
        buffers = tuple(model.buffers()) if model is not None and self.retains else ()

        @contextlib.contextmanager
        def run():
            with torch.enable_grad(), double_backward_kernels(), \
                    capture_backward(retain=self.retains,
                                     inspect=fused_norm_nodes if self.replays and inspect_fused else None) as cap, \
                    saving(buffers, measure=self.measures) as meter:
                cap["meter"] = meter
                yield cap
        return run()


def checked_closure(closure, params: list):
    """``closure`` that raises, once it has run, if it left every ``.grad`` of ``params`` as it found
    it (it never called ``backward()``).  QODE wraps the closure of its first quantum step only: the
    hot path pays nothing.  Only the wrapper's first call is checked; a replay (``hvp="recompute"``)
    freezes and runs the closure itself (:func:`frozen_closure` unwraps the wrapper)."""
    checked = []

    def run():
        if checked:
            return closure()
        before = [p.grad for p in params]        # held: an accumulation then replaces the tensor
        versions = [None if g is None else g._version for g in before]
        out = closure()
        checked.append(True)
        if all(p.grad is g and (g is None or g._version == v) for p, g, v in zip(params, before, versions)):
            raise RuntimeError("QODE: the closure did not call loss.backward(): no parameter's .grad changed. "
                               "The closure must compute the loss and backward it (def closure(): "
                               "opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); return loss)")
        return out
    run._qode_unchecked = closure                # (for frozen_closure: the user's closure, whose cells it binds)
    return run


@contextlib.contextmanager
def capture_backward(retain: bool = True, inspect: Optional[Callable] = None):
    """Keep the graph of the loss that the closure backwards (``retain_graph=True``).

    QODE needs second and third derivatives of the upload step's loss; a standard closure calls
    ``loss.backward()`` (or ``torch.autograd.backward(loss)``), which would free the graph.  Inside
    this context ``torch.autograd.backward`` — which ``Tensor.backward`` calls — still fills ``.grad``
    exactly as usual but retains the graph and records the loss.  A closure that accumulates
    gradients over several backward calls gets the sum of its losses, whose gradient is exactly what
    ``.grad`` accumulated.  Backward calls made from inside a backward pass are not the closure's
    and pass through untouched.

    ``retain=False`` (``hvp="recompute"``) keeps no graph: the backward runs as the closure asked
    and only the losses' detached values are recorded (``captured["values"]``, also kept with
    ``retain``); ``inspect(loss)`` runs on each loss before its backward (e.g. the fused-norm check).
    """
    captured: dict = {"losses": [], "values": [], "inspected": []}

    def handle(losses: list, run):
        if losses:
            total = losses[0] if len(losses) == 1 else sum(losses)
            captured["values"].append(total.detach())
            if inspect is not None:
                captured["inspected"].append(inspect(total))
            if retain:
                captured["losses"].extend(losses)
                losses = captured["losses"]
                captured["loss"] = losses[0] if len(losses) == 1 else sum(losses)
        return run(True) if retain else run()

    with intercepting_backward(handle):
        yield captured


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
    called = bool(cap.get("values"))
    cap.clear()
    if graph is None and not called:
        raise RuntimeError("QODE: the closure did not call loss.backward() or torch.autograd.backward(loss); "
                           "the upload step needs the loss graph for the Taylor expansion (a backward "
                           "imported by name, `from torch.autograd import backward`, is not seen)")
    return graph


# ------------------------------------------------------------------- hvp="recompute": the closure replayed
def rng_state(params: list) -> tuple:
    """The global CPU generator's state and those of the CUDA devices ``params`` live on."""
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    return torch.get_rng_state(), [(d, torch.cuda.get_rng_state(d)) for d in devices]


def frozen_closure(closure: Callable) -> Callable:
    """``closure`` with its free variables bound to their values now.  A closure defined in a loop body
    reads ``x, y`` through cells that the next iteration rebinds; the copy keeps this batch's.  The
    wrapper of :func:`checked_closure` is unwrapped first (its check is the first call's only)."""
    closure = getattr(closure, "_qode_unchecked", closure)
    cells = getattr(closure, "__closure__", None)
    if not isinstance(closure, types.FunctionType) or not cells:
        return closure
    try:
        values = [c.cell_contents for c in cells]
    except ValueError:                           # an empty cell: leave the closure as it is
        return closure
    copy = types.FunctionType(closure.__code__, closure.__globals__, closure.__name__, closure.__defaults__,
                              tuple(types.CellType(v) for v in values))
    copy.__kwdefaults__ = closure.__kwdefaults__
    return copy


class Replay:
    """An expansion batch's closure, replayable for :class:`~torch_qode.bridge.recompute.RecomputeEngine`.

    Each replay is a measuring evaluation (own ``.grad`` slots, forked RNG set back to the state the
    closure first ran with — the same dropout masks and augmentation — and, with ``model``, frozen
    BatchNorm statistics), on the parameters as they were: one modified in place since raises as a
    retained graph would.  ``grad``: the flat gradient at θ0; ``losses``: the micro-batch loss values a
    replay must reproduce; ``fused``: fused-norm nodes found in the graph (refused at degree ≥ 2).
    """

    def __init__(self, closure: Callable, params: list, model: Optional[torch.nn.Module], rng: tuple,
                 grad: torch.Tensor, losses: Optional[list] = None, fused=()):
        self.closure, self.params, self.model, self.rng = frozen_closure(closure), params, model, rng
        self.grad, self.losses, self.fused = grad, losses, list(fused)
        self.versions = [p._version for p in params]

    def __call__(self, on_loss: Callable) -> None:
        if [p._version for p in self.params] != self.versions:
            raise RuntimeError("one of the parameters was modified by an inplace operation since the "
                               "expansion batch was evaluated (hvp='recompute' replays it at θ0)")
        cpu, cuda = self.rng
        with own_grads(self.params), torch.enable_grad(), measuring(self.params, self.model), \
                double_backward_kernels():
            torch.set_rng_state(cpu)
            for d, st in cuda:
                torch.cuda.set_rng_state(st, d)
            with replaying_backward(on_loss):
                self.closure()


def saved_bytes():
    """``box["bytes"]``: the storage bytes of the tensors autograd saved for backward inside the
    context (the graph a retained loss holds; leaf tensors such as parameters excluded)."""
    return saving(measure=True)


@contextlib.contextmanager
def saving(buffers: tuple = (), measure: bool = False):
    """The tensors autograd saves for backward inside the context, as a window retains them.

    A module buffer among ``buffers`` is saved as a snapshot (a copy, one per buffer and version)
    instead of the live tensor: the graph then holds the expansion batch's buffers, and a later
    write to the live one cannot invalidate the window's products.  That write is the forward's
    own in training: a ``torch.compile``'d BatchNorm updates its running statistics with
    ``copy_`` (eager BatchNorm writes them inside its kernel, unseen by the version counter), so
    the next product after a compiled window step would fail.  BatchNorm's backward reads the
    running statistics only in eval mode, where no forward writes them: the products are those of
    the live buffers, bit for bit.

    Args:
        buffers: the model's buffers (empty: every tensor is saved as autograd saves it).
        measure: count the saved bytes (``box["bytes"]``, as :func:`saved_bytes`).

    Yields:
        ``box``: ``{"bytes": n}`` once the context exits (``0`` without ``measure``).
    """
    box = {"bytes": 0}
    if not buffers and not measure:              # no hooks: autograd saves as it always does
        yield box
        return
    seen: dict = {}
    live = {b._cdata: b for b in buffers}
    copies: dict = {}

    def snapshot(t):
        key = (t._cdata, t._version)
        if key not in copies:
            copies[key] = t.detach().clone()
        return copies[key]

    def pack(t):
        if t._cdata in live and not t.requires_grad:
            return snapshot(t)
        if measure and not t.is_leaf:
            try:
                st = t.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
            except (RuntimeError, NotImplementedError):   # sparse / meta tensors: not counted
                pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield box
    box["bytes"] = int(sum(seen.values()))
