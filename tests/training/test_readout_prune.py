"""The readout's keep-r prune at a window's end (issue 20: no tensor emptied by default)."""
from types import SimpleNamespace

import torch
import torch.nn as nn

from torch_qode import QODE
from torch_qode.bridge.sparsity import floor_counts
from torch_qode.training.readout_prune import ReadoutKeep, top_r
from tests._models import ce_closure

SHAPES = [(6, 6), (3, 8)]          # two prunable tensors, then 5 non-prunable entries


def _vector():
    torch.manual_seed(0)
    big = torch.randn(36, dtype=torch.float64)
    tiny = 1e-6 * torch.randn(24, dtype=torch.float64)      # the global top-r never reaches it
    return torch.cat([big, tiny, torch.randn(5, dtype=torch.float64)])


FLAGS = torch.tensor([True] * 60 + [False] * 5)
KEEP = 6                                                    # 90% of the 60 prunable entries pruned


def test_global_top_r_empties_the_tiny_tensor_per_tensor_shares_do_not():
    win = SimpleNamespace(support=None, theta0=torch.zeros(65, dtype=torch.float64))
    v = _vector()
    r, dropped = top_r(v, win, ReadoutKeep(FLAGS, KEEP))
    assert int((v[36:60] != 0).sum()) == 0 and int((v[:60] != 0).sum()) == KEEP and r == KEEP + 5
    assert torch.equal(v[60:], _vector()[60:])               # non-prunable entries are read as they are
    v = _vector()
    r, dropped = top_r(v, win, ReadoutKeep(FLAGS, KEEP, SHAPES, "erk", 0.01))
    kept = [int((v[:36] != 0).sum()), int((v[36:60] != 0).sum())]
    assert sum(kept) == KEEP and r == KEEP + 5
    assert all(k >= f for k, f in zip(kept, floor_counts([36, 24], 0.01))) and kept[1] >= 1
    # within each tensor the largest entries are the ones kept
    for lo, hi, k in ((0, 36, kept[0]), (36, 60, kept[1])):
        ref = _vector()[lo:hi]
        top = torch.sort(ref.abs(), descending=True, stable=True).indices[:k]
        assert torch.equal(torch.sort(torch.nonzero(v[lo:hi]).reshape(-1)).values, torch.sort(top).values)
    assert int((dropped != 0).sum()) == 60 - KEEP


def test_per_tensor_shares_on_a_support_leave_the_weights_outside_it_alone():
    theta0 = _vector()
    S = torch.arange(0, 50)                                  # the last 10 prunable entries and the rest outside S
    win = SimpleNamespace(support=S, theta0=theta0)
    v = theta0[S].clone()
    top_r(v, win, ReadoutKeep(FLAGS, KEEP, SHAPES, "erk", 0.01))
    full = theta0.clone()
    full[S] = v
    assert torch.equal(full[50:], theta0[50:])               # outside S: θ0, whatever the ranking says


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        m[0].weight.mul_(1e-4)          # a layer the global readout would empty: tiny, and (tiny inputs)
    return m                            # hardly moved by the window


def _run(**kw):
    model = _model()
    opt = QODE(model.parameters(), lr=0.05, mode="quantum", cycle=6, classical_steps=2, sparsity=0.9,
               shots=None, model=model, **kw)
    torch.manual_seed(1)
    x, y = 1e-3 * torch.randn(32, 6), torch.randint(0, 3, (32,))
    for step in range(6):
        opt.step(ce_closure(model, opt, x, y))
        if step == 5:
            assert opt.reports[0].mode == "quantum", opt.reports[0].reason
    return [int((p != 0).sum()) for p, f in zip(model.parameters(), opt.pruner.prunable) if f]


def test_a_window_end_keeps_every_prunable_tensor_by_default():
    kept = _run()
    assert all(k >= 1 for k in kept), kept


def test_with_the_papers_global_readout_the_same_window_empties_the_tiny_layer(monkeypatch):
    """The test above can fail: the same run with a global top-r at the window's end (the download unchanged)
    empties the tiny layer."""
    import torch_qode.training.window as w

    own = w.readout_keep
    monkeypatch.setattr(w, "readout_keep", lambda params, pruner: ReadoutKeep(own(params, pruner).flags,
                                                                               own(params, pruner).keep))
    kept = _run()
    assert kept[0] == 0, kept
