"""The quantum window as data and functions (QODE.step delegates here, as ``SGD.step`` to ``sgd()``).

A window (DESIGN.md, steps 4–8) starts at θ0 on the support S with the Taylor expansion of the upload
step's loss, advances its Carleman state one step per closure (``F0(t) = −η(∇L_t(θ0) + wd·θ0)``),
and at t = T solves the window system (Eq. II.102), reads ``θ0 + u(T)`` out by tomography (Eq.
II.123), prunes the read-out to the r largest prunable weights and prices it (Theorems II.3/II.4).
Every collective goes through the window's :class:`~torch_qode.training.comm.Comm`.

The solver, its options and its cost formula come from the core's registry (``cfg.window_solver``,
:func:`~torch_qode.core.solvers.make_solver`); the Carleman form from ``FORMS`` through ``carleman``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ..bridge import flat as _flat
from ..bridge.taylor import TaylorExpansion, UnsupportedGraphError
from ..core.carleman import carleman, default_max_bytes
from ..core.window import kappa_bound
from ..core.linsolve import solve_window
from ..core.ode import MatrixFreeTerm, NonFiniteError, PolynomialODE, all_finite
from ..core.resources import classical_cost, estimate_resources
from ..core.state import CarlemanState, DenseLevels, FactoredLevels, state_from_dict
from ..core.tomography import tomography
from .capture import NoiseTape, Replay
from .comm import Comm
from .config import EXPLICIT_MAX_SUPPORT, QODEConfig, carleman_state_for, use_explicit
from .report import CycleReport
from .shadow import Shadow, start_shadow

__all__ = ["WindowState", "WindowResult", "open_window", "start_window", "build_system", "advance", "finish_window",
           "window_state_dict", "load_window", "expand", "flop_count", "EXPLICIT_MAX_SUPPORT", "KAPPA_MAX_UNKNOWNS"]

#: κ(M) is computed for the report when the window system has at most this many unknowns.
KAPPA_MAX_UNKNOWNS = 5_000


# ------------------------------------------------------------------------------------------ the data
@dataclass
class WindowState:
    """One live quantum window (between the upload and the readout)."""

    theta0: torch.Tensor                 # the full flat parameter vector at the upload
    support: Optional[torch.Tensor]      # S (indices into theta0); None: all weights
    lr: float
    wd: float
    explicit: bool                       # explicit Taylor terms (resumable bit for bit)
    tape: NoiseTape                      # F0(t), streamed noise
    rng: np.random.Generator             # the optimizer's sampler (tomography draws)
    frozen: Optional[torch.Tensor] = None    # F0 of the upload batch (noise="frozen")
    t: int = 0
    state: Optional[CarlemanState] = None
    expansion: Optional[TaylorExpansion] = None
    system: Any = None                   # the CarlemanSystem; for a factored state the PolynomialODE
    #                                      (None: a resumed matrix-free window)
    kind: str = "dense"                  # the Carleman state: "dense" or "factored" (core/state.py)
    shadow: Optional[Shadow] = None      # track_sgd
    info: dict = field(default_factory=dict)
    closure_flops: Optional[int] = None  # FLOPs of the upload closure (FlopCounterMode), for the ledger
    products: dict = field(default_factory=lambda: {"hvp": 0, "third_order": 0})   # through the graph
    spare_row: Optional[torch.Tensor] = None   # the tape row dropped last: the next F0's buffer (scratch)

    def record(self, t: int, f0: torch.Tensor) -> None:
        """``F0(t)`` into the tape; a row it drops becomes :attr:`spare_row`."""
        old = self.tape.rows.get(t - 1) if not self.tape.keep and len(self.tape.rows) == 1 else None
        self.tape.record(t, f0)
        if old is not None and old is not f0 and old.dtype == torch.float64:
            self.spare_row = old

    def f0_source(self):
        frozen = self.frozen
        return (lambda t: frozen) if frozen is not None else self.tape

    def f0_from_grads(self, grads) -> torch.Tensor:
        """``F0(t) = −η (∇L_t(θ0) + wd·θ0)`` on S, in float64, from the flat gradient or from the
        parameters (their ``.grad``; ``None``: zeros).  Parameters on all weights are copied straight
        into a float64 vector (:attr:`spare_row`, the row the tape dropped last, when there is one):
        the numbers of ``flat_grads`` then ``.to(float64)``, without the flat float32 copy."""
        S = self.support
        if isinstance(grads, torch.Tensor):
            f0 = (grads if S is None else grads[S]).to(torch.float64, copy=True)
        elif S is not None:
            f0 = flat_grads(grads)[S].to(torch.float64)
        else:
            f0, self.spare_row = self.spare_row, None
            if f0 is None or f0.shape != self.theta0.shape or f0.device != self.theta0.device:
                f0 = torch.empty(self.theta0.shape, dtype=torch.float64, device=self.theta0.device)
            for p, part in zip(grads, f0.split([p.numel() for p in grads])):
                if p.grad is None:
                    part.zero_()
                else:
                    part.view(p.shape).copy_(p.grad.detach())
        if self.wd:
            th = self.theta0 if S is None else self.theta0[S]
            f0.add_(th.to(torch.float64), alpha=self.wd)
        return f0.mul_(-self.lr)

    def embed(self, values_S: torch.Tensor) -> torch.Tensor:
        """The full flat parameter vector: θ0 with its support entries replaced by ``values_S``."""
        full = self.theta0.clone()
        if self.support is None:
            full.copy_(values_S.to(full.dtype))
        else:
            full[self.support] = values_S.to(full.dtype)
        return full

    @property
    def ode(self) -> PolynomialODE:
        """The window's ODE (that of the system, or the system itself for a factored state)."""
        return self.system if isinstance(self.system, PolynomialODE) else self.system.ode

    def release(self) -> None:
        """Drop the autograd graph, the system and the state (nothing outlives the window)."""
        if self.expansion is not None:
            self.expansion.release()
        self.expansion, self.system, self.state, self.shadow = None, None, None, None


