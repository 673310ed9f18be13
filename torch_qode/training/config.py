"""QODE's settings: checked once (clear messages naming the argument), then plain data."""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import textwrap
import typing
import warnings
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional, Union

import numpy as np
import torch

from .._checks import as_real, check_bool, check_choice, check_int, check_optional_int, check_real
from ..bridge.taylor import EXPLICIT_BUDGET_BYTES
from ..bridge.sparsity import DISTRIBUTIONS
from ..core.carleman import FORMS, default_max_bytes
from ..core.solvers import SOLVERS, WindowSolver, make_solver
from ..core.tomography import DEFAULT_SIGN_METHOD, tomography
from .shots import AUTO, READOUT_WARN_ERROR, check_auto, check_shots, readout_warning

__all__ = ["QODEConfig", "make_config", "check_sgd_settings", "check_trainable", "MODES", "UPLOADS", "NOISES",
           "CARLEMAN_STATES", "EXPLICIT_MAX_SUPPORT", "use_explicit", "carleman_state_for", "HVPS", "choose_hvp",
           "RETAIN_BUDGET_BYTES_CPU", "RETAIN_GRAPH_FACTOR", "READOUT_WARN_ERROR", "readout_warning",
           "READOUTS"]

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

def _choice(allowed):
    """A field check: one of ``allowed`` (a tuple, or a registry read when checked: forms and solvers
    registered later are accepted)."""
    def check(value, name):
        return check_choice(value, name, tuple(allowed() if callable(allowed) else allowed))
    check.choices = allowed
    return check


#: the check of a ``Literal[...]`` field: one of the literal's values (read from the annotation)
_literal = None


def _int(low):
    return lambda value, name: check_int(value, name, low)


def _optional_int(low, none):
    return lambda value, name: check_optional_int(value, name, low, none=none)


def _unit_interval(value, name):
    if as_real(value) is None or not (0 <= as_real(value) < 1):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(as_real(value))


def _open_unit_interval(value, name):
    if as_real(value) is None or not (0 < as_real(value) < 1):
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    return as_real(value)


def _bool(value, name):
    return check_bool(value, name)


def _optional_dict(value, name):
    if value is not None and not isinstance(value, dict):
        raise TypeError(f"{name} must be a dict or None, got {type(value).__name__}")
    return None if value is None else dict(value)


def _optional_positive(none: str):
    """A field check: ``None`` (``none``) or a finite number > 0."""
    def check(value, name):
        if value is None:
            return None
        x = as_real(value)
        if x is None or not math.isfinite(x) or x <= 0:
            raise ValueError(f"{name} must be a finite number > 0 or None ({none}), got {value!r}")
        return float(x)
    return check


def _positive(value, name):
    x = None if value is None else as_real(value)
    if x is None or not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(x)


def setting(default, doc: str, check: Callable, *, section: str, saved: bool = True):
    """One field of :class:`QODEConfig`: its default, its documentation (the source of QODE's docstring
    table), its check (``check(value, name) -> value``, raising with the name) and whether a saved
    state depends on it (``saved``: :meth:`QODEConfig.saved`, ``load_state_dict``, the ranks' check)."""
    return field(default=default, metadata={"doc": doc, "check": check, "section": section, "saved": saved})


