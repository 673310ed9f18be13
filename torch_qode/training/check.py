"""The dissipation check inside a window's life: at the upload, and at the window's first new batch.

The check (:class:`~torch_qode.bridge.dissipation.DissipationCheck`) runs on the upload batch's
products (``exp.hvp``, through the window's comm).  Its ``"predicted"`` criterion (issue 22) also
needs gradients at other weights: :func:`upload_probe` lends it the upload batch's (the closure
re-evaluated at ``θ0 + u``, a measuring call that leaves the model, its ``.grad`` and its buffers as
they were), and :func:`step_at` the first new batch's, where :func:`complete` finishes a provisional
verdict: the window then runs (to the T it chose, with ``window="auto"``) or is refused.  Under DDP the
gradients are the global batch's already (the model's own all-reduce), as the window's F0 is.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..bridge import flat as _flat
from ..bridge.dissipation import DissipationCheck, Probe, Verdict
from ..bridge.taylor import TaylorExpansion
from .comm import Comm

__all__ = ["refuse_settings", "check_dissipation", "gd_step", "upload_probe", "step_at", "complete", "upload_hvp"]

GradAt = Callable[[list], list]   # tensors held by the model -> its parameters' gradients (shadow.grads_at)


def refuse_settings(dissipation, window: str, mode: str) -> None:
    """QODE's ``dissipation`` argument, and a ``window="auto"`` that has something to choose T with.

    Args:
        dissipation: the check (``None``: the default ``DissipationCheck``).
        window: the ``window`` setting.
        mode: the ``mode`` setting.

    Raises:
        TypeError: ``dissipation`` is not callable.
        ValueError: ``window="auto"`` with ``mode="auto"`` and a check that does not predict the error (the
            paper's criterion, or another callable).  (``mode="quantum"`` runs no check: its windows keep
            ``T = cycle − classical_steps``, as the ``window`` setting says.)"""
    if dissipation is not None and not callable(dissipation):
        raise TypeError("dissipation must be a DissipationCheck (callable hvp, n, lr=, T=) or None")
    if window != "auto" or mode != "auto":
        return
    if dissipation is not None and getattr(dissipation, "criterion", None) != "predicted":
        raise ValueError("window='auto' needs a dissipation check that predicts the window's error: "
                         "DissipationCheck(criterion='predicted') (the default), not "
                         f"{getattr(dissipation, 'criterion', type(dissipation).__name__)!r}")


def check_dissipation(exp: TaylorExpansion, dissipation, lr: float, T: int, comm: Comm, device,
                      budget: Optional[float] = None, probe: Optional[Probe] = None, choose_T: bool = False):
    """The dissipation check on the upload batch's Hessian; one verdict for all ranks.

    Its products are the window's own (``exp.hvp``: the retained graph, or with ``hvp="recompute"`` a
    replay of the closure per product, one micro-batch's graph at a time), through ``comm``.  A
    :class:`~torch_qode.bridge.dissipation.DissipationCheck` without explicit ``steps`` is bounded by
    ``budget`` HVPs per HVP of the window (T at order 1): ``max_steps = ⌊budget·T/runs⌋``.

    Args:
        exp: the window's expansion at θ0.
        dissipation: the check (a ``DissipationCheck`` or a callable ``(hvp, n, lr=, T=, dtype=, device=)``).
        lr: the step η.
        T: the window length.
        comm: the window's collectives.
        device: where the Lanczos basis lives.
        budget: the check's HVPs per window HVP (``QODEConfig.check_budget``; ``None``: unbounded).
        probe: what the upload lends the ``"predicted"`` criterion (:func:`upload_probe`).
        choose_T: ``window="auto"``: the check chooses the window length.

    Returns:
        The verdict every rank acts on."""
    checks = isinstance(dissipation, DissipationCheck)
    bounded = checks and budget is not None
    kw = {"max_steps": int(budget * T // dissipation.runs)} if bounded else {}
    steps = dissipation.steps_for(kw.get("max_steps")) if checks else getattr(dissipation, "steps", 64)
    if checks and dissipation.criterion == "predicted":
        kw.update(probe=probe, choose_T=choose_T)
    # the Lanczos basis holds steps·n numbers: float64 unless that passes 1 GiB (then float32)
    dtype = torch.float64 if 8 * steps * exp.n <= 2**30 else torch.float32
    hvp = exp.hvp if comm.local else (lambda V: comm.reduce_hvp(exp.hvp(V)))
    with torch.enable_grad():
        verdict = dissipation(hvp, exp.n, lr=lr, T=T, dtype=dtype, device=device, **kw)
    return comm.agree(verdict)


def gd_step(grads: torch.Tensor, theta: torch.Tensor, support, lr: float, wd) -> torch.Tensor:
    """Gradient descent's step ``−η(∇L + wd·θ)`` on S, in float64 (the window's ``F0`` at θ0).

    Args:
        grads: the flat gradient ``∇L`` (all weights).
        theta: the flat weights it was taken at.
        support: S, or ``None`` (all weights).
        lr: η.
        wd: the weight decay (a float, or per coordinate over the full flat vector).

    Returns:
        The step on S."""
    S = slice(None) if support is None else support
    wd_S = wd[S] if isinstance(wd, torch.Tensor) else float(wd)
    return -lr * (grads[S].to(torch.float64) + wd_S * theta[S].to(torch.float64))


def step_at(grad_at: GradAt, params: list, theta0: torch.Tensor, support, lr: float,
            wd) -> Callable[[torch.Tensor], torch.Tensor]:
    """``u -> −η(∇L(θ0 + u) + wd·(θ0 + u))`` on S: gradient descent's step at ``θ0 + u`` on the batch
    ``grad_at`` evaluates (one measuring closure call per point, :func:`gd_step`).

    Args:
        grad_at: the batch's gradients at the weights the model is given (:func:`~.shadow.grads_at`).
        params: the parameters.
        theta0: the full flat θ0.
        support: S, or ``None`` (all weights).
        lr: η.
        wd: the weight decay (a float, or per coordinate over the full flat vector).

    Returns:
        The step function (float64 vectors on S)."""
    S = slice(None) if support is None else support

    def step(u: torch.Tensor) -> torch.Tensor:
        full = theta0.to(torch.float64, copy=True)
        full[S] += u.to(full)
        grads = grad_at(_flat.unflatten(full.to(theta0.dtype), params))
        flat = _flat.flatten([torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)])
        return gd_step(flat, full, support, lr, wd)
    return step


def upload_probe(exp: TaylorExpansion, grad_at: Optional[GradAt], grads: torch.Tensor, params: list,
                 theta0: torch.Tensor, support, lr: float, wd, comm: Comm, degree: int) -> Probe:
    """What the upload lends the ``"predicted"`` criterion: ``F0(0)`` (the window's, from the parameters'
    gradient ``grads``: the global batch's under DDP, where the expansion's own is this rank's),
    gradient descent's step at other weights on the upload batch (``grad_at``; ``None``: the remainder
    is not measured), and at degree ≥ 2 the window's terms beyond F1, ``Σ_{k≥2} F_k u^⊗k`` (the
    expansion's ODE, averaged through ``comm``).

    Args:
        exp: the expansion at θ0.
        grad_at: the upload batch's gradients at other weights, or ``None``.
        grads: the flat gradient at θ0 (the parameters' ``.grad``).
        params: the parameters.
        theta0: the full flat θ0.
        support: S, or ``None``.
        lr: η.
        wd: the weight decay.
        comm: the window's collectives.
        degree: the window's Taylor degree.

    Returns:
        The :class:`~torch_qode.bridge.dissipation.Probe`."""
    f0 = gd_step(grads, theta0, support, lr, wd)
    higher = None
    if degree >= 2:
        terms = exp.ode(F0=torch.zeros_like(f0), explicit=False).terms[2:]

        def higher(u):
            out = sum(t.power(u) for t in terms if t is not None)
            return out if comm.local else comm.reduce_hvp(out)
    step = None if grad_at is None else step_at(grad_at, params, theta0, support, lr, wd)
    return Probe(f0=f0, step=step, higher=higher, degree=degree)


def upload_hvp(win) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """``v -> (H + wd)v`` of the window's upload batch: from its explicit F1 (``−F1 v/η``, the same numbers
    after a resume) or its expansion's products (uncounted: the window's ledger counts its own); ``None``
    without either (a resumed matrix-free window before its re-expansion).

    Args:
        win: the live :class:`~.window.Window`.

    Returns:
        The product, or ``None``."""
    if win.explicit and win.system is not None:
        F1, lr = win.ode.terms[1], win.lr
        return lambda v: F1.matmat(v.reshape(-1, 1).to(torch.float64)).reshape(-1) / -lr
    return None if win.expansion is None else win.expansion.hvp


def complete(check: DissipationCheck, verdict: Verdict, step: Callable[[torch.Tensor], torch.Tensor],
             f1: torch.Tensor, hvp: Optional[Callable[[torch.Tensor], torch.Tensor]], comm: Comm,
             choose_T: bool, reduce: bool = True) -> Verdict:
    """A provisional verdict decided on the window's first new batch (its curvature and gradient noise).

    Args:
        check: the window's check.
        verdict: the upload's verdict (``pending``).
        step: gradient descent's step at other weights on this batch (:func:`step_at`).
        f1: ``F0(1)``, this batch's step at θ0 (on S).
        hvp: the upload batch's ``(H + wd)`` products (:func:`upload_hvp`; ``None``: none).
        comm: the window's collectives (explicit terms are already the global batch's).
        choose_T: ``window="auto"``.
        reduce: average ``hvp``'s products through ``comm`` (``False``: they are the global batch's already).

    Returns:
        The decided verdict, the same on every rank."""
    red = None if hvp is None else (hvp if comm.local or not reduce else (lambda V: comm.reduce_hvp(hvp(V))))
    with torch.enable_grad():
        check.complete(verdict, step, f1, hvp=red, choose_T=choose_T)
    return comm.agree(verdict)