@dataclass
class WindowResult:
    """What :func:`finish_window` produced: the weights to write back, or why the window failed."""

    new: Optional[torch.Tensor] = None       # full flat vector θ0 + û(T)
    lin: Optional[torch.Tensor] = None       # full flat vector θ0 + u(T) (before the readout)
    lin1: Optional[torch.Tensor] = None      # θ0 + u⁽¹⁾(T): the embedded order-1 state (order ≥ 2)
    fault: Optional[str] = None


# ---------------------------------------------------------------------------------------- functions
def expand(source, params: list, support, lr: float, wd: float, cfg: QODEConfig) -> TaylorExpansion:
    """The window's Taylor expansion at the current parameters (degree ≤ N: Carleman truncation at
    order N never reaches higher terms) of ``source``: a loss graph kept for the window
    (``hvp="retain"``), or a :class:`~.capture.Replay` of the closure that each product re-runs
    (``hvp="recompute"``: no graph held between products)."""
    degree = min(cfg.taylor_degree, cfg.carleman_order)
    with torch.enable_grad():                    # step() runs under no_grad; derivatives need a graph
        if isinstance(source, Replay):
            return TaylorExpansion.from_replay(source, params, source.grad, lr=lr, support=support, degree=degree,
                                               weight_decay=wd, losses=source.losses, fused=source.fused)
        return TaylorExpansion.from_loss(source, params, lr=lr, support=support, degree=degree, weight_decay=wd)


def support_without(params: list, unused: list, support: Optional[torch.Tensor]) -> torch.Tensor:
    """``support`` (``None``: all entries) minus the entries of the parameters ``unused``."""
    keep = torch.ones(sum(p.numel() for p in params), dtype=torch.bool, device=params[0].device)
    ends = np.cumsum([0] + [p.numel() for p in params])
    for i in unused:
        keep[int(ends[i]):int(ends[i + 1])] = False
    return torch.nonzero(keep).reshape(-1) if support is None else support[keep[support]]


