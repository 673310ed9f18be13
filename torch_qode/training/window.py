"""The quantum window as data and functions (QODE.step delegates here, as ``SGD.step`` to ``sgd()``).

A window (DESIGN.md, steps 4–8) starts at θ0 on the support S with the Taylor expansion of the upload
step's loss, advances its Carleman state one step per closure (``F0(t) = −η(∇L_t(θ0) + wd·θ0)``),
and at t = T finishes: the stages of :mod:`.finish` solve the window system (Eq. II.102), read
``θ0 + u(T)`` out by tomography (Eq. II.123), prune the read-out to the r largest prunable weights,
price it (Theorems II.3/II.4) and write it back.  A :class:`Window` owns that life (:meth:`Window.open`,
:meth:`Window.advance`, :meth:`Window.finish`); its Carleman state class (core/state.py) decides
dense versus factored, and a step that fails raises a typed :class:`~.faults.WindowFault`.
Every collective goes through the window's :class:`~torch_qode.training.comm.Comm`.

The solver, its options and its cost formula come from the core's registry (``cfg.window_solver``,
:func:`~torch_qode.core.solvers.make_solver`); the Carleman form from ``FORMS`` through ``carleman``."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from ..bridge import flat as _flat
from ..bridge.dissipation import Verdict
from ..bridge.taylor import TaylorExpansion, UnsupportedGraphError
from ..core.ode import MatrixFreeTerm, NonFiniteError, PolynomialODE
from ..core.state import STATES, CarlemanState, DenseLevels, state_from_dict
from . import finish as _finish
from .check import check_dissipation, upload_probe  # noqa: F401  (check_dissipation: its home before issue 22)
from .capture import NoiseTape, Replay
from .comm import Comm
from .config import EXPLICIT_MAX_SUPPORT, QODEConfig, carleman_state_for, use_explicit
from .faults import Fault, WindowFault
from .finish import KAPPA_MAX_UNKNOWNS, Readout, write_params
from .products import counted, new_counts
from .readout_prune import readout_keep  # noqa: F401  (cycle and twin read it here)
from .report import CycleReport
from .shadow import Shadow, start_shadow
from .shots import predicted_displacement

__all__ = ["Window", "Readout", "open_window", "window_rates", "check_window_groups", "window_state_dict",
           "load_window", "expand", "flop_count", "write_params", "EXPLICIT_MAX_SUPPORT", "KAPPA_MAX_UNKNOWNS"]


# ------------------------------------------------------------------------------------------ the data
@dataclass
class Window:
    """One live quantum window (between the upload and the readout), and its life.

    :meth:`open` is the upload, :meth:`advance` one window step, :meth:`finish` the stages of
    :mod:`.finish` (solve, read out, prune, price, write back); a fault raises a
    :class:`~.faults.WindowFault` and the caller aborts (θ0 back in the model).  ``levels`` is the
    Carleman state class (:class:`~torch_qode.core.state.DenseLevels` or ``FactoredLevels``): it
    builds the system, the state and the ledger's system, so nothing here asks which it is.

    Attributes:
        theta0: the full flat parameter vector at the upload (θ0).
        support: ``S``, indices into ``theta0`` of the weights the window evolves (``None``: all).
        lr: the learning rate η.
        wd: the weight decay: a float, or one per coordinate (float64, the full flat vector).
        explicit: whether the Taylor terms are explicit (a resume is then exact bit for bit).
        tape: ``F0(t)`` of the window's steps (streamed noise).
        rng: the optimizer's sampler (the tomography's draws).
        cfg: the settings.
        comm: the window's collectives.
        params: the model's parameters (the readout is written back into them).
        levels: the Carleman state class (``core/state.py``'s ``STATES``).
        watched: the parameters and buffers whose in-place writes invalidate the products.
        frozen: ``F0`` of the upload batch with ``noise="frozen"``, else ``None``.
        t: the window steps taken.
        state: the Carleman state.
        expansion: the Taylor expansion at θ0.
        system: what the state advances through (``levels.system_for``; ``None``: resumed matrix-free, not re-expanded).
        shadow: the SGD shadow (``track_sgd``), else ``None``.
        info: the window's Carleman facts (n, order, form, …), copied into ``CycleReport.carleman``.
        closure_flops: FLOPs of the upload closure (for the ledger), when counted.
        products: the products taken through the graph, by kind.
        spare_row: the tape row dropped last: the buffer of the next ``F0`` (scratch).
        versions: the watched tensors' ``_version`` at the expansion.
        f0_path: ``Σ_t ‖F0(t)‖`` so far (a device scalar; ``None``: unknown after a resume).
        T: the window's length (``cfg.window_length``, or the one the check chose with ``window="auto"``).
        verdict: the dissipation check's provisional verdict, decided at the first new batch (else ``None``)."""

    theta0: torch.Tensor                 # the full flat parameter vector at the upload
    support: Optional[torch.Tensor]      # S (indices into theta0); None: all weights
    lr: float
    wd: Any                              # weight decay: a float, or per coordinate (float64, full flat vector)
    explicit: bool                       # explicit Taylor terms (resumable bit for bit)
    tape: NoiseTape                      # F0(t), streamed noise
    rng: np.random.Generator             # the optimizer's sampler (tomography draws)
    cfg: QODEConfig
    comm: Comm
    params: list                         # the model's parameters (the readout is written back into them)
    levels: type = DenseLevels           # the Carleman state class (core/state.py STATES)
    watched: tuple = ()                  # parameters and buffers whose in-place writes invalidate products
    frozen: Optional[torch.Tensor] = None    # F0 of the upload batch (noise="frozen")
    t: int = 0
    state: Optional[CarlemanState] = None
    expansion: Optional[TaylorExpansion] = None
    system: Any = None                   # what the state advances through (levels.system_for; None: a
    #                                      resumed matrix-free window, until re-expanded)
    shadow: Optional[Shadow] = None      # track_sgd
    info: dict = field(default_factory=dict)
    closure_flops: Optional[int] = None  # FLOPs of the upload closure (FlopCounterMode), for the ledger
    products: dict = field(default_factory=new_counts)   # products through the graph (.products.counted)
    spare_row: Optional[torch.Tensor] = None   # the tape row dropped last: the next F0's buffer (scratch)
    versions: list = field(default_factory=list)        # the watched tensors' ``_version`` at the expansion
    f0_path: Any = 0.0                   # Σ_t ‖F0(t)‖ so far (a device scalar; None: unknown after a resume)
    T: int = 0                           # the window's length (set at the upload)
    verdict: Any = None                  # a pending verdict (criterion "predicted"), decided at t = 1

    def record(self, t: int, f0: torch.Tensor) -> None:
        """``F0(t)`` into the tape; a row it drops becomes :attr:`spare_row`.

        Args:
            t: the window step.
            f0: ``F0(t)`` on S (float64)."""
        old = self.tape.rows.get(t - 1) if not self.tape.keep and len(self.tape.rows) == 1 else None
        self.tape.record(t, f0)
        if self.f0_path is not None:             # no host read: summed on the device
            self.f0_path = self.f0_path + torch.linalg.vector_norm(f0)
        if old is not None and old is not f0 and old.dtype == torch.float64:
            self.spare_row = old

    def f0_source(self):
        """Where the window's ODE reads ``F0(t)``.

        Returns:
            The tape, or with ``noise="frozen"`` a function ``t -> F0`` of the upload batch."""
        frozen = self.frozen
        return (lambda t: frozen) if frozen is not None else self.tape

    def f0_from_grads(self, grads) -> torch.Tensor:
        """``F0(t) = −η (∇L_t(θ0) + wd·θ0)`` on S (``wd`` per coordinate with parameter groups of
        different weight decay), in float64, from the flat gradient or from the
        parameters (their ``.grad``; ``None``: zeros).  Parameters on all weights are copied straight
        into a float64 vector (:attr:`spare_row`, the row the tape dropped last, when there is one):
        the numbers of ``flat_grads`` then ``.to(float64)``, without the flat float32 copy.

        Args:
            grads: the flat gradient (a tensor), or the parameters (a list).

        Returns:
            ``F0(t)`` on S, float64."""
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
        if isinstance(self.wd, torch.Tensor):
            th, wd = (self.theta0, self.wd) if S is None else (self.theta0[S], self.wd[S])
            f0.add_(th.to(torch.float64) * wd)
        elif self.wd:
            th = self.theta0 if S is None else self.theta0[S]
            f0.add_(th.to(torch.float64), alpha=self.wd)
        return f0.mul_(-self.lr)

    def embed(self, values_S: torch.Tensor) -> torch.Tensor:
        """The full flat parameter vector: θ0 with its support entries replaced by ``values_S``.

        Args:
            values_S: one value per entry of S.

        Returns:
            A new vector of ``theta0``'s shape and dtype."""
        full = self.theta0.clone()
        if self.support is None:
            full.copy_(values_S.to(full.dtype))
        else:
            full[self.support] = values_S.to(full.dtype)
        return full

    def read_estimate(self) -> torch.Tensor:
        """The vector the readout will read, as the upload knows it (for :func:`~.config.readout_warning`):
        θ0 on S with ``readout="weights"``; with ``readout="displacement"`` the first-order displacement
        ``T·F0`` on S, F0 the first recorded step's (``u(T)`` is not known before the window ends; to first
        order it is the path of T gradient steps at θ0, of norm ``T·‖η g‖``).

        Returns:
            A vector on S (zeros when no step was recorded yet).
        """
        if self.cfg.readout == "weights":
            return self.theta0 if self.support is None else self.theta0[self.support]
        return predicted_displacement(self)

    @property
    def ode(self) -> PolynomialODE:
        """The window's ODE (that of the system, or the system itself for a factored state)."""
        return self.system if isinstance(self.system, PolynomialODE) else self.system.ode

    def release(self) -> None:
        """Drop the autograd graph, the system and the state (nothing outlives the window)."""
        if self.expansion is not None:
            self.expansion.release()
        self.expansion, self.system, self.state, self.shadow = None, None, None, None

    # ---------------------------------------------------------------------------------- life
    def build(self, exp: TaylorExpansion) -> None:
        """The window's ODE (Taylor terms of ``exp``, its products counted; F0 from the tape, Eq. I.3)
        and what the state advances through (``levels.system_for``: the Carleman system of Eq. II.102,
        or the ODE itself for a factored state); the watched tensors' versions are recorded.

        Args:
            exp: the Taylor expansion at θ0 (kept as :attr:`expansion`)."""
        ode = counted(exp.ode(F0=self.f0_source(), explicit=self.explicit, dtype=torch.float64), self.products)
        comm = self.comm
        if not comm.local:
            ode = PolynomialODE([self.f0_source()] + [_reduced(ode.terms[k], comm) for k in range(1, ode.degree + 1)],
                                dtype=torch.float64, device=ode.device)
        self.expansion = exp
        self.system = self.levels.system_for(ode, self.cfg.carleman_order, self.cfg.form)
        self.versions = [t._version for t in self.watched]

    def written_in_place(self) -> bool:
        """Whether a watched parameter or buffer was written in place since the expansion (its
        ``_version`` moved): the upload batch's products are then invalid.

        Returns:
            ``True`` when some watched tensor's ``_version`` moved."""
        return len(self.versions) == len(self.watched) and \
            any(t._version != v for t, v in zip(self.watched, self.versions))

    def advance(self, grads, f0: Optional[torch.Tensor] = None) -> None:
        """Window step t: record F0(t) (``f0`` when given, else from ``grads`` as :meth:`f0_from_grads`
        takes them) and advance the Carleman state (Eq. II.102's forward recurrence).

        Args:
            grads: the parameters (their ``.grad`` hold ∇L_t(θ0)) or their flat gradient.
            f0: F0(t), already computed from them.

        Raises:
            WindowFault: the state became non-finite (here or on another rank), or a product failed
                because a watched tensor was written in place (``Fault.INPLACE_WRITE``); the window
                is then as before the step, for the caller to abort."""
        t = self.t
        if self.frozen is None:
            self.record(t, f0 if f0 is not None else self.f0_from_grads(grads))
        fault = None
        try:
            with torch.enable_grad():
                self.state.advance(self.system, t)
        except NonFiniteError as exc:
            fault = WindowFault(Fault.STATE_NONFINITE, exc)
        except RuntimeError:
            if not self.written_in_place():
                raise
            fault = WindowFault(Fault.INPLACE_WRITE)
        fault = WindowFault.agreed(fault, self.comm, Fault.STATE_NONFINITE)
        if fault is not None:
            raise fault
        self.t = t + 1

    def finish(self, rep: CycleReport, keep: Optional[tuple] = None) -> Readout:
        """The stages of :mod:`.finish` in order (``finish.STAGES``: the state's record, solve (Eq.
        II.102), read out (Eq. II.123), prune to r, price, write back).

        Args:
            rep: this cycle's report (each stage fills its part).
            keep: the :class:`~torch_qode.training.readout_prune.ReadoutKeep` of a dense upload with
                pruning, else ``None``.

        Returns:
            The :class:`~.finish.Readout` (``new``, ``lin``, ``lin1``: full flat vectors).

        Raises:
            WindowFault: a stage failed (on this rank or another); nothing was written back."""
        return _finish.run(self, rep, keep)

    @classmethod
    def open(cls, graph, params: list, support, group: dict, buffers: list, cfg: QODEConfig, comm: Comm,
             rng: np.random.Generator, dissipation, rep: CycleReport, **kw) -> tuple:
        """The upload: :func:`open_window` (same arguments and return value)."""
        return open_window(graph, params, support, group, buffers, cfg, comm, rng, dissipation, rep, **kw)

    def state_dict(self, track_sgd: bool) -> dict:
        """The live window as plain tensors (``QODE.state_dict()['qode']['window']``).

        Args:
            track_sgd: whether to save the SGD shadow too.

        Returns:
            ``t``, θ0, S, ``lr``, ``wd``, the tape, the Carleman state, explicit terms; the shadow (track_sgd)."""
        return window_state_dict(self, track_sgd)


#: the name before the window owned its life (issue 19)
WindowState = Window


# ---------------------------------------------------------------------------------------- functions
def expand(source, params: list, support, lr: float, wd, cfg: QODEConfig) -> TaylorExpansion:
    """The window's Taylor expansion at the current parameters (degree ``cfg.degree`` ≤ N: Carleman
    truncation at order N never reaches higher terms) of ``source``: a loss graph kept for the window
    (products through the retained graph), or a :class:`~.capture.Replay` of the closure that each
    product re-runs (no graph held between products)."""
    with torch.enable_grad():                    # step() runs under no_grad; derivatives need a graph
        if isinstance(source, Replay):
            return TaylorExpansion.from_replay(source, params, source.grad, lr=lr, support=support,
                                               degree=cfg.degree, weight_decay=wd, losses=source.losses,
                                               fused=source.fused)
        return TaylorExpansion.from_loss(source, params, lr=lr, support=support, degree=cfg.degree, weight_decay=wd)


def support_without(params: list, unused: list, support: Optional[torch.Tensor]) -> torch.Tensor:
    """``support`` (``None``: all entries) minus the entries of the parameters ``unused``."""
    keep = torch.ones(sum(p.numel() for p in params), dtype=torch.bool, device=params[0].device)
    ends = np.cumsum([0] + [p.numel() for p in params])
    for i in unused:
        keep[int(ends[i]):int(ends[i + 1])] = False
    return torch.nonzero(keep).reshape(-1) if support is None else support[keep[support]]


def flat_grads(params: list) -> torch.Tensor:
    """The parameters' ``.grad`` as one flat vector (zeros where ``None``)."""
    return _flat.flatten([p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in params])


def reexpand(win: Window, graph: Optional[torch.Tensor], params: list) -> None:
    """A resumed matrix-free window: F1..Fq re-expanded at θ0 from ``graph`` (this step's batch).

    Raises:
        WindowFault: ``Fault.REEXPANSION_FAILED`` (on this rank or another)."""
    why = "KeyError('loss')" if graph is None else None
    exp = None
    if graph is not None:
        try:
            exp = expand(graph, params, win.support, win.lr, win.wd, win.cfg)
        except (UnsupportedGraphError, NonFiniteError) as exc:
            why = repr(exc)
    if win.comm.any(exp is None):                # a failure on one rank ends the window on all
        if exp is not None:
            exp.release()
        raise WindowFault(Fault.REEXPANSION_FAILED, why or "re-expansion failed on another rank")
    win.build(exp)


def start_window(exp: TaylorExpansion, support, theta0: torch.Tensor, grads_flat: torch.Tensor, wd,
                 cfg: QODEConfig, comm: Comm, rng: np.random.Generator, params: list, watched: tuple) -> Window:
    """Build the window's Carleman system and state at θ0 (the model keeps holding θ0 until the end);
    the state class is the configured one (``carleman_state_for``), and it decides the rest."""
    explicit = use_explicit(cfg, exp.n)
    # an explicit window keeps all of F0(0..T-1): the window system is rebuilt at the end
    win = Window(theta0=theta0, support=support, lr=exp.lr, wd=wd, explicit=explicit, tape=NoiseTape(keep=explicit),
                 rng=rng, cfg=cfg, comm=comm, params=params, levels=STATES[carleman_state_for(cfg, explicit)],
                 watched=watched, T=cfg.window_length)
    if cfg.noise == "frozen":   # the upload step's .grad, as "stream" uses each step's (clipping included)
        win.frozen = win.f0_from_grads(grads_flat)
    win.build(exp)
    win.state = win.levels.open(win.system, order=cfg.carleman_order, max_rank=cfg.max_rank, device=theta0.device)
    win.info = {"n": exp.n, "order": cfg.carleman_order, "form": cfg.form,
                "dim": win.levels.lifted_dim(win.system, cfg.carleman_order), "degree": win.ode.degree,
                "explicit": explicit, "noise": cfg.noise, "state": win.levels.kind}
    return win


def open_window(graph: torch.Tensor, params: list, support, group, buffers: list, cfg: QODEConfig,
                comm: Comm, rng: np.random.Generator, dissipation, rep: CycleReport, *, monitor=None,
                k: int = 0, watched: tuple = (), grad_at=None) -> tuple:
    """The upload (DESIGN.md steps 3–5): expand the loss ``graph`` at θ0 on S, run the dissipation
    check (``mode="auto"``, Eq. III.12–III.15), build the window.

    Args:
        graph: the upload loss graph, or a :class:`~.capture.Replay` of the closure.
        params: the parameters (the model holds θ0).
        support: S (indices into the flat vector), or ``None`` for all weights.
        group: the parameter groups (a list; or one group, a dict): one lr, weight decay and momentum
            per group (:func:`window_rates`).
        buffers: the momentum buffers (copied by ``track_sgd``'s shadow).
        cfg: the settings.
        comm: the window's collectives.
        rng: the optimizer's sampler (tomography draws).
        dissipation: the dissipation check (``mode="auto"``).
        rep: this cycle's report.
        monitor: the monitor's ``on_upload``, or ``None``.
        k: the step.
        watched: tensors whose in-place writes invalidate the window's products (the parameters and
            the model's buffers).
        grad_at: the upload batch's gradients at other weights (:func:`~.shadow.grads_at` on the
            closure), for the check's ``"predicted"`` criterion; ``None``: its remainder is not measured.

    Returns:
        ``(Window, "")``, or ``(None, why not)`` (a reason to train classically, not a fault); the
        parameters' ``.grad`` hold ∇L_0(θ0)."""
    groups = [group] if isinstance(group, dict) else list(group)
    lr, wd, why = window_rates(groups, params[0].device)
    if lr is None:
        return None, why
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
    theta0 = _flat.flatten([p.detach() for p in params]).clone()
    verdict = None
    if cfg.mode == "auto":
        probe = upload_probe(exp, grad_at, flat_grads(params), params, theta0, support, lr, wd, comm, cfg.degree)
        verdict = check_dissipation(exp, dissipation, lr, cfg.window_length, comm, params[0].device,
                                    cfg.check_budget, probe, cfg.window == "auto")
        rep.dissipation = verdict.as_dict()
        # its cost against the window it guards: T HVPs at order 1 until the window's own are counted (price)
        rep.dissipation.update(window_hvps=cfg.window_length,
                               cost_ratio=getattr(verdict, "hvps", 0) / cfg.window_length)
        if monitor is not None:
            monitor(k, verdict)
        if not verdict.passed:
            exp.release()
            return None, f"dissipation check {verdict.reason}"
        rep.reason = f"dissipation check {verdict.reason}"
    else:
        rep.reason = "mode='quantum'"
    try:
        win = start_window(exp, support, theta0, flat_grads(params), wd, cfg, comm, rng, params,
                           watched or tuple(params))
    except (ValueError, MemoryError) as exc:   # e.g. terms too large for this support: refuse the window
        exp.release()
        return None, f"Carleman system not built: {exc}"
    if verdict is not None:
        win.verdict = verdict if getattr(verdict, "pending", False) else None
        if getattr(verdict, "T_chosen", None):
            win.T = rep.window = int(verdict.T_chosen)
    rep.carleman = dict(win.info)
    if cfg.track_sgd:
        win.shadow = start_shadow(params, buffers, max(float(g["momentum"]) for g in groups), support, theta0)
    return win, ""


def window_rates(groups: list, device) -> tuple:
    """The window's gradient-descent settings from the parameter groups: ``(lr, wd, "")``, with ``wd`` a
    float when every group has the same weight decay, else per coordinate (float64, the full flat
    vector: F0 gets ``wd_i·θ0_i``, F1 ``−η·wd_i`` on the diagonal); ``(None, None, why)`` when the
    groups' ``lr`` differ (a window runs one step size η over S; e.g. a per-group LR scheduler).

    Args:
        groups: the parameter groups (each with ``params``, ``lr``, ``weight_decay``).
        device: the device of the per-coordinate vector.

    Returns:
        ``(lr, wd, why)``."""
    lrs = [float(g["lr"]) for g in groups]
    if len(set(lrs)) > 1:
        return None, None, (f"the parameter groups' lr differ ({', '.join(f'{v:g}' for v in lrs)}): a quantum "
                            "window runs one step size over S; this window trains classically")
    wds = [float(g["weight_decay"]) for g in groups]
    if len(set(wds)) == 1:
        return lrs[0], wds[0], ""
    return lrs[0], torch.cat([torch.full((p.numel(),), w, dtype=torch.float64, device=device)
                              for g, w in zip(groups, wds) for p in g["params"]]), ""


def check_window_groups(groups: list, mode: str) -> None:
    """Refuse parameter groups a quantum window cannot honour (outside ``mode="classical"``): groups
    whose ``lr`` differ.  Weight decay may differ (applied per coordinate), and so may momentum,
    dampening, nesterov, foreach and fused (they shape the classical steps only: a window has none).

    Args:
        groups: the parameter groups.
        mode: the ``mode`` setting.

    Raises:
        ValueError: the groups' ``lr`` differ and ``mode`` is not ``"classical"``."""
    lrs = [float(g["lr"]) for g in groups]
    if mode != "classical" and len(set(lrs)) > 1:
        raise ValueError(f"QODE(mode={mode!r}): the parameter groups' lr differ ({', '.join(f'{v:g}' for v in lrs)}); "
                         "a quantum window runs gradient descent with one step size η over all of S, so per-group "
                         "lr is honoured in mode='classical' only. Give every group the same lr (weight_decay, "
                         "momentum, dampening and nesterov may differ per group) or use mode='classical'")


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


@contextlib.contextmanager
def flop_count():
    """``{"flops": …}`` filled with the FLOPs of what runs inside, as
    ``torch.utils.flop_counter.FlopCounterMode`` counts them (it only observes: results are unchanged;
    its module and gradient hooks are removed on exit).  Left ``None`` when the body raises."""
    box: dict = {"flops": None}
    from torch.utils.flop_counter import FlopCounterMode   # imports triton where installed: on first use

    counter = FlopCounterMode(display=False)
    with counter:
        yield box
    box["flops"] = int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------- resume
def window_state_dict(win: Window, track_sgd: bool) -> dict:
    """The live window as plain tensors (``QODE.state_dict()['qode']['window']``)."""
    wd = win.wd.clone() if isinstance(win.wd, torch.Tensor) else win.wd    # per coordinate, or a float
    sd = {"t": win.t, "lr": win.lr, "wd": wd, "explicit": win.explicit, "theta0": win.theta0.clone(),
          "support": None if win.support is None else win.support.clone(),
          "frozen": None if win.frozen is None else win.frozen.clone(),
          "tape": {int(t): v.clone() for t, v in win.tape.rows.items()},
          "terms": ([win.ode.terms[k].dense().clone() for k in range(1, win.ode.degree + 1)]
                    if win.explicit else None),
          "closure_flops": win.closure_flops, "products": dict(win.products),
          "f0_path": None if win.f0_path is None else float(win.f0_path), "T": win.T,
          "verdict": None if win.verdict is None else win.verdict.state_dict()}
    st = win.state.state_dict()
    if st.get("kind") == DenseLevels.kind and "v" not in st:
        sd["y"] = st["y"]                    # the format of earlier versions (order 1)
    else:
        sd["carleman_state"] = st
    if track_sgd and win.shadow is not None:
        sd.update(win.shadow.state_dict())
    return sd


def load_window(sd: dict, cfg: QODEConfig, comm: Comm, rng: np.random.Generator, params: list,
                watched: tuple = ()) -> Window:
    """The window saved by :func:`window_state_dict` (on the parameters' device); a matrix-free one
    waits for its expansion (``system`` is ``None`` until ``QODE.restore_expansion`` or the next step
    re-expands).  ``watched``: as for :func:`open_window` (default: the parameters)."""
    device = params[0].device
    tape = NoiseTape(keep=bool(sd["explicit"]))
    tape.rows = {int(t): v.to(device) for t, v in sd["tape"].items()}
    wd = sd["wd"].to(device) if isinstance(sd["wd"], torch.Tensor) else float(sd["wd"])
    win = Window(theta0=sd["theta0"].to(device), lr=float(sd["lr"]), wd=wd, cfg=cfg, comm=comm,
                 params=params, watched=watched or tuple(params),
                 support=None if sd["support"] is None else sd["support"].to(device),
                 explicit=bool(sd["explicit"]), tape=tape, rng=rng, t=int(sd["t"]),
                 frozen=None if sd["frozen"] is None else sd["frozen"].to(device),
                 closure_flops=sd.get("closure_flops"), products=dict(sd.get("products", new_counts())),
                 f0_path=sd.get("f0_path"),          # None (saved before issue 20): the guard checks finiteness only
                 T=int(sd.get("T", cfg.window_length)),
                 verdict=None if sd.get("verdict") is None else Verdict.from_state_dict(sd["verdict"], device))
    if "carleman_state" in sd:
        win.state = state_from_dict(sd["carleman_state"], device=device)
        win.levels = type(win.state)
    else:
        win.state = DenseLevels(sd["y"].to(device), sd["theta0"].numel() if sd["support"] is None
                                else sd["support"].numel())
    if sd["terms"] is not None:
        ode = PolynomialODE([win.f0_source()] + [T.to(device) for T in sd["terms"]], dtype=torch.float64,
                            device=device)        # saved after comm.reduce_hvp: the global batch's terms
        win.system = win.levels.system_for(ode, cfg.carleman_order, cfg.form)
        win.versions = [t._version for t in win.watched]
    if cfg.track_sgd and "shadow" in sd:
        win.shadow = Shadow.load(sd, device)
    return win
