"""The classical step: ``torch.optim.SGD``'s update, bit for bit, with a device-side skip mask.

:func:`sgd_update` is SGD's own functional call (hence bit-identical).  The masked updates repeat
SGD's arithmetic on the path SGD itself resolves but take a ``found_inf`` flag on the device, as fused
optimizers do: when it is set, the parameter and momentum-buffer updates are masked out on the
device (``torch.where``), so a non-finite loss or gradient never reaches the weights and the host
never waits for the GPU.  :func:`masked_sgd_update` follows ``_single_tensor_sgd`` (the CPU default),
:func:`masked_multi_tensor_sgd_update` ``_multi_tensor_sgd`` (``foreach``, the CUDA default), and
:func:`masked_flat_momentum_update` either of them for heavy-ball momentum with the buffers in one
flat block (a few dispatches per step instead of a few per tensor).

:func:`classical_step` is QODE's classical step over the optimizer's parts (its parameter groups,
its ``state`` with the momentum buffers): the closure (if any), then the masked update of every group
where it reproduces SGD's arithmetic, else SGD's own after a synchronous finiteness check.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch.optim.sgd import sgd as _sgd

from ..core.ode import all_finite
from .amp import skip_scaled
from .capture import loss_value

__all__ = ["sgd_update", "masked_sgd_update", "masked_flat_momentum_update", "masked_multi_tensor_sgd_update",
           "nonfinite_flag", "all_finite_sync", "finite_with", "MaskedSGD", "classical_step", "sgd_step", "sgd_steps",
           "momentum_buffers", "keep_buffers", "reset_momentum"]


def sgd_update(params: list, grads: list, buffers: list, group: dict) -> list:
    """One ``torch.optim.SGD`` update through the same functional call (hence bit-identical).

    Entries with a ``None`` gradient are skipped, as SGD does; returns the new momentum buffers.
    """
    idx = [i for i, g in enumerate(grads) if g is not None]
    bufs = [buffers[i] for i in idx]
    _sgd([params[i] for i in idx], [grads[i] for i in idx], bufs, weight_decay=group["weight_decay"],
         momentum=group["momentum"], lr=group["lr"], dampening=group["dampening"],
         nesterov=group["nesterov"], maximize=False, has_sparse_grad=False, foreach=group["foreach"],
         fused=group["fused"])
    out = list(buffers)
    for j, i in enumerate(idx):
        out[i] = bufs[j]
    return out


def nonfinite_flag(loss, grads: list, found: torch.Tensor) -> torch.Tensor:
    """Set ``found`` (a 0-d float tensor, zeroed here) non-zero if ``loss`` or any gradient holds NaN/inf.

    No host synchronisation: ``torch._amp_foreach_non_finite_check_and_unscale_`` (GradScaler's check,
    scale 1: the gradients are unchanged) runs per device and dtype-agnostic.
    """
    found.zero_()
    if grads:
        grads = [torch.view_as_real(g) if g.is_complex() else g for g in grads]   # (no complex kernel)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, _one(found))
    if isinstance(loss, torch.Tensor) and loss.numel() == 1 and not loss.is_complex() \
            and loss.device == found.device:
        lv = loss.detach()
        found.add_(lv.reshape(()) if lv.dim() else lv, alpha=0)    # 0·loss: 0 if finite, NaN (≠ 0) if not
    elif isinstance(loss, torch.Tensor) and loss.numel() == 1 and not loss.is_complex():
        found.add_(~torch.isfinite(loss.detach().reshape(()).to(found.device)))
    return found


_ONES: dict = {}
_ZEROS: dict = {}


def _zero(like: torch.Tensor) -> torch.Tensor:
    """A cached 0-d zero of ``like``'s dtype and device (``torch.where`` with a tensor is cheaper)."""
    key = (like.dtype, like.device)
    z = _ZEROS.get(key)
    if z is None:
        z = _ZEROS[key] = torch.zeros((), dtype=like.dtype, device=like.device)
    return z


def _one(found: torch.Tensor) -> torch.Tensor:
    one = _ONES.get(found.device)
    if one is None:
        one = _ONES[found.device] = torch.ones((), dtype=torch.float32, device=found.device)
    return one


