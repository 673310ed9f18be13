"""QODE: train a PyTorch model the way the quantum ODE algorithm would (DESIGN.md, "one cycle").

Step ``k`` sits at position ``c = k mod cycle`` of a cycle (paper's Algorithm 1 and Sec. III B):

* ``c = 0`` — **download**: global magnitude pruning to ``sparsity`` (tomography reads the largest
  components; at the first cycle this prunes the incoming model).
* ``0 ≤ c < classical_steps`` — plain SGD steps on all weights (pruned ones may regrow).
* ``c = classical_steps`` — **upload**: the Taylor expansion of this step's loss at ``θ0`` on the
  support ``S`` (all weights for ``upload="dense"``; for ``"sparse"`` the model is pruned again to
  ``sparsity`` and ``S`` is what survives, so the uploaded state is ``r``-sparse as Theorem I.1
  assumes); in ``mode="auto"`` the Hessian dissipation check (Eq. III.12–III.15) decides between a
  quantum and a classical window.
* **quantum window**, ``T = cycle − classical_steps`` steps: the model holds ``θ0`` (the weights live
  on the "quantum device"); each closure supplies ``F0(t) = −η ∇L_t(θ0)`` (``noise="stream"``); the
  Carleman state advances one step; after the last step the window system (Eq. II.102) is solved
  with ``solver``, the weight vector ``θ0 + u(T)`` on ``S`` is read back by tomography (``shots``;
  the ``r`` largest for a dense upload with ``sparsity > 0``) and written to the model.

Classical steps — every step of ``mode="classical"`` and of a classical window — are bit-identical to
``torch.optim.SGD`` (same ``lr``, ``momentum``, ``dampening``, ``nesterov``, ``weight_decay``).
A quantum window runs plain gradient descent (the paper's Eq. I.3) on ``L + (wd/2)||θ||²``; momentum
applies to classical steps only and its buffers restart after a quantum window.
"""
from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch.optim import Optimizer
from torch.optim.sgd import sgd as _sgd

from ..bridge import flat as _flat
from ..core.carleman import FORMS, carleman, default_max_bytes
from ..bridge.dissipation import DissipationCheck
from ..core.linsolve import METHODS, check_kappa_a, kappa_bound, solve_window
from ..core.ode import NonFiniteError, PolynomialODE, all_finite
from ..bridge.pruning import MagnitudePruner
from ..core.resources import estimate_resources
from ..bridge.taylor import EXPLICIT_BUDGET_BYTES, TaylorExpansion, UnsupportedGraphError
from ..core.tomography import tomography

__all__ = ["QODE", "CycleReport", "MODES", "UPLOADS", "NOISES"]

MODES = ("auto", "quantum", "classical")
UPLOADS = ("dense", "sparse")
NOISES = ("stream", "frozen")
#: ``explicit=None`` builds explicit Taylor terms up to this support size (cheap to build, exact to
#: resume); beyond it the terms are Hessian-vector / third-derivative products (matrix-free).
EXPLICIT_MAX_SUPPORT = 128
#: κ(M) is computed for the report when the window system has at most this many unknowns.
KAPPA_MAX_UNKNOWNS = 5_000


# ------------------------------------------------------------------------------------------ report
@dataclass
class CycleReport:
    """What one cycle did (plain data; ``as_dict()`` for logging).  Never prints by itself."""

    cycle: int
    start_step: int
    mode: str = "pending"            # "quantum" or "classical" once the upload decides ("pending" before)
    reason: str = ""                 # why (dissipation verdict, mode, fault, …)
    window: int = 0                  # T, steps in the window
    download: Optional[dict] = None  # pruning at c = 0: kept, total, sparsity
    support_size: Optional[int] = None
    excluded_params: int = 0         # parameter tensors outside S: no gradient at the upload
    dissipation: Optional[dict] = None
    carleman: Optional[dict] = None
    solver: Optional[dict] = None
    tomography: Optional[dict] = None
    resources: Optional[dict] = None
    drift: Optional[dict] = None     # track_sgd: ||θ_qode − θ_sgd||, relative, losses
    faults: list = field(default_factory=list)
    skipped_steps: int = 0           # steps whose update was skipped for a non-finite loss/gradient
    loss_first: Optional[float] = None   # the closure's loss at the first step of the cycle
    loss_last: Optional[float] = None    # … and at its last step
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------- graph capture
@contextlib.contextmanager
def _capture_backward():
    """Keep the graph of the loss that the closure backwards (``retain_graph=True``).

    QODE needs second and third derivatives of the upload step's loss; a standard closure calls
    ``loss.backward()`` (or ``torch.autograd.backward(loss)``), which would free the graph.  Inside
    this context ``torch.autograd.backward`` — which ``Tensor.backward`` calls — still fills ``.grad``
    exactly as usual but retains the graph and records the loss.  A closure that accumulates
    gradients over several backward calls gets the sum of its losses, whose gradient is exactly what
    ``.grad`` accumulated.  Backward calls made from inside a backward pass are not the closure's
    and pass through untouched.
    """
    captured: dict = {"losses": []}
    original = torch.autograd.backward
    depth = [0]

    def backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False, grad_variables=None,
                 inputs=None):
        if depth[0]:
            return original(tensors, grad_tensors, retain_graph, create_graph, grad_variables, inputs=inputs)
        ts = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
        gs = grad_tensors if grad_tensors is not None else grad_variables
        gs = (None,) * len(ts) if gs is None else ((gs,) if isinstance(gs, torch.Tensor) else tuple(gs))
        for t, g in zip(ts, gs):
            if isinstance(t, torch.Tensor):
                captured["losses"].append(t if g is None else (t * g).sum())
        if captured["losses"]:
            losses = captured["losses"]
            captured["loss"] = losses[0] if len(losses) == 1 else sum(losses)
        depth[0] += 1
        try:
            return original(tensors, grad_tensors, True, create_graph, grad_variables, inputs=inputs)
        finally:
            depth[0] -= 1

    torch.autograd.backward = backward
    try:
        yield captured
    finally:
        torch.autograd.backward = original


class _NoiseTape:
    """``F0(t)`` of the window: recorded step by step (kept whole only when a solver needs it)."""

    def __init__(self, keep: bool):
        self.keep = keep
        self.rows: dict = {}

    def record(self, t: int, f0: torch.Tensor) -> None:
        if not self.keep:
            self.rows.clear()
        self.rows[t] = f0

    def __call__(self, t: int) -> torch.Tensor:
        try:
            return self.rows[t]
        except KeyError:
            raise RuntimeError(f"F0({t}) was not recorded in this window") from None


