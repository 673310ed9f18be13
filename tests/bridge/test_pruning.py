"""torch_qode.bridge.pruning: exact global magnitude pruning, ties, supports, reports, state round trip."""
from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from torch_qode.bridge.pruning import MagnitudePruner, SparsityReport


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4))


def test_exact_global_ratio_and_smallest_magnitudes():
    net = _net()
    before = [p.detach().clone() for p in net.parameters()]
    pr = MagnitudePruner(net, 0.6)
    names = [n for n, _ in net.named_parameters()]
    assert pr.names == names
    assert pr.prunable == [p.dim() > 1 for p in net.parameters()]  # conv + linear weights only
    n_prunable = 27 + 48
    assert pr.n_prunable == n_prunable
    masks = pr.prune()
    k = round(0.6 * n_prunable)
    pruned = sum(int((~m).sum()) for m in masks)
    assert pruned == k
    # the pruned entries are exactly the k smallest magnitudes over all prunable tensors (global, not per layer)
    mags = torch.cat([b.abs().reshape(-1) for b, f in zip(before, pr.prunable) if f])
    kept = torch.cat([m.reshape(-1) for m, f in zip(masks, pr.prunable) if f])
    assert mags[~kept].max() <= mags[kept].min()
    # zeroed in place, kept entries untouched, non-prunable untouched and all-True masks
    for p, b, m, f in zip(net.parameters(), before, masks, pr.prunable):
        assert torch.equal(p.detach()[~m], torch.zeros(int((~m).sum())))
        assert torch.equal(p.detach()[m], b[m])
        if not f:
            assert bool(m.all())
    assert all(isinstance(p, nn.Parameter) for p in net.parameters())
    assert not hasattr(net[0], "weight_orig")
    rep = pr.report()
    assert isinstance(rep, SparsityReport)
    assert rep.mask_sparsity == pytest.approx(k / n_prunable)
    assert rep.global_sparsity == pytest.approx(k / n_prunable)
    assert rep.n_total == sum(p.numel() for p in net.parameters())
    d = rep.as_dict()
    assert d["layers"][0]["name"] == "0.weight" and "sparsity" in d["layers"][0]


def test_rounding_is_python_round():
    p = nn.Parameter(torch.arange(1.0, 11.0).reshape(2, 5))
    assert MagnitudePruner([p], 0.25).n_pruned_target() == 2   # round(2.5) = 2 (half to even)
    assert MagnitudePruner([p], 0.35).n_pruned_target() == 4   # round(3.5) = 4
    assert MagnitudePruner([p], 0.04).n_pruned_target() == 0
    assert MagnitudePruner([p], 0.0).prune()[0].all()


def test_ties_lower_flat_index_pruned_first_and_deterministic():
    a = nn.Parameter(torch.ones(2, 3))
    b = nn.Parameter(-torch.ones(3, 2))  # same magnitude, later in the flat order
    with pytest.warns(UserWarning, match="param0"):   # no floor: the tie rule empties a
        masks = MagnitudePruner([a, b], 0.5, min_density=0).prune()
    assert torch.equal(masks[0], torch.zeros(2, 3, dtype=torch.bool))
    assert torch.equal(masks[1], torch.ones(3, 2, dtype=torch.bool))
    masks = MagnitudePruner([a, b], 0.5).prune()      # the default floor keeps a's last entry
    assert masks[0].tolist() == [[False, False, False], [False, False, True]]
    assert masks[1].tolist() == [[False, True], [True, True], [True, True]]
    c = nn.Parameter(torch.tensor([[2.0, 1.0, 1.0, 3.0]]))
    assert MagnitudePruner([c], 0.5).prune()[0].tolist() == [[True, False, False, True]]
    d = nn.Parameter(torch.tensor([[1.0, 1.0, 1.0, 1.0]]))
    assert MagnitudePruner([d], 0.5).prune()[0].tolist() == [[False, False, True, True]]


