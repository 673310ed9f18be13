"""``"hadamard"``: one Hadamard test against a classically prepared reference state (Sec. II D).

``|φ> = Σ_{a kept} φ_a |a>``, ``φ_a = sqrt(c_a / Σ c)`` the measured magnitudes; outcomes ``(a, 0)``
with ``(v_a/||v|| + φ_a)²/4`` and ``(a, 1)`` with ``(v_a/||v|| − φ_a)²/4``, or "elsewhere";
``sign(v_a) = +`` iff ``n_{a,0} ≥ n_{a,1}``.  Signs are absolute (no global-sign test) and one hit
on ``a`` nearly settles its sign: ``O(r log r)`` shots, like the support.
"""
from __future__ import annotations

import numpy as np

from .base import SignScheme

__all__ = ["HadamardSigns", "hadamard_signs"]


def hadamard_signs(rng: np.random.Generator, w: np.ndarray, mags: np.ndarray, shots: int) -> np.ndarray:
    """Signs from one Hadamard test against ``|φ>`` (``w = v_kept/||v||``, ``φ = mags`` normalised)."""
    phi = mags / np.linalg.norm(mags)
    p0 = (w + phi) ** 2 / 4
    p1 = (w - phi) ** 2 / 4
    p_else = max(0.0, 1.0 - float(p0.sum() + p1.sum()))
    pv = np.concatenate([p0, p1, [p_else]])
    counts = rng.multinomial(shots, pv / pv.sum())
    k = w.size
    return np.where(counts[:k] >= counts[k:2 * k], 1.0, -1.0)


class HadamardSigns(SignScheme):
    """Absolute signs from one Hadamard test against the measured-magnitude state."""

    name = "hadamard"

    def signs(self, rng, w, mags, shots):
        return hadamard_signs(rng, w, mags, shots)

    def sign_error(self, w, shots, *, size=None):
        """With ``φ_a ≈ |w_a|`` a negative ``v_a`` lands on ``(a, 1)`` at rate ``shots·w_a²`` and reads
        wrong (+) only without a hit; a positive one is read right."""
        return np.where(w < 0, np.exp(-shots * w * w), 0.0)