def check_dissipation(exp: TaylorExpansion, dissipation, lr: float, T: int, comm: Comm, device):
    """The dissipation check (Eq. III.12–III.15) on the upload batch's Hessian, its products through
    ``comm``; one verdict for all ranks."""
    # the Lanczos basis holds steps·n numbers: float64 unless that passes 1 GiB (then float32)
    steps = getattr(dissipation, "steps", 64)
    dtype = torch.float64 if 8 * steps * exp.n <= 2**30 else torch.float32
    hvp = exp.hvp if comm.local else (lambda V: comm.reduce_hvp(exp.hvp(V)))
    with torch.enable_grad():
        verdict = dissipation(hvp, exp.n, lr=lr, T=T, dtype=dtype, device=device)
    return comm.agree(verdict)


def readout_keep(params: list, pruner) -> Optional[tuple]:
    """``(flags, keep)`` for :func:`readout_prune`: the prunable entries of the full vector and how
    many of them the download keeps (``None`` without pruning)."""
    if pruner is None:
        return None
    flags = torch.cat([torch.full((p.numel(),), f, dtype=torch.bool, device=params[0].device)
                       for p, f in zip(params, pruner.prunable)])
    return flags, pruner.n_prunable - pruner.n_pruned_target()


def flat_grads(params: list) -> torch.Tensor:
    """The parameters' ``.grad`` as one flat vector (zeros where ``None``)."""
    return _flat.flatten([p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in params])


def reexpand(win: WindowState, graph: Optional[torch.Tensor], params: list, cfg: QODEConfig,
             comm: Comm) -> Optional[str]:
    """A resumed matrix-free window: F1..Fq re-expanded at θ0 from ``graph``; returns why it failed, or None."""
    why = "KeyError('loss')" if graph is None else None
    exp = None
    if graph is not None:
        try:
            exp = expand(graph, params, win.support, win.lr, win.wd, cfg)
        except (UnsupportedGraphError, NonFiniteError) as exc:
            why = repr(exc)
    if comm.any(exp is None):                    # a failure on one rank ends the window on all
        if exp is not None:
            exp.release()
        return why or "re-expansion failed on another rank"
    build_system(win, exp, cfg, comm)
    return None


def start_window(exp: TaylorExpansion, support, theta0: torch.Tensor, grads_flat: torch.Tensor, wd: float,
                 cfg: QODEConfig, comm: Comm, rng: np.random.Generator) -> WindowState:
    """Build the window's Carleman system at θ0 (the model keeps holding θ0 until the end)."""
    explicit = use_explicit(cfg, exp.n)
    # an explicit window keeps all of F0(0..T-1): the window system is rebuilt at the end
    win = WindowState(theta0=theta0, support=support, lr=exp.lr, wd=wd, explicit=explicit,
                      tape=NoiseTape(keep=explicit), rng=rng, kind=carleman_state_for(cfg, explicit))
    if cfg.noise == "frozen":   # the upload step's .grad, as "stream" uses each step's (clipping included)
        win.frozen = win.f0_from_grads(grads_flat)
    build_system(win, exp, cfg, comm)
    n = exp.n
    if win.kind == "factored":   # the PolynomialODE itself: no dense order-2 system is built
        win.state = FactoredLevels.zeros(win.system, max_rank=cfg.max_rank, embedded=True)
        dim = sum(n ** j for j in range(1, cfg.carleman_order + 1))
    else:
        win.state = DenseLevels.zeros(win.system, device=theta0.device, embedded=cfg.carleman_order >= 2)
        dim = win.system.dim
    win.info = {"n": n, "order": cfg.carleman_order, "form": cfg.form, "dim": dim,
                "degree": win.ode.degree, "explicit": explicit, "noise": cfg.noise, "state": win.kind}
    return win


