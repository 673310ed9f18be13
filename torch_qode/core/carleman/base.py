"""The Carleman system shared by every form (Sec. II A, V B, V E); one form per module.

The state ``y = (y_1, …, y_N)`` with ``y_j ≈ u^{⊗j}`` (dimension ``Δ = n + n² + … + n^N``, Eq. V.103)
obeys the linear recurrence ``y(t+1) = y(t) + A(t) y(t) + b(t)``.  Two forms:

* ``"continuous"`` — the Kronecker sums of ref. [36] (Eq. V.10–V.11):
  ``A^j_{j+k−1} = Σ_{i=0}^{j−1} I^{⊗i} ⊗ Fk ⊗ I^{⊗(j−1−i)}``; the ``k = 0`` term of level 1 is ``b``.
* ``"discrete"`` — the paper's own (Sec. V B, Eq. V.12–V.17): ``y_j(t+1) = (u + f(u))^{⊗j}``
  expanded exactly with ``G0 = F0, G1 = I + F1, Gk = Fk`` and truncated at total degree ``N``:
  ``y_j(t+1) = Σ_{d=0}^{N} P(j, d) y_d``,  ``P(j, d) = Σ_{k1+…+kj=d} G_{k1} ⊗ … ⊗ G_{kj}``, ``y_0 = 1``.

Each form is a subclass (``discrete.py``, ``continuous.py``) registered in ``FORMS``
(``carleman/__init__.py``); it supplies the levels ``j ≥ 2`` of the step, ``b(t)``, the blocks of the
explicit ``A`` and its non-zero / sparsity bounds.  Both have an explicit scipy.sparse ``A(t)``
(:meth:`CarlemanSystem.matrix`) and a matrix-free step
that applies the Kronecker structure mode by mode on ``y_j`` viewed as an ``n×…×n`` tensor and never
forms a Kronecker product (:meth:`CarlemanSystem.step`).  ``A`` depends on ``t`` only through a
time-dependent ``F0`` (the stochastic-gradient noise), exactly as ``A(t)`` in Eq. (II.54).
"""
from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from ..._checks import check_int
from ..._lazy import lazy_module
from ..registry import Registry
from ..ode import NonFiniteError, PolynomialODE, _check_T, all_finite, as_tensor, like
from .budget import BYTES_PER_NNZ, CarlemanTooLarge, budget as _budget, check_max_bytes as _check_max_bytes, gib as _gib
from .budget import refuse_over_budget

if TYPE_CHECKING:  # scipy.sparse loads on first use (issue 19)
    import scipy.sparse as sp
else:
    sp = lazy_module("scipy.sparse")

__all__ = ["CarlemanSystem", "FORMS"]

#: Carleman forms, name -> :class:`CarlemanSystem` subclass (prints as the tuple of names); the forms'
#: package fills it (``carleman/__init__.py``: one line per form)
FORMS = Registry("Carleman form")


