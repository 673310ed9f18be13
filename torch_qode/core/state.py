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

from .._checks import check_bool
from .carleman import carleman, default_max_bytes
from .factored import EmbeddedOrder1, FactoredLevel2
from .ode import MatrixFreeTerm, NonFiniteError, PolynomialODE, all_finite

__all__ = ["CarlemanState", "DenseLevels", "FactoredLevels", "STATES", "state_from_dict"]


class CarlemanState(abc.ABC):
    """One window's Carleman state ``y(t)``, started at ``u(0) = 0`` (every level zero)."""

    #: name under which :func:`state_from_dict` finds the class
    kind: str = ""
    #: whether the window system (Eq. II.102) of this state's Carleman system can be built and solved
    solvable: bool = True
    #: whether the state also carries the order-1 level-1 state (``order_gap``; order ≥ 2)
    embedded: bool = False

    # -------------------------------------------------------------- what a window asks of its state
    @classmethod
    def system_for(cls, ode: PolynomialODE, order: int, form: str) -> Any:
        """What the state advances through: the Carleman system of ``ode`` at ``order`` in ``form``
        (Eq. II.102's ``A``, ``b(t)``)."""
        return carleman(ode, order, form)

    @classmethod
    def open(cls, system: Any, *, order: int, max_rank: Optional[int] = None, device=None) -> "CarlemanState":
        """A window's state ``y(0) = 0`` of ``system`` (from :meth:`system_for`) at Carleman ``order``."""
        return cls.zeros(system, device=device)

    @classmethod
    def lifted_dim(cls, system: Any, order: int) -> int:
        """``Δ = n + n² + … + n^N``, the lifted dimension of the window (the report's ``dim``)."""
        return int(system.dim)

    def ledger_system(self, system: Any, order: int, form: str) -> Any:
        """The Carleman system the resource ledger describes (Theorems II.3/II.4): ``system`` itself."""
        return system

    def record(self) -> dict:
        """The report's state fields: ``state``, ``rank`` (``None``), ``truncation`` (0.0: exact),
        ``order_gap`` = ‖u⁽²⁾(T) − u⁽¹⁾(T)‖ / ‖u⁽²⁾(T)‖ (embedded states; else ``None``),
        ``state_bytes``."""
        return {"state": self.kind, "rank": None, "truncation": 0.0,
                "order_gap": float(self.order_gap) if self.embedded else None, "state_bytes": int(self.nbytes)}

    @classmethod
    @abc.abstractmethod
    def zeros(cls, system: Any, *, device=None) -> "CarlemanState":
        """The state ``y(0) = 0`` of ``system`` (a :class:`~torch_qode.core.carleman.CarlemanSystem`;
        for a factored state, the :class:`~torch_qode.core.ode.PolynomialODE` itself: no dense system)."""

    @abc.abstractmethod
    def advance(self, system: Any, t: int) -> None:
        """One step through ``system`` (as given to :meth:`zeros`): ``y ← y + A y + b(t)`` (raises
        ``NonFiniteError`` on NaN/inf)."""

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


