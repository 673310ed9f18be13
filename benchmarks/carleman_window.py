"""Matrix-free Carleman stepping vs the explicit scipy.sparse matrix, one T = 100 window.

A degree-2 discrete system (the paper's Fig. 4 kind: F1 = −H with eigenvalues ~ U(0, 1), dense F2)
is run for T steps two ways, in one process so the ratio is fair on a shared machine:
  * matrix-free ``CarlemanSystem.simulate`` (mode-by-mode tensor contractions),
  * build ``A = sys.matrix()`` with scipy and step ``y ← y + A y + b`` with sparse mat-vecs.
Then the window matrix M of Eq. (II.102) applied matrix-free, one product M x, three ways in the same run:
  * before: the scipy LinearOperator of the old ``linsolve._operator`` (numpy -> torch -> numpy and
    one Carleman step per time slice), reproduced below as the baseline,
  * ``WindowOperator.matvec`` (torch on the system's device, the T slices in one batched step),
  * ``WindowOperator.scipy_operator().matvec`` (the same, adapted at the scipy boundary).
Usage: python benchmarks/carleman_window.py [--T 100] [--repeat 3]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _tables import recorded
from torch_qode import PolynomialODE
from torch_qode.core.carleman import CarlemanTooLarge, carleman
from torch_qode.core.window import WindowOperator


def fig4_like(n: int, seed: int = 0) -> PolynomialODE:
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    H = (Q * rng.uniform(0, 1, n)) @ Q.T
    return PolynomialODE([rng.normal(size=n) * 1e-3, -H, rng.uniform(-0.015, 0.015, (n, n * n))])


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run(n: int, N: int, T: int, repeat: int) -> dict:
    ode = fig4_like(n)
    sys_ = carleman(ode, N, "discrete")
    u0 = np.random.default_rng(1).uniform(-0.5, 0.5, n)
    row = {"n": n, "N": N, "dim": sys_.dim}
    traj = None

    def mf():
        nonlocal traj
        traj = sys_.simulate(u0, T)

    row["matrix_free_s"] = best_of(mf, repeat)
    try:
        t0 = time.perf_counter()
        A = sys_.matrix()
        row["build_s"] = time.perf_counter() - t0
        row["nnz"] = A.nnz
        b = sys_.offset()

        def explicit():
            y = sys_.lift(u0)
            for _ in range(T):
                y = y + A @ y + b
            return y

        row["step_s"] = best_of(explicit, repeat)
        row["explicit_s"] = row["build_s"] + row["step_s"]
        row["max_diff"] = float(np.abs(explicit()[:n] - traj[-1]).max())
        row["speedup"] = row["explicit_s"] / row["matrix_free_s"]
    except CarlemanTooLarge as exc:
        row["explicit_s"] = None
        row["note"] = str(exc).split(";")[0]
    return row


def old_operator_matvec(system, T: int):
    """The pre-redesign matrix-free M (``linsolve._operator``): a numpy round trip and a loop over t."""
    D = system.dim

    def matvec(x):
        X = torch.as_tensor(np.asarray(x, dtype=np.float64).reshape(T + 1, D))
        out = X.clone()
        for t in range(T):
            out[t + 1] -= system.apply(X[t][:, None].to(system.ode.device), t)[:, 0].cpu()
        return out.numpy().reshape(-1)

    return matvec


def run_window(n: int, N: int, T: int, repeat: int) -> dict:
    sys_ = carleman(fig4_like(n), N, "discrete")
    op = WindowOperator(sys_, T)
    x = np.random.default_rng(2).normal(size=op.shape[0])
    xt = torch.as_tensor(x)
    old = old_operator_matvec(sys_, T)
    row = {"n": n, "N": N, "dim": sys_.dim, "N_b": op.shape[0]}
    row["old_s"] = best_of(lambda: old(x), repeat)
    row["new_s"] = best_of(lambda: op.matvec(xt), repeat)
    sci = op.scipy_operator()
    row["scipy_s"] = best_of(lambda: sci.matvec(x), repeat)
    row["max_diff"] = float(np.abs(old(x) - op.matvec(xt).numpy()).max())
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = [run(n, N, args.T, args.repeat) for n, N in ((8, 4), (16, 3), (32, 3))]
    print(f"T = {args.T} steps, degree-2 discrete Carleman system, best of {args.repeat}, "
          f"{torch.get_num_threads()} threads\n")
    print("| n | N | Δ | nnz(A) | matrix-free simulate | explicit build + step | speed-up | max |Δu(T)| |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["explicit_s"] is None:
            print(f"| {r['n']} | {r['N']} | {r['dim']:,} | — | {r['matrix_free_s']:.3f} s | "
                  f"refused: {r['note']} | — | — |")
        else:
            print(f"| {r['n']} | {r['N']} | {r['dim']:,} | {r['nnz']:,} | {r['matrix_free_s']:.3f} s | "
                  f"{r['build_s']:.2f} s + {r['step_s']:.2f} s | {r['speedup']:.0f}× | {r['max_diff']:.1e} |")
    wrows = [run_window(n, N, args.T, args.repeat) for n, N in ((8, 4), (16, 3), (32, 2))]
    print(f"\nOne product M x with the matrix-free window matrix (T = {args.T}), best of {args.repeat}\n")
    print("| n | N | (T+1)Δ | before (numpy round trip, loop over t) | WindowOperator.matvec | via scipy_operator | "
          "speed-up | max |diff| |")
    print("|---|---|---|---|---|---|---|---|")
    for r in wrows:
        print(f"| {r['n']} | {r['N']} | {r['N_b']:,} | {r['old_s'] * 1e3:.1f} ms | {r['new_s'] * 1e3:.1f} ms | "
              f"{r['scipy_s'] * 1e3:.1f} ms | {r['old_s'] / r['new_s']:.1f}× | {r['max_diff']:.1e} |")


if __name__ == "__main__":
    with recorded("carleman_window", "Carleman window and window operator"):
        main()
