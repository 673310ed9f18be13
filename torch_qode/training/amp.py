"""QODE under ``torch.amp.GradScaler`` (fp16 mixed precision): classical steps as SGD's, windows refused.

QODE declares ``_step_supports_amp_scaling``: ``GradScaler.step(opt)`` then does not unscale the
gradients itself but sets ``opt.grad_scale`` (the scale, or ``None`` after ``scaler.unscale_(opt)``) and
``opt.found_inf`` for the one ``opt.step()`` call, and removes them after it.  A classical step
unscales ``.grad`` in place exactly as ``GradScaler.unscale_`` does (the same kernel, the same
reciprocal) and skips the update when the scaler found an inf or NaN, as ``scaler.step`` skips
``torch.optim.SGD.step``: the weights, ``.grad`` and momentum buffers stay bit-identical to SGD's under
the same scaler.  A quantum step (the upload, a window step) is refused before anything changes: the
window expands the loss itself, from the closure's graph, and cannot use scaled gradients.  bf16
autocast needs no scaler and trains windows as fp32 does.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch

__all__ = ["check_scaler", "skip_scaled", "SCALED_WINDOW", "SCALED_CLOSURE"]

#: step() under a GradScaler at a step that expands the loss (the upload or a window step)
SCALED_WINDOW = (
    "QODE.step(): step {k} is {which}, under torch.amp.GradScaler. A quantum window expands the loss itself "
    "(its Taylor terms and each batch's gradient at θ0, from the closure's graph) and cannot take GradScaler's "
    "scaled gradients: use bf16 autocast inside the closure (torch.autocast(device, dtype=torch.bfloat16), no "
    "scaler needed), fp32, or mode='classical' (whose steps take GradScaler as torch.optim.SGD does)")

#: scaler.step(opt, closure) at a classical step
SCALED_CLOSURE = (
    "QODE.step(closure) under torch.amp.GradScaler: the scaler checks (and unscales) the gradients already in "
    ".grad before the step, so a closure's backward would bring gradients it never checked. Backward the scaled "
    "loss first and step without a closure: scaler.scale(loss).backward(); scaler.step(opt); scaler.update()")


def check_scaler(opt, quantum: bool, closure, k: int) -> Optional[tuple]:
    """GradScaler's ``(grad_scale, found_inf)`` for this step of ``opt``, or ``None`` without a scaler.

    Args:
        opt: the QODE optimizer (``GradScaler.step`` set ``grad_scale`` and ``found_inf`` on it).
        quantum: the step is the upload or a window step.
        closure: the step's closure (``None``: the gradients in ``.grad``).
        k: the step.

    Returns:
        ``(grad_scale, found_inf)``: the scale to divide the gradients by (``None`` when
        ``scaler.unscale_(opt)`` ran already) and the scaler's inf/NaN flag (a tensor); ``None`` when no
        GradScaler drives this step.

    Raises:
        RuntimeError: a scaler at a quantum step, or with a closure (the two attributes are removed first,
            so a later step without the scaler is not mistaken for one with it).
    """
    own = opt.__dict__
    if "found_inf" not in own:
        return None
    if quantum or closure is not None:
        own.pop("grad_scale", None)
        own.pop("found_inf", None)
        if quantum:
            which = "the upload of its cycle" if k % opt.cfg.cycle == opt.cfg.classical_steps else "a window step"
            raise RuntimeError(SCALED_WINDOW.format(k=k, which=which))
        raise RuntimeError(SCALED_CLOSURE)
    return own.get("grad_scale"), own["found_inf"]


def _unscale(groups: list, grad_scale: torch.Tensor) -> None:
    """``.grad`` divided by ``grad_scale`` in place, as ``GradScaler.unscale_``: multiplied by the float32
    reciprocal, by the same kernel, per device and dtype (a sparse gradient coalesced first)."""
    inv_scale = grad_scale.double().reciprocal().float()
    found = torch.zeros(1, dtype=torch.float32, device=grad_scale.device)
    by_kind: dict = defaultdict(list)
    for group in groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                if p.grad.dtype is torch.float16:
                    p.grad = p.grad.coalesce()
                g = p.grad._values()
            else:
                g = p.grad
            by_kind[(g.device, g.dtype)].append(g)
    for (device, _), grads in by_kind.items():
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found.to(device), inv_scale.to(device))


def skip_scaled(scaled: tuple, groups: list, rep, k: int) -> bool:
    """Unscale the gradients (when the scaler has not) and say whether the scaler skips this step.

    Args:
        scaled: :func:`check_scaler`'s ``(grad_scale, found_inf)``.
        groups: the optimizer's parameter groups.
        rep: this cycle's report (a skipped step is counted and noted in its faults).
        k: the step.

    Returns:
        ``True`` when the scaler found an inf or NaN: no update, as ``GradScaler.step`` skips SGD's.
    """
    grad_scale, found_inf = scaled
    if grad_scale is not None:
        _unscale(groups, grad_scale)
    if not found_inf.item():
        return False
    rep.skipped_steps += 1
    rep.faults.append(f"step {k}: GradScaler found an inf or NaN gradient: update skipped (the scaler lowers its "
                      "scale)")
    return True
