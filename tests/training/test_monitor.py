"""DissipationMonitor: standalone and attached to QODE; leaves the model as it found it."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_qode.training.monitor import DissipationMonitor, paper_schedule
from torch_qode.bridge.dissipation import DissipationCheck
from torch_qode.training.qode import QODE
from tests._models import ce_closure


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
                             check=DissipationCheck(criterion="proxy", steps=40),
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
                             check=DissipationCheck(criterion="proxy", steps=theta.numel()))
    rec = mon.step(0)
    assert rec["top_eigenvalue"] == pytest.approx(float(lam.max()), rel=1e-6)


def test_attached_to_qode_records_uploads_windows_and_plots(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X, y = probe(5)
    mon = DissipationMonitor(model, F.cross_entropy, (X, y), lr=0.2, window=4, schedule=[0, 6],
                             log_path=tmp_path / "m.jsonl")
    opt = QODE(model.parameters(), lr=0.2, mode="auto", cycle=6, classical_steps=2, sparsity=0.0, monitor=mon,
               track_sgd=True, dissipation=DissipationCheck(criterion="proxy"))    # the paper's Fig. 2c panel

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
    from torch_qode.bridge.taylor import TaylorExpansion

    model = bn_model(4)
    model.eval()
    X, y = probe(6)
    chk = DissipationCheck(criterion="proxy", steps=30, seed=3)
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
    with pytest.raises(ValueError, match="window must be an integer ≥ 0"):
        DissipationMonitor(model, F.cross_entropy, (X, y), lr=0.1, window=-1)
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got -0.5"):
        DissipationMonitor(model, F.cross_entropy, (X, y), lr=-0.5)
    with pytest.raises(ValueError, match=r"backend must be one of \('torch', 'pyhessian'\), got 'jax'"):
        DissipationMonitor(model, F.cross_entropy, (X, y), lr=0.1, backend="jax")
    with pytest.raises(TypeError, match="check"):
        DissipationMonitor(model, F.cross_entropy, (X, y), lr=0.1, check=0.4)


def test_metric_in_training_mode_leaves_buffers_grads_and_rng():
    """A metric run on a training-mode model (BatchNorm updates, RNG draws, grads cleared) is undone."""
    import copy

    model = bn_model(7)
    X, y = probe(8)
    F.cross_entropy(model(X), y).backward()
    model.train()
    Xt, yt = probe(9, n=20)
    expected = float((copy.deepcopy(model)(Xt).argmax(1) == yt).double().mean())   # the metric as written

    def metric(m):
        torch.rand(3)                                  # consumes the global RNG
        m.zero_grad(set_to_none=True)
        return float((m(Xt).argmax(1) == yt).double().mean())   # train mode: updates the BN buffers

    mon = DissipationMonitor(model, F.cross_entropy, (X, y), lr=0.1, window=3, schedule=[0],
                             check=DissipationCheck(criterion="proxy", steps=6), metric=metric)
    grads = [p.grad for p in model.parameters()]
    before = snapshot(model)
    rng = torch.get_rng_state()
    rec = mon.step(0)
    assert_same(before, snapshot(model))                                 # running stats, num_batches_tracked too
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))   # the very same .grad tensors
    assert torch.equal(rng, torch.get_rng_state())
    assert rec["test_acc"] == expected


def test_schedule_forms_and_refusals():
    import numpy as np

    model = bn_model()
    X, y = probe()
    mk = lambda **kw: DissipationMonitor(model, F.cross_entropy, (X, y), lr=0.1,
                                         check=DissipationCheck(criterion="proxy", steps=4), **kw)
    for sched in (np.array([1, 3]), torch.tensor([1, 3]), [np.int64(1), 3], range(1, 4, 2), (1, 3)):
        mon = mk(schedule=sched)
        assert [s for s in range(6) if mon.scheduled(s)] == [1, 3]
    assert mk(schedule=lambda s: s == 2).scheduled(np.int64(2))
    assert mk(schedule=[2]).scheduled(torch.tensor(2))
    for bad in (5, [1.7], np.array([1.0, 2.0]), [True], np.array([[1, 2]]), None):
        with pytest.raises(TypeError, match="schedule"):
            mk(schedule=bad)
    mon = mk(schedule=[1])
    for bad in (1.5, 1.0, "1", True):
        with pytest.raises(TypeError, match="step must be an integer"):
            mon.scheduled(bad)
        with pytest.raises(TypeError, match=r"step must be an integer \(a training step\), got"):
            mon.step(bad, force=True)
    assert mon.records == []


def test_numpy_scalars_for_lr_and_window():
    import numpy as np

    model = bn_model()
    model.eval()
    X, y = probe()
    kw = dict(schedule=[0], check=DissipationCheck(criterion="proxy", steps=6))
    a = DissipationMonitor(model, F.cross_entropy, (X, y), lr=np.float32(0.5), window=np.int64(5), **kw).step(0)
    b = DissipationMonitor(model, F.cross_entropy, (X, y), lr=float(np.float32(0.5)), window=5, **kw).step(0)
    assert len(a["proxy_curve"]) == 6 and a["proxy_curve"] == b["proxy_curve"]
    c = DissipationMonitor(model, F.cross_entropy, (X, y), lr=torch.tensor(0.5), window=torch.tensor(5), **kw)
    assert c.lr == 0.5 and c.window == 5 and type(c.window) is int
    for lr in (np.float32("nan"), np.bool_(True), np.array([0.5])):
        with pytest.raises(ValueError, match="lr"):
            DissipationMonitor(model, F.cross_entropy, (X, y), lr=lr)
    with pytest.raises(ValueError, match="window"):
        DissipationMonitor(model, F.cross_entropy, (X, y), lr=0.1, window=np.float64(5.0))


def test_jsonl_log_stays_in_step_with_records(tmp_path):
    from pathlib import Path

    model = bn_model()
    model.eval()
    X, y = probe()
    log = tmp_path / "m.jsonl"
    mon = DissipationMonitor(model, F.cross_entropy, (X, y), lr=0.1, schedule=[0],
                             check=DissipationCheck(criterion="proxy", steps=4), log_path=log)
    with pytest.raises(TypeError, match="JSON"):
        mon.record({"step": 1, "path": Path("x")})
    with pytest.raises(TypeError, match="JSON"):
        mon.step(0, note=object())
    assert mon.records == [] and (not log.exists() or log.read_text() == "")
    with pytest.raises(ValueError, match="'event'"):
        mon.step(0, event="bogus")
    with pytest.raises(ValueError, match="proxy_T"):
        mon.step(0, force=True, proxy_T=0.0)
    rec = mon.step(0, test_acc=0.5, download=True)     # no metric: test_acc may come from outside
    assert rec["event"] == "spectrum" and rec["test_acc"] == 0.5 and rec["download"] is True
    mon.record({"step": 2, "value": float("nan")})     # non-finite numbers become null, in both places
    lines = [json.loads(l) for l in log.read_text().splitlines()]
    assert lines == mon.records and lines[1]["value"] is None
    with_metric = DissipationMonitor(model, F.cross_entropy, (X, y), lr=0.1, schedule=[0],
                                     check=DissipationCheck(criterion="proxy", steps=4), metric=lambda m: 1.0)
    with pytest.raises(ValueError, match="test_acc"):
        with_metric.step(0, test_acc=0.5)
    with pytest.raises(ValueError, match="log_path"):
        DissipationMonitor(model, F.cross_entropy, (X, y), lr=0.1, log_path=tmp_path)
    with pytest.raises(TypeError, match="log_path"):
        DissipationMonitor(model, F.cross_entropy, (X, y), lr=0.1, log_path=5)


# ------------------------------------------------------------------------------------- figures
def _capture(monkeypatch, module):
    """Keep the figures ``module.save`` writes, to inspect what was drawn."""
    figs = []
    real = module.save
    monkeypatch.setattr(module, "save", lambda fig, path, **kw: (figs.append(fig), real(fig, path, **kw))[1])
    return figs


def test_panel_records_put_drift_where_its_proxy_and_accuracy_are(tmp_path):
    """A window reported during step k describes the state after it: drift, proxy(T) and an accuracy
    measured after step k are drawn at the same step k + 1."""
    model = bn_model()
    mon = DissipationMonitor(model, F.cross_entropy, probe(), lr=0.1, window=4, schedule=[])
    curve = [1.0, 0.5, 0.25, 0.125, 0.0625]
    mon.record({"step": 0, "event": "download", "download": True})
    mon.record({"step": 2, "event": "upload", "passed": True, "proxy_curve": curve, "proxy_T": curve[-1]})
    mon.record({"step": 5, "event": "window_end", "mode": "quantum", "drift": 0.3, "drift_lin": 0.1})
    mon.record({"step": 6, "event": "eval", "test_acc": 0.9})
    recs = mon.panel_records()
    drift = [r for r in recs if "drift" in r]
    assert [(r["step"], r["drift"], r["drift_lin"]) for r in drift] == [(6, 0.3, 0.1)]
    proxy = {r["step"]: r["error_proxy"] for r in recs if "error_proxy" in r}
    assert proxy[6] == curve[-1] and proxy[2] == 1.0 and proxy[0] == proxy[1] == 1.0
    assert [r["step"] for r in recs if r.get("download")] == [0]
    assert mon.plot(tmp_path / "f.png").is_file()


def test_panel_records_draw_the_predicted_curve_of_the_window_that_ran(tmp_path):
    """Criterion "predicted": no paper proxy line; the window's predicted error at the steps it ran (ending
    where its drift is drawn) and its prediction at T beside the measured linearisation drift."""
    model = bn_model()
    mon = DissipationMonitor(model, F.cross_entropy, probe(), lr=0.1, window=4, schedule=[])
    mon.record({"step": 2, "event": "upload", "passed": True, "proxy_curve": [1.0] * 5, "proxy_T": 1.0,
                "criterion": "predicted"})
    mon.record({"step": 5, "event": "window_end", "mode": "quantum", "drift": 0.3, "drift_lin": 0.1,
                "pred_lin": 0.12, "pred_curve": [0.0, 0.0, 0.05, 0.09, 0.12]})
    recs = mon.panel_records()
    assert not [r for r in recs if "error_proxy" in r]
    assert [(r["step"], r["pred_curve"]) for r in recs if "pred_curve" in r] == [(4, 0.05), (5, 0.09), (6, 0.12)]
    assert [(r["step"], r["pred_lin"], r["drift_lin"]) for r in recs if "drift" in r] == [(6, 0.12, 0.1)]
    assert mon.plot(tmp_path / "f.png").is_file()


def test_training_panels_proxy_note_and_bad_arguments(tmp_path, monkeypatch):
    import torch_qode.training.monitor as cb

    figs = _capture(monkeypatch, cb)
    cb.plot_training_panels([{"step": 0, "test_acc": 0.5}], tmp_path / "a.png", proxy_note="no check ran")
    texts = [t.get_text() for t in figs[-1].axes[2].texts]
    assert texts == ["no check ran"]                  # the note replaces "no data"
    cb.plot_training_panels([{"step": 0, "test_acc": 0.5}], tmp_path / "b.png")
    assert [t.get_text() for t in figs[-1].axes[2].texts] == ["no data"]
    for kwargs, exc in ((dict(every=0), ValueError), (dict(every=2.5), ValueError),
                        (dict(early_steps=-1), ValueError), (dict(proxy_note=3), TypeError)):
        with pytest.raises(exc):
            cb.plot_training_panels([{"step": 0}], tmp_path / "c.png", **kwargs)
    with pytest.raises(ValueError, match=r"records\[0\] needs an integer 'step'"):
        cb.plot_training_panels([{"test_acc": 0.5}], tmp_path / "c.png")
    with pytest.raises(TypeError, match=r"records\[0\] must be a dict"):
        cb.plot_training_panels([3], tmp_path / "c.png")


def test_save_returns_the_file_it_wrote_and_refuses_folders(tmp_path):
    from torch_qode._figure import new_figure, save

    fig, _ = new_figure()
    p = save(fig, tmp_path / "fig")                  # matplotlib adds .png: so does the returned path
    assert p == tmp_path / "fig.png" and p.is_file() and p.read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "fig").exists()
    assert save(fig, tmp_path / "f.pdf").read_bytes()[:4] == b"%PDF"
    with pytest.raises(IsADirectoryError, match="is a folder"):
        save(fig, tmp_path)


def test_plotting_edge_cases(tmp_path, monkeypatch):
    import numpy as np

    import torch_qode.plotting as pl

    figs = _capture(monkeypatch, pl)
    with pytest.raises(ValueError, match="at least one panel"):
        pl.plot_curves([], tmp_path / "a.png")
    with pytest.raises(ValueError, match="same shape"):
        pl.plot_curves([{"curves": [{"x": [0, 1], "y": [1.0]}]}], tmp_path / "a.png")
    pl.plot_curves([{"curves": [{"x": [0], "y": [0.5], "label": "T = 0"}]}], tmp_path / "one.png")
    (line,) = figs[-1].axes[0].lines
    assert line.get_marker() == "o"                  # a lone point is drawn as a marker
    pl.plot_curves([{"curves": [{"x": [0, 1], "y": [0.5, 0.25]}]}], tmp_path / "two.png")
    assert figs[-1].axes[0].lines[0].get_marker() in ("None", None, "")
    for grid, dens in (([], []), ([0.0, 1.0], [1.0]), ([[0.0]], [[1.0]])):
        with pytest.raises(ValueError, match="non-empty 1-D arrays of the same length"):
            pl.plot_density(grid, dens, tmp_path / "d.png", lr=0.1, cutoff=0.4)
    rows = [{"L": 1, "s_p": 2, "q_symbolic": 1, "q_numeric": 1},
            {"L": 2, "s_p": 2, "q_symbolic": 5, "q_numeric": [5, 4, 4]},
            {"L": 3, "s_p": 2, "q_symbolic": 13, "q_numeric": None}]
    p = pl.plot_ode_order(rows, tmp_path / "o.png")      # per-line values that disagree: drawn, not a crash
    assert p.is_file()
    crosses = [ln for ln in figs[-1].axes[0].lines if ln.get_label() == "lines disagree (per-line q)"]
    assert len(crosses) == 1 and sorted(np.asarray(crosses[0].get_ydata()).tolist()) == [4, 4, 5]


@pytest.mark.parametrize("hvp", ["retain", "recompute"])
def test_spectra_wait_for_the_end_of_a_window_that_holds_its_graph(hvp):
    """Scheduled inside a retained window (steps 3, 4), the spectrum is taken at the first step after it
    (6) and its record says so; a recompute window holds no graph, so its spectra are taken on time."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X, y = probe(5)
    mon = DissipationMonitor(model, F.cross_entropy, (X, y), lr=0.2, window=4, schedule=[0, 3, 4])
    opt = QODE(model.parameters(), lr=0.2, mode="quantum", cycle=6, classical_steps=2, sparsity=0.0, monitor=mon,
               explicit=False, model=model, hvp=hvp)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(X), y)
        loss.backward()
        return loss

    taken = []
    for k in range(8):
        if mon.step(k) is not None:
            taken.append(k)
        opt.step(closure)
    assert opt.reports[0].mode == "quantum" and opt.reports[0].carleman["hvp"] == hvp
    spectra = [r for r in mon.records if r["event"] == "spectrum"]
    if hvp == "retain":
        assert taken == [0, 6]
        assert spectra[1]["deferred_from"] == [3, 4] and "hvp='retain'" in spectra[1]["deferred_why"]
    else:
        assert taken == [0, 3, 4]
        assert all("deferred_from" not in r for r in spectra)


