"""torch.distributed helpers for the Hessian tools and the window (DESIGN.md, "Distributed semantics").

Under DistributedDataParallel each rank holds a shard of the global batch and DDP averages the
gradients.  Every Hessian-vector product (Lanczos, Hutchinson, the window's F1..Fq) must be averaged
the same way, :func:`mean_all_reduce`, so that the spectrum and the window's ODE are those of the
global batch's mean loss (equal shards: the mean of the shards' means).  Every rank issues the same
collectives in the same order; the results of ``all_reduce`` are identical on every rank, so what is
computed from them (Lanczos' α, β, the verdict) is too.

Nothing here runs a collective when the group is ``None`` (one process): callers pass the group that
:func:`hvp_group` / :func:`world_group` resolved, which is ``None`` unless there are ≥ 2 ranks.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

__all__ = ["initialized", "group_size", "group_rank", "world_group", "hvp_group", "unwrap", "mean_all_reduce",
           "any_flag", "broadcast_tensor", "broadcast_object", "gather_objects", "refuse_sharded"]


def initialized() -> bool:
    """``torch.distributed`` is available and a default process group is initialised."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _dist():
    import torch.distributed as dist

    return dist


def group_size(group) -> int:
    """Ranks in ``group`` (1 when ``group`` is ``None``: one process)."""
    return 1 if group is None else _dist().get_world_size(group)


def group_rank(group) -> int:
    """This process's rank in ``group`` (0 when ``group`` is ``None``)."""
    return 0 if group is None else _dist().get_rank(group)


def _check_group(process_group, name: str):
    dist = _dist()
    if not initialized():
        raise ValueError(f"{name} was given but torch.distributed is not initialised: call "
                         f"torch.distributed.init_process_group(...) first, or pass {name}=None")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed.ProcessGroup (e.g. torch.distributed.group.WORLD) "
                        f"or None, got {type(process_group).__name__}")
    return process_group


def world_group(process_group=None, name: str = "process_group"):
    """The group QODE's window averages over: ``process_group``, else the default group when one is
    initialised; ``None`` (one process) when that group has a single rank."""
    if process_group is None:
        if not initialized():
            return None
        process_group = _dist().group.WORLD
    group = _check_group(process_group, name)
    return group if group_size(group) > 1 else None


def _is_ddp(model) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def hvp_group(model: Optional[nn.Module], process_group=None, name: str = "process_group"):
    """The group a Hessian tool averages its products over: ``process_group`` when given, else a
    DDP-wrapped ``model``'s own group; ``None`` otherwise (a plain model stays local even when a group
    is initialised, so a rank-0-only call cannot hang).  ``None`` for a single-rank group too.  QODE's
    comm follows this rule too (:func:`~torch_qode.training.distributed.window_comm` calls it)."""
    if process_group is None and model is not None and _is_ddp(model):
        process_group = model.process_group
    if process_group is None:
        return None
    group = _check_group(process_group, name)
    return group if group_size(group) > 1 else None


def unwrap(model: nn.Module) -> nn.Module:
    """DDP's ``.module``: its forward must not run inside a double backward (DDP's forward prepares a
    gradient reduction and broadcasts buffers; the Hessian tools average their own products)."""
    return model.module if _is_ddp(model) else model


def mean_all_reduce(v: torch.Tensor, group) -> torch.Tensor:
    """The mean over ``group``'s ranks of ``v`` (any shape: vectors and n×k blocks), a new tensor
    identical on every rank; ``v`` itself when ``group`` is ``None``."""
    if group is None:
        return v
    out = v.detach().clone(memory_format=torch.contiguous_format)
    _dist().all_reduce(out, op=_dist().ReduceOp.SUM, group=group)
    return out.div_(group_size(group))


def any_flag(flag: bool, group, device=None) -> bool:
    """``True`` on every rank when ``flag`` is ``True`` on any (all-reduce MAX of one integer)."""
    if group is None:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device or _device(group))
    _dist().all_reduce(t, op=_dist().ReduceOp.MAX, group=group)
    return bool(t.item())


def _device(group) -> torch.device:
    """Where a collective's scratch tensors live: the current CUDA device for NCCL, else the CPU."""
    backend = str(_dist().get_backend(group)).lower()
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")


def _src(group) -> int:
    """The global rank of ``group``'s rank 0."""
    return _dist().get_global_rank(group, 0)


def broadcast_tensor(value: torch.Tensor, group) -> torch.Tensor:
    """Rank 0's ``value`` on every rank (a new tensor; same shape and dtype on every rank)."""
    if group is None:
        return value
    out = value.detach().clone(memory_format=torch.contiguous_format)
    _dist().broadcast(out, src=_src(group), group=group)
    return out


def broadcast_object(obj: Any, group) -> Any:
    """Rank 0's ``obj`` (picklable) on every rank."""
    if group is None:
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=_src(group), group=group, device=_device(group))
    return box[0]


def gather_objects(obj: Any, group) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if group is None:
        return [obj]
    out = [None] * group_size(group)
    _dist().all_gather_object(out, obj, group=group)
    return out


def _sharded_kind(p: torch.Tensor) -> Optional[str]:
    if type(p).__name__ == "DTensor" or hasattr(p, "_spec") and hasattr(p, "_local_tensor"):
        return "a DTensor (FSDP2 / tensor parallel)"
    if type(p).__name__ == "FlatParameter" or getattr(p, "_is_flat_param", False):
        return "an FSDP FlatParameter"
    return None


def refuse_sharded(params, name: str = "params", model: Optional[nn.Module] = None) -> None:
    """Sharded parameters are refused: the Hessian's products need every rank to hold the whole
    parameter vector (a DTensor or an FSDP FlatParameter holds a shard of it; so does a module wrapped by
    FSDP, even with ``use_orig_params=True``)."""
    fsdp = None if model is None else next((type(m).__name__ for m in model.modules() if type(m).__name__ in
                                            ("FullyShardedDataParallel", "FSDPModule")
                                            or type(m).__name__.startswith("FSDP")), None)
    if fsdp is not None:
        raise ValueError(f"model holds a {fsdp} module: sharded parameters are not supported, because the "
                         "Hessian-vector products and the Carleman state need the whole parameter vector on "
                         "every rank; wrap the model in DistributedDataParallel instead of FSDP / ZeRO-3")
    for i, p in enumerate(params):
        kind = _sharded_kind(p)
        if kind is not None:
            raise ValueError(f"{name}[{i}] is {kind}: sharded parameters are not supported, because the "
                             "Hessian-vector products and the Carleman state need the whole parameter vector on "
                             "every rank; wrap the model in DistributedDataParallel instead of FSDP / ZeRO-3")
