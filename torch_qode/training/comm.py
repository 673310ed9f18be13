"""The window's communication object: every collective a quantum window needs passes through it.

DESIGN.md, "Distributed semantics": under DDP the window's ODE is that of the global batch, so every
Hessian-vector / third-order product is averaged over the ranks (as DDP averages F0's gradients), and
every decision — the dissipation verdict, the readout, a fault — is made once and shared.  The window
core calls, in the same order on every rank:

* :meth:`Comm.reduce_hvp` on each product of F1..Fq (and on the dissipation check's HVPs);
* :meth:`Comm.agree` on the dissipation verdict;
* :meth:`Comm.broadcast` on the read-out weight vector;
* :meth:`Comm.any` on a local fault flag (a NaN on one rank ends the window on all);
* :meth:`Comm.replicated` on θ0 and the upload gradient (they must be the same on every rank).
* :meth:`Comm.mean` on the losses a report records (each rank measured its shard).

:class:`LocalComm` (the default) does nothing; :class:`~torch_qode.training.distributed.DistComm` is the
torch.distributed one (``QODE(process_group=...)``, or automatic for a DDP-wrapped ``model=``: the rule of
:func:`~torch_qode.training.distributed.window_comm`).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

__all__ = ["Comm", "LocalComm", "as_comm"]


class Comm:
    """Interface of the window's collectives (all of them identities in one process)."""

    #: ``True`` when every method is the identity: the window core then skips wrapping its products
    local: bool = False

    def reduce_hvp(self, v: torch.Tensor) -> torch.Tensor:
        """The global-batch product from this rank's product ``v`` (mean over ranks)."""
        raise NotImplementedError

    def agree(self, verdict: Any) -> Any:
        """One decision for all ranks (e.g. rank 0's dissipation verdict)."""
        raise NotImplementedError

    def broadcast(self, value: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``value`` on every rank (the tomography readout)."""
        raise NotImplementedError

    def any(self, flag: bool) -> bool:
        """``True`` on every rank if ``flag`` is ``True`` on any."""
        raise NotImplementedError

    def replicated(self, value: torch.Tensor) -> bool:
        """``True`` on every rank if ``value`` is bit-identical on all ranks (default: trusted)."""
        return True

    def mean(self, value: Optional[float]) -> Optional[float]:
        """The mean over the ranks of a number each measured on its shard (a reported loss); ``None``
        (a closure that returns no number, on every rank) stays ``None``."""
        if value is None:
            return None
        return float(self.reduce_hvp(torch.tensor([float(value)], dtype=torch.float64))[0])


    def total(self, value: Optional[int]) -> Optional[int]:
        """The sum over the ranks of a count each made on its shard (the upload closure's FLOPs: the
        ledger prices the global batch); ``None`` on every rank stays ``None``."""
        if value is None:
            return None
        return int(round(self.mean(float(value)) * getattr(self, "size", 1)))


class LocalComm(Comm):
    """One process: every collective is the identity."""

    local = True

    def reduce_hvp(self, v: torch.Tensor) -> torch.Tensor:
        return v

    def agree(self, verdict: Any) -> Any:
        return verdict

    def broadcast(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def any(self, flag: bool) -> bool:
        return bool(flag)

    def mean(self, value: Optional[float]) -> Optional[float]:
        return value

    def total(self, value: Optional[int]) -> Optional[int]:
        return value

    def __repr__(self) -> str:
        return "LocalComm()"


def as_comm(comm) -> Comm:
    """``None`` -> :class:`LocalComm`; a :class:`Comm` as it is; anything else is refused."""
    if comm is None:
        return LocalComm()
    if not isinstance(comm, Comm):
        raise TypeError(f"comm must be a torch_qode.training.comm.Comm (e.g. LocalComm()) or None, "
                        f"got {type(comm).__name__}")
    return comm
