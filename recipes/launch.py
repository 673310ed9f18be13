"""Start N torch.distributed processes on this machine (``--nproc N``), or join a ``torchrun`` launch.

:func:`spawn` runs ``target(rank, world, *args)`` in ``nproc`` spawned processes, one thread each
unless told otherwise, with a ``file://`` rendezvous in a fresh temporary folder (no port to pick):
gloo on the CPU, NCCL when every rank gets its own GPU.  Results come back in rank order; a rank that
raises raises here with its traceback; with ``timeout`` the ranks still running are killed and a
``TimeoutError`` names them (a hang ends instead of blocking).  :func:`from_environment` initialises
the default group from ``torchrun``'s variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, …).
"""
from __future__ import annotations

import importlib
import os
import tempfile
import time
import traceback
from typing import Any, Callable, Optional, Union

import torch

__all__ = ["spawn", "from_environment", "backend_for", "is_rank0", "world", "rank", "group", "agree", "recipe_rank",
           "NullLog", "shard", "shard_stream"]


def backend_for(device: Union[str, torch.device], world: int) -> str:
    """``"nccl"`` for CUDA when every rank can have its own GPU, else ``"gloo"``."""
    cuda = torch.device(device).type == "cuda"
    return "nccl" if cuda and torch.cuda.is_available() and torch.cuda.device_count() >= world else "gloo"


def is_rank0() -> bool:
    """Rank 0 of the default group, or a single process (logs, progress bars and figures come from it)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def world() -> int:
    """Ranks of the default group (1 without torch.distributed)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group (0 without torch.distributed)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def group():
    """The default process group when there are ≥ 2 ranks, else ``None`` (the Hessian tools' ``process_group=``)."""
    import torch.distributed as dist

    return dist.group.WORLD if world() > 1 else None


def agree(error: Optional[BaseException]) -> None:
    """Raise on every rank when any rank raised ``error`` (its type, rank 0 first): a check made on one
    rank only (the output folder) must not leave the others waiting in a collective."""
    if world() == 1:
        if error is not None:
            raise error
        return
    import torch.distributed as dist

    every: list = [None] * world()
    dist.all_gather_object(every, None if error is None else (type(error), str(error)))
    for r, e in enumerate(every):
        if e is not None:
            if error is not None:
                raise error
            raise e[0](f"{e[1]} (raised on rank {r})")


class NullLog:
    """The log of a rank other than 0: records are dropped (logs come from rank 0 only)."""

    def write(self, event: str, **fields) -> dict:
        return {"event": event, **fields}

    def close(self) -> None:
        pass


def shard(batch: tuple, name: str = "batch") -> tuple:
    """This rank's contiguous 1/world of every tensor of ``batch`` (the batch size must divide)."""
    n = world()
    if n == 1:
        return batch
    size = len(batch[0])
    if size % n:
        raise ValueError(f"{name} of {size} samples does not split over {n} ranks")
    per, r = size // n, rank()
    return tuple(t[r * per:(r + 1) * per] for t in batch)


def shard_stream(dataset, global_batch: int, seed: int, device, *, num_workers: int = 0, pin_memory: bool = False,
                 persistent_workers: bool = False):
    """An endless stream of this rank's batches of ``global_batch / world`` samples: a
    ``DistributedSampler`` (shuffled with ``seed``, a new permutation per epoch) over ``dataset``;
    ``num_workers``, ``pin_memory`` (CUDA only, ``non_blocking`` copies) and ``persistent_workers`` as in
    :func:`recipes.loop.batch_stream`."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    n = world()
    device = torch.device(device)
    pin = bool(pin_memory) and device.type == "cuda"
    sampler = DistributedSampler(dataset, num_replicas=n, rank=rank(), shuffle=True, seed=seed,
                                 drop_last=len(dataset) >= global_batch)
    loader = DataLoader(dataset, batch_size=max(1, min(global_batch, len(dataset)) // n), sampler=sampler,
                        drop_last=len(dataset) >= global_batch, num_workers=num_workers, pin_memory=pin,
                        persistent_workers=bool(persistent_workers) and num_workers > 0)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        for x, y in loader:
            yield x.to(device, non_blocking=pin), y.to(device, non_blocking=pin)
        epoch += 1


def from_environment(backend: Optional[str] = None) -> bool:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment): initialise the default process group
    (``env://``) and return ``True``; else ``False`` and nothing is started."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        world = int(os.environ["WORLD_SIZE"])
        backend = backend or backend_for("cuda" if torch.cuda.is_available() else "cpu", world)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
        dist.init_process_group(backend, init_method="env://")
    return True


def _resolve(target: Union[str, Callable]) -> Callable:
    if callable(target):
        return target
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _main(target, rank: int, world: int, init: str, out: str, backend: str, threads: Optional[int],
          args: tuple) -> None:
    import torch.distributed as dist

    if threads is not None:
        torch.set_num_threads(threads)
    result: dict = {}
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"file://{init}", rank=rank, world_size=world)
        result = {"ok": _resolve(target)(rank, world, *args)}
    except BaseException:                                   # noqa: BLE001 (reported to the parent)
        result = {"error": traceback.format_exc()}
    finally:
        torch.save(result, os.path.join(out, f"{rank}.pt"))
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(target: Union[str, Callable], nproc: int, args: tuple = (), *, backend: str = "gloo",
          threads: Optional[int] = 1, timeout: Optional[float] = None) -> list:
    """``target(rank, world, *args)`` in ``nproc`` processes (``target``: a module-level function or
    ``"module:function"``); their return values in rank order (see the module docstring)."""
    import torch.multiprocessing as mp

    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be an integer >= 1, got {nproc!r}")
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "rendezvous")
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_main, args=(target, r, nproc, init, tmp, backend, threads, args), daemon=True)
                 for r in range(nproc)]
        for p in procs:
            p.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        for p in procs:
            p.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        alive = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        results: list[Any] = []
        for r in range(nproc):
            path = os.path.join(tmp, f"{r}.pt")
            results.append(torch.load(path, weights_only=False) if os.path.exists(path) else None)
    if alive:
        raise TimeoutError(f"ranks {alive} still running after {timeout:.0f} s (a hang?); killed")
    failed = [f"rank {r} died without a result (exit code {procs[r].exitcode})" if res is None else
              f"rank {r} raised:\n{res['error']}" for r, res in enumerate(results) if res is None or "error" in res]
    if failed:                                   # every rank's error: the first is often a peer's echo
        raise RuntimeError("\n".join(failed))
    return [res["ok"] for res in results]


def recipe_rank(target: str, rank_: int, world_: int, argv: list, kwargs: dict):
    """One rank of a recipe started by :func:`recipes.cli.maybe_spawn`: its ``main``; a ConfigError comes
    back as data."""
    from recipes.config import ConfigError

    try:
        return {"result": _resolve(target)(argv, **kwargs)}
    except ConfigError as exc:
        return {"config_error": str(exc)}
