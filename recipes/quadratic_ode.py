"""Fig. 4: Carleman error on random quadratic ODEs with a tunable fraction of dissipative modes.

The system (paper Sec. III C, DESIGN.md): ``u(t+1) = u + F1 u + F2 u⊗u`` with ``F0 = 0``,
``F1 = −H``, ``H = Q diag(λ) Qᵀ`` for a random orthogonal ``Q``, a fraction ``f`` of the eigenvalues
``λ ~ U(0, 1)`` (dissipative: ``|1 − λ| < 1``) and the rest ``λ ~ U(−0.01, 0)`` (divergent), and
``F2`` entries ``~ U(−0.015, 0.015)``.  The error is ``|u_N(t)_c − u(t)_c|`` of one coordinate ``c``
of the Carleman trajectory of order ``N`` against the exact one (``PolynomialODE.iterate``).

(a) ``f = 1``, ``N = 1..4``; (b) several ``f`` at ``N = 4``; both Carleman forms in both panels.
Per setting a resource ledger (:func:`torch_qode.core.resources.estimate_resources`) is logged.

Where the paper is silent (our choices, in the config): the dimension ``n``, the horizon ``T``, the
initial state (uniform direction, norm ``u0_norm < 1`` as Eq. II.68 asks), the number of random
systems (``trials``; curves are the median over trials, a diverged trial counting as +inf) and the
coordinate (random per trial).  Within a trial the same ``Q``, ``F2``, ``u0`` and eigenvalue draws
serve every ``f``, so ``f`` is the only thing that changes between the curves of panel (b).

Run: ``python -m recipes.quadratic_ode --config configs/quadratic_ode.yaml``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

import numpy as np
import torch

from recipes import cli, config, loop
from torch_qode._checks import as_int, as_real
from torch_qode.core.carleman import FORMS, carleman, dissipativity
from torch_qode.core.ode import NonFiniteError, PolynomialODE

@dataclass
class Resources:
    """The ``resources`` section."""

    enabled: bool = True
    eps: float = 1e-3
    max_bytes: int = 268435456


@dataclass
class Config:
    """The recipe's config (its schema and defaults)."""

    seed: int = 0
    device: str = "cpu"            # the math core runs in float64; "auto" uses CUDA when present
    n: int = 10                    # ODE dimension (paper: not stated)
    T: int = 200                   # steps (paper: not stated)
    u0_norm: float = 0.5           # ||u0||, direction uniform on the sphere (paper: not stated)
    trials: int = 10               # random systems per setting; curves are medians
    coordinate: Any = None         # which u_c to compare; null = random per trial (the paper's choice)
    orders: List[Any] = field(default_factory=lambda: [1, 2, 3, 4])          # panel (a), at f = 1
    fs: List[Any] = field(default_factory=lambda: [1.0, 0.9, 0.75, 0.5])     # panel (b)
    order_b: int = 4               # panel (b) Carleman order
    forms: List[Any] = field(default_factory=lambda: ["discrete", "continuous"])
    eig_pos: List[Any] = field(default_factory=lambda: [0.0, 1.0])    # U(lo, hi) of the positive Hessian eigenvalues
    eig_neg: List[Any] = field(default_factory=lambda: [-0.01, 0.0])  # U(lo, hi) of the negative ones
    f2_scale: float = 0.015        # F2 entries ~ U(-f2_scale, f2_scale)
    report_times: List[Any] = field(default_factory=lambda: [10, 50, 100, 200])
    error_threshold: float = 1.0e-3  # summary column: last t with median error <= this
    blowup: float = 1.0e6          # the exact trajectory counts as diverged once max|u| exceeds this
    resources: Resources = field(default_factory=Resources)


DEFAULTS = config.defaults(Config)


