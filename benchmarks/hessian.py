"""Hessian benchmarks: HVP backends, and SLQ density own (torch) vs PyHessian 0.1 (fixed adapter).

Models (train mode, BatchNorm on batch statistics, float32, CPU): a small MLP whose Hessian can be
diagonalised exactly, a wider MLP, and a small CIFAR ResNet.

1. HVP: one Hessian-vector product, double backward on a graph built once vs torch.func jvp(grad).
2. Density: the same number of Lanczos steps, one run, *the same start vector* (PyHessian's own
   Rademacher draw under the seed), full reorthogonalisation in both; time includes building the
   gradient graph and smoothing.  Accuracy: W1 between the two quadratures (relative to the spectral
   range) and, where the exact spectrum is available, W1 of each to it.
3. Lanczos over its HVPs: in the same run, our Lanczos loop against the same Hessian-vector products
   alone (the very vectors it multiplied, recorded once, on the same graph), interleaved; and the
   time inside full reorthogonalisation (two passes over the stored basis per step) over the HVPs.
Bars: on ResNet-8 own density ≤ 1.10 × its HVPs alone (3.; issue 10's restatement of the ResNet bar
against the HVP floor); everywhere never slower than PyHessian's (2.).  The MLPs' Lanczos / HVPs ratio
is printed too.
Timings are the best of --repeat interleaved runs.
Usage: PYTHONPATH=. python benchmarks/hessian.py [--steps 64 256] [--repeat 3] [--threads 1] [--models ResNet]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn as nn

from _tables import recorded
from taylor import best  # benchmarks/taylor.py (the script's directory is on sys.path)
import torch_qode.bridge.lanczos as _lz
from torch_qode.bridge.lanczos import lanczos
from torch_qode.bridge.pyhessian import PyHessianAdapter
from torch_qode.bridge.spectrum import smooth_density
from torch_qode.models import cifar_resnet, mlp
from torch_qode.bridge.taylor import TaylorExpansion, make_loss_fn


def cases():
    g = torch.Generator().manual_seed(0)
    out = []
    m0 = mlp([16, 32, 32, 4], activation="tanh")
    out.append(("MLP 16-32-32-4, batch 128", m0, (torch.randn(128, 16, generator=g),
                                                  torch.randint(0, 4, (128,), generator=g)), True))
    m1 = mlp([64, 128, 128, 10], activation="tanh")
    out.append(("MLP 64-128-128-10, batch 256", m1, (torch.randn(256, 64, generator=g),
                                                     torch.randint(0, 10, (256,), generator=g)), False))
    m2 = cifar_resnet(depth=8, widen=1, num_classes=10)
    out.append(("ResNet-8 (w=1), batch 32x3x32x32", m2, (torch.randn(32, 3, 32, 32, generator=g),
                                                         torch.randint(0, 10, (32,), generator=g)), False))
    return out


def w1(nodes_a, w_a, nodes_b, w_b) -> float:
    x = np.concatenate([nodes_a, nodes_b])
    grid = np.sort(x)
    Fa = np.array([w_a[nodes_a <= t].sum() for t in grid])
    Fb = np.array([w_b[nodes_b <= t].sum() for t in grid])
    return float(np.sum(np.abs(Fa - Fb)[:-1] * np.diff(grid)))


def pyhessian_start(params, seed) -> torch.Tensor:
    """PyHessian's density start vector under torch.manual_seed(seed), flattened and normalised."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        v = [torch.randint_like(p, high=2) for p in params]
    flat = torch.cat([t.reshape(-1) for t in v]).double() * 2 - 1
    return flat / flat.norm()


def run(name, model, batch, exact, steps_list, iters, repeat):
    model.train()
    crit = nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    N = sum(p.numel() for p in params)
    theta0 = torch.cat([p.detach().reshape(-1) for p in params])
    v = torch.randn(N, generator=torch.Generator().manual_seed(1))
    lf = make_loss_fn(model, crit, batch, decompose_norms=False)
    e_db = TaylorExpansion.from_function(lf, theta0, lr=1.0, degree=1, backend="double_backward")
    e_jv = TaylorExpansion.from_function(lf, theta0, lr=1.0, degree=1, backend="jvp")
    t_db, t_jv = best(lambda: e_db.hvp(v), iters, repeat), best(lambda: e_jv.hvp(v), iters, repeat)
    e_jv.release()
    ev = None
    if exact:
        H = e_db.hvp(torch.eye(N)).double()
        ev = np.linalg.eigvalsh(((H + H.T) / 2).numpy())
    e_db.release()
    hvp_row = (name, N, t_db * 1e3, t_jv * 1e3, t_jv / t_db)
    dens_rows = [density_row(name, model, crit, batch, params, N, min(steps, N), ev, repeat) for steps in steps_list]
    return hvp_row, dens_rows


