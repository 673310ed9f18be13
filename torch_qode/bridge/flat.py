"""Private helpers of the autograd bridge (floor 2): the flat-parameter convention and side-effect guards.

Flat-parameter convention (shared by :mod:`taylor`, :mod:`pruning`, :mod:`dissipation` and the
optimizer): a list of parameter tensors ``params`` is viewed as the one vector
``torch.cat([p.reshape(-1) for p in params])``.  A *support* ``S`` is a 1-D int64 tensor of strictly
increasing flat indices into that vector; ``u`` lives in ``R^|S|``.  ``support=None`` means all entries.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

__all__ = [
    "param_list", "numel", "flatten", "unflatten", "check_support", "scatter_rows",
    "preserved", "decomposed_norms", "batch_stats_no_update", "check_no_torch_prune", "check_model_loss_batch",
    "make_loss_fn",
    "fused_norm_nodes", "as_real", "as_int", "forked_rng",
]


from .._checks import as_int, as_real  # noqa: F401  (re-exported for the bridge's callers)


def forked_rng(tensors: Sequence[torch.Tensor]):
    """``torch.random.fork_rng`` over the CPU and every CUDA device ``tensors`` live on: random draws
    inside (dropout, augmentation) leave the global generators exactly as they were."""
    devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    return torch.random.fork_rng(devices=devices)


# ----------------------------------------------------------------------------------- parameters
def param_list(params, name: str = "params") -> list[torch.Tensor]:
    """``params`` as a non-empty list of floating tensors (accepts an iterable or an ``nn.Module``)."""
    if isinstance(params, nn.Module):
        params = [p for p in params.parameters() if p.requires_grad]
    elif isinstance(params, torch.Tensor):
        raise TypeError(f"{name} must be a list of tensors (the optimizer's parameter order), "
                        "not a single tensor; wrap it as [tensor]")
    try:
        out = list(params)
    except TypeError as exc:
        raise TypeError(f"{name} must be an iterable of torch tensors, got {type(params).__name__}") from exc
    if not out:
        raise ValueError(f"{name} is empty: at least one parameter tensor is needed")
    for i, p in enumerate(out):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch tensor, got {type(p).__name__}")
        if not p.is_floating_point():
            raise TypeError(f"{name}[{i}] must be a floating tensor (float32/float64/...), got {p.dtype}")
    dev = {p.device for p in out}
    if len(dev) > 1:
        raise ValueError(f"{name} live on several devices {sorted(map(str, dev))}; one device is supported")
    return out


def numel(params: Sequence[torch.Tensor]) -> int:
    return int(sum(p.numel() for p in params))


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The flat vector ``cat([t.reshape(-1) ...])`` (differentiable)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vec: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split a flat ``(N,)`` vector into views shaped like ``like``."""
    sizes = [p.numel() for p in like]
    return [c.view(p.shape) for c, p in zip(vec.split(sizes), like)]


def check_support(support, size: int, device=None, name: str = "support") -> Optional[torch.Tensor]:
    """Validate a support: ``None`` (all entries) or strictly increasing int indices in ``[0, size)``."""
    if support is None:
        return None
    if isinstance(support, torch.Tensor):
        s = support.detach()
    else:
        try:
            s = torch.as_tensor(support)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{name} must be None or a 1-D LongTensor of flat indices") from exc
    if s.numel() == 0:
        raise ValueError(f"{name} is empty: at least one flat index is needed (None means all)")
    if s.dtype in (torch.bool,) or s.is_floating_point() or s.is_complex():
        raise TypeError(f"{name} must hold integer flat indices (int64), got dtype {s.dtype}")
    if s.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(s.shape)}")
    s = s.to(dtype=torch.int64, device=device)
    lo, hi = int(s.min()), int(s.max())
    if lo < 0 or hi >= size:
        raise ValueError(f"{name} indices must lie in [0, {size}) (the flat parameter vector); "
                         f"got range [{lo}, {hi}]")
    if s.numel() > 1 and not bool((s[1:] > s[:-1]).all()):
        raise ValueError(f"{name} must be strictly increasing (sorted, no duplicates)")
    return s


def scatter_rows(V: torch.Tensor, support: Optional[torch.Tensor], size: int) -> torch.Tensor:
    """Rows ``V (m, n)`` on the support as full rows ``(m, size)`` (zeros off the support)."""
    if support is None:
        return V
    out = V.new_zeros(V.shape[0], size)
    out[:, support] = V
    return out


