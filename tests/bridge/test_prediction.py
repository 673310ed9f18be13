"""Issue 22: the window's predicted linearisation error (torch_qode/bridge/prediction.py) and the check's
``"predicted"`` criterion, against closed forms and explicit matrix powers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_qode.bridge.dissipation import CRITERIA, DissipationCheck, Probe, Verdict
from torch_qode.bridge.prediction import (SPECTRUM_STEPS, Prediction, error_curve, krylov_path, power_law, predict,
                                          rounded)

DT = torch.float64


def _spd(n, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    return Q @ torch.diag(torch.linspace(lo, hi, n, dtype=DT)) @ Q.T


def _cubic(n=8, c=0.3, seed=0):
    """``L(θ) = ½θᵀAθ − bᵀθ + (c/6) Σ θ_i³``: ``∇L = Aθ − b + (c/2)θ²``, ``∇³L[u, u] = c·u²`` (F2 known)."""
    A = _spd(n, 0.1, 1.5, seed)
    g = torch.Generator().manual_seed(seed + 1)
    b, th0 = torch.randn(n, generator=g, dtype=DT), 0.3 * torch.randn(n, generator=g, dtype=DT)
    grad = (lambda th: A @ th - b + 0.5 * c * th ** 2)
    return A + c * torch.diag(th0), grad, th0


def test_krylov_path_is_the_frozen_f0_recurrence():
    """u(t) = Σ_{s<t} (I − ηA)^s F0: exact with a full Krylov space, exact up to t = m with m steps."""
    A = _spd(12, -0.2, 2.0, 3)
    f0 = torch.randn(12, generator=torch.Generator().manual_seed(4), dtype=DT)
    lr, T = 0.3, 15
    ref, u = [torch.zeros(12, dtype=DT)], torch.zeros(12, dtype=DT)
    for _ in range(T):
        u = u + f0 - lr * A @ u
        ref.append(u)
    full = krylov_path(lambda v: A @ v, f0, lr, T, 12)
    short = krylov_path(lambda v: A @ v, f0, lr, T, 4)
    for t in range(T + 1):
        assert torch.allclose(full.at(t), ref[t], rtol=1e-10, atol=1e-12), t
        assert full.norms[t] == pytest.approx(float(ref[t].norm()), rel=1e-10, abs=1e-12)
        if t <= 4:
            assert torch.allclose(short.at(t), ref[t], rtol=1e-10, atol=1e-12), t
    assert full.hvps == 12 and short.hvps == 4
    assert full.weights.sum() == pytest.approx(1.0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), lr=st.floats(0.05, 0.6), T=st.integers(1, 12))
def test_error_curve_carries_each_source_like_explicit_matrix_powers(seed, lr, T):
    """With a full quadrature of each source's direction, E(τ) is the norm of the sum of the sources carried
    by (I − ηA) — coherent for the remainder and the common half of the noise, in quadrature for the rest."""
    n = 5
    A = _spd(n, -0.1, 1.5, seed)
    g = torch.Generator().manual_seed(seed + 7)
    r, m = torch.randn(n, generator=g, dtype=DT), torch.randn(n, generator=g, dtype=DT)
    r, m = r / r.norm(), m / m.norm()
    D = torch.rand(T + 1, generator=g, dtype=DT).numpy()
    N = torch.rand(T + 1, generator=g, dtype=DT).numpy()
    s = np.linspace(0.0, 1.0, T + 1) + 0.1
    quad = [krylov_path(lambda x: A @ x, v, 0.0, 0, n) for v in (r, m)]
    got = error_curve(s, D, N, lr, *[(q.nodes, q.weights) for q in quad])
    P = torch.eye(n, dtype=DT) - lr * A
    for tau in range(T + 1):
        det = sum((torch.linalg.matrix_power(P, tau - 1 - t) @ r * D[t] for t in range(tau)), torch.zeros(n, dtype=DT))
        com = sum((torch.linalg.matrix_power(P, tau - 1 - t) @ m * N[t] for t in range(tau)), torch.zeros(n, dtype=DT))
        ind = sum(float((torch.linalg.matrix_power(P, tau - 1 - t) @ m * N[t]).norm()) ** 2 for t in range(tau))
        E = math.sqrt(float(det.norm()) ** 2 + 0.5 * float(com.norm()) ** 2 + 0.5 * ind)
        assert got[tau] == pytest.approx(E / s[tau], rel=1e-8, abs=1e-12), tau


def test_a_quadratic_loss_predicts_no_linearisation_error():
    """A quadratic loss is its own Taylor expansion: the remainder and (one batch) the noise vanish."""
    A, lr, T = _spd(10, 0.1, 2.0, 5), 0.2, 12
    b = torch.randn(10, generator=torch.Generator().manual_seed(6), dtype=DT)
    th0 = torch.zeros(10, dtype=DT)
    step = (lambda u: -lr * (A @ (th0 + u) - b))
    pred = predict(lambda v: A @ v, Probe(f0=step(torch.zeros(10, dtype=DT)), step=step), lr, T, 6)
    assert pred.pending and max(pred.rho) < 1e-13
    pred.complete(step, step(torch.zeros(10, dtype=DT)), hvp=lambda v: A @ v)
    assert max(pred.nu) < 1e-13 and float(np.max(pred.curve())) < 1e-12


@pytest.mark.parametrize("lr,T", [(0.1, 10), (0.3, 10)])
def test_a_cubic_loss_remainder_is_its_closed_form_and_the_order_2_term_removes_it(lr, T):
    """Order 1: ξ_0(u) = −η(c/2)u² exactly (a quadratic remainder: the half-way probe reads a quarter), and the
    full-batch prediction lands within 15% of the simulated error; order 2 with F2 = −(η/2)∇³L: no remainder."""
    c = 0.3
    H0, grad, th0 = _cubic(c=c)
    f0 = -lr * grad(th0)
    step = (lambda u: -lr * grad(th0 + u))
    pred = predict(lambda v: H0 @ v, Probe(f0=f0, step=step), lr, T, 8)
    uT = pred.points[0]                                       # u(T), kept until the first new batch
    assert pred.rho[0] == pytest.approx(lr * c / 2 * float((uT ** 2).norm()), rel=1e-9)
    assert pred.rho[0] / pred.rho[1] == pytest.approx(4.0, rel=1e-9)
    pred.complete(step, f0, hvp=lambda v: H0 @ v)                 # full batch: the same batch again
    w, u = torch.zeros(8, dtype=DT), torch.zeros(8, dtype=DT)
    for _ in range(T):
        w, u = w + step(w), u + f0 - lr * H0 @ u
    measured = float((u - w).norm() / w.norm())
    assert max(pred.nu) < 1e-12
    assert pred.curve()[-1] == pytest.approx(measured, rel=0.15)
    two = predict(lambda v: H0 @ v, Probe(f0=f0, step=step, higher=lambda u: -lr * c / 2 * u ** 2, degree=2),
                  lr, T, 8)
    assert max(two.rho) < 1e-13 * pred.rho[0] * 1e3 and two.third_order == 2


def test_the_noise_part_measures_the_curvature_between_two_batches():
    """Two batches whose Hessians differ by E: ν = η‖E u‖ at each probe, linear in u (half-way reads half)."""
    A, lr, T = _spd(10, 0.1, 1.0, 8), 0.1, 10
    E = 0.2 * _spd(10, -1.0, 1.0, 9)
    b = torch.randn(10, generator=torch.Generator().manual_seed(10), dtype=DT)
    step0 = (lambda u: -lr * (A @ u - b))
    step1 = (lambda u: -lr * ((A + E) @ u - b))
    pred = predict(lambda v: A @ v, Probe(f0=step0(0 * b), step=step0), lr, T, 6)
    pts = [u.clone() for u in pred.points]                     # u(T) and u(T)/2
    pred.complete(step1, step1(0 * b), hvp=lambda v: A @ v)
    for nu, u in zip(pred.nu, pts):
        assert nu == pytest.approx(lr * float((E @ u).norm()), rel=1e-9)
    assert pred.parts()["remainder"] < 1e-12 < pred.parts()["noise"]


def test_power_law_fits_the_two_probes_and_falls_back_to_the_nominal_power():
    r = np.array([0.5, 1.0, 2.0])
    assert np.allclose(power_law(r, 2.0, 8.0, 1.0, 2.0), [0.125, 1.0, 8.0])      # fitted q = 3
    assert np.allclose(power_law(r, 2.0, 8.0, None, 2.0), [0.5, 2.0, 8.0])       # nominal q = 2
    assert np.allclose(power_law(r, 2.0, 8.0, 8.0, 2.0), [2.0, 4.0, 8.0])        # q clipped at 1


def _check_on(hvp_scale=1.0, max_error=0.5, choose_T=False, T=10):
    H0, grad, th0 = _cubic()
    lr = 0.3
    step = (lambda u: -lr * grad(th0 + u))
    chk = DissipationCheck(max_error=max_error)
    v = chk(lambda x: hvp_scale * (H0 @ x), 8, lr=lr, T=T, probe=Probe(f0=step(0 * th0), step=step),
            choose_T=choose_T)
    assert v.pending and v.passed and v.reason.startswith("provisional")
    return chk, v, step


def test_the_verdict_and_the_window_length_do_not_move_with_round_off():
    """The verdict compares the prediction at two significant digits: a 1e-13 change in every product
    leaves passed, the chosen T and the reason as they were (issue 22: the proxy's fraction flipped)."""
    outs = []
    for scale in (1.0, 1.0 + 1e-13, 1.0 - 1e-13):
        for choose in (False, True):
            chk, v, step = _check_on(scale, max_error=0.2, choose_T=choose)
            chk.complete(v, step, step(torch.zeros(8, dtype=DT)), choose_T=choose)
            outs.append((choose, v.passed, v.T_chosen, v.reason, v.borderline))
    assert outs[0::2] == [outs[0]] * 3 and outs[1::2] == [outs[1]] * 3
    assert outs[1][2] is not None and 0 < outs[1][2] < 10
    assert rounded(0.5 + 1e-12) == rounded(0.5 - 1e-12) == 0.5


def test_choose_T_is_the_longest_prefix_within_max_error():
    chk, v, step = _check_on(max_error=0.2, choose_T=True)
    chk.complete(v, step, step(torch.zeros(8, dtype=DT)), choose_T=True)
    curve = v.prediction.curve()
    Tc = v.T_chosen
    assert all(rounded(float(curve[t])) <= 0.2 for t in range(1, Tc + 1))
    assert rounded(float(curve[Tc + 1])) > 0.2
    assert v.passed and f"T chosen {Tc} of 10" in v.reason
    assert v.as_dict()["T_chosen"] == Tc and v.as_dict()["predicted_error"] == curve.tolist()
    fixed_chk, fixed, step = _check_on(max_error=0.2)
    fixed_chk.complete(fixed, step, step(torch.zeros(8, dtype=DT)))
    assert not fixed.passed and fixed.reason.startswith("failed: predicted error")


def test_the_check_spends_at_most_its_bound():
    for T, max_steps in ((10, None), (25, 25), (90, 90), (4, 4)):
        H0, grad, th0 = _cubic(n=40 if T > 20 else 8)
        n = H0.shape[0]
        calls = [0]

        def hvp(x):
            calls[0] += 1
            return H0 @ x
        lr = 0.05
        step = (lambda u: -lr * grad(th0 + u))
        chk = DissipationCheck(max_error=1e9)
        v = chk(hvp, n, lr=lr, T=T, max_steps=max_steps, probe=Probe(f0=step(0 * th0), step=step))
        assert v.hvps == calls[0] - 0 and v.prediction.grads == 2
        chk.complete(v, step, step(0 * th0), hvp=hvp)
        assert v.hvps == calls[0] <= chk.max_hvps(T, max_steps) and v.prediction.grads == 4
        if T >= 25:                                 # at most about T/2 products (and four gradients)
            assert v.hvps <= T // 2 + 1
    assert SPECTRUM_STEPS == 3


def test_a_pending_verdict_survives_its_state_dict():
    chk, v, step = _check_on()
    sd = v.state_dict()
    buf = __import__("io").BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    back = Verdict.from_state_dict(torch.load(buf, weights_only=True))
    assert back.pending
    for x in (v, back):
        chk.complete(x, step, step(torch.zeros(8, dtype=DT)))
    assert back.as_dict() == {**v.as_dict(), "seconds": back.seconds}


def test_bad_input_names_the_argument():
    assert CRITERIA == ("predicted", "proxy")
    with pytest.raises(ValueError, match="criterion"):
        DissipationCheck(criterion="spectrum")
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="max_error"):
            DissipationCheck(max_error=bad)
    with pytest.raises(ValueError, match="probe"):
        DissipationCheck()(lambda v: v, 4, lr=0.1, T=3)


def test_a_zero_gradient_predicts_nothing_and_decides_at_the_upload():
    pred = predict(lambda v: v, Probe(f0=torch.zeros(4, dtype=DT), step=lambda u: 0 * u), 0.1, 5, 3)
    assert not pred.pending and pred.path.hvps == 0 and float(np.max(pred.curve())) == 0.0
    assert isinstance(pred, Prediction)


def test_a_float32_basis_predicts_what_the_float64_one_does():
    """A large model's path keeps its Lanczos vectors in float32 (the check's dtype above 1 GiB of basis)."""
    H0, grad, th0 = _cubic()
    lr, T = 0.3, 10
    step = (lambda u: -lr * grad(th0 + u))
    preds = [predict(lambda v: H0.to(v.dtype) @ v, Probe(f0=step(0 * th0), step=step), lr, T, 8, dtype=dt)
             for dt in (torch.float64, torch.float32)]
    assert preds[1].points[0].dtype == torch.float32 and preds[1].path.basis is None     # freed after the probes
    np.testing.assert_allclose(preds[1].path.norms, preds[0].path.norms, rtol=1e-4)
    np.testing.assert_allclose(preds[1].rho, preds[0].rho, rtol=1e-3)