def masked_sgd_update(params: list, grads: list, buffers: list, group: dict, skip: torch.Tensor) -> list:
    """SGD's single-tensor update with ``skip`` (a 0-d bool tensor) masking it out on the device.

    For ``skip == False`` every number is SGD's (same ops in the same order; ``torch.where`` selects
    exactly).  For ``skip == True`` parameters and buffers keep their values; a momentum buffer that
    this step would have created starts at zero (SGD's next step then equals a fresh start when
    ``dampening = 0``).  Entries with a ``None`` gradient are skipped.  Returns the momentum buffers.
    """
    wd, momentum, dampening = group["weight_decay"], group["momentum"], group["dampening"]
    nesterov, lr = group["nesterov"], group["lr"]
    if isinstance(lr, torch.Tensor):
        lr = lr.item()                         # as SGD does (_to_scalar)
    out = list(buffers)
    for i, (param, grad) in enumerate(zip(params, grads)):
        if grad is None:
            continue
        if wd != 0:
            grad = grad.add(param, alpha=wd)
        if momentum != 0:
            buf = buffers[i]
            if buf is None:
                buf = torch.where(skip, _zero(grad), grad.detach())
            else:
                buf = torch.where(skip, buf, buf.mul(momentum).add_(grad, alpha=1 - dampening), out=buf)
            out[i] = buf
            grad = grad.add(buf, alpha=momentum) if nesterov else buf
        param.add_(torch.where(skip, _zero(grad), grad), alpha=-lr)
    return out


def masked_flat_momentum_update(params: list, grads: list, flat: tuple, group: dict, skip: torch.Tensor) -> list:
    """:func:`masked_sgd_update` for heavy-ball momentum (no Nesterov) with every momentum buffer a view
    of one flat tensor: the masks and the momentum scaling run once on the flat tensors, the per-tensor
    adds as one ``torch._foreach_*`` call each.  Every number is SGD's on either of its paths: the adds
    are ``_multi_tensor_sgd``'s own foreach calls (on the CPU a loop of ``_single_tensor_sgd``'s
    kernels), and the one other operation, the momentum scaling, is a single rounded product in any
    kernel.  ``flat``: ``(buf, buf_views, tmp, tmp_views)``, the buffers and a scratch block of the
    same layout.  Five dispatches per step for any number of tensors instead of five per tensor.
    Returns the buffers (the views)."""
    wd, momentum, dampening, lr = group["weight_decay"], group["momentum"], group["dampening"], group["lr"]
    if isinstance(lr, torch.Tensor):
        lr = lr.item()                         # as SGD does (_to_scalar)
    buf, bufs, tmp, tmps = flat
    if wd != 0:
        grads = torch._foreach_add(grads, params, alpha=wd)
    torch.mul(buf, momentum, out=tmp)
    torch._foreach_add_(tmps, grads, alpha=1 - dampening)
    torch.where(skip, buf, tmp, out=buf)
    torch.where(skip, _zero(tmp), buf, out=tmp)
    torch._foreach_add_(params, tmps, alpha=-lr)
    return list(bufs)


def masked_multi_tensor_sgd_update(params: list, grads: list, buffers: list, group: dict,
                                   skip: torch.Tensor) -> list:
    """:func:`masked_sgd_update` for SGD's ``foreach`` path (``torch.optim.sgd._multi_tensor_sgd``, which
    SGD takes by default on CUDA): the same ``torch._foreach_*`` calls in the same order, per device and
    dtype, with the results selected by ``skip`` (``torch.where``) before they are written."""
    from torch.optim.optimizer import Optimizer
    wd, momentum, dampening = group["weight_decay"], group["momentum"], group["dampening"]
    nesterov, lr = group["nesterov"], group["lr"]
    if isinstance(lr, torch.Tensor):
        lr = lr.item()                         # as SGD does (_to_scalar)
    idx = [i for i, g in enumerate(grads) if g is not None]
    out = list(buffers)
    if not idx:                                # no gradient: nothing to step (torch cannot group [])
        return out
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [[params[i] for i in idx], [grads[i] for i in idx], [buffers[i] for i in idx]], with_indices=True)
    for (dparams, dgrads, dbufs), pos in grouped.values():
        if wd != 0:
            dgrads = torch._foreach_add(dgrads, dparams, alpha=wd)
        if momentum != 0:
            if all(b is not None for b in dbufs):
                new = torch._foreach_mul(dbufs, momentum)
                torch._foreach_add_(new, dgrads, alpha=1 - dampening)
                bufs = [torch.where(skip, b, n, out=b) for b, n in zip(dbufs, new)]
            else:                              # SGD's per-tensor branch when a buffer is missing
                bufs = [torch.where(skip, _zero(g), g.detach()) if b is None
                        else torch.where(skip, b, b.mul(momentum).add_(g, alpha=1 - dampening), out=b)
                        for b, g in zip(dbufs, dgrads)]
            for j, b in zip(pos, bufs):
                out[idx[j]] = b
            if nesterov:
                torch._foreach_add_(dgrads, bufs, alpha=momentum)
            else:
                dgrads = bufs
        torch._foreach_add_(dparams, [torch.where(skip, _zero(g), g) for g in dgrads], alpha=-lr)
    return out


