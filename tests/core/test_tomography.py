"""Simulated sparse-state tomography (torch_qode.core.tomography; paper Sec. II D, Eq. II.121–II.123)."""
import math
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from torch_qode.core.tomography import (DEFAULT_SPLIT, coupon_collector_expected_draws, coupon_cost,
                                   shadow_cost, tomography)
from torch_qode.core.tomography import _pow2_ceil, qubits


def sparse_vector(n, r, seed, low=0.1, high=1.0):
    """n-vector with r non-zeros of magnitude in [low, high] and random signs."""
    rng = np.random.default_rng(seed)
    v = np.zeros(n)
    idx = rng.choice(n, r, replace=False)
    v[idx] = rng.uniform(low, high, r) * rng.choice([-1.0, 1.0], r)
    return v


# ------------------------------------------------------------------------------ exact readout
def test_exact_readout_reproduces_v_numpy_and_torch():
    v = sparse_vector(50, 7, 0)
    res = tomography(v, shots=None)
    assert isinstance(res.estimate, np.ndarray) and res.estimate.dtype == np.float64
    np.testing.assert_array_equal(res.estimate, v)
    assert res.relative_error == 0 and res.missed_mass == 0 and res.sign_errors == 0
    assert res.norm_source == "exact" and res.shots["total"] == 0
    assert math.isinf(res.shadow_cost) and res.eps_source == "achieved"
    np.testing.assert_array_equal(res.support, np.flatnonzero(v))

    vt = torch.tensor(v, dtype=torch.float32)
    rt = tomography(vt, shots=None)
    assert isinstance(rt.estimate, torch.Tensor) and rt.estimate.dtype == torch.float64
    assert rt.estimate.device == vt.device
    assert torch.equal(rt.estimate, vt.double())


def test_exact_readout_with_given_norm_and_top_r():
    v = np.array([0.0, 3.0, -4.0, 0.0, 1.0, -1.0])
    res = tomography(v, shots=None, norm=10.0)
    assert res.norm_source == "given"
    np.testing.assert_allclose(res.estimate, v * 10.0 / np.linalg.norm(v))
    top = tomography(v, shots=None, top_r=3)
    # the three largest |v_a|: 4, 3, then the tie 1 = |-1| goes to the lower index 4
    np.testing.assert_array_equal(top.support, [1, 2, 4])
    np.testing.assert_array_equal(top.estimate, [0, 3, -4, 0, 1, 0])
    assert top.pruned_mass == pytest.approx(1 / 27)
    assert top.relative_error == pytest.approx(1 / math.sqrt(27))


# ------------------------------------------------------------------------------ finite shots
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), r_frac=st.floats(0.01, 1.0), shots=st.integers(3, 10**7),
       seed=st.integers(0, 2**32 - 1), top=st.one_of(st.none(), st.integers(1, 20)),
       norm=st.sampled_from([None, "exact", 2.5]), method=st.sampled_from(["pairs", "hadamard"]))
def test_properties(n, r_frac, shots, seed, top, norm, method):
    r = max(1, int(r_frac * n))
    v = sparse_vector(n, r, seed, low=1e-3)
    top = None if top is None else min(top, n)
    res = tomography(v, shots, seed=seed, top_r=top, norm=norm, sign_method=method)
    assert res.sign_method == method and (res.reference is None) == (method == "hadamard")
    truth = set(np.flatnonzero(v))
    # never a component outside the true support; zero off the support
    assert set(res.support.tolist()) <= truth
    assert np.all(np.diff(res.support) > 0)
    off = np.ones(n, bool)
    off[res.support] = False
    assert np.all(res.estimate[off] == 0)
    if top is not None:
        assert res.support.size <= top
    # shots accounting adds up
    s = res.shots
    assert s["support"] + s["magnitudes"] + s["signs"] + s["norm"] == s["total"] == shots
    assert s["support"] >= 1 and s["signs"] >= 1 and (s["norm"] >= 1) == (norm is None)
    # masses: observed + missed + pruned = 1
    p = v**2 / np.sum(v**2)
    assert res.missed_mass + res.pruned_mass + p[res.support].sum() == pytest.approx(1.0)
    assert res.relative_error == pytest.approx(np.linalg.norm(res.estimate - v) / np.linalg.norm(v))
    assert 0 <= res.sign_errors <= res.support.size
    if res.norm > 0:     # a measured norm can read 0 with very few norm shots
        assert res.sign_errors == int(np.sum(np.sign(res.estimate[res.support]) != np.sign(v[res.support])))


