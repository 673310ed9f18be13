"""Reported numbers recomputed by hand (issue 20's and 21's mutation probes on the training floor): the
drift ratios of ``track_sgd`` against torch.optim.SGD and plain GD run by the test, and the skipped-step
count carried by a state_dict taken mid-cycle."""
import copy
import io
import pickle

import pytest
import torch

from torch_qode.training.qode import QODE
from tests.training.test_qode import batches, closure_for, flat, flat_loss, micro_mlp, tiny_mlp


def test_every_drift_ratio_matches_norms_computed_by_hand():
    """micro_mlp, momentum 0.9 (so the SGD shadow and plain GD differ), exact readout, order 2: θ_SGD from
    torch.optim.SGD on the same batches from the start (the classical steps are SGD's, bit for bit, and
    the shadow continues SGD from θ0 with its momentum), θ_GD plain GD on the window's batches from θ0,
    θ_lin1 the order-1 Carleman state (u ← u + F0(t) + F1 u, F1 = −η H of the upload batch at θ0)."""
    lr, mom, cycle, cs = 0.1, 0.9, 6, 2
    data = batches(cycle, seed=9, dims=(2, 1))
    model, ref = micro_mlp(7), micro_mlp(7)
    opt = QODE(model.parameters(), lr=lr, momentum=mom, mode="quantum", cycle=cycle, classical_steps=cs,
               sparsity=0.0, carleman_order=2, shots=None, track_sgd=True)
    sgd = torch.optim.SGD(ref.parameters(), lr=lr, momentum=mom)
    f0s = []
    for k, (X, Y) in enumerate(data):
        if k == cs:
            theta0 = flat(ref).clone()
            assert torch.equal(flat(model), theta0)
            H = torch.autograd.functional.hessian(flat_loss(model, X, Y), theta0)
        if k >= cs:
            f0s.append(-lr * torch.autograd.functional.jacobian(flat_loss(model, X, Y), theta0))
        opt.step(closure_for(model, opt, X, Y))
        sgd.step(closure_for(ref, sgd, X, Y))
    rep = opt.reports[0]
    assert rep.mode == "quantum"
    theta_q, theta_sgd = flat(model), flat(ref)
    theta_gd = theta0.clone()
    for X, Y in data[cs:]:
        theta_gd = theta_gd - lr * torch.autograd.functional.jacobian(flat_loss(model, X, Y), theta_gd)
    u1 = torch.zeros_like(theta0)
    for f0 in f0s:
        u1 = u1 + f0 - lr * (H @ u1)
    theta_lin1 = theta0 + u1

    d = rep.drift
    sgd_disp = float((theta_sgd - theta0).norm())
    gd_disp = float((theta_gd - theta0).norm())
    l2 = float((theta_q - theta_sgd).norm())
    lin = float((theta_q - theta_gd).norm())        # exact readout: θ_qode = θ_lin (checked below)
    lin1 = float((theta_lin1 - theta_gd).norm())
    assert d["readout"] < 1e-12
    assert d["sgd_displacement"] == pytest.approx(sgd_disp, rel=1e-10)
    assert d["gd_displacement"] == pytest.approx(gd_disp, rel=1e-10)
    assert d["l2"] == pytest.approx(l2, rel=1e-8)
    assert d["linearization"] == pytest.approx(lin, rel=1e-6)
    assert d["linearization_order1"] == pytest.approx(lin1, rel=1e-6)
    assert d["relative"] == pytest.approx(l2 / sgd_disp, rel=1e-8)
    assert d["linearization_relative"] == pytest.approx(lin / gd_disp, rel=1e-6)
    assert d["linearization_order1_relative"] == pytest.approx(lin1 / gd_disp, rel=1e-6)
    # the two displacements differ enough that swapping them changes every ratio visibly
    assert abs(sgd_disp / gd_disp - 1) > 0.2
    # the drift's parts (issue 21), each over ‖θ_SGD − θ0‖: S is every weight, so the support part is the
    # momentum's (SGD against GD); no prune (sparsity 0) and exact readout: the last two parts are zero
    sup = float((theta_gd - theta_sgd).norm())
    assert d["parts"]["support"] == pytest.approx(sup / sgd_disp, rel=1e-8)
    assert d["parts"]["linearization"] == pytest.approx(lin / sgd_disp, rel=1e-6)
    assert d["parts"]["readout_pruning"] == 0.0 and d["parts"]["readout_noise"] == 0.0
    assert d["parts_l2"]["support"] == pytest.approx(sup, rel=1e-8)
    assert d["twin"]["relative_sgd"] == pytest.approx(sup / sgd_disp, rel=1e-8)
    assert d["twin"]["relative_qode"] == pytest.approx(lin / sgd_disp, rel=1e-6)
    assert d["parts"]["linearization"] != pytest.approx(d["linearization_relative"], rel=0.1)   # other denominators
    # the reported losses are the closure's (the last batch) at θ_SGD and θ_qode
    X, Y = data[-1]
    assert d["loss_sgd"] == pytest.approx(float(flat_loss(model, X, Y)(theta_sgd)), rel=1e-12)
    assert d["loss_qode"] == pytest.approx(float(flat_loss(model, X, Y)(theta_q)), rel=1e-12)


