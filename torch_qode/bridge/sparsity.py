"""How a download spreads its sparsity over the tensors, and which tensors it leaves dense.

Distributions (the registry :data:`DISTRIBUTIONS`)
--------------------------------------------------
A distribution is a function ``(tensors, keep, floors) -> counts``: given the prunable tensors, the
number ``keep`` of entries to keep over all of them and a per-tensor floor, it returns how many
entries each tensor keeps (``floors[i] ≤ counts[i] ≤ numel``, ``sum(counts) == keep`` exactly).
:class:`~torch_qode.bridge.pruning.MagnitudePruner` then keeps the ``counts[i]`` largest ``|w|`` of
each tensor (ties: the lower flat index is pruned first).

* ``"global"`` — global magnitude pruning (the paper's): the ``keep`` largest ``|w|`` over all the
  prunable tensors, except that each tensor first keeps its ``floors[i]`` largest entries; the rest
  of the budget goes to the largest of the remaining entries.  When the global choice already keeps
  ``floors[i]`` entries of every tensor this is exactly the floorless global prune, bit for bit.
* ``"uniform"`` — every tensor keeps the same fraction ``keep / n`` (largest remainders round it).
* ``"erk"`` — Erdős–Rényi-Kernel (Evci et al., *Rigging the Lottery*, ICML 2020): the density of a
  tensor is proportional to ``sum(shape) / prod(shape)`` (``(n_in + n_out + k_h + k_w) / (n_in ·
  n_out · k_h · k_w)`` for a convolution), scaled to meet the global target; a tensor whose density
  would exceed 1 is kept dense and the others are rescaled (and likewise a tensor that would fall
  below its floor is held at it).  Small and thin tensors (depthwise convolutions, heads) keep more.

Counts are reals rounded by largest remainder (ties: the lower tensor index first), within the floor
and the tensor's size, so the global count is always exact.

The floor (``min_density``)
---------------------------
``floors[i] = max(1, ceil(min_density · numel_i))`` for ``min_density > 0`` (at least one entry: no
tensor is ever pruned to all zeros), ``0`` for ``min_density = 0`` (no floor: today's global prune,
which can empty a tensor; :class:`MagnitudePruner` warns when it does).  Default
:data:`DEFAULT_MIN_DENSITY` = 1 %.  If the floors alone exceed the budget the sparsity cannot be met
and the pruner refuses it.

Which tensors are pruned (:func:`keep_dense_rule`)
--------------------------------------------------
The sparse-training literature keeps dense the embeddings, the position / class tokens, the
normalisation layers and biases, and the output layer.  With the model at hand the rule is by the
owning module: a parameter is prunable when it has ``dim() > 1``, its attribute name ends in
``weight`` (``weight``, ``in_proj_weight``, …), its module is not an embedding or a normalisation
layer, and it is not the weight of the model's output layer (the last ``nn.Linear`` in
``model.modules()`` order, outside attention blocks).  So a ViT's ``class_token`` and
``pos_embedding`` (owned by the model, not by a layer), GPT-2's ``wte``/``wpe`` and a head stay dense;
Linear, ConvNd, ``MultiheadAttention.in_proj_weight`` and Hugging Face's ``Conv1D`` are pruned.
Without a model, :func:`name_rule` applies the same rule from the names alone (no output layer).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from ..core.registry import Registry

__all__ = ["DISTRIBUTIONS", "DEFAULT_MIN_DENSITY", "floor_counts", "keep_counts", "keep_dense_rule",
           "name_rule", "output_layer"]

#: the default floor: every prunable tensor keeps at least 1 % of its entries (and at least one)
DEFAULT_MIN_DENSITY = 0.01

#: name -> ``(tensors, keep, floors) -> counts``
DISTRIBUTIONS = Registry("sparsity distribution")


def floor_counts(sizes: Sequence[int], min_density: float) -> list[int]:
    """``max(1, ceil(min_density · n))`` per size (capped at ``n``), or all 0 for ``min_density = 0``."""
    if min_density <= 0:
        return [0] * len(sizes)
    return [min(int(n), max(1, math.ceil(round(min_density * int(n), 9)))) for n in sizes]


def _round_to(x: list[float], lo: list[int], hi: list[int], total: int) -> list[int]:
    """Integers within ``[lo, hi]`` summing to ``total``: floors of ``x`` plus largest remainders."""
    c = [min(h, max(low, int(math.floor(v)))) for v, low, h in zip(x, lo, hi)]
    frac = [v - math.floor(v) for v in x]
    short = total - sum(c)
    order = sorted(range(len(x)), key=lambda i: (-frac[i], i))
    while short > 0:
        moved = False
        for i in order:
            if short and c[i] < hi[i]:
                c[i] += 1
                short -= 1
                moved = True
        if not moved:
            raise ValueError(f"cannot keep {total} entries within the tensors' sizes")
    while short < 0:
        moved = False
        for i in reversed(order):
            if short and c[i] > lo[i]:
                c[i] -= 1
                short += 1
                moved = True
        if not moved:
            raise ValueError(f"cannot keep only {total} entries above the floors")
    return c


def _scaled(weights: Sequence[float], sizes: Sequence[int], keep: int, floors: Sequence[int]) -> list[int]:
    """Counts ``clip(ε · w_i · n_i, floor_i, n_i)`` with ``ε`` chosen (bisection on a monotone
    piecewise-linear sum) so that they sum to ``keep``, then rounded by largest remainder."""
    sizes = [int(n) for n in sizes]
    lo, hi = list(floors), sizes
    raw = [w * n for w, n in zip(weights, sizes)]
    if keep >= sum(hi):
        return list(hi)

    def total(eps):
        return sum(min(h, max(low, eps * r)) for r, low, h in zip(raw, lo, hi))

    a, b = 0.0, max(h / r for r, h in zip(raw, hi) if r > 0) if any(r > 0 for r in raw) else 1.0
    for _ in range(200):
        m = 0.5 * (a + b)
        if total(m) < keep:
            a = m
        else:
            b = m
    x = [min(h, max(low, b * r)) for r, low, h in zip(raw, lo, hi)]
    return _round_to(x, lo, hi, keep)


def _global(tensors: Sequence[torch.Tensor], keep: int, floors: Sequence[int]) -> list[int]:
    sizes = [t.numel() for t in tensors]
    n = sum(sizes)
    if keep >= n:
        return sizes
    mags = torch.cat([t.detach().reshape(-1).abs().to(torch.float64) for t in tensors])
    order = torch.sort(mags, stable=True).indices            # ascending; ties: lower flat index first
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=order.device)
    score = rank.clone()
    off = 0
    for size, f in zip(sizes, floors):                       # each tensor's f largest are kept first
        if f:
            top = torch.topk(rank[off:off + size], f).indices
            score[off + top] += n
        off += size
    kept = torch.zeros(n, dtype=torch.bool, device=mags.device)
    kept[torch.topk(score, keep).indices] = True
    return [int(c) for c in torch.stack([k.sum() for k in kept.split(sizes)]).tolist()]


def _uniform(tensors, keep, floors):
    return _scaled([1.0] * len(tensors), [t.numel() for t in tensors], keep, floors)


def _erk(tensors, keep, floors):
    return _scaled([sum(t.shape) / t.numel() for t in tensors], [t.numel() for t in tensors], keep, floors)


DISTRIBUTIONS["global"] = _global
DISTRIBUTIONS["uniform"] = _uniform
DISTRIBUTIONS["erk"] = _erk


def keep_counts(distribution: str, tensors: Sequence[torch.Tensor], keep: int,
                min_density: float = DEFAULT_MIN_DENSITY) -> list[int]:
    """Per-tensor kept counts of ``distribution`` (a name in :data:`DISTRIBUTIONS`) for ``keep`` entries
    over ``tensors``, each at least its floor (see the module docstring)."""
    fn = DISTRIBUTIONS.lookup(distribution, "pruning")
    floors = floor_counts([t.numel() for t in tensors], min_density)
    if sum(floors) > keep:
        raise ValueError(f"min_density={min_density}: the floors keep {sum(floors)} entries, more than the "
                         f"{keep} the sparsity allows; lower min_density or the sparsity")
    counts = fn(tensors, keep, floors)
    assert sum(counts) == keep and all(f <= c <= t.numel() for f, c, t in zip(floors, counts, tensors))
    return counts


# ------------------------------------------------------------------------------- keep-dense rules
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
_NAME_DENSE = ("embedding", "embeddings", "embed_tokens", "wte", "wpe", "cls_token", "class_token",
               "pos_embed", "position")


def output_layer(model: nn.Module) -> Optional[nn.Module]:
    """The model's output layer: the last ``nn.Linear`` in ``model.modules()`` order that is not an
    attention block's own projection (``nn.MultiheadAttention.out_proj``)."""
    inside = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m) not in inside:
            last = m
    return last


