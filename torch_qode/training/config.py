"""QODE's settings: checked once (clear messages naming the argument), then plain data."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from .._checks import as_real, check_bool, check_choice, check_int, check_optional_int, check_real
from ..bridge.taylor import EXPLICIT_BUDGET_BYTES
from ..core.carleman import FORMS, default_max_bytes
from ..core.solvers import SOLVERS, WindowSolver, make_solver
from ..core.readout_model import expected_relative_error, shots_for_error
from ..core.tomography import DEFAULT_SIGN_METHOD, tomography

__all__ = ["QODEConfig", "make_config", "check_sgd_settings", "check_trainable", "MODES", "UPLOADS", "NOISES",
           "CARLEMAN_STATES", "EXPLICIT_MAX_SUPPORT", "use_explicit", "carleman_state_for", "HVPS", "choose_hvp",
           "RETAIN_BUDGET_BYTES_CPU", "RETAIN_GRAPH_FACTOR", "READOUT_WARN_ERROR", "readout_warning"]

MODES = ("auto", "quantum", "classical")
UPLOADS = ("dense", "sparse")
NOISES = ("stream", "frozen")
#: how a window holds its Carleman state (core/state.py): "auto" picks per window
CARLEMAN_STATES = ("auto", "factored", "dense")
#: how a matrix-free window takes its Hessian-vector products: "retain" the upload batch's graph for
#: the whole window, "recompute" it by replaying the upload closure per product, "auto" by memory
HVPS = ("auto", "retain", "recompute")

#: ``hvp="auto"`` off a GPU retains the upload graph when its estimate fits this many bytes
#: (assign to change it; on a GPU the budget is the device's free memory).
RETAIN_BUDGET_BYTES_CPU = 16 * 2**30
#: the retained window's memory ≈ this × the upload forward's saved tensors: the forward graph, its
#: create_graph backward and a product's temporaries (benchmarks/memory.py, ResNet-8 on CPU: the peak
#: of a retained window grows 9.3× the saved bytes per sample, a one-batch double backward 5.8×)
RETAIN_GRAPH_FACTOR = 9.0

#: ``explicit=None`` builds explicit Taylor terms up to this support size (cheap to build, exact to
#: resume); beyond it the terms are Hessian-vector / third-derivative products (matrix-free).
EXPLICIT_MAX_SUPPORT = 128

#: QODE warns (once) when the tomography error model predicts more than this relative readout error.
READOUT_WARN_ERROR = 0.1


@dataclass(frozen=True)
class QODEConfig:
    """Every QODE setting the cycle and the window core read (see ``QODE``'s docstring)."""

    mode: str
    cycle: int
    classical_steps: int
    sparsity: float
    upload: str
    carleman_order: int
    taylor_degree: int
    form: str
    solver: str
    window_solver: WindowSolver      # the registry's solver object: its options and its cost formula
    shots: Optional[int]
    noise: str
    track_sgd: bool
    seed: int
    explicit: Optional[bool]
    eps: float
    tomography_kwargs: dict = field(default_factory=dict)
    carleman_state: str = "auto"     # "auto" | "factored" | "dense" (see carleman_state_for)
    max_rank: Optional[int] = None   # rank cap of the factored level 2 (None: exact)
    hvp: str = "auto"                # "auto" | "retain" | "recompute" (see choose_hvp)

    @property
    def window_length(self) -> int:
        return self.cycle - self.classical_steps

    @property
    def solver_options(self) -> dict:
        return self.window_solver.options

    @property
    def kappa_a(self) -> Optional[float]:
        return self.window_solver.kappa_a

    def readout_options(self) -> dict:
        """Keyword arguments of ``tomography`` besides the vector, shots, seed and eps."""
        return {"norm": None if self.shots else "exact", "sign_method": DEFAULT_SIGN_METHOD, **self.tomography_kwargs}

    def saved(self) -> dict:
        """The settings a saved state depends on (``load_state_dict`` compares them)."""
        return {"mode": self.mode, "cycle": self.cycle, "classical_steps": self.classical_steps,
                "sparsity": self.sparsity, "upload": self.upload, "carleman_order": self.carleman_order,
                "taylor_degree": self.taylor_degree, "form": self.form, "solver": self.solver,
                "noise": self.noise, "track_sgd": self.track_sgd, "explicit": self.explicit,
                "shots": self.shots, "eps": self.eps, "kappa_a": self.kappa_a, "seed": self.seed,
                "tomography_kwargs": dict(self.tomography_kwargs), "carleman_state": self.carleman_state,
                "max_rank": self.max_rank}

#: settings added after the first saved states: a state saved without them had these values
_SAVED_DEFAULTS = {"carleman_state": "auto", "max_rank": None}


def use_explicit(cfg: QODEConfig, n: int) -> bool:
    """Explicit Taylor terms for a window on ``n`` weights (``explicit=None``: the solver needs them, or
    ``n ≤ EXPLICIT_MAX_SUPPORT``)."""
    if cfg.explicit is not None:
        return cfg.explicit
    return cfg.window_solver.needs_explicit or n <= EXPLICIT_MAX_SUPPORT


def choose_hvp(saved: int, device: torch.device) -> tuple:
    """``hvp="auto"``: ``("retain" | "recompute", estimated bytes)`` for an upload whose forward saved
    ``saved`` bytes; retain when ``RETAIN_GRAPH_FACTOR·saved`` fits the free device memory (on a GPU;
    the forward's graph already held counts as free) or :data:`RETAIN_BUDGET_BYTES_CPU`."""
    need = int(RETAIN_GRAPH_FACTOR * saved)
    if device.type == "cuda":
        budget = torch.cuda.mem_get_info(device)[0] + saved
    else:
        budget = RETAIN_BUDGET_BYTES_CPU
    return ("retain" if need <= budget else "recompute"), need


def factored_refusal(cfg: QODEConfig) -> Optional[str]:
    """Why the factored state cannot run these settings (``None``: it can)."""
    if cfg.carleman_order != 2:
        return f"carleman_order={cfg.carleman_order} (the factored state is Carleman order 2; order 3 stays dense)"
    if cfg.form != "discrete":
        return f"form={cfg.form!r} (the factored level 2 is that of the discrete form)"
    if cfg.window_solver.needs_explicit:
        return (f"solver={cfg.solver!r} (it builds the explicit window matrix M from the dense state; the "
                "factored state runs with solver='forward')")
    return None


def carleman_state_for(cfg: QODEConfig, explicit: bool) -> str:
    """The Carleman state a window uses: ``"auto"`` takes ``"factored"`` for matrix-free windows at order 2
    in the discrete form with the forward solver, ``"dense"`` otherwise (explicit windows stay dense),
    except that a ``max_rank`` asks for the factored state's cap: then explicit windows (a support of
    ≤ ``EXPLICIT_MAX_SUPPORT`` weights under ``explicit=None``) are factored too, never silently uncapped."""
    if cfg.carleman_state != "auto":
        return cfg.carleman_state
    if factored_refusal(cfg) is not None:
        return "dense"
    return "factored" if not explicit or cfg.max_rank is not None else "dense"



def _check_lr(value, where: str):
    """``lr``: a finite number ≥ 0, or a one-element tensor holding one (kept as the tensor, as SGD does)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex() \
            and value.dtype != torch.bool:
        v = float(value.detach().reshape(()))
        if v >= 0 and math.isfinite(v):
            return value
    check_real(value, f"{where}lr", 0.0)
    return value


def check_sgd_settings(group: dict, where: str = "") -> None:
    """``lr``, ``momentum``, ``weight_decay``, ``dampening`` finite and ≥ 0; ``nesterov`` consistent;
    no ``maximize`` (QODE minimises: the window's ODE is gradient *descent*)."""
    _check_lr(group["lr"], where)
    for name in ("momentum", "weight_decay", "dampening"):
        check_real(group[name], f"{where}{name}", 0.0)
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError(f"{where}nesterov=True requires momentum > 0 and dampening = 0")
    if group.get("maximize", False):
        raise ValueError(f"{where}maximize=True is not supported: QODE minimises the loss (return −loss "
                         "from the closure to maximise)")
    if group.get("differentiable", False):
        raise ValueError(f"{where}differentiable=True is not supported: QODE's steps run without autograd "
                         "(a window's readout is sampled); use torch.optim.SGD for a differentiable step")
    for name in ("foreach", "fused"):
        if group.get(name) is not None and not isinstance(group[name], bool):
            raise TypeError(f"{where}{name} must be True, False or None, got {group[name]!r}")
    if group.get("foreach") and group.get("fused"):
        raise ValueError(f"{where}foreach=True and fused=True cannot be set together (as in "
                         "torch.optim.SGD): pick one")


def check_trainable(params, fused: Optional[bool] = None, classical: bool = False) -> None:
    """Every parameter must be trainable (dense, ``requires_grad``): the window expands the loss in all
    of them.  SGD skips frozen ones silently; QODE refuses them with the usual fix.  Complex parameters
    train only in ``mode="classical"`` (as SGD trains them): a window's ODE is real.  With ``fused=True``,
    a non-contiguous CPU parameter is refused: torch's fused CPU SGD reads its (contiguous) gradient
    with the parameter's strides and updates the wrong entries (measured on torch 2.14)."""
    for i, p in enumerate(params):
        if p.is_complex() and not classical:
            raise ValueError(f"params[{i}] is complex ({p.dtype}): a quantum window expands the loss in real "
                             "weights; use mode='classical' (SGD's complex update), or train "
                             "torch.view_as_real views of the parameters")
        if fused and p.device.type == "cpu" and not p.is_contiguous():
            raise ValueError(f"fused=True with params[{i}] (shape {tuple(p.shape)}, strides {p.stride()}) not "
                             "contiguous: torch's fused CPU SGD would apply the gradient to the wrong entries; "
                             "use foreach=True or the default, or make the parameter contiguous")
        if not p.requires_grad:
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) does not require grad: pass only the "
                             "trainable parameters, e.g. QODE([p for p in model.parameters() if "
                             "p.requires_grad], ...)")
        if p.is_sparse:
            raise ValueError(f"params[{i}] is a sparse tensor: QODE needs dense parameters")