def test_seeded_runs_are_reproducible():
    v = sparse_vector(200, 30, 1)
    a, b = tomography(v, 5000, seed=7), tomography(v, 5000, seed=7)
    np.testing.assert_array_equal(a.estimate, b.estimate)
    assert a.as_dict(arrays=False) == b.as_dict(arrays=False)
    c = tomography(v, 5000, seed=np.random.default_rng(7))
    np.testing.assert_array_equal(a.estimate, c.estimate)
    assert not np.array_equal(a.estimate, tomography(v, 5000, seed=8).estimate)


@pytest.mark.parametrize("method", ["pairs", "hadamard"])
def test_relative_error_falls_like_inverse_sqrt_shots(method):
    # r = 8 comparable components: already at 10^3 shots every component is seen
    # (P(miss) < e^-13) and every sign right (pair SNR ≥ 3.3); the error is then the shot noise
    # of the magnitudes and of the norm, both ∝ shots^-1/2.  Median over 24 seeds at 4 decades:
    # each log-median has a spread of ~0.1, so the fitted slope's standard error is ~0.02;
    # the ±0.08 tolerance is 4 standard errors.
    v = sparse_vector(64, 8, 3, low=0.8, high=1.2)
    levels = np.array([10**3, 10**4, 10**5, 10**6])
    med = [np.median([tomography(v, int(s), seed=k, sign_method=method).relative_error
                      for k in range(24)]) for s in levels]
    slope = np.polyfit(np.log(levels), np.log(med), 1)[0]
    assert slope == pytest.approx(-0.5, abs=0.08), (slope, med)


@pytest.mark.parametrize("method, few_shots, many_shots", [("pairs", 10**4, 10**9),
                                                         ("hadamard", 300, 10**6)])
def test_sign_errors_vanish_with_shots(method, few_shots, many_shots):
    v = sparse_vector(500, 50, 4, low=0.1, high=1.0)
    few = [tomography(v, few_shots, seed=k, sign_method=method).sign_errors for k in range(5)]
    many = [tomography(v, many_shots, seed=k, sign_method=method) for k in range(5)]
    assert sum(few) > 0
    assert [m.sign_errors for m in many] == [0] * 5
    assert all(m.relative_error < 0.05 for m in many)


def test_hadamard_signs_need_fewer_shots_than_pairs():
    # pairs: a component of weight p_a needs ~1/p_a pair shots of its own (O(r²) in all);
    # hadamard: one hit on a settles its sign (O(r log r), like the support)
    v = sparse_vector(2000, 200, 12)
    pairs = sum(tomography(v, 10**5, seed=k, sign_method="pairs").sign_errors for k in range(3))
    had = sum(tomography(v, 10**5, seed=k, sign_method="hadamard").sign_errors for k in range(3))
    assert had < pairs / 5, (had, pairs)


def test_missed_components_read_zero_and_mass_is_reported():
    v = np.zeros(100)
    v[:3] = [1.0, 1.0, 1e-4]          # p of the tiny one: 5e-9
    res = tomography(v, 1000, seed=0)
    np.testing.assert_array_equal(res.support, [0, 1])
    assert res.estimate[2] == 0
    assert res.missed_mass == pytest.approx(1e-8 / (2 + 1e-8))


def test_norm_modes():
    v = sparse_vector(100, 10, 5)
    true = np.linalg.norm(v)
    given_ = tomography(v, 10**4, seed=0, norm=2.5)
    # with every observed count kept, Σ |v̂_a|² = norm² exactly
    assert given_.norm_source == "given" and given_.shots["norm"] == 0
    assert np.linalg.norm(given_.estimate) == pytest.approx(2.5)
    exact = tomography(v, 10**4, seed=0, norm="exact")
    assert exact.norm_source == "exact" and exact.norm == true
    measured = [tomography(v, 10**5, seed=k) for k in range(20)]
    assert all(m.norm_source == "measured" and m.shots["norm"] == 10**4 for m in measured)
    norms = np.array([m.norm for m in measured])
    # P = (||v||/α)² ∈ (1/4, 1]: std of the norm estimate ≤ α·sqrt(P(1−P)/S)/(2 sqrt P)
    assert abs(norms.mean() - true) < 4 * true * 0.01 / math.sqrt(20)
    big = tomography(v, 10**5, seed=0, norm_scale=100 * true)
    assert big.norm_source == "measured"


