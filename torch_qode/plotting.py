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
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from ._figure import new_figure, positive as _positive, save
from .training.monitor import plot_training_panels

__all__ = ["new_figure", "save", "plot_curves", "plot_ode_order", "plot_density", "plot_training_panels"]


# ------------------------------------------------------------------------------- generic curves
def plot_curves(panels: Sequence[Mapping], path, *, suptitle: Optional[str] = None, logy: bool = True,
                xlabel: str = "t", ylabel: str = "error", sharey: bool = True) -> Path:
    """One row of panels of curves, e.g. Fig. 4's error against time.

    ``panels``: list of ``{"title": str, "curves": [{"label": str, "x": [...], "y": [...],
    "style": optional matplotlib format string such as "--"}], "note": optional str}``.
    On a log axis non-finite or non-positive values are left out (a diverged run shows as a curve
    that stops).  A curve of a single point is drawn as a marker; ``x`` and ``y`` must have the same
    length.
    """
    panels = list(panels)
    if not panels:
        raise ValueError("panels must hold at least one panel ({'title': ..., 'curves': [...]})")
    fig, axes = new_figure(1, len(panels))
    ymin, ymax = math.inf, -math.inf
    for ax, panel in zip(axes, panels):
        for c in panel["curves"]:
            y = _positive(c["y"]) if logy else np.asarray(c["y"], dtype=float)
            x = np.asarray(c["x"])
            if x.shape != y.shape:
                raise ValueError(f"curve {c.get('label', '')!r}: x and y must have the same shape, got "
                                 f"{x.shape} and {y.shape}")
            style = c.get("style", "-")
            if np.isfinite(y).sum() == 1 and not any(m in style for m in "o.sx+*^v<>dDph|_"):
                style += "o"              # a lone point: a line through it would not show
            ax.plot(x, y, style, label=c.get("label"), lw=1.4)
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
    when not checked; a list of per-line values when random lines disagree, drawn as their range
    with red crosses), plus optional ``q_paper``.  Right (if ``differences`` is given): the ratio
    ``|Δ^k g| / round-off`` against ``k`` for a few settings, each a dict with ``label``, ``k``
    (list), ``ratio`` (list) and ``q``; it drops to round-off level right after ``k = q``.
    """
    ncols = 2 if differences else 1
    fig, axes = new_figure(1, ncols)
    ax = axes[0]
    by_s = {}
    for r in rows:
        by_s.setdefault(r["s_p"], []).append(r)
    split = False
    for i, (s, rs) in enumerate(sorted(by_s.items())):
        rs = sorted(rs, key=lambda r: r["L"])
        color = f"C{i}"
        ax.plot([r["L"] for r in rs], [r["q_symbolic"] for r in rs], "-", color=color, label=f"s_p={s} symbolic")
        num = [(r["L"], r["q_numeric"]) for r in rs if r.get("q_numeric") is not None
               and not isinstance(r["q_numeric"], (list, tuple))]
        if num:
            ax.plot(*zip(*num), "o", color=color, mfc="none", ms=9, label=f"s_p={s} numeric")
        for r in rs:     # random lines that disagree: their range, with a red cross at each value
            vals = r.get("q_numeric")
            if isinstance(vals, (list, tuple)) and vals:
                vals = [v for v in vals if v is not None and v > 0]
                if vals:
                    ax.vlines(r["L"], min(vals), max(vals), color=color, lw=2.0)
                    ax.plot([r["L"]] * len(vals), vals, "x", color="red", ms=7,
                            label=None if split else "lines disagree (per-line q)")
                    split = True
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
    ``grid`` and ``density`` must be non-empty 1-D arrays of the same length.
    """
    grid = np.asarray(grid, dtype=float)
    density = np.asarray(density, dtype=float)
    if grid.ndim != 1 or density.shape != grid.shape or grid.size == 0:
        raise ValueError(f"grid and density must be non-empty 1-D arrays of the same length, got shapes "
                         f"{grid.shape} and {density.shape}")
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