def _window_solver(solver, solver_options, kappa_a) -> WindowSolver:
    """The registry's solver for ``solver`` with ``solver_options``; ``kappa_a=`` is the old spelling."""
    if kappa_a is not None:
        warnings.warn(f"QODE(kappa_a=...) is deprecated: pass solver='filtered', solver_options="
                      f"{{'kappa_a': {kappa_a!r}}}", DeprecationWarning, stacklevel=4)
        if solver_options is not None and not isinstance(solver_options, dict):
            raise TypeError(f"solver_options must be a dict or None, got {type(solver_options).__name__}")
        if "kappa_a" in (solver_options or {}):
            raise ValueError("kappa_a given twice: pass it only in solver_options={'kappa_a': ...}")
        solver_options = {**(solver_options or {}), "kappa_a": kappa_a}
    return make_solver(solver, solver_options)


def make_config(*, mode, cycle, classical_steps, sparsity, upload, carleman_order, taylor_degree, form,
                solver, solver_options, kappa_a, shots, noise, track_sgd, seed, explicit, eps,
                tomography_kwargs, carleman_state="auto", max_rank=None, hvp="auto") -> QODEConfig:
    """Check QODE's settings (each message names the argument) and return them as a :class:`QODEConfig`."""
    check_choice(mode, "mode", MODES)
    cycle = check_int(cycle, "cycle", 1)
    classical_steps = check_int(classical_steps, "classical_steps", 0)
    if classical_steps >= cycle:
        raise ValueError(f"classical_steps must be < cycle (leaving a window of ≥ 1 step); got "
                         f"classical_steps={classical_steps}, cycle={cycle}")
    if as_real(sparsity) is None or not (0 <= as_real(sparsity) < 1):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    check_choice(upload, "upload", UPLOADS)
    carleman_order = check_int(carleman_order, "carleman_order", 1)
    taylor_degree = check_int(taylor_degree, "taylor_degree", 1)
    check_choice(form, "form", FORMS)
    window_solver = _window_solver(solver, solver_options, kappa_a)
    shots = check_optional_int(shots, "shots", 1, none="exact readout")
    check_choice(noise, "noise", NOISES)
    check_bool(track_sgd, "track_sgd")
    seed = check_int(seed, "seed", 0)
    check_choice(explicit, "explicit", (None, True, False))
    if as_real(eps) is None or not (0 < as_real(eps) < 1):
        raise ValueError(f"eps must be in (0, 1), got {eps!r}")
    if tomography_kwargs is not None and not isinstance(tomography_kwargs, dict):
        raise TypeError(f"tomography_kwargs must be a dict or None, got {type(tomography_kwargs).__name__}")
    reserved = {"v", "shots", "seed", "top_r", "eps"} & set(tomography_kwargs or {})
    if reserved:
        raise ValueError(f"tomography_kwargs may not set {sorted(reserved)}: QODE sets them")
    if window_solver.needs_explicit and explicit is False:
        raise ValueError(f"solver={solver!r} builds the explicit window matrix: it needs explicit=None or True")
    check_choice(carleman_state, "carleman_state", CARLEMAN_STATES)
    max_rank = check_optional_int(max_rank, "max_rank", 1, none="exact factored level 2")
    check_choice(hvp, "hvp", HVPS)
    cfg = QODEConfig(mode=mode, cycle=cycle, classical_steps=classical_steps, sparsity=float(as_real(sparsity)),
                     upload=upload, carleman_order=carleman_order, taylor_degree=taylor_degree, form=form,
                     solver=window_solver.name, window_solver=window_solver, shots=shots, noise=noise, track_sgd=bool(track_sgd),
                     seed=seed, explicit=explicit, eps=as_real(eps), tomography_kwargs=dict(tomography_kwargs or {}),
                     carleman_state=carleman_state, max_rank=max_rank, hvp=hvp)
    why = factored_refusal(cfg)
    if carleman_state == "factored" and why is not None:
        raise ValueError(f"carleman_state='factored' cannot run {why}; use carleman_state='dense' or 'auto'")
    unused = "carleman_state='dense'" if carleman_state == "dense" else why   # auto + max_rank: always factored
    if max_rank is not None and unused is not None:
        raise ValueError(f"max_rank={max_rank} applies to the factored Carleman state only, which these settings "
                         f"do not use: {unused}; leave max_rank=None")
    try:   # reject bad shots / tomography options now, not at the first window's end
        tomography(np.array([1.0, 0.5, 0.25, 0.125]), shots, seed=0, eps=cfg.eps, **cfg.readout_options())
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"shots={shots!r} / tomography_kwargs={tomography_kwargs!r} rejected by "
                        f"tomography(): {exc}") from None
    return cfg


