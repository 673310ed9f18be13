"""The readout's keep-r prune (DESIGN.md step 7: "tomography reads the r largest components").

A dense upload with pruning ends its window by keeping, among the prunable read-out weights, as many as
the download keeps.  With the paper's download (``pruning="global"``, ``min_density=0``) that is the r
largest in magnitude over all prunable tensors, as the paper reads them.  With another distribution or a
per-tensor floor, the window's end keeps what the download would keep: each prunable tensor its share
of r (:func:`~torch_qode.bridge.sparsity.keep_counts` on the read-out values, the floor included), so a
window's end never empties a tensor the download would not (issue 20).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..bridge.sparsity import keep_counts
from .report import CycleReport

__all__ = ["ReadoutKeep", "readout_keep", "readout_prune", "top_r"]


@dataclass
class ReadoutKeep:
    """What the readout's prune keeps.

    Attributes:
        flags: the prunable entries of the full flat parameter vector.
        keep: how many prunable weights the download keeps (r less the non-prunable ones).
        shapes: the prunable tensors' shapes, in order (``None``: the paper's global top-r).
        distribution: the download's distribution (``pruning``), when ``shapes`` is given.
        min_density: the download's per-tensor floor, when ``shapes`` is given.
    """

    flags: torch.Tensor
    keep: int
    shapes: Optional[list] = None
    distribution: str = "global"
    min_density: float = 0.0


def readout_keep(params: list, pruner) -> Optional[ReadoutKeep]:
    """What a window's end keeps after a download by ``pruner`` (``None`` without pruning).

    Args:
        params: the optimizer's parameters, in order.
        pruner: the optimizer's :class:`~torch_qode.bridge.pruning.MagnitudePruner`, or ``None``.

    Returns:
        The :class:`ReadoutKeep`: per-tensor shares unless the download is the paper's global prune
        without a floor.
    """
    if pruner is None:
        return None
    flags = torch.cat([torch.full((p.numel(),), f, dtype=torch.bool, device=params[0].device)
                       for p, f in zip(params, pruner.prunable)])
    keep = pruner.n_prunable - pruner.n_pruned_target()
    if pruner.distribution == "global" and pruner.min_density == 0:
        return ReadoutKeep(flags, keep)
    shapes = [tuple(p.shape) for p, f in zip(params, pruner.prunable) if f]
    return ReadoutKeep(flags, keep, shapes, pruner.distribution, pruner.min_density)


def readout_prune(estimate: torch.Tensor, win, rk: ReadoutKeep, rep: CycleReport) -> int:
    """The readout's prune of the read-out weights on S (:func:`top_r`), in place; biases and norm scales,
    never pruned, are read as they are.

    Args:
        estimate: the read-out weights on S (changed in place).
        win: the window (its support and θ0).
        rk: what to keep (:func:`readout_keep`).
        rep: the cycle's report: the pruned count and mass go into ``rep.tomography``.

    Returns:
        r, the components read out.
    """
    total = float(estimate.pow(2).sum())
    r, dropped = top_r(estimate, win, rk)
    rep.tomography["readout_pruned"] = int(torch.count_nonzero(dropped))
    rep.tomography["readout_pruned_mass"] = float(dropped.pow(2).sum()) / total if total > 0 else 0.0
    return r


def top_r(values: torch.Tensor, win, rk: ReadoutKeep) -> tuple:
    """The readout's prune of ``values`` (a vector on S, in place): its prunable entries outside the
    ``rk.keep`` largest in magnitude (ties: the lower index) are set to 0 — over all prunable tensors, or
    per tensor when ``rk.shapes`` is given (each tensor its share, :func:`keep_counts`); the weights
    outside S keep θ0 (with the global prune their non-zeros count against ``keep``).

    Args:
        values: the weights on S (changed in place).
        win: the window (its ``support`` and ``theta0``).
        rk: what to keep (:func:`readout_keep`).

    Returns:
        ``(r, dropped)``: the components read out and the values set to 0.
    """
    S, flags, keep = win.support, rk.flags, rk.keep
    if rk.shapes is not None:
        return _per_tensor(values, win, rk)
    if S is not None:   # weights outside S keep θ0: count their non-zeros against r
        outside = flags.clone()
        outside[S] = False
        keep = max(0, keep - int(torch.count_nonzero(win.theta0[outside])))
        flags = flags[S]
    idx = torch.nonzero(flags).reshape(-1)
    order = torch.sort(values[idx].abs(), descending=True, stable=True).indices  # ties: lower index
    drop = idx[order[keep:]]
    dropped = values[drop]
    values[drop] = 0
    return int(values.numel() - idx.numel() + keep), dropped


def _per_tensor(values: torch.Tensor, win, rk: ReadoutKeep) -> tuple:
    """:func:`top_r` with each prunable tensor's share of ``rk.keep``, ranked on the full vector (θ0
    outside S, which the window cannot change: such entries are never dropped)."""
    S = win.support
    full = values if S is None else win.theta0.to(values.dtype).index_put((S,), values)
    idx = torch.nonzero(rk.flags).reshape(-1)
    sizes = [int(torch.Size(s).numel()) for s in rk.shapes]
    parts = [p.reshape(s) for p, s in zip(full[idx].split(sizes), rk.shapes)]
    counts = keep_counts(rk.distribution, parts, rk.keep, rk.min_density)
    drops = []
    for where, part, c in zip(idx.split(sizes), parts, counts):
        order = torch.sort(part.reshape(-1).abs(), descending=True, stable=True).indices  # ties: lower index
        drops.append(where[order[c:]])
    drop = torch.cat(drops)
    if S is not None:                            # full-vector positions -> positions on S
        pos = torch.full((full.numel(),), -1, dtype=torch.long, device=full.device)
        pos[S] = torch.arange(S.numel(), device=full.device)
        drop = pos[drop]
        drop = drop[drop >= 0]
    dropped = values[drop]
    values[drop] = 0
    prunable_S = int(rk.flags.sum()) if S is None else int(rk.flags[S].sum())
    return int(values.numel() - prunable_S + rk.keep), dropped
