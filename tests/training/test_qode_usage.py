"""QODE under the patterns users bring from torch.optim: frozen layers, odd closures, copies, dropout,
gradients left in ``.grad`` by the training loop, extra parameter groups, mixed dtypes."""
import copy
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn

import torch_qode.training.finish as optim_mod   # the window's read_out stage calls tomography
from torch_qode.training.qode import QODE

from tests.training.test_qode import _untimed, batches, closure_for, flat, run, tiny_mlp

WINDOW = dict(lr=0.05, mode="quantum", cycle=5, classical_steps=1, sparsity=0.0)


def sgd_reference(make, data, loss_of, **kw):
    model = make()
    opt = torch.optim.SGD(model.parameters(), **kw)
    for X, Y in data:
        def closure():
            opt.zero_grad()
            out = loss_of(model, X, Y)
            (out if out.dim() == 0 else out.mean()).backward()
            return out
        opt.step(closure)
    return flat(model)


# ------------------------------------------------------------------------------ parameters
def test_frozen_parameters_are_refused_with_the_fix():
    model = tiny_mlp(1)
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"params\[0\].*requires_grad"):
        QODE(model.parameters(), **WINDOW)
    opt = QODE([p for p in model.parameters() if p.requires_grad], **WINDOW)   # the suggested idiom
    run(model, opt, batches(5))
    assert opt.reports[0].mode == "quantum"


def test_freezing_after_construction_is_refused_at_the_upload():
    model = tiny_mlp(1)
    opt = QODE(model.parameters(), **WINDOW)
    model[2].bias.requires_grad_(False)
    (X, Y), (X1, Y1) = batches(2)
    opt.step(closure_for(model, opt, X, Y))              # a classical step: SGD skips the frozen bias
    with pytest.raises(ValueError, match=r"params\[3\].*requires_grad"):
        opt.step(closure_for(model, opt, X1, Y1))       # the upload


def test_a_parameter_group_added_after_construction_is_refused():
    model = tiny_mlp(1)
    opt = QODE(list(model.parameters())[:2], **WINDOW)
    with pytest.raises(ValueError, match="add_param_group after construction"):
        opt.add_param_group({"params": list(model.parameters())[2:]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("group,name", [({"lr": -0.5}, "lr"), ({"maximize": True}, "maximize"),
                                        ({"momentum": float("inf")}, "momentum")])
def test_group_level_settings_are_checked(group, name):
    with pytest.raises(ValueError, match=name):
        QODE([{"params": tiny_mlp().parameters(), **group}])


def test_sparse_gradients_train_classically_and_are_refused_by_a_window():
    torch.manual_seed(0)
    emb, idx, target = nn.Embedding(10, 3, sparse=True).double(), torch.tensor([1, 4, 4, 7]), torch.ones(4, 3)

    def step(opt):
        def closure():
            opt.zero_grad()
            loss = ((emb(idx) - target) ** 2).mean()
            loss.backward()
            return loss
        return opt.step(closure)

    ref = copy.deepcopy(emb)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt = QODE(emb.parameters(), lr=0.1, mode="classical", sparsity=0.0)
    for _ in range(3):
        step(opt)
        sgd.zero_grad()
        ((ref(idx) - target) ** 2).mean().backward()
        sgd.step()
    assert torch.equal(emb.weight, ref.weight)
    opt = QODE(emb.parameters(), lr=0.1, mode="quantum", cycle=3, classical_steps=0, sparsity=0.0)
    with pytest.raises(RuntimeError, match="sparse gradient"):
        step(opt)


def test_mixed_dtype_model_with_track_sgd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2).double())

    def loss_of(m, X, Y):
        return ((m[2](m[1](m[0](X.float())).double()) - Y) ** 2).mean()

    opt = QODE(model.parameters(), track_sgd=True, **WINDOW)
    for X, Y in batches(5):
        def closure():
            opt.zero_grad()
            loss = loss_of(model, X, Y)
            loss.backward()
            return loss
        opt.step(closure)
    assert opt.reports[0].mode == "quantum" and opt.reports[0].drift["l2"] >= 0
    assert model[0].weight.dtype == torch.float32 and model[2].weight.dtype == torch.float64


