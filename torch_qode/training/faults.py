"""Why a quantum step failed, typed: :class:`Fault` (what kind) and :class:`WindowFault` (one occurrence).

A fault is raised by the stage that meets it (the upload, a window step, a finish stage) and caught
where the window's life is decided (:mod:`.cycle`): the window aborts to θ0 and the rest of it trains
classically.  The report shows every fault as text (``CycleReport.faults``: ``"step k: <text>"``), the
same sentences as before the faults were typed.
"""
from __future__ import annotations

import enum
from typing import Any, Optional

__all__ = ["Fault", "WindowFault", "INPLACE_WRITE", "REJECTS"]

#: what an in-place write of the parameters or buffers during a window means, and the fix
INPLACE_WRITE = (
    "QODE: the parameters or buffers (e.g. BatchNorm running statistics) were modified in place during a "
    "quantum window (model.load_state_dict, an EMA, a manual write), which invalidates the upload batch's "
    "Hessian-vector products; load model weights together with QODE.load_state_dict, or between windows "
    "(QODE.in_quantum_window is False)")


class Fault(enum.Enum):
    """The kinds of fault; each value is ``(text, text when it happened on another rank)``, ``{detail}``
    filled from the occurrence."""

    UPLOAD_NONFINITE = ("non-finite loss or gradient at upload: update skipped", None)
    UPLOAD_FAILED = ("upload failed: {detail}", None)
    STEP_NONFINITE = ("non-finite loss or gradient inside the quantum window", None)
    STATE_NONFINITE = ("{detail}", "a non-finite Carleman state on another rank")
    INPLACE_WRITE = (INPLACE_WRITE, None)
    REEXPANSION_FAILED = ("re-expansion after resume failed: {detail}", None)
    PRODUCT_FAILED = ("a window product failed (the error propagates; the window ended at θ0): {detail}", None)
    RESUMED = ("resumed a matrix-free window: F1..Fq re-expanded at θ0 on this step's batch (the upload "
               "batch's autograd graph cannot be saved)", None)
    SOLVE_FAILED = ("window solve failed: {detail}", None)
    WEIGHTS_NONFINITE = ("the solved weights are not finite", "the readout failed on another rank")
    WEIGHTS_ZERO = ("the solved weight vector is zero: nothing to read out", "the readout failed on another rank")
    TOMOGRAPHY_FAILED = ("tomography failed: {detail}", "the readout failed on another rank")
    READOUT_NONFINITE = ("the read-out weights are not finite: window rejected", None)
    DISPLACEMENT = ("the window would move the weights by ‖u(T)‖ = {detail}: window rejected (θ0 kept; "
                    "setting max_displacement)", None)
    READOUT_ZERO = ("tomography read out a zero vector (shots={detail}: no norm-stage shot succeeded), which "
                    "would erase the model", None)
    DISPLACEMENT_ZERO = ("the solved displacement u(T) is zero: nothing to read out (readout='displacement')",
                         "the readout failed on another rank")
    READOUT_ZERO_DISPLACEMENT = ("tomography read out a zero vector for the displacement u(T) (shots={detail}: "
                                 "no norm-stage shot succeeded): the window's move is lost", None)
    ELSEWHERE = ("{detail}", None)               # a step that failed on another rank (its own sentence)


class WindowFault(Exception):
    """One fault: its :class:`Fault` kind, the detail its text names, and whether another rank met it.

    Args:
        kind: the :class:`Fault`.
        detail: what the text's ``{detail}`` names (an exception, a count), if anything.
        remote: the fault happened on another rank (the kind's second text, when it has one).

    ``str(fault)`` is the report's text.
    """

    def __init__(self, kind: Fault, detail: Any = None, *, remote: bool = False):
        self.kind, self.detail, self.remote = kind, detail, remote
        super().__init__(self.text)

    @property
    def text(self) -> str:
        """The sentence the report shows."""
        local, elsewhere = self.kind.value
        template = elsewhere if self.remote and elsewhere is not None else local
        return template.format(detail=self.detail)

    def __str__(self) -> str:
        return self.text

    @classmethod
    def agreed(cls, fault: Optional["WindowFault"], comm, kind: Fault) -> Optional["WindowFault"]:
        """One verdict for all ranks (``comm.any``): this rank's ``fault``, ``kind`` met on another
        rank, or ``None`` when no rank failed.

        Args:
            fault: this rank's fault, or ``None``.
            comm: the window's :class:`~torch_qode.training.comm.Comm`.
            kind: the kind to report when only another rank failed.

        Returns:
            The fault every rank acts on, or ``None``.
        """
        if not comm.any(fault is not None):
            return None
        return fault if fault is not None else cls(kind, remote=True)


#: the faults that reject a whole window's result (a solution, read-out or displacement that exploded):
#: QODE warns once per kind (``warnings.warn``) besides the report's reason and faults
REJECTS = frozenset({Fault.STATE_NONFINITE, Fault.WEIGHTS_NONFINITE, Fault.READOUT_NONFINITE, Fault.DISPLACEMENT})