def density_row(name, model, crit, batch, params, N, k, ev, repeat):
    seed = 0
    v0 = pyhessian_start(params, seed)

    vecs = []      # the vectors our Lanczos multiplies, recorded once (untimed) for the HVPs-alone timing
    loop = {}

    def own(record=False):
        exp = TaylorExpansion.from_model(model, crit, batch, lr=1.0, degree=1, backend="double_backward")
        hvp = (lambda v: (vecs.append(v.clone()), exp.hvp(v))[1]) if record else exp.hvp
        reorth, full = [0.0], _lz._full_reorth

        def timed(w, B):        # the time inside full reorthogonalisation (its share of the loop)
            t = time.perf_counter()
            out = full(w, B)
            reorth[0] += time.perf_counter() - t
            return out
        _lz._full_reorth = timed
        try:
            t0 = time.perf_counter()
            lz = lanczos(hvp, N, k, v0=v0, dtype=torch.float32, reorthogonalize="full")
            loop["lanczos"] = time.perf_counter() - t0
        finally:
            _lz._full_reorth = full
        loop["reorth"] = reorth[0]
        exp.release()
        nd, wt = lz.quadrature()
        return smooth_density(nd, wt, steps=k)

    def hvps_alone():
        exp = TaylorExpansion.from_model(model, crit, batch, lr=1.0, degree=1, backend="double_backward")
        t0 = time.perf_counter()
        for v in vecs:
            exp.hvp(v)
        dt = time.perf_counter() - t0
        exp.release()
        return dt

    def pyh():
        h = PyHessianAdapter(model, crit, data=batch, seed=seed)
        ev_, wt_ = h.density(iter=k, n_v=1)
        return smooth_density(np.asarray(ev_[0]), np.asarray(wt_[0]), steps=k)

    own(record=True)
    t_own = t_pyh = t_loop = t_hvp = float("inf")
    t_reorth = 0.0
    for _ in range(repeat):  # interleaved, best of `repeat`: robust to a busy machine
        t0 = time.perf_counter()
        d_own = own()
        t_own = min(t_own, time.perf_counter() - t0)
        if loop["lanczos"] < t_loop:
            t_loop, t_reorth = loop["lanczos"], loop["reorth"]
        t_hvp = min(t_hvp, hvps_alone())
        t0 = time.perf_counter()
        d_pyh = pyh()
        t_pyh = min(t_pyh, time.perf_counter() - t0)
    span = float(max(d_own.nodes.max(), d_pyh.nodes.max()) - min(d_own.nodes.min(), d_pyh.nodes.min()))
    between = w1(d_own.nodes, d_own.weights, d_pyh.nodes, d_pyh.weights) / span
    to_exact = ("–", "–")
    if ev is not None:
        we = np.full(ev.size, 1.0 / ev.size)
        rng = float(ev.max() - ev.min())
        to_exact = (f"{w1(d_own.nodes, d_own.weights, ev, we) / rng:.4f}",
                    f"{w1(d_pyh.nodes, d_pyh.weights, ev, we) / rng:.4f}")
    top = (float(d_own.nodes.max()), float(d_pyh.nodes.max()))
    return (name, N, k, t_own, t_pyh, t_pyh / t_own, between, *to_exact, *top, t_loop, t_hvp, t_loop / t_hvp,
            t_reorth / t_hvp)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[64, 256],
                    help="Lanczos steps (the paper's code used 256)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", nargs="+", default=None, help="only the models whose name contains one of these")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [run(name, m, b, ex, args.steps, args.iters, args.repeat) for name, m, b, ex in cases()
            if args.models is None or any(s in name for s in args.models)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, float32, one SLQ run each, "
          f"best of {args.repeat}\n")
    print("HVP, one vector (best of 3 x iters)\n")
    print("| model | N | double backward (ms) | jvp(grad) (ms) | jvp / double backward |")
    print("|---|---:|---:|---:|---:|")
    for r, _ in rows:
        print(f"| {r[0]} | {r[1]:,} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.2f} |")
    print("\nSLQ density, same Lanczos steps (capped at N), same start vector, full reorthogonalisation\n")
    print("| model | N | steps | own (s) | PyHessian-fixed (s) | speed-up | W1(own, PyH)/range | "
          "W1(own, exact)/range | W1(PyH, exact)/range | top Ritz own | top Ritz PyH |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    dens = [d for _, ds in rows for d in ds]
    for r in dens:
        print(f"| {r[0]} | {r[1]:,} | {r[2]} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.2f}x | {r[6]:.2e} | {r[7]} | {r[8]} "
              f"| {r[9]:.5g} | {r[10]:.5g} |")
    print("\nOur Lanczos loop against its Hessian-vector products alone (same vectors, same graph, same run)\n")
    print("| model | N | steps | Lanczos (s) | its HVPs alone (s) | Lanczos / HVPs | of which reorthogonalisation "
          "/ HVPs | PyHessian / own density |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in dens:
        print(f"| {r[0]} | {r[1]:,} | {r[2]} | {r[11]:.3f} | {r[12]:.3f} | {r[13]:.3f} | {r[14]:.2f} | {r[5]:.2f}x |")
    # issue 10 restated the ResNet's bar against its HVP floor (the MLPs' ratios are in the table above)
    resnet = lambda r: r[0].startswith("ResNet")   # noqa: E731
    for title, ok, which in (("own density <= 1.10 x its HVPs alone, on ResNet-8", lambda r: r[13] <= 1.10, resnet),
                             ("own density never slower than PyHessian's", lambda r: r[5] >= 1.0, lambda r: True)):
        rows_ = [r for r in dens if which(r)]
        if rows_:
            print(f"bar ({title}): " + "; ".join(f"{r[0].split(',')[0]} @ {r[2]} steps: "
                                                 f"{'met' if ok(r) else 'NOT met'}" for r in rows_))


if __name__ == "__main__":
    with recorded("hessian", "Hessian: SLQ density against PyHessian"):
        main()