# -------------------------------------------------------------------------------- closures
def _returns(kind):
    def loss_of(model, X, Y):
        per_sample = ((model(X) - Y) ** 2).mean(1)
        return per_sample
    return {"vector": lambda l: l, "tuple": lambda l: (l.mean(), "logits"), "float": lambda l: float(l.mean().detach()),
            "none": lambda l: None, "numpy": lambda l: np.float32(l.mean().item())}[kind], loss_of


@pytest.mark.parametrize("kind", ["vector", "tuple", "float", "none", "numpy"])
def test_closure_may_return_anything_sgd_accepts(kind):
    ret, per_sample = _returns(kind)
    data = batches(10)

    def train(opt_kw):
        model = tiny_mlp(2)
        opt = QODE(model.parameters(), **opt_kw)
        for X, Y in data:
            def closure():
                opt.zero_grad()
                loss = per_sample(model, X, Y)
                loss.mean().backward()
                return ret(loss)
            opt.step(closure)
        return model, opt

    model, opt = train(dict(lr=0.05, momentum=0.9, mode="classical", sparsity=0.0, cycle=5, classical_steps=1))
    assert torch.equal(flat(model), sgd_reference(lambda: tiny_mlp(2), data, per_sample, lr=0.05, momentum=0.9))
    assert opt.step_count == 10
    model, opt = train(dict(track_sgd=True, **WINDOW))
    assert [r.mode for r in opt.reports] == ["quantum", "quantum"]
    rep = opt.reports[0]
    scalar = kind in ("float", "numpy")
    assert (rep.loss_first is not None) is scalar and (rep.drift["loss_qode"] is not None) is scalar


def test_closure_using_torch_autograd_backward():
    data = batches(5)
    out = []
    for use_function in (False, True):
        model = tiny_mlp(3)
        opt = QODE(model.parameters(), **WINDOW)
        for X, Y in data:
            def closure():
                opt.zero_grad()
                loss = ((model(X) - Y) ** 2).mean()
                torch.autograd.backward(loss) if use_function else loss.backward()
                return loss
            opt.step(closure)
        assert opt.reports[0].mode == "quantum"
        out.append(flat(model))
    assert torch.equal(out[0], out[1])


def test_track_sgd_leaves_the_global_rng_to_training():
    """Dropout draws from the global RNG; the shadows' extra closure calls must not shift it."""
    data = batches(10)
    out = []
    for track in (False, True):
        torch.manual_seed(5)
        model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.3), nn.Tanh(), nn.Linear(8, 2)).double()
        opt = QODE(model.parameters(), track_sgd=track, model=model, **WINDOW)
        run(model, opt, data)
        out.append((flat(model), torch.rand(1)))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


@pytest.mark.parametrize("pattern", ["set_to_none_false", "zero_grad_outside"])
def test_track_sgd_with_gradients_left_in_grad(pattern):
    """The loop's own ``.grad`` neither leaks into the shadows nor gets overwritten by them."""
    data = batches(5)
    res = []
    for track in (False, True):
        model = tiny_mlp(4)
        opt = QODE(model.parameters(), track_sgd=track, **WINDOW)
        grads = []
        for X, Y in data:
            if pattern == "zero_grad_outside":
                opt.zero_grad()

            def closure():
                if pattern == "set_to_none_false":
                    opt.zero_grad(set_to_none=False)
                loss = ((model(X) - Y) ** 2).mean()
                loss.backward()
                return loss
            opt.step(closure)
            grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())
        res.append((flat(model), grads, opt.reports[0].drift))
    assert torch.equal(res[0][0], res[1][0])
    assert all(torch.equal(a, b) for a, b in zip(res[0][1], res[1][1]))
    # the drift equals the one measured with the textbook closure
    model = tiny_mlp(4)
    opt = QODE(model.parameters(), track_sgd=True, **WINDOW)
    run(model, opt, data)
    assert _numbers(res[1][2]) == pytest.approx(_numbers(opt.reports[0].drift), rel=1e-12)


def _numbers(d: dict) -> dict:
    """A report dict with its nested dicts (``drift["parts"]``, ``drift["twin"]``) flattened to ``a.b`` keys."""
    return {f"{k}.{j}" if isinstance(v, dict) else k: w for k, v in d.items()
            for j, w in (v.items() if isinstance(v, dict) else [(None, v)])}


