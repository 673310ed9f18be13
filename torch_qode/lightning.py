"""Lightning integration: :class:`QODECallback` (``pip install 'torch_qode[lightning]'``).

QODE runs under a Lightning ``Trainer`` as it is: automatic optimisation hands ``optimizer.step`` the
closure QODE needs (training_step, zero_grad, backward), and a manual ``training_step`` passes its own
(``opt.step(closure)``).  The callback adds what a plain ``Trainer`` cannot know:

* **mid-window checkpoints resume bit for bit.**  A matrix-free window's Taylor terms F1..Fq live in
  the upload batch's autograd graph, which no checkpoint holds (``QODE.load_state_dict``).  The
  callback keeps the upload step's batch, its index and the global RNG state before it in the
  checkpoint, and at the first training batch after a resume rebuilds the expansion from them
  (:meth:`~torch_qode.QODE.restore_expansion`) through the module's own ``training_step``;
* **a** :class:`~torch_qode.DissipationMonitor` **driven by Lightning's hooks**: attached to the
  optimizer (upload verdicts, window ends), a probe spectrum ``monitor.step(k)`` after every step
  ``k`` on its schedule (and before the first), a download record at every pruning step;
* **each completed cycle logged** with ``pl_module.log`` (``qode/quantum``, ``qode/window`` (the T the
  window ran), ``qode/pred_lin`` (the check's predicted linearisation error at that T; ``qode/proxy_T``
  under the paper's criterion), ``qode/drift``, ``qode/drift_lin``, the drift's parts ``qode/drift_support``,
  ``qode/drift_linearization``, ``qode/drift_readout_pruning``, ``qode/drift_readout_noise``,
  ``qode/loss``, ``qode/support_size``, ``qode/cycle``), so any
  Lightning logger sees them; the loggers write them when ``log_every_n_steps`` divides ``cycle``.

This module imports Lightning; ``import torch_qode`` does not (``torch_qode.QODECallback`` loads it
on first use).
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist

try:
    import lightning.pytorch as pl
    from lightning.fabric.utilities.apply_func import apply_to_collection, move_data_to_device
    from lightning.pytorch.utilities import rank_zero_warn
    from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
    from typing_extensions import override
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("torch_qode.lightning needs Lightning: pip install 'torch_qode[lightning]' "
                      "(or pip install 'lightning>=2.4')") from exc

from .bridge.flat import forked_rng
from .training.distributed import DistComm, bind_comm
from .training.monitor import DissipationMonitor
from .training.qode import QODE

__all__ = ["QODECallback"]


def _rng_state(device: torch.device) -> dict:
    """The global RNG state that a step on ``device`` draws from (CPU, and its CUDA device)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _loss_of(output: Any) -> Optional[torch.Tensor]:
    """The loss a ``training_step`` returned (a tensor, or ``{"loss": tensor, ...}``), as Lightning reads it."""
    if isinstance(output, Mapping):
        output = output.get("loss")
    return output if isinstance(output, torch.Tensor) else None


class _Restored(Exception):
    """Raised by the step pre-hook of a manual restore once the expansion is rebuilt: the measuring
    ``training_step`` stops at its ``opt.step(closure)``, and the step itself never runs."""


@contextlib.contextmanager
def _silenced(pl_module: "pl.LightningModule"):
    """``self.log`` / ``self.log_dict`` do nothing inside: a measurement's ``training_step`` logs no metric.

    Lightning has no public switch for this (``self.log`` writes into the running loop's results,
    under the hook being run), so the two methods are shadowed on the instance for the call only.
    """
    def nothing(*args, **kwargs):
        return None

    pl_module.log, pl_module.log_dict = nothing, nothing
    try:
        yield
    finally:
        del pl_module.log, pl_module.log_dict