@dataclass(frozen=True)
class QODEConfig:
    """QODE's settings: one typed, frozen schema (DESIGN.md, "Public API").

    Every setting is one field here, with its default, its documentation and its check; ``QODE``'s
    signature and docstring table, :meth:`saved` (``state_dict``/``load_state_dict``), the check that
    every rank has the same settings and the recipes' ``qode:`` section are derived from these fields.
    Constructing one checks every field (each message names the argument) and the settings together.

    Attributes:
        <settings>
        window_solver: the registry's solver object built from ``solver`` and ``solver_options`` (derived,
            not a setting).

    Raises:
        ValueError: a value outside its range or choices (the message names the argument).
        TypeError: a value of the wrong kind (e.g. ``tomography_kwargs`` not a dict).
    """

    # --- the cycle (Algorithm 1, Sec. III B)
    mode: Literal["auto", "quantum", "classical"] = setting(
        "auto", "``\"auto\"`` (the dissipation check decides each window), ``\"quantum\"`` (always) or "
        "``\"classical\"`` (SGD throughout).", _literal, section="cycle")
    cycle: int = setting(100, "steps per cycle (a download every ``cycle`` steps).", _int(1), section="cycle")
    classical_steps: int = setting(
        10, "plain SGD steps after each download (``0 ≤ classical_steps < cycle``); the window has "
        "``T = cycle − classical_steps`` steps.", _int(0), section="cycle")
    window: Literal["fixed", "auto"] = setting(
        "fixed", "``\"fixed\"``: every window runs ``T = cycle − classical_steps`` steps; ``\"auto\"`` "
        "(``mode=\"auto\"`` with the check's ``\"predicted\"`` criterion): each window runs the largest T up "
        "to that for which the predicted linearisation error stays within the check's ``max_error`` (the rest "
        "of the cycle trains classically; ``CycleReport.window``); with ``mode=\"quantum\"`` no check runs and "
        "every window keeps the full T.", _literal, section="cycle")
    sparsity: float = setting(0.9, "pruning ratio in ``[0, 1)`` at each download (0 disables pruning).",
                              _unit_interval, section="cycle")
    pruning: str = setting(
        "erk", "how each download spreads ``sparsity`` over the prunable tensors: ``\"erk\"`` (Erdős–Rényi-"
        "Kernel: thin and small tensors keep more), ``\"uniform\"`` (the same fraction each) or ``\"global\"`` "
        "(the paper's global magnitude); the registry ``torch_qode.bridge.sparsity.DISTRIBUTIONS``.  ERK is "
        "the default: global magnitude empties whole tensors (zero-initialised heads and tokens, depthwise "
        "convolutions) and leaves models that output a constant.", _choice(lambda: tuple(DISTRIBUTIONS)),
        section="cycle")
    keep_dense: bool = setting(
        True, "with ``model=`` and ``prunable=None``: embeddings, position/class tokens, norms, biases and the "
        "output layer stay dense (``torch_qode.bridge.sparsity.keep_dense_rule``); ``False``: every tensor "
        "with ``dim() > 1`` is prunable (the paper's rule; also the rule without ``model=``).", _bool,
        section="cycle")
    min_density: float = setting(
        0.01, "per-tensor floor in ``[0, 1)``: each prunable tensor keeps at least ``max(1, ceil(min_density · "
        "numel))`` entries at a download, so none is pruned to all zeros; 0: no floor.", _unit_interval,
        section="cycle")
    upload: Literal["dense", "sparse"] = setting(
        "dense", "``\"dense\"`` (QRAM: ``S`` = all weights) or ``\"sparse\"`` (``S`` = the weights the "
        "upload's prune keeps); parameters the upload closure gives no gradient stay out of ``S``.",
        _literal, section="cycle")
    noise: Literal["stream", "frozen"] = setting(
        "stream", "``\"stream\"`` (``F0(t)`` from each step's batch) or ``\"frozen\"`` (the upload batch's).",
        _literal, section="cycle")
    # --- the Taylor model and its Carleman linearisation (Sec. II, V B)
    carleman_order: int = setting(1, "Carleman truncation order ``N ≥ 1``.", _int(1), section="carleman")
    taylor_degree: int = setting(
        2, "degree ``q`` of the Taylor model; terms above ``N`` are not computed (see :attr:`degree`).",
        _int(1), section="carleman")
    form: str = setting("discrete", "Carleman form: ``\"discrete\"`` (Sec. V B) or ``\"continuous\"`` "
                        "(the registry ``torch_qode.core.carleman.FORMS``).", _choice(lambda: tuple(FORMS)),
                        section="carleman")
    carleman_state: Literal["auto", "factored", "dense"] = setting(
        "auto", "``\"auto\"`` (factored for matrix-free windows at order 2, discrete form, forward solver; "
        "dense otherwise), ``\"factored\"`` (``Y2 = W C Wᵀ``, memory O(n·T)) or ``\"dense\"``.",
        _literal, section="carleman")
    max_rank: Optional[int] = setting(None, "rank cap of the factored level 2 (``None``: exact).",
                                      _optional_int(1, "exact factored level 2"), section="carleman")
    explicit: Optional[bool] = setting(
        None, "``None`` (explicit Taylor terms when ``|S| ≤ 128`` or the solver needs them), ``True`` or "
        "``False`` (matrix-free Hessian-vector / third-derivative products).",
        _choice((None, True, False)), section="carleman")
    hvp: Literal["auto", "retain", "recompute"] = setting(
        "auto", "how a matrix-free window takes its products: ``\"retain\"`` the upload batch's graph, "
        "``\"recompute\"`` it by replaying the upload closure per product (needs ``model=``), ``\"auto\"`` "
        "by memory.  Numerically the same: not part of a saved state.",
        _literal, section="carleman", saved=False)
    # --- the window solve (Eq. II.102, Theorems II.3/II.4)
    solver: str = setting("forward", "window solver: ``\"forward\"``, ``\"direct\"`` or ``\"filtered\"`` "
                          "(the registry ``torch_qode.core.solvers.SOLVERS``).", _choice(lambda: tuple(SOLVERS)),
                          section="solver")
    solver_options: Optional[dict] = setting(
        None, "the solver's own options, e.g. ``solver=\"filtered\", solver_options={\"kappa_a\": 50}``.",
        _optional_dict, section="solver")
    # --- the readout (Eq. II.123) and the ledger
    shots: Optional[Union[int, str]] = setting(
        None, "tomography shot budget per readout: an int, ``None`` (exact readout) or ``\"auto\"`` (per window, the "
        "fewest shots for which the readout model predicts a readout-noise part of ``readout_error`` of the "
        "window's displacement, predicted at the upload as ``T·F0(0)``; :mod:`torch_qode.training.shots`).",
        check_shots, section="readout")
    readout_error: float = setting(
        0.1, "with ``shots=\"auto\"``: the readout-noise part (relative to the window's displacement) the shots are "
        "chosen for, > 0.", _positive, section="readout")
    max_shots: int = setting(10**9, "with ``shots=\"auto\"``: the most shots a readout takes; QODE warns once, "
                             "naming the shots it would need, when the model needs more.", _int(1), section="readout")
    tomography_kwargs: Optional[dict] = setting(
        None, "extra keyword arguments of :func:`~torch_qode.core.tomography.tomography` (``sign_method``, "
        "``split``, ``norm_scale``, …).", _optional_dict, section="readout")
    readout: Literal["displacement", "weights"] = setting(
        "displacement", "what tomography reads at the window's end: ``\"displacement\"`` the level-1 block "
        "``u(T)`` of the Carleman state (the ODE is expanded at θ0, so that block holds ``u = θ − θ0``; θ0 is "
        "classical data and is added back exactly) or ``\"weights\"`` ``θ0 + u(T)`` (Algorithm 1's literal "
        "output, whose shot noise scales with ``‖θ‖`` instead of ``‖u‖``).  The readout's prune (keep r) "
        "applies to the weights in both; at exact readout both give the same weights.", _literal,
        section="readout")
    eps: float = setting(1e-2, "target error in ``(0, 1)`` used by the resource ledger.", _open_unit_interval,
                         section="readout")
    # --- measurement and reproducibility
    track_sgd: bool = setting(
        False, "also run SGD from ``θ0`` on the same batches in every quantum window and report the drift "
        "(two extra closure calls per window step).", _bool, section="measure")
    max_displacement: Optional[float] = setting(
        100.0, "a window whose ``‖u(T)‖`` (the solved displacement on S) exceeds ``max_displacement × "
        "Σ_t ‖F0(t)‖`` (the path of its T gradient steps at θ0; ``T·‖F0‖`` with ``noise=\"frozen\"``) or whose "
        "read-out is not finite is rejected: θ0 stays, QODE warns once.  A dissipative window has "
        "``‖u(T)‖ ≤ Σ_t ‖F0(t)‖``; ``None`` checks finiteness only.  Not part of a saved state.",
        _optional_positive("finiteness only"), section="measure", saved=False)
    check_budget: Optional[float] = setting(
        1.0, "bounds the dissipation check by the window it guards (T products at order 1): the predicted "
        "criterion spends about ``check_budget·T/2`` Hessian-vector products (``DissipationCheck.plan``), the "
        "paper's ``max(8, min(steps, ⌊check_budget·T/runs⌋))`` Lanczos steps unless given ``steps=``; "
        "``None``: unbounded (the proxy's own 64 steps).  Not part of a saved state.",
        _optional_positive("the check's own steps"), section="measure", saved=False)
    seed: int = setting(0, "seeds the tomography sampler and the default dissipation check.", _int(0),
                        section="measure")
    #: the registry's solver object built from ``solver`` and ``solver_options`` (derived, not a setting)
    window_solver: WindowSolver = field(init=False, repr=False, compare=False)

    def pruner_options(self) -> dict:
        """The keywords of :class:`~torch_qode.bridge.pruning.MagnitudePruner` these settings choose.

        Returns:
            ``distribution`` and ``min_density``."""
        return {"distribution": self.pruning, "min_density": self.min_density}

    def __post_init__(self):
        for f in settings_fields(type(self)):
            object.__setattr__(self, f.name, _check_of(f, type(self))(getattr(self, f.name), f.name))
        if self.classical_steps >= self.cycle:
            raise ValueError(f"classical_steps must be < cycle (leaving a window of ≥ 1 step); got "
                             f"classical_steps={self.classical_steps}, cycle={self.cycle}")
        ws = make_solver(self.solver, self.solver_options)
        object.__setattr__(self, "window_solver", ws)
        object.__setattr__(self, "solver_options", dict(ws.options))
        object.__setattr__(self, "tomography_kwargs", dict(self.tomography_kwargs or {}))
        reserved = {"v", "shots", "seed", "top_r", "eps"} & set(self.tomography_kwargs)
        if reserved:
            raise ValueError(f"tomography_kwargs may not set {sorted(reserved)}: QODE sets them")
        if ws.needs_explicit and self.explicit is False:
            raise ValueError(f"solver={self.solver!r} builds the explicit window matrix: it needs explicit=None "
                             "or True")
        why = factored_refusal(self)
        if self.carleman_state == "factored" and why is not None:
            raise ValueError(f"carleman_state='factored' cannot run {why}; use carleman_state='dense' or 'auto'")
        unused = "carleman_state='dense'" if self.carleman_state == "dense" else why  # auto + max_rank: factored
        if self.max_rank is not None and unused is not None:
            raise ValueError(f"max_rank={self.max_rank} applies to the factored Carleman state only, which these "
                             f"settings do not use: {unused}; leave max_rank=None")
        try:   # reject bad shots / tomography options now, not at the first window's end
            tomography(np.array([1.0, 0.5, 0.25, 0.125]), 1000 if self.shots == AUTO else self.shots, seed=0,
                       eps=self.eps, **self.readout_options())
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"shots={self.shots!r} / tomography_kwargs={self.tomography_kwargs!r} rejected by "
                            f"tomography(): {exc}") from None
        check_auto(self)

    # --------------------------------------------------------------------------- derived values
    @property
    def window_length(self) -> int:
        """``T = cycle − classical_steps``: the steps of a quantum window."""
        return self.cycle - self.classical_steps

    @property
    def degree(self) -> int:
        """The Taylor degree a window expands to: ``min(taylor_degree, carleman_order)`` (truncation at
        order N never reaches higher terms)."""
        return min(self.taylor_degree, self.carleman_order)

    @property
    def kappa_a(self) -> Optional[float]:
        """The filtered solver's effective condition number (Theorem II.4), else ``None``."""
        return self.window_solver.kappa_a

    def readout_options(self) -> dict:
        """Keyword arguments of ``tomography`` besides the vector, shots, seed and eps.

        Returns:
            ``norm`` (``"exact"`` when ``shots`` is ``None``), ``sign_method`` and ``tomography_kwargs``."""
        return {"norm": None if self.shots else "exact", "sign_method": DEFAULT_SIGN_METHOD, **self.tomography_kwargs}

    def saved(self) -> dict:
        """The settings a saved state depends on (every field marked ``saved``; ``load_state_dict``
        compares them, and so does the check that every rank has the same settings).

        Returns:
            Those settings by name (dicts copied)."""
        return {f.name: _copy(getattr(self, f.name)) for f in settings_fields(type(self)) if f.metadata["saved"]}

    @classmethod
    def from_saved(cls, saved: dict) -> "QODEConfig":
        """The settings of a saved state (old spellings upgraded, see :func:`upgrade_saved`)."""
        saved = upgrade_saved(saved)
        return cls(**{f.name: saved[f.name] for f in settings_fields(cls) if f.name in saved})


