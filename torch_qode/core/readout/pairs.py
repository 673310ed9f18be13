"""``"pairs"``: interference of each component with a reference component (Sec. II D).

The reference ``ref`` is the most-observed kept component.  *Relative sign of* ``a``: a two-level
Hadamard on ``span{|a>, |ref>}`` then a computational-basis measurement: ``+`` with
``(v_a+v_ref)²/(2||v||²)``, ``−`` with ``(v_a−v_ref)²/(2||v||²)``, or "elsewhere";
``sign(v_a v_ref) = sign(n₊ − n₋)`` (ties, including a pair with 0 shots: ``+``).  *Global sign*: a
Hadamard test against the relative-sign estimate, ``+`` if ``n₀ ≥ n₁``.  The shots are split evenly
over the ``k`` circuits (1 global test + ``k − 1`` pairs), the remainder first to the global test,
then to the pairs in decreasing count order.  ``O(r²)`` sign shots in all.
"""
from __future__ import annotations

import numpy as np

from .base import SignScheme

__all__ = ["PairSigns", "pair_signs"]


def pair_signs(rng: np.random.Generator, w: np.ndarray, mags: np.ndarray, shots: int) -> np.ndarray:
    """Signs of the kept components (``w = v_kept / ||v||``, ``w[0]`` the reference)."""
    k = w.size
    per = np.full(k, shots // k, dtype=np.int64)
    per[: shots % k] += 1                       # global test first, then pairs by decreasing count
    rel = np.ones(k)
    if k > 1:
        wa, wr = w[1:], w[0]
        p_plus = (wa + wr) ** 2 / 2
        p_minus = (wa - wr) ** 2 / 2
        p_else = np.clip(1.0 - p_plus - p_minus, 0.0, 1.0)
        pv = np.stack([p_plus, p_minus, p_else], axis=1)
        pv /= pv.sum(axis=1, keepdims=True)
        outcomes = rng.multinomial(per[1:], pv)
        rel[1:] = np.where(outcomes[:, 0] >= outcomes[:, 1], 1.0, -1.0)
    # global sign: Hadamard test against the normalised relative-sign estimate
    w_hat = rel * mags
    w_hat /= np.linalg.norm(w_hat)
    overlap = float(np.clip(np.dot(w_hat, w), -1.0, 1.0))
    n0 = rng.binomial(per[0], (1.0 + overlap) / 2)
    return rel if 2 * n0 >= per[0] else -rel


class PairSigns(SignScheme):
    """Relative signs against the most-observed component, then one global-sign test."""

    name = "pairs"
    reports_reference = True

    def signs(self, rng, w, mags, shots):
        return pair_signs(rng, w, mags, shots)

    def sign_error(self, w, shots, *, size=None):
        """Pair ``a`` gets ``m = shots/k`` shots; ``n₊ − n₋`` has mean ``2m·w_a w_ref`` and variance
        ``m(w_a² + w_ref²)`` (normal approximation: wrong with ``Φ(−|mean|/sd)``, ½ without shots); ``w[0]``
        is the reference, ``size`` the pairs' count (``k``)."""
        m = shots / max(w.size if size is None else size, 1)
        wr = w[0]
        z = 2 * np.sqrt(m) * np.abs(w * wr) / np.sqrt(w * w + wr * wr)
        import scipy.special

        out = 0.5 * scipy.special.erfc(z / np.sqrt(2))
        out[0] = 0.0                              # the reference (its global sign is ignored)
        return out
