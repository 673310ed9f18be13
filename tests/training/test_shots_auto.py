"""Issue 21: ``shots="auto"`` (the readout model chooses each window's shots from the upload's predicted
displacement ``T·F0(0)``), its cap ``max_shots`` and the shots and gates in the report and the ledger."""
import warnings

import numpy as np
import pytest
import torch

from torch_qode.core.readout_model import shots_for_error
from torch_qode.core.tomography import DEFAULT_SIGN_METHOD
from torch_qode.training.config import make_config
from torch_qode.training.qode import QODE
from tests.training.test_qode import batches, closure_for, flat, flat_loss, interrupted, run, tiny_mlp

LR, CYCLE, CS = 0.1, 6, 2
T = CYCLE - CS


def _by_hand(model, data, readout, error):
    """The shots of the first window, computed here: θ0 after the CS classical steps (plain SGD), the
    upload batch's gradient g, the predicted displacement d = T·(−lr·g), and the readout model on it."""
    m = tiny_mlp(3)
    m.load_state_dict(model.state_dict())
    sgd = torch.optim.SGD(m.parameters(), lr=LR)
    for X, Y in data[:CS]:
        sgd.step(closure_for(m, sgd, X, Y))
    theta0 = flat(m).clone().requires_grad_(True)
    g, = torch.autograd.grad(flat_loss(m, *data[CS])(theta0), theta0)
    d = T * (-LR * g.detach())
    model_kw = dict(sign_method=DEFAULT_SIGN_METHOD, split=None, norm=None, norm_scale=None)
    if readout == "displacement":
        return shots_for_error(d, error, **model_kw)
    theta0 = theta0.detach()
    return shots_for_error(theta0, error * float(d.norm()) / float(theta0.norm()), **model_kw)


def _run(model, data, **kw):
    opt = QODE(model.parameters(), lr=LR, mode="quantum", cycle=CYCLE, classical_steps=CS, sparsity=0.0, **kw)
    run(model, opt, data)
    return opt


@pytest.mark.parametrize("readout,error", [("displacement", 0.1), ("weights", 0.2)])
def test_auto_shots_are_the_models_shots_for_the_predicted_displacement(readout, error):
    model, data = tiny_mlp(3), batches(CYCLE, seed=5)
    need = _by_hand(model, data, readout, error)
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # within max_shots: no warning
        opt = _run(model, data, shots="auto", readout=readout, readout_error=error, seed=1)
    rep = opt.reports[0]
    assert rep.mode == "quantum"
    assert rep.tomography["shot_budget"] == need and rep.tomography["shots"]["total"] == need
    led = rep.resources
    assert led["readout_shots"] == need
    per_shot = led["total_gates"] / (led["tomography_support_draws"] + led["tomography_shadow_shots"])
    assert led["readout_gates"] == pytest.approx(need * per_shot, rel=1e-12)
    if readout == "weights":    # ‖θ‖ ≫ ‖u‖: reading θ0 + u(T) needs many more shots for the same error
        assert need > 10 * _by_hand(model, data, "displacement", error)


def test_max_shots_caps_the_shots_and_the_warning_names_the_need():
    model, data = tiny_mlp(3), batches(CYCLE, seed=5)
    need = _by_hand(model, data, "displacement", 0.01)
    cap = need // 10
    with pytest.warns(UserWarning, match=f"needs about shots={need:,}.*max_shots={cap:,}") as rec:
        opt = _run(model, data, shots="auto", readout_error=0.01, max_shots=cap)
    assert sum("max_shots" in str(w.message) for w in rec) == 1
    assert opt.reports[0].tomography["shot_budget"] == cap == opt.reports[0].resources["readout_shots"]


def test_the_measured_noise_part_is_near_readout_error():
    """The readout-noise part (‖θ_QODE − θ_lin,r‖ / ‖θ_SGD − θ0‖) at the auto shots, over 3 seeds × 3
    windows: its mean within a factor 3 of ``readout_error`` (a statistical check with fixed seeds)."""
    parts = []
    for seed in range(3):
        model = tiny_mlp(seed)
        opt = _run(model, batches(3 * CYCLE, seed=20 + seed), shots="auto", readout_error=0.1, track_sgd=True,
                   seed=seed)
        parts += [r.drift["parts"]["readout_noise"] for r in opt.reports if r.mode == "quantum"]
    assert len(parts) == 9
    assert 0.1 / 3 < float(np.mean(parts)) < 0.1 * 3, parts
    # a tenth of the error asks ~100× the shots and measures ~10× less noise
    model = tiny_mlp(0)
    tight = _run(model, batches(3 * CYCLE, seed=20), shots="auto", readout_error=0.01, track_sgd=True)
    assert float(np.mean([r.drift["parts"]["readout_noise"] for r in tight.reports])) < float(np.mean(parts[:3])) / 3


@pytest.mark.parametrize("stop", [3, 5, 9])
def test_auto_shots_resume_bit_for_bit(stop):
    data = batches(14, seed=11)
    kwargs = dict(lr=0.05, momentum=0.9, mode="quantum", cycle=7, classical_steps=2, sparsity=0.3, shots="auto",
                  readout_error=0.15, seed=4, track_sgd=True)
    m_ref = tiny_mlp(8)
    o_ref = QODE(m_ref.parameters(), **kwargs)
    run(m_ref, o_ref, data)
    m2, o2 = interrupted(tiny_mlp, 8, kwargs, data[:stop])
    run(m2, o2, data[stop:])
    for a, b in zip(m_ref.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert [r.tomography["shot_budget"] for r in o_ref.reports] == [r.tomography["shot_budget"] for r in o2.reports]


def test_the_settings_are_checked_and_saved():
    assert make_config(shots="auto").shots == "auto"
    for bad, match in [({"shots": "many"}, "'auto'"), ({"readout_error": 0}, "readout_error"),
                       ({"max_shots": 0}, "max_shots")]:
        with pytest.raises(ValueError, match=match):
            make_config(**bad)
    saved = make_config(shots="auto", readout_error=0.05, max_shots=1000).saved()
    assert saved["shots"] == "auto" and saved["readout_error"] == 0.05 and saved["max_shots"] == 1000
