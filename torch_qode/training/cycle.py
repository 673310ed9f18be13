"""The quantum steps of a cycle: the upload, a window step, the window's end and its abort.

``QODE`` schedules the cycle (which step ``k mod cycle`` is) and owns the ``Optimizer`` contract;
what a quantum step does is here.  :class:`QuantumSteps` is built once per optimizer (its parts,
read live); a step passes only its closure, report and ``k`` (a :class:`Step`), and the live
:class:`~.window.Window` does the maths.  Classical steps are
:func:`~torch_qode.training.classical.classical_step`.

A function here never leaves a half-done window: a :class:`~.faults.WindowFault` ends it with θ0
written back (:func:`abort`), and a closure that raises leaves the window exactly as it was before
the step.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch

from ..bridge import flat as _flat
from ..bridge.kernels import KERNELS, double_backward_kernels, missing_double_backward
from ..bridge.norms import fused_norm_nodes
from . import check as _check
from . import window as _w
from .capture import Products, Replay, capture_backward, measuring, own_grads, rng_state, saving, upload_graph
from .classical import all_finite_sync, finite_with, momentum_buffers, reset_momentum, sgd_steps
from .comm import Comm
from .config import QODEConfig, check_trainable
from .distributed import NOT_REPLICATED, global_losses
from .faults import REJECTS, Fault, WindowFault
from .report import CycleReport
from .shadow import drift_measurement, grads_at, shadow_grads, shadow_update

__all__ = ["QuantumSteps", "Step", "upload", "window_step", "advance", "finish", "abort", "go_classical",
           "restore_expansion", "write_params"]

write_params = _w.write_params


class QuantumSteps:
    """The quantum steps of one optimizer (``QODE`` builds it once): its parts, read live from it.

    Args:
        opt: the :class:`~torch_qode.training.qode.QODE` whose steps these are.
    """

    def __init__(self, opt):
        self.opt = opt
        self.warned: set = set()                 # what QODE has warned about (once each: :func:`warn_once`)
        self.nonfinite_uploads = 0               # consecutive uploads with a non-finite loss or gradient

    params = property(lambda self: self.opt._params)
    groups = property(lambda self: self.opt.param_groups)       # lr, momentum, weight decay, … per group
    state = property(lambda self: self.opt.state)               # per-parameter state (momentum buffers)
    cfg = property(lambda self: self.opt.cfg)
    comm = property(lambda self: self.opt.comm)
    pruner = property(lambda self: self.opt.pruner)
    monitor = property(lambda self: self.opt.window_monitor)   # a WindowMonitor: all four methods
    model = property(lambda self: self.opt.model)
    rng = property(lambda self: self.opt._rng)                   # the sampler (tomography draws)
    dissipation = property(lambda self: self.opt.dissipation)

    @property
    def win(self) -> Optional[_w.Window]:
        """The live window (``None`` between windows)."""
        return self.opt._win

    @win.setter
    def win(self, value: Optional[_w.Window]) -> None:
        self.opt._win = value

    def watched(self) -> tuple:
        """The tensors whose in-place writes invalidate a window's products: the parameters and, with
        ``model=``, its buffers (e.g. BatchNorm running statistics)."""
        model = self.model
        return tuple(self.params) + (tuple(model.buffers()) if model is not None else ())

    def upload(self, closure: Callable, rep: CycleReport, k: int) -> tuple:
        """The upload step (see :func:`upload`); returns ``(loss, post)``: the closure's loss and the
        measurements to run once the step is complete."""
        s = Step(closure, rep, k)
        return upload(self, s), s.post

    def window_step(self, closure: Callable, rep: CycleReport, k: int) -> tuple:
        """A step inside the window (see :func:`window_step`); returns ``(loss, post)``."""
        s = Step(closure, rep, k)
        return window_step(self, s), s.post


@dataclass
class Step:
    """One quantum step: its closure, this cycle's report and ``k``; the measurements that run user
    code once the step is complete (``post``)."""

    closure: Callable
    rep: CycleReport
    k: int
    post: list = field(default_factory=list)

    def fault(self, fault: Union[WindowFault, str]) -> None:
        """The fault into the report, as text (``"step k: <text>"``)."""
        self.rep.faults.append(f"step {self.k}: {fault}")


# --------------------------------------------------------------------------------------- upload
def upload(q: QuantumSteps, s: Step) -> Any:
    """At c = classical_steps (``mode`` quantum or auto): expand this step's loss at θ0 on S and open
    the window (its step t = 0 included), or train the step classically and say why.

    The closure runs under :func:`~torch_qode.bridge.kernels.double_backward_kernels` (math attention,
    compiled code eager): its graph is differentiated twice.  A graph that still has no double
    backward trains this step classically with the reason; any other exception after the closure
    leaves the optimizer as before the step (no window, the report as it was), so a retry is the run
    that never failed."""
    rep = s.rep
    support = None
    if q.cfg.upload == "sparse" and q.pruner is not None:
        q.pruner.prune()                         # the uploaded state must be r-sparse
        support = q.pruner.support()
    hvp, rng = _products(q)
    with hvp.capture(q.cfg.degree >= 2, q.model) as cap, _w.flop_count() as flops:   # FLOPs: for the ledger
        loss = detached(s.closure())             # the caller never holds the retained graph
    before = rep.state()
    try:
        return _open(q, s, loss, cap, support, hvp, rng, flops["flops"])
    except BaseException as exc:
        if q.win is not None:                    # the model still holds θ0: nothing was written
            q.win.release()
            q.win = None
        for key, value in before.items():
            setattr(rep, key, value)
        why = missing_double_backward(exc)
        if why is None:
            raise
        s.fault(WindowFault(Fault.UPLOAD_FAILED, why))
        return go_classical(q, s, why, loss, update=True)


def _open(q: QuantumSteps, s: Step, loss, cap: dict, support, hvp: Products, rng,
          closure_flops: Optional[int] = None) -> Any:
    """The upload after its closure: the window opened on the captured graph (or a replay) and its step t = 0;
    ``closure_flops`` (the closure's FLOPs) goes to the ledger."""
    rep, params = s.rep, q.params
    if q.comm.any(not all_finite_sync(loss, params)):   # one rank's NaN: every rank skips
        s.fault(WindowFault(Fault.UPLOAD_NONFINITE))
        nonfinite_upload(q, s)
        return go_classical(q, s, "non-finite loss or gradient at upload", loss, update=False)
    check_trainable(params)                      # requires_grad may have been switched off since
    if not q.comm.local and not q.comm.replicated(torch.cat([_flat.flatten([p.detach() for p in params]),
                                                             _w.flat_grads(params)])):
        raise RuntimeError(NOT_REPLICATED.format(k=s.k))
    graph, hvp_info = expansion_source(q, s, hvp, cap, rng)
    unused = [i for i, p in enumerate(params) if p.grad is None]
    if unused:                                   # SGD leaves them alone this step; so does the window
        support = _w.support_without(params, unused, support)
        rep.excluded_params = len(unused)
        if support.numel() == 0:
            return go_classical(q, s, "no parameter received a gradient at upload", loss, update=True)
    win, why = _w.Window.open(graph, params, support, q.groups, momentum_buffers(params, q.state), q.cfg,
                              q.comm, q.rng, q.dissipation, rep, monitor=q.monitor.on_upload, k=s.k,
                              watched=q.watched(), grad_at=functools.partial(grads_at, params, s.closure, q.model))
    del graph
    if win is None:
        return go_classical(q, s, why, loss, update=True)
    win.closure_flops = closure_flops
    q.win = win
    rep.carleman.update(hvp_info)
    q.nonfinite_uploads = 0
    q.monitor.on_window_open(s.k, dict(rep.carleman))   # the monitor keeps its spectra outside retained windows
    rep.mode = "quantum"
    rep.carleman["kernels"] = KERNELS
    advance(q, s, params)
    return loss


#: consecutive uploads with a non-finite loss or gradient after which QODE warns (once)
NONFINITE_UPLOADS_WARN = 3


def warn_once(q: QuantumSteps, key: Any, text: str) -> None:
    """``warnings.warn(text)`` the first time ``key`` is met by this optimizer (a UserWarning: a window
    rejected, a model that stopped training)."""
    if key not in q.warned:
        q.warned.add(key)
        warnings.warn(text, stacklevel=5)


def nonfinite_upload(q: QuantumSteps, s: Step) -> None:
    """An upload skipped for a non-finite loss or gradient: warn once when the parameters themselves are
    not finite (every later step would skip) or after :data:`NONFINITE_UPLOADS_WARN` such uploads in a
    row, naming the count (the classical steps between them skip too: ``CycleReport.skipped_steps``)."""
    q.nonfinite_uploads += 1
    bad = not all(bool(torch.isfinite(p.detach()).all()) for p in q.params)
    if bad:
        warn_once(q, "nonfinite_params", f"QODE: step {s.k}: the model's parameters are not finite, so every "
                  "step skips from here on (its loss and gradients are NaN); restore a checkpoint or lower lr")
    elif q.nonfinite_uploads >= NONFINITE_UPLOADS_WARN:
        warn_once(q, "nonfinite_uploads", f"QODE: step {s.k}: {q.nonfinite_uploads} uploads in a row had a "
                  "non-finite loss or gradient and were skipped (see CycleReport.skipped_steps and faults)")


def detached(loss: Any) -> Any:
    """The closure's return value, a tensor detached from its graph (anything else as it is)."""
    return loss.detach() if isinstance(loss, torch.Tensor) else loss


def _products(q: QuantumSteps) -> tuple:
    """How this expansion takes its products (:class:`~.capture.Products`, once per expansion) and the
    global RNG's state before the closure when a replay may follow (else ``None``)."""
    hvp = Products.of(q.cfg.hvp, q.model, q.comm.local)
    return hvp, (rng_state(q.params) if hvp.may_replay else None)


def expansion_source(q: QuantumSteps, s: Step, hvp: Products, cap: dict, rng) -> tuple:
    """``(source, info)``: what the window expands — the retained loss graph, or a
    :class:`~.capture.Replay` of the closure (``AUTO`` decides by the measured bytes) — and how, for
    the report."""
    meter, values = cap.pop("meter"), list(cap["values"])
    inspected = [n for names in cap["inspected"] for n in names]
    graph = upload_graph(q.params, cap)
    hvp, info = hvp.decided(meter, q.params[0].device)
    if not hvp.replays:
        return graph, info
    if graph is not None and q.cfg.degree >= 2:
        inspected = fused_norm_nodes(graph)
    del graph
    return Replay(s.closure, q.params, q.model, rng, _w.flat_grads(q.params), values, inspected), info


def go_classical(q: QuantumSteps, s: Step, reason: str, loss, update: bool) -> Any:
    """The upload trains classically: SGD's update with this step's gradients (``update``, when
    finite), or none."""
    rep = s.rep
    rep.mode, rep.reason = "classical", reason
    if update and all_finite_sync(loss, q.params):
        sgd_steps(q.groups, q.state)
    else:
        rep.skipped_steps += 1
    return loss


# --------------------------------------------------------------------------------------- window
def window_step(q: QuantumSteps, s: Step) -> Any:
    """A step inside the window: the closure's ∇L_t(θ0) advances the Carleman state (a matrix-free
    window restored by ``load_state_dict`` first re-expands on this step's batch)."""
    w, params = q.win, q.params
    resumed = w.system is None
    if resumed:
        hvp, rng = _products(q)
        run = hvp.capture(q.cfg.degree >= 2, q.model)
    else:
        run = torch.enable_grad()
    with run as cap:
        loss = detached(s.closure())             # the model holds θ0: ∇L_t(θ0)
    graph = expansion_source(q, s, hvp, cap, rng)[0] \
        if resumed and (cap.get("values") or cap.get("loss") is not None) else None
    f0, deferred = None, False
    if not resumed and w.frozen is None and w.support is None:   # F0(t) holds every gradient
        f0 = w.f0_from_grads(params)
        # nothing runs before the state advances (no shadow closures, no collective): the gradients'
        # check is the state's own (a non-finite F0 makes it fail), diagnosed in advance() if it does
        deferred = w.shadow is None and q.comm.local
        ok = finite_with(loss, f0[:0] if deferred else f0) or all_finite_sync(loss, params)
    else:
        ok = all_finite_sync(loss, params)
    if q.comm.any(not ok):
        s.rep.skipped_steps += 1
        abort(q, s, WindowFault(Fault.STEP_NONFINITE))
        return loss
    if resumed:
        try:
            _w.reexpand(w, graph, params)
        except WindowFault as fault:
            abort(q, s, fault)
            return loss
        except RuntimeError as exc:
            why = missing_double_backward(exc)
            if why is None:
                raise
            abort(q, s, WindowFault(Fault.REEXPANSION_FAILED, why))
            return loss
        s.fault(WindowFault(Fault.RESUMED))
    if w.verdict is not None and not decide(q, s):
        return loss
    advance(q, s, params, f0, deferred)
    return loss


def decide(q: QuantumSteps, s: Step) -> bool:
    """The window's first new batch decides a provisional verdict (:func:`~.check.complete`: the
    curvature and gradient noise against the upload batch's).  Refused, the window ends before this
    step advances it: the model still holds θ0, this step trains as SGD from θ0 with its gradients
    (the upload batch's step is spent), and the report says why.  Passed, the window runs to the T
    it chose (``window="auto"``).

    Returns:
        Whether the window goes on."""
    w, rep = q.win, s.rep
    f1 = _check.gd_step(_w.flat_grads(q.params), w.theta0, w.support, w.lr, w.wd)   # F0(1), as the window's
    step = _check.step_at(functools.partial(grads_at, q.params, s.closure, q.model), q.params, w.theta0,
                          w.support, w.lr, w.wd)
    explicit = w.explicit and w.system is not None       # its F1 is already the global batch's
    verdict = _check.complete(q.dissipation, w.verdict, step, f1, _check.upload_hvp(w), q.comm,
                              q.cfg.window == "auto", reduce=not explicit)
    w.verdict = None                                     # decided (a closure that raised left it pending)
    if rep.dissipation is not None:
        rep.dissipation.update(verdict.as_dict())
    if not verdict.passed:
        w.release()
        q.win = None
        rep.mode = "classical"
        rep.reason = (f"dissipation check at the window's first new batch {verdict.reason}; the window ends at "
                      "θ0 (the upload step is spent) and this step trains as SGD")
        q.monitor.on_window_closed(s.k)
        go_classical(q, s, rep.reason, None, update=True)
        return False
    rep.reason = f"dissipation check {verdict.reason}"
    if verdict.T_chosen:
        w.T = rep.window = int(verdict.T_chosen)
    return True


def advance(q: QuantumSteps, s: Step, grads, f0: Optional[torch.Tensor] = None, deferred: bool = False) -> None:
    """Window step t (:meth:`~.window.Window.advance`) with ``grads`` (the parameters, whose ``.grad``
    hold ∇L_t(θ0), or their flat vector; ``f0``: F0(t) already computed from them; ``deferred``: the
    gradients are not checked yet, a failed state is diagnosed here), the shadows' closure calls
    first: if one raises, the window is exactly as before the step; finish at t = T."""
    w, params = q.win, q.params
    shadow = None if w.shadow is None else shadow_grads(
        w.shadow, w.t == 0, params, functools.partial(grads_at, params, s.closure, q.model))
    try:
        w.advance(grads, f0)
    except WindowFault as met:
        nonfinite = deferred and not all_finite_sync(None, params)   # what the check before the step says
        if nonfinite:
            s.rep.skipped_steps += 1
        abort(q, s, WindowFault(Fault.STEP_NONFINITE) if nonfinite else met)
        return
    except Exception as exc:                     # no fault explains it: the window ends at θ0 (the next
        abort(q, s, WindowFault(Fault.PRODUCT_FAILED, exc))   # step trains as after any abort), then
        raise                                    # the error propagates: a bug is not swallowed
    if shadow is not None:
        shadow_update(w.shadow, *shadow, q.groups, w.lr, w.wd, w.support)
    if w.t == w.T:
        finish(q, s)


def finish(q: QuantumSteps, s: Step) -> None:
    """The window's finish stages (the readout written back); drift and the monitor run once the step
    is complete; momentum restarts."""
    w, rep = q.win, s.rep
    keep = _w.readout_keep(q.params, q.pruner) if q.cfg.upload == "dense" else None
    try:
        res = w.finish(rep, keep)
    except WindowFault as fault:
        abort(q, s, fault)
        return
    # measurements that run user code (closures, the monitor) wait until the step is complete
    if q.cfg.track_sgd:
        s.post.append(global_losses(drift_measurement(rep, w.shadow, w.theta0, res.new, res.lin, q.params,
                                                      s.closure, q.model, theta_lin1=res.lin1, theta_lin_r=res.lin_r,
                                                      theta_twin=res.twin), rep, q.comm))
    s.post.append(functools.partial(q.monitor.on_window_end, s.k, rep))
    reset_momentum(q.params, q.state)            # momentum restarts after a quantum window
    w.release()
    q.win = None


def abort(q: QuantumSteps, s: Step, fault: WindowFault) -> None:
    """A fault ends the window: θ0 back in the model, the rest of the window trains classically."""
    w = q.win
    write_params(q.params, w.theta0)
    w.release()
    q.win = None
    rep = s.rep
    rep.mode = "classical"
    rep.reason = f"quantum window aborted at t={w.t}: {fault}; parameters restored to θ0"
    s.fault(fault)
    if fault.kind in REJECTS:                    # a window that exploded: say so once, not only in the report
        warn_once(q, fault.kind, f"QODE: step {s.k}: {rep.reason} (the window's steps are spent; training "
                  "continues classically; further rejections of this kind are in CycleReport.faults)")
    q.monitor.on_window_closed(s.k)


# --------------------------------------------------------------------------------------- resume
def restore_expansion(win: _w.Window, closure: Callable, params: list, cfg: QODEConfig, comm: Comm,
                      model: Optional[torch.nn.Module]) -> None:
    """A resumed matrix-free window's Taylor terms rebuilt from ``closure`` (the upload batch's), a
    measuring evaluation (own ``.grad`` slots, forked RNG, frozen BatchNorm statistics with ``model``)."""
    replays = Products.of(cfg.hvp, model, comm.local).replays
    rng = rng_state(params)
    with own_grads(params), torch.enable_grad(), measuring(params, model), double_backward_kernels(), \
            capture_backward(retain=not replays,
                             inspect=fused_norm_nodes if replays and cfg.degree >= 2 else None) as cap, \
            saving(() if replays or model is None else tuple(model.buffers())):
        closure()
        grad = _w.flat_grads(params)
    if not cap["values"]:
        raise RuntimeError("restore_expansion: the closure did not call loss.backward()")
    source = (Replay(closure, params, model, rng, grad, list(cap["values"]),
                     [n for names in cap["inspected"] for n in names]) if replays else cap.pop("loss"))
    win.build(_w.expand(source, params, win.support, win.lr, win.wd, cfg))   # errors raise here: the
    #                                                                           caller asked for it