# ------------------------------------------------------------------------------ side-effect guards
@contextlib.contextmanager
def preserved(model: Optional[nn.Module] = None, params: Sequence[torch.Tensor] = ()):
    """Restore, on exit, the training flag of every module, every buffer and every ``.grad``.

    ``.grad`` tensors are restored by identity (the very same tensor object, or ``None``) and value.
    Buffers are swapped for copies during the block and the originals put back untouched: not even
    their version counters move, so an autograd graph that saved them (BatchNorm's running
    statistics, in an optimizer's retained upload graph) stays valid.
    """
    params = list(params)
    if model is not None:
        params = params + [p for p in model.parameters() if all(p is not q for q in params)]
    grads = [(p, p.grad, None if p.grad is None else p.grad.detach().clone()) for p in params]
    modes = [] if model is None else [(m, m.training) for m in model.modules()]
    bufs = [] if model is None else [(m, name, b) for m in model.modules()
                                     for name, b in m._buffers.items() if b is not None]
    for m, name, b in bufs:
        m._buffers[name] = b.detach().clone()
    try:
        yield
    finally:
        with torch.no_grad():
            for p, g, val in grads:
                if g is not None:
                    g.copy_(val)
                p.grad = g
        for m, name, b in bufs:
            m._buffers[name] = b
        for m, flag in modes:
            m.training = flag


# --------------------------------------------------------------------------------- normalisations
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


def check_no_torch_prune(model: nn.Module) -> None:
    """Refuse models re-parametrised by ``torch.nn.utils.prune`` (``weight_orig`` × ``weight_mask``).

    The Hessian w.r.t. ``weight_orig`` is ``diag(mask) H diag(mask)``: it adds spurious zero
    eigenvalues for every pruned entry and is not the Hessian of the pruned weights.
    """
    from torch.nn.utils import prune as _prune

    for mname, m in model.named_modules():
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, _prune.BasePruningMethod):
                pname = getattr(hook, "_tensor_name", "weight")
                where = f"{mname}.{pname}" if mname else pname
                raise ValueError(
                    f"model: '{where}' is re-parametrised by torch.nn.utils.prune ({pname}_orig × {pname}_mask); "
                    f"its Hessian would be taken w.r.t. {pname}_orig with spurious zero modes for every pruned "
                    f"entry. Call torch.nn.utils.prune.remove(module, '{pname}') first, or prune with "
                    "torch_qode.pruning.MagnitudePruner (plain parameters) and pass support=pruner.support()")


# ----------------------------------------------------------------------------------- loss closure
def _named(model: nn.Module, params: Sequence[torch.Tensor]) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    out = []
    for i, p in enumerate(params):
        if id(p) not in names:
            raise ValueError(f"params[{i}] is not a parameter of the model")
        out.append(names[id(p)])
    return out


def check_model_loss_batch(model, loss_fn, batch, names=("model", "criterion", "batch")) -> None:
    """``model`` an ``nn.Module``, ``loss_fn`` callable, ``batch`` a pair ``(inputs, targets)``; errors
    name the caller's argument."""
    m, l, b = names
    if not isinstance(model, nn.Module):
        raise TypeError(f"{m} must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"{l} must be callable: (outputs, targets) -> scalar loss")
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError(f"{b} must be a pair (inputs, targets)")


def make_loss_fn(model: nn.Module, criterion: Callable, batch, params: Optional[Sequence[torch.Tensor]] = None,
                 *, seed: int = 0, decompose_norms: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """A pure function ``theta (N,) -> loss`` of the flat parameter vector, for torch.func.

    ``loss = criterion(model(inputs), targets)`` with ``batch = (inputs, targets)``; the model's other
    parameters keep their current values.  Normalisation layers run decomposed
    (:func:`decomposed_norms`; with ``decompose_norms=False`` the fused kernels are kept, which is
    faster and exact up to second order, see :func:`batch_stats_no_update`): a BatchNorm in
    training mode uses the batch statistics and never updates its running buffers.  Randomness (dropout) is re-seeded with ``seed`` on every call, so
    every evaluation sees the same masks, and the global RNG state is left as it was.
    """
    check_model_loss_batch(model, criterion, batch)
    check_no_torch_prune(model)
    params = param_list(model if params is None else params)
    names = _named(model, params)
    inputs, targets = batch
    devices = [params[0].device] if params[0].device.type == "cuda" else []
    norms = decomposed_norms if decompose_norms else batch_stats_no_update

    def loss_fn(theta: torch.Tensor) -> torch.Tensor:
        tensors = dict(zip(names, unflatten(theta, params)))
        with torch.random.fork_rng(devices=devices), norms(model):
            torch.manual_seed(seed)
            out = torch.func.functional_call(model, tensors, (inputs,), strict=False, tie_weights=True)
            return criterion(out, targets)

    loss_fn.params = params  # type: ignore[attr-defined]
    loss_fn.names = names  # type: ignore[attr-defined]
    return loss_fn