class QODECallback(pl.Callback):
    """Exact mid-window resumes, a driven :class:`~torch_qode.DissipationMonitor` and per-cycle logging
    for :class:`~torch_qode.QODE` under a Lightning ``Trainer`` (see the module docstring).

    Args:
        monitor: a :class:`~torch_qode.DissipationMonitor` (or ``None``).  It is attached to the QODE
            optimizer (``opt.monitor``) unless that already has one, which must then be this one.

    ``configure_optimizers`` must return one :class:`~torch_qode.QODE` optimizer (other optimizers
    may sit beside it in manual optimisation), and ``accumulate_grad_batches`` must be 1: QODE's
    upload expands the graph of the closure's loss, which under Lightning's accumulation would be the
    last micro-batch's alone (accumulate inside one manual closure instead).  Under DDP a checkpoint
    holds every rank's upload batch (gathered when Lightning saves it, on every rank), and each rank
    restores from its own; resuming inside a window needs the same number of ranks.
    """

    def __init__(self, monitor: Optional[DissipationMonitor] = None):
        if monitor is not None and not isinstance(monitor, DissipationMonitor):
            raise TypeError(f"monitor must be a DissipationMonitor or None, got {type(monitor).__name__}")
        self.monitor = monitor
        self._upload: Optional[dict] = None     # the live window's upload: step, batch, batch_idx, rng
        self._pending: Optional[dict] = None    # an upload loaded from a checkpoint, to restore from
        self._before: Optional[tuple] = None    # (step count, upload candidate) at this batch's start

    # ------------------------------------------------------------------------------- set-up
    @staticmethod
    def qode(trainer: "pl.Trainer") -> QODE:
        """The trainer's one QODE optimizer (a clear error when there is none or more than one)."""
        found = [o for o in trainer.optimizers if isinstance(o, QODE)]
        if len(found) != 1:
            raise ValueError(f"QODECallback needs exactly one torch_qode.QODE optimizer from configure_optimizers, "
                             f"got {len(found)} among {[type(o).__name__ for o in trainer.optimizers]}")
        return found[0]

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Check the set-up, attach the monitor to the QODE optimizer and, under a DDP strategy, bind the
        optimizer to the strategy's process group (:func:`~torch_qode.training.distributed.bind_comm`: QODE
        was built in ``configure_optimizers`` on the unwrapped module, so it started rank-local).

        Warns when ``log_every_n_steps`` does not divide ``cycle`` (the loggers would miss cycles).

        Args:
            trainer: the running trainer.
            pl_module: the module being fit.

        Raises:
            ValueError: not exactly one QODE optimizer, ``accumulate_grad_batches != 1``, the optimizer
                already has another monitor, or (on every rank) its settings differ between ranks.
        """
        opt = self.qode(trainer)
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(f"QODECallback: accumulate_grad_batches={trainer.accumulate_grad_batches}: QODE's upload "
                             "expands the graph of the closure's loss, which would be the last micro-batch's alone; "
                             "use accumulate_grad_batches=1 (accumulate inside one closure in manual optimisation)")
        ddp = trainer.strategy.model
        if trainer.world_size > 1 and opt.comm.local and isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            bind_comm(opt, DistComm(ddp.process_group))   # the strategy wrapped the model after configure_optimizers
        if self.monitor is not None:
            if opt.monitor is None:
                opt.monitor = self.monitor
            elif opt.monitor is not self.monitor:
                raise ValueError("QODECallback(monitor=...): the QODE optimizer already has another monitor; pass the "
                                 "same DissipationMonitor to both, or to the callback only")
        every = trainer.log_every_n_steps
        if trainer.loggers and every and opt.cycle % every:
            rank_zero_warn(f"QODECallback: log_every_n_steps={every} does not divide cycle={opt.cycle}, so Lightning's "
                           f"loggers write the per-cycle metrics of some cycles only (trainer.callback_metrics has "
                           f"each); set Trainer(log_every_n_steps=...) to a divisor of {opt.cycle}")

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """The monitor's step 0 (the state before training) when training starts from scratch.

        Args:
            trainer: the running trainer.
            pl_module: the module being fit.
        """
        if self.monitor is not None and self.qode(trainer).step_count == 0:
            self.monitor.step(0)                  # the state before training, as a plain loop's step(0)

    # --------------------------------------------------------------------------- every batch
    @override
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        """Before a batch: restore a resumed window's expansion (after a checkpoint load), record a download
        with the monitor, and keep a copy of the batch (and the RNG state) when it is the window's upload.

        Args:
            trainer: the running trainer.
            pl_module: the module being fit.
            batch: the batch.
            batch_idx: its index in the epoch.

        Raises:
            RuntimeError: the checkpoint's upload is not that of the window the optimizer resumed in.
        """
        opt = self.qode(trainer)
        if self._pending is not None:
            self._restore(trainer, pl_module, opt)
        k = opt.step_count
        if self.monitor is not None and k % opt.cycle == 0 and opt.sparsity > 0:
            self.monitor.record({"step": k, "event": "download", "download": True})
        candidate = None
        if k % opt.cycle == opt.classical_steps and opt.mode != "classical":    # this batch is the upload
            candidate = {"step": k, "batch_idx": int(batch_idx), "rng": _rng_state(pl_module.device),
                         "batch": apply_to_collection(batch, torch.Tensor, lambda t: t.detach().clone())}
        self._before = (k, candidate)

    @override
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """After a batch that stepped the optimizer: keep the upload while its window is live, step the
        monitor, and log the cycle's report once a cycle completes.

        Args:
            trainer: the running trainer.
            pl_module: the module being fit.
            outputs: what ``training_step`` returned.
            batch: the batch.
            batch_idx: its index in the epoch.
        """
        opt = self.qode(trainer)
        k = opt.step_count
        before, candidate = self._before if self._before is not None else (None, None)
        self._before = None
        if before is None or k != before + 1:     # no optimizer step on this batch
            return
        if candidate is not None:
            self._upload = candidate if opt.in_quantum_window else None
        elif not opt.in_quantum_window:
            self._upload = None                   # the window closed: nothing left to restore
        if self.monitor is not None:
            self.monitor.step(k)                  # the state after k steps
        if k % opt.cycle == 0:
            self._log_cycle(pl_module, opt.reports[-1])

    def _log_cycle(self, pl_module: "pl.LightningModule", rep) -> None:
        """The completed cycle's report through ``pl_module.log`` (absent numbers are left out)."""
        drift, dis = rep.drift or {}, rep.dissipation or {}
        proxy, pred = dis.get("proxy"), dis.get("predicted_error")
        metrics = {"qode/cycle": rep.cycle, "qode/quantum": float(rep.mode == "quantum"),
                   "qode/proxy_T": None if not proxy or dis.get("criterion") == "predicted" else proxy[-1],
                   "qode/pred_lin": None if not pred else pred[min(rep.window, len(pred) - 1)],
                   "qode/window": rep.window, "qode/drift": drift.get("relative"),
                   "qode/drift_lin": drift.get("linearization_relative"), "qode/loss": rep.loss_last,
                   "qode/support_size": rep.support_size}
        for part, value in (drift.get("parts") or {}).items():   # the drift's four parts (issue 21)
            metrics[f"qode/drift_{part}"] = value
        for name, value in metrics.items():
            if value is not None:
                pl_module.log(name, float(value), on_step=True, on_epoch=False)

    # ------------------------------------------------------------------------- checkpoints
    @override
    def state_dict(self) -> dict:
        """The live window's upload (step, batch, batch index, RNG state), or ``None`` between windows;
        under torch.distributed also every rank's (``"ranks"``: a collective, Lightning asks every rank).

        Returns:
            ``{"upload": ..., "ranks": ...}`` (``"ranks"`` is ``None`` in one process).
        """
        return {"upload": self._upload, "ranks": _gathered(self._upload)}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        """Keep a checkpoint's upload (this rank's) to rebuild the window's expansion from at the next batch.

        Args:
            state_dict: a dict from :meth:`state_dict` (or ``None``).

        Raises:
            ValueError: the checkpoint was taken inside a window on another number of ranks.
        """
        state_dict = state_dict or {}
        ranks, up = state_dict.get("ranks"), state_dict.get("upload")
        world, rank = _world()
        if ranks is not None and any(r is not None for r in ranks):
            if len(ranks) != world:
                raise ValueError(f"QODECallback: the checkpoint was taken inside a quantum window on {len(ranks)} "
                                 f"ranks, this run has {world}: the window's Taylor terms are each rank's upload "
                                 f"batch; resume with {len(ranks)} ranks, or from a checkpoint between windows")
            up = ranks[rank]
        self._pending = up
        self._upload = None

    def _restore(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", opt: QODE) -> None:
        """After a resume: rebuild a matrix-free window's expansion from the saved upload batch."""
        up, self._pending = self._pending, None
        if up is None or not opt.in_quantum_window:
            return
        self._upload = up                         # kept for the window's later checkpoints
        if not opt.awaits_expansion:              # explicit Taylor terms are in the state: nothing to rebuild
            return
        if up["step"] // opt.cycle != opt.step_count // opt.cycle:
            raise RuntimeError(f"QODECallback: the checkpoint's upload (step {up['step']}) is not the one of the "
                               f"window the optimizer resumed in (step {opt.step_count}, cycle {opt.cycle})")
        batch = move_data_to_device(up["batch"], pl_module.device)
        kwargs = OrderedDict(batch=batch)
        if is_param_in_hook_signature(pl_module.training_step, "batch_idx", min_args=2):
            kwargs["batch_idx"] = up["batch_idx"]
        with forked_rng(list(pl_module.parameters())), _silenced(pl_module):
            _set_rng_state(up["rng"], pl_module.device)        # dropout draws the upload's masks again
            if pl_module.automatic_optimization:
                self._restore_automatic(trainer, opt, kwargs)
            else:
                self._restore_manual(trainer, opt, kwargs)

    @staticmethod
    def _restore_automatic(trainer: "pl.Trainer", opt: QODE, kwargs: OrderedDict) -> None:
        """Lightning's automatic closure on the upload batch: training_step, zero_grad, backward."""
        def closure():
            loss = _loss_of(trainer.strategy.training_step(*kwargs.values()))
            if loss is None:
                raise RuntimeError("QODECallback: training_step returned no loss on the upload batch")
            opt.zero_grad()
            trainer.strategy.backward(loss, opt)
            return loss

        opt.restore_expansion(closure)

    @staticmethod
    def _restore_manual(trainer: "pl.Trainer", opt: QODE, kwargs: OrderedDict) -> None:
        """The module's own training_step on the upload batch, its ``opt.step(closure)`` turned into
        ``opt.restore_expansion(closure)`` by a step pre-hook (torch's public hook: the hook rebuilds the
        expansion and stops the training_step there, so the step never runs); learning rates and LR
        schedulers the training_step stepped before are put back."""
        calls = []

        def restore(optimizer, args, kw):
            calls.append(1)
            closure = kw.get("closure", args[1] if len(args) > 1 else None)     # args[0] is the optimizer
            opt.restore_expansion(closure)
            raise _Restored

        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs]
        saved = [s.state_dict() for s in schedulers]
        handle = opt.register_step_pre_hook(restore)
        try:
            trainer.strategy.training_step(*kwargs.values())
        except _Restored:
            pass
        finally:
            handle.remove()
            for g, saved_group in zip(opt.param_groups, groups):
                g.update(saved_group)
            for s, sd in zip(schedulers, saved):
                s.load_state_dict(sd)
        if len(calls) != 1:
            raise RuntimeError(f"QODECallback: training_step called the QODE optimizer's step {len(calls)} times on "
                               "the upload batch; it must call it once (opt.step(closure))")


def _world() -> tuple[int, int]:
    """``(world size, rank)`` of torch.distributed's default group (``(1, 0)`` when not initialised)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _gathered(upload: Optional[dict]) -> Optional[list]:
    """Every rank's ``upload`` (tensors on the CPU) under torch.distributed with ≥ 2 ranks, else ``None``."""
    if _world()[0] == 1:
        return None
    mine = None if upload is None else apply_to_collection(upload, torch.Tensor, lambda t: t.detach().cpu())
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out
