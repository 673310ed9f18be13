"""Carleman order 2 on a real network: the factored level-2 state vs the dense n² state (issue 11).

One window of the discrete order-2 Carleman system of gradient descent on a tanh MLP (sklearn digits,
64-16-10: 1,210 weights, dense upload), matrix-free terms from ``TaylorExpansion.ode(explicit=False)``
(F1 = −ηH by Hessian-vector products, F2 = −(η/2)∇³L by third-order products), u(0) = 0, T steps.
Both paths run in this one process, one thread, so the ratio is fair on a shared machine:

  * dense:    ``carleman(ode, 2, "discrete").step`` on the (n + n²)-vector (n HVP columns per G1 pass);
  * factored: ``FactoredLevel2`` (Y2 = W C Wᵀ, k ≤ 2t), F2 by ``power`` per column, and again with a
    batched ``sym_sum`` (Σ λ_l ∇³L[z_l, z_l] in one backward per 32 columns) attached to the F2 term.

Then the factored cost per step in HVP units (a step's time / one single-column HVP) as T grows, and
the memory each state holds.

Measured (2-core shared CPU, 1 thread, batch 256, lr 0.2, T = 20, 2026-11-30): dense 298.7 s per
window; factored 3.69 s with F2 by ``power`` (81×) and 1.88 s with ``sym_sum`` (159×); agreement with
the dense state 1.2e-15 (level 1) and 3.6e-15 (level 2), max relative.  Rank 39 ≤ 2T; state 0.39 MiB
vs 11.2 MiB.  Cost as T grows (sym_sum): T = 20 / 40 / 80 -> 1.2 / 4.4 / 19.3 s per window, the
last step 124 / 221 / 599 HVP units (≈ 3.8 HVPs per column of W: one HVP + one third-order product),
i.e. O(T²) products per window.

Usage: python benchmarks/order2.py [--T 20] [--lr 0.2] [--batch 256]
[--grow 20,40,80] [--skip-dense]
"""
from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn.functional as F

from _tables import recorded
from torch_qode.bridge.taylor import TaylorExpansion
from torch_qode.core.carleman import carleman
from torch_qode.core.factored import FactoredLevel2
from torch_qode.data.digits import digits_tensors
from torch_qode.models.mlp import mlp


def expansion(lr: float, batch: int, seed: int = 0) -> TaylorExpansion:
    torch.manual_seed(seed)
    model = mlp([64, 16, 10], "tanh").double()
    X, y = digits_tensors("train", image=False, dtype=torch.float64)
    return TaylorExpansion.from_model(model, F.cross_entropy, (X[:batch], y[:batch]), lr=lr)


def with_sym_sum(exp: TaylorExpansion):
    """The matrix-free ODE with a batched ``sym_sum`` on its F2 term (dense upload only).

    The bridge's F2 term offers ``power`` (one ∇³L[z, z] per call); its engines already have the
    batched ``sym_sum``, reached here through the private engine until the bridge exposes it."""
    assert exp.support is None, "this helper scatters nothing: dense upload only"
    ode = exp.ode(explicit=False)
    c = -exp.lr / 2.0

    def sym_sum(Z, lam):
        with torch.enable_grad():
            out = exp._engine.sym_sum(Z.T.to(exp.dtype).contiguous(), lam.to(exp.dtype)).detach()
        return c * out

    ode.term(2).sym_sum = sym_sum
    return ode


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed_factored(ode, T, **kw):
    fs = FactoredLevel2(ode, **kw)
    per_step = []
    t0 = time.perf_counter()
    for _ in range(T):
        s = time.perf_counter()
        fs.step()
        per_step.append(time.perf_counter() - s)
    return fs, time.perf_counter() - t0, per_step


def hvp_time(ode, n: int, repeat: int = 20) -> float:
    v = torch.randn(n, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    F1 = ode.term(1)
    F1.matmat(v)
    times = []
    for _ in range(repeat):
        s = time.perf_counter()
        F1.matmat(v)
        times.append(time.perf_counter() - s)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--grow", default="20,40,80", help="window lengths for the cost-vs-T table")
    ap.add_argument("--skip-dense", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)

    exp = expansion(args.lr, args.batch)
    n, T = exp.n, args.T
    ode = exp.ode(explicit=False)
    ode_sym = with_sym_sum(exp)
    h = hvp_time(ode, n)
    print(f"tanh MLP 64-16-10 on digits (batch {args.batch}), n = {n} weights, lr = {args.lr}, T = {T}, "
          f"1 thread; one HVP = {1e3 * h:.2f} ms")
    rss0 = maxrss_mib()

    fp, t_pow, _ = timed_factored(ode, T, embedded=True)
    fs, t_sym, _ = timed_factored(ode_sym, T, embedded=True)
    rss_f = maxrss_mib()
    rows = [("factored, F2 by power", t_pow, fp), ("factored, F2 by sym_sum", t_sym, fs)]
    gap = float((fp.level1() - fs.level1()).abs().max() / fs.level1().abs().max())
    print(f"power vs sym_sum agreement (max rel, level 1): {gap:.2e};  rank reached {fs.rank} (≤ 2T = {2 * T})"
          f";  order_gap = {fs.order_gap:.3f};  F1 columns {fs.products['F1']}, F2 pairs {fs.products['F2']}")

    if not args.skip_dense:
        sys_ = carleman(ode, 2, "discrete")
        y = torch.zeros(sys_.dim, dtype=torch.float64)
        t0 = time.perf_counter()
        for t in range(T):
            y = sys_.step(y, t)
        t_dense = time.perf_counter() - t0
        rss_d = maxrss_mib()
        y1, Y2 = y[:n], y[n:].reshape(n, n)
        e1 = float((fs.level1() - y1).abs().max() / y1.abs().max())
        e2 = float((fs.Y2() - Y2).abs().max() / Y2.abs().max())
        print(f"factored vs dense agreement (max rel): level 1 {e1:.2e}, level 2 {e2:.2e}")
        print("\n| state | window (s) | dense / this | state memory | process peak RSS growth |")
        print("|---|---|---|---|---|")
        print(f"| dense (n + n² vector) | {t_dense:.2f} | 1.0 | {sys_.dim * 8 / 2**20:.1f} MiB "
              f"| {rss_d - rss_f:+.0f} MiB |")
        for name, tw, st in rows:
            print(f"| {name} | {tw:.3f} | {t_dense / tw:.0f}× | {st.nbytes / 2**20:.2f} MiB "
                  f"| {rss_f - rss0:+.0f} MiB (both factored runs) |")

    print("\nfactored (sym_sum) cost as T grows: the last step's time in HVP units, and the window's")
    print("| T | window (s) | last step (HVP units) | mean step (HVP units) | F1 columns | F2 pairs | rank | state |")
    print("|---|---|---|---|---|---|---|---|")
    for Tg in [int(x) for x in args.grow.split(",") if x]:
        st, tw, per = timed_factored(ode_sym, Tg)
        print(f"| {Tg} | {tw:.2f} | {per[-1] / h:.0f} | {tw / Tg / h:.0f} | {st.products['F1']} "
              f"| {st.products['F2']} | {st.rank} | {st.nbytes / 2**20:.2f} MiB |")
    exp.release()


if __name__ == "__main__":
    with recorded("order2", "Carleman order 2 on the factored state"):
        main()