# ------------------------------------------------------------------------------ copy / pickle
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("stop", [0, 3])
def test_copy_or_pickle_continues_bit_identically(how, stop):
    """stop = 3 is inside an explicit window (with shots: the tomography RNG travels too)."""
    data = batches(10, seed=2)
    kw = dict(WINDOW, shots=5000, sparsity=0.3, track_sgd=True, momentum=0.5)
    model = tiny_mlp(6)
    opt = QODE(model.parameters(), **kw)
    run(model, opt, data[:stop])
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert opt2.in_quantum_window == opt.in_quantum_window
    run(model, opt, data[stop:])
    run(model2, opt2, data[stop:])
    assert torch.equal(flat(model), flat(model2))
    assert [_untimed(r.as_dict()) for r in opt.reports] == [_untimed(r.as_dict()) for r in opt2.reports]
    assert all(p2 is not p for p, p2 in zip(model.parameters(), model2.parameters()))


# -------------------------------------------------------------------------------- faults
def test_a_zero_tomography_readout_never_erases_the_model(monkeypatch):
    real = optim_mod.tomography

    def failed_norm(v, shots, **kw):
        res = real(v, shots, **kw)
        res.estimate = np.zeros_like(np.asarray(res.estimate))
        return res

    monkeypatch.setattr(optim_mod, "tomography", failed_norm)
    model = tiny_mlp(1)
    opt = QODE(model.parameters(), shots=100, **WINDOW)
    data = batches(5)
    run(model, opt, data[:1])
    theta0 = flat(model)
    run(model, opt, data[1:])
    rep = opt.reports[0]
    assert torch.equal(flat(model), theta0)
    assert rep.mode == "classical" and "zero vector" in rep.reason and any("zero vector" in f for f in rep.faults)


def test_non_finite_upload_is_a_recorded_fault():
    model = tiny_mlp(1)
    opt = QODE(model.parameters(), **WINDOW)
    data = batches(5)
    data[1] = (data[1][0] * float("nan"), data[1][1])
    run(model, opt, data)
    rep = opt.reports[0]
    assert rep.mode == "classical" and any("upload" in f for f in rep.faults)
    assert torch.isfinite(flat(model)).all()


def test_writing_the_weights_inside_a_matrix_free_window_names_the_cause():
    model = tiny_mlp(1)
    opt = QODE(model.parameters(), explicit=False, **WINDOW)
    data = batches(5)
    run(model, opt, data[:2])
    assert opt.in_quantum_window
    theta0 = opt._win.theta0.clone()
    model.load_state_dict(tiny_mlp(2).state_dict())
    run(model, opt, data[2:3])                   # the window ends at θ0 with the cause in the report
    rep = opt.reports[0]
    assert not opt.in_quantum_window and torch.equal(flat(model), theta0)
    assert "modified in place during a quantum window" in rep.reason
    assert any("modified in place during a quantum window" in f for f in rep.faults)
    run(model, opt, data[3:5])                   # and the optimizer is not stuck: classical steps follow
    assert opt.step_count == 5 and rep.mode == "classical"


def test_load_state_dict_refuses_other_readout_settings():
    model = tiny_mlp(1)
    opt = QODE(model.parameters(), shots=1000, **WINDOW)
    run(model, opt, batches(2))
    for kw in (dict(shots=2000), dict(shots=1000, eps=0.05), dict(shots=1000, seed=3),
               dict(shots=1000, tomography_kwargs={"sign_method": "hadamard"})):
        other = QODE(model.parameters(), **{**WINDOW, **kw})
        with pytest.raises(ValueError, match="other settings"):
            other.load_state_dict(opt.state_dict())


