"""DissipationMonitor: standalone and attached to QODE; leaves the model as it found it."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_qode.callbacks import DissipationMonitor, paper_schedule
from torch_qode.dissipation import DissipationCheck
from torch_qode.optim import QODE


def bn_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()


def probe(seed=1, n=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def snapshot(model):
    return ([p.detach().clone() for p in model.parameters()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            [m.training for m in model.modules()],
            [b.clone() for b in model.buffers()])


def assert_same(a, b):
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    for x, y in zip(a[1], b[1]):
        assert (x is None and y is None) or torch.equal(x, y)
    assert a[2] == b[2]
    for x, y in zip(a[3], b[3]):
        assert torch.equal(x, y)


def test_paper_schedule():
    assert [s for s in range(0, 450) if paper_schedule(s)] == list(range(0, 200, 10)) + [200, 300, 400]


def test_standalone_monitor_leaves_model_untouched_and_logs_json(tmp_path):
    model = bn_model()
    X, y = probe()
    F.cross_entropy(model(X), y).backward()          # pre-existing grads must survive
    model.train()
    model[1].eval()                                  # a mixed-mode model must keep its modes
    before = snapshot(model)
    log = tmp_path / "monitor.jsonl"
    acc_calls = []

    def metric(m):
        m.eval()                                     # a metric that flips modes is undone
        acc_calls.append(1)
        return float((m(X).argmax(1) == y).double().mean())

    mon = DissipationMonitor(model, F.cross_entropy, (X, y), lr=0.5, window=20, schedule=[0, 3],
                             check=DissipationCheck(steps=40),
                             metric=metric, log_path=log)
    for s in range(5):
        mon.step(s)
    assert_same(before, snapshot(model))
    assert [r["step"] for r in mon.records] == [0, 3] and len(acc_calls) == 2
    lines = [json.loads(l) for l in log.read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["event"] == "spectrum"
    assert len(lines[0]["spectrum"]["grid"]) == 256 and len(lines[0]["proxy_curve"]) == 21
    assert 0 <= lines[0]["positive_fraction"] <= 1 and lines[0]["proxy_curve"][0] == pytest.approx(1.0)


def test_top_eigenvalue_matches_exact_hessian():
    model = bn_model(3)
    model.eval()
    X, y = probe(2)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(th):
        parts = dict(zip(names, (c.view(s) for c, s in zip(th.split(sizes), shapes))))
        return F.cross_entropy(torch.func.functional_call(model, parts, (X,)), y)

    lam = torch.linalg.eigvalsh(torch.autograd.functional.hessian(f, theta))
    mon = DissipationMonitor(model, F.cross_entropy, (X, y), lr=0.1, schedule=[0],
                             check=DissipationCheck(steps=theta.numel()))
    rec = mon.step(0)
    assert rec["top_eigenvalue"] == pytest.approx(float(lam.max()), rel=1e-6)


def test_attached_to_qode_records_uploads_windows_and_plots(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X, y = probe(5)
    mon = DissipationMonitor(model, F.cross_entropy, (X, y), lr=0.2, window=4, schedule=[0, 6],
                             log_path=tmp_path / "m.jsonl")
    opt = QODE(model.parameters(), lr=0.2, mode="auto", cycle=6, classical_steps=2, sparsity=0.0, monitor=mon,
               track_sgd=True)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(X), y)
        loss.backward()
        return loss

    for k in range(12):
        mon.step(k)
        opt.step(closure)
    events = [r["event"] for r in mon.records]
    assert events.count("upload") == 2 and events.count("spectrum") == 2
    assert events.count("window_end") == sum(r.mode == "quantum" for r in opt.reports)
    up = [r for r in mon.records if r["event"] == "upload"][0]
    assert up["step"] == 2 and len(up["proxy_curve"]) == 5
    assert up["proxy_curve"] == pytest.approx(opt.reports[0].dissipation["proxy"])
    proxy = {r["step"]: r["error_proxy"] for r in mon.panel_records() if "error_proxy" in r}
    assert proxy[0] == proxy[1] == 1.0                       # classical steps: no linearisation error
    window = [proxy[k] for k in range(2, 7)]
    assert window == (up["proxy_curve"] if up["passed"] else [1.0] * 5)
    png = mon.plot(tmp_path / "fig2.png")
    assert png.exists() and png.stat().st_size > 1000
    for line in (tmp_path / "m.jsonl").read_text().splitlines():
        json.loads(line)


def test_monitor_numbers_are_the_checks_numbers():
    """The probe spectrum's proxy and positive fraction equal what DissipationCheck computes on it."""
    from torch_qode.taylor import TaylorExpansion

    model = bn_model(4)
    model.eval()
    X, y = probe(6)
    chk = DissipationCheck(steps=30, seed=3)
    mon = DissipationMonitor(model, F.cross_entropy, (X, y), lr=0.3, window=12, schedule=[0], check=chk)
    rec = mon.step(0)
    exp = TaylorExpansion.from_model(model, F.cross_entropy, (X, y), lr=0.3, degree=1)
    v = chk(exp.hvp, exp.n, lr=0.3, T=12)
    exp.release()
    assert rec["proxy_curve"] == pytest.approx(v.proxy.tolist(), rel=1e-6)
    assert rec["positive_fraction"] == pytest.approx(v.positive_fraction, rel=1e-6)


def test_bad_arguments():
    model = bn_model()
    X, y = probe()
    with pytest.raises(ValueError, match="lr"):
        DissipationMonitor(model, F.cross_entropy, (X, y), lr=0)
    with pytest.raises(ValueError, match="schedule"):
        DissipationMonitor(model, F.cross_entropy, (X, y), lr=0.1, schedule="sometimes")
    with pytest.raises(TypeError, match="probe_batch"):
        DissipationMonitor(model, F.cross_entropy, X, lr=0.1)
    with pytest.raises(ValueError, match="backend"):
        DissipationMonitor(model, F.cross_entropy, (X, y), lr=0.1, backend="jax")
    with pytest.raises(TypeError, match="model"):
        DissipationMonitor(lambda x: x, F.cross_entropy, (X, y), lr=0.1)
    with pytest.raises(ValueError, match="window"):
        DissipationMonitor(model, F.cross_entropy, (X, y), lr=0.1, window=-1)
    with pytest.raises(TypeError, match="check"):
        DissipationMonitor(model, F.cross_entropy, (X, y), lr=0.1, check=0.4)
