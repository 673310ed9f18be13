"""Figures of the recipes (floor 4: applications).

matplotlib is imported only when a figure is drawn.  Figures are built on a bare
``matplotlib.figure.Figure`` with the Agg canvas, so drawing never needs a display, never touches
pyplot's global state and works the same on a headless machine and under pytest.  Every function
writes one PNG (``dpi`` 120 by default) and returns its path.

Inputs are plain Python/numpy data (lists of dicts), so a figure can be redrawn from a recipe's
``log.jsonl`` without re-running anything.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

__all__ = ["new_figure", "save", "plot_curves", "plot_ode_order", "plot_density", "plot_training_panels"]


def new_figure(nrows: int = 1, ncols: int = 1, width: float = 5.0, height: float = 3.8):
    """``(fig, axes)`` on the Agg canvas; ``axes`` is always a flat list."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def save(fig, path, dpi: int = 120) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(os.fspath(path), dpi=dpi)
    return path


def _positive(y) -> np.ndarray:
    """Values for a log axis: non-finite and non-positive entries become NaN (gaps, not clamps)."""
    y = np.asarray(y, dtype=float).copy()
    y[~np.isfinite(y) | (y <= 0)] = np.nan
    return y


# ------------------------------------------------------------------------------- generic curves
def plot_curves(panels: Sequence[Mapping], path, *, suptitle: Optional[str] = None, logy: bool = True,
                xlabel: str = "t", ylabel: str = "error", sharey: bool = True) -> Path:
    """One row of panels of curves, e.g. Fig. 4's error against time.

    ``panels``: list of ``{"title": str, "curves": [{"label": str, "x": [...], "y": [...],
    "style": optional matplotlib format string such as "--"}], "note": optional str}``.
    On a log axis non-finite or non-positive values are left out (a diverged run shows as a curve
    that stops).
    """
    fig, axes = new_figure(1, len(panels))
    ymin, ymax = math.inf, -math.inf
    for ax, panel in zip(axes, panels):
        for c in panel["curves"]:
            y = _positive(c["y"]) if logy else np.asarray(c["y"], dtype=float)
            ax.plot(np.asarray(c["x"]), y, c.get("style", "-"), label=c.get("label"), lw=1.4)
            finite = y[np.isfinite(y)]
            if finite.size:
                ymin, ymax = min(ymin, finite.min()), max(ymax, finite.max())
        if logy:
            ax.set_yscale("log")
        ax.set_title(panel.get("title", ""))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
        if any(c.get("label") for c in panel["curves"]):
            ax.legend(fontsize=8)
        if panel.get("note"):
            ax.text(0.02, 0.02, panel["note"], transform=ax.transAxes, fontsize=7, va="bottom")
    if sharey and math.isfinite(ymin) and math.isfinite(ymax) and ymax > ymin:
        lo, hi = (ymin / 2, ymax * 2) if logy else (ymin, ymax)
        for ax in axes:
            ax.set_ylim(lo, hi)
    if suptitle:
        fig.suptitle(suptitle)
    return save(fig, path)