def _copy(value):
    return dict(value) if isinstance(value, dict) else value


@functools.lru_cache(maxsize=None)
def settings_fields(schema: type = None) -> tuple:
    """The settings of ``schema`` (default :class:`QODEConfig`), in order: ``dataclasses.Field`` objects
    with ``name``, ``type``, ``default`` and ``metadata`` (``doc``, ``check``, ``section``, ``saved``).

    Args:
        schema: the settings class (a subclass adds settings: every derived view follows it).

    Returns:
        The fields that are settings (the derived ``window_solver`` is not one).
    """
    return tuple(f for f in dataclasses.fields(schema or QODEConfig) if f.init)


@functools.lru_cache(maxsize=None)
def _hints(schema: type) -> dict:
    return typing.get_type_hints(schema)


def _check_of(f: dataclasses.Field, schema: type = None) -> Callable:
    """The field's check: its own, or for a ``Literal`` field one of the literal's values."""
    check = f.metadata["check"]
    return _choice(typing.get_args(_hints(schema or QODEConfig)[f.name])) if check is _literal else check


def choices(name: str, schema: type = None) -> Optional[tuple]:
    """The allowed values of the setting ``name`` (``None``: not a choice)."""
    f = next(f for f in settings_fields(schema) if f.name == name)
    allowed = getattr(_check_of(f, schema), "choices", None)
    return None if allowed is None else tuple(allowed() if callable(allowed) else allowed)