class CarlemanSystem:
    """``y(t+1) = y(t) + A(t) y(t) + b(t)`` on ``y = (u, u⊗u, …, u^{⊗N})``; see the module docstring.

    Build a system with :func:`~torch_qode.core.carleman.carleman` (the factory: it looks the form up
    in :data:`FORMS` once) or with a form's class (``DiscreteCarleman(ode, order)``).  The old spelling
    ``CarlemanSystem(ode, order, form)`` still works: on this base class, :meth:`__new__` is that same
    lookup and nothing else.

    Args:
        ode: the polynomial ODE.
        order: the Carleman order ``N`` (an integer ≥ 1).
        form: the form's registered name (``None``: the class's own); it must be the class's own.
        max_bytes: memory budget of the state (see :func:`~torch_qode.core.carleman.carleman`).

    Raises:
        TypeError: ``ode`` is not a :class:`~torch_qode.core.ode.PolynomialODE`.
        ValueError: a bad ``order``, or a ``form`` that is not this class's.
        CarlemanTooLarge: the state alone would not fit in ``max_bytes``.
    """

    #: the registry name of the form (set by each subclass)
    name: str = ""

    def __new__(cls, *args, **kwargs):
        """The old spelling ``CarlemanSystem(ode, order, form)``: the class ``FORMS`` registers as ``form``
        (the lookup :func:`~torch_qode.core.carleman.carleman` makes); a form's class builds itself."""
        if cls is CarlemanSystem:
            cls = FORMS.lookup(args[2] if len(args) > 2 else kwargs.get("form", "discrete"), "form")
        return super().__new__(cls)

    def __init__(self, ode: PolynomialODE, order: int, form: Optional[str] = None, *,
                 max_bytes: Optional[int] = None):
        if not isinstance(ode, PolynomialODE):
            raise TypeError(f"ode must be a PolynomialODE, got {type(ode).__name__}")
        order = check_int(order, "order", 1, hint=" (the Carleman order N)")
        form = self.name if form is None else form
        if form not in FORMS or form != self.name:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        self.ode, self.order, self.form = ode, int(order), form
        self.n, self.degree = ode.n, ode.degree
        self.level_dims = [self.n**j for j in range(1, self.order + 1)]
        self.offsets = np.concatenate([[0], np.cumsum(self.level_dims)]).astype(np.int64)
        self.dim = int(self.offsets[-1])
        self.max_bytes = _check_max_bytes(max_bytes)
        itemsize = torch.finfo(ode.dtype).bits // 8
        need = 4 * self.dim * itemsize
        budget = _budget(self.max_bytes)
        if need > budget:
            raise CarlemanTooLarge(
                f"a Carleman state of order N={self.order} for n={self.n} has Δ={self.dim:,} entries and "
                f"needs about {_gib(need)}, over the budget of {_gib(budget)} (max_bytes); lower the "
                f"order or shrink the support (sparser upload)")

    # ------------------------------------------------------------------------------- form hooks
    def _level(self, j: int, levels: list, f0) -> torch.Tensor:   # pragma: no cover - abstract
        """Level ``j ≥ 2`` of ``(I + A) y (+ b)`` on ``levels = [y_0, y_1, …, y_N]`` (``y_0`` = ones or None)."""
        raise NotImplementedError

    def offset(self, t: int = 0) -> np.ndarray:   # pragma: no cover - abstract
        """``b(t)`` as a ``(Δ,)`` numpy vector.

        Args:
            t: The step (``b`` depends on it through a time-dependent F0).

        Returns:
            ``b(t)``, of shape ``(Δ,)`` (each form overrides this method).

        Raises:
            NotImplementedError: On the base class.
        """
        raise NotImplementedError

    def _nnz_bound(self, g: list) -> float:   # pragma: no cover - abstract
        """Bound on ``nnz(A)`` from ``g[k]`` = non-zeros of ``Fk`` (``g[0]`` of ``F0``)."""
        raise NotImplementedError

    def _blocks(self, F: list, f0: sp.csr_matrix) -> Optional[sp.spmatrix]:   # pragma: no cover - abstract
        """``A`` assembled from scipy terms ``F = [None, F1, …, Fq]`` and ``f0`` (``(n, 1)``); None if zero."""
        raise NotImplementedError

    def _sparsity(self, S: np.ndarray) -> float:   # pragma: no cover - abstract
        """Row-sparsity bound from ``S[k, i]`` = non-zeros of row ``i`` of ``Fk`` (Theorem V.1)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------- state helpers
    def lift(self, u0):
        """``(u0, u0⊗u0, …, u0^{⊗N})`` as one ``(Δ,)`` vector (arrays in, arrays out).

        Args:
            u0: The state, of shape ``(n,)``.

        Returns:
            The lifted state ``y(0)``, of shape ``(Δ,)``: numpy when ``u0`` is not a torch tensor.
        """
        u = self.ode._vec(u0, "u0")
        parts, cur = [u], u
        for _ in range(1, self.order):
            cur = torch.outer(cur, u).reshape(-1)
            parts.append(cur)
        return like(torch.cat(parts), u0)

    def levels(self, y) -> list:
        """Split a ``(Δ,)`` state into its levels ``[y_1, …, y_N]`` (views, flat).

        Args:
            y: A Carleman state, of shape ``(Δ,)``.

        Returns:
            The ``N`` levels, ``y_j`` of shape ``(n**j,)``: numpy when ``y`` is not a torch tensor.
        """
        x = self._state(y, "y")
        return [like(x[self.offsets[j]:self.offsets[j + 1]], y) for j in range(self.order)]

    def _state(self, y, name: str) -> torch.Tensor:
        x = as_tensor(y, self.ode.dtype, self.ode.device, name)
        if tuple(x.shape) != (self.dim,):
            raise ValueError(f"{name} must have shape ({self.dim},) (Δ for n={self.n}, N={self.order}); "
                             f"got {tuple(x.shape)}")
        return x

    # ------------------------------------------------------------------------------ matrix-free
    def step(self, y, t: int = 0):
        """One step ``y + A(t) y + b(t)``, matrix-free (arrays in, arrays out).

        Args:
            y: The state, of shape ``(Δ,)``.
            t: The step (for a time-dependent F0).

        Returns:
            ``y(t+1)``, of shape ``(Δ,)``: numpy when ``y`` is not a torch tensor.
        """
        x = self._state(y, "y")
        out = self._advance(x[:, None], t, offset=True)[:, 0]
        return like(out, y)

    def step_into(self, y: torch.Tensor, t: int, out: torch.Tensor) -> bool:
        """:meth:`step` of a torch ``y (Δ,)`` written into ``out``, bit for bit, with no flat temporary:
        at order 1 with an F1 that offers ``matvec_buffer`` (``F1 y`` before its cast to the state's
        dtype, in a reused buffer), ``out = y + F0(t)``, ``out += F1 y``, then the state's finiteness
        check, back to back (``out`` stays in cache).

        Args:
            y: The state, a torch tensor of shape ``(Δ,)`` in the ODE's dtype and device.
            t: The step (for a time-dependent F0).
            out: Where ``y(t+1)`` is written: the same shape, dtype and device as ``y``.

        Returns:
            True when ``out`` holds the step; False, touching nothing, where that lean path does not
            apply (then use :meth:`step`).

        Raises:
            NonFiniteError: F0(t) or the new state holds NaN or ±inf.
        """
        F1 = self.ode.terms[1] if self.degree >= 1 else None
        product = getattr(F1, "matvec_buffer", None)
        if self.order != 1 or product is None or y.dtype != self.ode.dtype or y.device != self.ode.device \
                or out.dtype != y.dtype or out.device != y.device or tuple(y.shape) != (self.dim,) \
                or tuple(out.shape) != (self.dim,):
            return False
        h = product(y)
        if self.ode.F0_is_zero:
            out.copy_(y)
        else:                                    # F0's own check runs only when the state fails its
            torch.add(y, self.ode.F0(t, check=False), out=out)     # (a non-finite F0 makes it fail)
        out.add_(h if h.device == out.device else h.to(out.device))
        if not all_finite(out):
            if not self.ode.F0_is_zero:
                self.ode.F0(t)                   # raises as step() would when F0 is the cause
            raise NonFiniteError(f"the Carleman state became non-finite at step t={t}")
        return True

    def apply(self, Y: torch.Tensor, t: int = 0, *, offset: bool = False) -> torch.Tensor:
        """``(I + A(t)) Y`` (plus ``b(t)`` in every column if ``offset``) for a ``(Δ, m)`` torch block.

        Args:
            Y: A ``(Δ, m)`` torch block of states.
            t: The step (for a time-dependent F0).
            offset: Add ``b(t)`` to every column.

        Returns:
            The advanced block, of shape ``(Δ, m)``, in the ODE's dtype.

        Raises:
            ValueError: ``Y`` is not of shape ``(Δ, m)``.
            NonFiniteError: The result holds NaN or ±inf.
        """
        if Y.dim() != 2 or Y.shape[0] != self.dim:
            raise ValueError(f"Y must have shape ({self.dim}, m); got {tuple(Y.shape)}")
        return self._advance(Y.to(self.ode.dtype), t, offset=offset)

    def _advance(self, Y: torch.Tensor, t: int, offset: bool) -> torch.Tensor:
        m = Y.shape[1]
        lv = [Y[self.offsets[j]:self.offsets[j + 1]] for j in range(self.order)]
        f0 = None if self.ode.F0_is_zero else self.ode.F0(t)
        y0 = torch.ones(1, m, dtype=Y.dtype, device=Y.device) if offset else None
        levels = [y0] + lv
        out = [self._level1(levels, f0)]
        out += [self._level(j, levels, f0) for j in range(2, self.order + 1)]
        res = out[0] if self.order == 1 else torch.cat(out, dim=0)
        if not all_finite(res):
            raise NonFiniteError(f"the Carleman state became non-finite at step t={t}")
        return res

    def _level1(self, levels, f0) -> torch.Tensor:
        """Level 1, the same in every form: ``y_1 + F0 y_0 + Σ_{k=1}^{min(q,N)} Fk y_k``."""
        if f0 is not None and levels[0] is not None:   # levels[0] is y_0 = 1 (the offset): F0·y_0 = F0 exactly
            acc = levels[1] + f0[:, None]
        else:
            acc = levels[1].clone()
        for k in range(1, min(self.degree, self.order) + 1):
            term = self.ode.terms[k]
            if term is not None:
                acc += term.matmat(levels[k])
        return acc

    # ------------------------------------------------------------------------------------ runs
    def simulate(self, u0, T: int, *, max_bytes: Optional[int] = None):
        """The level-1 trajectory ``u(0..T)`` of the Carleman system: ``(T+1, n)``.

        Args:
            u0: The initial state, of shape ``(n,)``.
            T: The number of steps, ``T ≥ 0``.
            max_bytes: Memory budget of the trajectory (default: the system's budget).

        Returns:
            The level-1 trajectory, of shape ``(T+1, n)``: numpy when ``u0`` is not a torch tensor.

        Raises:
            CarlemanTooLarge: The trajectory would not fit in ``max_bytes`` (before allocating).
            NonFiniteError: The state became non-finite.
        """
        T = _check_T(T)
        budget = _budget(max_bytes, self.max_bytes)
        refuse_over_budget((T + 1) * self.n * (torch.finfo(self.ode.dtype).bits // 8), budget,
                           f"simulate over T={T} steps keeps a (T+1)×n = {T + 1:,}×{self.n} trajectory: it",
                           "use a shorter T, or advance the state with CarlemanSystem.step and keep only "
                           "what you need")
        y = self._state(self.lift(as_tensor(u0, self.ode.dtype, self.ode.device, "u0")), "y")
        traj = torch.empty(T + 1, self.n, dtype=y.dtype, device=y.device)
        traj[0] = y[: self.n]
        for t in range(T):
            y = self._advance(y[:, None], t, offset=True)[:, 0]
            traj[t + 1] = y[: self.n]
        return like(traj, u0)

    # --------------------------------------------------------------------------------- explicit
    def _scipy_terms(self):
        return [None] + [None if term is None else term.to_scipy() for term in self.ode.terms[1:]]

    def _term_nnz(self, k: int) -> float:
        term = self.ode.terms[k]
        if term is None:
            return 0.0
        if term.nnz is None:
            return float(self.n) * self.n**k
        return float(term.nnz)

    def nnz_bound(self, t: int = 0) -> float:
        """An upper bound on ``nnz(A(t))`` computed from the coefficients' non-zeros alone.

        Args:
            t: The step (a constant F0's non-zeros are counted at ``t``; a time-dependent one counts as dense).

        Returns:
            The bound (a matrix-free term counts as dense).
        """
        n = self.n
        f0_nnz = float(np.count_nonzero(self.ode.F0(t).detach().cpu().numpy())) if not self.ode.time_dependent else n
        return self._nnz_bound([f0_nnz] + [self._term_nnz(k) for k in range(1, self.degree + 1)])

    def matrix_refusal(self, t: int = 0, *, max_bytes: Optional[int] = None) -> Optional[str]:
        """Why :meth:`matrix` would refuse (matrix-free terms, or over the memory budget).

        Args:
            t: The step.
            max_bytes: Memory budget of ``A(t)`` (default: the system's budget, else half the available memory).

        Returns:
            The reason as a sentence, or ``None`` when :meth:`matrix` would build ``A(t)``.
        """
        budget = _budget(max_bytes, self.max_bytes)
        if not self.ode.explicit:
            return ("this system has matrix-free coefficients and no explicit matrix; use the "
                    "matrix-free step/simulate or solve_window(method='forward')")
        need = BYTES_PER_NNZ * self.nnz_bound(t)
        if need > budget:
            return (f"building A(t) for n={self.n}, N={self.order} ({self.form}) needs up to "
                    f"{self.nnz_bound(t):,.0f} non-zeros ≈ {_gib(need)}, over the budget of {_gib(budget)} "
                    f"(max_bytes); use the matrix-free CarlemanSystem.step/simulate or "
                    f"solve_window(method='forward') instead")
        return None

    def matrix(self, t: int = 0, *, max_bytes: Optional[int] = None) -> sp.csr_matrix:
        """``A(t)`` as a scipy CSR matrix (``Δ×Δ``).

        Args:
            t: The step (``A`` depends on it through a time-dependent F0).
            max_bytes: Memory budget of ``A(t)`` (default: the system's budget, else half the available memory).

        Returns:
            ``A(t)``, a ``Δ×Δ`` CSR matrix with sorted indices and no explicit zeros.

        Raises:
            TypeError: The system has matrix-free coefficients (see :meth:`matrix_refusal`).
            CarlemanTooLarge: Its non-zeros would not fit in ``max_bytes`` (before allocating).
        """
        why = self.matrix_refusal(t, max_bytes=max_bytes)
        if why is not None:
            raise (TypeError if not self.ode.explicit else CarlemanTooLarge)(why)
        F = self._scipy_terms()
        f0 = sp.csr_matrix(self.ode.F0(t).detach().cpu().numpy()[:, None])
        A = self._blocks(F, f0)
        if A is None:
            A = sp.csr_matrix((self.dim, self.dim))
        A = sp.csr_matrix(A, shape=(self.dim, self.dim))
        A.eliminate_zeros()
        A.sort_indices()
        return A

    def row_sparsity(self, t: int = 0, *, max_bytes: Optional[int] = None) -> int:
        """Measured row sparsity ``s``: the most non-zeros in any row of ``A(t)`` (cf. Theorem V.1).

        Args:
            t: The step.
            max_bytes: Memory budget of ``A(t)``, as in :meth:`matrix`.

        Returns:
            ``s`` (0 for an empty matrix).

        Raises:
            TypeError: The system has matrix-free coefficients.
            CarlemanTooLarge: ``A(t)`` would not fit in ``max_bytes``.
        """
        A = self.matrix(t, max_bytes=max_bytes)
        return int(np.diff(A.indptr).max()) if A.shape[0] else 0

    def sparsity_bound(self) -> int:
        """Row-sparsity bound of Theorem V.1 (Eq. V.100–V.106); the form supplies the count.

        ``S_i^{(k)}`` = non-zeros of row ``i`` of ``Fk`` (a matrix-free term counts as dense; a
        time-dependent ``F0`` as 1 per row).

        Returns:
            The bound, at most ``Δ``.
        """
        n, q = self.n, self.degree
        rows = [np.ones(n) if self.ode.time_dependent
                else (self.ode.F0(0).detach().cpu().numpy() != 0).astype(float)]
        for k in range(1, q + 1):
            term = self.ode.terms[k]
            if term is None:
                rows.append(np.zeros(n))
            elif term.row_nnz is None:
                rows.append(np.full(n, float(n**k)))
            else:
                rows.append(np.asarray(term.row_nnz, dtype=float))
        return int(min(self._sparsity(np.stack(rows)), self.dim))   # a row has at most Δ entries

    def __repr__(self) -> str:
        return f"CarlemanSystem(n={self.n}, order={self.order}, form={self.form!r}, dim={self.dim})"


@lru_cache(maxsize=None)
def compositions_up_to(J: int, q: int, N: int) -> tuple:
    """All ``(k1, …, kJ)`` with ``0 ≤ ki ≤ q`` and ``Σ ki ≤ N``."""
    if J == 0:
        return ((),)
    out = []
    for k in range(0, q + 1):
        for rest in compositions_up_to(J - 1, q, N - k) if N - k >= 0 else ():
            out.append((k,) + rest)
    return tuple(out)
