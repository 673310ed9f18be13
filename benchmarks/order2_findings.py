"""Findings: does Carleman order 2 cut the window's linearisation drift on real networks? (issue 11)

QODE windows at Carleman order 2 (factored level 2, matrix-free terms, dense upload, exact readout,
``mode="quantum"``, ``track_sgd``) on two digits models, at several learning rates, over several
windows.  Each order-2 window also carries the order-1 state (one more HVP per step), so one run
measures, on the very same window (same θ0, batches and Taylor terms):

* ``drift_lin`` order 2: ``‖θ0 + u⁽²⁾(T) − θ_GD‖ / ‖θ_GD − θ0‖`` against plain gradient descent on S
  from θ0 on the same batches (the exact dynamics the window linearises);
* ``drift_lin`` order 1: the same for ``θ0 + u⁽¹⁾(T)``, what an order-1 window would land on
  (checked once against a separate order-1 run: same first window, same number);
* ``order_gap = ‖u⁽²⁾(T) − u⁽¹⁾(T)‖ / ‖u⁽²⁾(T)‖``, the embedded estimate that needs no SGD shadow.

Models: the tanh MLP 64-16-10 of ``benchmarks/order2.py`` (1,210 weights, float64, T = 20) with
batches of 256 and with the full training set as the batch (every step's loss is the upload's: the
Taylor terms F1, F2 are then those of every step), and ResNet-8 (batch 64, and full batch on a 256-image
subset) (``cifar_resnet(8, 1, 10, in_channels=1)``, 77,754 weights, float32, batch 64, norms
decomposed for third derivatives, T = 10), each pre-trained briefly by SGD first.  It also times a
third-order product against an HVP on both (the ledger's ``THIRD_ORDER_HVPS`` constant).

Measured (2026-11-30, busy 2-core machine, 207 s of CPU; the README has the table): with mini-batches
order 2 keeps 0.75–1.05 of order 1's drift on both models (the upload batch's Taylor terms miss the
other batches' curvature); with the full batch it cuts the MLP's drift 3–20× and ResNet-8's by
3–21% (ReLU kinks); ``order_gap`` matches order 1's drift within 17% on the full-batch MLP and is
2–32× below it with mini-batches.

Usage (1 thread; the README's table came from this):
    nice python benchmarks/order2_findings.py [--windows 3] [--resnet-windows 2] [--quick]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from _tables import recorded
from torch_qode.bridge.taylor import TaylorExpansion, decomposed_norms
from torch_qode.core.resources import THIRD_ORDER_HVPS
from torch_qode.data.digits import digits_tensors
from torch_qode.models import cifar_resnet
from torch_qode.models.mlp import mlp
from torch_qode.training.qode import QODE


def batches(X, y, size: int, seed: int):
    """An endless stream of shuffled mini-batches."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(X.shape[0], generator=g)
        for s in range(0, X.shape[0] - size + 1, size):
            idx = perm[s:s + size]
            yield X[idx], y[idx]


def closure_for(model, opt, X, y, decomposed: bool):
    def closure():
        opt.zero_grad()
        if decomposed:                      # third derivatives through BatchNorm
            with decomposed_norms(model, update_running_stats=True):
                loss = F.cross_entropy(model(X), y)
        else:
            loss = F.cross_entropy(model(X), y)
        loss.backward()
        return loss
    return closure


