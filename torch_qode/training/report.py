"""What one QODE cycle did: :class:`CycleReport` (plain data, never prints)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

__all__ = ["CycleReport", "download_record"]

#: report fields that are measurements of this machine, not training state: they stay out of
#: ``QODE.state_dict()`` and of report equality, so two optimizers with the same history compare equal
TIMING_FIELDS = ("seconds",)


@dataclass
class CycleReport:
    """What one cycle did (plain data; ``as_dict()`` for logging).  Never prints by itself.

    Attributes:
        cycle: the cycle's index (``start_step // cycle``).
        start_step: the optimizer step at which the cycle began (its download).
        mode: ``"quantum"`` or ``"classical"`` once the upload decides (``"pending"`` before).
        reason: why that mode (the dissipation verdict, ``mode=``, a fault, …).
        window: ``T``, the steps of the cycle's quantum window.
        download: the pruning at ``c = 0`` (:func:`download_record`), ``None`` without pruning.
        support_size: ``|S|``, the weights the window evolves (``None`` before an upload).
        excluded_params: parameter tensors outside ``S`` (no gradient at the upload).
        dissipation: the dissipation check's verdict (``Verdict.as_dict()``) and its cost, ``mode="auto"``.
        carleman: the window's Carleman system and state: n, order, form, dim, degree, explicit, noise, state
            (``"dense"``/``"factored"``), rank, truncation, order_gap, state_bytes.
        solver: the window solve's record (the solver and its numbers).
        tomography: the readout's record (``TomographyResult.as_dict()``, readout, read_norm).
        resources: the resource ledger (``Resources.as_dict()``); ``"classical"``: the same window's classical
            cost (FLOPs of T SGD steps, products in HVP units).
        drift: with ``track_sgd``: ``‖θ_qode − θ_sgd‖``, relative, and the two losses.
        faults: the cycle's faults as text (``"step k: <text>"``): aborted windows, skipped updates.
        skipped_steps: steps whose update was skipped for a non-finite loss or gradient.
        loss_first: the closure's loss at the cycle's first step.
        loss_last: the closure's loss at its last step.
        seconds: wall clock (not in :meth:`state` nor in equality).
    """

    cycle: int
    start_step: int
    mode: str = "pending"            # "quantum" or "classical" once the upload decides ("pending" before)
    reason: str = ""                 # why (dissipation verdict, mode, fault, …)
    window: int = 0                  # T, steps in the window
    download: Optional[dict] = None  # pruning at c = 0: kept, total, sparsity
    support_size: Optional[int] = None
    excluded_params: int = 0         # parameter tensors outside S: no gradient at the upload
    dissipation: Optional[dict] = None
    # n, order, form, dim (Δ), degree, explicit, noise; at the window's end state ("dense"/"factored"),
    # rank (largest k of Y2 = W C Wᵀ; None when dense), truncation (discarded ‖ΔY2‖_F, 0.0 when exact),
    # order_gap (‖u⁽²⁾(T) − u⁽¹⁾(T)‖ / ‖u⁽²⁾(T)‖, order ≥ 2 in either state, None at order 1), state_bytes
    carleman: Optional[dict] = None
    solver: Optional[dict] = None
    tomography: Optional[dict] = None
    resources: Optional[dict] = None    # the ledger (core/resources.py); "classical": the same window's
    #                                     classical cost (FLOPs of T SGD steps, products in HVP units, gates/FLOP)
    drift: Optional[dict] = None     # track_sgd: ||θ_qode − θ_sgd||, relative, losses
    faults: list = field(default_factory=list)
    skipped_steps: int = 0           # steps whose update was skipped for a non-finite loss/gradient
    loss_first: Optional[float] = None   # the closure's loss at the first step of the cycle
    loss_last: Optional[float] = None    # … and at its last step
    seconds: float = field(default=0.0, compare=False)   # wall clock (not in state_dict)

    def as_dict(self) -> dict:
        """The report as a plain dict (``dataclasses.asdict``: nested dicts and lists copied).

        Returns:
            Every field by name.
        """
        return asdict(self)

    def state(self) -> dict:
        """``as_dict()`` without the wall-clock fields (what ``QODE.state_dict()`` saves).

        Returns:
            Every field by name but those of ``TIMING_FIELDS`` (``seconds``).
        """
        d = self.as_dict()
        for k in TIMING_FIELDS:
            d.pop(k, None)
        return d


def download_record(pruner) -> dict:
    """``CycleReport.download`` after a download: kept, total, sparsity, per-layer pruned fractions
    (``layers``) and per-layer kept fractions (``density``; 0 names a tensor the download emptied)."""
    r = pruner.report()
    return {"kept": int(pruner.support().numel()), "total": int(r.n_total), "sparsity": float(r.mask_sparsity),
            "total_sparsity": float(r.total_sparsity),
            "layers": {x.name: x.pruned / x.numel for x in r.layers if x.prunable and x.numel},
            "density": {x.name: 1 - x.pruned / x.numel for x in r.layers if x.prunable and x.numel}}
