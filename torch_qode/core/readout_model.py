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
from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np

from .._checks import check_real
from .readout import SIGN_SCHEMES
from .tomography import _allocate, _as_vector, _check_shots, _check_split, _pow2_ceil

__all__ = ["expected_relative_error", "shots_for_error", "EXACT_BELOW", "LOG_BIN_WIDTH"]

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


#: below this many non-zero components :func:`shots_for_error` evaluates every component's terms;
#: above it, the components are grouped by sign and by ``log p`` in bins of :data:`LOG_BIN_WIDTH`.
EXACT_BELOW = 65_536
#: width in ``ln p`` of one bin of the grouped model (a group's ``p`` spans 1 %; its terms use the
#: group's mean ``p``, exact for the terms linear in ``p`` and within ~1e-5 relative for the others)
LOG_BIN_WIDTH = 0.01


@dataclass
class _Terms:
    """The per-component inputs of the error model: ``w`` (signed, unit norm; ``w[0]`` the largest
    ``|w|``, the pairs scheme's reference), ``p = w²``, ``count`` (components each entry stands for;
    ``None``: one each), ``k`` (the non-zero components in all) and ``norm`` (``||v||``)."""

    w: np.ndarray
    p: np.ndarray
    count: Optional[np.ndarray]
    k: int
    norm: float


def _components(v) -> tuple:
    """The non-zero entries of ``v`` (float64) and ``||v||``; ``ValueError`` if none or not finite."""
    values, _ = _as_vector(v)
    vals = np.asarray(values, dtype=np.float64)
    vals = vals[vals != 0]
    if vals.size == 0 or not np.all(np.isfinite(vals)):
        raise ValueError("v must be finite and not all zero")
    return vals, float(np.linalg.norm(vals))


def _exact_terms(vals: np.ndarray, norm: float) -> _Terms:
    """One entry per component, in decreasing ``|w|`` (stable)."""
    w = vals[np.argsort(-np.abs(vals), kind="stable")] / norm
    return _Terms(w, w * w, None, int(w.size), norm)


def _grouped_terms(vals: np.ndarray, norm: float, width: float = LOG_BIN_WIDTH) -> _Terms:
    """The components grouped, O(n): the reference (largest ``|w|``, first occurrence) on its own, the
    others by sign and by ``floor(ln p / width)``; a group's entry is its mean ``p`` (``w`` with the
    group's sign) and ``count`` its size.  At most ``2·(ln(p_max/p_min)/width + 1) + 1`` entries."""
    ref = int(np.argmax(np.abs(vals)))
    w_all = vals / norm
    rest = np.delete(w_all, ref)
    p = rest * rest
    if p.size == 0:
        return _exact_terms(vals, norm)
    logp = np.log(np.maximum(p, np.finfo(np.float64).tiny))
    b = np.floor((logp - logp.min()) / width).astype(np.int64)
    nb = int(b.max()) + 1
    key = b + nb * (rest < 0)
    count = np.bincount(key, minlength=2 * nb).astype(np.float64)
    psum = np.bincount(key, weights=p, minlength=2 * nb)
    used = count > 0
    pm = psum[used] / count[used]
    sign = np.where(np.arange(2 * nb)[used] >= nb, -1.0, 1.0)
    w0 = w_all[ref]
    return _Terms(np.concatenate([[w0], sign * np.sqrt(pm)]), np.concatenate([[w0 * w0], pm]),
                  np.concatenate([[1.0], count[used]]), int(vals.size), norm)


def _terms(vals: np.ndarray, norm: float) -> _Terms:
    """Every component's terms below :data:`EXACT_BELOW` components, else the grouped ones."""
    return _exact_terms(vals, norm) if vals.size < EXACT_BELOW else _grouped_terms(vals, norm)


def _error2(terms: _Terms, shots: int, scheme, split, measured: bool, norm_scale: Optional[float]) -> float:
    """The modelled squared relative error of ``terms`` at ``shots`` (the module docstring's sum)."""
    budget, _ = _allocate(shots, ["support", "signs"] + (["norm"] if measured else []), _check_split(split))
    p, c = terms.p, terms.count
    lam = budget["support"] * p
    g = _g(lam)
    sign = 4 * p * -np.expm1(-lam) * scheme.sign_error(terms.w, budget["signs"], size=terms.k)
    if c is not None:
        g, sign = g * c, sign * c
    err2 = float(g.sum()) / budget["support"] + float(sign.sum())
    if measured:
        alpha = norm_scale if norm_scale is not None else _pow2_ceil(terms.norm)
        q = min(1.0, (terms.norm / alpha) ** 2)
        err2 += (1 - q) / (4 * q * budget["norm"])
    return err2


def expected_relative_error(v, shots: int, *, sign_method: str = "hadamard", split: Optional[Mapping] = None,
                            norm=None, norm_scale: Optional[float] = None) -> float:
    """The modelled ``E||v̂ − v|| / ||v||`` (root of the expected square) of ``tomography(v, shots,
    sign_method=..., split=..., norm=..., norm_scale=...)`` (no ``top_r``): every component's terms
    below :data:`EXACT_BELOW` non-zeros, else the grouped model (:func:`shots_for_error`; O(r) work)."""
    vals, true_norm = _components(v)
    shots = _check_shots(shots)
    if shots is None:
        return 0.0
    scheme = SIGN_SCHEMES.lookup(sign_method, "sign_method")()
    return math.sqrt(_error2(_terms(vals, true_norm), shots, scheme, split, norm is None, norm_scale))


def shots_for_error(v, target: float = 0.1, *, sign_method: str = "hadamard", split: Optional[Mapping] = None,
                    norm=None, norm_scale: Optional[float] = None) -> int:
    """The fewest shots (to 1 %) at which :func:`expected_relative_error` reaches ``target``.

    The components are prepared once: every component's terms below :data:`EXACT_BELOW` non-zeros
    (today's answer bit for bit), else grouped by sign and ``log p`` (:data:`LOG_BIN_WIDTH`: a few
    thousand entries whatever n), so the search costs O(n + groups·iterations) instead of
    O(n log n · iterations) (a 1.1M-entry vector: 23.5 s before, see ``benchmarks/readout_model.py``).

    Args:
        v: the vector the readout reads.
        target: the relative error to reach, > 0.
        sign_method: the sign scheme, as for :func:`~torch_qode.core.tomography.tomography`.
        split: the shares of the shots per stage, as for ``tomography``.
        norm: ``None`` (the norm is measured), ``"exact"`` or a known norm, as for ``tomography``.
        norm_scale: the block encoding's normalisation of the measured norm, as for ``tomography``.

    Returns:
        The shot count (within 1 % above the model's exact threshold).

    Raises:
        ValueError: ``v`` not finite or all zero, ``target`` ≤ 0, or no count up to 10¹⁸ reaches it.
    """
    target = check_real(target, "target", 0.0, low_open=True)
    vals, true_norm = _components(v)
    terms = _terms(vals, true_norm)
    scheme = SIGN_SCHEMES.lookup(sign_method, "sign_method")()

    def err(shots: int) -> float:
        return math.sqrt(_error2(terms, shots, scheme, split, norm is None, norm_scale))

    lo, hi = 3, 3
    while err(hi) > target:
        lo, hi = hi, hi * 4
        if hi > 10**18:
            raise ValueError(f"no shot count up to 1e18 reaches relative error {target}")
    while hi > lo * 1.01 + 1:
        mid = int(math.sqrt(lo * hi))
        lo, hi = (lo, mid) if err(mid) <= target else (mid, hi)
    return int(hi)
