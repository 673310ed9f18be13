"""What one exact Hessian-vector product costs, against the forward+backward of an SGD step.

A quantum-window step at Carleman order 1 is one closure (forward+backward on the step's batch) plus
one Hessian-vector product on the upload batch; an SLQ density step is one HVP.  Both speed bars of
the optimizer and the density are therefore bounded by HVP / (forward+backward).  This script measures
that ratio for the ways PyTorch offers to take an exact HVP, in one run (ratios, not absolute times):

* ``double backward``: ``autograd.grad(g, params, v, retain_graph=True)`` on a graph built once —
  what QODE's window and PyHessian both use;
* ``linearize``: ``torch.func.linearize`` of ``grad(L)`` at θ0 (tangent pass only; its one-off trace
  cost is printed separately);
* ``batched x4``: four vectors through one ``is_grads_batched`` double backward, time per vector;
* ``channels_last``: double backward with model and input in channels-last layout (conv nets only).

For the ResNet it also splits the double-backward HVP by autograd node (torch.profiler): convolution
double backward, BatchNorm double backward, the rest.
Usage: PYTHONPATH=. python benchmarks/hvp_floor.py [--repeat 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import time
from collections import defaultdict

import torch
import torch.nn as nn
from torch.func import functional_call, grad, linearize

from _tables import table, write_page
from taylor import best  # benchmarks/taylor.py (the script's directory is on sys.path)
from torch_qode.models import cifar_resnet, mlp


def cases():
    g = torch.Generator().manual_seed(0)
    return [("MLP 784-256-10, batch 128", mlp([784, 256, 10]),
             (torch.randn(128, 784, generator=g), torch.randint(0, 10, (128,), generator=g)), False),
            ("ResNet-8 (w=1), batch 64x3x32x32", cifar_resnet(8, 1, 10),
             (torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)), True)]


def by_node(fn, reps: int = 2) -> dict[str, float]:
    """Milliseconds per call of ``fn`` spent in each autograd node (inclusive), by node type."""
    from torch.profiler import profile
    with profile() as prof:
        for _ in range(reps):
            fn()
    out: dict[str, float] = defaultdict(float)
    prefix = "autograd::engine::evaluate_function: "
    for ev in prof.key_averages():
        if ev.key.startswith(prefix):
            out[ev.key[len(prefix):]] += ev.cpu_time_total / 1e3 / reps
    return out


def run(name, model, batch, conv: bool, repeat: int):
    model.train()
    x, y = batch
    crit = nn.CrossEntropyLoss()
    params = list(model.parameters())
    V = [torch.randn_like(p) for p in params]

    def fb():
        torch.autograd.grad(crit(model(x), y), params)

    gr = torch.autograd.grad(crit(model(x), y), params, create_graph=True)

    def db():
        return torch.autograd.grad(gr, params, grad_outputs=V, retain_graph=True)

    names = [n for n, _ in model.named_parameters()]
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def loss_of(*ps):
        bufs = {k: b.clone() for k, b in buffers.items()}  # batch statistics; stored buffers untouched
        return crit(functional_call(model, ({**dict(zip(names, ps)), **bufs}), (x,)), y)

    t0 = time.perf_counter()
    _, lin_fn = linearize(grad(loss_of, argnums=tuple(range(len(params)))), *[p.detach() for p in params])
    t_trace = time.perf_counter() - t0
    ref, out = db(), lin_fn(*V)
    err = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(out, ref))

    k = 4
    Vb = [torch.stack([v.roll(i) for i in range(k)]) for v in V]

    def batched():
        torch.autograd.grad(gr, params, grad_outputs=Vb, retain_graph=True, is_grads_batched=True)

    rows = {"forward+backward": best(fb, 3, repeat), "double backward": best(db, 3, repeat),
            "linearize": best(lambda: lin_fn(*V), 3, repeat),
            f"batched x{k} (per vector)": best(batched, 1, repeat) / k}
    split = None
    if conv:
        mcl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        xcl, pcl = x.contiguous(memory_format=torch.channels_last), list(mcl.parameters())
        gcl = torch.autograd.grad(crit(mcl(xcl), y), pcl, create_graph=True)
        rows["channels_last"] = best(lambda: torch.autograd.grad(gcl, pcl, grad_outputs=V, retain_graph=True),
                                     3, repeat)
        nodes = by_node(db)
        conv_ms = sum(v for k_, v in nodes.items() if k_.startswith("ConvolutionBackwardBackward"))
        bn_ms = sum(v for k_, v in nodes.items() if k_.startswith("NativeBatchNormBackwardBackward"))
        split = (conv_ms, bn_ms)
    return rows, t_trace, err, split


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    head = f"{args.threads} thread(s); best of {args.repeat}; ratio = time / forward+backward."
    print(head + "\n")
    print("| model | HVP method | ms | / forward+backward |\n|---|---|---:|---:|")
    rows_md, notes = [], []
    for name, model, batch, conv in cases():
        rows, t_trace, err, split = run(name, model, batch, conv, args.repeat)
        base = rows["forward+backward"]
        for method, t in rows.items():
            extra = f" (+{t_trace:.2f} s trace once; rel. diff to double backward {err:.1e})" \
                if method == "linearize" else ""
            rows_md.append((name, method + extra, f"{1e3 * t:.1f}", f"{t / base:.2f}"))
            print(f"| {name} | {method}{extra} | {1e3 * t:.1f} | {t / base:.2f} |")
        if split is not None:
            total = 1e3 * rows["double backward"]
            notes.append(f"{name}: double-backward HVP by autograd node (profiled, inclusive): convolution "
                         f"{split[0]:.0f} ms, BatchNorm {split[1]:.0f} ms, of {total:.0f} ms timed.")
    for line in notes:
        print("\n" + line)
    tail = ("A window step costs at least forward+backward + one HVP, so its ratio to an SGD step is at "
            "least 1 + HVP/(forward+backward) of the fastest exact row.")
    print("\n" + tail)
    write_page("hvp_floor", "The HVP floor", head,
               table(["model", "HVP method", "ms", "/ forward+backward"], rows_md, align="llrr"),
               *[f"- {line}" for line in notes], tail)


if __name__ == "__main__":
    main()