def open_window(graph: torch.Tensor, params: list, support, group: dict, buffers: list, cfg: QODEConfig,
                comm: Comm, rng: np.random.Generator, dissipation, rep: CycleReport, *, monitor=None,
                k: int = 0) -> tuple:
    """The upload (DESIGN.md steps 3–5): expand the loss ``graph`` at θ0 on S, run the dissipation
    check (``mode="auto"``), build the window.  Returns ``(WindowState, "")`` or ``(None, why not)``;
    the parameters' ``.grad`` hold ∇L_0(θ0)."""
    lr, wd = float(group["lr"]), float(group["weight_decay"])
    if lr <= 0:
        return None, (f"lr = {lr:g} (e.g. a scheduler reached 0): gradient descent does not move, there is "
                      "nothing to linearise")
    try:
        exp, why = expand(graph, params, support, lr, wd, cfg), ""
    except (UnsupportedGraphError, NonFiniteError) as exc:
        exp, why = None, f"Taylor expansion failed: {exc}"
    del graph
    if comm.any(exp is None):                    # a failure on one rank ends the upload on all
        if exp is not None:
            exp.release()
        return None, why or "Taylor expansion failed on another rank"
    rep.support_size = exp.n
    if cfg.mode == "auto":
        verdict = check_dissipation(exp, dissipation, lr, cfg.window_length, comm, params[0].device)
        rep.dissipation = verdict.as_dict()
        if monitor is not None:
            monitor(k, verdict)
        if not verdict.passed:
            exp.release()
            return None, f"dissipation check {verdict.reason}"
        rep.reason = f"dissipation check {verdict.reason}"
    else:
        rep.reason = "mode='quantum'"
    theta0 = _flat.flatten([p.detach() for p in params]).clone()
    try:
        win = start_window(exp, support, theta0, flat_grads(params), wd, cfg, comm, rng)
    except (ValueError, MemoryError) as exc:   # e.g. terms too large for this support: refuse the window
        exp.release()
        return None, f"Carleman system not built: {exc}"
    rep.carleman = dict(win.info)
    if cfg.track_sgd:
        win.shadow = start_shadow(params, buffers, group["momentum"], support, theta0)
    return win, ""


def _reduced(term, comm: Comm):
    """A Taylor term whose every product passes through ``comm.reduce_hvp`` (the global batch's)."""
    if term is None:
        return None
    if getattr(term, "explicit", True):
        return comm.reduce_hvp(term.dense())
    red = comm.reduce_hvp
    rmat = term._rmatmat
    out = MatrixFreeTerm(term.n, term.k, lambda Y: red(term.matmat(Y)), symmetric=term.symmetric,
                         rmatmat=None if rmat is None else (lambda W: red(rmat(W))),
                         power=lambda u: red(term.power(u)))
    sym = getattr(term, "sym_sum", None)
    if callable(sym):                            # the factored state's batched F2 products
        out.sym_sum = lambda Z, lam: red(sym(Z, lam))
    return out


def build_system(win: WindowState, exp: TaylorExpansion, cfg: QODEConfig, comm: Comm) -> None:
    """The window's ODE (Taylor terms of ``exp``, F0 from the tape) and its Carleman system."""
    _count_products(exp, win.products)
    ode = exp.ode(F0=win.f0_source(), explicit=win.explicit, dtype=torch.float64)
    lean = getattr(ode.terms[1], "matvec_buffer", None) if ode.degree >= 1 else None
    if lean is not None:                         # the lean order-1 product counts as one HVP
        def counted(y, _f=lean):
            out = _f(y)
            win.products["hvp"] += 1
            return out
        ode.terms[1].matvec_buffer = counted
    if not comm.local:
        ode = PolynomialODE([win.f0_source()] + [_reduced(ode.terms[k], comm) for k in range(1, ode.degree + 1)],
                            dtype=torch.float64, device=ode.device)
    win.expansion = exp
    win.system = ode if win.kind == "factored" else carleman(ode, cfg.carleman_order, cfg.form)


