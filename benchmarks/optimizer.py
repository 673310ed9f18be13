"""QODE step cost against torch.optim.SGD, in one process (ratios, not absolute times).

Measured per model (an MLP and a small CIFAR ResNet), interleaving the optimizers step by step so
machine noise hits both alike, median over steps:

* classical QODE step (``mode="classical"``, ``sparsity=0``) / SGD step        — bar ≤ 1.10
* quantum-window step at Carleman order N = 1, streamed noise / (one closure + one Hessian-vector
  product on a retained graph, timed in the same loop)             — bar ≤ 1.20 on ResNet-8
  (issue 10 restates the ResNet's old bar of 3 SGD steps against that floor: an exact HVP alone costs
  3.0 forward+backward passes on ResNet-8 on this CPU, ``benchmarks/hvp_floor.py``); the MLP keeps
  its bar of ≤ 3 SGD steps (window step / SGD), and its floor ratio is printed too;
  the upload (Taylor expansion + dissipation check) and the window end (solve + tomography) are
  reported separately, they happen once per window;
* classical QODE / SGD on a 257-parameter MLP (30-8-1), where Python overhead shows      — bar ≤ 1.10,
  and the host synchronisations (``aten::_local_scalar_dense`` under ``torch.profiler``) per
  classical step of each (SGD makes none);
* N = 2 on a small support (``upload="sparse"``, 90% of the weights pruned, explicit Taylor terms).

With ``--repeat R`` each model's measurement runs R times (fresh optimizers, same data) and the
ratios are printed as their range and median: the machine is shared, and one run's ratio moves by
±0.1 with the load.

Usage: python benchmarks/optimizer.py [--threads 1] [--steps 40] [--repeat 1] [--models MLP ResNet small order2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from _tables import recorded
from torch_qode.models import cifar_resnet
from torch_qode.training.qode import QODE


def mlp():
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))


def resnet():
    return cifar_resnet(8, 1, 10)


CASES = {"MLP 784-256-10 (203,530 params), batch 128": (mlp, (128, 784)),
         "ResNet-8 (78,042 params), CIFAR 3×32×32, batch 64": (resnet, (64, 3, 32, 32))}


def closure_for(model, opt, x, y, loss_fn=F.cross_entropy):
    def closure():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss
    return closure


def floor_step(model, x, y):
    """What a window step cannot go below: one closure (forward + backward) and one exact
    Hessian-vector product by double backward on a retained graph (the upload's)."""
    params = list(model.parameters())
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
    v = [torch.randn_like(p) for p in params]

    def step():
        for p in params:
            p.grad = None
        F.cross_entropy(model(x), y).backward()
        torch.autograd.grad(grads, params, v, retain_graph=True)
    return step


def timed(opt, closure) -> float:
    t0 = time.perf_counter()
    opt.step(closure)
    return time.perf_counter() - t0


def bench(make, shape, steps: int) -> dict:
    torch.manual_seed(0)
    base = make()
    x, y = torch.randn(*shape), torch.randint(0, 10, (shape[0],))
    models = {k: make() for k in ("sgd", "classical", "quantum")}
    for m in models.values():
        m.load_state_dict(base.state_dict())
    cycle = steps + 2
    opts = {"sgd": torch.optim.SGD(models["sgd"].parameters(), lr=0.01),
            "classical": QODE(models["classical"].parameters(), lr=0.01, mode="classical", sparsity=0.0,
                              cycle=cycle, classical_steps=1),
            "quantum": QODE(models["quantum"].parameters(), lr=0.01, mode="quantum", sparsity=0.0, cycle=cycle,
                            classical_steps=1, carleman_order=1, noise="stream")}
    floor_model = make()
    floor_model.load_state_dict(base.state_dict())
    floor = floor_step(floor_model, x, y)
    times = {k: [] for k in (*opts, "floor")}
    for k in range(cycle):
        for name, opt in opts.items():
            dt = timed(opt, closure_for(models[name], opt, x, y))
            times[name].append(dt)
        t0 = time.perf_counter()
        floor()
        times["floor"].append(time.perf_counter() - t0)
    win = times["quantum"][2:-1]          # window steps, without the upload (1) and the end (last)
    med = {k: statistics.median(v[2:-1]) for k, v in times.items()}
    return {"sgd_ms": 1e3 * med["sgd"], "classical_ratio": med["classical"] / med["sgd"],
            "window_ratio": statistics.median(win) / med["sgd"],
            "floor_ratio": statistics.median(win) / med["floor"],
            "upload_s": times["quantum"][1], "end_s": times["quantum"][-1]}


def small_mlp():
    return nn.Sequential(nn.Linear(30, 8), nn.Tanh(), nn.Linear(8, 1))


def host_syncs(opt, closure, steps: int) -> float:
    """``aten::_local_scalar_dense`` calls per step (host synchronisations on a GPU)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            opt.step(closure)
    return sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense") / steps


def bench_small(steps: int) -> dict:
    """Classical QODE vs SGD on a tiny MLP (257 parameters, batch 32): the optimizer's own overhead."""
    torch.manual_seed(0)
    base = small_mlp()
    x, y = torch.randn(32, 30), torch.randn(32, 1)
    models = {k: small_mlp() for k in ("sgd", "classical")}
    for m in models.values():
        m.load_state_dict(base.state_dict())
    n = sum(p.numel() for p in base.parameters())
    cycle = 10**6                      # no cycle boundary inside the measurement
    opts = {"sgd": torch.optim.SGD(models["sgd"].parameters(), lr=0.01, momentum=0.9),
            "classical": QODE(models["classical"].parameters(), lr=0.01, momentum=0.9, mode="classical",
                              sparsity=0.0, cycle=cycle, classical_steps=1)}

    closures = {k: closure_for(models[k], o, x, y, F.mse_loss) for k, o in opts.items()}
    times = {k: [] for k in opts}
    for _ in range(10 * steps):
        for name, opt in opts.items():
            times[name].append(timed(opt, closures[name]))
    med = {k: statistics.median(v[5:]) for k, v in times.items()}
    syncs = {k: host_syncs(o, closures[k], 20) for k, o in opts.items()}
    return {"n": n, "sgd_us": 1e6 * med["sgd"], "classical_us": 1e6 * med["classical"],
            "ratio": med["classical"] / med["sgd"], "syncs_sgd": syncs["sgd"], "syncs_qode": syncs["classical"]}


def bench_order2(steps: int) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    n = sum(p.numel() for p in model.parameters())
    opt = QODE(model.parameters(), lr=0.05, mode="quantum", sparsity=0.9, upload="sparse", cycle=steps + 2,
               classical_steps=1, carleman_order=2, noise="stream")
    sgd_model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.05)
    t_q, t_s = [], []
    for k in range(steps + 2):
        t_q.append(timed(opt, closure_for(model, opt, x, y)))
        t_s.append(timed(sgd, closure_for(sgd_model, sgd, x, y)))
    rep = opt.reports[0]
    return {"n": n, "support": rep.support_size, "dim": rep.carleman["dim"],
            "window_ratio": statistics.median(t_q[2:-1]) / statistics.median(t_s[2:-1]),
            "upload_s": t_q[1], "end_s": t_q[-1]}