def name_rule(name: str, tensor: torch.Tensor) -> bool:
    """Prunable from the name alone: ``dim() > 1``, the attribute ends in ``weight`` and no part of the
    name says embedding / token / position."""
    parts = name.lower().split(".")
    return tensor.dim() > 1 and parts[-1].endswith("weight") and not any(
        any(k in part for k in _NAME_DENSE) for part in parts)


def keep_dense_rule(model: nn.Module, *, keep_output: bool = True) -> Callable[[str, torch.Tensor], bool]:
    """The default ``prunable`` rule with a model (module docstring): ``rule(name, tensor) -> bool``,
    decided by the module that owns ``tensor``; a tensor the model does not own falls back to
    :func:`name_rule`."""
    head = output_layer(model) if keep_output else None
    flags = {}
    for mod in model.modules():
        for attr, p in mod.named_parameters(recurse=False):
            if id(p) in flags and not flags[id(p)]:
                continue                    # a tied weight stays dense if any of its owners says so
            dense = (p.dim() <= 1 or not attr.endswith("weight") or isinstance(mod, _EMBEDDINGS + _NORMS)
                     or mod is head)
            flags[id(p)] = not dense

    def rule(name: str, tensor: torch.Tensor) -> bool:
        flag = flags.get(id(tensor))
        return name_rule(name, tensor) if flag is None else flag
    return rule
