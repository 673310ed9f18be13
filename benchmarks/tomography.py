"""Simulated tomography: time and error vs shots, and time vs n (paper Sec. II D; DESIGN.md step 7).

A vector of n = 10^6 components with r = 10^4 non-zeros (standard normal values at random places)
is read back by ``torch_qode.core.tomography`` at 10^3 … 10^10 shots (default split: half for the
support/magnitudes, 40% for the signs, 10% for the norm), with both sign circuits: ``"pairs"``
(interference with a reference component, O(r²) sign shots) and ``"hadamard"`` (a Hadamard test
against the measured-magnitude state, O(r log r)).  The sampler draws one multinomial over the
r non-zeros, so its cost is O(r), independent of the shot count; the only O(n) work is one scan of
v for its non-zeros.  The second table holds shots and r fixed and grows n; the last column times a
multinomial over all n components, the O(n) sampler we avoid, for contrast.  All in one process,
so the ratios are fair on a shared machine.

Usage: python benchmarks/tomography.py [--repeat 3] [--seed 0]
"""
from __future__ import annotations

import argparse

import numpy as np

from _tables import best_of, table, write_page
from torch_qode.core.tomography import coupon_collector_expected_draws, coupon_cost, tomography


def sparse_normal(n: int, r: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = np.zeros(n)
    v[rng.choice(n, r, replace=False)] = rng.standard_normal(r)
    return v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="timings are the best of this many runs")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    n, r = 10**6, 10**4
    v = sparse_normal(n, r, args.seed)
    p = v[v != 0] ** 2 / np.sum(v**2)
    head1 = f"Tomography of an r-sparse vector: n = {n:,}, r = {r:,} (values ~ N(0,1)), best of {args.repeat}."
    draws = (f"Eq. (II.123) expected draws to see the whole support: {coupon_collector_expected_draws(p):.3g} "
             f"(equal weights, r·H_r: {coupon_cost(r):.3g})")
    print(f"## {head1}\n\n{draws}\n")
    rows = []
    for method in ("pairs", "hadamard"):
        for e in range(3, 11):
            shots = 10**e
            t, res = best_of(lambda: tomography(v, shots, seed=args.seed, sign_method=method), args.repeat)
            rows.append((f"1e{e}", method, f"{1e3 * t:.1f}", f"{res.relative_error:.3g}", f"{res.support.size:,}",
                         f"{res.missed_mass:.2e}", f"{res.sign_errors:,}", f"{res.shadow_cost:.2e}"))
    t1 = table(["shots", "signs", "time (ms)", "relative error", "observed", "missed mass", "sign errors",
                "m²r³/ε² (ε achieved)"], rows, align="rlrrrrrr")
    print(t1)

    shots = 10**6
    head2 = f"Time vs n at fixed shots = {shots:.0e}, r = {r:,}."
    print(f"\n## {head2}\n")
    rows = []
    for e in (5, 6, 7):
        vn = sparse_normal(10**e, r, args.seed)
        t, _ = best_of(lambda: tomography(vn, shots, seed=args.seed), args.repeat)
        t_scan, _ = best_of(lambda: np.flatnonzero(vn), args.repeat)
        pn = vn**2 / np.sum(vn**2)
        rng = np.random.default_rng(args.seed)
        t_dense, _ = best_of(lambda: rng.multinomial(shots // 2, pn), args.repeat)
        rows.append((e, t, t_scan, t_dense))
    t_ref = next(t for e, t, *_ in rows if e == 6)
    t2 = table(["n", "tomography (ms)", "ratio to n = 1e6", "of which: scan v for non-zeros (ms)",
                "multinomial over all n, for contrast (ms)"],
               [(f"1e{e}", f"{1e3 * t:.1f}", f"{t / t_ref:.2f}", f"{1e3 * t_scan:.1f}", f"{1e3 * t_dense:.1f}")
                for e, t, t_scan, t_dense in rows], align="rrrrr")
    print(t2)
    write_page("tomography", "Tomography", head1, draws + ".", t1, head2, t2)

if __name__ == "__main__":
    main()
