"""The classical twin as a training run: one cycle equals masked gradient descent on S then the readout's
keep-r prune, computed by hand, bit for bit."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_qode.training.qode import QODE
from torch_qode.training.twin import Twin
from tests._models import ce_closure

CYCLE, CLASSICAL, LR, WD, MOM, SPARSITY = 6, 2, 0.3, 0.01, 0.9, 0.5


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def batches(n):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g))
            for _ in range(n)]


closure_for = ce_closure


def kwargs(upload):
    return dict(lr=LR, momentum=MOM, weight_decay=WD, cycle=CYCLE, classical_steps=CLASSICAL, sparsity=SPARSITY,
                upload=upload, keep_dense=False, pruning="global", min_density=0.0)   # the readout: global top-r


def reference(model, data, upload):
    """One cycle by hand: QODE's classical steps (the download, SGD with momentum), then T steps of
    gradient descent on S, θ_S ← θ_S + (−η)(g_S + wd·θ_S) (SGD's arithmetic, no momentum), then (dense
    upload) the r largest prunable weights kept."""
    opt = QODE(model.parameters(), mode="classical", **kwargs(upload))
    params = list(model.parameters())
    for x, y in data[:CLASSICAL]:
        opt.step(closure_for(model, opt, x, y))
    prunable = opt.pruner.prunable
    with torch.no_grad():
        if upload == "sparse":                   # the upload prunes; S: the non-zeros of the prunable tensors
            opt.pruner.prune()
            masks = [(p != 0) if f else torch.ones_like(p, dtype=torch.bool) for p, f in zip(params, prunable)]
        else:
            masks = [torch.ones_like(p, dtype=torch.bool) for p in params]
    for x, y in data[CLASSICAL:CYCLE]:
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        with torch.no_grad():
            for p, g, m in zip(params, grads, masks):
                d = (g * m).add(p, alpha=WD)
                p.add_(d, alpha=-LR)
    if upload == "dense":
        with torch.no_grad():
            vals = torch.cat([p.reshape(-1) for p, f in zip(params, prunable) if f])
            n = vals.numel()
            keep = n - round(SPARSITY * n)
            order = torch.sort(vals.abs(), descending=True, stable=True).indices
            vals[order[keep:]] = 0
            i = 0
            for p, f in zip(params, prunable):
                if f:
                    p.copy_(vals[i:i + p.numel()].view_as(p))
                    i += p.numel()
    return masks


@pytest.mark.parametrize("upload", ["dense", "sparse"])
def test_one_cycle_is_masked_gradient_descent_on_S_then_the_readout_prune(upload):
    data = batches(CYCLE + 1)
    twin_model, ref_model, sgd_model = mlp(), mlp(), mlp()
    twin = Twin(twin_model.parameters(), **kwargs(upload))
    for x, y in data[:CYCLE]:
        twin.step(closure_for(twin_model, twin, x, y))
    masks = reference(ref_model, data, upload)
    for p, q in zip(twin_model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
    assert not any("momentum_buffer" in s for s in twin.opt.state.values())   # momentum restarts
    if upload == "sparse":
        assert not all(bool(m.all()) for m in masks)       # S is a strict subset: the mask mattered
    sgd = QODE(sgd_model.parameters(), mode="classical", **kwargs(upload))
    for x, y in data[:CYCLE]:
        sgd.step(closure_for(sgd_model, sgd, x, y))
    assert not all(torch.equal(p, q) for p, q in zip(twin_model.parameters(), sgd_model.parameters()))
    # the next cycle starts with QODE's download and classical steps, momentum from zero
    twin.step(closure_for(twin_model, twin, *data[CYCLE]))
    assert twin.opt.step_count == CYCLE + 1


def test_dense_twin_prunes_to_r_at_the_window_end():
    data, model = batches(CYCLE), mlp()
    twin = Twin(model.parameters(), **kwargs("dense"))
    for x, y in data:
        twin.step(closure_for(model, twin, x, y))
    weights = [p for p, f in zip(model.parameters(), twin.opt.pruner.prunable) if f]
    n = sum(p.numel() for p in weights)
    assert sum(int((p != 0).sum()) for p in weights) == n - round(SPARSITY * n)


def test_a_twin_follows_the_window_length_qode_chose():
    """``length=`` (QODE's T, ``window="auto"``): the twin's window ends after T steps with the readout's prune,
    and the rest of the cycle is classical SGD with momentum; the full T is the twin without the hook."""
    data = batches(CYCLE)
    runs = {}
    for name, length in (("plain", None), ("full", lambda: CYCLE - CLASSICAL), ("short", lambda: 2)):
        model = mlp()
        twin = Twin(model.parameters(), length=length, **kwargs("dense"))
        for x, y in data[:CLASSICAL + 2]:
            twin.step(closure_for(model, twin, x, y))
        runs[name] = (twin, model, [p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(runs["plain"][2], runs["full"][2]))
    twin, model, after_window = runs["short"]
    assert twin.window_length() == 2 and not twin._gd                  # closed: the readout's prune ran
    weights = [p for p, f in zip(after_window, twin.opt.pruner.prunable) if f]
    n = sum(p.numel() for p in weights)
    assert sum(int((p != 0).sum()) for p in weights) == n - round(SPARSITY * n)
    ref_model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    with torch.no_grad():
        for p, v in zip(ref_model.parameters(), after_window):
            p.copy_(v)
    sgd = torch.optim.SGD(ref_model.parameters(), lr=LR, momentum=MOM, weight_decay=WD)
    x, y = data[CLASSICAL + 2]
    twin.step(closure_for(model, twin, x, y))
    sgd.step(closure_for(ref_model, sgd, x, y))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref_model.parameters()))   # SGD, momentum anew
