"""Two-process torch.distributed tests: gloo ranks on the CPU, each spawn bounded by a hard timeout.

``run_ranks("tests.training.test_distributed:worker", world=2, **kw)`` runs ``worker(rank, world, **kw)``
in ``world`` spawned processes (one thread each, a ``file://`` rendezvous: no port is taken) through
:func:`recipes.launch.spawn` and returns their results in rank order.  A rank that raises fails the
test with its traceback; ranks still running at the deadline are killed and the test fails: a hang
FAILS instead of blocking CI.
"""
from __future__ import annotations

import functools

import pytest

from recipes.launch import spawn


def _call(target: str, rank: int, world: int, kwargs: dict):
    from recipes.launch import _resolve

    return _resolve(target)(rank, world, **kwargs)


def run_ranks(target: str, world: int = 2, timeout: float = 120.0, **kwargs) -> list:
    """Each rank's return value of ``target`` (``"module:function"``), in rank order."""
    try:
        return spawn(functools.partial(_call, target), world, (kwargs,), timeout=timeout)
    except (TimeoutError, RuntimeError) as exc:
        pytest.fail(f"{target}: {exc}")
