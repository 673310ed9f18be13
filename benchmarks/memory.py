"""Peak memory of a QODE cycle against SGD steps (issue 14), on CPU, each case in a fresh process.

A case's peak is the resident-set high-water mark (``ru_maxrss``) of its own subprocess minus the
RSS once the model, the optimizer and the data exist (before any forward): what the training
steps themselves add.  tracemalloc does not see torch's allocator, RSS does.

Cases, ResNet-8 (w=1, CIFAR 3×32×32, float32, 1 thread):

* ``sgd``: 3 plain SGD steps on the whole batch;
* ``qode``: one QODE cycle (1 classical step, the upload, a window of 3 steps at Carleman order 1,
  ``mode="quantum"``, matrix-free) with ``hvp="retain"`` or ``"recompute"``, the closure taking the
  batch at once or in micro-batches (``--micro``); the time per window step is printed too;
* ``lanczos``: the dissipation check's SLQ density (64 steps) on the upload batch, by
  reorthogonalisation mode: its basis bytes and the density's distance to the fully
  reorthogonalised one (Wasserstein-1 over the spectral range; top eigenvalue; positive fraction).

Bar (issue 14): ``hvp="recompute"`` with 4 micro-batches of 64 → a QODE cycle's peak ≤ 1.6× that of
SGD on the whole batch of 256.
Usage: PYTHONPATH=. python benchmarks/memory.py [--batches 64 128 256] [--lanczos]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from _tables import recorded


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _setup(batch: int, seed: int = 0):
    from torch_qode.models import cifar_resnet
    torch.manual_seed(seed)
    model = cifar_resnet(8, 1, 10)
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(5)]
    return model, data


def closure_for(model, opt, x, y, micro: int):
    def closure():
        opt.zero_grad()
        total = 0.0
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            loss = F.cross_entropy(model(xs), ys) * (xs.shape[0] / x.shape[0])
            loss.backward()
            total += float(loss)
        return torch.tensor(total)
    return closure


def case(kind: str, batch: int, hvp: str, micro: int) -> dict:
    """One case in this process (called in a subprocess by :func:`measure`)."""
    torch.set_num_threads(1)
    from torch_qode import QODE
    model, data = _setup(batch)
    model.train()
    if kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        base = _rss_mb()
        for x, y in data[:3]:
            opt.step(closure_for(model, opt, x, y, micro))
        return {"peak_mb": _peak_mb() - base}
    opt = QODE(model.parameters(), lr=0.01, mode="quantum", cycle=5, classical_steps=1, sparsity=0.0,
               explicit=False, model=model, hvp=hvp)
    base = _rss_mb()
    times = []
    for k, (x, y) in enumerate(data):
        t0 = time.perf_counter()
        opt.step(closure_for(model, opt, x, y, micro))
        if k >= 2:                                   # window steps (after the classical step and the upload)
            times.append(time.perf_counter() - t0)
    rep = opt.reports[0]
    assert rep.mode == "quantum", rep.reason
    return {"peak_mb": _peak_mb() - base, "window_step_s": float(np.median(times)), "hvp": rep.carleman["hvp"]}


def lanczos_case(batch: int, steps: int = 64) -> list:
    """The SLQ density of the upload batch's Hessian by reorthogonalisation mode, against full."""
    torch.set_num_threads(1)
    from torch_qode.bridge.spectrum import slq_density, positive_fraction
    from torch_qode.bridge.taylor import TaylorExpansion
    model, data = _setup(batch)
    model.train()
    x, y = data[0]
    exp = TaylorExpansion.from_loss(F.cross_entropy(model(x), y), list(model.parameters()), lr=1.0, degree=1)
    out, ref = [], None
    for mode in ("full", "selective", None):
        t0 = time.perf_counter()
        d = slq_density(exp.hvp, exp.n, steps=steps, reorthogonalize=mode, dtype=torch.float32)
        secs = time.perf_counter() - t0
        ref = d if ref is None else ref
        lo, hi = min(ref.nodes.min(), d.nodes.min()), max(ref.nodes.max(), d.nodes.max())
        xs = np.linspace(lo, hi, 4001)
        w1 = float(np.abs(ref.cdf(xs) - d.cdf(xs)).sum() * (xs[1] - xs[0]) / (hi - lo))
        out.append({"mode": str(mode), "basis_mb": (steps * exp.n * 4 / 2**20) if mode else 0.0,
                    "top": float(d.nodes.max()), "positive_fraction": positive_fraction(d),
                    "w1_vs_full": w1, "seconds": secs,
                    "ghosts_over_half_top": int((d.nodes > 0.5 * d.nodes.max()).sum())})
    exp.release()
    return out


def measure(kind: str, batch: int, hvp: str = "retain", micro: int = 1) -> dict:
    out = subprocess.run([sys.executable, __file__, "--case", kind, str(batch), hvp, str(micro)],
                         capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--lanczos", action="store_true", help="also the Lanczos table (slow: 3×64 HVPs)")
    ap.add_argument("--case", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        kind, batch, hvp, micro = args.case
        print(json.dumps(case(kind, int(batch), hvp, int(micro))))
        return
    with recorded("memory", "Memory: peak RSS of a QODE cycle against SGD", preformatted=True):
        report(args)


def report(args) -> None:
    print("ResNet-8, CIFAR 3x32x32, float32, 1 thread; peak RSS above the set-up, MB (fresh process each)\n")
    print(f"{'batch':>5}  {'SGD':>7}  {'QODE retain':>11}  {'QODE recompute':>14}  {'recompute, 4 micro':>18}  "
          f"{'step s: retain / recompute / micro':>34}")
    for b in args.batches:
        sgd = measure("sgd", b)
        ret = measure("qode", b, "retain")
        rec = measure("qode", b, "recompute")
        mic = measure("qode", b, "recompute", 4)
        print(f"{b:>5}  {sgd['peak_mb']:>7.0f}  {ret['peak_mb']:>7.0f} ({ret['peak_mb'] / sgd['peak_mb']:.2f}x)"
              f"  {rec['peak_mb']:>8.0f} ({rec['peak_mb'] / sgd['peak_mb']:.2f}x)"
              f"  {mic['peak_mb']:>11.0f} ({mic['peak_mb'] / sgd['peak_mb']:.2f}x)"
              f"  {ret['window_step_s']:>10.3f} / {rec['window_step_s']:.3f} / {mic['window_step_s']:.3f}")
    if args.lanczos:
        print("\nSLQ density, 64 steps, upload batch 64 (float32 basis): against full reorthogonalisation")
        for r in lanczos_case(64):
            print(f"  reorth={r['mode']:>9}: basis {r['basis_mb']:7.1f} MB, top {r['top']:.4f}, positive fraction "
                  f"{r['positive_fraction']:.3f}, W1/range {r['w1_vs_full']:.2e}, nodes > top/2: "
                  f"{r['ghosts_over_half_top']}, {r['seconds']:.1f} s")


if __name__ == "__main__":
    main()