def test_pow2_ceil_and_qubits():
    assert [_pow2_ceil(x) for x in (0.3, 0.5, 1.0, 3.0, 4.0, 4.1)] == [0.5, 0.5, 1.0, 4.0, 4.0, 8.0]
    assert [qubits(n) for n in (1, 2, 3, 4, 5, 1024, 1025)] == [1, 1, 2, 2, 3, 10, 11]


def test_top_r_keeps_largest_observed_counts():
    v = sparse_vector(300, 40, 6)
    full = tomography(v, 3000, seed=11)
    top = tomography(v, 3000, seed=11, top_r=10)   # same support-stage draws (first draw)
    mags = np.abs(full.estimate[full.support])
    order = np.lexsort((full.support, -mags))
    np.testing.assert_array_equal(top.support, np.sort(full.support[order[:10]]))
    assert top.pruned_mass > 0 and top.coupon_cost == coupon_cost(10)


def test_split_and_costs():
    v = sparse_vector(1024, 16, 8)
    res = tomography(v, 1000, seed=0, split={"signs": 1.0, "norm": 1.0, "support": 2.0}, eps=0.1)
    assert res.shots == {"support": 500, "magnitudes": 0, "signs": 250, "norm": 250, "total": 1000}
    assert res.m == 10 and res.r == 16
    assert res.coupon_cost == pytest.approx(16 * sum(1 / k for k in range(1, 17)))
    assert res.shadow_cost == pytest.approx(100 * 16**3 / 0.01)
    assert res.eps_source == "requested" and res.shadow_eps == 0.1
    no_norm = tomography(v, 1000, seed=0, norm="exact")
    frac = DEFAULT_SPLIT["support"] / (DEFAULT_SPLIT["support"] + DEFAULT_SPLIT["signs"])
    assert no_norm.shots["norm"] == 0 and no_norm.shots["support"] == round(1000 * frac)
    assert "rel_err" in str(res) and "estimate" not in res.as_dict(arrays=False)


def test_sampler_cost_does_not_grow_with_shots():
    # An O(shots) sampler would need minutes for 10^12 shots; the multinomial is O(r).
    v = sparse_vector(10**5, 1000, 9)
    t0 = time.perf_counter()
    res = tomography(v, 10**12, seed=0)
    assert time.perf_counter() - t0 < 30.0          # a guard against O(shots), not a timing: ~0.1 s here
    assert res.relative_error < 1e-3 and res.sign_errors == 0


# ------------------------------------------------------------------------------ coupon collector
@pytest.mark.parametrize("r", [1, 2, 3, 10, 1000, 10**4])
def test_coupon_integral_uniform_equals_r_harmonic(r):
    exact = r * sum(1.0 / k for k in range(1, r + 1))
    assert coupon_cost(r) == pytest.approx(exact, rel=1e-12)
    assert coupon_collector_expected_draws(np.full(r, 1.0 / r)) == pytest.approx(exact, rel=1e-8)


def test_coupon_integral_closed_forms():
    # two coupons: E = 1/p + 1/q − 1/(p+q); three: inclusion–exclusion over subsets
    for p in (0.5, 0.3, 0.01):
        q = 1 - p
        assert coupon_collector_expected_draws([p, q]) == pytest.approx(1 / p + 1 / q - 1, rel=1e-9)
    a, b, c = 0.5, 0.3, 0.2
    e3 = 1 / a + 1 / b + 1 / c - 1 / (a + b) - 1 / (a + c) - 1 / (b + c) + 1
    assert coupon_collector_expected_draws([5, 3, 2, 0]) == pytest.approx(e3, rel=1e-9)  # unnormalised, zero dropped
    assert coupon_collector_expected_draws(torch.tensor([1.0])) == 1.0


