"""QODE: train a PyTorch model the way the quantum ODE algorithm would (DESIGN.md, "one cycle").

Step ``k`` sits at position ``c = k mod cycle`` of a cycle (paper's Algorithm 1 and Sec. III B):

* ``c = 0`` — **download**: global magnitude pruning to ``sparsity`` (tomography reads the largest
  components; at the first cycle this prunes the incoming model).
* ``0 ≤ c < classical_steps`` — plain SGD steps on all weights (pruned ones may regrow).
* ``c = classical_steps`` — **upload**: the Taylor expansion of this step's loss at ``θ0`` on the
  support ``S`` (all weights for ``upload="dense"``; for ``"sparse"`` the model is pruned again to
  ``sparsity`` and ``S`` is what survives, so the uploaded state is ``r``-sparse as Theorem I.1
  assumes); in ``mode="auto"`` the Hessian dissipation check (Eq. III.12–III.15) decides between a
  quantum and a classical window.
* **quantum window**, ``T = cycle − classical_steps`` steps: the model holds ``θ0`` (the weights live
  on the "quantum device"); each closure supplies ``F0(t) = −η ∇L_t(θ0)`` (``noise="stream"``); the
  Carleman state advances one step; after the last step the window system (Eq. II.102) is solved
  with ``solver``, the weight vector ``θ0 + u(T)`` on ``S`` is read back by tomography (``shots``;
  the ``r`` largest for a dense upload with ``sparsity > 0``) and written to the model.

Classical steps — every step of ``mode="classical"`` and of a classical window — are bit-identical to
``torch.optim.SGD`` (same ``lr``, ``momentum``, ``dampening``, ``nesterov``, ``weight_decay``, per
parameter group), and like SGD's they take ``step()`` without a closure (the gradients already in
``.grad``) or a closure that does not call ``backward()``.  The upload and the steps of a live window
need a closure that calls ``backward()`` (the window expands that loss, and re-evaluates each batch's
gradient at θ0): ``step()`` without one there raises a ``TypeError`` naming the step.
A quantum window runs plain gradient descent (the paper's Eq. I.3) on ``L + Σ_i (wd_i/2) θ_i²`` (each
coordinate with its group's weight decay: F0 gets ``wd_i·θ0_i``, F1 ``−η·wd_i`` on its diagonal) with
one step size η: outside ``mode="classical"`` the groups must share ``lr``; momentum applies to classical
steps only and its buffers restart after a quantum window.

``QODE`` schedules the cycle and keeps the ``Optimizer`` contract (the parameter group, state_dict,
hooks, copies); what the steps do lives below it: a classical step is
:func:`~torch_qode.training.classical.classical_step`, the quantum steps (upload, window step, window
end) are the functions of :mod:`~torch_qode.training.cycle`, and their maths the window core
(:mod:`~torch_qode.training.window`).
"""
from __future__ import annotations

import inspect
import time
import typing
import warnings
from typing import Callable, Optional

import numpy as np
import torch
from torch.optim import Optimizer

from ..bridge import flat as _flat
from ..bridge.dissipation import DissipationCheck
from ..bridge.pruning import MagnitudePruner
from . import cycle as _cycle, window as _w
from .amp import check_scaler
from .capture import NEEDS_CLOSURE, checked_closure, loss_value
from .check import refuse_settings
from .classical import MaskedSGD, classical_step
from ..bridge.collective import refuse_sharded
from .comm import Comm
from .distributed import agreed, window_comm
from .shots import predicted_displacement
from .config import (MODES, NOISES, SETTINGS, UPLOADS, QODEConfig, check_budget, check_saved_config,
                     check_sgd_settings, check_trainable, make_config, readout_warning, settings_fields,
                     with_settings)
from .report import CycleReport, download_record
from .window_monitor import WindowMonitor, as_window_monitor
from .window import EXPLICIT_MAX_SUPPORT, KAPPA_MAX_UNKNOWNS  # noqa: F401  (public constants)

__all__ = ["QODE", "CycleReport", "MODES", "UPLOADS", "NOISES"]


