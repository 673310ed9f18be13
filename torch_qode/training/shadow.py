"""``track_sgd``: the SGD and GD shadows of a quantum window, and the drift measured against them."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..bridge import flat as _flat
from .capture import holding, loss_value, measuring, own_grads
from .classical import sgd_update

__all__ = ["drift_measurement", "Shadow", "start_shadow", "shadow_grads", "shadow_update", "drift", "grads_at",
           "measure_losses", "chain_parts", "PARTS"]

#: the drift's parts, in the order of the chain θ_SGD → θ_GD,S → θ_lin → θ_lin,r → θ_QODE
PARTS = ("support", "linearization", "readout_pruning", "readout_noise")


@dataclass
class Shadow:
    """SGD run from θ0 on the window's batches (``params``, ``bufs``: momentum, all weights) and, when
    it differs, the window's own dynamics without linearisation, plain GD on S (``gd``, flat)."""

    params: list
    bufs: list
    gd: Optional[torch.Tensor]

    def state_dict(self) -> dict:
        return {"shadow": [s.clone() for s in self.params],
                "shadow_buf": [None if b is None else b.clone() for b in self.bufs],
                "gd": None if self.gd is None else self.gd.clone()}

    @classmethod
    def load(cls, win: dict, device) -> "Shadow":
        return cls([s.to(device) for s in win["shadow"]],
                   [None if b is None else b.to(device) for b in win["shadow_buf"]],
                   None if win["gd"] is None else win["gd"].to(device))


def start_shadow(params: list, buffers: list, momentum: float, support, theta0: torch.Tensor) -> Shadow:
    """Both shadows at θ0 (``buffers``: the optimizer's momentum buffers, copied)."""
    # the GD shadow is the SGD shadow unless momentum is on or the upload is sparse
    same = momentum == 0 and support is None
    return Shadow([p.detach().clone() for p in params], [None if b is None else b.clone() for b in buffers],
                  None if same else theta0.clone())


def shadow_grads(shadow: Shadow, first: bool, params: list, grads_at: Callable[[list], list]):
    """This step's gradients at both shadows (closure calls through ``grads_at``, nothing changes).

    At ``t = 0`` both sit at θ0, where the closure just left the gradients in ``.grad``; while the two
    shadows coincide the SGD shadow stands for both.
    """
    if first:
        grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    else:
        grads = grads_at(shadow.params)
    g_gd = grads if shadow.gd is None or first else grads_at(_flat.unflatten(shadow.gd, params))
    return grads, _flat.flatten([torch.zeros_like(p) if g is None else g for p, g in zip(params, g_gd)])


def shadow_update(shadow: Shadow, grads: list, g_gd: torch.Tensor, groups, lr: float, wd,
                  support) -> None:
    """Advance both shadows one step (SGD with the groups' current settings, ``groups`` a list of
    parameter groups or one group; GD at the window's lr and weight decay, ``wd`` a float or per
    coordinate: a full flat vector)."""
    groups = [groups] if isinstance(groups, dict) else groups
    if shadow.gd is None and any(float(g["lr"]) != lr for g in groups):
        shadow.gd = _flat.flatten(shadow.params).clone()   # a scheduler moved lr: the two part here
    bufs, i = [], 0
    for group in groups:                         # as SGD steps its groups: one after the other
        j = i + len(group["params"])
        bufs += sgd_update(shadow.params[i:j], grads[i:j], shadow.bufs[i:j], group)
        i = j
    shadow.bufs = bufs
    if shadow.gd is not None:
        S = slice(None) if support is None else support
        # SGD's arithmetic (d = g + wd·θ, θ ← θ + (−η)·d): the twin is SGD without momentum on S, to the bit
        if isinstance(wd, torch.Tensor):
            step = g_gd[S] + wd[S].to(shadow.gd.dtype) * shadow.gd[S]
        else:
            step = g_gd[S].add(shadow.gd[S], alpha=wd) if wd else g_gd[S]
        shadow.gd[S] = shadow.gd[S].add(step, alpha=-lr)


def _rel(d: float, m: float) -> float:
    if not (math.isfinite(d) and math.isfinite(m)):
        return float("nan")
    return d / m if m > 0 else (float("inf") if d > 0 else 0.0)


def chain_parts(theta_s: torch.Tensor, theta_gd: torch.Tensor, theta_lin: torch.Tensor, theta_lin_r: torch.Tensor,
                theta_q: torch.Tensor) -> dict:
    """The drift ``θ_QODE − θ_SGD`` as four difference vectors along the chain of runs that differ in one
    thing each (DESIGN.md, "What a window gets wrong, measured apart"); they sum to ``θ_QODE − θ_SGD``
    (to round-off).

    Args:
        theta_s: ``θ_SGD``, SGD from θ0 on all weights on the window's batches (its momentum).
        theta_gd: ``θ_GD,S``, exact gradient descent on S at the window's lr and weight decay.
        theta_lin: ``θ_lin = θ0 + u(T)``, the exact Carleman solution (Eq. II.102).
        theta_lin_r: ``θ_lin,r``, that solution pruned as the readout prunes.
        theta_q: ``θ_QODE``, the tomography estimate (Eq. II.123) pruned the same way.

    Returns:
        ``{"support": θ_GD,S − θ_SGD, "linearization": θ_lin − θ_GD,S, "readout_pruning": θ_lin,r − θ_lin,
        "readout_noise": θ_QODE − θ_lin,r}`` (:data:`PARTS`).
    """
    runs = (theta_s, theta_gd, theta_lin, theta_lin_r, theta_q)
    return {name: b - a for name, a, b in zip(PARTS, runs[:-1], runs[1:])}


