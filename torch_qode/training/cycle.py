"""The quantum steps of a cycle: the upload, a window step, the window's end and its abort.

``QODE`` schedules the cycle (which step ``k mod cycle`` is) and owns the ``Optimizer`` contract;
what a quantum step does is here, as functions of one :class:`StepContext` — the optimizer's parts
and this step's closure, report and live window — around the window core's maths (:mod:`.window`).
Classical steps are :func:`~torch_qode.training.classical.classical_step`.

A function here never leaves a half-done window: a fault ends it with θ0 written back
(:func:`abort`), and a closure that raises leaves the window exactly as it was before the step.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..bridge import flat as _flat
from ..bridge.kernels import KERNELS, double_backward_kernels, missing_double_backward
from . import window as _w
from ..bridge.norms import fused_norm_nodes
from .capture import Replay, capture_backward, measuring, own_grads, rng_state, saved_bytes, upload_graph
from .classical import all_finite_sync, finite_with, momentum_buffers, reset_momentum, sgd_step
from .comm import Comm
from .config import QODEConfig, check_trainable, choose_hvp
from .distributed import NOT_REPLICATED, global_losses
from .report import CycleReport
from .shadow import drift_measurement, grads_at, shadow_grads, shadow_update

__all__ = ["StepContext", "upload", "window_step", "advance", "finish", "abort", "go_classical",
           "restore_expansion", "write_params"]


@dataclass
class StepContext:
    """What one quantum step works on (``QODE`` builds it per step; ``win`` is read back afterwards)."""

    params: list
    group: dict                          # the one parameter group (lr, momentum, weight decay, …)
    state: dict                          # the optimizer's per-parameter state (momentum buffers)
    cfg: QODEConfig
    comm: Comm
    rep: CycleReport                     # this cycle's report
    k: int                               # the step
    closure: Callable
    win: Optional[_w.WindowState] = None     # the live window; ``None`` once it closed
    pruner: Any = None
    monitor: Any = None
    model: Optional[torch.nn.Module] = None
    post: list = field(default_factory=list)  # measurements that run user code once the step is complete
    rng_at_closure: Any = None           # the global RNG before an expanded closure (hvp: a replay's)
    hvp_info: dict = field(default_factory=dict)   # how the window takes its products (the report's)

    def fault(self, message: str) -> None:
        self.rep.faults.append(f"step {self.k}: {message}")


@torch.no_grad()
def write_params(params: list, flat: torch.Tensor) -> None:
    """Copy the full flat vector ``flat`` into the parameters."""
    for p, v in zip(params, _flat.unflatten(flat, params)):
        p.copy_(v)


# --------------------------------------------------------------------------------------- upload
def upload(s: StepContext, rng: np.random.Generator, dissipation) -> Any:
    """c = classical_steps (``mode`` quantum or auto): expand this step's loss at θ0 on S and open
    the window (its step t = 0 included), or train the step classically and say why.

    The closure runs under :func:`~torch_qode.bridge.kernels.double_backward_kernels` (math attention,
    compiled code eager): its graph is differentiated twice.  A graph that still has no double
    backward trains this step classically with the reason; any other exception after the closure
    leaves the optimizer as before the step (no window, the report as it was), so a retry is the run
    that never failed."""
    rep, params = s.rep, s.params
    support = None
    if s.cfg.upload == "sparse" and s.pruner is not None:
        s.pruner.prune()                         # the uploaded state must be r-sparse
        support = s.pruner.support()
    hvp, run = expansion_closure(s)
    with run() as cap, _w.flop_count() as flops:   # FLOPs counted for the ledger's classical cost
        loss = detached(s.closure())             # the caller never holds the retained graph
    before = rep.state()
    try:
        return _open(s, rng, dissipation, loss, cap, support, hvp, flops["flops"])
    except BaseException as exc:
        if s.win is not None:                    # the model still holds θ0: nothing was written
            s.win.release()
            s.win = None
        for key, value in before.items():
            setattr(rep, key, value)
        why = missing_double_backward(exc)
        if why is None:
            raise
        s.fault(f"upload failed: {why}")
        return go_classical(s, why, loss, update=True)


def _open(s: StepContext, rng: np.random.Generator, dissipation, loss, cap: dict, support, hvp: str,
          closure_flops: Optional[int] = None) -> Any:
    """The upload after its closure: the window opened on the captured graph (or a replay) and its step t = 0;
    ``closure_flops`` (the closure's FLOPs) goes to the ledger."""
    rep, params = s.rep, s.params
    if s.comm.any(not all_finite_sync(loss, params)):   # one rank's NaN: every rank skips
        s.fault("non-finite loss or gradient at upload: update skipped")
        return go_classical(s, "non-finite loss or gradient at upload", loss, update=False)
    check_trainable(params)                      # requires_grad may have been switched off since
    if not s.comm.local and not s.comm.replicated(torch.cat([_flat.flatten([p.detach() for p in params]),
                                                             _w.flat_grads(params)])):
        raise RuntimeError(NOT_REPLICATED.format(k=s.k))
    graph = expansion_source(s, hvp, cap)
    unused = [i for i, p in enumerate(params) if p.grad is None]
    if unused:                                   # SGD leaves them alone this step; so does the window
        support = _w.support_without(params, unused, support)
        rep.excluded_params = len(unused)
        if support.numel() == 0:
            return go_classical(s, "no parameter received a gradient at upload", loss, update=True)
    monitor = getattr(s.monitor, "on_upload", None)
    win, why = _w.open_window(graph, params, support, s.group, momentum_buffers(params, s.state), s.cfg,
                              s.comm, rng, dissipation, rep, monitor=monitor, k=s.k)
    del graph
    if win is None:
        return go_classical(s, why, loss, update=True)
    win.closure_flops = closure_flops
    s.win = win
    rep.carleman.update(s.hvp_info)
    opened = getattr(s.monitor, "on_window_open", None)
    if opened is not None:                       # the monitor keeps its spectra outside retained windows
        opened(s.k, dict(rep.carleman))
    rep.mode = "quantum"
    rep.carleman["kernels"] = KERNELS
    advance(s, params)
    return loss


def detached(loss: Any) -> Any:
    """The closure's return value, a tensor detached from its graph (anything else as it is)."""
    return loss.detach() if isinstance(loss, torch.Tensor) else loss


def expansion_closure(s: StepContext) -> tuple:
    """How this step's closure runs when its loss is expanded: ``(hvp, run)`` with ``run()`` the
    context (graph kept for ``"retain"``/``"auto"``, the forward's saved bytes measured for
    ``"auto"``; the global RNG's state kept for a replay).  ``hvp="recompute"``/``"auto"`` without
    ``model=`` retain: a replay must leave BatchNorm statistics alone; so does ``"auto"`` under
    torch.distributed (a replay would run DDP's all-reduce inside each product)."""
    hvp = s.cfg.hvp if s.model is not None and s.comm.local else "retain"
    deg2 = min(s.cfg.taylor_degree, s.cfg.carleman_order) >= 2
    s.rng_at_closure = None if hvp == "retain" else rng_state(s.params)

    @contextlib.contextmanager
    def run():
        with torch.enable_grad(), double_backward_kernels(), capture_backward(retain=hvp != "recompute",
                                                   inspect=fused_norm_nodes if hvp == "recompute" and deg2
                                                   else None) as cap, \
                (saved_bytes() if hvp == "auto" else contextlib.nullcontext({})) as meter:
            cap["meter"] = meter
            yield cap
    return hvp, run


def expansion_source(s: StepContext, hvp: str, cap: dict) -> Any:
    """What the window expands: the retained loss graph, or a :class:`~.capture.Replay` of the
    closure (``hvp="auto"`` decides by :func:`~.config.choose_hvp`; ``s.hvp_info`` says which)."""
    meter, values = cap.pop("meter"), list(cap["values"])
    inspected = [n for names in cap["inspected"] for n in names]
    graph = upload_graph(s.params, cap)
    info = {"hvp": hvp}
    if hvp == "auto":
        hvp, need = choose_hvp(meter["bytes"], s.params[0].device)
        info = {"hvp": hvp, "graph_bytes_estimate": need}
    s.hvp_info = info
    if hvp != "recompute":
        return graph
    if graph is not None and min(s.cfg.taylor_degree, s.cfg.carleman_order) >= 2:
        inspected = fused_norm_nodes(graph)
    del graph
    return Replay(s.closure, s.params, s.model, s.rng_at_closure, _w.flat_grads(s.params), values, inspected)


def go_classical(s: StepContext, reason: str, loss, update: bool) -> Any:
    """The upload trains classically: SGD's update with this step's gradients (``update``, when
    finite), or none."""
    rep = s.rep
    rep.mode, rep.reason = "classical", reason
    if update and all_finite_sync(loss, s.params):
        sgd_step(s.params, s.group, s.state)
    else:
        rep.skipped_steps += 1
    return loss


# --------------------------------------------------------------------------------------- window
NONFINITE_STEP = "non-finite loss or gradient inside the quantum window"


def window_step(s: StepContext) -> Any:
    """A step inside the window: the closure's ∇L_t(θ0) advances the Carleman state (a matrix-free
    window restored by ``load_state_dict`` first re-expands on this step's batch)."""
    w = s.win
    resumed = w.system is None
    hvp, run = expansion_closure(s) if resumed else (None, lambda: torch.enable_grad())
    with run() as cap:
        loss = detached(s.closure())             # the model holds θ0: ∇L_t(θ0)
    graph = expansion_source(s, hvp, cap) if resumed and (cap.get("values") or cap.get("loss") is not None) \
        else None
    f0, deferred = None, False
    if not resumed and w.frozen is None and w.support is None:   # F0(t) holds every gradient
        f0 = w.f0_from_grads(s.params)
        # nothing runs before the state advances (no shadow closures, no collective): the gradients'
        # check is the state's own (a non-finite F0 makes it fail), diagnosed in advance() if it does
        deferred = w.shadow is None and s.comm.local
        ok = finite_with(loss, f0[:0] if deferred else f0) or all_finite_sync(loss, s.params)
    else:
        ok = all_finite_sync(loss, s.params)
    if s.comm.any(not ok):
        s.rep.skipped_steps += 1
        abort(s, NONFINITE_STEP)
        return loss
    if resumed:
        try:
            why = _w.reexpand(w, graph, s.params, s.cfg, s.comm)
        except RuntimeError as exc:
            why = missing_double_backward(exc)
            if why is None:
                raise
        if why is not None:
            abort(s, f"re-expansion after resume failed: {why}")
            return loss
        s.fault("resumed a matrix-free window: F1..Fq re-expanded at θ0 on this step's batch (the upload "
                "batch's autograd graph cannot be saved)")
    advance(s, s.params, f0, deferred)
    return loss


def advance(s: StepContext, grads, f0: Optional[torch.Tensor] = None, deferred: bool = False) -> None:
    """Window step t (window core) with ``grads`` (the parameters, whose ``.grad`` hold ∇L_t(θ0), or
    their flat vector; ``f0``: F0(t) already computed from them; ``deferred``: the gradients are not
    checked yet, a failed state is diagnosed here), the shadows' closure calls first: if one raises,
    the window is exactly as before the step; finish at t = T."""
    w = s.win
    shadow = None if w.shadow is None else shadow_grads(
        w.shadow, w.t == 0, s.params, functools.partial(grads_at, s.params, s.closure, s.model))
    fault = _w.advance(w, grads, s.comm, f0)
    if fault is not None:
        if deferred and not all_finite_sync(None, s.params):   # what the check before the step says
            s.rep.skipped_steps += 1
            fault = NONFINITE_STEP
        abort(s, fault)
        return
    if shadow is not None:
        shadow_update(w.shadow, *shadow, s.group, w.lr, w.wd, w.support)
    if w.t == s.cfg.window_length:
        finish(s)


def finish(s: StepContext) -> None:
    """The window core's readout written back; drift and the monitor run once the step is complete;
    momentum restarts."""
    w, rep = s.win, s.rep
    keep = _w.readout_keep(s.params, s.pruner) if s.cfg.upload == "dense" else None
    res = _w.finish_window(w, s.cfg, s.comm, rep, keep)
    if res.fault is not None:
        abort(s, res.fault)
        return
    write_params(s.params, res.new)
    # measurements that run user code (closures, the monitor) wait until the step is complete
    if s.cfg.track_sgd:
        s.post.append(global_losses(drift_measurement(rep, w.shadow, w.theta0, res.new, res.lin, s.params,
                                                      s.closure, s.model, theta_lin1=res.lin1), rep, s.comm))
    if s.monitor is not None and hasattr(s.monitor, "on_window_end"):
        s.post.append(functools.partial(s.monitor.on_window_end, s.k, rep))
    reset_momentum(s.params, s.state)            # momentum restarts after a quantum window
    w.release()
    s.win = None


def abort(s: StepContext, why: str) -> None:
    """A fault ends the window: θ0 back in the model, the rest of the window trains classically."""
    w = s.win
    write_params(s.params, w.theta0)
    w.release()
    s.win = None
    rep = s.rep
    rep.mode = "classical"
    rep.reason = f"quantum window aborted at t={w.t}: {why}; parameters restored to θ0"
    s.fault(why)
    closed = getattr(s.monitor, "on_window_closed", None)
    if closed is not None:
        closed(s.k)


# --------------------------------------------------------------------------------------- resume
def restore_expansion(win: _w.WindowState, closure: Callable, params: list, cfg: QODEConfig, comm: Comm,
                      model: Optional[torch.nn.Module]) -> None:
    """A resumed matrix-free window's Taylor terms rebuilt from ``closure`` (the upload batch's), a
    measuring evaluation (own ``.grad`` slots, forked RNG, frozen BatchNorm statistics with ``model``)."""
    recompute = cfg.hvp == "recompute" and model is not None
    deg2 = min(cfg.taylor_degree, cfg.carleman_order) >= 2
    rng = rng_state(params)
    with own_grads(params), torch.enable_grad(), measuring(params, model), double_backward_kernels(), \
            capture_backward(retain=not recompute, inspect=fused_norm_nodes if recompute and deg2 else None) as cap:
        closure()
        grad = _w.flat_grads(params)
    if not cap["values"]:
        raise RuntimeError("restore_expansion: the closure did not call loss.backward()")
    source = (Replay(closure, params, model, rng, grad, list(cap["values"]),
                     [n for names in cap["inspected"] for n in names]) if recompute else cap.pop("loss"))
    _w.build_system(win, _w.expand(source, params, win.support, win.lr, win.wd, cfg),
                    cfg, comm)                   # errors raise here: the caller asked for this expansion
