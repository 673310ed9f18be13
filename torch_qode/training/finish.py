"""The end of a quantum window as a pipeline of named stages (:data:`STAGES`).

At t = T a :class:`~.window.Window` runs, in order: :func:`record` (the Carleman state's report
fields), :func:`solve` (the window system, Eq. II.102), :func:`read_out` (tomography on S, Eq. II.123,
of ``u(T)`` or of ``θ0 + u(T)``: the ``readout`` setting), :func:`prune` (the r largest prunable
weights), :func:`price` (the resource ledger, Theorems II.3/II.4, and the classical cost), :func:`guard`
(a non-finite or exploded result is rejected), :func:`chain` (``track_sgd``: the classical runs the
drift is decomposed against) and :func:`write_back`.  Each stage reads and
fills one :class:`Readout`; a stage that fails raises a :class:`~.faults.WindowFault` and nothing is
written back.  A new stage (a second readout, a twin, a predicted error) is one function in the list.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..bridge import flat as _flat
from ..core.linsolve import solve_window
from ..core.ode import all_finite
from ..core.resources import classical_cost, estimate_resources
from ..core.tomography import tomography
from ..core.window import kappa_bound
from .faults import Fault, WindowFault
from .report import CycleReport
from .readout_prune import readout_prune, top_r
from .shots import window_shots

__all__ = ["Readout", "STAGES", "run", "record", "solve", "read_out", "prune", "price", "guard", "chain",
           "write_back", "readout_prune", "top_r", "write_params", "KAPPA_MAX_UNKNOWNS"]

#: κ(M) is computed for the report when the window system has at most this many unknowns.
KAPPA_MAX_UNKNOWNS = 5_000


@dataclass
class Readout:
    """What the finish stages pass along (full flat vectors unless said otherwise)."""

    rep: CycleReport
    keep: Optional[tuple] = None             # (flags, keep) for the read-out pruning, or None
    system: Any = None                       # the Carleman system the solve and the ledger describe
    u_T: Optional[torch.Tensor] = None       # u(T) on S
    sol: Any = None                          # the WindowSolution (None: not solved)
    target: Optional[torch.Tensor] = None    # θ0 + u(T) on S
    read: Optional[torch.Tensor] = None      # the vector tomography read on S: u(T) or θ0 + u(T)
    estimate: Optional[torch.Tensor] = None  # the read-out weights on S (θ0 + û(T), or the estimate of θ0 + u(T))
    r: Optional[int] = None                  # components read out (None: all of S)
    new: Optional[torch.Tensor] = None       # θ0 + û(T)
    lin: Optional[torch.Tensor] = None       # θ0 + u(T) (before the readout)
    lin1: Optional[torch.Tensor] = None      # θ0 + u⁽¹⁾(T): the embedded order-1 state (order ≥ 2)
    lin_r: Optional[torch.Tensor] = None     # θ_lin,r: θ0 + u(T) pruned as the readout prunes (track_sgd)
    twin: Optional[torch.Tensor] = None      # the classical twin: GD on S pruned as the readout prunes (track_sgd)


def record(win, out: Readout) -> None:
    """The state's report fields into ``rep.carleman`` (``CarlemanState.record``); the system the
    solve and the ledger describe (``CarlemanState.ledger_system``); u(T) of the forward recurrence."""
    cfg = win.cfg
    out.system = win.state.ledger_system(win.system, cfg.carleman_order, cfg.form)
    out.u_T = win.state.level1()
    rep = out.rep
    if rep.carleman is None:
        rep.carleman = {}
    rep.carleman.update(win.state.record())


def solve(win, out: Readout) -> None:
    """The window system ``M X = B`` (Eq. II.102) by the configured solver, when the state allows it
    (``CarlemanState.solvable``) and the solver needs it or it is small enough for κ(M); its ``u(T)``
    replaces the recurrence's when the solver says so (``WindowSolver.replaces_forward``).

    Raises:
        WindowFault: ``Fault.SOLVE_FAILED`` (the other ranks see it at :func:`read_out`'s agreement).
    """
    cfg, sys_, T = win.cfg, out.system, win.T
    solver = cfg.window_solver
    info = {"method": cfg.solver, "kappa": None, "kappa_bound": kappa_bound(T), "fidelity": 1.0}
    try:
        small = win.explicit and (T + 1) * sys_.dim <= KAPPA_MAX_UNKNOWNS
        if win.state.solvable and (solver.needs_explicit or small):
            sol = solve_window(sys_, torch.zeros(sys_.n, dtype=torch.float64), T, method=solver)
            info.update(sol.as_dict())
            info["kappa_bound"] = kappa_bound(T)
            u_T = torch.as_tensor(sol.final).to(out.u_T)
            info["max_abs_diff_vs_forward"] = float((u_T - out.u_T).abs().max())
            out.sol = sol
            if solver.replaces_forward:
                out.u_T = u_T
    except (ValueError, MemoryError) as exc:
        win.comm.any(True)                       # matches the other ranks' fault flag in read_out
        raise WindowFault(Fault.SOLVE_FAILED, exc) from exc
    out.rep.solver = info


def read_out(win, out: Readout) -> None:
    """Tomography on S (Eq. II.123) of the vector the ``readout`` setting names: ``u(T)``, the level-1
    block of the Carleman state expanded at θ0, with θ0 added back classically (``"displacement"``), or
    ``θ0 + u(T)`` (``"weights"``, Algorithm 1's literal output); ``shots``, ``eps``, the readout options.
    The norm stage estimates the norm of that vector (``‖u(T)‖`` or ``‖θ(T)‖``).  Every rank samples
    (same vector, same seed), rank 0's estimate is broadcast.

    Raises:
        WindowFault: the weights are not finite, the vector read is zero, tomography failed (on any
            rank), or it read out a zero vector.
    """
    cfg, S = win.cfg, win.support
    theta0_S = (win.theta0 if S is None else win.theta0[S]).to(torch.float64)
    target = theta0_S + out.u_T
    moves = cfg.readout == "displacement"
    read = out.u_T if moves else target
    res, fault, shots = None, None, window_shots(win)   # shots="auto": chosen from the upload's prediction
    if not all_finite(target):
        fault = WindowFault(Fault.WEIGHTS_NONFINITE)
    elif not bool(read.any()):
        fault = WindowFault(Fault.DISPLACEMENT_ZERO if moves else Fault.WEIGHTS_ZERO)
    else:
        try:   # every rank samples (same vector, same seed: the samplers stay in step); rank 0's is read
            res = tomography(read, shots, seed=win.rng, eps=cfg.eps, **cfg.readout_options())
        except (ValueError, TypeError) as exc:
            fault = WindowFault(Fault.TOMOGRAPHY_FAILED, exc)
    fault = WindowFault.agreed(fault, win.comm, Fault.TOMOGRAPHY_FAILED)
    if fault is not None:
        raise fault
    out.rep.tomography = res.as_dict(arrays=False)
    out.rep.tomography.update(readout=cfg.readout, read_norm=float(torch.linalg.vector_norm(read)), shot_budget=shots)
    estimate = win.comm.broadcast(torch.as_tensor(res.estimate).to(device=target.device, dtype=torch.float64))
    if not bool(estimate.any()):
        raise WindowFault(Fault.READOUT_ZERO_DISPLACEMENT if moves else Fault.READOUT_ZERO, shots)
    out.target, out.read, out.estimate = target, read, (theta0_S + estimate if moves else estimate)


def prune(win, out: Readout) -> None:
    """A dense upload with pruning keeps the r largest prunable read-out weights (:func:`readout_prune`)."""
    if out.keep is not None:
        out.r = readout_prune(out.estimate, win, out.keep, out.rep)
    out.new = win.embed(out.estimate)


def price(win, out: Readout) -> None:
    """The resource ledger (Theorems II.3/II.4) and the same window's classical cost (its closure
    FLOPs, the products counted through the graph, the dissipation check's HVPs) into
    ``rep.resources``; an error there never stops training (``{"error": …}``).  The check's
    ``cost_ratio`` (its HVPs per HVP of the window) is recomputed on the window's counted HVPs.  The
    tomography's support ``r`` is that of the vector read: the r kept weights (``readout="weights"``
    with the readout's prune), the non-zeros of ``u(T)`` (``"displacement"``: the prune needs all of
    them, it applies to θ0 + û), else all of S."""
    cfg, rep, sys_ = win.cfg, out.rep, out.system
    if cfg.readout == "displacement":
        r = max(1, int(torch.count_nonzero(out.read)))
    else:
        r = out.r if out.r is not None else sys_.n
    flops = win.comm.total(win.closure_flops)   # the global batch's: every rank counted its shard
    try:
        led = estimate_resources(sys_, win.T, eps=cfg.eps, r=r, solution=out.sol,
                                 solver=cfg.window_solver)
        rep.resources = led.as_dict()
        rep.resources["readout"] = cfg.readout
        readout_cost(rep, led)
        rep.resources["classical"] = classical_cost(
            win.T, flops, hvps=win.products["hvp"], third_order=win.products["third_order"],
            lanczos_hvps=int((rep.dissipation or {}).get("hvps") or 0),
            gates=cfg.window_solver.gates(s_M=led.s_M, kappa=led.kappa, N_b=led.N_b, eps=led.eps)).as_dict()
    except (ValueError, TypeError, MemoryError) as exc:  # the ledger must never stop training
        rep.resources = {"error": str(exc)}
    if rep.dissipation is not None and win.products["hvp"]:   # the check's cost against the window's own HVPs
        rep.dissipation["window_hvps"] = int(win.products["hvp"])
        rep.dissipation["cost_ratio"] = int(rep.dissipation.get("hvps") or 0) / rep.dissipation["window_hvps"]
        # products and gradients alike (the window takes a gradient per step, the predicted check four)
        rep.dissipation["work_ratio"] = ((int(rep.dissipation.get("hvps") or 0) + int(rep.dissipation.get("check_grads")
                                          or 0)) / (rep.dissipation["window_hvps"] + win.T))
    st, S = win.state, win.support
    if st.embedded:
        out.lin1 = win.embed((win.theta0 if S is None else win.theta0[S]).to(torch.float64) + st.level1_order1())
    out.lin = win.embed(out.target)


def readout_cost(rep: CycleReport, led) -> None:
    """The shots the readout took (``rep.tomography["shot_budget"]``: the int given, or the one ``shots="auto"``
    chose; ``None``: exact) into the ledger as ``readout_shots``, with ``readout_gates``: those shots times
    the expected gates of one shot (the ledger's ``total_gates`` per support draw and shadow shot: one
    window solve, post-selection included)."""
    shots = (rep.tomography or {}).get("shot_budget")
    per_shot = led.total_gates / (led.tomography_support_draws + led.tomography_shadow_shots)
    rep.resources["readout_shots"] = shots
    rep.resources["readout_gates"] = None if shots is None else float(shots) * per_shot


def first_order_path(win) -> Optional[float]:
    """``Σ_t ‖F0(t)‖`` over the window (``T·‖F0‖`` with ``noise="frozen"``): the length of the path of
    its T gradient steps at θ0, the scale of ``u(T)`` when ``‖I + F1‖ ≤ 1`` (``None``: unknown, a window
    resumed from a state saved before issue 20)."""
    if win.frozen is not None:
        return win.T * float(torch.linalg.vector_norm(win.frozen))
    return None if win.f0_path is None else float(win.f0_path)


def guard(win, out: Readout) -> None:
    """Reject a window that exploded before it reaches the model: a non-finite read-out, or a
    displacement ``‖u(T)‖ > max_displacement · Σ_t ‖F0(t)‖`` (:func:`first_order_path`; a dissipative
    window stays within ``1 ×``).  One verdict for all ranks.  Measured on ResNet-18 before this stage:
    ``‖u(T)‖`` of 2.5e17 written back, NaN weights, every later step skipped.

    Raises:
        WindowFault: ``Fault.READOUT_NONFINITE`` or ``Fault.DISPLACEMENT`` (nothing is written back).
    """
    fault = None
    if not all_finite(out.new):
        fault = WindowFault(Fault.READOUT_NONFINITE)
    elif win.cfg.max_displacement is not None:
        path = first_order_path(win)
        moved = float(torch.linalg.vector_norm(out.u_T))
        if path is not None and moved > win.cfg.max_displacement * path:
            fault = WindowFault(Fault.DISPLACEMENT, f"{moved:.3g}, {moved / path if path > 0 else float('inf'):.3g}× "
                                f"the path of its gradient steps Σ‖F0(t)‖ = {path:.3g} (max_displacement = "
                                f"{win.cfg.max_displacement:g})")
    fault = WindowFault.agreed(fault, win.comm, Fault.DISPLACEMENT)
    if fault is not None:
        raise fault


def chain(win, out: Readout) -> None:
    """``track_sgd``: the classical runs the drift is decomposed against (DESIGN.md, "What a window gets
    wrong, measured apart"), each pruned exactly as :func:`prune` prunes the read-out (:func:`top_r` on a
    copy): ``θ_lin,r`` (the exact Carleman solution θ0 + u(T), Eq. II.102) and the classical twin
    (``θ_GD,S``, gradient descent on S at the window's lr and weight decay: the shadow's, no
    linearisation, no shot noise).  Nothing without a shadow."""
    shadow = win.shadow
    if shadow is None:
        return
    gd = _flat.flatten(shadow.params) if shadow.gd is None else shadow.gd
    S = slice(None) if win.support is None else win.support
    lin_S, twin_S = out.target.clone(), gd[S].clone()
    if out.keep is not None:
        top_r(lin_S, win, out.keep)
        top_r(twin_S, win, out.keep)
    out.lin_r = win.embed(lin_S)
    twin = gd.clone()
    twin[S] = twin_S
    out.twin = twin


def write_back(win, out: Readout) -> None:
    """``θ0 + û(T)`` into the model's parameters."""
    write_params(win.params, out.new)


@torch.no_grad()
def write_params(params: list, flat: torch.Tensor) -> None:
    """Copy the full flat vector ``flat`` into the parameters."""
    for p, v in zip(params, _flat.unflatten(flat, params)):
        p.copy_(v)


#: the finish pipeline, in order
STAGES = (record, solve, read_out, prune, price, guard, chain, write_back)


@torch.enable_grad()
def run(win, rep: CycleReport, keep: Optional[tuple] = None) -> Readout:
    """Run :data:`STAGES` on ``win`` (see :meth:`~.window.Window.finish`)."""
    out = Readout(rep=rep, keep=keep)
    for stage in STAGES:
        stage(win, out)
    return out
