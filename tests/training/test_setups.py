"""Real training setups (issue 13): attention layers with their default kernels, a compiled model, a
graph without double backward, retry after a failed upload, readout defaults and their warning,
``step()`` without a closure and a closure without ``backward``."""
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from torch_qode import QODE, DissipationCheck, decomposed_norms, hessian_spectrum, tomography
from torch_qode.bridge.kernels import KERNELS, double_backward_kernels, missing_double_backward
from torch_qode.training.config import READOUT_WARN_ERROR

CYCLE = dict(mode="quantum", cycle=4, classical_steps=1, sparsity=0.0)


class Attention(nn.Module):
    """``nn.MultiheadAttention`` on its scaled-dot-product path (``need_weights=False``), then a head."""

    def __init__(self, d=8):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0])


def encoder(d=8):
    return nn.Sequential(nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True), nn.Linear(d, 1))


def _data(seed=1, n=4, L=5, d=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, L, d, generator=g, dtype=torch.float64),
             torch.randn(n, L, 1, generator=g, dtype=torch.float64)) for _ in range(3)]


def _train(make, steps, outer=None, decompose=False, **kw):
    torch.manual_seed(0)
    model = make().double()
    opt = QODE(model.parameters(), lr=0.05, model=model, **{**CYCLE, **kw})
    data = _data()
    ctx = outer() if outer is not None else None
    if ctx is not None:
        ctx.__enter__()
    try:
        for k in range(steps):
            x, y = data[k % len(data)]

            def closure():
                opt.zero_grad()
                if decompose:
                    with decomposed_norms(model, update_running_stats=True):
                        loss = (model(x) - y).pow(2).mean()
                else:
                    loss = (model(x) - y).pow(2).mean()
                loss.backward()
                return loss
            opt.step(closure)
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    return model, opt


def _hvp_through(model, x):
    params = list(model.parameters())
    g = torch.autograd.grad(model(x).pow(2).mean(), params, create_graph=True)
    return torch.autograd.grad(sum(gi.sum() for gi in g), params)


@pytest.mark.parametrize("make", [encoder, Attention], ids=["TransformerEncoderLayer", "MultiheadAttention"])
def test_default_attention_has_no_double_backward_outside_the_kernels_context(make):
    model = make().double()
    x = _data()[0][0]
    with pytest.raises(RuntimeError, match="derivative for .*attention.* is not implemented") as err:
        _hvp_through(model, x)
    assert "attention" in missing_double_backward(err.value) and "classically" in missing_double_backward(err.value)
    with double_backward_kernels():
        assert all(torch.isfinite(h).all() for h in _hvp_through(model, x))


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("make", [encoder, Attention], ids=["TransformerEncoderLayer", "MultiheadAttention"])
def test_attention_windows_run_with_default_attention(make, order):
    """Quantum windows with the default attention, equal (1e-12) to the same run inside an explicit
    sdpa_kernel(MATH): only the upload's kernels change, and they change nothing numerically."""
    kw = dict(carleman_order=order, decompose=order == 2 and make is encoder)
    model, opt = _train(make, 8, **kw)
    ref, ref_opt = _train(make, 8, outer=lambda: sdpa_kernel(SDPBackend.MATH), **kw)
    assert opt.step_count == 8 and not opt.in_quantum_window
    for rep in opt.reports:
        assert rep.mode == "quantum", rep.reason
        assert rep.carleman["kernels"] == KERNELS
        assert rep.carleman["state"] == ("factored" if order == 2 else "dense")
        assert not rep.faults
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    assert [r.mode for r in ref_opt.reports] == [r.mode for r in opt.reports]


@pytest.mark.parametrize("training", [True, False])
def test_hessian_spectrum_of_a_transformer_in_train_and_eval_mode(training):
    """hessian_spectrum (and so DissipationMonitor) runs attention on the math kernel; in eval mode
    the encoder's inference fast path stays off because the parameters require grad."""
    model = encoder().double().train(training)
    x, y = _data()[0]
    spec = hessian_spectrum(model, lambda out, t: (out - t).pow(2).mean(), (x, y), steps=8, trace=False)
    with sdpa_kernel(SDPBackend.MATH):
        ref = hessian_spectrum(model, lambda out, t: (out - t).pow(2).mean(), (x, y), steps=8, trace=False)
    np.testing.assert_allclose(spec.top_eigenvalues, ref.top_eigenvalues, rtol=1e-10)
    assert model.training is training


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1)).double()