def pretrain(model, X, y, epochs: int, batch: int, lr: float, decomposed: bool) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    stream = batches(X, y, batch, seed=100)
    model.train()
    for _ in range(epochs * (X.shape[0] // batch)):
        opt.step(closure_for(model, opt, *next(stream), decomposed))


def third_over_hvp(model, X, y, decomposed: bool, m: int = 8, repeat: int = 3) -> float:
    """Time of one third-order product over one HVP column (m columns each, batched as QODE does)."""
    params = list(model.parameters())
    with torch.enable_grad():
        if decomposed:
            with decomposed_norms(model):
                loss = F.cross_entropy(model(X), y)
        else:
            loss = F.cross_entropy(model(X), y)
        exp = TaylorExpansion.from_loss(loss, params, lr=0.1, degree=2)
    Z = torch.randn(exp.n, m, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lam = torch.ones(m, dtype=torch.float64)

    def best(fn):
        fn()
        ts = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    ratio = best(lambda: exp.third_sym_sum(Z, lam)) / best(lambda: exp.hvp(Z))
    exp.release()
    return ratio


def run(make, X, y, *, lr: float, order: int, T: int, windows: int, batch: int, decomposed: bool) -> list:
    """QODE windows at ``order``; one row per window."""
    model = make()
    opt = QODE(model.parameters(), lr=lr, mode="quantum", cycle=T + 1, classical_steps=1, sparsity=0.0,
               carleman_order=order, shots=None, track_sgd=True, model=model, seed=0)
    stream = batches(X, y, batch, seed=1)
    t0 = time.perf_counter()
    for _ in range(windows * (T + 1)):
        model.train()
        opt.step(closure_for(model, opt, *next(stream), decomposed))
    rows = []
    for r in opt.reports:
        d, c = r.drift or {}, r.carleman or {}
        rows.append({"mode": r.mode, "lin2": d.get("linearization_relative"),
                     "lin1": d.get("linearization_order1_relative") if order >= 2 else d.get("linearization_relative"),
                     "gap": c.get("order_gap"), "rank": c.get("rank"), "reason": r.reason,
                     "hvp_eq": ((r.resources or {}).get("classical") or {}).get("hvp_equivalents")})
    rows[-1]["seconds"] = time.perf_counter() - t0
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=3, help="windows per MLP run")
    ap.add_argument("--resnet-windows", type=int, default=2, help="windows per ResNet-8 run (batch 64)")
    ap.add_argument("--resnet-full-windows", type=int, default=1, help="windows per full-batch ResNet-8 run")
    ap.add_argument("--quick", action="store_true", help="one lr per model, 2 windows (a smoke run)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    Xf, yf = digits_tensors("train", image=False, dtype=torch.float64)
    Xi, yi = digits_tensors("train", image=True, dtype=torch.float32)

    torch.manual_seed(0)
    mlp0 = mlp([64, 16, 10], "tanh").double()
    pretrain(mlp0, Xf, yf, epochs=2, batch=64, lr=0.1, decomposed=False)
    torch.manual_seed(0)
    res0 = cifar_resnet(8, 1, 10, in_channels=1)
    pretrain(res0, Xi, yi, epochs=2, batch=64, lr=0.1, decomposed=False)

    def copy_of(m):
        def make():
            import copy
            return copy.deepcopy(m)
        return make

    full = Xf.shape[0]
    # (name, model, data, settings, learning rates, windows per run)
    cases = [("tanh MLP 64-16-10 (1,210), batch 256", copy_of(mlp0), Xf, yf,
              dict(T=20, batch=256, decomposed=False), [0.05, 0.2, 0.5], args.windows),
             (f"tanh MLP 64-16-10 (1,210), full batch {full}", copy_of(mlp0), Xf, yf,
              dict(T=20, batch=full, decomposed=False), [0.05, 0.2, 0.5], args.windows),
             ("ResNet-8 (77,754), batch 64", copy_of(res0), Xi, yi, dict(T=10, batch=64, decomposed=True),
              [0.02, 0.05, 0.1], args.resnet_windows),
             ("ResNet-8 (77,754), full batch 256 (a 256-image subset)", copy_of(res0), Xi[:256], yi[:256],
              dict(T=10, batch=256, decomposed=True), [0.02, 0.05, 0.1], args.resnet_full_windows)]
    if args.quick:
        cases = [c[:6] + (1,) for c in cases]
    windows = "/".join(str(c[-1]) for c in cases)
    print(f"digits, dense upload, exact readout, mode='quantum', {windows} windows per run, 1 thread\n")
    for name, make, X, y, kw, lrs, _ in (cases[0], cases[2]):
        m = make()
        ratio = third_over_hvp(m, X[:kw["batch"]], y[:kw["batch"]], kw["decomposed"])
        print(f"{name}: one third-order product = {ratio:.2f} HVPs in time (ledger constant "
              f"THIRD_ORDER_HVPS = {THIRD_ORDER_HVPS:g})", flush=True)
    print()
    # the embedded order-1 state is what an order-1 window computes: check it once
    name, make, X, y, kw, lrs, _ = cases[0]
    r1 = run(make, X, y, lr=lrs[1], order=1, windows=1, **kw)[0]
    r2 = run(make, X, y, lr=lrs[1], order=2, windows=1, **kw)[0]
    print(f"check, {name}, lr {lrs[1]}, first window: order-1 run drift_lin {r1['lin2']:.6f}, embedded order-1 "
          f"state {r2['lin1']:.6f} (difference {abs(r1['lin2'] - r2['lin1']):.1e})\n")

    print("| model | lr | T | window | drift_lin, order 1 | drift_lin, order 2 | order 2 / order 1 | order_gap "
          "| rank | HVP-equiv. | s / window |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, make, X, y, kw, lrs, windows in cases:
        for lr in (lrs[1:2] if args.quick else lrs):
            rows = run(make, X, y, lr=lr, order=2, windows=windows, **kw)
            per = rows[-1]["seconds"] / len(rows)
            for i, r in enumerate(rows):
                if r["mode"] != "quantum" or r["lin2"] is None:
                    print(f"| {name} | {lr} | {kw['T']} | {i} | window not run: {r['reason'][:60]} ||||||")
                    continue
                print(f"| {name} | {lr} | {kw['T']} | {i} | {r['lin1']:.3f} | {r['lin2']:.3f} | "
                      f"{r['lin2'] / r['lin1']:.2f} | {r['gap']:.3f} | {r['rank']} | {r['hvp_eq']:.0f} | {per:.1f} |",
                      flush=True)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    with recorded("order2_findings", "Order 1 against order 2 on real windows"):
        main()