def all_finite_sync(loss, params: list) -> bool:
    """Loss and every gradient finite, read on the host (one reduction per tensor, one host sync):
    the window's steps, where the answer decides what happens next."""
    if not isinstance(loss, torch.Tensor):
        value = loss_value(loss)
        if value is not None and not math.isfinite(value):
            return False
    parts = [p.grad.detach().sum() for p in params if p.grad is not None]
    if isinstance(loss, torch.Tensor):
        parts.append(loss.detach().sum())
    if not parts or bool(torch.isfinite(torch.stack([q.to(torch.float64) for q in parts]).sum())):
        return True
    return all(all_finite(q) for q in [p.grad for p in params if p.grad is not None]
               + ([loss.detach()] if isinstance(loss, torch.Tensor) else []))


def finite_with(loss, vec: torch.Tensor) -> bool:
    """Loss and ``vec`` finite, with one reduction and one host read (``True`` is exact; ``False``
    may be an overflow of the sum: callers fall back to :func:`all_finite_sync`).  ``vec`` is a
    window step's F0(t), which holds every gradient (a NaN/inf in one makes it non-finite)."""
    if not isinstance(loss, torch.Tensor):
        value = loss_value(loss)
        if value is not None and not math.isfinite(value):
            return False
    elif loss.is_complex():
        return False                             # (the caller's exact check decides)
    elif vec.numel() == 0:                       # the loss alone: one host read
        return math.isfinite((loss.detach() if loss.numel() == 1 else loss.detach().sum()).item())
    else:
        return bool(torch.isfinite(vec.sum() + loss.detach().sum().to(vec.dtype) * 0))   # 0·loss: NaN if not finite
    return vec.numel() == 0 or bool(torch.isfinite(vec.sum()))


