"""Tiny models and independent references for the autograd-bridge tests (taylor, dissipation, pruning).

The references here deliberately avoid torch_qode: the flat loss is built with
``torch.func.functional_call`` directly and differentiated with ``torch.autograd.functional``.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def ce_closure(model: nn.Module, opt, x, y):
    """The usual closure: zero the gradients, cross-entropy of ``model(x)`` against ``y``, backward."""
    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def tiny_mlp(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)


def tiny_cnn(seed: int = 0, dtype=torch.float64) -> nn.Module:
    """Conv -> BatchNorm -> tanh -> linear: exercises BatchNorm and a 4-D input."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(),
                         nn.Linear(2 * 2 * 2, 3)).to(dtype)


def mlp_batch(n: int = 10, seed: int = 1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def cnn_batch(n: int = 6, seed: int = 1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 4, 4, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def reference_loss(model: nn.Module, batch, criterion=nn.functional.cross_entropy):
    """theta -> loss with the model's own (fused) layers; BatchNorm in train mode on batch statistics.

    Running buffers are not touched: buffers are passed as clones, and train-mode BatchNorm gets
    track_running_stats turned off by the caller-independent trick of handing it None buffers.
    """
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    x, y = batch
    bufs = {n: (None if ("running" in n or "num_batches" in n) and model.training else b.clone())
            for n, b in model.named_buffers()}

    def f(theta):
        d = {n: t.view(s) for n, t, s in zip(names, theta.split(sizes), shapes)}
        d.update(bufs)
        return criterion(torch.func.functional_call(model, d, (x,)), y)

    return f


def state_snapshot(model: nn.Module) -> dict:
    """Everything a call must leave unchanged: grads (identity and value), modes, buffers."""
    return {
        "grads": [(p.grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()],
        "modes": [m.training for m in model.modules()],
        "buffers": [b.clone() for b in model.buffers()],
        "params": [p.detach().clone() for p in model.parameters()],
    }


def assert_unchanged(model: nn.Module, snap: dict) -> None:
    for p, (g, val) in zip(model.parameters(), snap["grads"]):
        assert p.grad is g, "a .grad tensor was replaced"
        if g is not None:
            assert torch.equal(p.grad, val), ".grad values changed"
    assert [m.training for m in model.modules()] == snap["modes"], "training modes changed"
    for b, val in zip(model.buffers(), snap["buffers"]):
        assert torch.equal(b, val), "a buffer (BatchNorm running statistics?) changed"
    for p, val in zip(model.parameters(), snap["params"]):
        assert torch.equal(p.detach(), val), "a parameter changed"