#: the allowed values of the choice settings (derived from the schema's annotations)
MODES, UPLOADS, NOISES = choices("mode"), choices("upload"), choices("noise")
#: how a window holds its Carleman state (core/state.py): "auto" picks per window
CARLEMAN_STATES = choices("carleman_state")
#: how a matrix-free window takes its Hessian-vector products: "retain" the upload batch's graph for
#: the whole window, "recompute" it by replaying the upload closure per product, "auto" by memory
HVPS = choices("hvp")
#: what a window's tomography reads: "displacement" u(T) (θ0 added classically) or "weights" θ0 + u(T)
READOUTS = choices("readout")

SETTINGS = tuple(f.name for f in dataclasses.fields(QODEConfig) if f.init)
#: the settings by section, in the order QODE's docstring lists them
SECTIONS = {"cycle": "The cycle", "carleman": "The Taylor model and its Carleman linearisation",
            "solver": "The window solve", "readout": "The readout and the ledger",
            "measure": "Measurement and reproducibility"}


def settings_table(indent: str = "        ", schema: type = None) -> str:
    """QODE's docstring entries for the settings (Google style ``name: doc``), written from the fields."""
    lines = []
    for f in settings_fields(schema):
        text = f"{f.name}: {f.metadata['doc']} Default: ``{f.default!r}``."
        lines += textwrap.wrap(text, 110, initial_indent=indent, subsequent_indent=indent + "    ",
                               break_on_hyphens=False)
    return "\n".join(lines)


