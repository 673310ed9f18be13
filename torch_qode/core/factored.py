"""The factored level-2 Carleman state: order 2 on real networks in O(n·T) memory (DESIGN.md,
"The factored level-2 state"; issue 11).

A window starts at u(0) = 0, so every Carleman level starts at 0.  For the *discrete* form (Sec. V B)
of a quadratic ODE ``u ↦ u + g(t) + F1 u + F2 u⊗u`` truncated at N = 2, with ``Y2`` the level-2
block ``y2`` viewed as an ``n×n`` matrix (row-major, ``vec(a bᵀ) = a⊗b``), ``g = F0(t)`` and
``G1 = I + F1``, expanding ``(g + G1 u + F2 u⊗u)^{⊗j}`` to total degree 2 gives

    w        = G1 y1 + F2·vec(Y2)                      (degree 1 and 2 parts of level 1)
    y1(t+1)  = g + w
    Y2(t+1)  = G1 Y2 G1ᵀ + g gᵀ + g wᵀ + w gᵀ           (g⊗g, g⊗G1y1 + G1y1⊗g, G1⊗G1 y2,
                                                         g⊗F2y2 + F2y2⊗g; degree 3 and 4 dropped)

(checked against ``carleman(ode, 2, "discrete").step`` and the ``np.kron`` reference in
``tests/core/test_factored.py``).  Each step adds a symmetric term of rank ≤ 2, so ``Y2(t) = W C Wᵀ``
with ``W`` of ``n × k``, ``k ≤ 2t``.  This module keeps ``W`` orthonormal and ``C`` diagonal (each
step: one QR of ``[G1 W, g, w]`` and an eigen-decomposition of the small core, both exact rewritings),
so ``F2·vec(Y2) = Σ_l C_ll F2(w_l, w_l)`` needs no further factorisation and the discarded part of a
rank truncation is exactly ``sqrt(Σ λ_dropped²)`` in the Frobenius norm.

Cost per step at rank ``k``: one batched ``F1.matmat`` of ``k + 1`` columns (``k + 2`` with the
embedded order-1 state) and ``k`` symmetric third-order products ``F2(z, z)`` (one batched
``sym_sum`` call when the term offers one); memory ``n·(k + 3)`` numbers.  Nothing of size ``n²`` is
ever formed for matrix-free terms.

The F2 capability used, duck-typed (``getattr(term, "sym_sum", None)``): ``term.sym_sum(Z, lam)``
with ``Z`` of shape ``(n, m)`` and ``lam`` of shape ``(m,)`` returns ``Σ_l lam_l F2 (z_l ⊗ z_l)``
as ``(n,)`` — the coefficient F2 included.  Without it, ``term.power(z)`` per column; an explicit F2
is applied through its matrix (sparse: only the entries of ``Y2`` that its columns touch).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from .._checks import check_bool, check_choice, check_int, check_optional_int, check_real
from .carleman import CarlemanTooLarge
from .ode import NonFiniteError, PolynomialODE, _check_T, all_finite, as_tensor

__all__ = ["FactoredLevel2", "factored_simulate", "relative_gap", "EmbeddedOrder1", "DEFAULT_Y2_BYTES"]

#: ``FactoredLevel2.Y2()`` refuses a dense ``n×n`` level 2 above this many bytes (256 MiB) unless told
DEFAULT_Y2_BYTES = 256 * 2**20

_STATE_KEYS = ("kind", "n", "dtype", "t", "W", "C", "y1", "v", "max_rank", "embedded", "rank",
               "truncation", "eps_log", "gnorm_log", "products")


def relative_gap(u2: torch.Tensor, u1: torch.Tensor) -> float:
    """``‖u2 − u1‖ / ‖u2‖`` (0 when both are equal, inf when only ``u2`` is 0): with ``u2 = u⁽²⁾(T)`` and
    ``u1 = u⁽¹⁾(T)`` issue 11's ``order_gap``, the embedded estimate of the order-1 truncation error."""
    diff = float(torch.linalg.vector_norm(u2 - u1))
    if diff == 0.0:
        return 0.0
    den = float(torch.linalg.vector_norm(u2))
    return diff / den if den > 0 else math.inf