class MaskedSGD:
    """Classical steps with no host synchronisation: :func:`masked_sgd_update` with a device flag,
    and the count of skipped steps kept on the device until :meth:`count_into` reads it (once per
    cycle, where the loss is read anyway, or when the reports are read)."""

    def __init__(self):
        self.skipped: Optional[torch.Tensor] = None   # steps skipped since the last count, on the device
        self.found: Optional[torch.Tensor] = None     # this step's non-finite flag (a reused buffer)
        self.first: Optional[int] = None              # first step not yet counted
        self.carried = 0                              # read from a previous device's count, not yet reported
        self._flat: Optional[tuple] = None            # the flat momentum buffers and their scratch block
        self._flats: dict = {}                        # the same for the parameter groups after the first

    def __getstate__(self) -> dict:
        """A copy (``pickle``, ``copy.deepcopy``) drops the flat momentum block, rebuilt from the momentum
        buffers at the next step: ``pickle`` stores the block and its views as separate storages, so the
        buffers would stop sharing the block the flat update computes in."""
        state = dict(self.__dict__)
        state["_flat"], state["_flats"] = None, {}
        return state

    @staticmethod
    def path(loss, params: list, group: dict, grads: Optional[list] = None) -> Optional[str]:
        """The SGD path the masked update reproduces, or ``None`` (then the synchronous check keeps SGD's
        own arithmetic): ``"single"`` or ``"foreach"``, as ``torch.optim.sgd.sgd`` resolves them (by default
        the single-tensor path on the CPU, ``foreach`` on CUDA); a tensor loss, dense gradients on one
        device.  The fused path (only when set on the group) and sparse gradients are left to the check.
        ``grads``: the parameters' ``.grad`` when the caller has them already.  ``loss`` ``None`` (a step
        without a closure: the gradients alone are checked) takes the masked path too."""
        if (loss is not None and not isinstance(loss, torch.Tensor)) or group["fused"]:
            return None
        grads = [g for g in ([p.grad for p in params] if grads is None else grads) if g is not None]
        if all(g.is_cpu and not g.is_sparse for g in grads):    # the common case, checked cheaply
            return "foreach" if group["foreach"] else "single"
        device = grads[0].device
        if any(g.is_sparse or g.device != device for g in grads):
            return None
        foreach = group["foreach"]
        if foreach is None:
            from torch.optim.optimizer import _default_to_fused_or_foreach
            fused, foreach = _default_to_fused_or_foreach([p for p in params if p.grad is not None],
                                                          differentiable=False, use_fused=False)
            if fused:
                return None
        return "foreach" if foreach else "single"

    def update(self, loss: torch.Tensor, params: list, buffers: list, group: dict, k: int,
               path: str = "single", grads: Optional[list] = None) -> list:
        """One masked SGD step at step ``k`` on SGD's ``path`` (:meth:`path`); returns the momentum buffers."""
        grads = [p.grad for p in params] if grads is None else grads
        return self.update_groups(loss, [(params, buffers, group, path, grads)], k)[0]

    def update_groups(self, loss: Optional[torch.Tensor], parts: list, k: int) -> list:
        """One masked SGD step at step ``k`` over several parameter groups, as ``torch.optim.SGD`` steps
        its groups (each with its own settings, one after the other), with one skip flag for all.

        Args:
            loss: the closure's loss (a tensor), or ``None`` (a step without a closure).
            parts: ``(params, buffers, group, path, grads)`` per group (``path`` from :meth:`path`).
            k: the step (for the report of skipped steps).

        Returns:
            The momentum buffers of each group (a list per group).
        """
        present = [g for part in parts for g in part[4] if g is not None]
        if not present and not isinstance(loss, torch.Tensor):
            return [list(part[1]) for part in parts]   # nothing to step, nothing to check
        device = present[0].device if present else loss.device
        if self.skipped is None or self.skipped.device != device:
            self.carried += self.count_pending()
            self.skipped = torch.zeros((), dtype=torch.float32, device=device)
            self.found = torch.zeros_like(self.skipped)
        skip = nonfinite_flag(loss, present, self.found).bool()   # 0-d: broadcasts to any shape, 0-d weights too
        out = []
        for i, (params, buffers, group, path, grads) in enumerate(parts):
            flat = self._flat_buffers(params, grads, buffers, group, i)
            if flat is not None:
                out.append(masked_flat_momentum_update(params, grads, flat, group, skip))
            else:
                update = masked_multi_tensor_sgd_update if path == "foreach" else masked_sgd_update
                out.append(update(params, grads, buffers, group, skip))
        self.skipped.add_(skip)
        if self.first is None:
            self.first = k
        return out

    #: the flat momentum path up to this many weights (above it, the per-tensor dispatches cost little
    #: against the update's memory traffic, and the scratch block would cost memory)
    FLAT_MAX = 2**20

    def _flat_buffers(self, params: list, grads: list, buffers: list, group: dict, index: int = 0) -> Optional[tuple]:
        """The flat buffers of :func:`masked_flat_momentum_update`, or ``None`` where that path does not
        apply: no momentum or Nesterov (a flat step would first copy the gradients, a pass that costs
        more than the dispatches it saves on all but small models), a missing gradient or buffer, mixed
        dtypes or devices, a large model.  Buffers that are not its views (created by the step before,
        or loaded from a ``state_dict``) are copied in once.  ``index``: the parameter group's (one flat
        block per group)."""
        if group["momentum"] == 0 or group["nesterov"] or not grads or any(g is None for g in grads) \
                or any(b is None for b in buffers):
            return None
        flat = self._flat if index == 0 else self.__dict__.setdefault("_flats", {}).get(index)
        if flat is None or len(flat[1]) != len(grads) or any(
                v.shape != g.shape or v.dtype != g.dtype or v.device != g.device for v, g in zip(flat[1], grads)):
            g0 = grads[0]
            sizes = [g.numel() for g in grads]
            if sum(sizes) > self.FLAT_MAX or any(g.dtype != g0.dtype or g.device != g0.device for g in grads):
                return None
            buf, tmp = (torch.empty(sum(sizes), dtype=g0.dtype, device=g0.device) for _ in range(2))
            flat = (buf, [v.view(g.shape) for v, g in zip(buf.split(sizes), grads)],
                    tmp, [v.view(g.shape) for v, g in zip(tmp.split(sizes), grads)])
            if index == 0:
                self._flat = flat
            else:
                self._flats[index] = flat
        if any(b is not v for b, v in zip(buffers, flat[1])):
            for v, b in zip(flat[1], buffers):
                if b is not v:
                    v.copy_(b)
        return flat

    def count_pending(self) -> int:
        """Read (one host sync) and clear the skipped steps not yet counted."""
        n, self.carried = self.carried, 0
        if self.skipped is not None:
            n += int(self.skipped.item())
            self.skipped.zero_()
        return n

    def count_into(self, rep, last: int) -> None:
        """Add the skipped steps since the last count to ``rep`` (``skipped_steps`` and a fault)."""
        if self.first is None:
            return
        n, first = self.count_pending(), self.first
        self.first = None
        if n:
            rep.skipped_steps += n
            rep.faults.append(f"steps {first}..{last}: non-finite loss or gradient: update skipped "
                              f"({n} step{'s' if n > 1 else ''})")