def _nan_run(opt, model, data, bad):
    for k, (X, Y) in enumerate(data):
        opt.step(closure_for(model, opt, X * float("nan") if k == bad else X, Y))


def _twin(how, model, opt, kw):
    if how == "state_dict":
        model2 = copy.deepcopy(model)
        opt2 = QODE(model2.parameters(), **kw)
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        opt2.load_state_dict(torch.load(buf, weights_only=False))
        return model2, opt2
    if how == "deepcopy":
        return copy.deepcopy((model, opt))
    return pickle.loads(pickle.dumps((model, opt)))


CLASSICAL = dict(lr=0.05, momentum=0.9, mode="classical", sparsity=0.0, cycle=100)


@pytest.mark.parametrize("how", ["state_dict", "deepcopy", "pickle"])
def test_a_skip_just_before_a_mid_cycle_save_is_in_the_saved_reports(how):
    """A non-finite classical step at k = 1 is masked on the device; the state taken right after it, at
    k = 2 (mid-cycle, before anything read the reports), must carry the skip: the restored optimizer
    reports it, and both count it once as they go on."""
    data = batches(6)
    model = tiny_mlp(1)
    opt = QODE(model.parameters(), **CLASSICAL)
    _nan_run(opt, model, data[:2], bad=1)
    assert opt._k == 2                              # mid-cycle (cycle 100), nothing read the reports yet
    model2, opt2 = _twin(how, model, opt, CLASSICAL)
    rep2 = opt2.reports[0]
    assert rep2.skipped_steps == 1 and any("steps 0..1" in f and "update skipped" in f for f in rep2.faults)
    for o, m in ((opt, model), (opt2, model2)):
        for X, Y in data[2:]:
            o.step(closure_for(m, o, X, Y))
    assert opt.reports[0].skipped_steps == opt2.reports[0].skipped_steps == 1
    assert opt.reports[0].faults == opt2.reports[0].faults and len(rep2.faults) == 1
    assert torch.isfinite(flat(model2)).all()


@pytest.mark.parametrize("how", ["state_dict", "deepcopy", "pickle"])   # pickle: MaskedSGD.__getstate__
def test_a_mid_cycle_copy_with_flat_momentum_continues_bit_identically(how):
    """Classical steps with momentum on a small model take the flat momentum path (its buffers are views of
    one block); a copy taken mid-cycle goes on exactly as the original."""
    data = batches(6)
    model = tiny_mlp(1)
    opt = QODE(model.parameters(), **CLASSICAL)
    _nan_run(opt, model, data[:2], bad=None)
    assert opt._masked._flat is not None             # the flat path is the one under test
    model2, opt2 = _twin(how, model, opt, CLASSICAL)
    for o, m in ((opt, model), (opt2, model2)):
        for X, Y in data[2:]:
            o.step(closure_for(m, o, X, Y))
    assert torch.equal(flat(model), flat(model2))