def drift(theta_q: torch.Tensor, theta_lin: torch.Tensor, snapshot: dict,
          theta_lin1: Optional[torch.Tensor] = None, theta_lin_r: Optional[torch.Tensor] = None,
          theta_twin: Optional[torch.Tensor] = None) -> dict:
    """How far the window landed from SGD on the same batches, and why.

    * ``l2`` / ``relative``: ``||θ_qode − θ_sgd||`` against SGD run from θ0 on the same batches
      (momentum, all weights), relative to ``||θ_sgd − θ0||``.
    * ``linearization`` / ``linearization_relative``: ``||θ_lin − θ_gd||`` between the exact Carleman
      solution ``θ_lin = θ0 + u(T)`` and plain gradient descent on S at the window's lr (``θ_gd``),
      relative to ``||θ_gd − θ0||``: the error of the Taylor/Carleman model alone.
    * ``readout``: ``||θ_qode − θ_lin||`` — tomography noise, never-observed components, top-r pruning.
    * ``linearization_order1`` / ``linearization_order1_relative``: the same as ``linearization`` for
      ``θ0 + u⁽¹⁾(T)``, the order-1 state an order ≥ 2 window carries (``theta_lin1``; else ``None``):
      what an order-1 window would have drifted on the same batches (keys present only then).
    * ``parts``: the drift decomposed (:func:`chain_parts`), each part's norm relative to
      ``||θ_sgd − θ0||``: ``support`` (the sparsity constraint: GD on S against SGD on all weights),
      ``linearization`` (the Carleman model), ``readout_pruning`` (the readout's top-r prune of the exact
      solution), ``readout_noise`` (tomography); ``parts_l2`` the same norms unscaled (with ``theta_lin_r``).
    * ``twin``: the classical twin ``θ_twin`` (GD on S, then the readout's prune: ``theta_twin``):
      ``relative_sgd`` = ``||θ_twin − θ_sgd||`` and ``relative_qode`` = ``||θ_qode − θ_twin||`` (what the
      quantum errors cost), both relative to ``||θ_sgd − θ0||``.
    """
    theta0, theta_s, theta_gd = snapshot["theta0"], snapshot["theta_s"], snapshot["theta_gd"]
    moved, moved_gd = float((theta_s - theta0).norm()), float((theta_gd - theta0).norm())
    d, d_lin = float((theta_q - theta_s).norm()), float((theta_lin - theta_gd).norm())
    out = {"l2": d, "relative": _rel(d, moved), "linearization": d_lin,
           "linearization_relative": _rel(d_lin, moved_gd), "readout": float((theta_q - theta_lin).norm()),
           "sgd_displacement": moved, "gd_displacement": moved_gd, "loss_qode": None, "loss_sgd": None}
    if theta_lin1 is not None:
        d1 = float((theta_lin1 - theta_gd).norm())
        out.update(linearization_order1=d1, linearization_order1_relative=_rel(d1, moved_gd))
    if theta_lin_r is not None:
        l2 = {k: float(v.norm()) for k, v in chain_parts(theta_s, theta_gd, theta_lin, theta_lin_r, theta_q).items()}
        out.update(parts={k: _rel(v, moved) for k, v in l2.items()}, parts_l2=l2)
    if theta_twin is not None:
        out["twin"] = {"relative_sgd": _rel(float((theta_twin - theta_s).norm()), moved),
                       "relative_qode": _rel(float((theta_q - theta_twin).norm()), moved)}
    return out


def grads_at(params: list, closure: Callable, model, tensors) -> list:
    """``∇L_t`` at other weights on this step's batch, without touching the model (fresh ``.grad``
    slots, the weights swapped in through ``.data``, a forked RNG, frozen BatchNorm statistics)."""
    with own_grads(params):
        with holding(params, tensors), torch.enable_grad(), measuring(params, model):
            closure()
        return [None if p.grad is None else p.grad.detach() for p in params]


def measure_losses(info: dict, params: list, closure: Callable, model, theta_s: torch.Tensor,
                   theta_q: torch.Tensor) -> None:
    """``info["loss_sgd"]``, ``info["loss_qode"]``: the closure's loss at the SGD shadow and at QODE's weights."""
    for name, theta in (("loss_sgd", theta_s), ("loss_qode", theta_q)):
        with own_grads(params), holding(params, _flat.unflatten(theta, params)), torch.enable_grad(), \
                measuring(params, model):
            info[name] = loss_value(closure())


def drift_measurement(rep, shadow: Shadow, theta0: torch.Tensor, theta_q: torch.Tensor, theta_lin: torch.Tensor,
                      params: list, closure: Optional[Callable], model, *,
                      theta_lin1: Optional[torch.Tensor] = None, theta_lin_r: Optional[torch.Tensor] = None,
                      theta_twin: Optional[torch.Tensor] = None) -> Callable[[], None]:
    """The window-end measurement, run once the step is complete: ``rep.drift`` (see :func:`drift`;
    ``theta_lin_r`` and ``theta_twin`` from the finish stage :func:`~.finish.chain`) and, with a
    closure, both losses."""
    theta_s = _flat.flatten(shadow.params).clone()
    snapshot = {"theta0": theta0, "theta_s": theta_s, "theta_gd": theta_s if shadow.gd is None else shadow.gd}

    def measure() -> None:
        # the distances stand if a loss evaluation raises
        rep.drift = drift(theta_q, theta_lin, snapshot, theta_lin1, theta_lin_r, theta_twin)
        if closure is not None:
            measure_losses(rep.drift, params, closure, model, theta_s, theta_q)

    return measure