# ------------------------------------------------------------------ over the optimizer's parts
def momentum_buffers(params: list, state: dict) -> list:
    """The momentum buffers ``state`` holds for ``params`` (``None`` where there is none), as SGD reads them."""
    return [state[p].get("momentum_buffer") if p in state else None for p in params]


def keep_buffers(params: list, state: dict, group: dict, bufs: list) -> None:
    """Store the buffers an update returned; with momentum 0 ``state`` holds nothing per parameter, as SGD's."""
    if group["momentum"] != 0:
        for p, b in zip(params, bufs):
            if p.grad is not None:
                state[p]["momentum_buffer"] = b


def reset_momentum(params: list, state: dict) -> None:
    """Momentum restarts (after a quantum window): the buffers go, and the entries they leave empty."""
    for p in params:
        if p in state:
            state[p].pop("momentum_buffer", None)
            if not state[p]:
                del state[p]


def sgd_step(params: list, group: dict, state: dict) -> None:
    """An SGD step of ``params`` with the gradients the closure left in ``.grad``."""
    bufs = sgd_update(params, [p.grad for p in params], momentum_buffers(params, state), group)
    keep_buffers(params, state, group, bufs)


def sgd_steps(groups: list, state: dict) -> None:
    """An SGD step of every parameter group (``torch.optim.SGD.step`` after its closure): each group
    with its own settings, in order."""
    for group in groups:
        sgd_step(group["params"], group, state)


def classical_step(closure, groups: list, state: dict, masked: MaskedSGD, rep, k: int, scaled=None):
    """QODE's classical step ``k`` over the parameter groups ``groups`` (each with its own ``lr``,
    ``momentum``, ``weight_decay``, …, as ``torch.optim.SGD`` steps them): SGD's update, masked on the
    device when the loss or a gradient is not finite (no host sync); where the mask cannot reproduce
    SGD, a synchronous check skips the update and ``rep`` (the cycle's report) says so.

    Args:
        closure: re-evaluates the loss (and usually calls ``backward()``), or ``None``: the gradients
            already in ``.grad`` are used, as ``torch.optim.SGD.step()`` uses them.
        groups: the optimizer's parameter groups.
        state: the optimizer's per-parameter state (momentum buffers).
        masked: the optimizer's :class:`MaskedSGD`.
        rep: this cycle's report.
        k: the step.
        scaled: ``torch.amp.GradScaler``'s ``(grad_scale, found_inf)`` for this step
            (:func:`~torch_qode.training.amp.check_scaler`; no closure then): the gradients are unscaled as
            ``GradScaler.unscale_`` does, and the update skipped when it found an inf, as for SGD.

    Returns:
        The closure's loss (``None`` without a closure).
    """
    if scaled is not None and skip_scaled(scaled, groups, rep, k):
        return None
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    parts = []
    for group in groups:
        params = group["params"]
        grads = [p.grad for p in params]
        path = masked.path(loss, params, group, grads)
        parts.append((params, momentum_buffers(params, state), group, path, grads))
    if all(part[3] is not None for part in parts):
        for (params, _, group, _, _), bufs in zip(parts, masked.update_groups(loss, parts, k)):
            keep_buffers(params, state, group, bufs)
    elif not all_finite_sync(loss, [p for group in groups for p in group["params"]]):
        rep.skipped_steps += 1
        rep.faults.append(f"step {k}: non-finite loss or gradient: update skipped")
    else:
        sgd_steps(groups, state)
    return loss