class EmbeddedOrder1:
    """An order-2 state that may carry the order-1 level 1 ``v`` beside its own level 1 (``level1()``):
    issue 11's embedded error estimate, as an embedded Runge–Kutta pair estimates its error."""

    v: Optional[torch.Tensor]

    def level1_order1(self) -> torch.Tensor:
        """The embedded order-1 state ``u⁽¹⁾(t)``: ``(n,)`` (needs ``embedded=True``)."""
        if self.v is None:
            raise ValueError("level1_order1 needs embedded=True (the order-1 state is not carried)")
        return self.v.clone()

    @property
    def order_gap(self) -> float:
        """``‖u⁽²⁾(t) − u⁽¹⁾(t)‖ / ‖u⁽²⁾(t)‖`` (0 when both are 0; needs ``embedded=True``)."""
        if self.v is None:
            raise ValueError("order_gap needs embedded=True (the order-1 state is not carried)")
        return relative_gap(self.level1(), self.v)


class FactoredLevel2(EmbeddedOrder1):
    """The discrete-form order-2 Carleman state of a quadratic ODE started from ``u(0) = 0``.

    Args:
        ode: A :class:`~torch_qode.core.ode.PolynomialODE` of degree 1 or 2 (``F0`` constant or a callable
            ``t -> (n,)``; ``F1``, ``F2`` explicit or matrix-free).
        order: Only ``order=2``, ``form="discrete"`` (the factorisation is that of level 2 of the discrete form); they
            are arguments so that a caller holding other values is refused clearly.
        form: See ``order``.
        u0: ``None`` or an all-zero ``(n,)`` vector: the factorisation ``Y2 = W C Wᵀ`` with small ``k`` rests on
            ``Y2(0) = 0``.
        max_rank: ``None`` (exact: ``k ≤ 2t``) or an integer ≥ 1: after each step keep the ``max_rank`` largest
            ``|eigenvalues|`` of ``Y2`` and add the discarded Frobenius norm to :attr:`truncation`.
        embedded: Also carry the order-1 level-1 state ``v(t+1) = g + G1 v`` (one more ``F1`` column per step) for
            :attr:`order_gap`.

    Attributes: ``t`` (steps taken), ``rank`` (largest ``k`` reached), ``k`` (current),
    ``truncation`` (Σ of discarded ``‖·‖_F``), ``products`` (``{"F1": columns, "F2": pairs}`` applied).
    """

    def __init__(self, ode: PolynomialODE, *, order: int = 2, form: str = "discrete", u0=None,
                 max_rank: Optional[int] = None, embedded: bool = False):
        if not isinstance(ode, PolynomialODE):
            raise TypeError(f"ode must be a PolynomialODE, got {type(ode).__name__}")
        order = check_int(order, "order", 1)
        if order != 2:
            raise ValueError(f"order must be 2: the factored state is the level-2 block of an order-2 "
                             f"Carleman system, got order={order}; use carleman(ode, {order}, ...) "
                             "for the dense state")
        check_choice(form, "form", ("discrete", "continuous"))
        if form != "discrete":
            raise ValueError("form='continuous' is not factored (yet): its level 2 (Kronecker sums "
                             "F1⊗I + I⊗F1) may follow the same pattern; use form='discrete' or the dense "
                             "carleman(ode, 2, 'continuous')")
        if ode.degree > 2:
            raise ValueError(f"ode must have degree ≤ 2 (quadratic) for the factored level 2, got degree "
                             f"{ode.degree}: degree-3 terms feed level 2 of the order-2 system from the "
                             "(absent) level 3; use the dense carleman(ode, 2, 'discrete')")
        self.ode = ode
        self.n, self.dtype, self.device = ode.n, ode.dtype, ode.device
        if u0 is not None:
            u = as_tensor(u0, self.dtype, self.device, "u0")
            if tuple(u.shape) != (self.n,):
                raise ValueError(f"u0 must have shape ({self.n},); got {tuple(u.shape)}")
            if bool(u.any()):
                raise ValueError("u0 must be None or all zeros: the factored level-2 state starts from "
                                 "u(0) = 0 (a window's start); shift the expansion point to u0, or use the "
                                 "dense carleman(ode, 2, 'discrete')")
        self.max_rank = check_optional_int(max_rank, "max_rank", 1, none="exact, k ≤ 2t")
        self.embedded = check_bool(embedded, "embedded")
        self._F1 = ode.terms[1]
        self._F2 = ode.terms[2] if ode.degree >= 2 else None
        self._sparse_F2 = None
        z = lambda *s: torch.zeros(*s, dtype=self.dtype, device=self.device)
        self.t = 0
        self.W = z(self.n, 0)
        self.C = z(0, 0)
        self.y1 = z(self.n)
        self.v = z(self.n) if self.embedded else None
        self.rank = 0
        self.truncation = 0.0
        self._eps_log: list[float] = []      # Frobenius norm discarded at each step
        self._gnorm_log: list[float] = []    # ‖g(t)‖ of each step (for truncation_bound)
        self.products = {"F1": 0, "F2": 0}

    def bind(self, ode: PolynomialODE) -> None:
        """Step through ``ode`` from now on (the same window's coefficients rebuilt, e.g. a resumed
        matrix-free window re-expanded at θ0): same ``n``, dtype and device, degree ≤ 2."""
        if ode is self.ode:
            return
        if not isinstance(ode, PolynomialODE):
            raise TypeError(f"ode must be a PolynomialODE, got {type(ode).__name__}")
        if (ode.n, ode.dtype, ode.device) != (self.n, self.dtype, self.device):
            raise ValueError(f"ode must have n={self.n}, dtype={self.dtype}, device={self.device} (this state's); "
                             f"got n={ode.n}, dtype={ode.dtype}, device={ode.device}")
        if ode.degree > 2:
            raise ValueError(f"ode must have degree ≤ 2 for the factored level 2, got degree {ode.degree}")
        self.ode = ode
        self._F1 = ode.terms[1]
        self._F2 = ode.terms[2] if ode.degree >= 2 else None
        self._sparse_F2 = None

    # ------------------------------------------------------------------------------------ reads
    @property
    def k(self) -> int:
        """The current rank of the factorisation (columns of ``W``)."""
        return int(self.W.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes held by the state (``W``, ``C``, ``y1`` and the embedded ``v``)."""
        ts = [self.W, self.C, self.y1] + ([self.v] if self.v is not None else [])
        return int(sum(x.numel() * x.element_size() for x in ts))

    def level1(self) -> torch.Tensor:
        """``u(t)`` of the order-2 Carleman system: ``(n,)`` (a copy)."""
        return self.y1.clone()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W, C)`` with ``Y2 = W C Wᵀ`` (copies; ``W`` orthonormal, ``C`` diagonal)."""
        return self.W.clone(), self.C.clone()

    def Y2(self, *, max_bytes: Optional[int] = None) -> torch.Tensor:
        """The dense level 2 ``W C Wᵀ`` as ``(n, n)`` — for tests and small ``n`` only.

        Refused (:class:`~torch_qode.core.carleman.CarlemanTooLarge`) above ``max_bytes``
        (default :data:`DEFAULT_Y2_BYTES`) before anything is allocated.
        """
        budget = DEFAULT_Y2_BYTES if max_bytes is None else check_int(max_bytes, "max_bytes", 1)
        need = self.n * self.n * self.W.element_size()
        if need > budget:
            raise CarlemanTooLarge(
                f"Y2() would form the dense n×n level 2 (n={self.n}: {need / 2**30:.3g} GiB > max_bytes="
                f"{budget / 2**30:.3g} GiB); use factors() (W, C with Y2 = W C Wᵀ) instead")
        return (self.W * torch.diagonal(self.C)[None, :]) @ self.W.T

    def truncation_bound(self, norm_G1: float, norm_F2: float) -> tuple[float, float]:
        """A rigorous bound ``(e, d)`` on ``‖ΔY2(t)‖_F`` and ``‖Δu(t)‖`` caused by the truncations.

        :attr:`truncation` is the sum of what was discarded; it bounds ``‖ΔY2‖_F`` while the map on
        the error is non-expansive.  In general an error introduced at step s propagates as
        ``δw = G1 δy1 + F2·vec(ΔY2)``, ``δy1 ← δw``, ``ΔY2 ← G1 ΔY2 G1ᵀ + g δwᵀ + δw gᵀ + E``, so with
        ``norm_G1 ≥ ‖I + F1‖₂`` and ``norm_F2 ≥ ‖F2‖₂`` (as an ``n × n²`` matrix)
        ``a = ‖G1‖ d + ‖F2‖ e``, ``d ← a``, ``e ← ‖G1‖² e + 2‖g‖ a + ε``.
        """
        g1 = check_real(norm_G1, "norm_G1", 0.0)
        f2 = check_real(norm_F2, "norm_F2", 0.0)
        e = d = 0.0
        for eps, gn in zip(self._eps_log, self._gnorm_log):
            a = g1 * d + f2 * e
            d, e = a, g1 * g1 * e + 2.0 * gn * a + eps
        return e, d

    # ------------------------------------------------------------------------------------- step
    def step(self) -> None:
        """Advance one step ``t -> t + 1`` (the state is unchanged if a ``NonFiniteError`` is raised)."""
        t = self.t
        g = None if self.ode.F0_is_zero else self.ode.F0(t).to(dtype=self.dtype, device=self.device)
        if g is not None and not all_finite(g):
            raise NonFiniteError(f"F0({t}) contains non-finite entries (NaN or inf)")
        k = self.k
        # G1 [W | y1 | v]: one batched F1 product
        cols = [self.W, self.y1[:, None]] + ([self.v[:, None]] if self.v is not None else [])
        GX = torch.cat(cols, dim=1)                  # a fresh copy: G1·X is formed in place
        if self._F1 is not None:
            GX.add_(self._matmat_F1(GX, t))
        GW, Gy1 = GX[:, :k], GX[:, k]
        Gv = GX[:, k + 1] if self.v is not None else None
        # F2·vec(W C Wᵀ) = Σ λ_l F2(w_l, w_l)   (W orthonormal, C diagonal)
        s = self._F2_sym(self.W, torch.diagonal(self.C), t)
        w = Gy1 if s is None else Gy1 + s
        y1 = w if g is None else g + w
        if not all_finite(y1):
            raise NonFiniteError(f"the level-1 state y1 became non-finite at step t={t}")
        v = None
        if self.v is not None:
            v = Gv if g is None else g + Gv
        # Y2(t+1) = [GW, g, w] blockdiag(C, [[1, 1], [1, 0]]) [GW, g, w]ᵀ ; zero columns dropped
        extra = []
        if g is not None and bool(g.any()):
            extra.append(("g", g))
        if bool(w.any()) and extra:   # g wᵀ + w gᵀ needs g ≠ 0
            extra.append(("w", w))
        B = torch.cat([GW] + [x[:, None] for _, x in extra], dim=1)
        del GX, GW, Gy1, Gv                           # the step's peak: W, B and the QR's factors only
        m = B.shape[1]
        Ccore = torch.zeros(m, m, dtype=self.dtype, device=self.device)
        Ccore[:k, :k] = self.C
        if extra:
            Ccore[k, k] = 1.0
            if len(extra) == 2:
                Ccore[k, k + 1] = Ccore[k + 1, k] = 1.0
        if m == 0:
            Wn, Cn, eps = B, Ccore, 0.0
        else:
            Q, R = torch.linalg.qr(B, mode="reduced")
            M = R @ Ccore @ R.T
            M = 0.5 * (M + M.T)
            if not all_finite(M):
                raise NonFiniteError(f"the level-2 state Y2 became non-finite at step t={t}")
            lam, U = torch.linalg.eigh(M)
            order = torch.argsort(lam.abs(), descending=True, stable=True)
            lam, U = lam[order], U[:, order]
            eps = 0.0
            if self.max_rank is not None and m > self.max_rank:
                eps = float(torch.linalg.vector_norm(lam[self.max_rank:]))
                lam, U = lam[: self.max_rank], U[:, : self.max_rank]
            Wn = Q @ U
            Cn = torch.diag(lam)
        # commit
        self.W, self.C, self.y1, self.v = Wn, Cn, y1, v
        self.t = t + 1
        self.rank = max(self.rank, self.k)
        self.truncation += eps
        self._eps_log.append(eps)
        self._gnorm_log.append(0.0 if g is None else float(torch.linalg.vector_norm(g)))

    def run(self, T: int) -> torch.Tensor:
        """Take ``T`` steps; returns the level-1 trajectory from the current ``t``: ``(T+1, n)``."""
        T = _check_T(T)
        traj = torch.empty(T + 1, self.n, dtype=self.dtype, device=self.device)
        traj[0] = self.y1
        for i in range(T):
            self.step()
            traj[i + 1] = self.y1
        return traj

    # ------------------------------------------------------------------------------- products
    def _matmat_F1(self, X: torch.Tensor, t: int) -> torch.Tensor:
        out = self._F1.matmat(X).to(dtype=self.dtype, device=self.device)
        self.products["F1"] += X.shape[1]
        if tuple(out.shape) != tuple(X.shape):
            raise ValueError(f"F1.matmat returned shape {tuple(out.shape)}, expected {tuple(X.shape)}")
        if not all_finite(out):
            raise NonFiniteError(f"F1·[W, y1] (the G1 products) became non-finite at step t={t}")
        return out

    def _F2_sym(self, Z: torch.Tensor, lam: torch.Tensor, t: int) -> Optional[torch.Tensor]:
        """``Σ_l lam_l F2(z_l ⊗ z_l)`` or ``None`` when it is zero."""
        term = self._F2
        if term is None:
            return None
        keep = lam != 0
        if not bool(keep.any()):
            return None
        if not bool(keep.all()):                      # a copy of Z only when some λ vanish
            Z, lam = Z[:, keep], lam[keep]
        m = Z.shape[1]
        if getattr(term, "explicit", False):
            out = self._explicit_F2(term, Z, lam)
        else:
            sym = getattr(term, "sym_sum", None)
            if callable(sym):
                out = sym(Z, lam)
            else:
                out = None
                for l in range(m):
                    p = term.power(Z[:, l]) * lam[l]
                    out = p if out is None else out + p
        out = out.to(dtype=self.dtype, device=self.device)
        self.products["F2"] += m
        if tuple(out.shape) != (self.n,):
            raise ValueError(f"F2 products returned shape {tuple(out.shape)}, expected ({self.n},)")
        if not all_finite(out):
            raise NonFiniteError(f"F2·vec(Y2) (the third-order products) became non-finite at step t={t}")
        return out

    def _explicit_F2(self, term, Z: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        n = self.n
        nnz = getattr(term, "nnz", None)
        if nnz is None or nnz > n**3 // 2:
            # mostly dense: (n, n²) @ vec(Z Λ Zᵀ) — the matrix itself already holds ~n³ numbers
            Y = (Z * lam[None, :]) @ Z.T
            return term.matmat(Y.reshape(-1, 1))[:, 0]
        if self._sparse_F2 is None:   # sparse: only the entries of Y2 that its columns touch
            csr = term.scipy()
            rows = np.repeat(np.arange(n), np.diff(csr.indptr))
            cols = csr.indices.astype(np.int64)
            self._sparse_F2 = tuple(torch.as_tensor(x, device=self.device) for x in
                                    (rows, cols // n, cols % n)) + (
                torch.as_tensor(csr.data, dtype=self.dtype, device=self.device),)
        rows, a, b, data = self._sparse_F2
        vals = (Z[a] * Z[b]) @ lam
        return torch.zeros(n, dtype=self.dtype, device=self.device).index_add_(0, rows, data * vals)

    # ------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        """Everything needed to continue bit for bit (tensors are copies)."""
        return {
            "kind": "FactoredLevel2", "n": self.n, "dtype": str(self.dtype), "t": self.t,
            "W": self.W.clone(), "C": self.C.clone(), "y1": self.y1.clone(),
            "v": None if self.v is None else self.v.clone(),
            "max_rank": self.max_rank, "embedded": self.embedded, "rank": self.rank,
            "truncation": self.truncation, "eps_log": list(self._eps_log),
            "gnorm_log": list(self._gnorm_log), "products": dict(self.products),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` taken from a state of the same ``n``, dtype, ``max_rank`` and
        ``embedded`` (the ODE is this object's own: the caller pairs it with the same coefficients)."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from FactoredLevel2.state_dict(), got {type(state).__name__}")
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing or state.get("kind") != "FactoredLevel2":
            raise ValueError(f"state is not a FactoredLevel2.state_dict(): missing {missing or ['kind']}")
        for key, mine in (("n", self.n), ("dtype", str(self.dtype)), ("max_rank", self.max_rank),
                          ("embedded", self.embedded)):
            if state[key] != mine:
                raise ValueError(f"state[{key!r}] = {state[key]!r} does not match this state's {key} = {mine!r}")
        t = check_int(state["t"], "state['t']", 0)
        W = as_tensor(state["W"], self.dtype, self.device, "state['W']", copy=True)
        C = as_tensor(state["C"], self.dtype, self.device, "state['C']", copy=True)
        y1 = as_tensor(state["y1"], self.dtype, self.device, "state['y1']", copy=True)
        k = W.shape[1] if W.dim() == 2 else -1
        if W.dim() != 2 or W.shape[0] != self.n or tuple(C.shape) != (k, k) or tuple(y1.shape) != (self.n,):
            raise ValueError(f"state: W must be ({self.n}, k), C (k, k) and y1 ({self.n},); got "
                             f"{tuple(W.shape)}, {tuple(C.shape)}, {tuple(y1.shape)}")
        v = None
        if self.embedded:
            v = as_tensor(state["v"], self.dtype, self.device, "state['v']", copy=True)
            if tuple(v.shape) != (self.n,):
                raise ValueError(f"state['v'] must have shape ({self.n},); got {tuple(v.shape)}")
        for name, x in (("W", W), ("C", C), ("y1", y1)) + ((("v", v),) if v is not None else ()):
            if not all_finite(x):
                raise NonFiniteError(f"state[{name!r}] contains non-finite entries (NaN or inf)")
        if not torch.equal(C, torch.diag(torch.diagonal(C))):
            raise ValueError("state['C'] must be diagonal (the state keeps W orthonormal and C diagonal)")
        self.t, self.W, self.C, self.y1, self.v = t, W, C, y1, v
        self.rank = check_int(state["rank"], "state['rank']", 0)
        self.truncation = float(state["truncation"])
        self._eps_log = [float(x) for x in state["eps_log"]]
        self._gnorm_log = [float(x) for x in state["gnorm_log"]]
        self.products = {"F1": int(state["products"]["F1"]), "F2": int(state["products"]["F2"])}

    def __repr__(self) -> str:
        return (f"FactoredLevel2(n={self.n}, t={self.t}, k={self.k}, rank={self.rank}, max_rank={self.max_rank}, "
                f"embedded={self.embedded}, truncation={self.truncation:.3g})")


def factored_simulate(ode: PolynomialODE, T: int, *, max_rank: Optional[int] = None) -> torch.Tensor:
    """The ``(T+1, n)`` level-1 trajectory of ``carleman(ode, 2, "discrete")`` from ``u0 = 0``, through
    the factored level-2 state (O(n·T) memory instead of n²)."""
    return FactoredLevel2(ode, max_rank=max_rank).run(T)