class QODE(Optimizer):
    """Sparse training through a simulated quantum ODE solver (see the module docstring).

    The settings (``mode`` … ``seed`` below) are the fields of the one schema,
    :class:`~torch_qode.training.config.QODEConfig`: this list, the signature, the saved state and the
    recipes' ``qode:`` section are written from it.

    Args:
        params: iterable of parameters, or of parameter groups (dicts, as for ``torch.optim.SGD``: e.g. no
            weight decay on biases and norms).  Groups may differ in ``weight_decay``, ``momentum``,
            ``dampening``, ``nesterov``, ``foreach`` and ``fused``; in ``lr`` only with
            ``mode="classical"`` (a window runs one step size; a ValueError naming ``lr`` otherwise).
        lr, momentum, weight_decay, dampening, nesterov: as ``torch.optim.SGD``.
        foreach, fused: as ``torch.optim.SGD``: the implementation of the classical steps (a window's
            steps are the Carleman system's).  ``maximize`` and ``differentiable`` are accepted only
            as False (QODE minimises; its steps are not differentiable), so that SGD's keywords port.
        dissipation: a :class:`~torch_qode.bridge.dissipation.DissipationCheck` (default: its defaults).
        prunable: which tensors the download prunes (default: ``keep_dense_rule(model)`` when ``keep_dense``,
            else ``p.dim() > 1``).
        names: parameter names for per-layer pruning reports.
        monitor: a :class:`~torch_qode.training.window_monitor.WindowMonitor` (e.g.
            :class:`~torch_qode.training.monitor.DissipationMonitor`), or any object with some of its
            methods ``on_upload(step, verdict)``, ``on_window_open(step, carleman)``,
            ``on_window_closed(step)``, ``on_window_end(step, report)``: wrapped once, here
            (:attr:`window_monitor`).
        model: the module the parameters belong to (optional; ``hvp="recompute"`` needs it).  With it,
            the closures QODE evaluates only to measure (``track_sgd``'s shadows, ``restore_expansion``)
            and the recomputed products run with BatchNorm running statistics frozen.
        comm: the window's communication object (:class:`~torch_qode.training.comm.Comm`; default: by the
            rule of ``hessian_spectrum``, :func:`~torch_qode.training.distributed.window_comm`: a
            :class:`~torch_qode.training.distributed.DistComm` over ``process_group``, else over the group of a
            DDP-wrapped ``model``; else, also under an initialised group, rank-local ``LocalComm``).
        process_group: the torch.distributed group the window averages its Hessian products over and
            shares its decisions in.  QODE expects the gradients DDP-averaged (pass ``model=`` the DDP
            wrapper); it checks at every upload that θ0 and ∇L are the same on every rank.  Settings that
            differ between ranks are refused here, on every rank.
        kappa_a: deprecated spelling of ``solver_options={"kappa_a": ...}`` (a DeprecationWarning).
        <settings>

    Differences from ``torch.optim.SGD`` a user meets: every parameter must require grad (pass
    ``[p for p in model.parameters() if p.requires_grad]``); the groups are fixed at construction
    (``add_param_group`` afterwards is refused) and share ``lr`` outside ``mode="classical"``; no
    ``maximize``; sparse gradients train classically only; the upload and window steps need a closure.
    The closure may return anything (its value is reported when it is one number).  ``copy.deepcopy``
    and ``pickle`` keep the whole state.
    """

    @agreed
    def __init__(self, params, lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0, *,
                 dampening: float = 0.0, nesterov: bool = False, dissipation: Optional[DissipationCheck] = None,
                 prunable=None, names=None, monitor=None, model: Optional[torch.nn.Module] = None,
                 comm: Optional[Comm] = None, process_group=None, maximize: bool = False,
                 foreach: Optional[bool] = None, fused: Optional[bool] = None, differentiable: bool = False,
                 kappa_a: Optional[float] = None, **settings):
        check_sgd_settings(dict(lr=lr, momentum=momentum, weight_decay=weight_decay, dampening=dampening,
                                nesterov=nesterov, maximize=maximize, foreach=foreach, fused=fused,
                                differentiable=differentiable))
        if not isinstance(lr, torch.Tensor):          # a tensor lr stays the tensor, as in SGD
            lr = float(lr)
        momentum, weight_decay, dampening = float(momentum), float(weight_decay), float(dampening)
        cfg = make_config(kappa_a=kappa_a, **settings)
        if cfg.hvp == "recompute" and model is None:
            raise ValueError("hvp='recompute' needs model=: each product replays the upload closure, and the "
                             "replays must leave BatchNorm running statistics alone; pass QODE(..., model=model) "
                             "or hvp='retain'")
        refuse_settings(dissipation, cfg.window, cfg.mode)
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        comm = window_comm(comm, process_group, model)
        if not comm.local and cfg.hvp == "recompute":
            raise ValueError("hvp='recompute' under torch.distributed: a replay of a DDP closure would run DDP's "
                             "gradient all-reduce inside every product (not supported yet); use hvp='retain' "
                             "(hvp='auto' retains under torch.distributed)")
        if not comm.local and getattr(dissipation, "process_group", None) is not None:
            raise ValueError("dissipation: QODE averages the check's Hessian-vector products through its own comm; "
                             "pass a DissipationCheck with process_group=None")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=False, foreach=foreach, fused=fused, differentiable=False)
        super().__init__(params, defaults)
        base_keys = set(self.__dict__)
        for i, group in enumerate(self.param_groups):
            check_sgd_settings(group, where="the parameter group's " if len(self.param_groups) == 1
                               else f"param_groups[{i}]'s ")
        _w.check_window_groups(self.param_groups, cfg.mode)
        self._params = [p for group in self.param_groups for p in group["params"]]
        for group in self.param_groups:      # (params[i]: the i-th of its group)
            check_trainable(group["params"], fused=group["fused"], classical=cfg.mode == "classical")
        refuse_sharded(self._params, model=model)
        self.cfg, self.comm = cfg, comm
        self.dissipation = dissipation if dissipation is not None else DissipationCheck(seed=cfg.seed)
        self.monitor, self.model = monitor, model
        self.pruner = MagnitudePruner(self._params, cfg.sparsity, names=names, prunable=prunable,
                                      model=model if cfg.keep_dense else None,
                                      **cfg.pruner_options()) if cfg.sparsity > 0 else None
        self._n_total = _flat.numel(self._params)
        n_S = self._n_total - (self.pruner.n_pruned_target() if cfg.upload == "sparse" and self.pruner else 0)
        check_budget(cfg, n_S)
        self._rng = np.random.default_rng(cfg.seed)
        self._reports: list[CycleReport] = []
        self._k = 0
        self._win: Optional[_w.WindowState] = None   # the live quantum window
        self._masked = MaskedSGD()            # classical steps without a host sync
        self._closure_checked = False         # the first quantum step checks that the closure calls backward()
        self._readout_checked = False         # the first window checks that the shots resolve its readout
        self._own_keys = tuple(k for k in self.__dict__ if k not in base_keys)
        self._register_own_hooks()            # QODE's part of the state_dict (not in _own_keys: hooks don't copy)

    def add_param_group(self, param_group: dict) -> None:
        """As :meth:`torch.optim.Optimizer.add_param_group` while QODE is being built (pass every group to
        ``QODE(...)``, as for SGD); once built, its parameters are fixed (the download's pruner, the
        window's flat vector and the saved state are over them), so a later group is refused.

        Args:
            param_group: ``{"params": ..., "lr": ..., "weight_decay": ..., ...}``.

        Raises:
            ValueError: the optimizer is built already.
        """
        if "cfg" in self.__dict__:
            raise ValueError("QODE: add_param_group after construction is not supported (the download's pruner, "
                             "the window's flat parameter vector and the saved state cover the parameters given to "
                             "QODE); pass every group to QODE([{'params': ...}, {'params': ..., 'weight_decay': 0}])")
        super().add_param_group(param_group)

    def __getattr__(self, name: str):
        """The settings read as attributes (``opt.cycle``, ``opt.mode``, ``opt.window_length``, …):
        :attr:`cfg`'s fields and derived values, never a copy of them."""
        cfg = self.__dict__.get("cfg")
        if cfg is not None and name in _SETTING_VIEWS:
            return getattr(cfg, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ------------------------------------------------------------------------------ views
    @property
    def reports(self) -> list:
        """One :class:`CycleReport` per cycle (reading it counts the skipped classical steps in)."""
        self._count_skipped()
        return self._reports

    @reports.setter
    def reports(self, value: list) -> None:
        self._reports = list(value)

    @property
    def step_count(self) -> int:
        """Steps taken so far (``k``)."""
        return self._k

    @property
    def monitor(self):
        """The monitor given to QODE (``None``: none); assigning one wraps it again (see :attr:`window_monitor`)."""
        return self.__dict__.get("_monitor")

    @monitor.setter
    def monitor(self, value) -> None:
        self._monitor, self._window_monitor = value, as_window_monitor(value)

    @property
    def window_monitor(self) -> WindowMonitor:
        """:attr:`monitor` as QODE calls it: a :class:`~torch_qode.training.window_monitor.WindowMonitor`
        with all four methods (no-ops for those the monitor lacks, or for no monitor)."""
        return self._window_monitor

    @property
    def awaits_expansion(self) -> bool:
        """True exactly when a resumed matrix-free window waits for :meth:`restore_expansion` (its Taylor
        terms lived in the upload batch's autograd graph, which no state_dict holds)."""
        return self._win is not None and self._win.system is None

    @property
    def in_quantum_window(self) -> bool:
        return self._win is not None

    @property
    def _expansion(self):
        return None if self._win is None else self._win.expansion

    @property
    def _system(self):
        return None if self._win is None else self._win.system

    def _count_skipped(self, last: Optional[int] = None) -> None:
        """Move the device count of masked (skipped) classical steps into the report (one host read)."""
        if self._reports:
            self._masked.count_into(self._reports[-1], self._k - 1 if last is None else last)

    # ----------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):  # type: ignore[override]
        """One training step.

        A classical step (``c < classical_steps``, a classical window, every step of ``mode="classical"``)
        is ``torch.optim.SGD.step``: ``closure`` is optional, and may or may not call ``backward()`` (the
        gradients in ``.grad`` after it are used).  A step that is, or may be, quantum (the upload, whose
        loss the window expands, and every step of a live window, which re-evaluates its batch's
        gradient at θ0) needs a closure that re-evaluates the loss and calls ``backward()`` (as for
        LBFGS); the first such step checks that it does (any ``.grad`` changed).

        Args:
            closure: re-evaluates the loss (``None``: a classical step with the gradients in ``.grad``).

        Returns:
            The closure's return value (``None`` without a closure).

        Raises:
            TypeError: no closure (or not a callable) at a step that needs one, naming that step.
            RuntimeError: a ``torch.amp.GradScaler`` at the upload or a window step (or with a closure).
        """
        if closure is not None and not callable(closure):
            raise TypeError(f"closure must be callable or None, got {type(closure).__name__}. " + NEEDS_CLOSURE)
        cfg = self.cfg
        c = self._k % cfg.cycle
        quantum = cfg.mode != "classical" and (c == cfg.classical_steps or
                                               (c > cfg.classical_steps and self._win is not None))
        scaled = check_scaler(self, quantum, closure, self._k)     # torch.amp.GradScaler's, or None
        if quantum:
            if closure is None:
                raise TypeError(_needs_closure(self._k, c == cfg.classical_steps, self._win, cfg.mode))
            if not self._closure_checked:
                closure = checked_closure(closure, self._params)
        if c == 0:
            self._download()
        t0 = time.perf_counter()
        rep, post = self._reports[-1], ()
        if c == cfg.classical_steps and cfg.mode == "classical":
            rep.mode, rep.reason = "classical", "mode='classical'"
        if c < cfg.classical_steps or cfg.mode == "classical" or (c > cfg.classical_steps and self._win is None):
            loss = classical_step(closure, self.param_groups, self.state, self._masked, rep, self._k, scaled)
        else:                                        # the upload, or a step inside the window
            steps = self._context()
            loss, post = (steps.upload if c == cfg.classical_steps else steps.window_step)(closure, rep, self._k)
            if not self._readout_checked and self._win is not None:
                self._readout_checked = True      # once: the first window's θ0 on S
                why = readout_warning(self.cfg, self._win.read_estimate(), predicted_displacement(self._win))
                if why is not None:
                    warnings.warn(why, stacklevel=4)   # the caller of opt.step (no_grad, step hooks)
        self._closure_checked = self._closure_checked or quantum
        if c in (0, cfg.cycle - 1):   # two host syncs per cycle, not one per step
            value = self.comm.mean(loss_value(loss))   # the global batch's under DDP (equal shards)
            if c == 0:
                rep.loss_first = value
            if c == cfg.cycle - 1:
                rep.loss_last = value
                self._count_skipped(last=self._k)
        self._k += 1
        try:       # the step is complete: an exception from a measurement leaves a consistent optimizer
            for action in post:
                action()
        finally:
            rep.seconds += time.perf_counter() - t0
        return loss

    def _download(self) -> None:
        """At c = 0: prune (the tomographic download) and open the cycle's report (once: a step retried
        after its closure raised does not open a second one)."""
        if self._reports and self._reports[-1].start_step == self._k:
            return
        self._count_skipped()
        rep = CycleReport(cycle=self._k // self.cfg.cycle, start_step=self._k, window=self.cfg.window_length)
        self._reports.append(rep)
        if self.pruner is not None:
            self.pruner.prune()
            rep.download = download_record(self.pruner)

    def _context(self) -> _cycle.QuantumSteps:
        """The quantum steps of this optimizer (:mod:`~torch_qode.training.cycle`): built once, not saved."""
        steps = self.__dict__.get("_quantum_steps")
        if steps is None or steps.opt is not self:
            steps = self.__dict__["_quantum_steps"] = _cycle.QuantumSteps(self)
        return steps

    @torch.no_grad()
    def restore_expansion(self, closure: Callable[[], torch.Tensor]) -> None:
        """Rebuild a resumed matrix-free window's Taylor terms exactly, from the upload batch.

        A matrix-free window's F1..Fq live in the upload batch's autograd graph, which no state_dict can hold: after
        :meth:`load_state_dict` inside such a window, call this and training continues bit-for-bit as if never
        interrupted.  Without it, the next step re-expands on its own batch and the report says so.

        Args:
            closure: the loss on *the upload step's batch*, as :meth:`step`'s (the model holds θ0 throughout the
                window; pass ``model=`` to QODE so this forward leaves BatchNorm running statistics alone).

        Raises:
            TypeError: ``closure`` is not callable.
            RuntimeError: no resumed matrix-free window waits for its Taylor terms."""
        if closure is None or not callable(closure):
            raise TypeError("restore_expansion needs a closure over the upload step's batch")
        if self._win is None or self._win.system is not None:
            raise RuntimeError("restore_expansion: no resumed matrix-free window is waiting for its Taylor terms")
        _cycle.restore_expansion(self._win, closure, self._params, self.cfg, self.comm, self.model)

    def _release(self) -> None:
        if self._win is not None:
            self._win.release()
        self._win = None

    # ----------------------------------------------------------------------------- state dict
    def _config(self) -> dict:
        """The settings a saved state depends on (checked by :meth:`load_state_dict`)."""
        return {**self.cfg.saved(), "n_params": self._n_total}

    def _register_own_hooks(self) -> None:
        """QODE's own part of the state, through torch's public hooks, registered outermost.

        Everything needed to resume bit-for-bit, also inside a window, is the ``"qode"`` entry of
        :meth:`state_dict` (wall-clock times stay out: two optimizers with the same history have equal
        state_dicts).  Three hooks carry it, and stay where they are when a user registers more:

        * a ``state_dict`` post-hook, first, adds the entry (every user post-hook sees it);
        * a ``load_state_dict`` pre-hook, last, takes the entry out and checks its settings against
          this optimizer's before anything is loaded (every user pre-hook sees it and may replace it);
        * a ``load_state_dict`` post-hook, first, restores QODE's own state (every user post-hook sees
          the optimizer fully loaded).

        A matrix-free window cannot be serialised (its Hessian-vector products live in the upload
        batch's autograd graph): after ``load_state_dict`` inside one, call :meth:`restore_expansion`
        with a closure over the upload batch to continue exactly; otherwise the next step re-expands at
        θ0 on *its* batch and the report notes it.  Called by ``__init__``, by ``__setstate__`` (torch
        does not copy hooks) and after every hook registration; the old registrations are removed.
        """
        for handle in self.__dict__.get("_own_hooks", ()):
            handle.remove()
        self._own_hooks = (
            Optimizer.register_state_dict_post_hook(self, _save_own_state, prepend=True),
            Optimizer.register_load_state_dict_pre_hook(self, _take_own_state),
            Optimizer.register_load_state_dict_post_hook(self, _load_own_state, prepend=True))

    def register_state_dict_post_hook(self, hook: Callable, prepend: bool = False):
        """As :meth:`torch.optim.Optimizer.register_state_dict_post_hook`; the hook sees the ``"qode"`` entry.

        Args:
            hook: ``hook(optimizer, state_dict) -> state_dict or None``.
            prepend: run it before the other user post-hooks (QODE's own still runs first).

        Returns:
            The handle that removes the hook."""
        handle = super().register_state_dict_post_hook(hook, prepend=prepend)
        self._register_own_hooks()
        return handle

    def register_load_state_dict_pre_hook(self, hook: Callable, prepend: bool = False):
        """As :meth:`torch.optim.Optimizer.register_load_state_dict_pre_hook`; the hook sees, and may
        replace, the ``"qode"`` entry (QODE's own pre-hook, which takes it out, runs last).

        Args:
            hook: ``hook(optimizer, state_dict) -> state_dict or None``.
            prepend: run it before the other user pre-hooks.

        Returns:
            The handle that removes the hook."""
        handle = super().register_load_state_dict_pre_hook(hook, prepend=prepend)
        self._register_own_hooks()
        return handle

    def register_load_state_dict_post_hook(self, hook: Callable, prepend: bool = False):
        """As :meth:`torch.optim.Optimizer.register_load_state_dict_post_hook`; the hook sees the optimizer
        fully loaded (QODE's own post-hook runs first).

        Args:
            hook: ``hook(optimizer) -> None``.
            prepend: run it before the other user post-hooks (QODE's own still runs first).

        Returns:
            The handle that removes the hook."""
        handle = super().register_load_state_dict_post_hook(hook, prepend=prepend)
        self._register_own_hooks()
        return handle

    def _load_window(self, win: Optional[dict]) -> None:
        if win is not None:
            self._win = _w.load_window(win, self.cfg, self.comm, self._rng, self._params, self._context().watched())

    # ------------------------------------------------------------------------------ copy / pickle
    def __getstate__(self) -> dict:
        """``copy.deepcopy`` and ``pickle`` keep the whole optimizer.  A live window travels as in
        :meth:`state_dict`: exact with explicit Taylor terms; a matrix-free one needs
        :meth:`restore_expansion` on the copy (its terms live in an autograd graph)."""
        self._count_skipped()
        state = super().__getstate__()               # defaults, state, param_groups (no hooks, as torch.optim)
        state.update({k: self.__dict__[k] for k in self._own_keys})   # not what others attached (an
        state["_own_keys"] = self._own_keys                            # LR scheduler's step wrapper)
        state["_win_saved"] = None if self._win is None else _w.window_state_dict(self._win, self.cfg.track_sgd)
        state["_win"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        """Also what :meth:`load_state_dict` calls: a group saved before SGD's newer flags existed (or
        by SGD) gets their defaults, as ``torch.optim.SGD.__setstate__`` gives them."""
        win = state.pop("_win_saved", None)
        copied = "_optimizer_load_state_dict_pre_hooks" not in self.__dict__   # a copy or an unpickle: no hooks
        super().__setstate__(state)
        if copied:
            self._register_own_hooks()
        for group in self.param_groups:
            for flag, default in (("nesterov", False), ("maximize", False), ("foreach", None), ("fused", None),
                                  ("differentiable", False)):
                group.setdefault(flag, default)
        self._load_window(win)


def _needs_closure(k: int, upload: bool, win, mode: str) -> str:
    """The TypeError's text for ``step()`` without a closure at step ``k``, the upload or a window step."""
    which = "the upload (c = classical_steps)" if upload else f"step t={win.t} of a quantum window"
    return (f"QODE.step(): step {k} is {which} of its cycle (mode={mode!r}), which needs a closure. "
            f"{NEEDS_CLOSURE}\nThe classical steps (c < classical_steps, and every step of mode='classical') "
            "take step() without one, as torch.optim.SGD.")


# ------------------------------------------------------- QODE's part of the state (its three hooks)
def _save_own_state(opt: QODE, state_dict: dict) -> None:
    """The ``state_dict`` post-hook: add the ``"qode"`` entry (step, RNG, settings, reports, pruner, window)."""
    state_dict["qode"] = {
        "k": opt._k, "rng": opt._rng.bit_generator.state, "config": opt._config(),
        "reports": [r.state() for r in opt.reports],
        "pruner": opt.pruner.state_dict() if opt.pruner is not None else None,
        "window": None if opt._win is None else _w.window_state_dict(opt._win, opt.cfg.track_sgd)}


def _take_own_state(opt: QODE, state_dict: dict) -> dict:
    """The ``load_state_dict`` pre-hook: take the ``"qode"`` entry out and check its settings.

    Returns:
        ``state_dict`` without the entry (a new dict: the caller's is left alone).

    Raises:
        ValueError: no ``"qode"`` entry, or settings the saved state cannot be resumed under.
    """
    q = state_dict.get("qode")
    if q is None:
        raise ValueError("state_dict: not a QODE state_dict (missing the 'qode' entry)")
    check_saved_config(q.get("config") or {}, opt._config())
    opt.__dict__["_loading"] = q              # for _load_own_state, once torch has loaded the rest
    return {k: v for k, v in state_dict.items() if k != "qode"}


def _load_own_state(opt: QODE) -> None:
    """The ``load_state_dict`` post-hook: restore QODE's own state from the entry the pre-hook took."""
    q = opt.__dict__.pop("_loading")
    opt._release()
    opt._k = int(q["k"])
    opt._rng = np.random.default_rng()
    opt._rng.bit_generator.state = q["rng"]
    opt._reports = [CycleReport(**r) for r in q["reports"]]
    opt._masked = MaskedSGD()
    if opt.pruner is not None and q["pruner"] is not None:
        opt.pruner.load_state_dict(q["pruner"])
    opt._load_window(q["window"])


#: the attributes QODE reads from its settings (the schema's fields and the values derived from them)
_SETTING_VIEWS = frozenset(SETTINGS) | {"window_length", "degree", "kappa_a"}


def signature(init: Callable, schema: type = QODEConfig) -> inspect.Signature:
    """``init``'s signature with ``**settings`` written out: one keyword-only parameter per field of
    ``schema``, with its default and annotation (what ``help(QODE)``, IDEs and ``inspect`` show).

    Args:
        init: a function taking ``**settings`` (``QODE.__init__``).
        schema: the settings class.

    Returns:
        The signature, the settings after ``init``'s own keyword-only parameters.
    """
    sig = inspect.signature(init)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    hints = typing.get_type_hints(schema)
    params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
               for f in settings_fields(schema)]
    return sig.replace(parameters=params)


QODE.__init__.__signature__ = signature(QODE.__init__.__wrapped__)
#: torch.amp.GradScaler.step sets opt.grad_scale / opt.found_inf and leaves the unscaling to QODE (amp.py)
QODE._step_supports_amp_scaling = True
QODE.__doc__ = with_settings(QODE.__doc__)