def _span(values, fmt="{:.2f}") -> str:
    """One value, or ``min–max (median m)`` of several."""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(min(values))}–{fmt.format(max(values))} (median {fmt.format(statistics.median(values))})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--models", nargs="+", default=None,
                    help="only the cases whose name contains one of these (MLP, ResNet, small, order2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    want = (lambda name: args.models is None or any(m in name for m in args.models))
    print(f"{args.threads} thread(s), {args.steps} window steps, median per step, {args.repeat} run(s) each\n")
    print("| model | SGD step | classical QODE / SGD (bar ≤ 1.10) | window step, N=1 / SGD (bar ≤ 3 on the MLP) "
          "| window step / (closure + HVP) (bar ≤ 1.20 on ResNet-8) | upload (once) | window end (once) |")
    print("|---|---|---|---|---|---|---|")
    for name, (make, shape) in CASES.items():
        if not want(name):
            continue
        rs = [bench(make, shape, args.steps) for _ in range(args.repeat)]
        col = lambda key: [r[key] for r in rs]   # noqa: E731
        print(f"| {name} | {_span(col('sgd_ms'))} ms | {_span(col('classical_ratio'))} | {_span(col('window_ratio'))} "
              f"| {_span(col('floor_ratio'))} | {_span(col('upload_s'))} s | {_span(col('end_s'))} s |")
    if want("small"):
        rs = [bench_small(args.steps) for _ in range(args.repeat)]
        r = rs[0]
        print(f"\nMLP 30-8-1 ({r['n']} params), batch 32, momentum 0.9: "
              f"SGD step {_span([x['sgd_us'] for x in rs], '{:.0f}')} µs, "
              f"classical QODE {_span([x['classical_us'] for x in rs], '{:.0f}')} µs, ratio "
              f"{_span([x['ratio'] for x in rs], '{:.3f}')} (bar ≤ 1.10); host syncs per classical step: "
              f"SGD {r['syncs_sgd']:g}, QODE {r['syncs_qode']:g}")
    if want("order2"):
        r = bench_order2(args.steps)
        print(f"\nN = 2, sparse upload: MLP 16-16-4 ({r['n']} params, support {r['support']}, "
              f"Carleman Δ = {r['dim']}): "
              f"window step {r['window_ratio']:.1f}× an SGD step; upload {r['upload_s']:.2f} s, window end "
              f"{r['end_s']:.2f} s")


if __name__ == "__main__":
    with recorded("optimizer", "Optimizer step times"):
        main()
