"""Two-process torch.distributed tests: spawn gloo ranks on the CPU, each bounded by a hard timeout.

``run_ranks("tests.training.test_distributed:worker", world=2, **kw)`` starts ``world`` processes (spawn,
one thread each, a ``file://`` rendezvous in a fresh temporary folder, so no port is taken), calls
``worker(rank, world, **kw)`` in each and returns their results in rank order.  A rank that raises fails
the test with its traceback; ranks still running at the deadline are killed and the test fails: a hang
FAILS instead of blocking CI.
"""
from __future__ import annotations

import importlib
import os
import tempfile
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp


def _main(target: str, rank: int, world: int, init: str, out: str, kwargs: dict) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    result = None
    try:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
        module, name = target.split(":")
        result = {"ok": getattr(importlib.import_module(module), name)(rank, world, **kwargs)}
    except BaseException:                                   # noqa: BLE001 (reported to the parent)
        result = {"error": traceback.format_exc()}
    finally:
        torch.save(result, os.path.join(out, f"{rank}.pt"))
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(target: str, world: int = 2, timeout: float = 120.0, **kwargs) -> list:
    """Each rank's return value of ``target`` (``"module:function"``), in rank order (see the module doc)."""
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "rendezvous")
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_main, args=(target, r, world, init, tmp, kwargs), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        alive = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        results = []
        for r in range(world):
            path = os.path.join(tmp, f"{r}.pt")
            results.append(torch.load(path, weights_only=False) if os.path.exists(path) else None)
    if alive:
        pytest.fail(f"{target}: ranks {alive} still running after {timeout:.0f} s (a hang); killed")
    for r, res in enumerate(results):
        if res is None:
            pytest.fail(f"{target}: rank {r} died without a result")
        if "error" in res:
            pytest.fail(f"{target}: rank {r} raised:\n{res['error']}")
    return [res["ok"] for res in results]