def test_prunable_list_and_callable():
    net = _net()
    names = [n for n, _ in net.named_parameters()]
    pr = MagnitudePruner(list(net.parameters()), 0.5, names=names, prunable=lambda n, p: n.startswith("4."))
    assert pr.prunable == [False, False, False, False, True, True]
    masks = pr.prune()
    assert all(bool(m.all()) for m in masks[:4])
    assert int((~masks[4]).sum()) + int((~masks[5]).sum()) == round(0.5 * (48 + 4))
    pr2 = MagnitudePruner(list(net.parameters()), 0.5, prunable=[True] * 6)
    assert pr2.n_prunable == sum(p.numel() for p in net.parameters())


def test_support_masks_regrowth_and_apply():
    net = _net()
    params = list(net.parameters())
    pr = MagnitudePruner(params, 0.5)
    assert torch.equal(pr.support(), torch.arange(sum(p.numel() for p in params)))  # before prune: all
    masks = pr.prune()
    S = pr.support()
    flat_mask = torch.cat([m.reshape(-1) for m in masks])
    assert torch.equal(S, torch.nonzero(flat_mask).reshape(-1))
    assert S.dtype == torch.int64 and bool((S[1:] > S[:-1]).all())
    # a plain SGD step regrows pruned weights (they are ordinary parameters)
    x = torch.randn(8, 1, 4, 4)
    nn.functional.cross_entropy(net(x), torch.arange(8) % 4).backward()
    with torch.no_grad():
        for p in params:
            p -= 0.1 * p.grad
    assert any(bool((p.detach()[~m] != 0).any()) for p, m in zip(params, masks))
    S_now = pr.support(nonzero_only=True)
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    prunable_flat = torch.cat([torch.full((p.numel(),), f) for p, f in zip(params, pr.prunable)])
    expect = torch.nonzero((flat != 0) | ~prunable_flat).reshape(-1)
    assert torch.equal(S_now, expect) and S_now.numel() > S.numel()
    with torch.no_grad():
        params[2].zero_()  # a zeroed non-prunable tensor (BatchNorm scale, flat 30..32) stays in the support ...
    assert bool(torch.isin(torch.arange(30, 33), pr.support(nonzero_only=True)).all())
    # ... unless only the non-zero entries of every tensor are asked for
    assert not bool(torch.isin(torch.arange(30, 33), pr.support(nonzero_only=True, include_nonprunable=False)).any())
    pr.apply_masks()  # undo the regrowth
    assert torch.equal(pr.support(nonzero_only=True), pr.support())
    assert pr.report().global_sparsity == pytest.approx(pr.report().mask_sparsity)


def test_errors_are_clear():
    net = _net()
    params = list(net.parameters())
    for s in (-0.1, 1.0, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
            MagnitudePruner(params, s)
    with pytest.raises(TypeError, match="sparsity"):
        MagnitudePruner(params, True)
    with pytest.raises(TypeError, match="sparsity"):
        MagnitudePruner(params, "0.5")
    with pytest.raises(ValueError, match="empty"):
        MagnitudePruner([], 0.5)
    biases = [nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="no prunable tensors"):
        MagnitudePruner(biases, 0.5)
    MagnitudePruner(biases, 0.0).prune()  # nothing to prune, nothing asked: fine
    tiny = nn.Parameter(torch.ones(1, 3))
    with pytest.raises(ValueError, match="prunes all 3"):
        MagnitudePruner([tiny], 0.9)  # round(2.7) = 3: everything would go
    with pytest.raises(ValueError, match="names"):
        MagnitudePruner(params, 0.5, names=["a"])
    with pytest.raises(ValueError, match="prunable"):
        MagnitudePruner(params, 0.5, prunable=[True])
    with pytest.raises(TypeError, match="torch tensor"):
        MagnitudePruner([1.0], 0.5)
    bad = nn.Parameter(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="NaN"):
        MagnitudePruner([bad], 0.5).prune()
    pr = MagnitudePruner(params, 0.5)
    with pytest.raises(ValueError, match="sparsity"):
        pr.prune(sparsity=2.0)
    z = nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="support is empty"):
        MagnitudePruner([z], 0.0).support(nonzero_only=True)