# ------------------------------------------------------------------------------ Theorem III.1
def plot_ode_order(rows: Sequence[Mapping], path, *, differences: Sequence[Mapping] = ()) -> Path:
    """Theorem III.1 check.

    Left: ODE degree ``q`` against the number of layers ``L``, one line per activation degree
    ``s_p`` — ``rows`` are dicts with ``L``, ``s_p``, ``q_symbolic`` and ``q_numeric`` (``None``
    when not checked), plus optional ``q_paper``.  Right (if ``differences`` is given): the ratio
    ``|Δ^k g| / round-off`` against ``k`` for a few settings, each a dict with ``label``, ``k``
    (list), ``ratio`` (list) and ``q``; it drops to round-off level right after ``k = q``.
    """
    ncols = 2 if differences else 1
    fig, axes = new_figure(1, ncols)
    ax = axes[0]
    by_s = {}
    for r in rows:
        by_s.setdefault(r["s_p"], []).append(r)
    for i, (s, rs) in enumerate(sorted(by_s.items())):
        rs = sorted(rs, key=lambda r: r["L"])
        color = f"C{i}"
        ax.plot([r["L"] for r in rs], [r["q_symbolic"] for r in rs], "-", color=color, label=f"s_p={s} symbolic")
        num = [(r["L"], r["q_numeric"]) for r in rs if r.get("q_numeric") is not None]
        if num:
            ax.plot(*zip(*num), "o", color=color, mfc="none", ms=9, label=f"s_p={s} numeric")
        pap = [(r["L"], r["q_paper"]) for r in rs if r.get("q_paper") is not None]
        if pap:
            ax.plot(*zip(*pap), "x", color=color, ms=6)
    ax.set_yscale("log")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("layers L")
    ax.set_ylabel("ODE degree q")
    ax.set_title("degree of the gradient-descent ODE (x: paper's III.11)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    if differences:
        ax = axes[1]
        for i, d in enumerate(differences):
            color = f"C{i}"
            ax.semilogy(d["k"], _positive(d["ratio"]), "o-", color=color, ms=3, label=d["label"])
            ax.axvline(d["q"], color=color, ls=":", lw=0.8)
        ax.set_xlabel("finite-difference order k")
        ax.set_ylabel("|Δᵏ g| / round-off estimate")
        ax.set_title("k-th differences along a random line")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return save(fig, path)


# ------------------------------------------------------------------------------ Hessian density
def plot_density(grid, density, path, *, lr: Optional[float] = None, cutoff: Optional[float] = None,
                 eigenvalues=None, title: str = "Hessian eigenvalue density", note: Optional[str] = None,
                 logy: bool = True, label: Optional[str] = None, reference: Optional[Mapping] = None,
                 dynamic_range: float = 1e-8) -> Path:
    """The Hessian eigenvalue density ``density`` over ``grid`` (eigenvalues λ), Fig. 3 style.

    Positive λ (dissipative modes of ``u ↦ u − ηHu``) are shaded blue, negative λ (divergent) red.
    With ``lr`` and ``cutoff``, dotted lines mark ``|η λ| = cutoff``, the band the error proxy of
    Eq. (III.14) ignores.  ``eigenvalues`` (e.g. the top Lanczos eigenvalues) are drawn as ticks.
    ``reference`` (``{"grid", "density", "label"}``, e.g. the density before pruning) is overlaid
    as a dashed line.  On the log axis the view spans ``dynamic_range`` below the peak.
    """
    grid = np.asarray(grid, dtype=float)
    density = np.asarray(density, dtype=float)
    fig, (ax,) = new_figure(1, 1, width=6.0)
    y = _positive(density) if logy else density
    ax.plot(grid, y, "k-", lw=1.0, label=label)
    if reference is not None:
        ry = np.asarray(reference["density"], dtype=float)
        ax.plot(np.asarray(reference["grid"], dtype=float), _positive(ry) if logy else ry, "--", color="C1",
                lw=1.0, label=reference.get("label", "reference"))
    pos, neg = grid >= 0, grid <= 0
    floor = 0.0
    if logy:
        peak = float(np.nanmax(y)) if np.isfinite(y).any() else 1.0
        if reference is not None:
            ref_peak = np.nanmax(_positive(reference["density"]))
            peak = max(peak, float(ref_peak)) if np.isfinite(ref_peak) else peak
        floor = peak * dynamic_range  # Gaussian tails would otherwise run down to 1e-300
        ax.set_yscale("log")
        ax.set_ylim(floor, peak * 5)
    yf = np.nan_to_num(np.maximum(y, floor) if logy else y, nan=floor)
    ax.fill_between(grid, floor, np.where(pos, yf, floor), color="C0", alpha=0.35, label="λ > 0 (dissipative)")
    ax.fill_between(grid, floor, np.where(neg, yf, floor), color="C3", alpha=0.35, label="λ < 0 (divergent)")
    if lr is not None and cutoff is not None and lr > 0:
        for x in (-cutoff / lr, cutoff / lr):
            if grid.min() <= x <= grid.max():
                ax.axvline(x, color="gray", ls=":", lw=0.8)
    if eigenvalues is not None:
        ev = np.asarray(eigenvalues, dtype=float)
        ax.plot(ev, np.full_like(ev, floor if logy else 0.0), "|", color="C2", ms=14, mew=2,
                label="top eigenvalues", clip_on=False)
    ax.set_xlabel("Hessian eigenvalue λ")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    if note:
        ax.text(0.02, 0.02, note, transform=ax.transAxes, fontsize=7, va="bottom", family="monospace",
                bbox=dict(boxstyle="round", facecolor="white", alpha=0.85, lw=0.5))
    return save(fig, path)


# ------------------------------------------------------------------------ Fig. 2 training panels
def _spectrum_of(rec: Mapping):
    spec = rec.get("spectrum")
    if spec is None:
        return None
    if hasattr(spec, "density") and hasattr(spec.density, "grid"):   # dissipation.Spectrum
        spec = spec.density
    if hasattr(spec, "grid") and hasattr(spec, "values"):             # dissipation.Density
        return np.asarray(spec.grid, dtype=float), np.asarray(spec.values, dtype=float)
    if not isinstance(spec, Mapping):
        return None
    grid, dens = spec.get("grid"), spec.get("density", spec.get("values"))
    if grid is None or dens is None:
        return None
    return np.asarray(grid, dtype=float), np.asarray(dens, dtype=float)


def _spectra_panel(ax, recs, title):
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    steps = [r["step"] for r in recs]
    lo, hi = (min(steps), max(steps)) if steps else (0, 1)
    for r in recs:
        grid, dens = _spectrum_of(r)
        c = cmap(0.0 if hi == lo else (r["step"] - lo) / (hi - lo))
        ax.plot(grid, _positive(dens), color=c, lw=1.0, label=f"step {r['step']}" if len(recs) <= 8 else None)
    ax.set_yscale("log")
    peaks = [np.nanmax(_positive(_spectrum_of(r)[1])) for r in recs]
    peaks = [p for p in peaks if np.isfinite(p)]
    if peaks:
        ax.set_ylim(max(peaks) * 1e-8, max(peaks) * 5)
    ax.set_xlabel("Hessian eigenvalue λ")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if recs and len(recs) <= 8:
        ax.legend(fontsize=7)
    elif recs:
        ax.text(0.98, 0.98, f"steps {lo}–{hi} (dark→light)", transform=ax.transAxes, ha="right", va="top",
                fontsize=7)


def plot_training_panels(records: Sequence[Mapping], path, *, early_steps: int = 200, every: int = 100,
                         title: Optional[str] = None) -> Path:
    """The paper's Fig. 2 as four panels, from a list of plain dicts (one per logged step).

    Keys of each record (all but ``step`` optional; a panel without data says so):

    ``step`` (int)
        Training step.
    ``spectrum`` (``{"grid": [λ...], "density": [p...]}``)
        Hessian eigenvalue density at this step; a ``dissipation.Density`` or ``Spectrum`` is
        accepted too (its ``grid``/``values`` are used).  Panel (a) draws those with
        ``step <= early_steps``; panel (b) those with
        ``step % every == 0`` or ``download`` true.
    ``download`` (bool)
        True right after a prune/download (marked in panels (c) and (d) by dotted lines).
    ``error_proxy`` (float)
        Eq. (III.14) proxy for this step; 1 for classical steps.  Panel (c), log axis.
    ``drift`` (float)
        Optional measured ``||θ_QODE − θ_SGD|| / ||θ_SGD − θ0||`` (track_sgd); drawn beside the proxy.
    ``test_acc`` / ``test_acc_sgd`` (float in [0, 1] or percent)
        Test accuracy of the trained model / of the SGD reference.  Panel (d).
    """
    records = sorted((dict(r) for r in records), key=lambda r: r["step"])
    fig, axes = new_figure(2, 2)
    early = [r for r in records if r["step"] <= early_steps and _spectrum_of(r) is not None]
    late = [r for r in records if _spectrum_of(r) is not None and (r["step"] % every == 0 or r.get("download"))]
    _spectra_panel(axes[0], early, f"(a) spectra, first {early_steps} steps")
    _spectra_panel(axes[1], late, f"(b) spectra every {every} steps / at downloads")
    downloads = [r["step"] for r in records if r.get("download")]

    ax = axes[2]
    pr = [(r["step"], r["error_proxy"]) for r in records if r.get("error_proxy") is not None]
    if pr:
        ax.semilogy(*zip(*[(s, v) for s, v in pr]), "-", color="C0", lw=1.2, label="error proxy")
    dr = [(r["step"], r["drift"]) for r in records if r.get("drift") is not None]
    if dr:
        ax.semilogy(*zip(*dr), "-", color="C1", lw=1.0, label="drift vs SGD")
    ax.axhline(1.0, color="gray", lw=0.6)
    ax.set_title("(c) error proxy")
    ax.set_xlabel("step")
    if pr or dr:
        ax.legend(fontsize=7)

    ax = axes[3]
    any_acc = False
    for key, label, color in (("test_acc", "QODE", "C0"), ("test_acc_sgd", "SGD", "C1")):
        acc = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if acc:
            any_acc = True
            ax.plot(*zip(*acc), "o-", ms=3, color=color, label=label)
    ax.set_title("(d) test accuracy")
    ax.set_xlabel("step")
    if any_acc:
        ax.legend(fontsize=7)
    for ax in axes[2:]:
        ax.grid(True, alpha=0.3)
        for s in downloads:
            ax.axvline(s, color="gray", ls=":", lw=0.6)
    for ax, has in zip(axes, (early, late, pr or dr, any_acc)):
        if not has:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="gray")
    if title:
        fig.suptitle(title)
    return save(fig, path)