# ------------------------------------------------------------------------------------- systems
def draw_trial(n: int, rng: np.random.Generator, eig_pos=(0.0, 1.0), eig_neg=(-0.01, 0.0),
               f2_scale: float = 0.015, u0_norm: float = 0.5) -> dict:
    """The random ingredients of one trial, shared by every ``f``: ``Q``, ``F2``, ``u0`` and the
    positive/negative eigenvalue draws."""
    Q, R = np.linalg.qr(rng.normal(size=(n, n)))
    Q = Q * np.sign(np.diag(R))  # Haar-distributed orthogonal matrix
    u0 = rng.normal(size=n)
    u0 *= u0_norm / np.linalg.norm(u0)
    return {"Q": Q, "F2": rng.uniform(-f2_scale, f2_scale, (n, n * n)),
            "pos": rng.uniform(*eig_pos, n), "neg": rng.uniform(*eig_neg, n), "u0": u0}


def quadratic_ode(trial: dict, f: float, device=None) -> tuple:
    """``(ode, λ)``: the Fig. 4 system with a fraction ``f`` of positive Hessian eigenvalues."""
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"f must lie in [0, 1], got {f!r}")
    n = trial["Q"].shape[0]
    npos = int(round(f * n))
    lam = np.concatenate([trial["pos"][:npos], trial["neg"][: n - npos]])
    H = (trial["Q"] * lam) @ trial["Q"].T
    return PolynomialODE([None, -H, trial["F2"]], device=device), lam


def exact_trajectory(ode: PolynomialODE, u0, T: int, blowup: float = 1e6) -> tuple:
    """``(traj (T+1, n), diverged_at)``: the exact map iterated (as ``PolynomialODE.iterate``);
    once ``max|u| > blowup`` the trajectory counts as diverged and the remaining rows are NaN."""
    u = torch.as_tensor(u0, dtype=ode.dtype, device=ode.device)
    traj = torch.full((T + 1, ode.n), float("nan"), dtype=ode.dtype, device=ode.device)
    traj[0] = u
    for t in range(T):
        u = u + ode.f(u, t)
        if not bool(torch.isfinite(u).all()) or float(u.abs().max()) > blowup:
            return traj.cpu().numpy(), t + 1
        traj[t + 1] = u
    return traj.cpu().numpy(), None


def carleman_trajectory(system, u0, T: int) -> tuple:
    """``(traj (T+1, n), diverged_at)`` of the Carleman level-1 block; NaN after a non-finite state."""
    ode = system.ode
    y = torch.as_tensor(system.lift(torch.as_tensor(u0, dtype=ode.dtype, device=ode.device)))
    traj = torch.full((T + 1, system.n), float("nan"), dtype=ode.dtype, device=ode.device)
    traj[0] = y[: system.n]
    for t in range(T):
        try:
            y = system.step(y, t)
        except NonFiniteError:
            return traj.cpu().numpy(), t + 1
        traj[t + 1] = y[: system.n]
    return traj.cpu().numpy(), None


def median_curve(curves: Sequence[np.ndarray]) -> np.ndarray:
    """Median over trials, a NaN (diverged) entry counting as +inf."""
    a = np.asarray(curves, dtype=float)
    return np.median(np.where(np.isnan(a), np.inf, a), axis=0)


