"""Distributed benchmark (issue 12): strong scaling of a quantum-window step and of an SLQ density.

The same global batch on 1 process × 1 thread and on N processes × 1 thread (each rank gets 1/N of it;
DDP averages the gradients, QODE's DistComm every Hessian-vector product), gloo on the CPU (NCCL with
``--device cuda`` where there are N GPUs):

1. window step: QODE ``mode="quantum"``, matrix-free order 1, dense upload, MLP 784-256-10 (float32
   model, float64 Carleman state): the median step inside the window (closure + HVP + products' mean
   all-reduce + state update);
2. SLQ density: ``hessian_spectrum(ddp_model, ..., steps=64)``'s density part (64 averaged HVPs);
3. the all-reduce alone: one ``mean_all_reduce`` of an n-vector in float64 (what each window HVP adds).

Timings are medians within one run; the speed-up is 1-process time / N-process time, in wall-clock
time and in the CPU time of rank 0's process (``time.process_time``: on a machine whose cores are
shared with other jobs the wall-clock time of N processes also counts the time a rank waits for a
descheduled peer; the CPU time is the work each rank does).
Usage: PYTHONPATH=. python benchmarks/distributed.py [--nproc 2] [--batch 512] [--steps 24] [--device cpu]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from _tables import recorded
from recipes.launch import backend_for, spawn
from torch_qode import QODE, hessian_spectrum
from torch_qode.bridge.collective import mean_all_reduce, world_group
from torch_qode.models import mlp


def _data(batch: int, device):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 784, generator=g).to(device), torch.randint(0, 10, (batch,), generator=g).to(device))


def case(rank: int, world: int, batch: int, steps: int, device: str) -> dict:
    dev = torch.device(device if device == "cpu" else f"cuda:{rank}")
    torch.manual_seed(0)
    model = mlp([784, 256, 10], activation="relu").to(dev)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    X, y = _data(batch, dev)
    per = batch // world
    x, t = X[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
    opt = QODE(list(model.parameters()), lr=0.01, mode="quantum", cycle=steps + 2, classical_steps=1,
               sparsity=0.0, explicit=False, model=net)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(net(x), t)
        loss.backward()
        return loss

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times, cpu = [], []
    for k in range(steps + 2):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        opt.step(closure)
        sync()
        if 2 <= k < steps + 1:                    # inside the window (not the upload, not the readout)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    out = {"window_step": statistics.median(times), "window_step_cpu": statistics.median(cpu),
           "quantum": opt.reports[0].mode}
    c0 = time.process_time()
    spec = hessian_spectrum(net, F.cross_entropy, (x, t), top_k=1, trace=False, steps=64)
    out["density_cpu"] = time.process_time() - c0
    out["density"] = spec.seconds["density"]
    group = world_group()
    n = sum(p.numel() for p in model.parameters())
    v = torch.randn(n, dtype=torch.float64, device=dev)
    reduce_times = []
    for _ in range(20):
        sync()
        t0 = time.perf_counter()
        mean_all_reduce(v, group)
        sync()
        reduce_times.append(time.perf_counter() - t0)
    out["all_reduce"] = statistics.median(reduce_times)
    out["n"] = n
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=24, help="window length T")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    if a.batch % a.nproc:
        raise SystemExit(f"--batch {a.batch} is not divisible by --nproc {a.nproc}")
    rows = {}
    for world in (1, a.nproc):
        res = spawn(case, world, (a.batch, a.steps, a.device), backend=backend_for(a.device, world), timeout=1200)
        rows[world] = res[0]
        assert all(r["quantum"] == "quantum" for r in res)
    one, many = rows[1], rows[a.nproc]
    print(f"MLP 784-256-10 ({one['n']:,} params), global batch {a.batch}, window T = {a.steps}, {a.device}, "
          f"1 thread per process")
    print(f"{'':34s} {'1 proc':>10s} {f'{a.nproc} procs':>10s} {'speed-up':>9s}")
    for key, label in (("window_step", "window step, wall"), ("window_step_cpu", "window step, CPU of rank 0"),
                       ("density", "SLQ density (64 steps), wall"),
                       ("density_cpu", "hessian_spectrum, CPU of rank 0")):
        print(f"{label:34s} {one[key] * 1e3:8.1f}ms {many[key] * 1e3:8.1f}ms {one[key] / many[key]:8.2f}x")
    print(f"{'mean all-reduce of one HVP, wall':34s} {'':>10s} {many['all_reduce'] * 1e3:8.2f}ms "
          f"({many['all_reduce'] / many['window_step']:.0%} of a {a.nproc}-process window step)")


if __name__ == "__main__":
    with recorded("distributed", "Distributed (DDP) strong scaling", preformatted=True):
        main()