def _count_products(exp: TaylorExpansion, products: dict) -> None:
    """Count, into ``products``, every product ``exp`` applies through the upload graph from now on
    (the ledger's classical cost): HVP columns (``hvp``; ``derivative(2)``: n) and third-order products
    (``third``, ``third_sym_sum``: one per column; ``third_sym``: one per non-zero eigenvalue of
    sym(Z), as it computes them; ``derivative(3)``: n²).  Values are untouched."""
    def cols(V) -> int:
        V = torch.as_tensor(V)
        return 1 if V.dim() == 1 else int(V.shape[1])

    def wrap(name, key, count):
        fn = getattr(exp, name)

        def counted(*args, **kwargs):
            out = fn(*args, **kwargs)
            products[key] += count(*args, **kwargs)
            return out
        setattr(exp, name, counted)

    def sym_rank(Z) -> int:   # third_sym's own eigen-decomposition, repeated (dense-state path only)
        Z = torch.as_tensor(Z).detach().to(dtype=torch.float64, device="cpu")
        return int((torch.linalg.eigh(0.5 * (Z + Z.T))[0] != 0).sum())

    wrap("hvp", "hvp", lambda V: cols(V))
    wrap("third", "third_order", lambda A, B: cols(A))
    wrap("third_sym", "third_order", sym_rank)
    wrap("third_sym_sum", "third_order", lambda Z, lam: cols(Z))
    n = exp.n
    fn = exp.derivative

    def derivative(k):
        out = fn(k)
        if k == 2:
            products["hvp"] += n
        elif k >= 3:
            products["third_order"] += n ** (k - 1)
        return out
    exp.derivative = derivative


@contextlib.contextmanager
def flop_count():
    """``{"flops": …}`` filled with the FLOPs of what runs inside, as
    ``torch.utils.flop_counter.FlopCounterMode`` counts them (it only observes: results are unchanged;
    its module and gradient hooks are removed on exit).  Left ``None`` when the body raises."""
    box: dict = {"flops": None}
    counter = FlopCounterMode(display=False)
    with counter:
        yield box
    box["flops"] = int(counter.get_total_flops())


def advance(win: WindowState, grads, comm: Comm, f0: Optional[torch.Tensor] = None) -> Optional[str]:
    """Window step t: record F0(t) (``f0`` when given, else from ``grads`` as
    :meth:`WindowState.f0_from_grads` takes them) and advance the Carleman state; returns a fault, or None."""
    t = win.t
    if win.frozen is None:
        win.record(t, f0 if f0 is not None else win.f0_from_grads(grads))
    fault = None
    try:
        with torch.enable_grad():
            win.state.advance(win.system, t)
    except NonFiniteError as exc:
        fault = f"{exc}"
    except RuntimeError as exc:
        if "inplace operation" in str(exc):
            raise RuntimeError(
                "QODE: the parameters or buffers (e.g. BatchNorm running statistics) were modified in "
                "place during a quantum window (model.load_state_dict, an EMA, a manual write), which "
                "invalidates the upload batch's Hessian-vector products; load model weights together "
                "with QODE.load_state_dict, or between windows (QODE.in_quantum_window is False)") from exc
        raise
    if comm.any(fault is not None):
        return fault or "a non-finite Carleman state on another rank"
    win.t = t + 1
    return None


