"""HVP / third-order product backends of torch_qode.bridge.taylor: double backward vs torch.func jvp(grad).

For an MLP and a small CIFAR ResNet (BatchNorm, train mode), in one process so ratios are fair:
  * setup: building the expansion (double backward: the create_graph gradient; jvp: one gradient);
  * hvp x1: one Hessian-vector product on the whole parameter vector;
  * hvp x8: eight columns at once (is_grads_batched vs vmap);
  * third x1: one third-order product ∇³L[a, b].
Every timing is the best of --repeat runs of --iters products.  The last column is
t(jvp) / t(double_backward): > 1 means double backward is faster; ``backend="auto"`` follows the
majority of the hvp rows (torch_qode.bridge.taylor.AUTO_BACKEND).
Usage: PYTHONPATH=. python benchmarks/taylor.py [--iters 5] [--repeat 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn

from _tables import recorded
from torch_qode.models import cifar_resnet, mlp
from torch_qode.bridge.taylor import AUTO_BACKEND, TaylorExpansion, decomposed_norms, make_loss_fn


def best(fn, iters: int, repeat: int) -> float:
    fn()  # warm-up
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        out.append((time.perf_counter() - t0) / iters)
    return min(out)


def cases():
    g = torch.Generator().manual_seed(0)
    m1 = mlp([64, 128, 128, 10], activation="tanh")
    x1, y1 = torch.randn(256, 64, generator=g), torch.randint(0, 10, (256,), generator=g)
    m2 = cifar_resnet(depth=8, widen=1, num_classes=10)
    x2, y2 = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
    return [("MLP 64-128-128-10, batch 256", m1, (x1, y1)), ("ResNet-8 (w=1), batch 32x3x32x32", m2, (x2, y2))]


def run(name, model, batch, iters, repeat):
    model.train()
    crit = nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    N = sum(p.numel() for p in params)
    theta0 = torch.cat([p.detach().reshape(-1) for p in params])
    gen = torch.Generator().manual_seed(1)
    V1 = torch.randn(N, generator=gen)
    V8 = torch.randn(N, 8, generator=gen)
    A = torch.randn(N, generator=gen)
    rows = []

    def graph_exp(degree):
        with decomposed_norms(model):
            loss = crit(model(batch[0]), batch[1])
        return TaylorExpansion.from_loss(loss, params, lr=0.1, degree=degree)

    loss_fn = make_loss_fn(model, crit, batch)
    res = {}
    for backend in ("double_backward", "jvp"):
        if backend == "double_backward":
            setup = best(lambda: graph_exp(2).release(), 1, repeat)
            exp = graph_exp(2)
        else:
            setup = best(lambda: TaylorExpansion.from_function(loss_fn, theta0, lr=0.1, backend="jvp").release(),
                         1, repeat)
            exp = TaylorExpansion.from_function(loss_fn, theta0, lr=0.1, backend="jvp")
        res[backend] = {
            "setup": setup,
            "hvp x1": best(lambda: exp.hvp(V1), iters, repeat),
            "hvp x8": best(lambda: exp.hvp(V8), max(1, iters // 2), repeat),
            "third x1": best(lambda: exp.third(A, V1), max(1, iters // 2), repeat),
        }
        exp.release()
    for op in ("setup", "hvp x1", "hvp x8", "third x1"):
        db, jv = res["double_backward"][op], res["jvp"][op]
        rows.append((name, N, op, db * 1e3, jv * 1e3, jv / db))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, float32; "
          f"best of {args.repeat} x {args.iters} products\n")
    print("| model | N | op | double backward (ms) | jvp(grad) (ms) | jvp / double backward |")
    print("|---|---:|---|---:|---:|---:|")
    votes = 0
    for name, model, batch in cases():
        for row in run(name, model, batch, args.iters, args.repeat):
            print(f"| {row[0]} | {row[1]:,} | {row[2]} | {row[3]:.2f} | {row[4]:.2f} | {row[5]:.2f} |")
            if row[2].startswith("hvp"):
                votes += 1 if row[5] > 1 else -1
    pick = "double_backward" if votes >= 0 else "jvp"
    print(f"\nfaster HVP backend on this machine: {pick}; AUTO_BACKEND = {AUTO_BACKEND!r}"
          + ("" if pick == AUTO_BACKEND else "  <-- differs: revisit torch_qode.bridge.taylor.AUTO_BACKEND"))


if __name__ == "__main__":
    with recorded("taylor", "Taylor-term backends"):
        main()
