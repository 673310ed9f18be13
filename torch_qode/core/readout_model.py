"""The expected error of :func:`~torch_qode.core.tomography.tomography`, and the shots a target needs.

With ``p_a = v_a² / ||v||²`` and the stage budgets ``S_s`` (support), ``S_h`` (signs), ``S_n`` (norm) of
the readout's split, the expected squared relative error is modelled as the sum of

- **support and magnitudes**: ``|v̂_a| / ||v|| = sqrt(c_a / S_s)`` with ``c_a ≈ Poisson(λ_a = S_s p_a)``:
  ``E(sqrt(c_a/S_s) − sqrt(p_a))² = g(λ_a) / S_s``, ``g(λ) = 2λ − 2 sqrt(λ) E[sqrt(c)]``; a never-seen
  component (``c_a = 0``, Eq. II.123's coupon collector) is the ``λ e^{−λ}`` part of it;
- **signs**: ``4 p_a`` times the probability that an observed component's sign reads wrong, from the
  sign scheme's own model (:meth:`~torch_qode.core.readout.base.SignScheme.sign_error`);
- **norm**: the success-probability estimate of stage 4, ``(1 − q) / (4 q S_n)`` with ``q = (||v||/α)²``.

The model is checked against simulated readouts in ``tests/core/test_tomography.py``: at the shots
:func:`shots_for_error` names for 10 %, the measured error is within a tenth of 10 %; at 30× fewer or
more shots ``"hadamard"`` stays within 20 % of the measurement and ``"pairs"`` (a normal approximation
of its pair counts) within 35 %.
"""
from __future__ import annotations

import functools
import math
from typing import Mapping, Optional

import numpy as np

from .._checks import check_real
from .readout import SIGN_SCHEMES
from .tomography import _allocate, _as_vector, _check_shots, _check_split, _pow2_ceil

__all__ = ["expected_relative_error", "shots_for_error"]

_LAM = np.geomspace(1e-8, 64.0, 1200)     # g(λ) tabulated below λ = 64; beyond, its expansion


@functools.lru_cache(maxsize=None)
def _g_table() -> np.ndarray:
    """``g`` at ``_LAM``, computed on first use: ``scipy.stats`` costs 0.35 s to import (issue 19)."""
    import scipy.stats

    c = np.arange(0, 200)
    pmf = scipy.stats.poisson.pmf(c[None, :], _LAM[:, None])
    return 2 * _LAM - 2 * np.sqrt(_LAM) * (pmf * np.sqrt(c)).sum(axis=1)


def _g(lam: np.ndarray) -> np.ndarray:
    """``E(sqrt(c) − sqrt(λ))²`` for ``c ~ Poisson(λ)``: ``2λ`` for small λ, ``1/4 + 7/(64λ)`` for large."""
    out = np.interp(np.log(np.maximum(lam, 1e-300)), np.log(_LAM), _g_table())
    small, large = lam < _LAM[0], lam > _LAM[-1]
    out[small] = 2 * lam[small]
    out[large] = 0.25 + 7 / (64 * lam[large])
    return out


def expected_relative_error(v, shots: int, *, sign_method: str = "hadamard", split: Optional[Mapping] = None,
                            norm=None, norm_scale: Optional[float] = None) -> float:
    """The modelled ``E||v̂ − v|| / ||v||`` (root of the expected square) of ``tomography(v, shots,
    sign_method=..., split=..., norm=..., norm_scale=...)`` (no ``top_r``); O(r) work."""
    values, _ = _as_vector(v)
    vals = np.asarray(values, dtype=np.float64)
    vals = vals[vals != 0]
    if vals.size == 0 or not np.all(np.isfinite(vals)):
        raise ValueError("v must be finite and not all zero")
    shots = _check_shots(shots)
    if shots is None:
        return 0.0
    scheme = SIGN_SCHEMES.lookup(sign_method, "sign_method")()
    measured = norm is None
    budget, _ = _allocate(shots, ["support", "signs"] + (["norm"] if measured else []), _check_split(split))
    true_norm = float(np.linalg.norm(vals))
    w = vals[np.argsort(-np.abs(vals), kind="stable")] / true_norm
    p = w * w
    lam = budget["support"] * p
    err2 = float(_g(lam).sum()) / budget["support"]
    err2 += float((4 * p * -np.expm1(-lam) * scheme.sign_error(w, budget["signs"])).sum())
    if measured:
        alpha = norm_scale if norm_scale is not None else _pow2_ceil(true_norm)
        q = min(1.0, (true_norm / alpha) ** 2)
        err2 += (1 - q) / (4 * q * budget["norm"])
    return math.sqrt(err2)


def shots_for_error(v, target: float = 0.1, **kwargs) -> int:
    """The fewest shots (to 1 %) at which :func:`expected_relative_error` reaches ``target``
    (``kwargs`` as there)."""
    target = check_real(target, "target", 0.0, low_open=True)
    lo, hi = 3, 3
    while expected_relative_error(v, hi, **kwargs) > target:
        lo, hi = hi, hi * 4
        if hi > 10**18:
            raise ValueError(f"no shot count up to 1e18 reaches relative error {target}")
    while hi > lo * 1.01 + 1:
        mid = int(math.sqrt(lo * hi))
        lo, hi = (lo, mid) if expected_relative_error(v, mid, **kwargs) <= target else (mid, hi)
    return int(hi)