def check_budget(cfg: QODEConfig, n_S: int) -> None:
    """Refuse, before any allocation, a window whose terms or Carleman state cannot fit in memory
    (the factored state holds ``n·(k + 3)`` numbers, ``k ≤ 2T``, instead of ``Δ = n + n²``)."""
    factored = carleman_state_for(cfg, use_explicit(cfg, n_S)) == "factored"
    if factored:
        T = cfg.window_length
        k = 2 * T if cfg.max_rank is None else min(2 * T, cfg.max_rank + 2)
        dim = n_S * (k + 3)
    else:
        dim = sum(n_S ** j for j in range(1, cfg.carleman_order + 1))
    q = min(cfg.taylor_degree, cfg.carleman_order)
    terms_bytes = 8 * sum(n_S ** (k + 1) for k in range(1, q + 1))
    if (cfg.window_solver.needs_explicit or cfg.explicit) and terms_bytes > EXPLICIT_BUDGET_BYTES:
        raise ValueError(
            f"solver={cfg.solver!r}" + (", explicit=True" if cfg.explicit else "") + f" needs explicit Taylor "
            f"terms (and the explicit window matrix); on a support of {n_S:,} weights (upload={cfg.upload!r}) "
            f"they take {terms_bytes / 2**20:,.0f} MiB > {EXPLICIT_BUDGET_BYTES / 2**20:.0f} MiB: use "
            f"solver='forward' with matrix-free terms, or a sparser upload")
    if 4 * 8 * dim > default_max_bytes():
        raise ValueError(
            f"carleman_order={cfg.carleman_order} on a support of {n_S:,} weights (upload={cfg.upload!r}, "
            f"sparsity={cfg.sparsity}, carleman_state={cfg.carleman_state!r}: "
            f"{'factored' if factored else 'dense'}) needs a Carleman state of {'' if factored else 'Δ='}{dim:,} numbers "
            f"(~{4 * 8 * dim / 2**30:.3g} GiB with temporaries), more than the memory allows; lower "
            f"carleman_order or use upload='sparse' with a higher sparsity")