@torch.enable_grad()
def finish_window(win: WindowState, cfg: QODEConfig, comm: Comm, rep: CycleReport,
                  readout_keep: Optional[tuple] = None) -> WindowResult:
    """Solve (Eq. II.102), read θ0 + u(T) on S back by tomography, prune to r, price it.

    ``readout_keep``: ``(flags, keep)`` for a dense upload with pruning — the full-vector prunable
    flags and how many prunable weights the download keeps.
    """
    T = cfg.window_length
    factored = win.kind == "factored"
    sys_ = _ledger_system(win, cfg) if factored else win.system
    n = sys_.n
    u_forward = win.state.level1()
    _carleman_record(win, rep, u_forward)
    sol = None
    solver_info = {"method": cfg.solver, "kappa": None, "kappa_bound": kappa_bound(T), "fidelity": 1.0}
    try:
        if not factored and (cfg.window_solver.needs_explicit
                             or (win.explicit and (T + 1) * sys_.dim <= KAPPA_MAX_UNKNOWNS)):
            sol = solve_window(sys_, torch.zeros(n, dtype=torch.float64), T, method=cfg.window_solver)
            solver_info.update(sol.as_dict())
            solver_info["kappa_bound"] = kappa_bound(T)
            u_T = torch.as_tensor(sol.final).to(u_forward)
            solver_info["max_abs_diff_vs_forward"] = float((u_T - u_forward).abs().max())
            if cfg.solver == "forward":
                u_T = u_forward
        else:
            u_T = u_forward
    except (ValueError, MemoryError) as exc:
        comm.any(True)                           # matches the other ranks' fault flag below
        return WindowResult(fault=f"window solve failed: {exc}")
    rep.solver = solver_info
    S = win.support
    theta0_S = (win.theta0 if S is None else win.theta0[S]).to(torch.float64)
    target = theta0_S + u_T
    res, fault = None, None
    if not all_finite(target):
        fault = "the solved weights are not finite"
    elif not bool(target.any()):
        fault = "the solved weight vector is zero: nothing to read out"
    else:
        try:   # every rank samples (same vector, same seed: the samplers stay in step); rank 0's is read
            res = tomography(target, cfg.shots, seed=win.rng, eps=cfg.eps, **cfg.readout_options())
        except (ValueError, TypeError) as exc:
            fault = f"tomography failed: {exc}"
    if comm.any(fault is not None):
        return WindowResult(fault=fault or "the readout failed on another rank")
    rep.tomography = res.as_dict(arrays=False)
    estimate = comm.broadcast(torch.as_tensor(res.estimate).to(device=target.device, dtype=torch.float64))
    if not bool(estimate.any()):
        return WindowResult(fault=f"tomography read out a zero vector (shots={cfg.shots}: no norm-stage shot "
                                  "succeeded), which would erase the model")
    r = None if readout_keep is None else readout_prune(estimate, win, *readout_keep, rep)
    new = win.embed(estimate)
    try:
        led = estimate_resources(sys_, T, eps=cfg.eps, r=r if r is not None else n, solution=sol,
                                 solver=cfg.window_solver)
        rep.resources = led.as_dict()
        rep.resources["classical"] = classical_cost(
            T, win.closure_flops, hvps=win.products["hvp"], third_order=win.products["third_order"],
            lanczos_hvps=int((rep.dissipation or {}).get("hvps") or 0),
            gates=cfg.window_solver.gates(s_M=led.s_M, kappa=led.kappa, N_b=led.N_b, eps=led.eps)).as_dict()
    except (ValueError, TypeError, MemoryError) as exc:  # the ledger must never stop training
        rep.resources = {"error": str(exc)}
    st = win.state
    lin1 = win.embed(theta0_S + st.level1_order1()) if getattr(st, "embedded", False) else None
    return WindowResult(new=new, lin=win.embed(target), lin1=lin1)


def _ledger_system(win: WindowState, cfg: QODEConfig):
    """The order-2 CarlemanSystem of a factored window, for the resource ledger only: it describes Δ and
    the sparsity bound and is never stepped, so its budget only has to admit the description."""
    dim = sum(win.ode.n ** j for j in range(1, cfg.carleman_order + 1))
    return carleman(win.ode, cfg.carleman_order, cfg.form, max_bytes=max(default_max_bytes(), 4 * 8 * dim + 1))


def _carleman_record(win: WindowState, rep: CycleReport, u_T: torch.Tensor) -> None:
    """``rep.carleman``'s state fields: ``state``, ``rank`` (largest k), ``truncation`` (discarded
    Frobenius mass of Y2, 0.0 when exact), ``order_gap`` = ‖u⁽²⁾(T) − u⁽¹⁾(T)‖ / ‖u⁽²⁾(T)‖ (order ≥ 2, dense or
    factored: both carry the order-1 state; None at order 1), ``state_bytes``."""
    st = win.state
    rec = {"state": win.kind, "rank": None, "truncation": 0.0, "order_gap": None, "state_bytes": int(st.nbytes)}
    if isinstance(st, FactoredLevels):
        rec.update(rank=int(st.rank), truncation=float(st.truncation))
    if getattr(st, "embedded", False):
        rec["order_gap"] = float(st.order_gap)
    if rep.carleman is None:
        rep.carleman = {}
    rep.carleman.update(rec)


