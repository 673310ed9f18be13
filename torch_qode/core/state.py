"""The Carleman state of a window, behind one interface (DESIGN.md, step 5).

A window advances ``y(t+1) = y(t) + A y(t) + b(t)`` (Eq. II.102's forward recurrence) and reads out
the level-1 block ``u(t) = y_1(t)``.  How ``y`` is held is the state's business: :class:`DenseLevels`
keeps the dense vector of all levels ``(u, u⊗u, …, u^⊗N)``; a factored level 2 (``Y2 = W C Wᵀ``,
DESIGN.md "The factored level-2 state") is a second subclass, with no change in the training floor.

Floor 1: numpy/torch only.
"""
from __future__ import annotations

import abc
from typing import Any, Optional

import torch

__all__ = ["CarlemanState", "DenseLevels", "STATES", "state_from_dict"]


class CarlemanState(abc.ABC):
    """One window's Carleman state ``y(t)``, started at ``u(0) = 0`` (every level zero)."""

    #: name under which :func:`state_from_dict` finds the class
    kind: str = ""

    @classmethod
    @abc.abstractmethod
    def zeros(cls, system: Any, *, device=None) -> "CarlemanState":
        """The state ``y(0) = 0`` of ``system`` (a :class:`~torch_qode.core.carleman.CarlemanSystem`)."""

    @abc.abstractmethod
    def advance(self, system: Any, t: int) -> None:
        """One step through ``system``: ``y ← y + A y + b(t)`` (raises ``NonFiniteError`` on NaN/inf)."""

    @abc.abstractmethod
    def level1(self) -> torch.Tensor:
        """``u(t)``: the level-1 block, shape ``(n,)``."""

    @abc.abstractmethod
    def state_dict(self) -> dict:
        """Plain tensors that :meth:`load` turns back into this state, bit for bit."""

    @classmethod
    @abc.abstractmethod
    def load(cls, sd: dict, *, device=None) -> "CarlemanState":
        """The state saved by :meth:`state_dict` (tensors moved to ``device``)."""

    @property
    @abc.abstractmethod
    def nbytes(self) -> int:
        """Memory the state holds."""


class DenseLevels(CarlemanState):
    """The dense vector of all levels, ``Δ = n + n² + … + n^N`` numbers (float64)."""

    kind = "dense"

    def __init__(self, y: torch.Tensor, n: int):
        self.y, self.n = y, int(n)

    @classmethod
    def zeros(cls, system: Any, *, device=None) -> "DenseLevels":
        return cls(torch.zeros(system.dim, dtype=torch.float64, device=device), system.n)

    def advance(self, system: Any, t: int) -> None:
        self.y = system.step(self.y, t)

    def level1(self) -> torch.Tensor:
        return self.y[:self.n]

    def state_dict(self) -> dict:
        return {"kind": self.kind, "y": self.y.clone(), "n": self.n}

    @classmethod
    def load(cls, sd: dict, *, device=None) -> "DenseLevels":
        return cls(sd["y"].to(device) if device is not None else sd["y"].clone(), int(sd["n"]))

    @property
    def nbytes(self) -> int:
        return self.y.numel() * self.y.element_size()


#: kind -> class; a new representation is one class above and one line here
STATES: dict = {DenseLevels.kind: DenseLevels}


def state_from_dict(sd: dict, *, device: Optional[torch.device] = None) -> CarlemanState:
    """The state saved by ``CarlemanState.state_dict()`` (its ``kind`` picks the class)."""
    kind = sd.get("kind")
    if kind not in STATES:
        raise ValueError(f"unknown Carleman state kind {kind!r}; known: {sorted(STATES)}")
    return STATES[kind].load(sd, device=device)