class DenseLevels(CarlemanState, EmbeddedOrder1):
    """The dense vector of all levels, ``Δ = n + n² + … + n^N`` numbers (float64).

    With ``embedded=True`` (order ≥ 2) it also carries the order-1 level-1 state
    ``v(t+1) = v + F0(t) + F1 v`` (one more ``F1`` product per step) for :attr:`order_gap`, as the
    factored state does.
    """

    kind = "dense"

    def __init__(self, y: torch.Tensor, n: int, v: Optional[torch.Tensor] = None):
        self.y, self.n, self.v = y, int(n), v
        self._spare: Optional[torch.Tensor] = None   # the previous y, reused by the next step (scratch)

    @classmethod
    def zeros(cls, system: Any, *, device=None, embedded: bool = False) -> "DenseLevels":
        z = torch.zeros(system.dim, dtype=torch.float64, device=device)
        v = torch.zeros(system.n, dtype=torch.float64, device=device) if check_bool(embedded, "embedded") else None
        return cls(z, system.n, v)

    @classmethod
    def open(cls, system: Any, *, order: int, max_rank: Optional[int] = None, device=None) -> "DenseLevels":
        """``y(0) = 0``; at order ≥ 2 with the embedded order-1 state (``order_gap``)."""
        return cls.zeros(system, device=device, embedded=order >= 2)

    def advance(self, system: Any, t: int) -> None:
        """See :meth:`CarlemanState.advance`.  Without the embedded state, the step is written into the
        previous step's buffer (``CarlemanSystem.step_into``): :meth:`level1` is a view that the
        second advance after it overwrites."""
        if self.v is None and hasattr(system, "step_into"):
            out = self._spare
            if out is None or out.shape != self.y.shape or out.dtype != self.y.dtype or out.device != self.y.device:
                out = torch.empty_like(self.y)
            self._spare = None                   # a raising step leaves y as it was, and no spare
            if system.step_into(self.y, t, out):
                self._spare, self.y = self.y, out
                return
        y = system.step(self.y, t)
        v = None
        if self.v is not None:   # the order-1 system's level 1: y1 + F0 + F1 y1 (every form's level 1)
            ode = system.ode
            F1 = ode.terms[1] if ode.degree >= 1 else None
            v = self.v if F1 is None else self.v + F1.matmat(self.v[:, None])[:, 0].to(self.v)
            if not ode.F0_is_zero:
                v = v + ode.F0(t).to(v)
            if not all_finite(v):
                raise NonFiniteError(f"the embedded order-1 state became non-finite at step t={t}")
        self.y, self.v = y, v

    def level1(self) -> torch.Tensor:
        return self.y[:self.n]

    @property
    def embedded(self) -> bool:
        return self.v is not None

    def state_dict(self) -> dict:
        sd = {"kind": self.kind, "y": self.y.clone(), "n": self.n}
        if self.v is not None:
            sd["v"] = self.v.clone()
        return sd

    @classmethod
    def load(cls, sd: dict, *, device=None) -> "DenseLevels":
        move = (lambda x: x.to(device)) if device is not None else (lambda x: x.clone())
        v = sd.get("v")
        return cls(move(sd["y"]), int(sd["n"]), None if v is None else move(v))

    @property
    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in (self.y, self.v) if x is not None)


def _ode_of(system: Any) -> PolynomialODE:
    """The ODE behind ``system``: a :class:`PolynomialODE` itself, or a CarlemanSystem's ``.ode``."""
    if isinstance(system, PolynomialODE):
        return system
    ode = getattr(system, "ode", None)
    if not isinstance(ode, PolynomialODE):
        raise TypeError(f"system must be a PolynomialODE (or a CarlemanSystem), got {type(system).__name__}")
    if getattr(system, "order", 2) != 2 or getattr(system, "form", "discrete") != "discrete":
        raise ValueError("the factored state is the discrete form's order-2 state; got a system of order "
                         f"{system.order}, form {system.form!r}")
    return ode


def _unbound(n: int, device, dtype: torch.dtype) -> PolynomialODE:
    """A placeholder ODE for a loaded state whose coefficients are not rebuilt yet (no n² allocation)."""
    def refuse(Y):
        raise RuntimeError("this factored state was loaded without its ODE: advance(ode, t) binds it")
    return PolynomialODE([None, MatrixFreeTerm(n, 1, refuse)], dtype=dtype, device=device)


