"""Memory budgets of the Carleman objects: refuse before allocating (DESIGN.md, "bad input")."""
from __future__ import annotations

import os
from typing import Optional

from ..._checks import as_int

__all__ = ["CarlemanTooLarge", "default_max_bytes", "refuse_over_budget"]

BYTES_PER_NNZ = 40  # peak bytes per non-zero while scipy builds kron/bmat (COO triplets + CSR copy)


class CarlemanTooLarge(MemoryError):
    """Refused before allocation: the requested object would not fit in the memory budget."""


def default_max_bytes() -> int:
    """Half of the currently available physical memory (8 GiB if the OS does not say)."""
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2)
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 << 30


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.3g} GiB"


def check_max_bytes(max_bytes, name: str = "max_bytes") -> Optional[int]:
    """``max_bytes`` must be ``None`` (half the available memory) or a positive integer."""
    if max_bytes is None:
        return None
    v = as_int(max_bytes)
    if v is None or v <= 0:
        raise ValueError(f"{name} must be a positive integer number of bytes, or None for half the "
                         f"available memory; got {max_bytes!r}")
    return v


def refuse_over_budget(need: int, budget: int, what: str, instead: str) -> None:
    """Raise :class:`CarlemanTooLarge` — before anything is allocated — when ``need`` bytes exceed
    ``budget``: "``what`` needs X GiB > max_bytes=Y GiB; ``instead``"."""
    if need > budget:
        raise CarlemanTooLarge(f"{what} needs {gib(need)} > max_bytes={gib(budget)}; {instead}")


def budget(max_bytes, fallback: Optional[int] = None) -> int:
    """The memory budget in bytes: ``max_bytes``, else ``fallback``, else :func:`default_max_bytes`."""
    max_bytes = check_max_bytes(max_bytes)
    if max_bytes is None:
        max_bytes = fallback
    return default_max_bytes() if max_bytes is None else max_bytes