# ---------------------------------------------------------------------------------------- run
def _check(cfg: dict) -> None:
    """Every option, before anything is written; errors name the key."""
    def bad(key, msg):
        raise config.ConfigError(f"{key} {msg}")

    config.check_real(cfg["blowup"], "blowup", 0.0, low_open=True, allow_inf=True)   # .inf: never diverged
    config.check_real(cfg["error_threshold"], "error_threshold", 0.0, low_open=True)
    for key in ("n", "T", "trials", "order_b"):
        config.check_int(cfg[key], key, 1)
    if as_real(cfg["u0_norm"]) is None or not 0 < cfg["u0_norm"] < 1:
        bad("u0_norm", f"must lie in (0, 1) (Eq. II.68 asks ||u|| < 1), got {cfg['u0_norm']!r}")
    config.check_int_list(cfg["orders"], "orders", 1)
    if not cfg["fs"] or any(as_real(f) is None or not 0 <= f <= 1 for f in cfg["fs"]):
        bad("fs", f"must be a non-empty list of fractions in [0, 1], got {cfg['fs']!r}")
    if not cfg["forms"] or any(not isinstance(f, str) or f not in FORMS for f in cfg["forms"]):
        bad("forms", f"must be a non-empty list drawn from {FORMS}, got {cfg['forms']!r}")
    c = cfg["coordinate"]
    if c is not None and (as_int(c) is None or not 0 <= c < cfg["n"]):
        bad("coordinate", f"must be null (random) or an integer in 0..{cfg['n'] - 1}, got {c!r}")
    # U(lo, hi) draws: the positive (dissipative) eigenvalues in [0, 2) (|1 - λ| < 1 needs 0 < λ < 2),
    # the negative (divergent) ones <= 0
    for key, lo_min, hi_max, what in (("eig_pos", 0.0, 2.0, "0 <= lo <= hi <= 2"),
                                      ("eig_neg", -math.inf, 0.0, "lo <= hi <= 0")):
        v = cfg[key]
        if not (isinstance(v, list) and len(v) == 2 and all(as_real(x) is not None and math.isfinite(x) for x in v)
                and lo_min <= v[0] <= v[1] <= hi_max):
            bad(key, f"must be a list [lo, hi] of two finite numbers with {what} (the range of U(lo, hi)), "
                     f"got {v!r}")
    config.check_real(cfg["f2_scale"], "f2_scale", 0.0)
    config.check_int_list(cfg["report_times"], "report_times", 0, cfg["T"], nonempty=False, high_name="T")
    r = cfg["resources"]
    config.check_real(r["eps"], "resources.eps", 0.0, 1.0, low_open=True, high_open=True)
    config.check_int(r["max_bytes"], "resources.max_bytes", 1)