def with_settings(doc: str, schema: type = None) -> str:
    """``doc`` with its ``<settings>`` line replaced by :func:`settings_table` at that line's indent: a
    docstring section (QODE's ``Args:``, QODEConfig's ``Attributes:``) derived from the fields.

    Args:
        doc: a docstring with a line that holds only ``<settings>`` (indented as the section's entries).
        schema: the settings class (default :class:`QODEConfig`).

    Returns:
        ``doc`` with one entry per setting in place of that line."""
    return re.sub(r"^([ \t]*)<settings>$", lambda m: settings_table(m.group(1), schema), doc, flags=re.M)


QODEConfig.__doc__ = with_settings(QODEConfig.__doc__)


#: old spellings a saved state (or a config) may carry: each upgraded, with a DeprecationWarning on use
#: in a call, silently in a saved state (the state was written by an earlier version, not by the user)
_SAVED_DEFAULTS = {"carleman_state": "auto", "max_rank": None, "pruning": "global", "min_density": 0.0,
                   "keep_dense": False, "readout": "weights", "readout_error": 0.1, "max_shots": 10**9,
                   "window": "fixed"}


def upgrade_saved(saved: dict) -> dict:
    """A saved ``config`` dict in today's spelling: settings added since it was written take the value
    they had then (:data:`_SAVED_DEFAULTS`), and ``kappa_a`` (the filtered solver's option, saved at the
    top level before ``solver_options`` existed) moves into ``solver_options``."""
    out = {**_SAVED_DEFAULTS, **saved}
    if "solver_options" not in out:
        kappa = out.get("kappa_a")
        out["solver_options"] = {} if kappa is None else {"kappa_a": kappa}
    out.pop("kappa_a", None)
    return out