def readout_prune(estimate: torch.Tensor, win: WindowState, flags: torch.Tensor, keep: int,
                  rep: CycleReport) -> int:
    """Keep the ``keep`` largest read-out weights among the *prunable* entries (the paper's "tomography
    reads the r largest components"); biases and norm scales, never pruned, are read as they are.
    In place; returns r, the components read out."""
    S = win.support
    if S is not None:   # weights outside S keep θ0: count their non-zeros against r
        outside = flags.clone()
        outside[S] = False
        keep = max(0, keep - int(torch.count_nonzero(win.theta0[outside])))
        flags = flags[S]
    idx = torch.nonzero(flags).reshape(-1)
    order = torch.sort(estimate[idx].abs(), descending=True, stable=True).indices  # ties: lower index
    drop = idx[order[keep:]]
    dropped = estimate[drop]
    total = float(estimate.pow(2).sum())
    estimate[drop] = 0
    rep.tomography["readout_pruned"] = int(torch.count_nonzero(dropped))
    rep.tomography["readout_pruned_mass"] = float(dropped.pow(2).sum()) / total if total > 0 else 0.0
    return int(estimate.numel() - idx.numel() + keep)


# ---------------------------------------------------------------------------------------- resume
def window_state_dict(win: WindowState, track_sgd: bool) -> dict:
    """The live window as plain tensors (``QODE.state_dict()['qode']['window']``)."""
    sd = {"t": win.t, "lr": win.lr, "wd": win.wd, "explicit": win.explicit, "theta0": win.theta0.clone(),
          "support": None if win.support is None else win.support.clone(),
          "frozen": None if win.frozen is None else win.frozen.clone(),
          "tape": {int(t): v.clone() for t, v in win.tape.rows.items()},
          "terms": ([win.ode.terms[k].dense().clone() for k in range(1, win.ode.degree + 1)]
                    if win.explicit else None),
          "closure_flops": win.closure_flops, "products": dict(win.products)}
    st = win.state.state_dict()
    if st.get("kind") == DenseLevels.kind and "v" not in st:
        sd["y"] = st["y"]                    # the format of earlier versions (order 1)
    else:
        sd["carleman_state"] = st
    if track_sgd and win.shadow is not None:
        sd.update(win.shadow.state_dict())
    return sd


def load_window(sd: dict, cfg: QODEConfig, comm: Comm, rng: np.random.Generator, device) -> WindowState:
    """The window saved by :func:`window_state_dict`; a matrix-free one waits for its expansion
    (``system`` is ``None`` until ``QODE.restore_expansion`` or the next step re-expands)."""
    tape = NoiseTape(keep=bool(sd["explicit"]))
    tape.rows = {int(t): v.to(device) for t, v in sd["tape"].items()}
    win = WindowState(theta0=sd["theta0"].to(device), lr=float(sd["lr"]), wd=float(sd["wd"]),
                      support=None if sd["support"] is None else sd["support"].to(device),
                      explicit=bool(sd["explicit"]), tape=tape, rng=rng, t=int(sd["t"]),
                      frozen=None if sd["frozen"] is None else sd["frozen"].to(device),
                      closure_flops=sd.get("closure_flops"),
                      products=dict(sd.get("products", {"hvp": 0, "third_order": 0})))
    if "carleman_state" in sd:
        win.state = state_from_dict(sd["carleman_state"], device=device)
        win.kind = win.state.kind
    else:
        win.state = DenseLevels(sd["y"].to(device), sd["theta0"].numel() if sd["support"] is None
                                else sd["support"].numel())
    if sd["terms"] is not None:
        ode = PolynomialODE([win.f0_source()] + [T.to(device) for T in sd["terms"]], dtype=torch.float64,
                            device=device)        # saved after comm.reduce_hvp: the global batch's terms
        win.system = ode if win.kind == "factored" else carleman(ode, cfg.carleman_order, cfg.form)
    if cfg.track_sgd and "shadow" in sd:
        win.shadow = Shadow.load(sd, device)
    return win
