"""Issue 22 inside QODE: the predicted error in the report beside the measured one, the decision at the
window's first new batch, ``window="auto"``, the paper's criterion on request, the cost bound."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from torch_qode.bridge.dissipation import DissipationCheck
from torch_qode.bridge.prediction import rounded
from torch_qode.training.qode import QODE
from tests.training.test_qode import batches, closure_for, flat, run, tiny_mlp

BASE = dict(lr=0.5, cycle=13, classical_steps=1, sparsity=0.0, shots=None, track_sgd=True, mode="auto")


def _train(data, model=None, **kw):
    model = model if model is not None else tiny_mlp(3)
    opt = QODE(model.parameters(), **{**BASE, **kw})
    run(model, opt, data)
    return model, opt


def test_the_report_carries_the_predicted_error_beside_the_measured_one():
    _, opt = _train(batches(13, seed=2), dissipation=DissipationCheck(max_error=1e9))
    rep = opt.reports[0]
    d = rep.dissipation
    assert rep.mode == "quantum" and d["criterion"] == "predicted" and not d["pending"]
    assert len(d["predicted_error"]) == 13 and d["predicted_error"][0] == 0.0
    assert d["noise_measured"] and d["remainder_measured"] and d["check_grads"] == 4
    measured = rep.drift["linearization_relative"]
    assert measured > 0 and d["predicted_error"][12] > 0
    assert d["hvps"] <= DissipationCheck().max_hvps(12, 12) and d["work_ratio"] <= 0.75
    assert set(d["predicted_parts"]) == {"remainder", "noise"}
    assert d["predicted_parts"]["noise"] > 0                # mini-batches: the curvature changes between them


def test_a_quadratic_loss_is_predicted_and_measured_exact_and_only_the_readout_errs():
    """Least squares on a linear model, one batch: the Taylor expansion is the loss; the predicted and the
    measured linearisation errors are round-off, and the drift left is the readout's."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2).double()
    X = torch.randn(32, 4, dtype=torch.float64)
    Y = torch.randn(32, 2, dtype=torch.float64)
    _, opt = _train([(X, Y)] * 9, model=model, lr=0.1, cycle=9, shots=10**4,
                    dissipation=DissipationCheck(max_error=0.5))
    rep = opt.reports[0]
    assert rep.mode == "quantum", rep.reason
    assert max(rep.dissipation["predicted_error"]) < 1e-9
    assert rep.drift["linearization_relative"] < 1e-9
    assert rep.drift["parts"]["readout_noise"] > 1e-4


def test_a_window_the_first_new_batch_refuses_trains_that_step_as_sgd_from_theta0():
    data = batches(4, seed=2)
    model = tiny_mlp(3)
    opt = QODE(model.parameters(), **{**BASE, "track_sgd": False}, dissipation=DissipationCheck(max_error=1e-6))
    opt.step(closure_for(model, opt, *data[0]))                      # classical
    theta0 = flat(model).clone()
    opt.step(closure_for(model, opt, *data[1]))                      # the upload: provisional
    assert opt.in_quantum_window and torch.equal(flat(model), theta0)
    ref = tiny_mlp(3)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(theta0, ref.parameters())
    sgd = torch.optim.SGD(ref.parameters(), lr=BASE["lr"])
    closure_for(ref, sgd, *data[2])()
    sgd.step()
    opt.step(closure_for(model, opt, *data[2]))                      # the first new batch decides
    rep = opt.reports[0]
    assert not opt.in_quantum_window and rep.mode == "classical"
    assert "first new batch" in rep.reason and "failed: predicted error" in rep.reason and not rep.faults
    assert torch.equal(flat(model), flat(ref))
    opt.step(closure_for(model, opt, *data[3]))                      # the cycle goes on classically
    assert rep.mode == "classical"


def test_window_auto_runs_the_T_it_chose_and_the_rest_of_the_cycle_classically():
    data = batches(26, seed=2)
    model = tiny_mlp(3)
    opt = QODE(model.parameters(), **{**BASE, "lr": 0.1}, window="auto", dissipation=DissipationCheck(max_error=0.2))
    ks = []
    for k, (X, Y) in enumerate(data):
        opt.step(closure_for(model, opt, X, Y))
        ks.append(opt.in_quantum_window)
    rep = opt.reports[0]
    d = rep.dissipation
    Tc = d["T_chosen"]
    assert rep.mode == "quantum" and 2 <= Tc < 12 and rep.window == Tc
    assert f"T chosen {Tc} of 12" in rep.reason
    assert rounded(d["predicted_error"][Tc]) <= 0.2 < rounded(d["predicted_error"][Tc + 1])
    assert ks[:13] == [False] + [True] * (Tc - 1) + [False] * (13 - Tc)        # upload at step 1, T steps
    assert rep.resources["classical"]["T"] == Tc and rep.drift is not None
    assert opt.cfg.window == "auto" and opt.state_dict()["qode"]["config"]["window"] == "auto"


def test_the_papers_criterion_decides_at_the_upload_as_before():
    _, opt = _train(batches(13, seed=2), dissipation=DissipationCheck(criterion="proxy", max_error_proxy=1e300,
                                                                      min_positive_fraction=0.0))
    d = opt.reports[0].dissipation
    assert d["criterion"] == "proxy" and "predicted_error" not in d
    assert opt.reports[0].reason.startswith("dissipation check passed: proxy(T=12)")


def test_the_default_check_is_the_predicted_one_with_max_error_one_half():
    opt = QODE(tiny_mlp().parameters())
    assert opt.dissipation.criterion == "predicted" and opt.dissipation.max_error == 0.5
    assert opt.cfg.window == "fixed"


def test_window_auto_without_a_predicting_check_is_refused_by_name():
    params = tiny_mlp().parameters
    for kw, match in ((dict(dissipation=DissipationCheck(criterion="proxy")), "criterion='predicted'"),
                      (dict(dissipation=lambda hvp, n, **kw: None), "criterion='predicted'")):
        with pytest.raises(ValueError, match=match):
            QODE(params(), window="auto", **kw)
    QODE(params(), window="auto", mode="classical")          # a baseline with the same settings: nothing to choose
    QODE(params(), window="auto", mode="quantum")            # no check: every window keeps the full T
    with pytest.raises(TypeError, match="dissipation"):
        QODE(params(), dissipation="proxy")