def test_coupon_integral_matches_monte_carlo():
    p = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
    rng = np.random.default_rng(0)
    trials, length = 20000, 600                    # P(some coupon unseen after 600) < 1e-12
    draws = rng.choice(p.size, size=(trials, length), p=p)
    first = np.stack([np.argmax(draws == a, axis=1) for a in range(p.size)], axis=1)
    assert np.all(np.any(draws == p.size - 1, axis=1))
    samples = first.max(axis=1) + 1.0
    se = samples.std() / math.sqrt(trials)
    assert abs(samples.mean() - coupon_collector_expected_draws(p)) < 4 * se


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0.01, 1.0), min_size=1, max_size=30))
def test_coupon_uniform_is_the_minimum(w):
    assert coupon_collector_expected_draws(w) >= coupon_cost(len(w)) * (1 - 1e-8)


def test_coupon_large_nonuniform_is_fast_and_finite():
    w = np.random.default_rng(0).uniform(0.5, 1.5, 10**4)
    t0 = time.perf_counter()
    e = coupon_collector_expected_draws(w)
    assert time.perf_counter() - t0 < 60.0          # a guard against O(r²) or worse, not a timing
    assert coupon_cost(10**4) < e < 3 * coupon_cost(10**4)


def test_shadow_cost():
    assert shadow_cost(4, 16, 0.5) == 16 * 64 / 0.25
    assert shadow_cost(4, 1, 1.0) == 64     # m = max(1, ceil(log2 1)) = 1
    assert math.isinf(shadow_cost(4, 16, 0.0)) and shadow_cost(0, 16, 0.1) == 0
    with pytest.raises(ValueError, match="eps"):
        shadow_cost(4, 16, -1.0)


