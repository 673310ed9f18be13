"""Decomposed normalisation layers: BatchNorm / InstanceNorm / LayerNorm / GroupNorm / RMSNorm as
elementary tensor ops, so that autograd differentiates them correctly to any order.

The Taylor terms need ∇³L for F2 = −(η/2)∇³L (Eq. II.1, V.5); PyTorch's fused norm kernels refuse or
corrupt third derivatives (pytorch/pytorch#186256, #175754, #196699).  :func:`decomposed_norms` swaps
them for functional re-implementations, :func:`batch_stats_no_update` keeps the fused kernels (exact to
second order) without touching running buffers, and :func:`fused_norm_nodes` finds the fused nodes in
a loss graph.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

__all__ = ["decomposed_norms", "batch_stats_no_update", "fused_norm_nodes"]

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm,
          nn.GroupNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _shape_for(x: torch.Tensor) -> list[int]:
    return [1, -1] + [1] * (x.dim() - 2)


def _bn_forward(self, x: torch.Tensor, update: bool) -> torch.Tensor:
    batch_stats = self.training or self.running_mean is None
    if batch_stats:
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dims, keepdim=True)
        xc = x - mean
        var = (xc * xc).mean(dims, keepdim=True)
        if update and self.training and self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                mom = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                cnt = x.numel() // x.shape[1]
                unbiased = var.detach().reshape(-1) * (cnt / max(cnt - 1, 1))
                self.running_mean.mul_(1 - mom).add_(mean.detach().reshape(-1), alpha=mom)
                self.running_var.mul_(1 - mom).add_(unbiased, alpha=mom)
    else:
        mean = self.running_mean.view(_shape_for(x))
        xc = x - mean
        var = self.running_var.view(_shape_for(x))
    y = xc * torch.rsqrt(var + self.eps)
    if self.affine:
        y = y * self.weight.view(_shape_for(x)) + self.bias.view(_shape_for(x))
    return y


def _in_forward(self, x: torch.Tensor, update: bool) -> torch.Tensor:
    if x.dim() == self._get_no_batch_dim():          # unbatched input, as nn.InstanceNorm: a batch of one
        return _in_forward(self, x.unsqueeze(0), update).squeeze(0)
    if self.track_running_stats and not self.training:
        mean = self.running_mean.view(_shape_for(x))
        xc = x - mean
        var = self.running_var.view(_shape_for(x))
    else:
        dims = list(range(2, x.dim()))
        mean = x.mean(dims, keepdim=True)
        xc = x - mean
        var = (xc * xc).mean(dims, keepdim=True)
        if update and self.track_running_stats and self.running_mean is not None:
            # as F.instance_norm: the per-instance statistics averaged over the batch; momentum None -> 0
            with torch.no_grad():
                mom = 0.0 if self.momentum is None else self.momentum
                n, c = x.shape[:2]
                cnt = x[0, 0].numel()
                unbiased = var.detach().reshape(n, c).mean(0) * (cnt / max(cnt - 1, 1))
                self.running_mean.mul_(1 - mom).add_(mean.detach().reshape(n, c).mean(0), alpha=mom)
                self.running_var.mul_(1 - mom).add_(unbiased, alpha=mom)
    y = xc * torch.rsqrt(var + self.eps)
    if self.affine:
        y = y * self.weight.view(_shape_for(x)) + self.bias.view(_shape_for(x))
    return y


def _ln_forward(self, x: torch.Tensor) -> torch.Tensor:
    dims = list(range(x.dim() - len(self.normalized_shape), x.dim()))
    mean = x.mean(dims, keepdim=True)
    xc = x - mean
    var = (xc * xc).mean(dims, keepdim=True)
    y = xc * torch.rsqrt(var + self.eps)
    if self.weight is not None:
        y = y * self.weight
    if getattr(self, "bias", None) is not None:
        y = y + self.bias
    return y


def _gn_forward(self, x: torch.Tensor) -> torch.Tensor:
    n, c = x.shape[:2]
    xg = x.reshape(n, self.num_groups, -1)
    mean = xg.mean(-1, keepdim=True)
    xc = xg - mean
    var = (xc * xc).mean(-1, keepdim=True)
    y = (xc * torch.rsqrt(var + self.eps)).reshape(x.shape)
    if self.affine:
        y = y * self.weight.view(_shape_for(x)) + self.bias.view(_shape_for(x))
    return y


def _rms_forward(self, x: torch.Tensor) -> torch.Tensor:
    dims = list(range(x.dim() - len(self.normalized_shape), x.dim()))
    eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
    y = x * torch.rsqrt((x * x).mean(dims, keepdim=True) + eps)
    if self.weight is not None:
        y = y * self.weight
    return y


@contextlib.contextmanager
def decomposed_norms(model: nn.Module, *, update_running_stats: bool = False):
    """Run BatchNorm / InstanceNorm / LayerNorm / GroupNorm / RMSNorm as elementary tensor ops.

    PyTorch's fused normalisation kernels have correct first and second derivatives, but their
    third-order derivatives are refused (double backward of ``batch_norm``) or silently wrong
    (``layer_norm``, and forward-mode over ``batch_norm``/``instance_norm``; pytorch/pytorch#186256,
    #175754, #196699).  Inside this context every such module computes the same function from
    mean/var/rsqrt, which autograd and torch.func differentiate correctly to any order.

    BatchNorm semantics: a module in training mode normalises with the *batch* statistics (as in
    training); its running buffers are left untouched unless ``update_running_stats=True``, in which
    case they are updated exactly like ``nn.BatchNorm`` does (momentum / cumulative average,
    unbiased variance).  A module in eval mode uses its running statistics.  InstanceNorm with
    ``track_running_stats=True`` follows the same rule (with ``update_running_stats=True`` a
    training-mode module updates its buffers as ``F.instance_norm`` does).  The modules are restored
    on exit.  Wrapping a training step's forward in
    ``decomposed_norms(model, update_running_stats=True)`` computes the same loss and buffer updates
    as the fused layers, and leaves a graph that :meth:`TaylorExpansion.from_loss` accepts at degree ≥ 2.

    Args:
        model: The module whose normalisation layers are decomposed (all of its submodules).
        update_running_stats: Update the running buffers of training-mode layers, as described above.

    Yields:
        ``model`` itself, its normalisation layers decomposed (a context manager: the modules are
        restored when it exits).

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    patched = []
    try:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                fwd = (lambda x, _m=m: _bn_forward(_m, x, update_running_stats))
            elif isinstance(m, nn.modules.instancenorm._InstanceNorm):
                fwd = (lambda x, _m=m: _in_forward(_m, x, update_running_stats))
            elif isinstance(m, nn.LayerNorm):
                fwd = (lambda x, _m=m: _ln_forward(_m, x))
            elif isinstance(m, nn.GroupNorm):
                fwd = (lambda x, _m=m: _gn_forward(_m, x))
            elif hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm):
                fwd = (lambda x, _m=m: _rms_forward(_m, x))
            else:
                continue
            had = "forward" in m.__dict__
            patched.append((m, had, m.__dict__.get("forward")))
            m.forward = fwd
        yield model
    finally:
        for m, had, old in patched:
            if had:
                m.forward = old
            else:
                del m.forward


