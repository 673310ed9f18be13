"""torch_qode.bridge.sparsity: the distributions (global, uniform, ERK) and their floor, the keep-dense rules,
the warning for an emptied tensor, and the old global prune reproduced bit for bit."""
from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from torch_qode.bridge.pruning import MagnitudePruner
from torch_qode.bridge.sparsity import DISTRIBUTIONS, floor_counts, keep_counts, keep_dense_rule, name_rule
from torch_qode import QODE
from tests._models import ce_closure

SCHEMES = ("global", "uniform", "erk")


def _old_global_prune(params, sparsity):
    """Today's (pre-distribution) MagnitudePruner.prune, verbatim: the k smallest |w| over all tensors,
    ties towards the lower flat index."""
    n = sum(p.numel() for p in params)
    k = int(round(sparsity * n))
    mags = torch.cat([p.detach().reshape(-1).abs().to(torch.float64) for p in params])
    order = torch.sort(mags, stable=True).indices
    keep = torch.ones(mags.numel(), dtype=torch.bool)
    keep[order[:k]] = False
    masks = [c.view(p.shape) for c, p in zip(keep.split([p.numel() for p in params]), params)]
    with torch.no_grad():
        for p, m in zip(params, masks):
            p.masked_fill_(~m, 0)
    return masks


def test_registry_names_and_lookup():
    assert tuple(DISTRIBUTIONS) == SCHEMES
    with pytest.raises(ValueError, match="pruning must be one of"):
        MagnitudePruner([nn.Parameter(torch.ones(3, 3))], 0.5, distribution="random")
    with pytest.raises(ValueError, match="min_density"):
        MagnitudePruner([nn.Parameter(torch.ones(3, 3))], 0.5, min_density=1.0)


def test_floor_counts():
    assert floor_counts([1, 50, 100, 300, 1000], 0.01) == [1, 1, 1, 3, 10]
    assert floor_counts([1, 50], 0.0) == [0, 0]
    assert floor_counts([7], 0.5) == [4]


def test_erk_against_a_hand_computation():
    lin, conv = torch.randn(20, 10), torch.randn(4, 2, 3, 3)   # sums of dims 30 and 12; 200 and 72 entries
    # sparsity 0.8 of 272: prune round(217.6) = 218, keep 54 = eps·30 + eps·12 -> eps = 54/42:
    # 38.57 and 15.43 -> floors 38 + 15 = 53, the larger remainder (0.57) takes the last one
    assert keep_counts("erk", [lin, conv], 54) == [39, 15]
    # a tensor whose ERK density would exceed 1 is kept dense and the rest rescaled:
    big, small = torch.randn(100, 50), torch.randn(2, 2)        # 500 = eps·150 + eps·4 -> small 12.98 > 4
    assert keep_counts("erk", [big, small], 500) == [496, 4]
    # through the pruner: exact global count and these per-tensor densities
    params = [nn.Parameter(lin.clone()), nn.Parameter(conv.clone())]
    pr = MagnitudePruner(params, 0.8, distribution="erk")
    masks = pr.prune()
    assert [int(m.sum()) for m in masks] == [39, 15]
    d = {x.name: 1 - x.pruned / x.numel for x in pr.report().layers}
    assert d == pytest.approx({"param0": 39 / 200, "param1": 15 / 72})


def test_uniform_and_floor_by_hand():
    a, b = torch.randn(10, 10), torch.randn(5, 4)
    assert keep_counts("uniform", [a, b], 60) == [50, 10]
    # global empties the tensor of tiny magnitudes; a floor of 5 % keeps its 5 largest
    tiny = nn.Parameter(torch.linspace(1e-4, 1e-3, 100).reshape(10, 10))
    big = nn.Parameter(torch.linspace(1.0, 2.0, 100).reshape(10, 10))
    masks = MagnitudePruner([tiny, big], 0.5, min_density=0.05).prune()
    assert int(masks[0].sum()) == 5 and masks[0].reshape(-1)[-5:].all()   # its largest five
    assert int(masks[1].sum()) == 95 and not masks[1].reshape(-1)[:5].any()
    with pytest.raises(ValueError, match="min_density"):          # the floors alone exceed the budget
        MagnitudePruner([nn.Parameter(torch.ones(2, 2)) for _ in range(3)], 0.9)


@settings(max_examples=30, deadline=None)
@given(shapes=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 3)), min_size=1, max_size=5),
       sparsity=st.floats(0.05, 0.97), scheme=st.sampled_from(SCHEMES), min_density=st.sampled_from([0.0, 0.01, 0.2]),
       seed=st.integers(0, 2 ** 16), quantise=st.booleans())
def test_property_exact_count_floor_and_largest_kept(shapes, sparsity, scheme, min_density, seed, quantise):
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    if quantise:
        with torch.no_grad():
            for p in params:
                p.copy_(torch.round(p * 2) / 2)
    n = sum(p.numel() for p in params)
    k = round(sparsity * n)
    floors = floor_counts([p.numel() for p in params], min_density)
    if k >= n or (k and sum(floors) > n - k):
        with pytest.raises(ValueError):
            MagnitudePruner(params, sparsity, distribution=scheme, min_density=min_density)
        return
    before = [p.detach().clone() for p in params]
    pr = MagnitudePruner(params, sparsity, distribution=scheme, min_density=min_density)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        masks = pr.prune()
    assert sum(int((~m).sum()) for m in masks) == k                     # the global count, exactly
    for m, f, b in zip(masks, floors, before):
        assert int(m.sum()) >= f                                         # the floor holds
        if (~m).any() and m.any():                                       # each tensor keeps its largest |w|
            assert float(b[~m].abs().max()) <= float(b[m].abs().min())
    if min_density > 0:
        assert all(m.any() for m in masks)


