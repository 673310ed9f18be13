"""Tiny matplotlib helpers shared by the figure-drawing modules (no project knowledge).

Figures are built on a bare ``matplotlib.figure.Figure`` with the Agg canvas: drawing never needs a
display and never touches pyplot's global state.  matplotlib is imported only when a figure is drawn.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["new_figure", "save", "positive"]


def new_figure(nrows: int = 1, ncols: int = 1, width: float = 5.0, height: float = 3.8):
    """``(fig, axes)`` on the Agg canvas; ``axes`` is always a flat list."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def save(fig, path, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` and return the path of the file written: a name without a suffix
    gets ``.png`` (as matplotlib would add); the suffix picks the format (``.png``, ``.pdf``, ...).
    A folder is refused."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"path {str(path)!r} is a folder; give a file name such as "
                                f"{str(path / 'figure.png')!r}")
    if not path.suffix:
        path = path.with_name(path.name + ".png")
        if path.is_dir():
            raise IsADirectoryError(f"path {str(path)!r} is a folder; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(os.fspath(path), dpi=dpi)
    return path


def positive(y) -> np.ndarray:
    """Values for a log axis: non-finite and non-positive entries become NaN (gaps, not clamps)."""
    y = np.asarray(y, dtype=float).copy()
    y[~np.isfinite(y) | (y <= 0)] = np.nan
    return y