def test_an_aborted_window_releases_deferred_spectra():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X, y = probe(5)
    mon = DissipationMonitor(model, F.cross_entropy, (X, y), lr=0.2, window=4, schedule=[3])
    opt = QODE(model.parameters(), lr=0.2, mode="quantum", cycle=6, classical_steps=2, sparsity=0.0, monitor=mon,
               explicit=False, hvp="retain")
    taken = []
    for k in range(6):
        if mon.step(k) is not None:
            taken.append(k)
        bad = k == 4

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(X), y) * (float("nan") if bad else 1.0)
            loss.backward()
            return loss
        opt.step(closure)
    assert opt.reports[0].mode == "classical" and "aborted" in opt.reports[0].reason
    assert taken == [5]
    assert mon.records[-1]["deferred_from"] == [3]


def test_panel_c_draws_the_drift_parts_and_old_logs_without_them(tmp_path, monkeypatch):
    """A window end carries ``report.drift["parts"]`` as ``drift_<part>``; the panel records keep them at
    the window's end step and panel (c) draws one marker series per positive part; a log written before
    the parts existed (no ``drift_<part>`` keys) draws as before."""
    import torch_qode.training.monitor as cb

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X, y = probe(5)
    mon = DissipationMonitor(model, F.cross_entropy, (X, y), lr=0.2, window=4, schedule=[])
    opt = QODE(model.parameters(), lr=0.2, mode="quantum", cycle=6, classical_steps=2, sparsity=0.5, monitor=mon,
               track_sgd=True, shots=10**4)
    for k in range(6):
        opt.step(ce_closure(model, opt, X, y))
    parts = opt.reports[-1].drift["parts"]
    assert set(parts) == {"support", "linearization", "readout_pruning", "readout_noise"}
    assert parts["readout_pruning"] > 0 and parts["readout_noise"] > 0   # markers to draw
    ends = [r for r in mon.records if r["event"] == "window_end"]
    assert len(ends) == 1 and {k: ends[0]["drift_" + k] for k in parts} == parts
    drawn = [r for r in mon.panel_records() if "drift" in r]
    assert len(drawn) == 1 and drawn[0]["step"] == 6
    assert {k: drawn[0]["drift_" + k] for k in parts} == parts
    figs = _capture(monkeypatch, cb)
    assert mon.plot(tmp_path / "parts.png").is_file()
    lines = {ln.get_label(): ln for ln in figs[-1].axes[2].get_lines()}
    for k, v in parts.items():
        label = "part: " + k.replace("_", " ")
        assert (label in lines) == (v > 0)
        if v > 0:
            assert list(lines[label].get_xdata()) == [6] and list(lines[label].get_ydata()) == [v]
    old = [{k: v for k, v in r.items() if not k.startswith("drift_") or k == "drift_lin"} for r in mon.panel_records()]
    assert any("drift" in r for r in old)
    cb.plot_training_panels(old, tmp_path / "old.png")
    labels = [ln.get_label() for ln in figs[-1].axes[2].get_lines()]
    assert "drift vs SGD (total)" in labels and not any(lb.startswith("part:") for lb in labels)