# ------------------------------------------------------------------------- unused parameters
class TwoHeads(nn.Module):
    """A shared trunk and two heads; the loss uses only ``head_a`` (e.g. a multi-task model)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.trunk, self.head_a, self.head_b = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x):
        return self.head_a(torch.tanh(self.trunk(x)))


@pytest.mark.parametrize("upload,sparsity,shots", [("dense", 0.0, None), ("dense", 0.3, 10**6), ("sparse", 0.3, None)])
def test_parameters_without_gradient_stay_out_of_the_window(upload, sparsity, shots):
    """SGD leaves a parameter with no gradient untouched (no weight decay either); so does the window."""
    model = TwoHeads().double()
    opt = QODE(model.parameters(), lr=0.05, weight_decay=0.1, mode="quantum", cycle=5, classical_steps=1,
               sparsity=sparsity, upload=upload, shots=shots, track_sgd=True)
    data = batches(5)
    run(model, opt, data[:1])
    head_b = [p.detach().clone() for p in model.head_b.parameters()]
    run(model, opt, data[1:])
    rep = opt.reports[0]
    assert rep.mode == "quantum" and rep.excluded_params == 2
    assert all(torch.equal(a, b) for a, b in zip(head_b, model.head_b.parameters()))
    n_b = sum(p.numel() for p in model.head_b.parameters())
    assert rep.support_size <= sum(p.numel() for p in model.parameters()) - n_b
    if sparsity and upload == "dense":           # top-r still gives the download's exact sparsity
        prunable = [p for p in model.parameters() if p.dim() > 1]
        zeros = sum(int((p == 0).sum()) for p in prunable)
        assert zeros == opt.pruner.n_pruned_target()
    if shots is None and upload == "dense":      # exact readout, no momentum: the linearisation only
        assert rep.drift["linearization_relative"] < 0.05


# ------------------------------------------------------------------ exceptions, schedulers, copies
def test_copy_and_pickle_with_an_lr_scheduler_attached():
    """A scheduler wraps ``opt.step`` on the instance; a copy must step itself, not the original."""
    data = batches(10, seed=2)
    model = tiny_mlp(6)
    opt = QODE(model.parameters(), track_sgd=True, **WINDOW)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=100)
    run(model, opt, data[:3])
    for how in ("deepcopy", "pickle"):
        model2, opt2 = copy.deepcopy((model, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((model, opt)))
        sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=100)
        run(model2, opt2, data[3:])
        sched2.step()
        assert opt.step_count == 3 and opt2.step_count == 10
    run(model, opt, data[3:])
    sched.step()
    assert torch.equal(flat(model), flat(model2))


class _FailingMonitor:
    def __init__(self):
        self.ends, self.raised = [], False

    def on_upload(self, step, verdict):
        pass

    def on_window_end(self, step, report):
        self.ends.append(step)
        if not self.raised:
            self.raised = True
            raise RuntimeError("monitor failed")


def test_an_exception_at_the_window_end_leaves_a_consistent_optimizer():
    data = batches(10, seed=3)
    for explicit in (None, False):
        ref_model = tiny_mlp(2)
        ref = QODE(ref_model.parameters(), track_sgd=True, explicit=explicit, **WINDOW)
        run(ref_model, ref, data)
        model = tiny_mlp(2)
        mon = _FailingMonitor()
        opt = QODE(model.parameters(), track_sgd=True, explicit=explicit, monitor=mon, **WINDOW)
        run(model, opt, data[:4])
        with pytest.raises(RuntimeError, match="monitor failed"):
            run(model, opt, data[4:5])                  # the window's last step
        assert opt.step_count == 5 and not opt.in_quantum_window and opt.reports[0].drift is not None
        run(model, opt, data[5:])
        assert torch.equal(flat(model), flat(ref_model)) and mon.ends == [4, 9]
        assert [_untimed(r.as_dict()) for r in opt.reports] == [_untimed(r.as_dict()) for r in ref.reports]


@pytest.mark.parametrize("fail_at", [(0, 1), (2, 2), (2, 3), (4, 3), (4, 4), (4, 5)])
def test_a_closure_that_raises_can_be_retried(fail_at):
    """(step, call): the step's n-th closure call raises once; retrying the batch gives the run that
    never failed.  In a window step the calls are: the step's own, the SGD shadow's, the GD shadow's
    (momentum is on), and at the window's last step (4) the two drift loss evaluations (4, 5), which
    run once the step is complete; step 0 opens the cycle."""
    data = batches(10, seed=4)
    kw = dict(track_sgd=True, momentum=0.5, **{**WINDOW, "sparsity": 0.3})
    ref_model = tiny_mlp(5)
    ref = QODE(ref_model.parameters(), **kw)
    run(ref_model, ref, data)
    model = tiny_mlp(5)
    opt = QODE(model.parameters(), **kw)
    state = {"armed": True}
    for k, (X, Y) in enumerate(data):
        calls = [0]

        def closure():
            calls[0] += 1
            if state["armed"] and (k, calls[0]) == fail_at:
                state["armed"] = False
                raise KeyboardInterrupt
            opt.zero_grad()
            loss = ((model(X) - Y) ** 2).mean()
            loss.backward()
            return loss
        try:
            opt.step(closure)
        except KeyboardInterrupt:
            if opt.step_count == k:                     # the step did not complete: retry the batch
                calls[0] = 0
                opt.step(closure)
    assert not state["armed"]
    if fail_at[0] == 4 and fail_at[1] >= 4:         # a drift loss evaluation: the step was complete
        assert opt.reports[0].drift["loss_qode"] is None and opt.reports[0].drift["l2"] == ref.reports[0].drift["l2"]
        assert torch.equal(flat(model), flat(ref_model))
        return
    assert torch.equal(flat(model), flat(ref_model))
    assert [_untimed(r.as_dict()) for r in opt.reports] == [_untimed(r.as_dict()) for r in ref.reports]


def test_monitor_metric_inside_a_matrix_free_window_on_batchnorm():
    from torch_qode.training.monitor import DissipationMonitor
    data = batches(10, seed=5)
    out = []
    for with_monitor in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 2)).double()
        opt = QODE(model.parameters(), explicit=False, model=model, **WINDOW)
        X0, Y0 = data[0]
        mon = DissipationMonitor(model, lambda out, y: ((out - y) ** 2).mean(), (X0, Y0), lr=0.05, window=4,
                                 schedule=range(10), metric=lambda m: float(m(X0).sum()))
        for k, (X, Y) in enumerate(data):
            opt.step(closure_for(model, opt, X, Y))
            if with_monitor:
                mon.step(k)
        assert [r.mode for r in opt.reports] == ["quantum", "quantum"]
        out.append((flat(model), [b.clone() for b in model.buffers()]))
    assert torch.equal(out[0][0], out[1][0]) and all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1]))


def test_lr_changed_mid_window_leaves_the_window_and_its_linearisation_drift_alone():
    data = batches(5, seed=6)
    res = []
    for drop in (False, True):
        model = tiny_mlp(7)
        opt = QODE(model.parameters(), track_sgd=True, **WINDOW)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.0 if drop and e >= 3 else 1.0)
        for X, Y in data:
            opt.step(closure_for(model, opt, X, Y))
            sched.step()
        res.append((flat(model), opt.reports[0].drift))
    assert torch.equal(res[0][0], res[1][0])                        # the window keeps its upload lr
    assert res[0][1]["linearization"] == pytest.approx(res[1][1]["linearization"], rel=1e-9)
    assert res[0][1]["l2"] != res[1][1]["l2"]                        # SGD itself followed the schedule


def test_frozen_noise_uses_the_closures_gradient():
    """``noise="frozen"`` takes F0 from the upload step's ``.grad`` (gradient clipping included)."""
    model = tiny_mlp(8)
    opt = QODE(model.parameters(), noise="frozen", **WINDOW)
    data = batches(2, seed=7)
    for X, Y in data:
        def closure():
            opt.zero_grad()
            loss = ((model(X) - Y) ** 2).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
            return loss
        opt.step(closure)
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
    assert g.norm() <= 1e-3 * (1 + 1e-6)
    assert torch.allclose(opt._win.frozen, -0.05 * g, rtol=0, atol=1e-15)


def test_a_cycle_before_its_upload_is_pending():
    model = tiny_mlp(1)
    opt = QODE(model.parameters(), lr=0.05, mode="auto", cycle=5, classical_steps=3, sparsity=0.0)
    run(model, opt, batches(2))
    assert opt.reports[0].mode == "pending" and opt.reports[0].reason == ""


def test_download_report_has_per_layer_sparsity_under_the_given_names():
    model = tiny_mlp(1)
    names = [n for n, _ in model.named_parameters()]
    opt = QODE(model.parameters(), names=names, **{**WINDOW, "sparsity": 0.5})
    run(model, opt, batches(1))
    layers = opt.reports[0].download["layers"]
    assert set(layers) == {"0.weight", "2.weight"}
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    pruned = sum(layers[n] * sizes[n] for n in layers)
    assert pruned == opt.pruner.n_pruned_target()
