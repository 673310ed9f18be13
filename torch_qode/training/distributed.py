"""QODE under torch.distributed: the window's :class:`DistComm` and the agreement of settings.

DESIGN.md, "Distributed semantics".  Under DistributedDataParallel DDP averages the gradients (F0 of
the window, Eq. II.1); :class:`DistComm` averages every Hessian-vector / third-order product the same
way (:func:`~torch_qode.bridge.collective.mean_all_reduce`), so F1, F2 and the dissipation check's
spectrum are the global batch's.  Every decision is made once: the verdict is rank 0's
(``broadcast_object_list``), the read-out is rank 0's tomography (every rank samples with the same
seed on the same vector, so the samplers stay in step, and rank 0's estimate is broadcast), a fault
on any rank ends the window on all (all-reduce MAX).  θ0 and the upload gradient are checked to be
bit-identical on every rank at each upload (a model without DDP has rank-local gradients).

:func:`agreed` wraps ``QODE.__init__``: one ``all_gather_object`` of the settings, the first
collective QODE issues, refuses on every rank settings that differ between ranks (or an argument one
rank refused), naming them, so no rank can hang in a window the others never open.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import torch

from ..bridge.collective import (any_flag, broadcast_object, broadcast_tensor, gather_objects, group_rank,
                                 group_size, hvp_group, mean_all_reduce, world_group)
from .comm import Comm, LocalComm, as_comm

__all__ = ["DistComm", "window_comm", "bind_comm", "agreed", "settings_of", "check_same_settings", "global_losses",
           "NOT_REPLICATED"]

#: raised (on every rank) when θ0 or the upload gradient differ between ranks
NOT_REPLICATED = (
    "QODE under torch.distributed: at step {k} the parameters or their gradients differ between ranks. "
    "QODE steps on the gradients it finds in .grad, like every torch optimizer, and the window needs the "
    "global batch's: wrap the model in torch.nn.parallel.DistributedDataParallel (which averages the "
    "gradients and starts every rank from rank 0's weights), or all-reduce the gradients (mean) in the "
    "closure yourself")


class DistComm(Comm):
    """The window's collectives over a torch.distributed process group (≥ 2 ranks).

    ``reduce_hvp``: mean all-reduce (vectors and n×k blocks); ``agree``: rank 0's object;
    ``broadcast``: rank 0's tensor; ``any``: all-reduce MAX of a flag; ``replicated``: rank 0's tensor
    broadcast and compared bit for bit on every rank.

    Args:
        process_group: the group (default: torch.distributed's default group).

    Raises:
        ValueError: torch.distributed is not initialised, or the group has fewer than 2 ranks.
        TypeError: ``process_group`` is not a ``torch.distributed.ProcessGroup``.
    """

    local = False

    def __init__(self, process_group=None):
        group = world_group(process_group)
        if group is None:
            raise ValueError("DistComm needs torch.distributed initialised with a process group of at least 2 "
                             "ranks; in one process use LocalComm() (QODE's default)")
        self.group = group
        self.rank, self.size = group_rank(group), group_size(group)

    def reduce_hvp(self, v: torch.Tensor) -> torch.Tensor:
        """The global-batch product: the mean over the ranks (a collective).

        Args:
            v: this rank's product (a vector or an n×k block).

        Returns:
            The mean of ``v`` over the group's ranks.
        """
        return mean_all_reduce(v, self.group)

    def agree(self, verdict: Any) -> Any:
        """One decision for all ranks: rank 0's (a collective).

        Args:
            verdict: this rank's decision (any picklable object).

        Returns:
            Rank 0's ``verdict``, on every rank.
        """
        return broadcast_object(verdict, self.group)

    def broadcast(self, value: torch.Tensor) -> torch.Tensor:
        """Rank 0's tensor on every rank (a collective).

        Args:
            value: this rank's tensor (same shape and dtype on every rank).

        Returns:
            Rank 0's ``value``.
        """
        return broadcast_tensor(value, self.group)

    def any(self, flag: bool) -> bool:
        """Whether any rank's ``flag`` is set (all-reduce MAX, a collective).

        Args:
            flag: this rank's flag.

        Returns:
            ``True`` on every rank if ``flag`` is ``True`` on any.
        """
        return any_flag(flag, self.group)

    def replicated(self, value: torch.Tensor) -> bool:
        """Whether ``value`` is bit-identical on every rank (rank 0's broadcast and compared; two collectives).

        Args:
            value: this rank's tensor (same shape and dtype on every rank).

        Returns:
            ``True`` on every rank if every rank's ``value`` equals rank 0's.
        """
        return not self.any(not torch.equal(self.broadcast(value), value))

    def __repr__(self) -> str:
        return f"DistComm(rank={self.rank}, size={self.size})"

    def __reduce__(self):
        """A copy (``copy.deepcopy`` / ``pickle`` of QODE) binds the default group again: a process group
        cannot be pickled."""
        import torch.distributed as dist

        if self.group is not dist.group.WORLD:
            raise TypeError("a QODE over a process group other than the default one cannot be copied or pickled "
                            "(a process group cannot be); save opt.state_dict() instead")
        return (DistComm, ())


def window_comm(comm: Optional[Comm], process_group=None, model: Optional[torch.nn.Module] = None) -> Comm:
    """QODE's comm, by the rule the Hessian tools follow (:func:`~torch_qode.bridge.collective.hvp_group`).

    Args:
        comm: the comm to use as it is (default ``None``: chosen by the rule below).
        process_group: the group to average over (default: a DDP-wrapped ``model``'s group).
        model: the module QODE trains; a ``DistributedDataParallel`` one names its process group.

    Returns:
        ``comm`` when given; else :class:`DistComm` over ``process_group``, or over a DDP-wrapped
        ``model``'s group, when that group has ≥ 2 ranks; else :class:`LocalComm`.  A plain model with no
        ``process_group`` stays local even under an initialised process group, so an optimizer built on
        one rank alone issues no collective.

    Raises:
        ValueError: ``comm`` and ``process_group`` both given, or ``process_group`` without torch.distributed
            initialised.
        TypeError: ``comm`` or ``process_group`` of the wrong type.
    """
    if comm is not None:
        if process_group is not None:
            raise ValueError("comm= and process_group= were both given: pass one (comm=DistComm(group) is "
                             "process_group=group)")
        return as_comm(comm)
    group = hvp_group(model, process_group)
    return LocalComm() if group is None else DistComm(group)


def bind_comm(opt, comm: Comm) -> None:
    """Give a built QODE its window's comm: for a framework that wraps the model in DDP after the optimizer
    was built (Lightning's strategies: :class:`~torch_qode.QODECallback` binds the strategy's group).

    A :class:`DistComm` runs the settings agreement of ``QODE.__init__`` (:func:`check_same_settings`):
    call it on every rank of ``comm``'s group, at the same point.

    Args:
        opt: a :class:`~torch_qode.QODE` outside a quantum window.
        comm: the new comm (:class:`~torch_qode.training.comm.LocalComm` or :class:`DistComm`).

    Raises:
        RuntimeError: ``opt`` is inside a quantum window (its products and decisions are under way).
        ValueError: a :class:`DistComm` with ``hvp="recompute"`` or a dissipation check with its own
            process group, or settings that differ between ranks.
        TypeError: ``comm`` is not a Comm.
    """
    comm = as_comm(comm)
    if opt.in_quantum_window:
        raise RuntimeError("bind_comm: the optimizer is inside a quantum window; bind its comm between windows "
                           "(before training starts)")
    if not comm.local and opt.cfg.hvp == "recompute":
        raise ValueError("bind_comm: hvp='recompute' under torch.distributed is not supported (a replay of a DDP "
                         "closure would all-reduce inside every product); use hvp='retain' or 'auto'")
    if not comm.local and getattr(opt.dissipation, "process_group", None) is not None:
        raise ValueError("bind_comm: QODE averages the check's Hessian-vector products through its own comm; "
                         "its DissipationCheck must have process_group=None")
    if isinstance(comm, DistComm):
        check_same_settings(settings_of(opt), comm)
    opt.comm = comm


def _describe(obj) -> Any:
    """A comparable description of a settings object (its class and public attributes)."""
    if obj is None:
        return None
    attrs = {k: v for k, v in sorted(vars(obj).items()) if not k.startswith("_")} if hasattr(obj, "__dict__") else {}
    return f"{type(obj).__name__}({', '.join(f'{k}={v!r}' for k, v in attrs.items())})"


def settings_of(opt) -> dict:
    """What must be equal on every rank: the saved settings (every saved field of the schema,
    :class:`~torch_qode.training.config.QODEConfig`), ``n_params``, the parameter shapes and dtypes, every
    parameter group's SGD settings (all of its keys but ``params``), which tensors prune, and the
    dissipation check's settings (its HVP count)."""
    groups = opt.param_groups
    sgd = {(k if len(groups) == 1 else f"param_groups[{i}].{k}"): (float(v) if isinstance(v, torch.Tensor) else v)
           for i, g in enumerate(groups) for k, v in g.items() if k != "params"}
    out = {**opt._config(), **sgd, "param_groups": len(groups), "dissipation": _describe(opt.dissipation),
           "param_shapes": [(tuple(p.shape), str(p.dtype)) for p in opt._params]}
    if opt.pruner is not None:
        out["prunable"] = [bool(f) for f in opt.pruner.prunable]
    return out


def check_same_settings(mine: dict, comm: "DistComm") -> None:
    """One ``all_gather_object`` of every rank's settings (or the error it raised); on every rank, a
    ``ValueError`` naming what differs from rank 0 (or which rank refused its arguments)."""
    every = gather_objects(mine, comm.group)
    errors = [(r, s["error"]) for r, s in enumerate(every) if "error" in s]
    if errors:
        raise ValueError("QODE was refused on " + "; ".join(f"rank {r}: {e}" for r, e in errors)
                         + " (every rank refuses, so that none waits in a collective)")
    ref = every[0]
    diffs = []
    for key in ref:
        values = [s.get(key) for s in every]
        if any(v != values[0] for v in values):
            diffs.append(f"{key} (" + ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values)) + ")")
    if diffs:
        raise ValueError("QODE settings differ between ranks: " + "; ".join(diffs) + ". Every rank must build "
                         "QODE with the same settings and model: the window's collectives and decisions are "
                         "shared (independent optimizers per rank: pass comm=LocalComm())")


def agreed(init):
    """Decorate ``QODE.__init__``: after it, the settings are compared over the ranks
    (:func:`check_same_settings`); if it raises on one rank, that rank still takes part in the gather
    (with its error) before raising, so the others raise too instead of waiting."""

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except Exception as exc:
            try:
                comm = window_comm(kwargs.get("comm"), kwargs.get("process_group"), kwargs.get("model"))
            except Exception:
                comm = None
            if isinstance(comm, DistComm):
                gather_objects({"error": f"{type(exc).__name__}: {exc}"}, comm.group)
            raise
        if isinstance(self.comm, DistComm):
            check_same_settings(settings_of(self), self.comm)

    return __init__


def global_losses(measure, rep, comm: Comm):
    """``measure`` (track_sgd's window-end measurement), then its two losses averaged over the ranks
    (each rank evaluated its shard), so every rank reports the global batch's."""
    if comm.local:
        return measure

    def measure_and_reduce() -> None:
        measure()
        for key in ("loss_qode", "loss_sgd"):
            rep.drift[key] = comm.mean(rep.drift.get(key))

    return measure_and_reduce
