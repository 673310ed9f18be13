"""Carleman order 2 in QODE on the factored level-2 state (issue 11): ``carleman_state=`` and
``max_rank=``, the report's ``state`` / ``rank`` / ``truncation`` / ``order_gap``, resume, faults."""
import resource

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_qode.bridge.taylor import decomposed_norms
from torch_qode.training.qode import QODE
from tests._models import cnn_batch, tiny_cnn
from tests.training.test_qode import _untimed, batches, closure_for, flat, interrupted, micro_mlp, run, tiny_mlp

ORDER2 = dict(lr=0.1, mode="quantum", cycle=6, classical_steps=1, sparsity=0.0, carleman_order=2,
              explicit=False, shots=None)


def _train(make, seed, data, closure=closure_for, **kw):
    model = make(seed)
    opt = QODE(model.parameters(), **{**ORDER2, **kw})
    for batch in data:
        opt.step(closure(model, opt, *batch))
    return model, opt


def _close(a, b, tol=1e-10):
    """Report dicts equal up to ``tol`` (relative) in their numbers."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=tol, abs=tol)
    return a == b


def _cnn_closure(model, opt, X, y):
    def closure():
        opt.zero_grad()
        with decomposed_norms(model):           # third derivatives through BatchNorm
            loss = F.cross_entropy(model(X), y)
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("case", ["stream", "weight_decay", "frozen", "sparse_upload", "cnn_batchnorm"])
def test_factored_equals_dense_in_qode(case):
    kw, make, closure = {}, tiny_mlp, closure_for
    data = batches(6, seed=21)
    if case == "weight_decay":
        kw = dict(weight_decay=0.05)
    elif case == "frozen":
        kw = dict(noise="frozen")
    elif case == "sparse_upload":
        kw = dict(sparsity=0.3, upload="sparse")
    elif case == "cnn_batchnorm":
        make, closure = tiny_cnn, _cnn_closure
        data = [cnn_batch(seed=s) for s in range(6)]
    out = {}
    for state in ("factored", "dense"):
        model, opt = _train(make, 5, data, closure=closure, carleman_state=state, **kw)
        out[state] = (flat(model), opt.reports[0])
    (w_f, r_f), (w_d, r_d) = out["factored"], out["dense"]
    assert r_f.mode == r_d.mode == "quantum", (r_f.reason, r_d.reason)
    assert r_f.carleman["state"] == "factored" and r_d.carleman["state"] == "dense"
    assert not torch.equal(w_d, flat(make(5)))                 # the window moved the weights
    torch.testing.assert_close(w_f, w_d, atol=1e-10, rtol=0)
    for field in ("tomography", "resources", "solver", "dissipation", "download", "drift"):
        a, b = getattr(r_f, field), getattr(r_d, field)
        if field == "resources":   # the classical cost counts each state's own products
            a, b = ({k: v for k, v in x.items() if k != "classical"} for x in (a, b))
            assert r_f.resources["classical"]["hvps"] < r_d.resources["classical"]["hvps"]
        assert _close(a, b), field
    skip = {"state", "rank", "truncation", "order_gap", "state_bytes"}
    assert {k: v for k, v in r_f.carleman.items() if k not in skip} == \
        {k: v for k, v in r_d.carleman.items() if k not in skip}
    assert 0 < r_f.carleman["rank"] <= 2 * 5 and r_f.carleman["truncation"] == 0.0
    # the embedded order-1 state, carried by both states: the same order_gap
    assert r_f.carleman["order_gap"] > 0
    assert r_d.carleman["order_gap"] == pytest.approx(r_f.carleman["order_gap"], rel=1e-10, abs=1e-10)
    assert r_f.carleman["state_bytes"] < r_d.carleman["state_bytes"] or make is tiny_cnn


def test_auto_picks_factored_only_for_matrix_free_order2_windows():
    data = batches(6, seed=2)
    for kw, want in ((dict(), "factored"), (dict(explicit=True), "dense"), (dict(explicit=None), "dense"),
                     (dict(carleman_order=1), "dense"), (dict(form="continuous"), "dense")):
        _, opt = _train(tiny_mlp, 1, data, **kw)
        assert opt.reports[0].carleman["state"] == want, kw
    assert opt.cfg.carleman_state == "auto" and opt.carleman_state == "auto"


def test_large_model_runs_order2_factored_without_n_squared_memory():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 196), nn.Tanh(), nn.Linear(196, 10))     # 52,342 weights
    n = sum(p.numel() for p in model.parameters())
    assert n >= 50_000                       # a dense level 2 would hold n² · 8 B ≈ 21.9 GB
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 256, generator=g), torch.randint(0, 10, (32,), generator=g)) for _ in range(4)]
    kw = dict(lr=0.05, mode="quantum", cycle=4, classical_steps=1, sparsity=0.0, carleman_order=2, shots=None)
    with pytest.raises(ValueError, match="carleman_state='dense'"):   # refused before allocating
        QODE(model.parameters(), carleman_state="dense", **kw)
    opt = QODE(model.parameters(), **kw)     # carleman_state="auto"
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for X, y in data:
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(X), y)
            loss.backward()
            return loss
        opt.step(closure)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    rep = opt.reports[0]
    assert rep.mode == "quantum", rep.reason
    c = rep.carleman
    assert c["state"] == "factored" and c["n"] == n and c["dim"] == n + n * n and not c["explicit"]
    assert 0 < c["rank"] <= 2 * 3 and c["truncation"] == 0.0 and c["order_gap"] > 0
    assert c["state_bytes"] <= 8 * n * (2 * 3 + 3)
    assert grown < 2 * 2**30, grown          # far below the 20 GB of a dense level 2
    assert rep.resources.get("error") is None and bool(torch.isfinite(flat(model)).all())


def test_order_gap_is_zero_for_a_quadratic_loss_and_positive_for_tanh():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3).double()                        # MSE of a linear model: F2 = 0
    X, Y = torch.randn(32, 5, dtype=torch.float64), torch.randn(32, 3, dtype=torch.float64)
    opt = QODE(lin.parameters(), **ORDER2)
    run(lin, opt, [(X, Y)] * 6)
    c = opt.reports[0].carleman
    assert c["state"] == "factored" and c["order_gap"] < 1e-12
    _, opt = _train(tiny_mlp, 2, batches(6, seed=3), lr=0.5)
    assert opt.reports[0].carleman["order_gap"] > 1e-6


def test_max_rank_truncates_and_reports_the_discarded_mass():
    data = batches(8, seed=4)
    exact, o_ex = _train(tiny_mlp, 3, data, cycle=8, lr=0.3)
    capped, o_cap = _train(tiny_mlp, 3, data, cycle=8, lr=0.3, max_rank=4)
    c_ex, c_cap = o_ex.reports[0].carleman, o_cap.reports[0].carleman
    assert c_ex["rank"] > 4 and c_ex["truncation"] == 0.0
    assert c_cap["rank"] <= 4 and c_cap["truncation"] > 0
    assert not torch.equal(flat(exact), flat(capped))
    torch.testing.assert_close(flat(exact), flat(capped), atol=1e-2, rtol=0)


@pytest.mark.parametrize("kw,match", [
    (dict(carleman_state="factored", solver="direct", explicit=None), "carleman_state='factored'.*solver='direct'"),
    (dict(carleman_state="factored", solver="filtered", explicit=None, solver_options={"kappa_a": 10.0}),
     "carleman_state='factored'.*solver='filtered'"),
    (dict(carleman_state="factored", carleman_order=3), "carleman_state='factored'.*carleman_order=3"),
    (dict(carleman_state="factored", carleman_order=1), "carleman_state='factored'.*carleman_order=1"),
    (dict(carleman_state="factored", form="continuous"), "carleman_state='factored'.*form='continuous'"),
    (dict(carleman_state="sparse"), "carleman_state"),
    (dict(max_rank=0), "max_rank"),
    (dict(max_rank=2.5), "max_rank"),
    (dict(max_rank=4, carleman_state="dense"), "max_rank=4.*carleman_state='dense'"),
    (dict(max_rank=4, carleman_order=3), "max_rank=4.*carleman_order=3"),
])
def test_refusals_name_the_argument(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        QODE(tiny_mlp().parameters(), **{**ORDER2, **kw})


def test_resume_mid_window_is_bit_identical_through_restore_expansion():
    data = batches(8, seed=12)
    kwargs = dict(ORDER2, lr=0.05, momentum=0.9, cycle=8, sparsity=0.2, shots=3000, track_sgd=True)
    m_ref = tiny_mlp(3)
    o_ref = QODE(m_ref.parameters(), **kwargs)
    run(m_ref, o_ref, data)
    assert o_ref.reports[0].carleman["state"] == "factored"
    m2, o2 = interrupted(tiny_mlp, 3, kwargs, data[:5])
    assert o2._win.state.kind == "factored" and o2._win.state.level2.t == 4
    o2.restore_expansion(closure_for(m2, o2, *data[1]))      # step 1 was the upload
    run(m2, o2, data[5:])
    assert all(torch.equal(a, b) for a, b in zip(m_ref.parameters(), m2.parameters()))
    assert not any("re-expanded" in f for f in o2.reports[0].faults)
    assert [_untimed(r.as_dict()) for r in o_ref.reports] == [_untimed(r.as_dict()) for r in o2.reports]


def test_a_non_finite_factored_state_ends_the_window_and_restores_theta0():
    model = tiny_mlp(4)
    opt = QODE(model.parameters(), **{**ORDER2, "lr": 1e150, "classical_steps": 0})
    theta0 = flat(model).clone()
    for k, (X, Y) in enumerate(batches(6, seed=5)):
        opt.step(closure_for(model, opt, X, Y))
        if opt.reports[0].mode == "classical":
            break
    rep = opt.reports[0]
    assert rep.mode == "classical" and "aborted" in rep.reason and "non-finite" in rep.reason, rep.reason
    assert torch.equal(flat(model), theta0) and not opt.in_quantum_window


def test_dense_explicit_order2_window_carries_order_gap_and_resumes_bit_identical():
    data = batches(6, seed=13, dims=(2, 1))
    kwargs = dict(ORDER2, explicit=True, cycle=5, lr=0.3, shots=2000)   # dense: explicit terms
    m_ref = micro_mlp(6)
    o_ref = QODE(m_ref.parameters(), **kwargs)
    run(m_ref, o_ref, data)
    c = o_ref.reports[0].carleman
    assert c["state"] == "dense" and c["order_gap"] > 0
    m2, o2 = interrupted(micro_mlp, 6, kwargs, data[:3])
    assert o2._win.state.embedded and o2._win.state.kind == "dense"
    run(m2, o2, data[3:])
    assert all(torch.equal(a, b) for a, b in zip(m_ref.parameters(), m2.parameters()))
    assert [_untimed(r.as_dict()) for r in o_ref.reports] == [_untimed(r.as_dict()) for r in o2.reports]


def test_max_rank_under_auto_takes_the_factored_state_on_explicit_supports():
    # a 26-weight support: explicit terms under explicit=None, where "auto" keeps the dense state;
    # max_rank asks for the factored state's cap, so it is never silently ignored
    data = batches(8, seed=4)
    kw = dict(explicit=None, cycle=8, lr=0.3)
    _, o_plain = _train(tiny_mlp, 3, data, **kw)
    assert o_plain.reports[0].carleman["state"] == "dense" and o_plain.reports[0].carleman["explicit"]
    m_cap, o_cap = _train(tiny_mlp, 3, data, max_rank=4, **kw)
    c = o_cap.reports[0].carleman
    assert c["state"] == "factored" and c["explicit"] and c["rank"] <= 4 and c["truncation"] > 0
    _, o_true = _train(tiny_mlp, 3, data, max_rank=4, **{**kw, "explicit": True})   # accepted, capped too
    assert o_true.reports[0].carleman == c
    # an explicit factored window resumes bit for bit, with no re-expansion
    kwargs = {**ORDER2, **kw, "max_rank": 4}
    m2, o2 = interrupted(tiny_mlp, 3, kwargs, data[:5])
    run(m2, o2, data[5:])
    assert all(torch.equal(a, b) for a, b in zip(m_cap.parameters(), m2.parameters()))
    assert [_untimed(r.as_dict()) for r in o_cap.reports] == [_untimed(r.as_dict()) for r in o2.reports]