class FactoredLevels(CarlemanState):
    """Carleman order 2, discrete form: ``y1`` and the level 2 as ``Y2 = W C Wᵀ``
    (:class:`~torch_qode.core.factored.FactoredLevel2`; DESIGN.md "The factored level-2 state").

    Memory ``n·(k + 3)`` numbers (``k ≤ 2t``, or ``≤ max_rank + 2``) instead of ``n + n²``: the state
    works from the window's :class:`PolynomialODE` and never builds the dense order-2 system.  With
    ``embedded=True`` it also carries the order-1 level-1 state (``order_gap``).
    """

    kind = "factored"
    solvable = False      # the dense window system is never built: u(T) is the recurrence's

    def __init__(self, level2: FactoredLevel2):
        self.level2 = level2

    @classmethod
    def system_for(cls, ode: PolynomialODE, order: int, form: str) -> PolynomialODE:
        """The window's :class:`PolynomialODE` itself: no dense order-2 system is built."""
        return ode

    @classmethod
    def open(cls, system: Any, *, order: int, max_rank: Optional[int] = None, device=None) -> "FactoredLevels":
        """``y(0) = 0`` with the embedded order-1 state, level 2 truncated to ``max_rank``."""
        return cls.zeros(system, max_rank=max_rank, embedded=True)

    @classmethod
    def lifted_dim(cls, system: Any, order: int) -> int:
        n = _ode_of(system).n
        return sum(n ** j for j in range(1, order + 1))

    def ledger_system(self, system: Any, order: int, form: str) -> Any:
        """The dense Carleman system, for the ledger only: it describes Δ and the sparsity bound and
        is never stepped, so its budget only has to admit the description."""
        dim = self.lifted_dim(system, order)
        return carleman(_ode_of(system), order, form, max_bytes=max(default_max_bytes(), 4 * 8 * dim + 1))

    def record(self) -> dict:
        """As :meth:`CarlemanState.record`, with ``rank`` (largest k of ``Y2 = W C Wᵀ``) and ``truncation``
        (discarded Frobenius mass of ``Y2``)."""
        rec = super().record()
        rec.update(rank=int(self.rank), truncation=float(self.truncation))
        return rec

    @classmethod
    def zeros(cls, system: Any, *, device=None, max_rank: Optional[int] = None,
              embedded: bool = False) -> "FactoredLevels":
        ode = _ode_of(system)
        if device is not None and torch.device(device) != ode.device:
            raise ValueError(f"device={device} differs from the ODE's device {ode.device}")
        return cls(FactoredLevel2(ode, max_rank=max_rank, embedded=embedded))

    def advance(self, system: Any, t: int) -> None:
        if int(t) != self.level2.t:
            raise ValueError(f"t={t}: the factored state is at step {self.level2.t} (steps go in order)")
        self.level2.bind(_ode_of(system))
        self.level2.step()

    def level1(self) -> torch.Tensor:
        return self.level2.level1()

    def level1_order1(self) -> torch.Tensor:
        return self.level2.level1_order1()

    @property
    def embedded(self) -> bool:
        return self.level2.embedded

    @property
    def order_gap(self) -> float:
        return self.level2.order_gap

    @property
    def rank(self) -> int:
        return self.level2.rank

    @property
    def truncation(self) -> float:
        return self.level2.truncation

    def state_dict(self) -> dict:
        return {"kind": self.kind, "level2": self.level2.state_dict()}

    @classmethod
    def load(cls, sd: dict, *, device=None) -> "FactoredLevels":
        st = sd["level2"]
        dev = st["W"].device if device is None else torch.device(device)
        fl = FactoredLevel2(_unbound(int(st["n"]), dev, st["W"].dtype), max_rank=st["max_rank"],
                            embedded=st["embedded"])
        fl.load_state_dict(st)
        return cls(fl)

    @property
    def nbytes(self) -> int:
        return self.level2.nbytes


#: kind -> class; a new representation is one class above and one line here
STATES: dict = {DenseLevels.kind: DenseLevels, FactoredLevels.kind: FactoredLevels}


def state_from_dict(sd: dict, *, device: Optional[torch.device] = None) -> CarlemanState:
    """The state saved by ``CarlemanState.state_dict()`` (its ``kind`` picks the class)."""
    kind = sd.get("kind")
    if kind not in STATES:
        raise ValueError(f"unknown Carleman state kind {kind!r}; known: {sorted(STATES)}")
    return STATES[kind].load(sd, device=device)