def _loss_value(loss) -> Optional[float]:
    """The closure's return value as a float when it is one number (a one-element tensor or a real
    number), else ``None``: like ``torch.optim.SGD``, QODE accepts whatever the closure returns."""
    if isinstance(loss, torch.Tensor):
        return float(loss.detach()) if loss.numel() == 1 and not loss.is_complex() else None
    return _flat.as_real(loss)


def _check_int(value, name: str, low: int) -> int:
    v = _flat.as_int(value)
    if v is None or v < low:
        raise ValueError(f"{name} must be an integer ≥ {low}, got {value!r}")
    return v


def _check_sgd_settings(group: dict, where: str = "") -> None:
    """``lr``, ``momentum``, ``weight_decay``, ``dampening`` finite and ≥ 0; ``nesterov`` consistent;
    no ``maximize`` (QODE minimises: the window's ODE is gradient *descent*)."""
    for name in ("lr", "momentum", "weight_decay", "dampening"):
        value = _flat.as_real(group[name])
        if value is None or not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"{where}{name} must be a finite number ≥ 0, got {group[name]!r}")
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError(f"{where}nesterov=True requires momentum > 0 and dampening = 0")
    if group.get("maximize", False):
        raise ValueError(f"{where}maximize=True is not supported: QODE minimises the loss")


def _check_trainable(params) -> None:
    """Every parameter must be trainable (dense, ``requires_grad``): the window expands the loss in all
    of them.  SGD skips frozen ones silently; QODE refuses them with the usual fix."""
    for i, p in enumerate(params):
        if not p.requires_grad:
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) does not require grad: pass only the "
                             "trainable parameters, e.g. QODE([p for p in model.parameters() if "
                             "p.requires_grad], ...)")
        if p.is_sparse:
            raise ValueError(f"params[{i}] is a sparse tensor: QODE needs dense parameters")


