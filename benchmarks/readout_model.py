"""The readout model's shot estimate: ``shots_for_error`` before and after issue 20 (DESIGN.md step 7).

``QODE`` warns at the first window when ``shots`` cannot resolve the weights, naming the shots that
would (``readout_warning`` → :func:`torch_qode.core.readout_model.shots_for_error`).  Before issue 20
the search bisected over the full vector, re-sorting it at every evaluation: 23.5 s of a 24.4 s
ResNet-18 upload.  Now the components are grouped once by sign and ``log p`` (O(n)) and the search runs
over the groups.  The reference, today's function before the change, is kept below (``old_shots``)
and timed in the same process, so the ratio is fair on a shared machine; both answers are printed.

Usage: python benchmarks/readout_model.py [--n 1100000] [--repeat 3] [--seed 0]
"""
from __future__ import annotations

import argparse
import math

import numpy as np

from _tables import best_of, table, write_page
from torch_qode.core.readout import SIGN_SCHEMES
from torch_qode.core.readout_model import _g, expected_relative_error, shots_for_error
from torch_qode.core.tomography import _allocate, _check_split, _pow2_ceil


def old_error(v: np.ndarray, shots: int, sign_method: str = "hadamard") -> float:
    """``expected_relative_error`` as it was before issue 20 (sorted per call, every component)."""
    vals = np.asarray(v, dtype=np.float64)
    vals = vals[vals != 0]
    scheme = SIGN_SCHEMES.lookup(sign_method, "sign_method")()
    budget, _ = _allocate(shots, ["support", "signs", "norm"], _check_split(None))
    true_norm = float(np.linalg.norm(vals))
    w = vals[np.argsort(-np.abs(vals), kind="stable")] / true_norm
    p = w * w
    lam = budget["support"] * p
    err2 = float(_g(lam).sum()) / budget["support"]
    err2 += float((4 * p * -np.expm1(-lam) * scheme.sign_error(w, budget["signs"])).sum())
    q = min(1.0, (true_norm / _pow2_ceil(true_norm)) ** 2)
    err2 += (1 - q) / (4 * q * budget["norm"])
    return math.sqrt(err2)


def old_shots(v: np.ndarray, target: float = 0.1, sign_method: str = "hadamard") -> int:
    """``shots_for_error`` as it was before issue 20 (a bisection over :func:`old_error`)."""
    lo, hi = 3, 3
    while old_error(v, hi, sign_method) > target:
        lo, hi = hi, hi * 4
    while hi > lo * 1.01 + 1:
        mid = int(math.sqrt(lo * hi))
        lo, hi = (lo, mid) if old_error(v, mid, sign_method) <= target else (mid, hi)
    return int(hi)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    v = np.random.default_rng(args.seed).normal(size=args.n)
    expected_relative_error(v[:8], 1000)         # the g table (scipy.stats) outside the timings
    rows = []
    for method in ("hadamard", "pairs"):
        t_old, s_old = best_of(lambda: old_shots(v, 0.1, method), 1)
        t_new, s_new = best_of(lambda: shots_for_error(v, 0.1, sign_method=method), args.repeat)
        rows.append([method, f"{s_old:,}", f"{s_new:,}", f"{s_new / s_old - 1:+.2%}", f"{t_old:.2f}",
                     f"{t_new * 1e3:.0f}", f"{t_old / t_new:.0f}×"])
    t = table(["sign_method", "shots before", "shots now", "difference", "before (s)", "now (ms)", "speed-up"], rows)
    print(t)
    head = (f"`shots_for_error(v, 0.1)` on a standard normal vector of n = {args.n:,} components "
            "(the default split, the measured norm): the function before issue 20 (kept in the script, one "
            f"run) and now (best of {args.repeat}), same process.")
    write_page("readout_model", "Readout model: the shot estimate", head, t)


if __name__ == "__main__":
    main()