def make_config(*, kappa_a=None, **settings) -> QODEConfig:
    """The settings ``settings`` checked as a :class:`QODEConfig` (each message names the argument).

    ``kappa_a=`` (deprecated) is the filtered solver's option: it moves into ``solver_options`` with a
    ``DeprecationWarning``.  An unknown name raises ``TypeError`` suggesting the closest setting.
    """
    unknown = [k for k in settings if k not in SETTINGS]
    if unknown:
        raise TypeError(unknown_setting(unknown[0]))
    if kappa_a is not None:
        warnings.warn(f"QODE(kappa_a=...) is deprecated: pass solver='filtered', solver_options="
                      f"{{'kappa_a': {kappa_a!r}}}", DeprecationWarning, stacklevel=4)
        opts = settings.get("solver_options")
        if opts is not None and not isinstance(opts, dict):
            raise TypeError(f"solver_options must be a dict or None, got {type(opts).__name__}")
        if "kappa_a" in (opts or {}):
            raise ValueError("kappa_a given twice: pass it only in solver_options={'kappa_a': ...}")
        settings["solver_options"] = {**(opts or {}), "kappa_a": kappa_a}
    return QODEConfig(**settings)


def unknown_setting(name: str, where: str = "QODE()") -> str:
    """The message for an unknown setting ``name``: the closest known one, or the list."""
    close = difflib.get_close_matches(name, SETTINGS, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"the settings are: {', '.join(SETTINGS)}"
    return f"{where} got an unexpected keyword argument {name!r}; {hint}"


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
            f"{'factored' if factored else 'dense'}) needs a Carleman state of "
            f"{'' if factored else 'Δ='}{dim:,} numbers "
            f"(~{4 * 8 * dim / 2**30:.3g} GiB with temporaries), more than the memory allows; lower "
            f"carleman_order or use upload='sparse' with a higher sparsity")


def check_saved_config(saved: dict, current: dict) -> None:
    """A state_dict loads only into a QODE with the settings it was saved with (names both values)."""
    saved = upgrade_saved(saved)
    mismatch = {k: (v, saved.get(k)) for k, v in current.items() if saved.get(k) != v}
    if mismatch:
        raise ValueError("state_dict was saved by a QODE with other settings: " + ", ".join(
            f"{k}={old!r} there vs {new!r} here" for k, (new, old) in mismatch.items()))
