"""Benchmark tables for the documentation site: every script in ``benchmarks/`` prints its tables and
writes them, through :func:`write_page`, to ``docs/benchmarks/<name>.md`` (the site's benchmark pages).

A page holds a provenance line (the command, the commit, the machine, the date) and the tables of one
run, so the numbers on the site are always the ones a script measured.  Set ``TORCH_QODE_BENCH_DOCS``
to write elsewhere (a trial run that should not replace the published page).

    from _tables import table, write_page
    t = table(["n", "time (ms)"], [[8, "1.2"], [16, "2.5"]])
    print(t)
    write_page("example", "Example benchmark", "Time per product.", t)

or, for a script whose printed output is already the page, ``with recorded("example", "Example"): main()``.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import os
import time
import platform
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Iterator, Sequence

ROOT = Path(__file__).resolve().parent.parent
DOCS_DIR = ROOT / "docs" / "benchmarks"
ENV_DIR = "TORCH_QODE_BENCH_DOCS"


def table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str | None = None) -> str:
    """A markdown table: ``header`` names the columns; ``align`` is one character per column
    (``l``, ``r`` or ``c``; default: left for the first column, right for the others)."""
    header = [str(h) for h in header]
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header):
        raise ValueError(f"align has {len(align)} characters for {len(header)} columns")
    marks = {"l": "---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    for row in rows:
        row = [str(c).replace("|", "\\|") for c in row]
        if len(row) != len(header):
            raise ValueError(f"a row has {len(row)} cells for {len(header)} columns: {row}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def provenance() -> str:
    """One line: the command that ran, the commit (``+changes`` when the tree differs from it), the
    machine and the date."""
    commit = _git("rev-parse", "--short", "HEAD") or "unknown commit"
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += " +changes"
    try:
        import torch
        lib = f"torch {torch.__version__}, "
    except ImportError:                      # pragma: no cover - every benchmark imports torch
        lib = ""
    load = f", load {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    cmd = " ".join(["python", os.path.relpath(sys.argv[0], ROOT) if sys.argv[0] else "-", *sys.argv[1:]])
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"Written by `{cmd}` at commit `{commit}`, {date}: {platform.machine()} "
            f"({os.cpu_count()} cores{load}), Python {platform.python_version()}, {lib}{platform.system()}.")


def write_page(name: str, title: str, *blocks: str, out_dir: str | os.PathLike | None = None) -> Path:
    """Write ``# title``, the provenance line and ``blocks`` (markdown: text or :func:`table`s) to
    ``<out_dir>/<name>.md`` (default ``docs/benchmarks``, or ``$TORCH_QODE_BENCH_DOCS``), creating the
    folder; return the path.  The page is replaced as a whole: it records one run."""
    if not name or "/" in name or name == "index":
        raise ValueError(f"name must be a plain file stem other than 'index', got {name!r}")
    folder = Path(out_dir or os.environ.get(ENV_DIR) or DOCS_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.md"
    body = [f"# {title}", "", provenance(), ""]
    for block in blocks:
        body += [block.strip("\n"), ""]
    path.write_text("\n".join(body), encoding="utf-8")
    print(f"\n(table written to {os.path.relpath(path)})")
    return path


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


@contextlib.contextmanager
def recorded(name: str, title: str, *, preformatted: bool = False,
             out_dir: str | os.PathLike | None = None) -> Iterator[None]:
    """Print as usual inside the block; when it ends without an exception, write what was printed as the
    page ``name`` (see :func:`write_page`), in a code block when ``preformatted`` (fixed-width text)."""
    buf, real = io.StringIO(), sys.stdout
    sys.stdout = _Tee(real, buf)
    try:
        yield
    finally:
        sys.stdout = real
    text = buf.getvalue().strip("\n")
    write_page(name, title, f"```text\n{text}\n```" if preformatted else text, out_dir=out_dir)


def best_of(fn, repeat: int):
    """``(best wall-clock seconds of repeat calls of fn, its last result)``."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out
