"""Issue 20, item 1: quantum mode never poisons a model.  A window whose read-out is non-finite or whose
displacement explodes is rejected at the finish's ``guard`` stage (θ0 kept, one warning per reason, the
reason and fault in the report); a model whose weights are already non-finite warns instead of skipping
every later step in silence."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from torch_qode.training.qode import QODE

T = 100


class DoubleWell(nn.Module):
    """``L(x) = Σ −x²/2 + x⁴/4`` at x ≈ 1e-3: the Hessian is ≈ −1, so at lr 0.5 the linearised window
    grows by 1.5 per step (1.5¹⁰⁰ ≈ 4e17), while SGD itself settles in the wells at ±1."""

    def __init__(self, x0: float = 1e-3):
        super().__init__()
        self.x = nn.Parameter(torch.full((4,), x0, dtype=torch.float64))

    def loss(self) -> torch.Tensor:
        return (-0.5 * self.x ** 2 + 0.25 * self.x ** 4).sum()


def _closure(model, opt):
    def closure():
        opt.zero_grad()
        loss = model.loss()
        loss.backward()
        return loss
    return closure


def _run(steps: int, **kw):
    model = DoubleWell()
    opt = QODE(model.parameters(), lr=0.5, mode="quantum", cycle=T + 1, classical_steps=1, sparsity=0.0,
               shots=None, **kw)
    before, after = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            before.append(model.x.detach().clone())
            opt.step(_closure(model, opt))
            after.append(model.x.detach().clone())
            assert torch.isfinite(model.x).all()         # NaN never reaches the model
    return opt, before, after, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


@pytest.mark.parametrize("noise", ["stream", "frozen"])
def test_an_exploding_window_is_rejected_theta0_kept_and_warned_once(noise):
    opt, before, after, warned = _run(2 * (T + 1), noise=noise)
    for cyc, rep in enumerate(opt.reports[:2]):
        upload = cyc * (T + 1) + 1                       # the step after the one classical step
        end = upload + T - 1                             # the window's last step (t = 0 is the upload's)
        assert rep.mode == "classical" and "window rejected" in rep.reason, rep.reason
        assert len(rep.faults) == 1 and rep.faults[0].startswith(f"step {end}: the window would move the weights")
        assert torch.equal(after[end], before[upload])   # θ0 back, bit for bit
    rejected = [w for w in warned if "window rejected" in w]
    assert len(rejected) == 1 and "max_displacement" in rejected[0], warned


def test_without_the_guard_the_same_window_writes_the_explosion_back():
    """The guard is what keeps θ0: with max_displacement=None the window's ‖u(T)‖ ~ 1e14 reaches the model."""
    opt, before, after, warned = _run(T + 1, max_displacement=None)
    assert opt.reports[0].mode == "quantum" and not opt.reports[0].faults
    assert float((after[T] - before[1]).norm()) > 1e10
    assert not [w for w in warned if "window rejected" in w]


def test_a_dissipative_window_passes_the_guard():
    """The same optimizer on the convex well (x near 1: Hessian ≈ 2): ‖u(T)‖ ≤ Σ‖F0‖, nothing rejected."""
    model = DoubleWell(x0=1.2)
    opt = QODE(model.parameters(), lr=0.1, mode="quantum", cycle=21, classical_steps=1, sparsity=0.0, shots=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for _ in range(21):
            opt.step(_closure(model, opt))
    assert opt.reports[0].mode == "quantum" and not opt.reports[0].faults
    assert abs(float(model.x[0].detach()) - 1.0) < 0.05


def test_a_model_already_non_finite_warns_instead_of_skipping_in_silence():
    model = DoubleWell()
    opt = QODE(model.parameters(), lr=0.1, mode="quantum", cycle=4, classical_steps=1, sparsity=0.0, shots=None)
    with torch.no_grad():
        model.x[0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(12):
            opt.step(_closure(model, opt))
    msgs = [str(w.message) for w in caught if "parameters are not finite" in str(w.message)]
    assert len(msgs) == 1 and msgs[0].startswith("QODE: step 1:"), msgs
    assert sum(r.skipped_steps for r in opt.reports) == 12


def test_uploads_non_finite_in_a_row_warn_once_naming_the_count():
    """Finite weights, a loss that is NaN at every upload: after 3 skipped uploads in a row, one warning."""
    model = DoubleWell()
    opt = QODE(model.parameters(), lr=0.1, mode="quantum", cycle=2, classical_steps=1, sparsity=0.0, shots=None)
    calls = [0]

    def closure():
        opt.zero_grad()
        calls[0] += 1
        loss = model.loss() * (float("nan") if opt.step_count % 2 == 1 else 1.0)
        loss.backward()
        return loss
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(10):
            opt.step(closure)
    msgs = [str(w.message) for w in caught if "uploads in a row" in str(w.message)]
    assert msgs == ["QODE: step 5: 3 uploads in a row had a non-finite loss or gradient and were skipped "
                    "(see CycleReport.skipped_steps and faults)"], msgs
    assert torch.isfinite(model.x).all()
