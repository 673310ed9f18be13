"""Private helpers of the autograd bridge (floor 2): the flat-parameter convention, side-effect guards
and the loss as a pure function of the flat vector (the decomposed norms live in :mod:`.norms`).

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
    "fused_norm_nodes", "forked_rng",
]


from .norms import batch_stats_no_update, decomposed_norms, fused_norm_nodes  # noqa: F401  (moved; old path kept)


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
    """The number of entries of all ``params`` together."""
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
    training mode uses the batch statistics and never updates its running buffers.  Randomness (dropout) is
    re-seeded with ``seed`` on every call, so every evaluation sees the same masks, and the global RNG state
    is left as it was.

    Args:
        model: The module.
        criterion: ``criterion(outputs, targets) -> scalar``.
        batch: ``(inputs, targets)``.
        params: The parameters that ``theta`` stands for (default: the model's trainable ones).
        seed: The seed of every call's randomness.
        decompose_norms: Run normalisation layers decomposed (see above).

    Returns:
        The function ``theta -> loss``.

    Raises:
        TypeError: ``model``, ``criterion`` or ``batch`` is not of the expected kind.
        ValueError: The model holds ``torch.nn.utils.prune`` re-parametrisations.
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