def _check_choice(value, name: str, allowed) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------- QODE
class QODE(Optimizer):
    """Sparse training through a simulated quantum ODE solver (see the module docstring).

    Args:
        params: iterable of parameters (one parameter group, like ``torch.optim.LBFGS``).
        lr, momentum, weight_decay, dampening, nesterov: as ``torch.optim.SGD``.
        mode: ``"auto"`` (the dissipation check decides), ``"quantum"`` (always), ``"classical"``.
        cycle: steps per cycle (download every ``cycle`` steps).
        classical_steps: plain SGD steps after each download (``0 ≤ classical_steps < cycle``).
        sparsity: pruning ratio in ``[0, 1)`` at each download (0 disables pruning).
        upload: ``"dense"`` (QRAM: ``S`` = all weights) or ``"sparse"`` (``S`` = the surviving ones);
            either way, parameters the upload closure gives no gradient (``.grad is None``) stay out of
            ``S`` and keep their values, as SGD would leave them that step.
        carleman_order: Carleman truncation order ``N ≥ 1``.
        taylor_degree: degree ``q`` of the Taylor model (terms above degree ``N`` are not computed:
            with ``N = 1`` only ``F0`` and ``F1`` enter the linear system).
        form: ``"discrete"`` (the paper's Sec. V B) or ``"continuous"`` Carleman form.
        solver: ``"forward"``, ``"direct"`` or ``"filtered"`` (Theorem II.4, needs ``kappa_a``).
        kappa_a: effective condition number of the filtered solver.
        shots: tomography shot budget per readout (``None`` = exact readout).
        noise: ``"stream"`` (``F0(t)`` from each step's batch) or ``"frozen"`` (the upload batch's).
        dissipation: a :class:`~torch_qode.dissipation.DissipationCheck` (default: its defaults).
        track_sgd: also run SGD from ``θ0`` on the same batches in every quantum window and report
            the drift ``||θ_qode − θ_sgd||`` (two extra closure calls per window step).
        seed: seeds the tomography sampler and the dissipation check.
        explicit: ``None`` (explicit Taylor terms when ``|S| ≤ 128`` or the solver needs them),
            ``True`` or ``False`` (matrix-free Hessian-vector / third-derivative products).
        prunable: which tensors the download prunes (default: ``p.dim() > 1``); see ``MagnitudePruner``.
        names: parameter names for per-layer pruning reports.
        monitor: an object with ``on_upload(step, verdict)`` / ``on_window_end(step, report)``
            (e.g. :class:`~torch_qode.callbacks.DissipationMonitor`).
        eps: target error used in the resource ledger.
        tomography_kwargs: extra keyword arguments of :func:`~torch_qode.tomography.tomography`
            (``sign_method``, ``split``, ``norm_scale``, …).
        model: the module the parameters belong to (optional).  With it, the closures QODE evaluates
            only to measure (``track_sgd``'s shadows, ``restore_expansion``) run with BatchNorm
            running statistics frozen, so measuring never changes the trained model (they always
            run on a forked global RNG and on fresh ``.grad`` slots).

    Differences from ``torch.optim.SGD`` a user meets: every parameter must require grad (pass
    ``[p for p in model.parameters() if p.requires_grad]``); one parameter group; no ``maximize``;
    sparse gradients train classically only.  The closure may return anything (its value is
    reported when it is one number).  ``copy.deepcopy`` and ``pickle`` keep the whole state.
    """

    def __init__(self, params, lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0, *,
                 dampening: float = 0.0, nesterov: bool = False, mode: str = "auto", cycle: int = 100,
                 classical_steps: int = 10, sparsity: float = 0.9, upload: str = "dense",
                 carleman_order: int = 1, taylor_degree: int = 2, form: str = "discrete",
                 solver: str = "forward", kappa_a: Optional[float] = None, shots: Optional[int] = None,
                 noise: str = "stream", dissipation: Optional[DissipationCheck] = None,
                 track_sgd: bool = False, seed: int = 0, explicit: Optional[bool] = None,
                 prunable=None, names=None, monitor=None, eps: float = 1e-2,
                 tomography_kwargs: Optional[dict] = None, model: Optional[torch.nn.Module] = None):
        _check_sgd_settings(dict(lr=lr, momentum=momentum, weight_decay=weight_decay, dampening=dampening,
                                 nesterov=nesterov))
        lr, momentum, weight_decay, dampening = float(lr), float(momentum), float(weight_decay), float(dampening)
        _check_choice(mode, "mode", MODES)
        cycle = _check_int(cycle, "cycle", 1)
        classical_steps = _check_int(classical_steps, "classical_steps", 0)
        if classical_steps >= cycle:
            raise ValueError(f"classical_steps must be < cycle (leaving a window of ≥ 1 step); got "
                             f"classical_steps={classical_steps}, cycle={cycle}")
        if _flat.as_real(sparsity) is None or not (0 <= _flat.as_real(sparsity) < 1):
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
        sparsity = _flat.as_real(sparsity)
        _check_choice(upload, "upload", UPLOADS)
        carleman_order = _check_int(carleman_order, "carleman_order", 1)
        taylor_degree = _check_int(taylor_degree, "taylor_degree", 1)
        _check_choice(form, "form", FORMS)
        _check_choice(solver, "solver", METHODS)
        check_kappa_a(kappa_a, solver, name="solver")
        if shots is not None:
            shots = _check_int(shots, "shots", 1)
        _check_choice(noise, "noise", NOISES)
        if dissipation is not None and not callable(dissipation):
            raise TypeError("dissipation must be a DissipationCheck (callable hvp, n, lr=, T=) or None")
        if not isinstance(track_sgd, bool):
            raise TypeError(f"track_sgd must be a bool, got {track_sgd!r}")
        seed = _check_int(seed, "seed", 0)
        _check_choice(explicit, "explicit", (None, True, False))
        if _flat.as_real(eps) is None or not (0 < _flat.as_real(eps) < 1):
            raise ValueError(f"eps must be in (0, 1), got {eps!r}")
        eps = _flat.as_real(eps)
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        if tomography_kwargs is not None and not isinstance(tomography_kwargs, dict):
            raise TypeError(f"tomography_kwargs must be a dict or None, got {type(tomography_kwargs).__name__}")
        reserved = {"v", "shots", "seed", "top_r", "eps"} & set(tomography_kwargs or {})
        if reserved:
            raise ValueError(f"tomography_kwargs may not set {sorted(reserved)}: QODE sets them")
        if solver != "forward" and explicit is False:
            raise ValueError(f"solver={solver!r} builds the explicit window matrix: it needs explicit=None or True")

        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=False, foreach=None, fused=None, differentiable=False)
        super().__init__(params, defaults)
        base_keys = set(self.__dict__)
        if len(self.param_groups) != 1:
            raise ValueError("QODE supports a single parameter group (like LBFGS): the window's ODE "
                             "uses one learning rate for all of S")
        _check_sgd_settings(self.param_groups[0], where="the parameter group's ")
        self._params = self.param_groups[0]["params"]
        _check_trainable(self._params)
        self.mode, self.cycle, self.classical_steps = mode, cycle, classical_steps
        self.sparsity, self.upload, self.form = float(sparsity), upload, form
        self.carleman_order, self.taylor_degree = carleman_order, taylor_degree
        self.solver, self.kappa_a, self.shots, self.noise = solver, kappa_a, shots, noise
        self.dissipation = dissipation if dissipation is not None else DissipationCheck(seed=seed)
        self.track_sgd, self.seed, self.explicit, self.monitor, self.eps = track_sgd, seed, explicit, monitor, eps
        self.tomography_kwargs = dict(tomography_kwargs or {})
        self.model = model
        try:   # reject bad shots / tomography options now, not at the first window's end
            tomography(np.array([1.0, 0.5, 0.25, 0.125]), shots, seed=0, eps=eps, **self._readout_options())
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"shots={shots!r} / tomography_kwargs={tomography_kwargs!r} rejected by "
                            f"tomography(): {exc}") from None
        self.window_length = cycle - classical_steps
        self.pruner = MagnitudePruner(self._params, self.sparsity, names=names, prunable=prunable) \
            if self.sparsity > 0 else None
        self._n_total = _flat.numel(self._params)
        n_S = self._n_total
        if upload == "sparse" and self.pruner is not None:
            n_S -= self.pruner.n_pruned_target()
        dim = sum(n_S ** j for j in range(1, carleman_order + 1))
        q = min(taylor_degree, carleman_order)
        terms_bytes = 8 * sum(n_S ** (k + 1) for k in range(1, q + 1))
        if (solver != "forward" or explicit) and terms_bytes > EXPLICIT_BUDGET_BYTES:
            raise ValueError(
                f"solver={solver!r}" + (", explicit=True" if explicit else "") + f" needs explicit Taylor terms "
                f"(and the explicit window matrix); on a support of {n_S:,} weights (upload={upload!r}) they take "
                f"{terms_bytes / 2**20:,.0f} MiB > {EXPLICIT_BUDGET_BYTES / 2**20:.0f} MiB: use solver='forward' "
                f"with matrix-free terms, or a sparser upload")
        if 4 * 8 * dim > default_max_bytes():
            raise ValueError(
                f"carleman_order={carleman_order} on a support of {n_S:,} weights (upload={upload!r}, "
                f"sparsity={sparsity}) needs a Carleman state of Δ={dim:,} numbers "
                f"(~{4 * 8 * dim / 2**30:.3g} GiB with temporaries), more than the memory allows; lower "
                f"carleman_order or use upload='sparse' with a higher sparsity")
        self._rng = np.random.default_rng(seed)
        self.reports: list[CycleReport] = []
        self._k = 0
        self._win: Optional[dict] = None      # the live quantum window (see _start_window)
        self._expansion: Optional[TaylorExpansion] = None
        self._system = None
        self._closure = None
        self._shadow, self._shadow_buf, self._gd = None, None, None
        self._post: list = []                 # window-end measurements, run once the step is complete
        self._own_keys = tuple(k for k in self.__dict__ if k not in base_keys)

    def add_param_group(self, param_group: dict) -> None:
        """QODE trains a single parameter group (see the class docstring): a second one is refused."""
        if getattr(self, "param_groups", None):
            raise ValueError("QODE supports a single parameter group (like LBFGS): add_param_group "
                             "cannot add a second one; build the optimizer over all the parameters")
        super().add_param_group(param_group)

    # ------------------------------------------------------------------------------ utilities
    def _readout_options(self) -> dict:
        return {"norm": None if self.shots else "exact", **self.tomography_kwargs}

    def _measuring(self):
        """Context for closures evaluated only to measure: the global RNG (dropout, random augmentation)
        is forked, so training draws exactly the numbers it would without them, and with ``model=``
        the BatchNorm running statistics are frozen."""
        stack = contextlib.ExitStack()
        stack.enter_context(_flat.forked_rng(self._params))
        if self.model is not None:
            stack.enter_context(_flat.batch_stats_no_update(self.model))
        return stack

    @property
    def step_count(self) -> int:
        """Steps taken so far (``k``)."""
        return self._k

    @property
    def in_quantum_window(self) -> bool:
        return self._win is not None

    def _flat_params(self) -> torch.Tensor:
        return _flat.flatten([p.detach() for p in self._params])

    @torch.no_grad()
    def _write_params(self, flat: torch.Tensor) -> None:
        for p, v in zip(self._params, _flat.unflatten(flat, self._params)):
            p.copy_(v)

    @contextlib.contextmanager
    def _holding(self, tensors):
        """Let the model hold ``tensors`` for a moment without an in-place write.

        During a window the upload batch's autograd graph holds the parameters; writing them in place
        would bump their version counters and invalidate every later Hessian-vector product.  Swapping
        ``.data`` leaves the version counters alone, and the original storage comes back afterwards.
        """
        saved = [p.data for p in self._params]
        for p, t in zip(self._params, tensors):
            p.data = t if t.dtype == p.dtype and t.device == p.device else t.to(p)
        try:
            yield
        finally:
            for p, d in zip(self._params, saved):
                p.data = d

    def _flat_grads(self) -> torch.Tensor:
        return _flat.flatten([p.grad.detach() if p.grad is not None else torch.zeros_like(p)
                              for p in self._params])

    def _finite(self, loss) -> bool:
        """Loss and every gradient finite (one reduction per tensor, one host sync)."""
        if not isinstance(loss, torch.Tensor):
            value = _loss_value(loss)
            if value is not None and not math.isfinite(value):
                return False
        parts = [p.grad.detach().sum() for p in self._params if p.grad is not None]
        if isinstance(loss, torch.Tensor):
            parts.append(loss.detach().sum())
        if not parts or bool(torch.isfinite(torch.stack([q.to(torch.float64) for q in parts]).sum())):
            return True
        return all(all_finite(q) for q in [p.grad for p in self._params if p.grad is not None]
                   + ([loss.detach()] if isinstance(loss, torch.Tensor) else []))

    def _sgd(self, params: list, grads: list, buffers: list) -> list:
        """One ``torch.optim.SGD`` update through the same functional call (hence bit-identical).

        Entries with a ``None`` gradient are skipped, as SGD does; returns the new momentum buffers.
        """
        group = self.param_groups[0]
        idx = [i for i, g in enumerate(grads) if g is not None]
        bufs = [buffers[i] for i in idx]
        _sgd([params[i] for i in idx], [grads[i] for i in idx], bufs, weight_decay=group["weight_decay"],
             momentum=group["momentum"], lr=group["lr"], dampening=group["dampening"],
             nesterov=group["nesterov"], maximize=False, has_sparse_grad=False, foreach=group["foreach"],
             fused=group["fused"])
        out = list(buffers)
        for j, i in enumerate(idx):
            out[i] = bufs[j]
        return out

    def _sgd_update(self) -> None:
        """An SGD step of the model's parameters with the gradients the closure left in ``.grad``."""
        bufs = self._sgd(self._params, [p.grad for p in self._params],
                         [self.state[p].get("momentum_buffer") for p in self._params])
        if self.param_groups[0]["momentum"] != 0:
            for p, b in zip(self._params, bufs):
                if p.grad is not None:
                    self.state[p]["momentum_buffer"] = b

    def _report(self) -> CycleReport:
        return self.reports[-1]

    def _fault(self, message: str) -> None:
        self._report().faults.append(f"step {self._k}: {message}")

    # ----------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]):  # type: ignore[override]
        """One training step; ``closure`` re-evaluates the loss and calls ``backward()`` (as for LBFGS)."""
        if closure is None or not callable(closure):
            raise TypeError("QODE.step needs a closure that re-evaluates the loss and calls loss.backward() "
                            "(as torch.optim.LBFGS does): the quantum window re-evaluates gradients at θ0")
        c = self._k % self.cycle
        if c == 0:
            self._download()
        t0 = time.perf_counter()
        self._closure = closure
        try:
            if c < self.classical_steps:
                loss = self._classical_step(closure)
            elif c == self.classical_steps:
                loss = self._upload(closure)
            elif self._win is not None:
                loss = self._window_step(closure)
            else:
                loss = self._classical_step(closure)
        finally:
            self._closure = None
        rep = self._report()
        if c in (0, self.cycle - 1):   # two host syncs per cycle, not one per step
            value = _loss_value(loss)
            if c == 0:
                rep.loss_first = value
            if c == self.cycle - 1:
                rep.loss_last = value
        self._k += 1
        post, self._post = self._post, []
        try:       # the step is complete: an exception from a measurement leaves a consistent optimizer
            for action in post:
                action()
        finally:
            rep.seconds += time.perf_counter() - t0
        return loss

    def _download(self) -> None:
        """c = 0: prune (the tomographic download) and open the cycle's report (once: a step retried
        after its closure raised does not open a second one)."""
        if self.reports and self.reports[-1].start_step == self._k:
            return
        rep = CycleReport(cycle=self._k // self.cycle, start_step=self._k, window=self.window_length)
        self.reports.append(rep)
        if self.pruner is not None:
            self.pruner.prune()
            r = self.pruner.report()
            rep.download = {"kept": int(self.pruner.support().numel()), "total": int(r.n_total),
                            "sparsity": float(r.mask_sparsity), "total_sparsity": float(r.total_sparsity),
                            "layers": {x.name: x.pruned / x.numel for x in r.layers if x.prunable and x.numel}}

    def _classical_step(self, closure) -> torch.Tensor:
        with torch.enable_grad():
            loss = closure()
        if not self._finite(loss):
            self._report().skipped_steps += 1
            self._fault("non-finite loss or gradient: update skipped")
            return loss
        self._sgd_update()
        return loss

    # --------------------------------------------------------------------------------- upload
    def _upload(self, closure) -> torch.Tensor:
        rep = self._report()
        if self.mode == "classical":
            rep.mode, rep.reason = "classical", "mode='classical'"
            return self._classical_step(closure)
        support = None
        if self.upload == "sparse" and self.pruner is not None:
            self.pruner.prune()                      # the uploaded state must be r-sparse
            support = self.pruner.support()
        with torch.enable_grad(), _capture_backward() as cap:
            loss = closure()
        if not self._finite(loss):
            self._fault("non-finite loss or gradient at upload: update skipped")
            return self._go_classical(closure, "non-finite loss or gradient at upload", loss, update=False)
        _check_trainable(self._params)             # requires_grad may have been switched off since
        sparse = [i for i, p in enumerate(self._params) if p.grad is not None and p.grad.is_sparse]
        if sparse:
            raise RuntimeError(f"QODE: params[{sparse[0]}] has a sparse gradient (e.g. nn.Embedding(sparse=True)); "
                               "the quantum window expands the loss densely: use sparse=False, or mode='classical'")
        graph = cap.get("loss")
        if graph is None:
            raise RuntimeError("QODE: the closure did not call loss.backward() or torch.autograd.backward(loss); "
                               "the upload step needs the loss graph for the Taylor expansion (a backward "
                               "imported by name, `from torch.autograd import backward`, is not seen)")
        unused = [i for i, p in enumerate(self._params) if p.grad is None]
        if unused:                                   # SGD leaves them alone this step; so does the window
            support = self._without(unused, support)
            rep.excluded_params = len(unused)
            if support.numel() == 0:
                del graph, cap
                return self._go_classical(closure, "no parameter received a gradient at upload", loss,
                                          update=True)
        group = self.param_groups[0]
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        if lr <= 0:
            del graph, cap
            return self._go_classical(closure, f"lr = {lr:g} (e.g. a scheduler reached 0): gradient descent "
                                      "does not move, there is nothing to linearise", loss, update=True)
        try:
            exp = self._expand(graph, support, lr, wd)
        except (UnsupportedGraphError, NonFiniteError) as exc:
            del graph, cap
            return self._go_classical(closure, f"Taylor expansion failed: {exc}", loss, update=True)
        del graph, cap
        n = exp.n
        rep.support_size = n
        if self.mode == "auto":
            # the Lanczos basis holds steps·n numbers: float64 unless that passes 1 GiB (then float32)
            steps = getattr(self.dissipation, "steps", 64)
            dtype = torch.float64 if 8 * steps * n <= 2**30 else torch.float32
            with torch.enable_grad():
                verdict = self.dissipation(exp.hvp, n, lr=lr, T=self.window_length, dtype=dtype,
                                           device=self._params[0].device)
            rep.dissipation = verdict.as_dict()
            if self.monitor is not None and hasattr(self.monitor, "on_upload"):
                self.monitor.on_upload(self._k, verdict)
            if not verdict.passed:
                exp.release()
                return self._go_classical(closure, f"dissipation check {verdict.reason}", loss,
                                          update=True)
            rep.reason = f"dissipation check {verdict.reason}"
        else:
            rep.reason = "mode='quantum'"
        try:
            self._start_window(exp, support)
        except (ValueError, MemoryError) as exc:   # e.g. terms too large for this support: refuse the window
            self._release()
            exp.release()
            return self._go_classical(closure, f"Carleman system not built: {exc}", loss, update=True)
        rep.mode = "quantum"
        self._advance(self._flat_grads())
        return loss

    def _without(self, unused: list, support: Optional[torch.Tensor]) -> torch.Tensor:
        """``support`` (``None``: all entries) minus the entries of the parameters ``unused``."""
        keep = torch.ones(self._n_total, dtype=torch.bool, device=self._params[0].device)
        ends = np.cumsum([0] + [p.numel() for p in self._params])
        for i in unused:
            keep[int(ends[i]):int(ends[i + 1])] = False
        if support is None:
            return torch.nonzero(keep).reshape(-1)
        return support[keep[support]]

    def _go_classical(self, closure, reason: str, loss, update: bool) -> torch.Tensor:
        rep = self._report()
        rep.mode, rep.reason = "classical", reason
        if update and self._finite(loss):
            self._sgd_update()
        else:
            rep.skipped_steps += 1
        return loss

    # ---------------------------------------------------------------------------------- window
    def _use_explicit(self, n: int) -> bool:
        if self.explicit is not None:
            return self.explicit
        return self.solver != "forward" or n <= EXPLICIT_MAX_SUPPORT

    def _start_window(self, exp: TaylorExpansion, support) -> None:
        """Build the window's Carleman system at θ0 (the model keeps holding θ0 until the end)."""
        theta0 = self._flat_params().clone()
        explicit = self._use_explicit(exp.n)
        self._win = {   # an explicit window keeps all of F0(0..T-1): the window system is rebuilt at the end
            "t": 0, "lr": exp.lr, "wd": float(self.param_groups[0]["weight_decay"]), "theta0": theta0,
            "support": support, "tape": _NoiseTape(keep=explicit),
            "frozen": None,
            "explicit": explicit,
        }
        if self.noise == "frozen":   # the upload step's .grad, as "stream" uses each step's (clipping included)
            self._win["frozen"] = self._f0_from_grads(self._flat_grads())
        self._build_system(exp)
        self._win["y"] = torch.zeros(self._system.dim, dtype=torch.float64, device=theta0.device)
        rep = self._report()
        rep.carleman = {"n": exp.n, "order": self.carleman_order, "form": self.form, "dim": self._system.dim,
                        "degree": self._system.degree, "explicit": self._win["explicit"], "noise": self.noise}
        if self.track_sgd:
            self._shadow = [p.detach().clone() for p in self._params]
            self._shadow_buf = [self.state[p]["momentum_buffer"].clone() if "momentum_buffer" in self.state[p]
                                else None for p in self._params]
            # the window's own dynamics without linearisation (plain GD on S); the SGD shadow is the same
            # thing unless momentum is on or the upload is sparse
            same = self.param_groups[0]["momentum"] == 0 and support is None
            self._gd = None if same else theta0.clone()

    def _f0_source(self):
        w = self._win
        frozen = w["frozen"]
        return (lambda t: frozen) if frozen is not None else w["tape"]

    def _build_system(self, exp: TaylorExpansion) -> None:
        """The window's ODE (Taylor terms of ``exp``, F0 from the tape) and its Carleman system."""
        ode = exp.ode(F0=self._f0_source(), explicit=self._win["explicit"], dtype=torch.float64)
        self._expansion = exp
        self._system = carleman(ode, self.carleman_order, self.form)

    def _f0_from_grads(self, grads_flat: torch.Tensor) -> torch.Tensor:
        """``F0(t) = −η (∇L_t(θ0) + wd·θ0)`` on S, in float64."""
        w = self._win
        S = w["support"]
        f0 = (grads_flat if S is None else grads_flat[S]).to(torch.float64, copy=True)
        if w["wd"]:
            th = w["theta0"] if S is None else w["theta0"][S]
            f0.add_(th.to(torch.float64), alpha=w["wd"])
        return f0.mul_(-w["lr"])

    def _advance(self, grads_flat: torch.Tensor) -> None:
        """Window step t: record F0(t), advance the Carleman state, shadow SGD; finish at t = T."""
        w = self._win
        t = w["t"]
        # the shadows' closure calls come first: if one raises, the window is exactly as before the step
        shadow = self._shadow_grads(t == 0) if self.track_sgd else None
        if w["frozen"] is None:
            w["tape"].record(t, self._f0_from_grads(grads_flat))
        try:
            with torch.enable_grad():
                w["y"] = self._system.step(w["y"], t)
        except NonFiniteError as exc:
            self._abort_window(f"{exc}")
            return
        except RuntimeError as exc:
            if "inplace operation" in str(exc):
                raise RuntimeError(
                    "QODE: the parameters or buffers (e.g. BatchNorm running statistics) were modified in "
                    "place during a quantum window (model.load_state_dict, an EMA, a manual write), which "
                    "invalidates the upload batch's Hessian-vector products; load model weights together "
                    "with QODE.load_state_dict, or between windows (QODE.in_quantum_window is False)") from exc
            raise
        if shadow is not None:
            self._shadow_update(*shadow)
        w["t"] = t + 1
        if w["t"] == self.window_length:
            self._finish_window()

    @torch.no_grad()
    def restore_expansion(self, closure: Callable[[], torch.Tensor]) -> None:
        """Rebuild a resumed matrix-free window's Taylor terms exactly, from the upload batch.

        A matrix-free window's F1..Fq live in the upload batch's autograd graph, which no state_dict
        can hold.  After :meth:`load_state_dict` inside such a window, call this with a closure over
        *the upload step's batch* (the model holds θ0 throughout the window): the expansion is rebuilt
        from it and training continues bit-for-bit as if never interrupted (pass ``model=`` to QODE so
        this extra forward leaves BatchNorm running statistics alone).  Without it, the next step
        re-expands on its own batch and the report says so.
        """
        if closure is None or not callable(closure):
            raise TypeError("restore_expansion needs a closure over the upload step's batch")
        if self._win is None or self._system is not None:
            raise RuntimeError("restore_expansion: no resumed matrix-free window is waiting for its Taylor terms")
        w = self._win
        with self._own_grads(), torch.enable_grad(), self._measuring(), _capture_backward() as cap:
            closure()
        if "loss" not in cap:
            raise RuntimeError("restore_expansion: the closure did not call loss.backward()")
        self._build_system(self._expand(cap["loss"], w["support"], w["lr"], w["wd"]))

    def _expand(self, loss: torch.Tensor, support, lr: float, wd: float) -> TaylorExpansion:
        """The window's Taylor expansion of ``loss`` at the current parameters (degree ≤ N: Carleman
        truncation at order N never reaches higher terms)."""
        with torch.enable_grad():                    # step() runs under no_grad; derivatives need a graph
            return TaylorExpansion.from_loss(loss, self._params, lr=lr, support=support,
                                             degree=min(self.taylor_degree, self.carleman_order), weight_decay=wd)

    def _window_step(self, closure) -> torch.Tensor:
        resumed = self._system is None            # a matrix-free window restored by load_state_dict
        with torch.enable_grad(), (_capture_backward() if resumed else contextlib.nullcontext({})) as cap:
            loss = closure()                      # the model holds θ0: ∇L_t(θ0)
        if not self._finite(loss):
            self._report().skipped_steps += 1
            self._abort_window("non-finite loss or gradient inside the quantum window")
            return loss
        if resumed:
            w = self._win
            try:
                exp = self._expand(cap["loss"], w["support"], w["lr"], w["wd"])
            except (KeyError, UnsupportedGraphError, NonFiniteError) as exc:
                self._abort_window(f"re-expansion after resume failed: {exc!r}")
                return loss
            self._build_system(exp)
            self._report().faults.append(
                f"step {self._k}: resumed a matrix-free window: F1..Fq re-expanded at θ0 on this step's "
                "batch (the upload batch's autograd graph cannot be saved)")
        self._advance(self._flat_grads())
        return loss

    @contextlib.contextmanager
    def _own_grads(self):
        """Run a measuring closure on fresh ``.grad`` slots: gradients accumulated outside the closure
        neither leak into it nor get overwritten (``zero_grad(set_to_none=False)`` would otherwise
        zero and refill the model's own gradient tensors in place)."""
        saved = [p.grad for p in self._params]
        for p in self._params:
            p.grad = None
        try:
            yield
        finally:
            for p, g in zip(self._params, saved):
                p.grad = g

    def _grads_at(self, tensors) -> list:
        """``∇L_t`` at other weights on this step's batch, without touching the model (track_sgd)."""
        with self._own_grads():
            with self._holding(tensors), torch.enable_grad(), self._measuring():
                self._closure()
            return [None if p.grad is None else p.grad.detach() for p in self._params]

    def _shadow_grads(self, first: bool):
        """track_sgd: this step's gradients at both shadows (closure calls only, nothing changes).

        SGD shadow: ``torch.optim.SGD`` itself (momentum, all weights, the group's current lr).
        GD shadow: the window's exact dynamics, plain gradient descent on S at the window's lr; while
        the two coincide (no momentum, dense upload, lr unchanged) the SGD shadow stands for both.
        At ``t = 0`` both sit at θ0, where the closure just left the gradients in ``.grad``.
        """
        if first:
            grads = [None if p.grad is None else p.grad.detach().clone() for p in self._params]
        else:
            grads = self._grads_at(self._shadow)
        g_gd = grads if self._gd is None or first else \
            self._grads_at(_flat.unflatten(self._gd, self._params))
        return grads, _flat.flatten([torch.zeros_like(p) if g is None else g for p, g in zip(self._params, g_gd)])

    def _shadow_update(self, grads: list, g_gd: torch.Tensor) -> None:
        """Advance both shadows one step with the gradients of :meth:`_shadow_grads`."""
        w = self._win
        if self._gd is None and float(self.param_groups[0]["lr"]) != w["lr"]:
            self._gd = _flat.flatten(self._shadow).clone()   # a scheduler moved lr: the two part here
        self._shadow_buf = self._sgd(self._shadow, grads, self._shadow_buf)
        if self._gd is not None:
            S = slice(None) if w["support"] is None else w["support"]
            step = g_gd[S] + w["wd"] * self._gd[S] if w["wd"] else g_gd[S]
            self._gd[S] = self._gd[S] - w["lr"] * step

    def _abort_window(self, why: str) -> None:
        """A fault ends the window: θ0 back in the model, the rest of the window trains classically."""
        w = self._win
        self._write_params(w["theta0"])
        self._release()
        rep = self._report()
        rep.mode = "classical"
        rep.reason = f"quantum window aborted at t={w['t']}: {why}; parameters restored to θ0"
        self._fault(why)

    def _release(self) -> None:
        if self._expansion is not None:
            self._expansion.release()
        self._expansion, self._system, self._win = None, None, None
        self._shadow, self._shadow_buf, self._gd = None, None, None

    @torch.enable_grad()
    def _finish_window(self) -> None:
        """Solve (Eq. II.102), read θ0 + u(T) on S back by tomography, write it to the model."""
        w, sys_, T = self._win, self._system, self.window_length
        rep = self._report()
        n = sys_.n
        u_forward = w["y"][:n]
        sol = None
        solver_info = {"method": self.solver, "kappa": None, "kappa_bound": kappa_bound(T), "fidelity": 1.0}
        try:
            if self.solver != "forward" or (w["explicit"] and (T + 1) * sys_.dim <= KAPPA_MAX_UNKNOWNS):
                sol = solve_window(sys_, torch.zeros(n, dtype=torch.float64), T, method=self.solver,
                                   kappa_a=self.kappa_a if self.solver == "filtered" else None)
                solver_info.update(sol.as_dict())
                solver_info["kappa_bound"] = kappa_bound(T)
                u_T = torch.as_tensor(sol.final).to(u_forward)
                solver_info["max_abs_diff_vs_forward"] = float((u_T - u_forward).abs().max())
                if self.solver == "forward":
                    u_T = u_forward
            else:
                u_T = u_forward
        except (ValueError, MemoryError) as exc:
            self._abort_window(f"window solve failed: {exc}")
            return
        rep.solver = solver_info
        S = w["support"]
        theta0_S = (w["theta0"] if S is None else w["theta0"][S]).to(torch.float64)
        target = theta0_S + u_T
        if not all_finite(target):
            self._abort_window("the solved weights are not finite")
            return
        if not bool(target.any()):
            self._abort_window("the solved weight vector is zero: nothing to read out")
            return
        try:
            res = tomography(target, self.shots, seed=self._rng, eps=self.eps, **self._readout_options())
        except (ValueError, TypeError) as exc:
            self._abort_window(f"tomography failed: {exc}")
            return
        rep.tomography = res.as_dict(arrays=False)
        estimate = torch.as_tensor(res.estimate).to(device=target.device, dtype=torch.float64)
        if not bool(estimate.any()):
            self._abort_window(f"tomography read out a zero vector (shots={self.shots}: no norm-stage shot "
                               "succeeded), which would erase the model")
            return
        r = self._readout_prune(estimate, rep)
        new = self._embed(estimate)
        try:
            rep.resources = estimate_resources(sys_, T, kappa_a=self.kappa_a, eps=self.eps,
                                               r=r if r is not None else n, solution=sol).as_dict()
        except (ValueError, TypeError, MemoryError) as exc:  # the ledger must never stop training
            rep.resources = {"error": str(exc)}
        self._write_params(new)
        # measurements that run user code (closures, the monitor) wait until the step is complete
        if self.track_sgd:
            theta_s = _flat.flatten(self._shadow).clone()
            snapshot = {"theta0": w["theta0"], "theta_s": theta_s,
                        "theta_gd": theta_s if self._gd is None else self._gd}
            self._post.append(functools.partial(self._record_drift, rep, new, self._embed(target), snapshot,
                                                self._closure))
        if self.monitor is not None and hasattr(self.monitor, "on_window_end"):
            self._post.append(functools.partial(self.monitor.on_window_end, self._k, rep))
        for p in self._params:                   # momentum restarts after a quantum window
            self.state[p].pop("momentum_buffer", None)
        self._release()

    def _readout_prune(self, estimate: torch.Tensor, rep: CycleReport) -> Optional[int]:
        """Dense upload with ``sparsity > 0``: keep the largest read-out weights, exactly as many as the
        download keeps, among the *prunable* entries (the paper's "tomography reads the r largest
        components"); biases and norm scales, never pruned, are read as they are.  In place; returns
        r, the components read out (``None`` when nothing is pruned)."""
        if self.upload != "dense" or self.pruner is None:
            return None
        flags = torch.cat([torch.full((p.numel(),), f, dtype=torch.bool, device=estimate.device)
                           for p, f in zip(self._params, self.pruner.prunable)])
        keep = self.pruner.n_prunable - self.pruner.n_pruned_target()
        S = self._win["support"]
        if S is not None:   # weights outside S keep θ0: count their non-zeros against r
            outside = flags.clone()
            outside[S] = False
            keep = max(0, keep - int(torch.count_nonzero(self._win["theta0"][outside])))
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

    def _embed(self, values_S: torch.Tensor) -> torch.Tensor:
        """The full flat parameter vector: θ0 with its support entries replaced by ``values_S``."""
        w = self._win
        full = w["theta0"].clone()
        if w["support"] is None:
            full.copy_(values_S.to(full.dtype))
        else:
            full[w["support"]] = values_S.to(full.dtype)
        return full

    def _record_drift(self, rep: CycleReport, theta_q: torch.Tensor, theta_lin: torch.Tensor, snapshot: dict,
                      closure: Optional[Callable]) -> None:
        """track_sgd: how far the window landed from SGD on the same batches, and why.

        * ``l2`` / ``relative``: ``||θ_qode − θ_sgd||`` against ``torch.optim.SGD`` run from θ0 on the same
          batches (momentum, all weights), relative to ``||θ_sgd − θ0||``.
        * ``linearization`` / ``linearization_relative``: ``||θ_lin − θ_gd||`` between the exact Carleman
          solution ``θ_lin = θ0 + u(T)`` and the window's own dynamics run without linearisation (plain
          gradient descent on S at the window's lr, ``θ_gd``), relative to ``||θ_gd − θ0||``: the error
          of the Taylor/Carleman model alone.
        * ``readout``: ``||θ_qode − θ_lin||`` — tomography noise, never-observed components, top-r pruning.
        """
        theta0, theta_s, theta_gd = snapshot["theta0"], snapshot["theta_s"], snapshot["theta_gd"]
        moved, moved_gd = float((theta_s - theta0).norm()), float((theta_gd - theta0).norm())

        def rel(d: float, m: float) -> float:
            if not (math.isfinite(d) and math.isfinite(m)):
                return float("nan")
            return d / m if m > 0 else (float("inf") if d > 0 else 0.0)

        d, d_lin = float((theta_q - theta_s).norm()), float((theta_lin - theta_gd).norm())
        info = {"l2": d, "relative": rel(d, moved), "linearization": d_lin,
                "linearization_relative": rel(d_lin, moved_gd), "readout": float((theta_q - theta_lin).norm()),
                "sgd_displacement": moved, "gd_displacement": moved_gd, "loss_qode": None, "loss_sgd": None}
        rep.drift = info                         # the distances stand even if a loss evaluation raises
        if closure is not None:
            for name, theta in (("loss_sgd", theta_s), ("loss_qode", theta_q)):
                with self._own_grads(), self._holding(_flat.unflatten(theta, self._params)), \
                        torch.enable_grad(), self._measuring():
                    info[name] = _loss_value(closure())

    # ----------------------------------------------------------------------------- state dict
    def _config(self) -> dict:
        """The settings a saved state depends on (checked by :meth:`load_state_dict`)."""
        return {"mode": self.mode, "cycle": self.cycle, "classical_steps": self.classical_steps,
                "sparsity": self.sparsity, "upload": self.upload, "carleman_order": self.carleman_order,
                "taylor_degree": self.taylor_degree, "form": self.form, "solver": self.solver,
                "noise": self.noise, "track_sgd": self.track_sgd, "explicit": self.explicit,
                "shots": self.shots, "eps": self.eps, "kappa_a": self.kappa_a, "seed": self.seed,
                "tomography_kwargs": dict(self.tomography_kwargs), "n_params": self._n_total}

    def state_dict(self) -> dict:
        """Everything needed to resume bit-for-bit, also inside a window (see ``load_state_dict``)."""
        sd = super().state_dict()
        q: dict = {"k": self._k, "rng": self._rng.bit_generator.state, "config": self._config(),
                   "reports": [r.as_dict() for r in self.reports],
                   "pruner": self.pruner.state_dict() if self.pruner is not None else None, "window": None}
        q["window"] = self._window_state()
        sd["qode"] = q
        return sd

    def _window_state(self) -> Optional[dict]:
        """The live window as plain tensors (``None`` between windows)."""
        if self._win is not None:
            w = self._win
            win = {k: w[k] for k in ("t", "lr", "wd", "explicit")}
            win["theta0"] = w["theta0"].clone()
            win["support"] = None if w["support"] is None else w["support"].clone()
            win["y"] = w["y"].clone()
            win["frozen"] = None if w["frozen"] is None else w["frozen"].clone()
            win["tape"] = {int(t): v.clone() for t, v in w["tape"].rows.items()}
            win["terms"] = ([self._system.ode.terms[k].dense().clone() for k in range(1, self._system.degree + 1)]
                            if w["explicit"] else None)
            if self.track_sgd:
                win["shadow"] = [s.clone() for s in self._shadow]
                win["shadow_buf"] = [None if b is None else b.clone() for b in self._shadow_buf]
                win["gd"] = None if self._gd is None else self._gd.clone()
            return win
        return None

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a ``state_dict``.  Inside a window with explicit Taylor terms the resume is exact.

        A matrix-free window cannot be serialised (its Hessian-vector products live in the upload
        batch's autograd graph): call :meth:`restore_expansion` with a closure over the upload batch
        to continue exactly; otherwise the next step re-expands at θ0 on *its* batch and the report
        notes it.
        """
        state_dict = dict(state_dict)
        q = state_dict.pop("qode", None)
        if q is None:
            raise ValueError("state_dict: not a QODE state_dict (missing the 'qode' entry)")
        saved = q.get("config") or {}
        mismatch = {k: (v, saved.get(k)) for k, v in self._config().items() if saved.get(k) != v}
        if mismatch:
            raise ValueError("state_dict was saved by a QODE with other settings: " + ", ".join(
                f"{k}={old!r} there vs {new!r} here" for k, (new, old) in mismatch.items()))
        super().load_state_dict(state_dict)
        self._release()
        self._k = int(q["k"])
        self._rng = np.random.default_rng()
        self._rng.bit_generator.state = q["rng"]
        self.reports = [CycleReport(**r) for r in q["reports"]]
        if self.pruner is not None and q["pruner"] is not None:
            self.pruner.load_state_dict(q["pruner"])
        self._load_window(q["window"])

    def _load_window(self, win: Optional[dict]) -> None:
        if win is None:
            return
        device = self._params[0].device
        tape = _NoiseTape(keep=bool(win["explicit"]))
        tape.rows = {int(t): v.to(device) for t, v in win["tape"].items()}
        frozen = None if win["frozen"] is None else win["frozen"].to(device)
        self._win = {"t": int(win["t"]), "lr": float(win["lr"]), "wd": float(win["wd"]),
                     "theta0": win["theta0"].to(device),
                     "support": None if win["support"] is None else win["support"].to(device),
                     "y": win["y"].to(device), "tape": tape, "frozen": frozen, "explicit": bool(win["explicit"])}
        if win["terms"] is not None:
            ode = PolynomialODE([self._f0_source()] + [T.to(device) for T in win["terms"]],
                                dtype=torch.float64, device=device)
            self._system = carleman(ode, self.carleman_order, self.form)
        else:
            self._system = None                   # rebuilt by the next step's closure (see docstring)
        if self.track_sgd and "shadow" in win:
            self._shadow = [s.to(device) for s in win["shadow"]]
            self._shadow_buf = [None if b is None else b.to(device) for b in win["shadow_buf"]]
            self._gd = None if win["gd"] is None else win["gd"].to(device)

    # ------------------------------------------------------------------------------ copy / pickle
    def __getstate__(self) -> dict:
        """``copy.deepcopy`` and ``pickle`` keep the whole optimizer.  A live window travels as in
        :meth:`state_dict`: exact with explicit Taylor terms; a matrix-free one needs
        :meth:`restore_expansion` on the copy (its terms live in an autograd graph)."""
        state = super().__getstate__()               # defaults, state, param_groups (no hooks, as torch.optim)
        state.update({k: self.__dict__[k] for k in self._own_keys})   # not what others attached (an
        state["_own_keys"] = self._own_keys                            # LR scheduler's step wrapper)
        state["_win_saved"] = self._window_state()
        for key in ("_win", "_expansion", "_system", "_closure", "_shadow", "_shadow_buf", "_gd"):
            state[key] = None
        state["_post"] = []
        return state

    def __setstate__(self, state: dict) -> None:
        win = state.pop("_win_saved", None)
        super().__setstate__(state)
        self._load_window(win)