def test_global_reproduces_the_old_prune_bit_for_bit_when_the_floor_does_not_bind():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 32),
                        nn.ReLU(), nn.Linear(32, 5))
    for sparsity in (0.5, 0.9):
        ref = [p.detach().clone().requires_grad_() for p in net.parameters() if p.dim() > 1]
        new = [nn.Parameter(p.detach().clone()) for p in ref]
        old_masks = _old_global_prune(ref, sparsity)
        floors = floor_counts([p.numel() for p in ref], 0.01)
        assert all(int(m.sum()) >= f for m, f in zip(old_masks, floors))   # the floor does not bind here
        masks = MagnitudePruner(new, sparsity).prune()                     # default: global, min_density 0.01
        assert all(torch.equal(a, b) for a, b in zip(masks, old_masks))
        assert all(torch.equal(a, b) for a, b in zip(new, ref))
        again = [nn.Parameter(p.detach().clone()) for p in net.parameters() if p.dim() > 1]
        floorless = MagnitudePruner(again, sparsity, min_density=0).prune()
        assert all(torch.equal(a, b) for a, b in zip(floorless, old_masks))


def test_global_without_floor_empties_a_tensor_and_warns_once_naming_it():
    zero_head = nn.Parameter(torch.zeros(3, 8))          # a zero-initialised head, as a ViT's
    body = nn.Parameter(torch.randn(8, 8))
    pr = MagnitudePruner([body, zero_head], 0.5, names=["body.weight", "head.weight"], min_density=0)
    with pytest.warns(UserWarning, match=r"head\.weight") as rec:
        masks = pr.prune()
    assert len([w for w in rec if issubclass(w.category, UserWarning)]) == 1
    assert not masks[1].any()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)      # the same tensor is not warned about again
        pr.prune()
        assert MagnitudePruner([body, zero_head], 0.5, names=["b", "h"]).prune()[1].any()   # the default floor
        assert MagnitudePruner([body, zero_head], 0.5, names=["b", "h"], distribution="erk",
                               min_density=0).prune()[1].any()


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(10, 8)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 8))
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embedding(x) + self.pos_embed[:, : x.shape[1]]
        h = torch.cat([self.cls_token.expand(len(x), 1, 8), h], 1)
        h = self.norm(h)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(torch.relu(self.fc(h[:, 0])))


PRUNED = {"attn.in_proj_weight", "attn.out_proj.weight", "fc.weight"}


def test_keep_dense_rule_on_a_tiny_model():
    model = _Tiny()
    rule = keep_dense_rule(model)
    got = {n for n, p in model.named_parameters() if rule(n, p)}
    assert got == PRUNED
    # from the names alone: the same, except that the output layer is not known
    assert {n for n, p in model.named_parameters() if name_rule(n, p)} == PRUNED | {"head.weight"}
    pr = MagnitudePruner(model, 0.9, distribution="erk", model=model)
    assert {n for n, f in zip(pr.names, pr.prunable) if f} == PRUNED
    pr.prune()
    assert all(m.all() for m, f in zip(pr.masks, pr.prunable) if not f)
    assert all(m.any() and not m.all() for m, f in zip(pr.masks, pr.prunable) if f)


def test_qode_with_model_keeps_dense_and_reports_densities():
    torch.manual_seed(0)
    model = _Tiny()
    names = [n for n, _ in model.named_parameters()]
    opt = QODE(model.parameters(), lr=0.05, model=model, names=names, mode="classical", cycle=4, classical_steps=1)
    assert opt.cfg.pruning == "erk" and opt.cfg.min_density == 0.01
    assert {n for n, f in zip(opt.pruner.names, opt.pruner.prunable) if f} == PRUNED
    x, y = torch.randint(0, 10, (4, 5)), torch.randint(0, 3, (4,))
    opt.step(ce_closure(model, opt, x, y))
    down = opt.reports[0].download
    assert set(down["density"]) == PRUNED and set(down["layers"]) == PRUNED
    assert all(0 < d < 1 for d in down["density"].values())
    assert down["density"]["fc.weight"] == pytest.approx(1 - down["layers"]["fc.weight"])
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    assert sum(down["layers"][n] * sizes[n] for n in PRUNED) == pytest.approx(opt.pruner.n_pruned_target())
    # without model=: today's dim() > 1 rule, global when asked
    old = QODE(_Tiny().parameters(), lr=0.05, pruning="global", min_density=0.0)
    assert sum(old.pruner.prunable) == 7 and old.pruner.distribution == "global"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_state_dict_round_trip(scheme):
    model = _Tiny()
    pr = MagnitudePruner(model, 0.8, distribution=scheme, min_density=0.05, model=model)
    pr.prune()
    buf = io.BytesIO()
    torch.save(pr.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other_model = _Tiny()
    other = MagnitudePruner(other_model, 0.3, model=other_model)
    other.load_state_dict(state)
    assert (other.distribution, other.min_density, other.sparsity) == (scheme, 0.05, 0.8)
    assert all(torch.equal(a, b) for a, b in zip(other.masks, pr.masks))
    assert torch.equal(other.support(), pr.support())
    legacy = {k: v for k, v in state.items() if k not in ("distribution", "min_density")}
    other.load_state_dict(legacy)              # a state saved before distributions: global, no floor
    assert (other.distribution, other.min_density) == ("global", 0.0)
    assert math.isclose(other.sparsity, 0.8)
