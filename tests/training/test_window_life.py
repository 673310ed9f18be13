"""The window's life behind its seams (issue 19): typed faults shown as text, in-place writes seen by
version counters, the finish pipeline's stages, the counting wrapper operator, the state classes'
and solvers' own answers."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_qode.bridge.taylor import TaylorExpansion
from torch_qode.core.solvers import make_solver
from torch_qode.core.state import DenseLevels, FactoredLevels
from torch_qode.training import finish as _finish
from torch_qode.training.faults import INPLACE_WRITE, Fault, WindowFault
from torch_qode.training.products import counted, new_counts
from torch_qode.training.qode import QODE
from tests.training.test_qode import batches, closure_for, flat, tiny_mlp
from tests.training.test_window_core import RecordingComm  # noqa: F401  (a Comm that records)

BASE = dict(lr=0.1, mode="quantum", cycle=5, classical_steps=1, sparsity=0.0, shots=None)


class _Any:
    """A Comm stand-in for :meth:`WindowFault.agreed`: ``any`` answers ``flag or other``."""

    local = True

    def __init__(self, other: bool):
        self.other = other

    def any(self, flag):
        return bool(flag) or self.other


@pytest.mark.parametrize("kind, detail, text", [
    (Fault.UPLOAD_NONFINITE, None, "non-finite loss or gradient at upload: update skipped"),
    (Fault.UPLOAD_FAILED, "no double backward", "upload failed: no double backward"),
    (Fault.STEP_NONFINITE, None, "non-finite loss or gradient inside the quantum window"),
    (Fault.SOLVE_FAILED, ValueError("too big"), "window solve failed: too big"),
    (Fault.TOMOGRAPHY_FAILED, ValueError("bad"), "tomography failed: bad"),
    (Fault.READOUT_ZERO, 3, "tomography read out a zero vector (shots=3: no norm-stage shot succeeded), "
                            "which would erase the model"),
    (Fault.INPLACE_WRITE, None, INPLACE_WRITE),
])
def test_a_typed_fault_is_the_reports_text(kind, detail, text):
    fault = WindowFault(kind, detail)
    assert str(fault) == fault.text == text and fault.kind is kind and isinstance(fault, Exception)


def test_a_fault_met_on_another_rank_says_so():
    assert WindowFault.agreed(None, _Any(False), Fault.STATE_NONFINITE) is None
    mine = WindowFault(Fault.STATE_NONFINITE, "NaN at t=2")
    assert WindowFault.agreed(mine, _Any(True), Fault.STATE_NONFINITE) is mine
    other = WindowFault.agreed(None, _Any(True), Fault.STATE_NONFINITE)
    assert other.remote and str(other) == "a non-finite Carleman state on another rank"
    assert str(WindowFault.agreed(None, _Any(True), Fault.TOMOGRAPHY_FAILED)) == "the readout failed on another rank"


def test_a_fault_in_a_finish_stage_reaches_the_report_as_text(monkeypatch):
    def broken(*a, **kw):
        raise ValueError("no shots left")
    monkeypatch.setattr(_finish, "tomography", broken)
    model = tiny_mlp(0)
    opt = QODE(model.parameters(), **BASE)
    for X, Y in batches(5):
        opt.step(closure_for(model, opt, X, Y))
    rep = opt.reports[0]
    assert rep.mode == "classical" and "aborted at t=4: tomography failed: no shots left" in rep.reason
    assert rep.faults == ["step 4: tomography failed: no shots left"]
    assert all(isinstance(f, str) for f in rep.faults)


class _BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.bn, self.fc2 = nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


def _bn_closure(model, opt, X, Y):
    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(X), Y)
        loss.backward()
        return loss
    return closure


def test_a_weight_written_mid_window_aborts_to_theta0_and_the_next_cycle_runs():
    """A matrix-free window holds the upload graph, which saved the weights: a write to one is seen by
    its version counter, the window aborts to θ0 with the fault, the next cycle is quantum."""
    model = _BNNet().double()
    opt = QODE(model.parameters(), model=model, explicit=False, **BASE)
    data = batches(10, seed=4)
    for X, Y in data[:3]:
        opt.step(_bn_closure(model, opt, X, Y))
    assert opt.in_quantum_window
    theta0 = opt._win.theta0.clone()
    with torch.no_grad():
        model.fc2.weight.mul_(0.5)               # an in-place write (an EMA-like update) of a weight
    opt.step(_bn_closure(model, opt, *data[3]))
    rep = opt.reports[0]
    assert not opt.in_quantum_window and torch.equal(flat(model), theta0)
    assert rep.mode == "classical" and rep.reason.startswith("quantum window aborted at t=2: QODE: the parameters")
    assert rep.faults == [f"step 3: {INPLACE_WRITE}"]
    for X, Y in data[4:]:
        opt.step(_bn_closure(model, opt, X, Y))
    nxt = opt.reports[1]
    assert nxt.mode == "quantum" and not nxt.faults and not opt.in_quantum_window


def test_a_buffer_written_mid_window_leaves_the_window_on_the_uploads_buffers():
    """With model=, the upload graph holds the buffers as snapshots (what a compiled BatchNorm's own
    running-statistics copy_ needs): a manual write to a running mean mid-window invalidates nothing,
    and in training mode (the statistics unused by the products) the window equals one without it."""
    runs = []
    for write in (True, False):
        model = _BNNet().double()
        opt = QODE(model.parameters(), model=model, explicit=False, **BASE)
        data = batches(5, seed=4)
        for k, (X, Y) in enumerate(data):
            if k == 3 and write:
                assert opt.in_quantum_window
                with torch.no_grad():
                    model.bn.running_mean.mul_(0.5)
            opt.step(_bn_closure(model, opt, X, Y))
        runs.append((flat(model), opt.reports[0]))
    (theta, rep), (ref, _) = runs
    assert rep.mode == "quantum" and not rep.faults and torch.equal(theta, ref)


def test_without_an_inplace_write_a_failing_product_still_raises(monkeypatch):
    """A product's RuntimeError that no version counter explains is not swallowed, and does not leave the
    optimizer stuck: the window ended at θ0 with the fault, the next steps train."""
    model = tiny_mlp(0)
    opt = QODE(model.parameters(), explicit=False, **BASE)
    data = batches(3)
    for X, Y in data[:2]:
        opt.step(closure_for(model, opt, X, Y))
    win = opt._win

    def boom(system, t):
        raise RuntimeError("a bug in a product")
    monkeypatch.setattr(win.state, "advance", boom)
    theta0 = win.theta0.clone()
    with pytest.raises(RuntimeError, match="a bug in a product"):
        opt.step(closure_for(model, opt, *data[2]))
    rep = opt.reports[0]
    assert not opt.in_quantum_window and torch.equal(flat(model), theta0) and opt.step_count == 2   # not taken
    assert rep.mode == "classical" and rep.faults == ["step 2: a window product failed (the error propagates; "
                                                      "the window ended at θ0): a bug in a product"]
    for X, Y in batches(8)[2:]:                  # the step again, the rest of the cycle, the next cycle's window
        opt.step(closure_for(model, opt, X, Y))
    assert opt.reports[1].mode == "quantum" and not opt.reports[1].faults


def test_the_finish_pipeline_is_a_list_of_named_stages(monkeypatch):
    assert [st.__name__ for st in _finish.STAGES] == ["record", "solve", "read_out", "prune", "price", "guard",
                                                     "chain", "write_back"]
    seen = []

    def twin(win, out):                          # a new stage: sees what the earlier ones produced
        seen.append((out.estimate is not None, out.new is None))
    stages = list(_finish.STAGES)
    monkeypatch.setattr(_finish, "STAGES", tuple(stages[:3] + [twin] + stages[3:]))
    model = tiny_mlp(0)
    opt = QODE(model.parameters(), **BASE)
    for X, Y in batches(5):
        opt.step(closure_for(model, opt, X, Y))
    assert seen == [(True, True)] and opt.reports[0].mode == "quantum"


def _expansion(degree=2, n=4):
    torch.manual_seed(1)
    A = torch.randn(n, n, dtype=torch.float64)

    def loss(th):
        return 0.5 * th @ (A @ A.T) @ th + (th ** 3).sum() / 6
    return TaylorExpansion.from_function(loss, torch.randn(n, dtype=torch.float64), lr=0.1, degree=degree)


def test_the_counting_wrapper_counts_each_product_and_keeps_the_values():
    exp = _expansion()
    n = exp.n
    plain = exp.ode(explicit=False)
    counts = new_counts()
    ode = counted(exp.ode(explicit=False), counts)
    Y = torch.randn(n, 3, dtype=torch.float64)
    assert torch.equal(ode.terms[1].matmat(Y), plain.terms[1].matmat(Y)) and counts == {"hvp": 3, "third_order": 0}
    u = torch.randn(n, dtype=torch.float64)
    assert torch.equal(ode.terms[1].power(u), plain.terms[1].power(u)) and counts["hvp"] == 4
    assert torch.equal(ode.terms[2].power(u), plain.terms[2].power(u)) and counts["third_order"] == 1
    z = torch.diag(torch.tensor([2.0, 0, 0, 0], dtype=torch.float64)).reshape(-1, 1)   # sym rank 1: one product
    assert torch.equal(ode.terms[2].matmat(z), plain.terms[2].matmat(z)) and counts["third_order"] == 2
    Z, lam = torch.randn(n, 2, dtype=torch.float64), torch.tensor([1.0, -2.0], dtype=torch.float64)
    assert torch.equal(ode.terms[2].sym_sum(Z, lam), plain.terms[2].sym_sum(Z, lam)) and counts["third_order"] == 4
    explicit = new_counts()
    counted(exp.ode(explicit=True), explicit)   # the products that built F1 and F2
    assert explicit == {"hvp": n, "third_order": n * n}


def test_the_state_classes_answer_what_the_window_asked_by_kind():
    exp = _expansion()
    ode = exp.ode(explicit=True)
    assert DenseLevels.solvable and not FactoredLevels.solvable
    assert FactoredLevels.system_for(ode, 2, "discrete") is ode
    dense_sys = DenseLevels.system_for(ode, 2, "discrete")
    assert DenseLevels.lifted_dim(dense_sys, 2) == FactoredLevels.lifted_dim(ode, 2) == 4 + 16
    d = DenseLevels.open(dense_sys, order=2)
    f = FactoredLevels.open(ode, order=2)
    assert d.embedded and f.embedded
    assert d.record() == {"state": "dense", "rank": None, "truncation": 0.0, "order_gap": d.order_gap,
                          "state_bytes": d.nbytes}
    assert f.record()["state"] == "factored" and f.record()["rank"] == 0
    assert d.ledger_system(dense_sys, 2, "discrete") is dense_sys
    assert f.ledger_system(ode, 2, "discrete").dim == dense_sys.dim


def test_the_solver_says_whether_its_solution_replaces_the_forward_recurrence():
    assert not make_solver("forward").replaces_forward
    assert make_solver("direct").replaces_forward and make_solver("filtered", {"kappa_a": 4.0}).replaces_forward
