"""The quantum resource ledger of one window (DESIGN.md "Resource estimates"; paper Sec. II C–D).

:func:`estimate_resources` reads a :class:`~torch_qode.carleman.CarlemanSystem` and a window
(``T`` steps, effective condition number ``κ_a``, target error ``ε``) and fills a
:class:`Resources` without running anything quantum; :meth:`Resources.from_numbers` does the same
from plain numbers.  Conventions, stated once:

* every ``O(·)`` has its constant set to 1;
* "polylog" is ``log2(N_b/ε)`` to the first power, ``N_b = (T+1)Δ`` the dimension of ``M``
  (Eq. II.102) and ``Δ = n + n² + … + n^N`` (Eq. V.103);
* one ``ε`` serves as the QLSA error ``ε_HHL``, the Carleman truncation error of Eq. (II.76)
  and the tomography error of Sec. II D;
* the gate counts use the row sparsity ``s_M`` of ``M`` (Theorems II.3/II.4 are stated for ``M``):
  the rows of ``M`` hold ``I`` and ``−(I + A)``, so ``s_M = 1 + max_row nnz(I + A)`` when measured
  and ``s_M ≤ s + 2`` otherwise (``s_M = 1`` for ``T = 0``, where ``M = I``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Union

import numpy as np

from .._checks import check_bool, expect_real
from .._lazy import lazy_module
from .carleman import CarlemanSystem
from .carleman import required_order as _required_order
from .solvers import SOLVERS, WindowSolver, filtered_gates, make_solver, qlsa_gates
from .window import kappa_bound
from .tomography import _check_count as _int, coupon_cost, qubits, shadow_cost

if TYPE_CHECKING:  # scipy.sparse loads on first use (issue 19)
    import scipy.sparse as sp
else:
    sp = lazy_module("scipy.sparse")

__all__ = ["Resources", "estimate_resources", "ClassicalCost", "classical_cost", "THIRD_ORDER_HVPS"]

#: A third-order product ``F2(z, z) ∝ ∇_θ(zᵀ H z)`` in HVP units: the reverse-mode gradient of one
#: Hessian-vector product kept with its graph (one double backward with ``create_graph``, then one
#: backward through it).  Counted as 3 HVPs: ``benchmarks/order2_findings.py`` measured 2.97 and
#: 3.28 (two runs) on ResNet-8 (digits, batch 64), where the products dominate; on a 1,210-weight
#: MLP, where per-call overhead dominates, 7.8–16.
THIRD_ORDER_HVPS = 3.0


@dataclass
class Resources:
    """Quantum resources of one window; constants = 1 (see the module docstring).

    Attributes:
        n, order, form, T: ODE dimension, Carleman order ``N``, form (``None`` from plain numbers), window steps.
        dim: ``Δ = n + … + n^N`` (Eq. V.103).
        N_b: ``(T+1)Δ``, the dimension of ``M`` (Eq. II.102).
        system_qubits: ``ceil(log2((T+1)Δ))``: the register holding ``|X>`` (time ⊗ Carleman index).
        ancillas: The ancillas counted, by name: ``"block_encoding"`` = ``ceil(log2 s_M) + 1`` by default (an index
            register over the ``s_M`` non-zeros of a row plus one amplitude qubit of a sparse-access block encoding —
            our assumption; pass ``block_encoding_ancillas=`` for another construction); ``"qlsa"`` = 1, the qubit of
            the Hermitian dilation ``[[0, M], [M†, 0]]`` the adiabatic QLSA of Theorem II.3 (ref. [73]) acts on;
            ``"well_ill_flag"`` = 1 when filtering (the ``|well>/|ill>`` flag of Eq. II.109), else 0.
        qubits: ``system_qubits + Σ ancillas``.
        s, sparsity_source: Row sparsity of ``A``: ``"measured"`` (max non-zeros per row of the explicit ``A(t)``),
            ``"bound"`` (Theorem V.1, when ``A`` is matrix-free or too large to build) or ``"given"``.
        s_bound: The Theorem V.1 bound (Eq. V.100–V.106) beside it (``None`` if not known).
        s_M, s_M_source: Row sparsity of ``M`` used in the gate counts (``"measured"`` or ``"bound"`` ``s + 2``).
        kappa, kappa_source: ``κ(M)``: ``"measured"`` (from a solved window / given) or ``"bound"`` = ``kappa_bound``.
        kappa_bound: ``2(T+1)`` (Eq. II.106), valid when ``||I + A|| ≤ 1``.
        kappa_a: Effective condition number of Theorem II.4 (default ``2(T+1)``, the paper's choice after Eq. II.118).
        filtering: Whether the costed solver filters (Theorem II.4: the ``|well>`` flag and ``P(|well>)`` count).
        solver: Name of the window solver whose own gate formula gives ``total_gates``.
        eps: Target error ``ε``.
        gates_qlsa: ``s_M κ log2(N_b/ε)`` (Theorem II.3, Eq. II.100).
        gates_filtered: ``s_M² κ_a² log2(N_b/ε)`` (Theorem II.4, Eq. II.118).
        required_order: Carleman order for truncation error ``ε`` (Eq. II.76), ``None`` when ``u_norm``/``rate`` are
            unknown (see ``notes``).
        success_probability, success_source: Probability of post-selecting the final time slice ``t = T`` of ``|X>``:
            ``"solution"`` = ``||X_T||² / ||X||²`` of a solved window, ``"uniform"`` = ``1/(T+1)`` (the Haar /
            equal-weight estimate, cf. Eq. II.111–II.115), or ``"given"``.  No padding of the window with idle copies of
            ``y(T)`` (the usual remedy for a small value) is assumed.
        level1_fraction: ``||y_1(T)||² / ||y(T)||²``, the further post-selection of the level-1 block that tomography
            reads: from the solution, or ``u²/Σ_{j≤N} u^{2j}`` from ``u_norm``; else ``None``.
        well_probability: ``P(|well>)`` of a filtered solve (Eq. II.109), ``None`` if not known.
        r, m: Components read out (default ``n``, a dense readout) and qubits ``ceil(log2 n)``.
        tomography_support_draws: ``r H_r``, the ``O(r log r)`` coupon-collector draws for the support (Eq. II.123, Sec.
            II D).
        tomography_shadow_shots: ``m² r³ / ε²`` shots of the shadow scheme (Sec. II D).
        total_gates:
            ``gates × (support draws + shadow shots) / (success_probability · level1_fraction · well_probability)``
            (unknown factors as 1), ``gates`` = the solver's own formula (``WindowSolver.gates``: ``gates_qlsa`` for
            forward/direct, ``gates_filtered`` for filtered): every shot needs a fresh state, no amplitude
            amplification.
        notes: Why a quantity is a bound or missing.
    """

    n: int
    order: int
    form: Optional[str]
    T: int
    dim: int
    N_b: int
    system_qubits: int
    ancillas: dict
    qubits: int
    s: int
    sparsity_source: str
    s_bound: Optional[int]
    s_M: int
    s_M_source: str
    kappa: float
    kappa_source: str
    kappa_bound: int
    kappa_a: float
    filtering: bool
    eps: float
    gates_qlsa: float
    gates_filtered: float
    required_order: Optional[int]
    success_probability: float
    success_source: str
    level1_fraction: Optional[float]
    well_probability: Optional[float]
    r: int
    m: int
    tomography_support_draws: float
    tomography_shadow_shots: float
    total_gates: float
    notes: list = field(default_factory=list)
    solver: Optional[str] = None

    def as_dict(self) -> dict:
        """All fields as a plain dict (copies of ``ancillas`` and ``notes``).

        Returns:
            One entry per field, keyed by the field's name.
        """
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["ancillas"], out["notes"] = dict(self.ancillas), list(self.notes)
        return out

    def __str__(self) -> str:
        return (f"Resources(n={self.n}, N={self.order}, T={self.T}, Δ={self.dim}: "
                f"{self.qubits} qubits ({self.system_qubits}+{sum(self.ancillas.values())} anc), "
                f"s={self.s} ({self.sparsity_source}), κ={self.kappa:.3g} ({self.kappa_source}), "
                f"gates {self.gates_qlsa:.3g} [II.100] / {self.gates_filtered:.3g} [II.118], "
                f"P(t=T)={self.success_probability:.3g} ({self.success_source}), "
                f"tomography {self.tomography_support_draws:.3g} + {self.tomography_shadow_shots:.3g} shots, "
                f"total {self.total_gates:.3g} gates)")

    @classmethod
    def from_numbers(cls, n: int, order: int, T: int, s: int, eps: float, *,
                     kappa: Optional[float] = None, kappa_a: Optional[float] = None,
                     filtering: Optional[bool] = None, r: Optional[int] = None,
                     s_bound: Optional[int] = None, s_M: Optional[int] = None,
                     success_probability: Optional[float] = None,
                     level1_fraction: Optional[float] = None,
                     well_probability: Optional[float] = None,
                     required_order: Optional[int] = None,
                     block_encoding_ancillas: Optional[int] = None,
                     form: Optional[str] = None, sparsity_source: str = "given",
                     notes: Optional[list] = None,
                     solver: Union[None, str, WindowSolver] = None) -> "Resources":
        """The ledger from plain numbers.

        ``s`` is the row sparsity of ``A``; ``kappa`` a known ``κ(M)`` (default: the bound
        ``2(T+1)``); ``kappa_a`` the Theorem II.4 cut-off (default ``2(T+1)``); ``filtering``
        defaults to ``kappa_a is not None``; ``r`` defaults to ``n``; ``s_M`` defaults to the bound
        ``s + 2``; ``success_probability`` defaults to ``1/(T+1)``.  ``solver`` (a name in
        ``SOLVERS`` or a :class:`~torch_qode.core.solvers.WindowSolver`) gives the gate formula of
        ``total_gates``; by default the filtered solver with ``kappa_a`` when ``filtering``, else the
        forward one (Theorem II.3).  Everything else: see the class docstring.
        """
        n = _int(n, "n", 1)
        order = _int(order, "order", 1)
        T = _int(T, "T", 0)
        s = _int(s, "s", 0)
        eps = _real(eps, "eps", low=0.0, high=1.0)
        notes = list(notes or [])
        dim = sum(n**j for j in range(1, order + 1))
        N_b = (T + 1) * dim
        kb = kappa_bound(T)
        if kappa is None:
            kappa_v, kappa_source = float(kb), "bound"
        else:
            kappa_v, kappa_source = _real(kappa, "kappa", low=1.0, closed=True), "measured"
        solver_obj = None
        if solver is not None:
            solver_obj = make_solver(solver)
            if filtering is not None and filtering != solver_obj.filtering:
                raise ValueError(f"filtering={filtering!r} contradicts solver={solver_obj!r}; pass one of them")
            filtering = solver_obj.filtering
            if solver_obj.kappa_a is not None:
                if kappa_a is not None and _real(kappa_a, "kappa_a", low=1.0, closed=True) != solver_obj.kappa_a:
                    raise ValueError(f"kappa_a={kappa_a!r} contradicts solver={solver_obj!r}; pass one of them")
                kappa_a = solver_obj.kappa_a
        if filtering is None:
            filtering = kappa_a is not None
        else:
            filtering = check_bool(filtering, "filtering")
        kappa_a = float(kb) if kappa_a is None else _real(kappa_a, "kappa_a", low=1.0, closed=True)
        if solver_obj is None:
            solver_obj = SOLVERS["filtered"](kappa_a=kappa_a) if filtering else SOLVERS["forward"]()
        if s_M is None:
            s_M_v, s_M_source = (1 if T == 0 else s + 2), "bound"
        else:
            s_M_v, s_M_source = _int(s_M, "s_M", 1), "measured"
        if s_bound is not None:
            s_bound = _int(s_bound, "s_bound", 0)
        b_anc = (qubits(s_M_v) + 1 if block_encoding_ancillas is None
                 else _int(block_encoding_ancillas, "block_encoding_ancillas", 0))
        ancillas = {"block_encoding": b_anc, "qlsa": 1, "well_ill_flag": int(filtering)}
        system_qubits = qubits(N_b)
        gates_qlsa = qlsa_gates(s_M_v, kappa_v, N_b, eps)
        gates_filtered = filtered_gates(s_M_v, kappa_a, N_b, eps)
        if success_probability is None:
            p_succ, p_source = 1.0 / (T + 1), "uniform"
        else:
            p_succ, p_source = _real(success_probability, "success_probability", 0.0, 1.0, closed=True), "given"
        if level1_fraction is not None:
            level1_fraction = _real(level1_fraction, "level1_fraction", 0.0, 1.0, closed=True)
        if well_probability is not None:
            well_probability = _real(well_probability, "well_probability", 0.0, 1.0, closed=True)
        if required_order is not None:
            required_order = _int(required_order, "required_order", 1)
        r = n if r is None else _int(r, "r", 1)
        if r > n:
            raise ValueError(f"r must be in 1..n = {n} (components read out), got {r}")
        m = qubits(n)
        draws = coupon_cost(r)
        shadow = shadow_cost(r, n, eps)
        gates = solver_obj.gates(s_M=s_M_v, kappa=kappa_v, N_b=N_b, eps=eps)
        p_total = p_succ * (level1_fraction if level1_fraction is not None else 1.0) \
            * (well_probability if well_probability is not None else 1.0)
        total = gates * (draws + shadow) / p_total if p_total > 0 else math.inf
        return cls(n=n, order=order, form=form, T=T, dim=dim, N_b=N_b, system_qubits=system_qubits,
                   ancillas=ancillas, qubits=system_qubits + sum(ancillas.values()), s=s,
                   sparsity_source=sparsity_source, s_bound=s_bound, s_M=s_M_v, s_M_source=s_M_source,
                   kappa=kappa_v, kappa_source=kappa_source, kappa_bound=kb, kappa_a=kappa_a,
                   filtering=filtering, eps=eps, gates_qlsa=gates_qlsa, gates_filtered=gates_filtered,
                   required_order=required_order, success_probability=p_succ, success_source=p_source,
                   level1_fraction=level1_fraction, well_probability=well_probability, r=r, m=m,
                   tomography_support_draws=draws, tomography_shadow_shots=shadow, total_gates=total,
                   notes=notes, solver=solver_obj.name)


def estimate_resources(system: CarlemanSystem, T: int, kappa_a: Optional[float] = None,
                       eps: float = 1e-3, r: Optional[int] = None, *, solution=None,
                       u_norm: Optional[float] = None, rate: Optional[float] = None,
                       block_encoding_ancillas: Optional[int] = None, t: int = 0,
                       max_bytes: Optional[int] = None,
                       solver: Union[None, str, WindowSolver] = None) -> Resources:
    """The ledger of a window of ``T`` steps of ``system`` (see :class:`Resources`).

    Args:
        system: A :class:`~torch_qode.carleman.CarlemanSystem`.
        T: Window length (steps).
        kappa_a: Cut-off of the truncated solver (Theorem II.4); given means ``filtering=True``.
        solver: The window solver costed (a name in ``SOLVERS`` or a ``WindowSolver``, e.g.
            ``make_solver("filtered", {"kappa_a": 50})``); its ``gates`` formula gives ``total_gates``. Default: from
            ``kappa_a`` as above.
        eps: Target error in ``(0, 1)`` (QLSA, Carleman truncation and tomography alike).
        r: Components the tomography reads (default ``n``: a dense readout of the level-1 block).
        solution: A solved window (``solve_window(system, u0, T, ...)``): gives the measured ``κ``, the success
            probability ``||X_T||²/||X||²``, the level-1 fraction, ``P(|well>)`` of a filtered solve and, unless
            ``u_norm`` is given, ``u_norm = max_t ||u(t)||``.
        u_norm: ``||ū|| < 1`` and the dissipation scale of Eq. (II.74)–(II.76) for
            :func:`~torch_qode.carleman.required_order`.  ``rate`` defaults to ``1 − ||I + F1||_2`` when ``F1`` is
            explicit, ``n ≤ 2000`` and that is positive.
        rate: See ``u_norm``.
        block_encoding_ancillas: Override the assumed block-encoding ancilla count.
        t: The step whose ``A(t)`` is measured (only matters for a time-dependent ``F0``).
        max_bytes: Memory budget for building ``A`` (passed to ``system.matrix``).

    Returns:
        The :class:`Resources` ledger of the window.

    Raises:
        TypeError: ``system`` is not a :class:`~torch_qode.core.carleman.CarlemanSystem`.
        ValueError: An argument is out of range (``T``, ``eps``, ``kappa_a``, ``r``, ``u_norm``, ``rate``, ...).
    """
    if not isinstance(system, CarlemanSystem):
        raise TypeError(f"system must be a CarlemanSystem (from carleman()), got {type(system).__name__}")
    T = _int(T, "T", 0)
    eps = _real(eps, "eps", low=0.0, high=1.0)
    notes: list = []
    n, N = system.n, system.order

    # row sparsity: measured from the explicit A(t), else the Theorem V.1 bound
    s_bound = int(system.sparsity_bound())
    s_M = None
    why = system.matrix_refusal(t, max_bytes=max_bytes)   # matrix-free or over budget: no exception
    if why is not None:
        s, source = s_bound, "bound"
        notes.append(f"s from the Theorem V.1 bound: {why}")
    else:
        A = system.matrix(t, max_bytes=max_bytes)
        s, source = (int(np.diff(A.indptr).max()) if A.shape[0] else 0), "measured"
        IA = (A + sp.identity(system.dim, format="csr")).tocsr()
        IA.eliminate_zeros()
        s_M = 1 if T == 0 else 1 + int(np.diff(IA.indptr).max())

    kappa = p_succ = level1 = p_well = None
    if solution is not None:
        X = _solution_X(solution, T, system.dim)
        if getattr(solution, "kappa", None) is not None:
            kappa = float(solution.kappa)
        else:
            notes.append("κ from the bound 2(T+1): the solution carries no measured κ")
        total_sq = float(np.sum(X * X))
        last_sq = float(np.sum(X[-1] * X[-1]))
        if total_sq > 0:
            p_succ = last_sq / total_sq
        if last_sq > 0:
            level1 = float(np.sum(X[-1, :n] ** 2)) / last_sq
        method = getattr(solution, "method", None)
        if method in SOLVERS and SOLVERS[method].filtering:
            p_well = float(solution.well_probability)
        if u_norm is None:
            u_norm = float(np.max(np.linalg.norm(X[:, :n], axis=1)))
    elif u_norm is not None:
        u = _real(u_norm, "u_norm", low=0.0, high=1.0, closed_low=True)
        powers = [u ** (2 * j) for j in range(1, N + 1)]
        level1 = powers[0] / sum(powers) if powers[0] > 0 else None

    order_needed = None
    if rate is None:
        rate = _default_rate(system)
        if rate is None:
            notes.append("required_order not computed: pass rate= (1 − ||I + F1|| is not available "
                         "or not positive)")
    if rate is not None and u_norm is None:
        notes.append("required_order not computed: pass u_norm= (||ū|| < 1 of Eq. II.68) or solution=")
    elif rate is not None:
        try:
            order_needed = _required_order(eps, float(u_norm), system.ode.norms(), float(rate))
        except ValueError as exc:
            notes.append(f"required_order not computed: {exc}")

    res = Resources.from_numbers(
        n, N, T, s, eps, kappa=kappa, kappa_a=kappa_a, r=r, s_bound=s_bound, s_M=s_M,
        success_probability=p_succ, level1_fraction=level1, well_probability=p_well,
        required_order=order_needed, block_encoding_ancillas=block_encoding_ancillas,
        form=system.form, sparsity_source=source, notes=notes, solver=solver)
    if p_succ is not None:
        res.success_source = "solution"
    return res


@dataclass
class ClassicalCost:
    """What one window costs classically, beside its quantum ledger (issue 11; constants stated).

    Attributes:
        T: Window steps.
        closure_flops: FLOPs of one closure call (forward + backward) as ``torch.utils.flop_counter.FlopCounterMode``
            counts them: 2·m·k·n per ``(m×k)·(k×n)`` matmul and the analogous convolution formulas, forward and backward
            (a first layer's input gradient is not computed, so not counted); element-wise ops, norms and the loss count
            0.  Measured on the upload closure; ``None`` when not measured.
        flops: ``T · closure_flops``: the same window run classically, T gradient steps of the model on the same batches
            (dense kernels: the support's sparsity is not exploited; the update's O(|S|) axpy is not counted).
        closures: Closure calls of the simulated window, ``T`` (the same gradients SGD computes).
        hvps: Hessian-vector products applied through the upload graph by the Carleman state (columns of ``F1``; the
            factored state's embedded order-1 column included; an explicit window's ``n`` HVPs that build ``F1``).
        third_order: Third-order products ``F2(z, z)`` (pairs; an explicit window's ``n²`` that build ``F2``).
        lanczos_hvps: HVPs of the dissipation check's Lanczos runs (0 without the check).
        hvp_equivalents: ``hvps + lanczos_hvps + THIRD_ORDER_HVPS · third_order``: the simulation's cost beyond the T
            closures, in HVP units.
        third_order_hvps: The constant :data:`THIRD_ORDER_HVPS` used.
        gates: The window's gate count compared (the ledger's solver formula, Theorem II.3 / II.4, constants 1, one
            solve, tomography repetitions not included); ``None`` if not given.
        gates_per_flop: ``gates / flops``: quantum gates of one solve per classical FLOP of the same window (``None``
            when either is unknown).  Below 1 the solve is cheaper in gates than SGD is in FLOPs.
    """

    T: int
    closure_flops: Optional[int]
    flops: Optional[float]
    closures: int
    hvps: int
    third_order: int
    lanczos_hvps: int
    hvp_equivalents: float
    third_order_hvps: float
    gates: Optional[float]
    gates_per_flop: Optional[float]

    def as_dict(self) -> dict:
        """All fields as a plain dict.

        Returns:
            One entry per field, keyed by the field's name.
        """
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def classical_cost(T: int, closure_flops: Optional[int], *, hvps: int = 0, third_order: int = 0,
                   lanczos_hvps: int = 0, gates: Optional[float] = None) -> ClassicalCost:
    """The classical cost of a window of ``T`` steps (see :class:`ClassicalCost` for every field)."""
    T = _int(T, "T", 0)
    if closure_flops is not None:
        closure_flops = _int(closure_flops, "closure_flops", 0)
    hvps, third_order = _int(hvps, "hvps", 0), _int(third_order, "third_order", 0)
    lanczos_hvps = _int(lanczos_hvps, "lanczos_hvps", 0)
    if gates is not None:
        gates = expect_real(gates, "gates", 0.0, None, low_open=False)
    flops = None if closure_flops is None else float(T) * closure_flops
    ratio = gates / flops if gates is not None and flops else None
    return ClassicalCost(T=T, closure_flops=closure_flops, flops=flops, closures=T, hvps=hvps,
                         third_order=third_order, lanczos_hvps=lanczos_hvps,
                         hvp_equivalents=hvps + lanczos_hvps + THIRD_ORDER_HVPS * third_order,
                         third_order_hvps=THIRD_ORDER_HVPS, gates=gates, gates_per_flop=ratio)


# ------------------------------------------------------------------------------------ helpers
def _solution_X(solution, T: int, dim: int) -> np.ndarray:
    X = getattr(solution, "X", None)
    if X is None:
        raise TypeError("solution must be a solved window with an X attribute (solve_window(...))")
    X = X.detach().cpu().double().numpy() if hasattr(X, "detach") else np.asarray(X, dtype=np.float64)
    if X.shape != (T + 1, dim):
        raise ValueError(f"solution.X has shape {X.shape}, expected (T+1, Δ) = {(T + 1, dim)}")
    if not np.all(np.isfinite(X)):
        raise ValueError("solution.X contains non-finite entries (NaN or inf)")
    return X


def _default_rate(system: CarlemanSystem) -> Optional[float]:
    """``1 − ||I + F1||_2`` when ``F1`` is explicit and small; ``None`` otherwise or if ≤ 0."""
    F1 = system.ode.terms[1]
    if system.n > 2000 or (F1 is not None and not F1.explicit):
        return None
    G = np.eye(system.n) + (F1.to_scipy().toarray() if F1 is not None else 0.0)
    rate = 1.0 - float(np.linalg.norm(G, 2))
    return rate if rate > 0 else None


def _real(x, name: str, low: float, high: float = math.inf, closed: bool = False,
          closed_low: bool = False) -> float:
    """A finite real in ``(low, high)``; ``closed`` closes both ends, ``closed_low`` the lower."""
    return expect_real(x, name, low, None if math.isinf(high) else high,
                       low_open=not (closed or closed_low), high_open=not closed)