def test_a_compiled_mlp_trains_quantum_windows_like_the_eager_one():
    """backend="aot_eager": inductor on CPU compiles for ~20 s; the double-backward refusal is aot_autograd's
    either way, and running the upload eagerly is what makes windows work."""
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randn(12, 1, generator=g,
                                                                               dtype=torch.float64)) for _ in range(3)]
    runs = []
    for compiled in (True, False):
        model = _mlp()
        fwd = torch.compile(model, backend="aot_eager") if compiled else model
        opt = QODE(model.parameters(), lr=0.05, **CYCLE)
        for k in range(8):
            x, y = data[k % 3]

            def closure():
                opt.zero_grad()
                loss = (fwd(x) - y).pow(2).mean()
                loss.backward()
                return loss
            opt.step(closure)
        runs.append((model, opt))
        if compiled:
            with pytest.raises(RuntimeError, match="double backward|donated buffers") as err:
                _hvp_through(fwd, data[0][0])
            assert "torch.compile" in missing_double_backward(err.value)
    (model, opt), (ref, _) = runs
    assert [r.mode for r in opt.reports] == ["quantum", "quantum"]
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def _bn_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))


def _bn_run(compiled: bool, steps: int = 8, pass_model: bool = True, **kw):
    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(6, 1, 6, 6, generator=g), torch.randint(0, 2, (6,), generator=g)) for _ in range(steps)]
    model = _bn_cnn()
    fwd = torch.compile(model, backend="aot_eager") if compiled else model
    opt = QODE(model.parameters(), lr=0.05, model=fwd if pass_model else None, seed=0, **CYCLE, **kw)
    for x, y in data:
        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(fwd(x), y)
            loss.backward()
            return loss
        opt.step(closure)
    return model, opt


@pytest.mark.parametrize("hvp", ["auto", "retain", "recompute"])
def test_a_compiled_batchnorm_cnn_trains_quantum_windows_bit_for_bit_like_the_eager_one(hvp):
    """The compiled forward updates BatchNorm's running statistics with copy_ (a version bump eager
    BatchNorm's kernel does not make); the retained graph holds the upload's buffers as snapshots, so
    every window runs to its end, equal to eager bit for bit: weights, running statistics, counters."""
    (model, opt), (ref, ref_opt) = _bn_run(True, hvp=hvp), _bn_run(False, hvp=hvp)
    assert [r.mode for r in opt.reports] == ["quantum", "quantum"] and not any(r.faults for r in opt.reports)
    for a, b in zip(list(model.parameters()) + list(model.buffers()), list(ref.parameters()) + list(ref.buffers())):
        assert torch.equal(a, b)
    assert [r.loss_last for r in opt.reports] == [r.loss_last for r in ref_opt.reports]


def test_a_compiled_batchnorm_window_without_model_raises_once_and_the_next_cycle_runs():
    """Without model= QODE cannot know the buffers: the compiled forward's write fails the next product,
    the window ends at θ0 with the fault and the error propagates once; the optimizer is not stuck:
    the window's other steps and the next cycle's train."""
    g = torch.Generator().manual_seed(5)
    model = _bn_cnn()
    fwd = torch.compile(model, backend="aot_eager")
    opt = QODE(model.parameters(), lr=0.05, seed=0, hvp="retain", **CYCLE)
    failed = []
    for k in range(8):
        x, y = torch.randn(6, 1, 6, 6, generator=g), torch.randint(0, 2, (6,), generator=g)

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(fwd(x), y)
            loss.backward()
            return loss
        theta0 = opt._win.theta0.clone() if opt.in_quantum_window else None
        try:
            opt.step(closure)
        except RuntimeError as exc:
            failed.append(k)
            assert "modified by an inplace operation" in str(exc) and not opt.in_quantum_window
            assert torch.equal(torch.cat([p.detach().flatten() for p in model.parameters()]), theta0)
    assert failed == [2, 7] and opt.step_count == 6   # a step that raised was not taken
    for rep in opt.reports:
        assert rep.mode == "classical" and "aborted at t=1: a window product failed" in rep.reason
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _flash_closure(opt, model, x, y, calls):
    def closure():
        calls.append(1)
        opt.zero_grad()
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):   # the user forces a kernel without double backward
            loss = (model(x) - y).pow(2).mean()
        loss.backward()
        return loss
    return closure


