"""Carleman linearisation of a polynomial difference equation (Sec. II A, V B, V E).

The state ``y = (y_1, …, y_N)`` with ``y_j ≈ u^{⊗j}`` (dimension ``Δ = n + n² + … + n^N``, Eq. V.103)
obeys the linear recurrence ``y(t+1) = y(t) + A(t) y(t) + b(t)``.  Two forms:

* ``"continuous"`` — the Kronecker sums of ref. [36] (Eq. V.10–V.11):
  ``A^j_{j+k−1} = Σ_{i=0}^{j−1} I^{⊗i} ⊗ Fk ⊗ I^{⊗(j−1−i)}``; the ``k = 0`` term of level 1 is ``b``.
* ``"discrete"`` — the paper's own (Sec. V B, Eq. V.12–V.17): ``y_j(t+1) = (u + f(u))^{⊗j}``
  expanded exactly with ``G0 = F0, G1 = I + F1, Gk = Fk`` and truncated at total degree ``N``:
  ``y_j(t+1) = Σ_{d=0}^{N} P(j, d) y_d``,  ``P(j, d) = Σ_{k1+…+kj=d} G_{k1} ⊗ … ⊗ G_{kj}``, ``y_0 = 1``.

Both have an explicit scipy.sparse ``A(t)`` (:meth:`CarlemanSystem.matrix`) and a matrix-free step
that applies the Kronecker structure mode by mode on ``y_j`` viewed as an ``n×…×n`` tensor and never
forms a Kronecker product (:meth:`CarlemanSystem.step`).  ``A`` depends on ``t`` only through a
time-dependent ``F0`` (the stochastic-gradient noise), exactly as ``A(t)`` in Eq. (II.54).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from .ode import NonFiniteError, PolynomialODE, _check_T, all_finite, as_tensor, like

__all__ = ["carleman", "CarlemanSystem", "CarlemanTooLarge", "FORMS", "required_order",
           "carleman_error_bound", "dissipativity", "Dissipativity", "default_max_bytes"]

FORMS = ("discrete", "continuous")
_BYTES_PER_NNZ = 40  # peak bytes per non-zero while scipy builds kron/bmat (COO triplets + CSR copy)


class CarlemanTooLarge(MemoryError):
    """Refused before allocation: the requested object would not fit in the memory budget."""


def default_max_bytes() -> int:
    """Half of the currently available physical memory (8 GiB if the OS does not say)."""
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2)
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 << 30


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.3g} GiB"


def _check_max_bytes(max_bytes, name: str = "max_bytes") -> Optional[int]:
    """``max_bytes`` must be ``None`` (half the available memory) or a positive integer."""
    if max_bytes is None:
        return None
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)) or max_bytes <= 0:
        raise ValueError(f"{name} must be a positive integer number of bytes, or None for half the "
                         f"available memory; got {max_bytes!r}")
    return int(max_bytes)


def refuse_over_budget(need: int, budget: int, what: str, instead: str) -> None:
    """Raise :class:`CarlemanTooLarge` — before anything is allocated — when ``need`` bytes exceed
    ``budget``: "``what`` needs X GiB > max_bytes=Y GiB; ``instead``"."""
    if need > budget:
        raise CarlemanTooLarge(f"{what} needs {_gib(need)} > max_bytes={_gib(budget)}; {instead}")


def _budget(max_bytes, fallback: Optional[int] = None) -> int:
    """The memory budget in bytes: ``max_bytes``, else ``fallback``, else :func:`default_max_bytes`."""
    max_bytes = _check_max_bytes(max_bytes)
    if max_bytes is None:
        max_bytes = fallback
    return default_max_bytes() if max_bytes is None else max_bytes


def carleman(ode: PolynomialODE, order: int, form: str = "discrete", *,
             max_bytes: Optional[int] = None) -> "CarlemanSystem":
    """Carleman-linearise ``ode`` to order ``N = order`` in the given ``form``.

    ``max_bytes`` (a positive integer, or ``None`` for half the available memory) bounds the memory
    of the matrix-free state (a few copies of ``Δ`` numbers): a system whose state alone would not
    fit is refused before anything is allocated.  It is also the default budget of the system's
    later allocations (:meth:`CarlemanSystem.matrix`, :meth:`~CarlemanSystem.simulate`, and the
    window solvers of :mod:`torch_qode.linsolve`).
    """
    return CarlemanSystem(ode, order, form, max_bytes=max_bytes)


class CarlemanSystem:
    """``y(t+1) = y(t) + A(t) y(t) + b(t)`` on ``y = (u, u⊗u, …, u^{⊗N})``; see module docstring."""

    def __init__(self, ode: PolynomialODE, order: int, form: str = "discrete", *,
                 max_bytes: Optional[int] = None):
        if not isinstance(ode, PolynomialODE):
            raise TypeError(f"ode must be a PolynomialODE, got {type(ode).__name__}")
        if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 1:
            raise ValueError(f"order must be an integer N ≥ 1, got {order!r}")
        if form not in FORMS:
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

    # ------------------------------------------------------------------------------- state helpers
    def lift(self, u0):
        """``(u0, u0⊗u0, …, u0^{⊗N})`` as one ``(Δ,)`` vector (arrays in, arrays out)."""
        u = self.ode._vec(u0, "u0")
        parts, cur = [u], u
        for _ in range(1, self.order):
            cur = torch.outer(cur, u).reshape(-1)
            parts.append(cur)
        return like(torch.cat(parts), u0)

    def levels(self, y) -> list:
        """Split a ``(Δ,)`` state into its levels ``[y_1, …, y_N]`` (views, flat)."""
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
        """One step ``y + A(t) y + b(t)``, matrix-free (arrays in, arrays out)."""
        x = self._state(y, "y")
        out = self._advance(x[:, None], t, offset=True)[:, 0]
        return like(out, y)

    def apply(self, Y: torch.Tensor, t: int = 0, *, offset: bool = False) -> torch.Tensor:
        """``(I + A(t)) Y`` (plus ``b(t)`` in every column if ``offset``) for a ``(Δ, m)`` torch block."""
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
        level = self._discrete_level if self.form == "discrete" else self._continuous_level
        out += [level(j, levels, f0) for j in range(2, self.order + 1)]
        res = out[0] if self.order == 1 else torch.cat(out, dim=0)
        if not all_finite(res):
            raise NonFiniteError(f"the Carleman state became non-finite at step t={t}")
        return res

    def _level1(self, levels, f0) -> torch.Tensor:
        """Level 1, the same in both forms: ``y_1 + F0 y_0 + Σ_{k=1}^{min(q,N)} Fk y_k``."""
        acc = levels[1].clone()
        if f0 is not None and levels[0] is not None:
            acc += f0[:, None] * levels[0]
        for k in range(1, min(self.degree, self.order) + 1):
            term = self.ode.terms[k]
            if term is not None:
                acc += term.matmat(levels[k])
        return acc

    # discrete form ---------------------------------------------------------------------------
    def _G(self, k: int, X: torch.Tensor) -> torch.Tensor:
        """``G_k X`` for k ≥ 1 (``G1 = I + F1``, ``Gk = Fk``) on a ``(n**k, c)`` block."""
        term = self.ode.terms[k]
        if k == 1:
            return X if term is None else X + term.matmat(X)
        return term.matmat(X)

    def _P(self, j: int, d: int, X: torch.Tensor, f0) -> Optional[torch.Tensor]:
        """``P(j, d) X`` for ``X`` of shape ``(n**d, m)``; ``None`` when the block is zero."""
        n, q = self.n, self.degree
        if j == 0:
            return X if d == 0 else None
        m = X.shape[1]
        out = None
        for k in range(0, min(q, d) + 1):
            e = d - k
            if e > q * (j - 1) or (j == 1 and e > 0):
                continue
            if k == 0:
                if f0 is None:
                    continue
                inner = self._P(j - 1, e, X, f0)
                if inner is None:
                    continue
                term = (f0[:, None, None] * inner[None]).reshape(n**j, m)
            else:
                if k >= 2 and self.ode.terms[k] is None:
                    continue
                Xk = X.reshape(n**k, n**e, m)
                if e <= j - 1:   # fewer columns for G_k when it goes first
                    Z = self._G(k, Xk.reshape(n**k, n**e * m)).reshape(n, n**e, m)
                    Z = Z.permute(1, 0, 2).reshape(n**e, n * m)
                    W = self._P(j - 1, e, Z, f0)
                    if W is None:
                        continue
                    term = W.reshape(n**(j - 1), n, m).permute(1, 0, 2).reshape(n**j, m)
                else:
                    Z = Xk.permute(1, 0, 2).reshape(n**e, n**k * m)
                    W = self._P(j - 1, e, Z, f0)
                    if W is None:
                        continue
                    W = W.reshape(n**(j - 1), n**k, m).permute(1, 0, 2).reshape(n**k, n**(j - 1) * m)
                    term = self._G(k, W).reshape(n**j, m)
            out = term if out is None else out + term
        return out

    def _discrete_level(self, j: int, levels, f0) -> torch.Tensor:
        m = levels[1].shape[1]
        acc = torch.zeros(self.n**j, m, dtype=levels[1].dtype, device=levels[1].device)
        for d in range(0, self.order + 1):
            if levels[d] is None:
                continue
            term = self._P(j, d, levels[d], f0)
            if term is not None:
                acc = acc + term
        return acc

    # continuous form -------------------------------------------------------------------------
    def _continuous_level(self, j: int, levels, f0) -> torch.Tensor:
        n, q = self.n, self.degree
        acc = levels[j].clone()
        m = acc.shape[1]
        for k in range(0, q + 1):
            s = j + k - 1
            if s > self.order or levels[s] is None:
                continue
            X = levels[s]
            for i in range(j):
                r = j - 1 - i
                if k == 0:
                    if f0 is None:
                        continue
                    Z = X.reshape(n**i, 1, n**r * m) * f0[None, :, None]
                else:
                    term = self.ode.terms[k]
                    if term is None:
                        continue
                    Xi = X.reshape(n**i, n**k, n**r * m).permute(1, 0, 2).reshape(n**k, n**(i + r) * m)
                    Z = term.matmat(Xi).reshape(n, n**i, n**r * m).permute(1, 0, 2)
                acc = acc + Z.reshape(n**j, m)
        return acc

    # ------------------------------------------------------------------------------------ runs
    def simulate(self, u0, T: int, *, max_bytes: Optional[int] = None):
        """The level-1 trajectory ``u(0..T)`` of the Carleman system: ``(T+1, n)``.

        Refuses (:class:`CarlemanTooLarge`) before allocating when the trajectory would not fit in
        ``max_bytes`` (default: the system's budget).
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
    def offset(self, t: int = 0) -> np.ndarray:
        """``b(t)`` as a ``(Δ,)`` numpy vector: ``(F0, 0, …)`` continuous; ``(F0, F0⊗F0, …)`` discrete."""
        f0 = self.ode.F0(t).detach().cpu().numpy()
        if self.form == "continuous":
            b = np.zeros(self.dim)
            b[: self.n] = f0
            return b
        parts, cur = [f0], f0
        for _ in range(1, self.order):
            cur = np.kron(cur, f0)
            parts.append(cur)
        return np.concatenate(parts)

    def _scipy_terms(self):
        terms = [None]
        for k in range(1, self.degree + 1):
            term = self.ode.terms[k]
            terms.append(None if term is None else term.scipy())
        return terms

    def _term_nnz(self, k: int) -> float:
        term = self.ode.terms[k]
        if term is None:
            return 0.0
        if term.nnz is None:
            return float(self.n) * self.n**k
        return float(term.nnz)

    def nnz_bound(self, t: int = 0) -> float:
        """An upper bound on ``nnz(A(t))`` computed from the coefficients' non-zeros alone."""
        n, q, N = self.n, self.degree, self.order
        f0_nnz = float(np.count_nonzero(self.ode.F0(t).detach().cpu().numpy())) if not self.ode.time_dependent else n
        g = [f0_nnz] + [self._term_nnz(k) for k in range(1, q + 1)]
        if self.form == "continuous":
            block = {}
            for j in range(1, N + 1):
                for k in range(0, q + 1):
                    s = j + k - 1
                    if 1 <= s <= N:
                        block[(j, s)] = block.get((j, s), 0.0) + j * g[k] * float(n) ** (j - 1)
            return sum(min(v, float(n) ** (j + s)) for (j, s), v in block.items())
        g[1] += n
        nnz = {(0, 0): 1.0}
        for j in range(1, N + 1):
            for d in range(0, N + 1):
                v = sum(g[k] * nnz.get((j - 1, d - k), 0.0) for k in range(0, min(q, d) + 1))
                nnz[(j, d)] = min(v, float(n) ** (j + d))   # a block cannot hold more than its size
        return sum(nnz[(j, d)] for j in range(1, N + 1) for d in range(1, N + 1)) + self.dim

    def matrix(self, t: int = 0, *, max_bytes: Optional[int] = None) -> sp.csr_matrix:
        """``A(t)`` as a scipy CSR matrix (``Δ×Δ``).

        Refuses (:class:`CarlemanTooLarge`) before allocating when the non-zeros would not fit in
        ``max_bytes`` (default: the system's budget, else half the available memory); use the
        matrix-free :meth:`step`.
        """
        budget = _budget(max_bytes, self.max_bytes)
        if not self.ode.explicit:
            raise TypeError("this system has matrix-free coefficients and no explicit matrix; use the "
                            "matrix-free step/simulate or solve_window(method='forward')")
        need = _BYTES_PER_NNZ * self.nnz_bound(t)
        if need > budget:
            raise CarlemanTooLarge(
                f"building A(t) for n={self.n}, N={self.order} ({self.form}) needs up to "
                f"{self.nnz_bound(t):,.0f} non-zeros ≈ {_gib(need)}, over the budget of {_gib(budget)} "
                f"(max_bytes); use the matrix-free CarlemanSystem.step/simulate or "
                f"solve_window(method='forward') instead")
        F = self._scipy_terms()
        f0 = sp.csr_matrix(self.ode.F0(t).detach().cpu().numpy()[:, None])
        n, q, N = self.n, self.degree, self.order
        blocks = [[None] * N for _ in range(N)]
        if self.form == "continuous":
            for j in range(1, N + 1):
                for k in range(0, q + 1):
                    s = j + k - 1
                    if s < 1 or s > N:
                        continue
                    Fk = f0 if k == 0 else F[k]
                    if Fk is None:
                        continue
                    blk = _kron_sum(Fk, n, j)
                    blocks[j - 1][s - 1] = blk if blocks[j - 1][s - 1] is None else blocks[j - 1][s - 1] + blk
            A = sp.bmat(blocks, format="csr", dtype=np.float64) if any(b is not None for r in blocks for b in r) else None
        else:
            G = [f0, (sp.identity(n, format="csr") + (F[1] if F[1] is not None else 0)).tocsr()] + F[2:]
            P = {(0, 0): sp.identity(1, format="csr")}
            for j in range(1, N + 1):
                for d in range(0, N + 1):
                    acc = None
                    for k in range(0, min(q, d) + 1):
                        prev = P.get((j - 1, d - k))
                        if prev is None or G[k] is None:
                            continue
                        blk = sp.kron(G[k], prev, format="csr")
                        acc = blk if acc is None else acc + blk
                    if acc is not None:
                        P[(j, d)] = acc
            for j in range(1, N + 1):
                for d in range(1, N + 1):
                    blocks[j - 1][d - 1] = P.get((j, d))
            A = sp.bmat(blocks, format="csr", dtype=np.float64) - sp.identity(self.dim, format="csr")
        if A is None:
            A = sp.csr_matrix((self.dim, self.dim))
        A = sp.csr_matrix(A, shape=(self.dim, self.dim))
        A.eliminate_zeros()
        A.sort_indices()
        return A

    def row_sparsity(self, t: int = 0, *, max_bytes: Optional[int] = None) -> int:
        """Measured row sparsity ``s``: the most non-zeros in any row of ``A(t)`` (cf. Theorem V.1)."""
        A = self.matrix(t, max_bytes=max_bytes)
        return int(np.diff(A.indptr).max()) if A.shape[0] else 0

    def sparsity_bound(self) -> int:
        """Row-sparsity bound of Theorem V.1 (Eq. V.100–V.106).

        ``S_i^{(k)}`` = non-zeros of row ``i`` of ``Fk`` (a matrix-free term counts as dense; a
        time-dependent ``F0`` as 1 per row).  Continuous form: a level-``J`` row has at most
        ``Σ_{j≤J} Σ_k S_{i_j}^{(k)}`` entries, ``k`` running over the degrees kept at that level
        (Eq. V.104/V.105).  Discrete form (our extension — products, not sums, of the terms of
        ``u + f(u)``): at most ``Σ_{k1+…+kJ ≤ N} Π_j max_i S'^{(kj)}_i`` with ``S'^{(1)} = S^{(1)} + 1``.
        """
        n, q, N = self.n, self.degree, self.order
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
        S = np.stack(rows)  # (q+1, n)
        best = 0.0
        if self.form == "continuous":
            for J in range(1, N + 1):
                ks = [k for k in range(0, q + 1) if 1 <= J + k - 1 <= N and not (k == 0 and J == 1)]
                if ks:
                    best = max(best, J * float(S[ks].sum(axis=0).max()))
            return int(min(best, self.dim))
        smax = S.max(axis=1)
        smax[1] = (S[1] + 1).max()
        for J in range(1, N + 1):
            total = 0.0
            for comp in _compositions_up_to(J, q, N):
                if sum(comp) == 0:
                    continue
                total += float(np.prod([smax[k] for k in comp]))
            best = max(best, total)
        return int(min(best, self.dim))       # a row has at most Δ entries

    def __repr__(self) -> str:
        return f"CarlemanSystem(n={self.n}, order={self.order}, form={self.form!r}, dim={self.dim})"


def _kron_sum(Fk: sp.csr_matrix, n: int, j: int) -> sp.csr_matrix:
    """``Σ_{i=0}^{j-1} I^{⊗i} ⊗ Fk ⊗ I^{⊗(j-1-i)}`` (Eq. V.11)."""
    acc = None
    for i in range(j):
        blk = sp.kron(sp.kron(sp.identity(n**i, format="csr"), Fk, format="csr"),
                      sp.identity(n**(j - 1 - i), format="csr"), format="csr")
        acc = blk if acc is None else acc + blk
    return acc


@lru_cache(maxsize=None)
def _compositions_up_to(J: int, q: int, N: int) -> tuple:
    """All ``(k1, …, kJ)`` with ``0 ≤ ki ≤ q`` and ``Σ ki ≤ N``."""
    if J == 0:
        return ((),)
    out = []
    for k in range(0, q + 1):
        for rest in _compositions_up_to(J - 1, q, N - k) if N - k >= 0 else ():
            out.append((k,) + rest)
    return tuple(out)


# -------------------------------------------------------------------------------- error bounds
def carleman_error_bound(order: int, u_norm: float, norms: Sequence[float], rate: float) -> float:
    """Linearisation-error bound ``3 N ||ū||^{N+1} Σ_{ℓ=2}^q (ℓ−1)||F_ℓ|| / rate`` (Eq. II.69–II.74).

    ``norms = [||F0||, ||F1||, …, ||Fq||]`` (e.g. ``ode.norms()``), ``u_norm`` the bound
    ``||u(t)|| ≤ ||ū|| < 1`` of Eq. (II.67)–(II.68) and ``rate`` the dissipation scale that the
    paper writes ``||A||`` in Eq. (II.74)–(II.76) (e.g. ``1 − ||I + F1||`` or ``η λ_min``).
    """
    _check_bound_args(u_norm, norms, rate)
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 1:
        raise ValueError(f"order must be an integer N ≥ 1, got {order!r}")
    s = sum((l - 1) * float(norms[l]) for l in range(2, len(norms)))
    return 3.0 * order * u_norm ** (order + 1) * s / rate


def required_order(eps: float, u_norm: float, norms: Sequence[float], rate: float, *,
                   max_order: int = 10_000) -> int:
    """The smallest Carleman order ``N`` with ``carleman_error_bound(N, …) ≤ eps`` (Eq. II.76).

    Our reconstruction of Eq. (II.76) solves ``3 N ||ū||^{N+1} Σ_{ℓ=2}^q (ℓ−1)||F_ℓ|| / rate ≤ ε``
    (the bound of Eq. II.74) for ``N`` by an upward search, so the two functions never disagree; the
    closed form ``⌈log(3Σ/(rate·ε)) / log(1/||ū||)⌉`` drops the factor ``N`` and can fall short.  A
    linear ODE (all ``F_ℓ = 0`` for ℓ ≥ 2) or ``||ū|| = 0`` needs ``N = 1``.  Raises ``ValueError``
    when no ``N ≤ max_order`` reaches ``eps``.  Other arguments as in :func:`carleman_error_bound`.
    """
    _check_bound_args(u_norm, norms, rate)
    if not (isinstance(eps, (int, float, np.floating)) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    if isinstance(max_order, bool) or not isinstance(max_order, (int, np.integer)) or max_order < 1:
        raise ValueError(f"max_order must be an integer ≥ 1, got {max_order!r}")
    s = sum((l - 1) * float(norms[l]) for l in range(2, len(norms)))
    if s == 0 or u_norm == 0:
        return 1
    # bound(N) ≥ 3 s u^{N+1} / rate, so no N below log(3s/(rate ε)) / log(1/u) − 1 can reach eps
    low = (math.log(3.0 * s) - math.log(rate) - math.log(eps)) / math.log(1.0 / u_norm) - 1.0
    N = max(1, math.floor(low)) if math.isfinite(low) else max_order + 1
    while N <= max_order:
        if carleman_error_bound(N, u_norm, norms, rate) <= eps:
            return N
        N += 1
    raise ValueError(f"no Carleman order N ≤ max_order={max_order} reaches eps={eps:g} (Eq. II.74: "
                     f"3N·||ū||^(N+1)·{s:.3g}/rate with ||ū||={u_norm:.10g}, rate={rate:.3g}); rescale u so that "
                     "||ū|| is further below 1, raise eps or max_order")


def _check_bound_args(u_norm, norms, rate) -> None:
    if not (0 <= u_norm < 1):
        raise ValueError(f"u_norm must satisfy 0 ≤ ||ū|| < 1 (Eq. II.68; rescale u), got {u_norm!r}")
    if len(norms) < 2 or any(not math.isfinite(float(x)) or float(x) < 0 for x in norms):
        raise ValueError("norms must be [||F0||, ||F1||, ..., ||Fq||], finite and non-negative")
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate must be a positive finite dissipation scale, got {rate!r}")


# ------------------------------------------------------------------------------- dissipativity
@dataclass
class Dissipativity:
    """Dissipation numbers of a Carleman system (Theorem II.1, Eq. II.105, II.77–II.83)."""

    norm_I_plus_A: float            # ||I + A||_2 of the whole system (Theorem II.1 asks ≤ 1)
    fully_dissipative: bool         # ||I + A|| ≤ 1
    level1_eigenvalues: np.ndarray  # spectrum of I + F1, the level-1 block of I + A (both forms)
    level1_spectral_radius: float
    dissipative_fraction: float     # fraction of level-1 modes with |1 + λ(F1)| < 1

    def as_dict(self) -> dict:
        d = asdict(self)
        d["level1_eigenvalues"] = self.level1_eigenvalues.tolist()
        return d


def dissipativity(system: CarlemanSystem, t: int = 0, *, max_bytes: Optional[int] = None) -> Dissipativity:
    """Test ``||I + A(t)|| ≤ 1`` (Theorem II.1) and report the level-1 spectrum of ``I + F1``."""
    if not isinstance(system, CarlemanSystem):
        raise TypeError(f"system must be a CarlemanSystem, got {type(system).__name__}")
    A = system.matrix(t, max_bytes=max_bytes)
    IA = (sp.identity(system.dim, format="csr") + A).tocsr()
    if system.dim <= 2000:
        norm = float(np.linalg.norm(IA.toarray(), 2))
    else:
        from scipy.sparse.linalg import svds

        norm = float(svds(IA, k=1, return_singular_vectors=False)[0])
    F1 = system.ode.terms[1]
    n = system.n
    G1 = np.eye(n) + (F1.scipy().toarray() if F1 is not None else 0.0)
    eig = np.linalg.eigvalsh(G1) if np.allclose(G1, G1.T) else np.linalg.eigvals(G1)
    mod = np.abs(eig)
    return Dissipativity(norm_I_plus_A=norm, fully_dissipative=bool(norm <= 1 + 1e-12),
                         level1_eigenvalues=eig, level1_spectral_radius=float(mod.max()),
                         dissipative_fraction=float(np.mean(mod < 1)))