# ------------------------------------------------------------------------------ bad input
V = np.array([0.0, 1.0, -2.0, 0.5])


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(shots=0), ValueError, "shots"),
    (dict(shots=-5), ValueError, "shots"),
    (dict(shots=10.5), ValueError, "shots"),
    (dict(shots=float("inf")), ValueError, "shots"),
    (dict(shots="100"), TypeError, "shots"),
    (dict(shots=True), TypeError, "shots"),
    (dict(shots=2), ValueError, "shots"),                     # 3 stages need 3 shots
    (dict(shots=100, top_r=0), ValueError, "top_r"),
    (dict(shots=100, top_r=5), ValueError, "top_r"),           # n = 4
    (dict(shots=100, top_r=2.0), TypeError, "top_r"),
    (dict(shots=100, top_r=True), TypeError, "top_r"),
    (dict(shots=100, norm="approx"), ValueError, "norm"),
    (dict(shots=100, norm=-1.0), ValueError, "norm"),
    (dict(shots=100, norm=float("nan")), ValueError, "norm"),
    (dict(shots=100, norm=[1.0]), TypeError, "norm"),
    (dict(shots=100, norm_scale=1.0), ValueError, "norm_scale"),   # ||V|| ≈ 2.29
    (dict(shots=100, norm=2.0, norm_scale=4.0), ValueError, "norm_scale"),
    (dict(shots=None, norm_scale=4.0), ValueError, "norm_scale"),
    (dict(shots=100, eps=0.0), ValueError, "eps"),
    (dict(shots=100, split={"tails": 1.0}), ValueError, "split"),
    (dict(shots=100, split={"signs": -1.0}), ValueError, "split"),
    (dict(shots=100, split=[0.5, 0.5]), TypeError, "split"),
    (dict(shots=100, sign_method="shadow"), ValueError, "sign_method"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        tomography(V, **kwargs)


@pytest.mark.parametrize("v, exc", [
    (np.array([0.0, np.nan, 1.0]), ValueError),
    (np.array([0.0, np.inf]), ValueError),
    (torch.tensor([1.0, float("nan")]), ValueError),
    (np.zeros(5), ValueError),
    (np.ones((2, 3)), ValueError),
    (np.array(1.0), ValueError),
    (np.zeros(0), ValueError),
    (np.array([1 + 1j, 0]), TypeError),
    (torch.tensor([1 + 1j]), TypeError),
    (np.array(["a", "b"]), TypeError),
    (torch.tensor([True, False]), TypeError),
])
def test_bad_vectors(v, exc):
    with pytest.raises(exc, match="v"):
        tomography(v, shots=100)


@pytest.mark.parametrize("p, exc", [
    ([0.5, -0.1], ValueError), ([0.0, 0.0], ValueError), ([[0.5, 0.5]], ValueError),
    ([np.nan, 1.0], ValueError), ("ab", TypeError)])
def test_coupon_bad_input(p, exc):
    with pytest.raises(exc, match="p"):
        coupon_collector_expected_draws(p)


# ------------------------------------------------------------------ pair-sign ties (issue 10)
def test_pair_with_zero_shots_reads_plus():
    """Documented: a pair with 0 shots (a 0:0 tie) reads "+" relative to the reference.

    Ten equal positive components, 1 sign shot: the global test gets it and all nine pairs get 0
    shots.  With equal magnitudes a pair can never land on "−", so every sign is "+" exactly when
    ties read "+"; reading them "−" makes sign errors whatever the global test says.
    """
    v = np.ones(10)
    res = tomography(v, 1000, seed=0, norm="exact", split={"support": 1.0, "signs": 0.002})
    assert res.shots["signs"] == 1 and res.support.size == 10
    assert res.sign_errors == 0
    assert np.all(res.estimate > 0)


def test_pair_signs_ties_read_plus_directly():
    from torch_qode.core.readout import pair_signs

    w = np.array([0.6, 0.5, 0.4, 0.3])
    w = w / np.linalg.norm(w)
    for seed in range(5):
        signs = pair_signs(np.random.default_rng(seed), w, w.copy(), 1)   # pairs 1..3 get 0 shots
        np.testing.assert_array_equal(signs, np.ones(4))


# ------------------------------------------------------------------------- the readout error model
@pytest.mark.parametrize("sign_method", ["hadamard", "pairs"])
@pytest.mark.parametrize("kind", ["gauss", "heavy"])
def test_error_model_names_the_shots_that_give_ten_percent(sign_method, kind):
    """At the shots shots_for_error names for 10 %, simulated readouts measure 10 % (within a tenth);
    at 30× fewer or more shots the model follows the measurement (hadamard within 20 %; pairs, a normal
    approximation of its pair counts, within 35 %)."""
    from torch_qode.core.readout_model import expected_relative_error, shots_for_error

    rng = np.random.default_rng(3)
    v = rng.normal(size=1500) if kind == "gauss" else rng.standard_t(3, size=1500)
    need = shots_for_error(v, 0.1, sign_method=sign_method)
    assert expected_relative_error(v, need, sign_method=sign_method) <= 0.1 \
        < expected_relative_error(v, int(need * 0.97), sign_method=sign_method)
    errs = [tomography(v, need, seed=s, sign_method=sign_method).relative_error for s in range(6)]
    assert 0.09 < np.mean(errs) < 0.11, errs
    for shots in (need // 30, need * 30):
        model = expected_relative_error(v, shots, sign_method=sign_method)
        meas = np.mean([tomography(v, shots, seed=s, sign_method=sign_method).relative_error for s in range(3)])
        assert abs(model - meas) < (0.2 if sign_method == "hadamard" else 0.35) * meas, (shots, model, meas)


def test_error_model_explains_the_default_change():
    """Issue 13: a 2,000-component vector at 10⁶ shots reads with ~0.87 error by pairs, ~0.035 by hadamard."""
    from torch_qode.core.readout_model import expected_relative_error

    v = np.random.default_rng(0).normal(size=2000)
    had, pairs = (expected_relative_error(v, 10**6, sign_method=m) for m in ("hadamard", "pairs"))
    assert 0.025 < had < 0.05 and 0.7 < pairs < 1.0
    assert expected_relative_error(v, 10**6, norm="exact") < had      # no norm stage, less error
    assert expected_relative_error(v, None) == 0.0


def test_a_sign_scheme_without_an_error_model_says_so():
    from torch_qode.core.readout import SignScheme

    with pytest.raises(NotImplementedError, match="has no error model"):
        SignScheme().sign_error(np.ones(3) / np.sqrt(3), 10)