def test_state_dict_round_trip():
    net = _net()
    pr = MagnitudePruner(net, 0.7)
    pr.prune()
    buf = io.BytesIO()
    torch.save(pr.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = MagnitudePruner(_net(seed=1), 0.1)
    other.load_state_dict(state)
    assert other.sparsity == 0.7
    assert all(torch.equal(a, b) for a, b in zip(other.masks, pr.masks))
    assert torch.equal(other.support(), pr.support())
    wrong = MagnitudePruner(list(_net().parameters()), 0.5)  # different names
    with pytest.raises(ValueError, match="names"):
        wrong.load_state_dict(state)
    with pytest.raises(ValueError, match="state must be a dict"):
        other.load_state_dict({"masks": []})
    bad = dict(state, masks=[m[..., :1] for m in state["masks"]])
    with pytest.raises(ValueError, match="masks"):
        other.load_state_dict(bad)


@settings(max_examples=40, deadline=None)
@given(shapes=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=4),
       sparsity=st.floats(0.0, 0.95), seed=st.integers(0, 2 ** 16), quantise=st.booleans())
def test_property_exact_count_and_order(shapes, sparsity, seed, quantise):
    """Any shapes/sparsity (ties included): exactly round(s·n) zeroed, all pruned magnitudes ≤ all kept ones,
    ties resolved towards the lower flat index, and pruning twice is idempotent."""
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    if quantise:  # many exact ties
        with torch.no_grad():
            for p in params:
                p.copy_(torch.round(p * 2) / 2)
    n = sum(p.numel() for p in params)
    k = round(sparsity * n)
    if k >= n:
        with pytest.raises(ValueError):
            MagnitudePruner(params, sparsity, min_density=0)
        return
    mags = torch.cat([p.detach().abs().reshape(-1) for p in params]).tolist()
    expected = set(sorted(range(n), key=lambda i: (mags[i], i))[:k])  # independent reference ordering
    pr = MagnitudePruner(params, sparsity, min_density=0)   # no floor: may empty a tensor (and warn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        masks = pr.prune()
    keep = torch.cat([m.reshape(-1) for m in masks])
    assert set(torch.nonzero(~keep).reshape(-1).tolist()) == expected
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    assert bool((flat[~keep] == 0).all())
    assert pr.report().mask_sparsity == pytest.approx(k / n)
    again = pr.prune()  # pruning twice prunes the same number again (the zeros are now the smallest)
    assert int(sum(int((~m).sum()) for m in again)) == k


def test_duplicate_tensors_refused_and_numpy_numbers_accepted():
    import numpy as np

    net = _net()
    params = list(net.parameters())
    w = params[0]
    with pytest.raises(ValueError, match=r"params\[2\] is the same tensor as params\[0\]"):
        MagnitudePruner([w, params[1], w], 0.5)
    with pytest.raises(ValueError, match="same tensor"):
        MagnitudePruner([params[-1], params[-1]], 0.5)
    tied = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    tied[1].weight = tied[0].weight
    assert MagnitudePruner(tied, 0.5).n_prunable == 16          # a module lists a tied weight once
    ref = MagnitudePruner(params, 0.5)
    for s in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5), np.array(0.5)):
        pr = MagnitudePruner(params, s)
        assert pr.sparsity == 0.5 and type(pr.sparsity) is float
        assert pr.n_pruned_target() == ref.n_pruned_target()
    flags = MagnitudePruner(params, 0.5, prunable=np.array([True, False, False, False, True, False])).prunable
    assert flags == [True, False, False, False, True, False]
    with pytest.raises(TypeError, match="sparsity"):
        MagnitudePruner(params, np.bool_(True))
