"""Mixed precision (issue 20): QODE's classical steps under ``torch.amp.GradScaler`` are SGD's under the
same scaler bit for bit (an inf step skipped); a quantum step refuses the scaler before changing
anything, naming the fix; bf16 autocast trains quantum windows with no scaler."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_qode import QODE

X, Y = torch.randn(16, 4, generator=torch.Generator().manual_seed(1)), torch.randn(16, 1)
SGD_KW = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def scaled_run(make_opt, steps=8, inf_at=(3,), clip=False):
    """``steps`` steps of the GradScaler recipe (scale, backward, [unscale_ + clip], step, update); the
    loss is multiplied by inf at the steps ``inf_at``."""
    model = mlp()
    opt = make_opt(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
    scales = []
    for k in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(model(X * (1 + 0.1 * k)), Y) * (float("inf") if k in inf_at else 1.0)
        scaler.scale(loss).backward()
        if clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return model, opt, scales


@pytest.mark.parametrize("clip", [False, True], ids=["scaled", "unscale_ then clip"])
def test_classical_steps_under_gradscaler_equal_sgd_bit_for_bit(clip):
    assert torch.amp.GradScaler("cpu").is_enabled()
    ref, sgd, ref_scales = scaled_run(lambda m: torch.optim.SGD(m.parameters(), **SGD_KW), clip=clip)
    model, opt, scales = scaled_run(lambda m: QODE(m.parameters(), mode="classical", sparsity=0.0, cycle=16,
                                                   **SGD_KW), clip=clip)
    assert scales == ref_scales and scales[3] == scales[2] / 2        # the inf step halved the scale
    for p, q in zip(ref.parameters(), model.parameters()):
        assert torch.equal(p, q) and torch.equal(p.grad, q.grad)
        assert torch.equal(sgd.state[p]["momentum_buffer"], opt.state[q]["momentum_buffer"])
    assert opt.reports[0].skipped_steps == 1 and "GradScaler found an inf" in opt.reports[0].faults[0]
    assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")


def test_without_the_skip_the_inf_step_would_have_changed_the_weights():
    """The comparison above can fail: SGD stepping the inf step's (unscaled, non-finite) gradients differs."""
    ref, _, _ = scaled_run(lambda m: torch.optim.SGD(m.parameters(), **SGD_KW))
    model = mlp()
    sgd = torch.optim.SGD(model.parameters(), **SGD_KW)
    for k in range(8):
        sgd.zero_grad()
        loss = F.mse_loss(model(X * (1 + 0.1 * k)), Y) * (float("inf") if k == 3 else 1.0)
        loss.backward()
        sgd.step()
    assert not all(torch.equal(p, q) for p, q in zip(ref.parameters(), model.parameters()))


@pytest.mark.parametrize("with_closure", [True, False])
def test_a_quantum_step_refuses_the_scaler_before_changing_anything(with_closure):
    model = mlp()
    opt = QODE(model.parameters(), lr=0.05, mode="quantum", cycle=4, classical_steps=1, sparsity=0.0)
    scaler = torch.amp.GradScaler("cpu")

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(X), Y)
        scaler.scale(loss).backward()
        return loss

    closure()
    scaler.step(opt)                              # step 0: classical, as SGD's
    scaler.update()
    closure()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="step 1 is the upload.*GradScaler.*bf16 autocast.*mode='classical'"):
        scaler.step(opt, closure) if with_closure else scaler.step(opt)
    assert opt.step_count == 1 and not opt.in_quantum_window
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    assert "found_inf" not in vars(opt) and "grad_scale" not in vars(opt)

    def plain():
        opt.zero_grad()
        loss = F.mse_loss(model(X), Y)
        loss.backward()
        return loss

    opt.step(plain)                               # without the scaler, the upload runs
    assert opt.in_quantum_window


def test_a_closure_at_a_classical_step_under_the_scaler_is_refused():
    model = mlp()
    opt = QODE(model.parameters(), lr=0.05, mode="classical", sparsity=0.0)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(F.mse_loss(model(X), Y)).backward()
    with pytest.raises(RuntimeError, match=r"scaler.scale\(loss\).backward\(\); scaler.step\(opt\)"):
        scaler.step(opt, lambda: None)


def test_bf16_autocast_trains_quantum_windows():
    model = mlp()
    opt = QODE(model.parameters(), lr=0.1, mode="quantum", cycle=4, classical_steps=1, sparsity=0.0)
    losses = []
    for _ in range(12):
        def closure():
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(X)
                assert out.dtype is torch.bfloat16
                loss = F.mse_loss(out, Y)
            loss.backward()
            return loss
        losses.append(float(opt.step(closure).detach()))
    assert [r.mode for r in opt.reports] == ["quantum"] * 3
    assert all(r.skipped_steps == 0 and not r.faults for r in opt.reports)
    assert losses[-1] < 0.9 * losses[0]
    assert all(torch.isfinite(p).all() and p.dtype is torch.float32 for p in model.parameters())
