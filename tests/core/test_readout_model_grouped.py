"""Issue 20: the readout model's shot estimate groups the components once (O(n + groups·iterations))
and names the shots of the per-component model to within 1 %."""
from __future__ import annotations

import math

import numpy as np
import pytest

import torch_qode.core.readout_model as rm


def _reference_shots(v, target, sign_method):
    """The search before issue 20: bisect over every component's terms (the exact model)."""
    def err(shots):
        return rm.expected_relative_error(v, shots, sign_method=sign_method)

    lo, hi = 3, 3
    while err(hi) > target:
        lo, hi = hi, hi * 4
    while hi > lo * 1.01 + 1:
        mid = int(math.sqrt(lo * hi))
        lo, hi = (lo, mid) if err(mid) <= target else (mid, hi)
    return hi


def _vectors():
    rng3 = np.random.default_rng(3)       # the model-vs-simulation vectors of tests/core/test_tomography.py
    gauss, heavy = rng3.normal(size=1500), np.random.default_rng(3).standard_t(3, size=1500)
    rng = np.random.default_rng(7)
    wide = rng.lognormal(0, 4, size=20_000) * rng.choice([-1.0, 1.0], 20_000)   # p over ~30 decades
    sparse = np.zeros(30_000)
    sparse[rng.choice(30_000, 3000, replace=False)] = rng.normal(size=3000)
    ties = np.repeat([3.0, -1.0, 0.5], [10, 2000, 5000])                       # many equal |w|
    return {"gauss": gauss, "heavy": heavy, "wide": wide, "sparse": sparse, "ties": ties}


@pytest.mark.parametrize("sign_method", ["hadamard", "pairs"])
@pytest.mark.parametrize("name", ["gauss", "heavy", "wide", "sparse", "ties"])
def test_grouped_search_names_todays_shots_within_one_percent(monkeypatch, name, sign_method):
    v = _vectors()[name]
    monkeypatch.setattr(rm, "EXACT_BELOW", 10**12)          # every component's terms: today's model
    ref = _reference_shots(v, 0.1, sign_method)
    assert rm.shots_for_error(v, 0.1, sign_method=sign_method) == ref   # below the threshold: unchanged
    exact = [rm.expected_relative_error(v, s, sign_method=sign_method) for s in (ref // 30, ref, ref * 30)]
    monkeypatch.setattr(rm, "EXACT_BELOW", 0)               # grouped, whatever n
    got = rm.shots_for_error(v, 0.1, sign_method=sign_method)
    assert abs(got / ref - 1) <= 0.01, (got, ref)
    grouped = [rm.expected_relative_error(v, s, sign_method=sign_method) for s in (ref // 30, ref, ref * 30)]
    np.testing.assert_allclose(grouped, exact, rtol=1e-3)


def test_grouping_is_bounded_by_the_range_of_p_not_by_n():
    v = np.random.default_rng(0).normal(size=200_000)
    vals, norm = rm._components(v)
    terms = rm._grouped_terms(vals, norm)
    p = (vals / norm) ** 2
    p = np.delete(p, np.argmax(p))
    bound = 2 * (math.log(p.max() / p.min()) / rm.LOG_BIN_WIDTH + 1) + 1
    assert terms.w.size <= bound and terms.w.size < v.size / 10
    assert terms.k == v.size and float(terms.count.sum()) == v.size          # every component counted
    assert math.isclose(float((terms.p * terms.count).sum()), 1.0, rel_tol=1e-12)   # Σ p kept exactly
    assert abs(terms.w[0]) == np.abs(vals).max() / norm                      # the reference first


def test_search_work_is_n_plus_groups_times_iterations(monkeypatch):
    """A complexity guard that does not time: the per-component evaluation (``_g``) never sees the
    n-vector during the search, only the groups, and is called once per bisection iteration."""
    v = np.random.default_rng(1).normal(size=200_000)
    sizes = []
    g = rm._g

    def counting(lam):
        sizes.append(lam.size)
        return g(lam)

    monkeypatch.setattr(rm, "_g", counting)
    rm.shots_for_error(v, 0.1)
    groups = rm._grouped_terms(*rm._components(v)).w.size
    assert max(sizes) == groups < v.size / 10
    assert len(sizes) < 80                       # ~log4(shots) + log1.01-bisection iterations
    assert sum(sizes) <= 80 * groups


def test_below_the_threshold_the_model_is_todays_bit_for_bit():
    """Below EXACT_BELOW the error is the per-component sum in decreasing |w| order, as before."""
    v = np.random.default_rng(5).normal(size=3000)
    vals = v / np.linalg.norm(v)
    w = vals[np.argsort(-np.abs(vals), kind="stable")]
    from torch_qode.core.tomography import _allocate, _check_split, _pow2_ceil

    budget, _ = _allocate(10**6, ["support", "signs", "norm"], _check_split(None))
    p = w * w
    lam = budget["support"] * p
    err2 = float(rm._g(lam).sum()) / budget["support"]
    err2 += float((4 * p * -np.expm1(-lam) * np.where(w < 0, np.exp(-budget["signs"] * w * w), 0.0)).sum())
    norm = float(np.linalg.norm(v))
    q = min(1.0, (norm / _pow2_ceil(norm)) ** 2)
    err2 += (1 - q) / (4 * q * budget["norm"])
    assert rm.expected_relative_error(v, 10**6) == math.sqrt(err2)
