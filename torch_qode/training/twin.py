"""The classical twin as a training run: QODE's cycle with every quantum window replaced by the classical
algorithm it emulates (DESIGN.md, "What a window gets wrong, measured apart").

At each position ``c = k mod cycle`` the twin does what QODE does, except that the window
(``c ≥ classical_steps``) is exact gradient descent on S — no momentum, the window's lr and weight
decay, ``T = cycle − classical_steps`` steps (or the T the QODE run's window took, ``length=``; the rest of
the cycle then trains classically, as QODE's does with ``window="auto"``), S all weights for a dense
upload and the pruner's support (pruned at the upload, as QODE's sparse upload prunes) for a sparse one
— followed at the window's end by the readout's keep-r prune (:func:`~torch_qode.training.finish.top_r`,
dense upload with pruning), with no linearisation and no shot noise; momentum restarts after the window,
as after QODE's.  Every window is run this way, whatever QODE's dissipation check decides: the twin is
the schedule the quantum algorithm emulates, so QODE − twin is what the quantum errors cost and twin −
SGD what the schedule costs.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, Optional

import torch

from ..bridge import flat as _flat
from .classical import reset_momentum
from .finish import top_r, write_params
from .qode import QODE
from .window import readout_keep, support_without, window_rates

__all__ = ["Twin"]


class Twin:
    """The classical twin of a QODE run (wraps ``QODE(mode="classical")`` for the downloads and the
    classical steps; the window steps are masked gradient descent on S through the same SGD update).

    Args:
        params: the parameters (or parameter groups) to train.
        length: ``() -> T`` of the QODE run's current window (e.g. ``lambda: opt.reports[-1].window``, read
            at each window step; ``None`` or returning ``None``: ``cycle − classical_steps``).
        **kwargs: QODE's arguments, as given to the QODE run it twins (``mode`` and ``track_sgd`` are
            overridden: ``"classical"``, ``False``).

    Raises:
        ValueError: QODE refuses the arguments.
        TypeError: QODE refuses the arguments.
    """

    def __init__(self, params, length: Optional[Callable[[], Optional[int]]] = None, **kwargs):
        self.opt = QODE(params, **{**kwargs, "mode": "classical", "track_sgd": False})
        self._length = length
        self.cfg = self.opt.cfg
        self._params = [p for g in self.opt.param_groups for p in g["params"]]
        self._mask: Optional[list] = None        # per parameter: True on S (None: dense, every weight)
        self._support: Optional[torch.Tensor] = None
        self._gd = False                         # this window is gradient descent on S

    @property
    def param_groups(self) -> list:
        """The wrapped optimizer's parameter groups."""
        return self.opt.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients.

        Args:
            set_to_none: as ``torch.optim.Optimizer.zero_grad``.
        """
        self.opt.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], torch.Tensor]):
        """One step of the twin.

        Args:
            closure: re-evaluates the loss and calls ``backward()``.

        Returns:
            The closure's loss.
        """
        cfg = self.cfg
        c = self.opt.step_count % cfg.cycle
        if c < cfg.classical_steps:
            return self.opt.step(closure)
        if c == cfg.classical_steps:
            self._open()
        if not self._gd:                         # groups with different lr: QODE trains this window by SGD
            return self.opt.step(closure)
        saved = [g["momentum"] for g in self.opt.param_groups]
        for g in self.opt.param_groups:
            g["momentum"] = 0.0
        try:
            loss = self.opt.step(lambda: self._masked(closure, first=c == cfg.classical_steps))
        finally:
            for g, m in zip(self.opt.param_groups, saved):
                g["momentum"] = m
        if c == cfg.classical_steps + self.window_length() - 1:
            self._close()
        return loss

    def window_length(self) -> int:
        """The current window's T: the ``length=`` callable's, else ``cycle − classical_steps``.

        Returns:
            T, at least 1 and at most ``cycle − classical_steps``.
        """
        T = self._length() if self._length is not None else None
        full = self.cfg.window_length
        return full if T is None else max(1, min(int(T), full))

    def _open(self) -> None:
        """The upload: S (a sparse upload prunes first, as QODE's does), or no window (``lr`` differ)."""
        _, _, why = window_rates(self.opt.param_groups, self._params[0].device)
        self._gd = not why
        pruner = self.opt.pruner
        support = None
        if self.cfg.upload == "sparse" and pruner is not None:
            pruner.prune()
            support = pruner.support()
        self._support = support

    def _masked(self, closure: Callable, first: bool):
        """The closure, its gradients zeroed outside S (at the upload: S less the unused parameters)."""
        loss = closure()
        if first:
            unused = [i for i, p in enumerate(self._params) if p.grad is None]
            if unused:
                self._support = support_without(self._params, unused, self._support)
            self._mask = None
            if self._support is not None:
                flat = torch.zeros(sum(p.numel() for p in self._params), dtype=torch.bool,
                                   device=self._params[0].device)
                flat[self._support] = True
                self._mask = [m.view_as(p) for m, p in zip(_flat.unflatten(flat, self._params), self._params)]
        if self._mask is not None:
            for p, m in zip(self._params, self._mask):
                if p.grad is not None:
                    p.grad.mul_(m)
        return loss

    @torch.no_grad()
    def _close(self) -> None:
        """The window's end: the readout's keep-r prune (dense upload with pruning); momentum restarts."""
        keep = readout_keep(self._params, self.opt.pruner) if self.cfg.upload == "dense" else None
        if keep is not None:
            theta = _flat.flatten([p.detach() for p in self._params]).clone()
            S = self._support
            values = theta if S is None else theta[S]
            top_r(values, SimpleNamespace(support=S, theta0=theta), keep)   # outside S: θ0
            if S is not None:
                theta[S] = values
            write_params(self._params, theta)
        reset_momentum(self._params, self.opt.state)
        self._mask, self._support, self._gd = None, None, False
