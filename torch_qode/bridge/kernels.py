"""Kernels for a forward whose graph is differentiated twice (the upload, ``hessian_spectrum``).

The Taylor terms (Eq. II.1, V.5) and the dissipation check's Hessian-vector products differentiate
the upload step's gradient again.  Two common setups build graphs that cannot be:

- **attention**: ``scaled_dot_product_attention``'s default CPU/GPU kernels (flash, memory-efficient)
  have no derivative of their backward; the math kernel is composite and has all of them;
- **torch.compile**: an ``aot_autograd`` graph does not support double backward; its eager code does.

:func:`double_backward_kernels` runs a forward with the math attention kernel and compiled code
eager, so only the steps whose graph is differentiated twice pay; every other step keeps the fast
kernels.  :func:`missing_double_backward` turns what still fails into a reason that names the
operation and the fix.
"""
from __future__ import annotations

import contextlib
import re
from typing import Iterator, Optional

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["double_backward_kernels", "missing_double_backward", "KERNELS"]

#: What :func:`double_backward_kernels` sets (``CycleReport.carleman["kernels"]``).
KERNELS = "attention: sdpa math kernel; torch.compile: eager (force_eager)"


@contextlib.contextmanager
def double_backward_kernels() -> Iterator[None]:
    """Run a forward whose graph will be differentiated twice: ``scaled_dot_product_attention`` on
    its math kernel (``sdpa_kernel(SDPBackend.MATH)``) and ``torch.compile``'d code eagerly
    (``torch.compiler.set_stance("force_eager")``).  Numerically the same model; an explicit
    ``sdpa_kernel`` inside the forward still wins."""
    with sdpa_kernel(SDPBackend.MATH), torch.compiler.set_stance("force_eager"):
        yield


_PATTERNS = (
    (re.compile(r"derivative for (\S+?) is not implemented"), "{0}"),
    (re.compile(r"aot_autograd does not currently support double backward|compiled with non-empty donated buffers"),
     "a torch.compile'd graph (aot_autograd) that runs compiled during the upload"),
    (re.compile(r"marked with @once_differentiable"), "a custom autograd.Function marked @once_differentiable"),
)


def missing_double_backward(exc: BaseException) -> Optional[str]:
    """The reason a graph could not be differentiated twice, naming the operation and the fix, or
    ``None`` when ``exc`` is not such a failure."""
    if not isinstance(exc, RuntimeError):
        return None
    msg = str(exc)
    for pattern, name in _PATTERNS:
        m = pattern.search(msg)
        if m:
            op = name.format(*m.groups())
            return (f"{op} has no double backward (the Taylor terms and the dissipation check differentiate "
                    "the upload's gradient again); fix: write its backward with differentiable torch ops "
                    "(a custom autograd.Function without @once_differentiable), use an op that has one, or "
                    "call the compiled model's eager module in the closure; until then this window trains "
                    "classically")
    return None