def _ledger(system, T: int, u0_norm: float, res_cfg: dict) -> Optional[dict]:
    try:
        from torch_qode.core.resources import estimate_resources
    except ImportError:  # pragma: no cover - resources.py is part of the package
        return None
    r = estimate_resources(system, T, eps=float(res_cfg["eps"]), u_norm=u0_norm,
                           max_bytes=int(res_cfg["max_bytes"]))
    return r.as_dict()


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the recipe; returns ``{"out", "summary" (rows of the table), "curves", "figures"}``."""
    with cli.setup("quadratic_ode", Config, argv, description=__doc__, check=_check) as run:
        cfg = run.cfg
        n, T, forms = cfg["n"], cfg["T"], list(cfg["forms"])
        # every (f, N, form) is simulated once; panel (a) is f = 1 over orders, (b) order_b over fs
        panel_a = [(1.0, N) for N in cfg["orders"]]
        panel_b = [(float(f), cfg["order_b"]) for f in cfg["fs"]]
        settings = list(dict.fromkeys(panel_a + panel_b))
        fs_needed = list(dict.fromkeys(f for f, _ in settings))
        curves = {(f, N, form): [] for f, N in settings for form in forms}
        diverged = {k: 0 for k in curves}
        ledgers = {}
        for trial_i in run.progress(range(cfg["trials"]), desc="trials"):
            rng = np.random.default_rng([cfg["seed"], trial_i])
            trial = draw_trial(n, rng, cfg["eig_pos"], cfg["eig_neg"], cfg["f2_scale"], cfg["u0_norm"])
            c = int(rng.integers(n)) if cfg["coordinate"] is None else cfg["coordinate"]
            for f in fs_needed:
                ode, lam = quadratic_ode(trial, f, device=run.device)
                exact, exact_div = exact_trajectory(ode, trial["u0"], T, cfg["blowup"])
                level1 = dissipativity(carleman(ode, 1, "discrete"))
                run.log.write("system", trial=trial_i, f=f, coordinate=c, exact_diverged_at=exact_div,
                              dissipative_fraction=level1.dissipative_fraction,
                              spectral_radius_I_plus_F1=level1.level1_spectral_radius,
                              lambda_min=float(lam.min()), lambda_max=float(lam.max()))
                for N in [N for f_s, N in settings if f_s == f]:
                    for form in forms:
                        key = (f, N, form)
                        system = carleman(ode, N, form)
                        traj, div = carleman_trajectory(system, trial["u0"], T)
                        err = np.abs(traj[:, c] - exact[:, c])
                        curves[key].append(err)
                        diverged[key] += div is not None or exact_div is not None
                        run.log.write("trial", trial=trial_i, f=f, order=N, form=form, coordinate=c,
                                      carleman_diverged_at=div, exact_diverged_at=exact_div,
                                      error_at={str(t): err[t] for t in cfg["report_times"]})
                        if trial_i == 0 and cfg["resources"]["enabled"]:
                            ledgers[key] = _ledger(system, T, cfg["u0_norm"], cfg["resources"])
                            run.log.write("resources", f=f, order=N, form=form, ledger=ledgers[key])

        t_axis = np.arange(T + 1)
        summary, med = [], {}
        times = list(cfg["report_times"])
        thr = cfg["error_threshold"]
        for key, errs in curves.items():
            f, N, form = key
            m = median_curve(errs)
            med[key] = m
            above = np.flatnonzero(~(m[1:] <= thr))
            controlled = int(above[0]) if above.size else T  # last t with median error <= threshold
            panels = "".join(p for p, members in (("a", panel_a), ("b", panel_b)) if (f, N) in members)
            run.log.write("curve", panels=panels, f=f, order=N, form=form, t=t_axis, median_error=m,
                          trials=len(errs), diverged_trials=diverged[key], controlled_until=controlled)
            row = {"panel": panels, "f": f, "N": N, "form": form}
            row.update({f"err@{t}": float(m[t]) for t in times})
            row[f"t(err<={thr:g})"] = controlled
            row["diverged"] = f"{diverged[key]}/{len(errs)}"
            led = ledgers.get(key)
            if led:
                row.update({"Δ": led["dim"], "qubits": led["qubits"],
                            "s": f"{led['s']}{'' if led['sparsity_source'] == 'measured' else '*'}",
                            "gates[II.100]": led["gates_qlsa"], "N(eps)[II.76]": led["required_order"]})
            summary.append(row)

        from torch_qode.plotting import plot_curves

        figs = {}
        panels_a = [{"title": f"{form} form, f = 1",
                     "curves": [{"label": f"N = {N}", "x": t_axis, "y": med[(1.0, N, form)]}
                                for N in cfg["orders"]]} for form in forms]
        figs["fig4a"] = plot_curves(panels_a, run.path("fig4a_error_vs_order.png"),
                                    ylabel="|error| of one coordinate", sharey=False,
                                    suptitle=f"Fig. 4(a): n={n}, median of {cfg['trials']} systems")
        panels_b = [{"title": f"{form} form, N = {cfg['order_b']}",
                     "curves": [{"label": f"f = {f:g}", "x": t_axis, "y": med[(float(f), cfg["order_b"], form)]}
                                for f in cfg["fs"]]} for form in forms]
        figs["fig4b"] = plot_curves(panels_b, run.path("fig4b_error_vs_fraction.png"),
                                    ylabel="|error| of one coordinate", sharey=False,
                                    suptitle=f"Fig. 4(b): n={n}, median of {cfg['trials']} systems")
        table = loop.format_table(summary)
        print(table)
        if any(str(r.get("s", "")).endswith("*") for r in summary):
            print("s*: Theorem V.1 bound (A too large to build within resources.max_bytes); otherwise measured")
        print(f"figures: {', '.join(str(p) for p in figs.values())}")
        run.log.write("summary", rows=summary, figures={k: str(v) for k, v in figs.items()})
        return {"out": run.out, "summary": summary, "curves": med, "figures": figs}


if __name__ == "__main__":
    main()