def check_saved_config(saved: dict, current: dict) -> None:
    """A state_dict loads only into a QODE with the settings it was saved with (names both values)."""
    mismatch = {k: (v, saved.get(k, _SAVED_DEFAULTS.get(k))) for k, v in current.items()
                if saved.get(k, _SAVED_DEFAULTS.get(k)) != v}
    if mismatch:
        raise ValueError("state_dict was saved by a QODE with other settings: " + ", ".join(
            f"{k}={old!r} there vs {new!r} here" for k, (new, old) in mismatch.items()))


def readout_warning(cfg: QODEConfig, values: torch.Tensor) -> Optional[str]:
    """Why ``cfg.shots`` cannot resolve ``values`` (the weights a window reads: θ0 on S), naming the shots
    that give :data:`READOUT_WARN_ERROR`, or ``None`` (exact readout, a scheme without an error model, or
    a predicted error within it).  The core's model: :mod:`torch_qode.core.readout_model`."""
    if cfg.shots is None or not bool(values.any()):
        return None
    opts = cfg.readout_options()
    model = {k: opts.get(k) for k in ("sign_method", "split", "norm", "norm_scale")}
    try:
        err = expected_relative_error(values, cfg.shots, **model)
    except NotImplementedError:
        return None
    if err <= READOUT_WARN_ERROR:
        return None
    need = shots_for_error(values, READOUT_WARN_ERROR, **model)
    r = int(torch.count_nonzero(values))
    return (f"QODE: shots={cfg.shots:,} cannot resolve the {r:,} weights the readout reads: the tomography error "
            f"model predicts a relative readout error of {err:.2g} with sign_method={model['sign_method']!r}; "
            f"about shots={need:,} give {READOUT_WARN_ERROR:.0%} "
            "(torch_qode.core.readout_model.shots_for_error)")
