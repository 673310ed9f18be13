"""The redesigned training floor: the thin classical path, the Optimizer contract, the window core's
seams (Comm, CarlemanState), solver_options, and tests that fail on two plausible bugs."""
import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from torch_qode import PolynomialODE
from torch_qode.core.carleman import carleman
from torch_qode.core.state import DenseLevels, state_from_dict
from torch_qode.training.comm import Comm, LocalComm
from torch_qode.bridge.dissipation import DissipationCheck
from torch_qode.training.monitor import DissipationMonitor
from torch_qode.training.qode import QODE
from tests.training.test_qode import batches, closure_for, flat, run, tiny_mlp

WINDOW = dict(lr=0.1, mode="quantum", cycle=6, classical_steps=2, sparsity=0.0)


def _same(a, b) -> bool:
    """Structural equality of state_dicts (tensors bitwise)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


# ------------------------------------------------------------------------------ thin classical path
def _syncs(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_classical_steps_make_no_more_host_syncs_than_sgd(momentum):
    data = batches(8)
    models = [tiny_mlp(3), tiny_mlp(3)]
    sgd = torch.optim.SGD(models[0].parameters(), lr=0.05, momentum=momentum, weight_decay=1e-3)
    qode = QODE(models[1].parameters(), lr=0.05, momentum=momentum, weight_decay=1e-3, mode="classical",
                sparsity=0.0, cycle=100)
    run(models[0], sgd, data[:1])
    run(models[1], qode, data[:1])              # step 0 reads the cycle's first loss (once per cycle)
    n_sgd = _syncs(lambda: run(models[0], sgd, data[1:]))
    n_qode = _syncs(lambda: run(models[1], qode, data[1:]))
    assert n_sgd == 0 and n_qode <= n_sgd
    assert torch.equal(flat(models[0]), flat(models[1]))


def test_masked_skip_keeps_weights_and_momentum_then_matches_sgd():
    data = batches(6)
    model, ref = tiny_mlp(4), tiny_mlp(4)
    opt = QODE(model.parameters(), lr=0.05, momentum=0.9, mode="classical", sparsity=0.0, cycle=100)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    run(model, opt, data[:3])
    run(ref, sgd, data[:3])
    before = flat(model).clone()
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    X, Y = data[3]
    opt.step(closure_for(model, opt, X * float("nan"), Y))      # masked on the device
    assert torch.equal(flat(model), before)
    assert all(torch.equal(opt.state[p]["momentum_buffer"], b) for p, b in zip(model.parameters(), bufs))
    run(model, opt, data[4:])
    run(ref, sgd, data[4:])
    assert torch.equal(flat(model), flat(ref))
    rep = opt.reports[0]
    assert rep.skipped_steps == 1 and any("update skipped" in f for f in rep.faults)


@pytest.mark.parametrize("kw", [dict(momentum=0.9), dict(momentum=0.9, nesterov=True, weight_decay=1e-3),
                                dict(momentum=0.5, dampening=0.3), dict(momentum=0.0, weight_decay=1e-3)])
def test_the_foreach_path_is_sgds_foreach_bit_for_bit_masked_and_sync_free(kw):
    """SGD's foreach path (its default on CUDA) masked on the device: bit-identical to
    ``SGD(foreach=True)``, a non-finite step skipped, no host sync (checked here on the CPU)."""
    data = batches(7)
    model, ref = tiny_mlp(6), tiny_mlp(6)
    opt = QODE(model.parameters(), lr=0.05, mode="classical", sparsity=0.0, cycle=100, **kw)
    opt.param_groups[0]["foreach"] = True
    sgd = torch.optim.SGD(ref.parameters(), lr=0.05, foreach=True, **kw)
    run(model, opt, data[:2])
    run(ref, sgd, data[:2])
    assert opt._masked.path(torch.tensor(1.0), list(model.parameters()), opt.param_groups[0]) == "foreach"
    assert torch.equal(flat(model), flat(ref))
    before = flat(model).clone()
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()] if kw["momentum"] else []
    X, Y = data[2]
    opt.step(closure_for(model, opt, X * float("inf"), Y))
    assert torch.equal(flat(model), before)
    assert all(torch.equal(opt.state[p]["momentum_buffer"], b) for p, b in zip(model.parameters(), bufs))
    assert _syncs(lambda: run(model, opt, data[3:])) == 0
    run(ref, sgd, data[3:])
    assert torch.equal(flat(model), flat(ref))
    assert opt.reports[0].skipped_steps == 1


def test_sgds_default_path_is_followed_on_every_device(monkeypatch):
    """Where SGD would pick ``foreach`` by itself (CUDA), so does the masked update; fused (set on the
    group) and sparse gradients keep the synchronous check."""
    import torch.optim.optimizer as optim_mod
    from torch_qode.training.classical import MaskedSGD
    model = tiny_mlp(1)
    params = list(model.parameters())
    X, Y = batches(1)[0]
    F.mse_loss(model(X), Y).backward()
    group = dict(foreach=None, fused=None)
    loss = torch.tensor(1.0)
    assert MaskedSGD.path(loss, params, group) == "single"              # CPU: SGD's single-tensor path
    assert MaskedSGD.path(loss, params, dict(group, foreach=True)) == "foreach"
    assert MaskedSGD.path(loss, params, dict(group, fused=True)) is None
    assert MaskedSGD.path(1.0, params, group) is None                    # a float loss: read on the host
    sparse = [p.grad.to_sparse() if i == 0 else p.grad for i, p in enumerate(params)]
    assert MaskedSGD.path(loss, params, group, sparse) is None
    seen = []
    monkeypatch.setattr(optim_mod, "_default_to_fused_or_foreach",
                        lambda ps, differentiable, use_fused: seen.append(len(ps)) or (False, True))
    meta = torch.device("meta")
    monkeypatch.setattr(torch.Tensor, "device", property(lambda t: meta))   # as if not on the CPU
    monkeypatch.setattr(torch.Tensor, "is_cpu", property(lambda t: False))
    assert MaskedSGD.path(loss, params, group) == "foreach" and seen == [len(params)]


@pytest.mark.parametrize("dtype,foreach", [(torch.float32, None), (torch.float64, None), (torch.float32, True)])
@pytest.mark.parametrize("kw", [dict(momentum=0.9), dict(momentum=0.8, weight_decay=1e-3, dampening=0.2)])
def test_the_flat_momentum_path_is_sgds_bit_for_bit_with_a_skip_and_a_resume(dtype, foreach, kw):
    """Heavy-ball momentum with the buffers as views of one block: the masks run once per step on the
    block (two ``where`` for any number of tensors), every number is SGD's, a non-finite step keeps
    weights and buffers, and a ``state_dict`` resume (buffers loaded as new tensors) continues bit for bit."""
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(37, 13), torch.nn.Tanh(), torch.nn.Linear(13, 5),  # noqa: E731
                                       torch.nn.Tanh(), torch.nn.Linear(5, 1)).to(dtype)
    model, ref = make(), make()
    ref.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 37, generator=g, dtype=dtype), torch.randn(16, 1, generator=g, dtype=dtype))
            for _ in range(12)]
    opt = QODE(model.parameters(), lr=0.05, mode="classical", sparsity=0.0, cycle=100, **kw)
    opt.param_groups[0]["foreach"] = foreach          # True: SGD's foreach path (its CUDA default)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.05, foreach=foreach, **kw)
    run(model, opt, data[:3])
    run(ref, sgd, data[:3])
    assert torch.equal(flat(model), flat(ref))
    buf = opt._masked._flat[0]
    assert all(opt.state[p]["momentum_buffer"].untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
               for p in model.parameters())
    wheres = lambda: sum(e.count for e in prof.key_averages() if e.key == "aten::where")  # noqa: E731
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(model, opt, data[3:4])
    run(ref, sgd, data[3:4])
    assert wheres() == 2                               # for all 6 tensors
    before = flat(model).clone()
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    X, Y = data[4]
    opt.step(closure_for(model, opt, X * float("nan"), Y))
    assert torch.equal(flat(model), before)
    assert all(torch.equal(opt.state[p]["momentum_buffer"], b) for p, b in zip(model.parameters(), bufs))
    run(model, opt, data[5:8])
    run(ref, sgd, data[5:8])
    assert torch.equal(flat(model), flat(ref))
    sd = copy.deepcopy(opt.state_dict())
    again = make()
    again.load_state_dict(model.state_dict())
    opt2 = QODE(again.parameters(), lr=0.05, mode="classical", sparsity=0.0, cycle=100, **kw)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["foreach"] == foreach
    run(again, opt2, data[8:])
    run(model, opt, data[8:])
    run(ref, sgd, data[8:])
    assert torch.equal(flat(model), flat(ref)) and torch.equal(flat(again), flat(ref))
    assert opt.reports[0].skipped_steps == 1


def test_above_the_flat_limit_the_per_tensor_path_runs(monkeypatch):
    from torch_qode.training.classical import MaskedSGD
    monkeypatch.setattr(MaskedSGD, "FLAT_MAX", 10)
    data = batches(6)
    model, ref = tiny_mlp(4), tiny_mlp(4)
    opt = QODE(model.parameters(), lr=0.05, momentum=0.9, mode="classical", sparsity=0.0, cycle=100)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    run(model, opt, data)
    run(ref, sgd, data)
    assert opt._masked._flat is None and torch.equal(flat(model), flat(ref))


def test_skipped_steps_are_counted_on_the_device_and_read_once():
    """Masked steps count their skips on the device; the count is read with the reports, once."""
    data = batches(2)
    model = tiny_mlp(4)
    opt = QODE(model.parameters(), lr=0.05, momentum=0.9, mode="classical", sparsity=0.0, cycle=100)
    X, Y = data[0]
    bad = {1, 3, 4, 7}
    for k in range(9):
        opt.step(closure_for(model, opt, X * float("nan") if k in bad else X, Y))
    assert torch.isfinite(flat(model)).all()
    rep = opt.reports[0]                           # reading the reports reads the device count
    assert rep.skipped_steps == len(bad) and any("steps 0..8" in f and "(4 steps)" in f for f in rep.faults)
    opt.step(closure_for(model, opt, X, Y))
    assert opt.reports[0].skipped_steps == len(bad)  # counted once


# ------------------------------------------------------------------------------ Optimizer contract
def test_tensor_lr_is_accepted_and_kept_as_sgd_does():
    data = batches(4)
    m1, m2 = tiny_mlp(2), tiny_mlp(2)
    lr1, lr2 = torch.tensor(0.1), torch.tensor(0.1)
    opt = QODE(m1.parameters(), lr=lr1, mode="classical", sparsity=0.0)
    sgd = torch.optim.SGD(m2.parameters(), lr=lr2)
    assert opt.param_groups[0]["lr"] is lr1
    run(m1, opt, data[:2])
    run(m2, sgd, data[:2])
    lr1.fill_(0.02)                               # an in-place change reaches both optimizers
    lr2.fill_(0.02)
    run(m1, opt, data[2:])
    run(m2, sgd, data[2:])
    assert torch.equal(flat(m1), flat(m2))
    QODE(tiny_mlp().parameters(), lr=torch.tensor([1.0]), mode="classical", sparsity=0.0)  # shape [1], as SGD
    with pytest.raises(ValueError, match="lr must be a finite number"):
        QODE(tiny_mlp().parameters(), lr=torch.tensor([-1.0]))


def test_state_dict_is_deterministic():
    data = batches(8)
    sds = []
    for _ in range(2):
        model = tiny_mlp(5)
        opt = QODE(model.parameters(), momentum=0.5, **WINDOW)
        run(model, opt, data)
        assert opt.reports[0].seconds > 0             # timing stays in the reports …
        sds.append(opt.state_dict())
    assert _same(sds[0], sds[1])                      # … and out of the state
    assert "seconds" not in sds[0]["qode"]["reports"][0]


def test_momentum_zero_keeps_no_per_parameter_state():
    model = tiny_mlp(1)
    opt = QODE(model.parameters(), momentum=0.0, **{**WINDOW, "lr": 0.05})
    run(model, opt, batches(7))
    assert len(opt.state) == 0 and len(opt.state_dict()["state"]) == 0


def test_momentum_buffers_restart_after_a_quantum_window():
    data = batches(7)
    model = tiny_mlp(6)
    opt = QODE(model.parameters(), momentum=0.9, **WINDOW)
    run(model, opt, data[:6])                      # 2 classical steps, the upload, a 3-step window
    assert opt.reports[0].mode == "quantum" and not opt.in_quantum_window
    assert all("momentum_buffer" not in opt.state.get(p, {}) for p in model.parameters())
    ref = tiny_mlp(6)
    with torch.no_grad():
        for q, p in zip(ref.parameters(), model.parameters()):
            q.copy_(p)
    sgd = torch.optim.SGD(ref.parameters(), lr=WINDOW["lr"], momentum=0.9)   # a fresh start
    run(model, opt, data[6:])
    run(ref, sgd, data[6:])
    assert torch.equal(flat(model), flat(ref))


# ---------------------------------------------------------------------------------- solver_options
def test_solver_options_and_the_deprecated_kappa_a():
    data = batches(8)
    outs = []
    for kw in (dict(solver_options={"kappa_a": 2.0}), dict(kappa_a=2.0)):
        model = tiny_mlp(0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt = QODE(model.parameters(), lr=0.5, mode="quantum", cycle=8, classical_steps=1, sparsity=0.0,
                       solver="filtered", **kw)
        deprecated = [w for w in caught if issubclass(w.category, DeprecationWarning)]
        assert bool(deprecated) == ("kappa_a" in kw)
        if deprecated:
            assert "solver_options={'kappa_a': 2.0}" in str(deprecated[0].message)
        assert opt.kappa_a == 2.0 and opt.solver_options == {"kappa_a": 2.0}
        run(model, opt, data)
        outs.append((flat(model), opt.state_dict()))
    assert torch.equal(outs[0][0], outs[1][0])
    old = outs[1][1]                               # a state saved with kappa_a= loads into the new spelling
    opt = QODE(tiny_mlp(0).parameters(), lr=0.5, mode="quantum", cycle=8, classical_steps=1, sparsity=0.0,
               solver="filtered", solver_options={"kappa_a": 2.0})
    opt.load_state_dict(old)
    with pytest.raises(ValueError, match="solver_options"):
        QODE(tiny_mlp().parameters(), solver="forward", solver_options={"tol": 1})
    with pytest.raises(ValueError, match="kappa_a"):
        QODE(tiny_mlp().parameters(), solver="filtered", solver_options={})


# -------------------------------------------------------------------------------- the comm seam
class RecordingComm(Comm):
    """A 'distributed' comm in one process: identities that count the calls."""

    local = False

    def __init__(self):
        self.calls = {"reduce_hvp": 0, "agree": 0, "broadcast": 0, "any": 0}

    def reduce_hvp(self, v):
        self.calls["reduce_hvp"] += 1
        return v

    def agree(self, verdict):
        self.calls["agree"] += 1
        return verdict

    def broadcast(self, value):
        self.calls["broadcast"] += 1
        return value

    def any(self, flag):
        self.calls["any"] += 1
        return bool(flag)


@pytest.mark.parametrize("explicit", [True, False])
def test_every_collective_passes_through_the_comm(explicit):
    data = batches(12)
    outs = []
    for comm in (None, RecordingComm()):
        model = tiny_mlp(7)
        opt = QODE(model.parameters(), **{**WINDOW, "mode": "auto"}, explicit=explicit, shots=1000, comm=comm)
        run(model, opt, data)
        outs.append(flat(model))
    assert isinstance(QODE(tiny_mlp().parameters()).comm, LocalComm)
    assert torch.equal(outs[0], outs[1])
    calls = comm.calls
    windows = sum(r.mode == "quantum" for r in opt.reports)
    # one verdict per upload, one more per window decided at its first new batch (the predicted criterion)
    assert windows >= 1 and calls["agree"] == 2 + windows and calls["broadcast"] == windows
    assert calls["reduce_hvp"] > 0 and calls["any"] >= 2 * 4
    with pytest.raises(TypeError, match="comm"):
        QODE(tiny_mlp().parameters(), comm="gloo")


# ------------------------------------------------------------------------------- CarlemanState
def test_dense_levels_steps_as_the_system_and_round_trips():
    g = torch.Generator().manual_seed(0)
    n = 3
    F1 = -0.1 * torch.eye(n, dtype=torch.float64)
    F2 = 0.01 * torch.randn(n, n * n, generator=g, dtype=torch.float64)
    sys_ = carleman(PolynomialODE([torch.ones(n, dtype=torch.float64), F1, F2]), 2, "discrete")
    state = DenseLevels.zeros(sys_)
    y = torch.zeros(sys_.dim, dtype=torch.float64)
    for t in range(4):
        state.advance(sys_, t)
        y = sys_.step(y, t)
    assert torch.equal(state.y, y) and torch.equal(state.level1(), y[:n])
    back = state_from_dict(state.state_dict())
    assert isinstance(back, DenseLevels) and torch.equal(back.y, state.y) and back.nbytes == 8 * sys_.dim
    with pytest.raises(ValueError, match="kind"):
        state_from_dict({"kind": "factored-nowhere"})


# ------------------------------------------------------------------------------------ the monitor
def test_monitor_records_the_last_point_of_the_proxy_curve():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    X, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    mon = DissipationMonitor(model, F.cross_entropy, (X, y), lr=2.0, window=8, schedule=[0],
                             check=DissipationCheck(cutoff=0.01))
    rec = mon.step(0)
    curve = np.asarray(rec["proxy_curve"])
    assert len(curve) >= 2 and curve[-1] != curve[-2]
    assert rec["proxy_T"] == float(curve[-1])

    class Verdict:
        passed, reason, top_eigenvalue, positive_fraction = True, "ok", 1.0, 1.0
        proxy = [1.0, 0.75, 0.5]

    assert mon.on_upload(3, Verdict())["proxy_T"] == 0.5