@contextlib.contextmanager
def batch_stats_no_update(model: nn.Module):
    """Keep the fused kernels but stop BatchNorm from updating its running buffers.

    Every BatchNorm module in training mode temporarily gets ``track_running_stats = False``: it
    normalises with the batch statistics exactly as in training and passes no running buffers to
    the kernel.  Enough for first and second derivatives (gradients, Hessian-vector products).
    """
    changed = [m for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    try:
        for m in changed:
            m.track_running_stats = False
        yield model
    finally:
        for m in changed:
            m.track_running_stats = True


_FUSED = ("batchnorm", "layernorm", "rmsnorm")


def fused_norm_nodes(output: torch.Tensor, limit: int = 1_000_000) -> list[str]:
    """Names of autograd nodes in ``output``'s graph whose third derivatives PyTorch gets wrong.

    Fused batch / instance / layer / RMS norm in training mode (eval-mode batch norm is an affine map
    and is fine).  The walk visits every node once.
    """
    found, seen = [], set()
    stack = [output.grad_fn] if output.grad_fn is not None else []
    while stack and len(seen) < limit:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        name = node.name()
        low = name.lower()
        if any(k in low for k in _FUSED):
            training = getattr(node, "_saved_training", True)
            if training is not False and name not in found:
                found.append(name)
        stack.extend(f for f, _ in node.next_functions if f is not None)
    return found
