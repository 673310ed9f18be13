"""Global magnitude pruning: the tomographic *download* of DESIGN.md step 1 (paper Algorithm 1).

The quantum cycle reads back the r largest components of the weight vector; classically that is
global magnitude pruning over the prunable tensors (ratio 0.9 in the paper's ResNet experiment).
Pruned weights are zeroed *in place* but stay ordinary parameters (no ``torch.nn.utils.prune``
re-parametrisation, which renames them ``weight_orig`` and blocks regrowth), so classical SGD steps
may regrow them, as the paper allows.

Counting and ties
-----------------
With ``n_prunable`` entries over the prunable tensors, :meth:`MagnitudePruner.prune` zeroes exactly
``k = round(sparsity * n_prunable)`` of them, where ``round`` is Python's built-in ``round`` (round
half to even: 0.5 -> 0, 2.5 -> 2).  The k entries of smallest ``|w|`` are pruned; among equal
magnitudes the entry with the lower global flat index (parameter order, then row-major order) is
pruned first, so the result is deterministic and independent of the device.

Distributions and the floor
---------------------------
``distribution`` chooses how the k pruned entries spread over the tensors (the registry
:data:`~torch_qode.bridge.sparsity.DISTRIBUTIONS`: ``"global"``, ``"uniform"``, ``"erk"``; see
:mod:`torch_qode.bridge.sparsity`); every one prunes exactly k entries.  ``min_density`` is a
per-tensor floor: each prunable tensor keeps at least ``max(1, ceil(min_density · numel))`` entries
(default 1 %), so no tensor is pruned to all zeros; ``"global"`` with a floor that does not bind is
the rule above bit for bit, and ``min_density=0`` is that rule always.  A prune that empties a
tensor (possible only with ``min_density=0``) warns once, naming it.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from . import flat as _flat
from .sparsity import DEFAULT_MIN_DENSITY, DISTRIBUTIONS, floor_counts, keep_counts, keep_dense_rule
from .._checks import require_real

__all__ = ["MagnitudePruner", "SparsityReport", "LayerSparsity"]


@dataclass
class LayerSparsity:
    """One parameter tensor: ``pruned`` counts mask zeros, ``zeros`` the entries that are exactly 0 now."""

    name: str
    numel: int
    prunable: bool
    pruned: int
    zeros: int

    @property
    def sparsity(self) -> float:
        """Fraction of entries exactly zero now (after regrowth this can fall below the mask's)."""
        return self.zeros / self.numel if self.numel else 0.0


@dataclass
class SparsityReport:
    """Per-layer and global sparsity.  ``global_sparsity``: zeros / entries over the prunable tensors;
    ``mask_sparsity``: pruned / prunable entries (what the last :meth:`MagnitudePruner.prune` set);
    ``total_sparsity``: zeros / entries over all tensors."""

    layers: list[LayerSparsity] = field(default_factory=list)
    n_prunable: int = 0
    n_total: int = 0
    global_sparsity: float = 0.0
    mask_sparsity: float = 0.0
    total_sparsity: float = 0.0

    def as_dict(self) -> dict:
        """All fields as a plain dict, each layer's row with its ``sparsity`` added.

        Returns:
            One entry per field; ``layers`` a list of dicts.
        """
        d = asdict(self)
        for row, layer in zip(d["layers"], self.layers):
            row["sparsity"] = layer.sparsity
        return d


class MagnitudePruner:
    """Magnitude pruning (global, uniform or ERK per tensor) with masks (``True`` = kept) and the support ``S``.

    Args:
        params: The parameter tensors in the optimizer's order (a list, each tensor once, or an ``nn.Module`` whose
            ``named_parameters()`` then also give the names).
        sparsity: Fraction of the prunable entries to zero, in ``[0, 1)``.
        names: One name per tensor (default ``param0``, ``param1``, … or the module's parameter names).
        prunable: ``None`` -> with ``model``, :func:`~torch_qode.bridge.sparsity.keep_dense_rule` (embeddings,
            tokens, norms, biases and the output layer stay dense); without, tensors with ``dim() > 1`` (weights;
            biases and norm scales are kept); a list of bools, one per tensor; or a callable ``(name, tensor) -> bool``.
        distribution: how the pruned entries spread over the tensors: ``"global"`` (default), ``"uniform"`` or
            ``"erk"`` (:data:`~torch_qode.bridge.sparsity.DISTRIBUTIONS`).
        min_density: per-tensor floor in ``[0, 1)``: each prunable tensor keeps at least
            ``max(1, ceil(min_density · numel))`` entries (default 0.01); 0: no floor.
        model: the module that owns the tensors, for the default ``prunable`` rule (optional).
    """

    def __init__(self, params, sparsity: float, *, names: Optional[Sequence[str]] = None,
                 prunable: Union[None, Sequence[bool], Callable[[str, torch.Tensor], bool]] = None,
                 distribution: str = "global", min_density: float = DEFAULT_MIN_DENSITY,
                 model: Optional[nn.Module] = None):
        if isinstance(params, nn.Module):
            named = [(n, p) for n, p in params.named_parameters() if p.requires_grad]
            if names is None:
                names = [n for n, _ in named]
            params = [p for _, p in named]
        self.params = _flat.param_list(params)
        first = {}
        for i, p in enumerate(self.params):
            j = first.setdefault(id(p), i)
            if j != i:
                raise ValueError(f"params[{i}] is the same tensor as params[{j}]: pass each tensor once "
                                 "(a tied weight is one parameter)")
        k = len(self.params)
        if names is None:
            names = [f"param{i}" for i in range(k)]
        names = list(names)
        if len(names) != k or not all(isinstance(s, str) for s in names):
            raise ValueError(f"names must be {k} strings, one per parameter tensor; got {names!r}")
        if len(set(names)) != k:
            raise ValueError("names must be distinct")
        self.names = names
        DISTRIBUTIONS.lookup(distribution, "pruning")     # an unknown name raises, listing the registry
        self.distribution = distribution
        md = require_real(min_density, "min_density", "a float in [0, 1)")
        if not (math.isfinite(md) and 0.0 <= md < 1.0):
            raise ValueError(f"min_density must be in [0, 1) (each tensor's least kept fraction), got {min_density!r}")
        self.min_density = float(md)
        if prunable is None and model is not None:
            prunable = keep_dense_rule(model)
        if prunable is None:
            flags = [p.dim() > 1 for p in self.params]
        elif callable(prunable):
            flags = [bool(prunable(nm, p)) for nm, p in zip(names, self.params)]
        else:
            flags = list(prunable)
            if len(flags) != k or not all(isinstance(f, (bool, int, np.bool_, np.integer)) for f in flags):
                raise ValueError(f"prunable must be None, a callable(name, tensor) -> bool or {k} bools; "
                                 f"got {prunable!r}")
            flags = [bool(f) for f in flags]
        self.prunable = flags
        self.n_prunable = int(sum(p.numel() for p, f in zip(self.params, flags) if f))
        self.sparsity = self._check_sparsity(sparsity)
        self.masks = [torch.ones_like(p, dtype=torch.bool) for p in self.params]
        self._warned_empty: set = set()
        self._offsets = [0]
        for p in self.params:
            self._offsets.append(self._offsets[-1] + p.numel())

    def _check_sparsity(self, sparsity) -> float:
        s = require_real(sparsity, "sparsity", "a float in [0, 1)")
        if not (math.isfinite(s) and 0.0 <= s < 1.0):
            raise ValueError(f"sparsity must be in [0, 1) (fraction of prunable entries zeroed), got {sparsity!r}")
        if s > 0 and self.n_prunable == 0:
            raise ValueError("no prunable tensors: every tensor is excluded by `prunable` (default: dim() > 1), "
                             f"so sparsity {s} cannot be met; pass prunable= or sparsity=0")
        k = self.n_pruned_target(s)
        if self.n_prunable and k >= self.n_prunable:
            raise ValueError(f"sparsity {s} prunes all {self.n_prunable} prunable entries "
                             f"(round({s} * {self.n_prunable}) = {k}); use a smaller sparsity")
        floors = sum(floor_counts([p.numel() for p, f in zip(self.params, self.prunable) if f], self.min_density))
        if k and floors > self.n_prunable - k:
            raise ValueError(f"sparsity {s} keeps {self.n_prunable - k} entries, fewer than the {floors} that "
                             f"min_density={self.min_density} keeps (at least one per prunable tensor); "
                             "use a smaller sparsity or min_density=0")
        return s

    def n_pruned_target(self, sparsity: Optional[float] = None) -> int:
        """``round(sparsity * n_prunable)`` (Python's round, half to even).

        Args:
            sparsity: The fraction to count for (default: the pruner's).

        Returns:
            The number of entries a prune at ``sparsity`` zeroes.
        """
        s = self.sparsity if sparsity is None else sparsity
        return int(round(s * self.n_prunable))

    # ------------------------------------------------------------------------------------ pruning
    @torch.no_grad()
    def prune(self, sparsity: Optional[float] = None) -> list[torch.Tensor]:
        """Zero ``round(sparsity · n_prunable)`` prunable entries in place: each tensor loses its smallest
        magnitudes, as many as :attr:`distribution` (and the floor) give it.

        Args:
            sparsity: Overrides (and replaces) the constructor's value, in ``[0, 1)``.

        Returns:
            One bool mask per tensor (copies of what :attr:`masks` now stores), ``True`` = kept;
            non-prunable tensors get all-``True``.

        Raises:
            ValueError: A bad ``sparsity`` (outside ``[0, 1)``, pruning every prunable entry, or under the
                ``min_density`` floor), or a prunable tensor that holds NaN or ±inf.
        """
        if sparsity is not None:
            self.sparsity = self._check_sparsity(sparsity)
        k = self.n_pruned_target()
        pr = [p for p, f in zip(self.params, self.prunable) if f]
        masks = [torch.ones_like(p, dtype=torch.bool) for p in self.params]
        if k > 0:
            if not all(bool(torch.isfinite(p.detach()).all()) for p in pr):
                raise ValueError("params: a prunable tensor holds NaN or inf; cannot rank magnitudes")
            counts = iter(keep_counts(self.distribution, pr, self.n_prunable - k, self.min_density))
            emptied = []
            for i, (p, f) in enumerate(zip(self.params, self.prunable)):
                if f:
                    c = next(counts)
                    mag = p.detach().reshape(-1).abs().to(torch.float64)
                    order = torch.sort(mag, stable=True).indices  # ties: lower flat index pruned first
                    keep = torch.ones(p.numel(), dtype=torch.bool, device=p.device)
                    keep[order[:p.numel() - c]] = False
                    masks[i] = keep.view(p.shape)
                    p.masked_fill_(~masks[i], 0)
                    if c == 0 and p.numel():
                        emptied.append(self.names[i])
            new = [nm for nm in emptied if nm not in self._warned_empty]
            if new:
                self._warned_empty.update(new)
                warnings.warn(f"pruning={self.distribution!r} at sparsity {self.sparsity} with min_density="
                              f"{self.min_density} zeroes every entry of {len(new)} tensor(s): {', '.join(new)}; "
                              "a floor (min_density > 0) keeps some of each", UserWarning, stacklevel=2)
        self.masks = masks
        return [m.clone() for m in masks]

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Re-zero the pruned entries (undo regrowth) without re-ranking."""
        for p, m in zip(self.params, self.masks):
            p.masked_fill_(~m, 0)

    def support(self, nonzero_only: bool = False, *, include_nonprunable: bool = True) -> torch.Tensor:
        """Flat indices (sorted int64, on the parameters' device) of the support S.

        ``nonzero_only=False``: the kept entries of the masks (all entries of non-prunable tensors).
        ``nonzero_only=True``: the entries of the prunable tensors that are non-zero *now* (after
        regrowth) — the sparse upload — plus, if ``include_nonprunable`` (default), every entry of the
        non-prunable tensors (biases initialised at 0 stay trainable).  With
        ``include_nonprunable=False`` only currently non-zero entries of every tensor are returned.

        Args:
            nonzero_only: Take the entries non-zero now instead of the masks' kept entries.
            include_nonprunable: With ``nonzero_only``, add every entry of the non-prunable tensors.

        Returns:
            The support ``S``, flat indices into the parameters in the optimizer's order.

        Raises:
            ValueError: The support would be empty.
        """
        parts = []
        for off, p, m, f in zip(self._offsets, self.params, self.masks, self.prunable):
            if nonzero_only:
                sel = (p.detach() != 0) if (f or not include_nonprunable) else torch.ones_like(m)
            else:
                sel = m
            parts.append(torch.nonzero(sel.reshape(-1), as_tuple=False).reshape(-1) + off)
        S = torch.cat(parts).to(torch.int64)
        if S.numel() == 0:
            raise ValueError("the support is empty: every entry is pruned or zero")
        return S

    def report(self) -> SparsityReport:
        """Per-layer and global sparsity now (zeros after regrowth) and of the masks.

        Returns:
            A :class:`SparsityReport`, one :class:`LayerSparsity` per tensor.
        """
        layers = []
        for nm, p, m, f in zip(self.names, self.params, self.masks, self.prunable):
            layers.append(LayerSparsity(name=nm, numel=p.numel(), prunable=f, pruned=int((~m).sum()),
                                        zeros=int((p.detach() == 0).sum())))
        npr = self.n_prunable
        ntot = sum(x.numel for x in layers)
        zp = sum(x.zeros for x in layers if x.prunable)
        return SparsityReport(layers=layers, n_prunable=npr, n_total=ntot,
                              global_sparsity=zp / npr if npr else 0.0,
                              mask_sparsity=sum(x.pruned for x in layers) / npr if npr else 0.0,
                              total_sparsity=sum(x.zeros for x in layers) / ntot if ntot else 0.0)

    # ---------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """The pruner's state, for checkpoints.

        Returns:
            ``sparsity``, ``names``, ``prunable``, ``masks`` (CPU copies), ``distribution`` and ``min_density``.
        """
        return {"sparsity": self.sparsity, "names": list(self.names), "prunable": list(self.prunable),
                "masks": [m.detach().cpu().clone() for m in self.masks], "distribution": self.distribution,
                "min_density": self.min_density}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved (the masks move to the parameters' devices).

        A state saved before distributions existed loads as ``"global"`` with no floor.

        Args:
            state: A dict from :meth:`state_dict` of a pruner over the same tensors.

        Raises:
            ValueError: ``state`` is not such a dict, its names, prunable flags, mask shapes or count
                disagree with this pruner's, or it holds an unknown distribution or a bad sparsity.
        """
        if not isinstance(state, dict) or not {"sparsity", "names", "prunable", "masks"} <= set(state):
            raise ValueError("state must be a dict from MagnitudePruner.state_dict() "
                             "(keys sparsity, names, prunable, masks)")
        if list(state["names"]) != self.names:
            raise ValueError(f"state names {list(state['names'])} do not match this pruner's {self.names}")
        if list(state["prunable"]) != self.prunable:
            raise ValueError("state prunable flags do not match this pruner's")
        masks = list(state["masks"])
        for i, (m, p) in enumerate(zip(masks, self.params)):
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.shape != p.shape:
                raise ValueError(f"state masks[{i}] must be a bool tensor of shape {tuple(p.shape)}")
        if len(masks) != len(self.params):
            raise ValueError(f"state holds {len(masks)} masks, expected {len(self.params)}")
        dist = state.get("distribution", "global")      # a state from before distributions: global, no floor
        DISTRIBUTIONS.lookup(dist, "state distribution")
        self.distribution, self.min_density = dist, float(state.get("min_density", 0.0))
        self.sparsity = self._check_sparsity(state["sparsity"])
        self.masks = [m.to(p.device).clone() for m, p in zip(masks, self.params)]

    def __repr__(self) -> str:
        return (f"MagnitudePruner(sparsity={self.sparsity}, distribution={self.distribution!r}, "
                f"min_density={self.min_density}, tensors={len(self.params)}, "
                f"prunable_entries={self.n_prunable})")