def test_a_graph_without_double_backward_trains_the_window_classically_with_the_reason():
    """After the failed upload the state is that of a classical step: SGD's update applied, reason
    recorded, no window open, the next step runs (and the next window tries again)."""
    x, y = _data()[0]
    torch.manual_seed(0)
    model = Attention().double()
    torch.manual_seed(0)
    ref = Attention().double()
    opt = QODE(model.parameters(), lr=0.05, **CYCLE)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.05)
    calls = []
    for k in range(5):
        opt.step(_flash_closure(opt, model, x, y, calls))
        sgd.zero_grad()
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            (ref(x) - y).pow(2).mean().backward()
        sgd.step()
        assert not opt.in_quantum_window and opt.step_count == k + 1
    rep = opt.reports[0]
    assert rep.mode == "classical"
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward has no double backward" in rep.reason
    assert "fix:" in rep.reason and any("upload failed" in f for f in rep.faults)
    assert rep.carleman is None and rep.dissipation is None      # nothing of the failed window is left
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


class Flaky:
    """A closure that raises on its ``fail_at``-th call (counting from 1), once."""

    def __init__(self, opt, model, batches, fail_at):
        self.opt, self.model, self.batches, self.fail_at, self.calls = opt, model, batches, fail_at, 0
        self.batch = None

    def __call__(self):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("interrupted inside the closure")
        self.opt.zero_grad()
        x, y = self.batch
        loss = (self.model(x) - y[..., 0]).pow(2).mean()
        loss.backward()
        return loss


class FlakyCheck(DissipationCheck):
    """A dissipation check (user code run after the upload's closure) that raises on its first call."""

    def __init__(self, fail: bool):
        super().__init__()
        self.fail = fail

    def __call__(self, *args, **kwargs):
        if self.fail:
            self.fail = False
            raise KeyboardInterrupt("interrupted inside the dissipation check")
        return super().__call__(*args, **kwargs)


@pytest.mark.parametrize("where", ["closure", "after-closure"])
def test_retry_after_an_upload_raised_is_the_run_that_never_failed(where):
    """The upload's closure raises (call 2; call 1 is the classical step), or user code after it does
    (a dissipation check, once the Taylor expansion is built): either way the optimizer is as before
    the step, and a retry is exactly the run that never failed."""
    data = _data()

    def run(fail):
        model = _mlp_seq()
        opt = QODE(model.parameters(), lr=0.05, track_sgd=True, **{**CYCLE, "mode": "auto"},
                   dissipation=FlakyCheck(fail and where == "after-closure"))
        fl = Flaky(opt, model, data, 2 if fail and where == "closure" else -1)
        failed = 0
        for k in range(8):
            fl.batch = data[k % 3]
            try:
                opt.step(fl)
            except KeyboardInterrupt:
                failed += 1
                assert not opt.in_quantum_window and opt.step_count == k == 1
                rep = opt.reports[0]
                assert rep.mode == "pending" and rep.carleman is None and rep.support_size is None
                assert rep.dissipation is None and not rep.faults
                opt.step(fl)                      # the retry
        assert failed == int(fail)
        return model, opt

    model, opt = run(True)
    ref, ref_opt = run(False)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    assert [_state(r) for r in opt.reports] == [_state(r) for r in ref_opt.reports]
    assert opt.reports[0].support_size == 281


def _state(rep):
    """A report's state without the check's wall-clock seconds."""
    d = rep.state()
    if d["dissipation"] is not None:
        d["dissipation"].pop("seconds", None)
    return d


def _mlp_seq():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(1), nn.Linear(40, 6), nn.Tanh(), nn.Linear(6, 5)).double()


# ------------------------------------------------------------------------------------------ readout
def test_readout_defaults_to_hadamard_and_pairs_stays_available():
    v = np.random.default_rng(0).normal(size=300)
    assert tomography(v, 10**5, seed=0).sign_method == "hadamard"
    assert tomography(v, 10**5, seed=0, sign_method="pairs").sign_method == "pairs"
    model = _mlp()
    assert QODE(model.parameters(), shots=10**5).cfg.readout_options()["sign_method"] == "hadamard"
    opt = QODE(model.parameters(), shots=10**5, tomography_kwargs={"sign_method": "pairs"})
    assert opt.cfg.readout_options()["sign_method"] == "pairs"


