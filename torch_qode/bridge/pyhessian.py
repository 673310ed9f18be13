"""The PyHessian 0.1 adapter: PyHessian's own algorithms with its faults fixed (a reference backend).

Imported on use only (``hessian_spectrum(..., backend="pyhessian")``, ``torch_qode.PyHessianAdapter``):
``import torch_qode`` does not load ``pyhessian``.
"""
from __future__ import annotations

import contextlib
import importlib
import types
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from . import flat as _flat
from .._checks import require_int

_pyhessian_module = importlib.import_module("pyhessian.hessian")  # the module (the package re-exports the class)
_pyhessian_utils = importlib.import_module("pyhessian.utils")

__all__ = ["PyHessianAdapter"]


class _TorchWithEig(types.ModuleType):
    """Stands in for ``torch`` inside ``pyhessian.hessian`` while an adapter method runs: everything
    is torch's, plus the ``torch.eig`` that PyTorch removed (here a float64 symmetric eigensolver
    for PyHessian's Lanczos tridiagonal)."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def eig(T, eigenvectors=True):
        vals, vecs = torch.linalg.eigh(T.detach().double().cpu())
        return torch.stack([vals, torch.zeros_like(vals)], dim=1), vecs


def _to(x, device):
    return x.to(device) if isinstance(x, torch.Tensor) else x


def _scalar_loss(loss):
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn (criterion) must return a scalar torch tensor, got {shape}")
    return loss.reshape(())


class PyHessianAdapter(_pyhessian_module.hessian):
    """PyHessian 0.1's ``hessian`` with its faults fixed; PyHessian's own algorithms otherwise.

    Fixed: (1) the constructor no longer calls ``model.eval()`` (the mode is the caller's) nor
    ``loss.backward(create_graph=True)`` (which left graphs in ``.grad`` and added to existing
    gradients): the gradient graph comes from ``autograd.grad``; (2) the device is the model's, not
    ``cuda=True``; (3) ``density`` used the removed ``torch.eig``: the tridiagonal is diagonalised by a
    float64 ``eigh``; (4) ``trace`` stopped after two samples whenever the running trace was negative
    (relative test against a signed denominator): the test uses ``|trace|``; (5) every method
    restores the model's ``.grad`` (PyHessian calls ``model.zero_grad()``), modes and buffers, and
    draws its random vectors from a forked RNG seeded by ``seed`` (the global RNG is untouched);
    (6) models re-parametrised by ``torch.nn.utils.prune`` (``weight_orig``) are refused; (7) a
    BatchNorm in training mode normalises with the batch statistics without updating its running
    buffers.

    Args:
        model: The network (its mode, ``.grad`` and buffers are left as they were).
        criterion: ``(outputs, targets) -> scalar loss``.
        data: One batch ``(inputs, targets)``: its gradient graph is built once, here.
        dataloader: Batches ``(inputs, targets)`` averaged over by every product (instead of ``data``).
        cuda: Only checked against the model's device (``None``: take the model's).
        params: The tensors the Hessian is taken over (default: the model's parameters).
        seed: Seeds the forked RNG of the random vectors (``None`` = 0).

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``, ``criterion`` is not callable, or ``data`` is
            not a pair.
        ValueError: Not exactly one of ``data`` and ``dataloader``, a ``cuda`` that contradicts the
            model's device, a ``torch.nn.utils.prune`` model, or a non-scalar loss.
    """

    def __init__(self, model: nn.Module, criterion, data=None, dataloader=None, cuda: Optional[bool] = None,
                 *, params=None, seed: int = 0):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if (data is None) == (dataloader is None):
            raise ValueError("pass exactly one of data=(inputs, targets) or dataloader=")
        _flat.check_no_torch_prune(model)
        seed_i = 0 if seed is None else require_int(seed, "seed", "an integer or None (= 0)")
        if not callable(criterion):
            raise TypeError("criterion must be callable: (outputs, targets) -> scalar loss")
        self.model, self.criterion, self.seed = model, criterion, seed_i
        self.params = _flat.param_list(model if params is None else params)
        dev = self.params[0].device
        if cuda is not None and bool(cuda) != (dev.type == "cuda"):
            raise ValueError(f"cuda={cuda!r} does not match the model's device {dev}; leave cuda=None")
        self.device = dev
        self.full_dataset = dataloader is not None
        self.data = dataloader if self.full_dataset else data
        self.gradsH = None
        if not self.full_dataset:
            if not (isinstance(data, (tuple, list)) and len(data) == 2):
                raise TypeError("data must be a pair (inputs, targets)")
            self.inputs, self.targets = (_to(t, dev) for t in data)
            with self._model_guard():
                loss = _scalar_loss(self.criterion(self.model(self.inputs), self.targets))
                self.gradsH = list(torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True,
                                                       materialize_grads=True))

    def _model_guard(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(_flat.preserved(self.model, self.params))
        stack.enter_context(_flat.batch_stats_no_update(self.model))
        stack.enter_context(torch.enable_grad())
        return stack

    def dataloader_hv_product(self, v):
        """The Hessian-vector product averaged over the dataloader's batches (weighted by batch size).

        Args:
            v: One tensor per parameter (the direction).

        Returns:
            ``(v·Hv, Hv)``: the Rayleigh numerator as a float and ``Hv``, one detached tensor per parameter.

        Raises:
            ValueError: The criterion returned a non-scalar loss.
        """
        THv = [torch.zeros_like(p) for p in self.params]
        num = 0.0
        for inputs, targets in self.data:
            inputs, targets = _to(inputs, self.device), _to(targets, self.device)
            with self._model_guard():
                loss = _scalar_loss(self.criterion(self.model(inputs), targets))
                g = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True,
                                        materialize_grads=True)
                Hv = torch.autograd.grad(g, self.params, grad_outputs=v, allow_unused=True, materialize_grads=True)
            b = float(inputs.size(0))
            THv = [t + h.detach() * b for t, h in zip(THv, Hv)]
            num += b
        THv = [t / num for t in THv]
        return float(sum((t * x).sum() for t, x in zip(THv, v))), THv

    def _guarded(self, fn, *args, **kwargs):
        devs = [self.device] if self.device.type == "cuda" else []
        with self._model_guard(), torch.random.fork_rng(devices=devs):
            torch.manual_seed(self.seed)
            saved = _pyhessian_module.torch
            _pyhessian_module.torch = _TorchWithEig()
            try:
                return fn(*args, **kwargs)
            finally:
                _pyhessian_module.torch = saved

    def eigenvalues(self, maxIter=100, tol=1e-3, top_n=1):
        """The top eigenvalues by PyHessian's power iteration (with deflation).

        Args:
            maxIter: Most power-iteration steps per eigenvalue.
            tol: Relative change between two steps at which an eigenvalue is taken.
            top_n: How many eigenvalues, largest first.

        Returns:
            ``(eigenvalues, eigenvectors)``: ``top_n`` floats and, for each, one detached tensor per parameter.
        """
        vals, vecs = self._guarded(super().eigenvalues, maxIter=maxIter, tol=tol, top_n=top_n)
        return vals, [[t.detach() for t in v] for v in vecs]

    def density(self, iter=100, n_v=1):
        """The Hessian's spectral density by PyHessian's stochastic Lanczos quadrature (SLQ).

        Args:
            iter: Lanczos steps per run.
            n_v: Number of SLQ runs (random start vectors).

        Returns:
            ``(eigen_list_full, weight_list_full)``: for each run, the Ritz values and their weights.
        """
        return self._guarded(super().density, iter=iter, n_v=n_v)

    def trace(self, maxIter=100, tol=1e-3):
        """Hutchinson samples ``vᵀHv`` (Rademacher ``v``) of the Hessian's trace.

        Args:
            maxIter: Most samples.
            tol: Stop when the running mean changes by less than this, relative to ``|mean|``.

        Returns:
            The samples as floats: their mean estimates the trace.
        """
        return self._guarded(self._trace, maxIter, tol)

    def _trace(self, maxIter, tol):
        samples, running = [], 0.0
        for _ in range(maxIter):
            v = [torch.randint_like(p, high=2) * 2 - 1 for p in self.params]
            if self.full_dataset:
                _, Hv = self.dataloader_hv_product(v)
            else:
                Hv = _pyhessian_utils.hessian_vector_product(self.gradsH, self.params, v)
            samples.append(float(_pyhessian_utils.group_product(Hv, v)))
            mean = float(np.mean(samples))
            if len(samples) > 1 and abs(mean - running) / (abs(running) + 1e-6) < tol:
                return samples
            running = mean
        return samples