def _windows(shots, steps=8, **kw):
    model = _mlp_seq()
    opt = QODE(model.parameters(), lr=0.05, shots=shots, **{**CYCLE, **kw})
    data = _data(L=8, d=5)
    for k in range(steps):
        x, y = data[k % 3]

        def closure():
            opt.zero_grad()
            loss = (model(x)[..., :1] - y[:, :1, :1].squeeze(-1)).pow(2).mean()
            loss.backward()
            return loss
        opt.step(closure)
    return model, opt


@pytest.mark.parametrize("readout", ["weights", "displacement"])
@pytest.mark.parametrize("sign_method", ["hadamard", "pairs"])
def test_too_few_shots_warn_once_naming_the_shots_that_give_ten_percent(sign_method, readout):
    with pytest.warns(UserWarning, match="cannot resolve") as rec:
        _, opt = _windows(2000, tomography_kwargs={"sign_method": sign_method}, readout=readout)
    msgs = [str(w.message) for w in rec if "cannot resolve" in str(w.message)]
    assert len(msgs) == 1 and len(opt.reports) == 2 and all(r.mode == "quantum" for r in opt.reports)
    assert f"sign_method={sign_method!r}" in msgs[0] and f"readout={readout!r}" in msgs[0]
    need = int(re.search(r"about shots=([\d,]+) give 10%", msgs[0]).group(1).replace(",", ""))
    assert need > 2000
    # the named shots really give about 10 % on the vector the first window reads, as the upload knows it:
    # θ0 on S = all weights, or the first-order displacement T·F0(0) = −T·η·∇L_0(θ0) (u(T) comes later)
    model, _ = _windows(None, steps=1)
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    vec = theta0
    if readout == "displacement":
        x, y = _data(L=8, d=5)[1]
        model.zero_grad()
        (model(x)[..., :1] - y[:, :1, :1].squeeze(-1)).pow(2).mean().backward()
        vec = -(CYCLE["cycle"] - CYCLE["classical_steps"]) * 0.05 * torch.cat([p.grad.reshape(-1)
                                                                               for p in model.parameters()])
    errs = [tomography(vec, need, seed=s, sign_method=sign_method).relative_error for s in range(8)]
    assert 0.8 * READOUT_WARN_ERROR < np.mean(errs) < 1.2 * READOUT_WARN_ERROR


def test_enough_shots_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, opt = _windows(10**8)
    assert opt.reports[0].tomography["relative_error"] < READOUT_WARN_ERROR


# ------------------------------------------------------------------------------------------ closures
def test_step_without_a_closure_at_the_upload_explains_the_two_line_fix():
    opt = QODE(_mlp().parameters(), sparsity=0.0, mode="auto", cycle=4, classical_steps=0)
    with pytest.raises(TypeError, match=r"step 0 is the upload .*needs a closure .* as torch.optim.LBFGS") as err:
        opt.step()
    assert "def closure(): opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); return loss\n" \
           "    opt.step(closure)" in str(err.value)
    assert opt.step_count == 0 and not opt.reports          # nothing happened: not even the download


@pytest.mark.parametrize("classical_steps", [2, 0], ids=["classical-steps-first", "first-step-upload"])
def test_a_closure_without_backward_is_caught_at_the_first_step_that_needs_one(classical_steps):
    """Classical steps take a closure that only returns the loss, as SGD does (the gradients in
    ``.grad``: none here, so nothing moves); the upload needs the backward, and says so."""
    model = _mlp()
    x = torch.randn(6, 5, dtype=torch.float64)
    opt = QODE(model.parameters(), lr=0.05, mode="auto", cycle=4, classical_steps=classical_steps, sparsity=0.0)
    before = [p.detach().clone() for p in model.parameters()]

    def forgot():
        opt.zero_grad()
        return model(x).pow(2).mean()
    for _ in range(classical_steps):
        opt.step(forgot)
    assert opt.step_count == classical_steps
    with pytest.raises(RuntimeError, match=r"the closure did not call loss.backward\(\)"):
        opt.step(forgot)
    assert opt.step_count == classical_steps and not opt.in_quantum_window
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))

    def fixed():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss
    opt.step(fixed)
    assert opt.step_count == classical_steps + 1
