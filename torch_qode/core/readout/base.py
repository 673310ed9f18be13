"""The abstract sign scheme of the tomography readout (stage 3 of :func:`~torch_qode.core.tomography.tomography`)."""
from __future__ import annotations

from typing import ClassVar

import numpy as np

__all__ = ["SignScheme"]


class SignScheme:
    """Reads the signs of the kept components with finite shots (exact Born probabilities).

    ``signs(rng, w, mags, shots)``: ``w = v_kept / ||v||`` in decreasing-count order (``w[0]`` the
    most-observed component), ``mags`` the measured magnitudes (unit norm) and ``shots`` the sign
    stage's budget; returns ``±1`` per kept component.  ``reports_reference`` says whether the
    result names a reference component (``TomographyResult.reference``).
    """

    name: ClassVar[str] = ""
    reports_reference: ClassVar[bool] = False

    def signs(self, rng: np.random.Generator, w: np.ndarray, mags: np.ndarray, shots: int) -> np.ndarray:
        raise NotImplementedError   # pragma: no cover - abstract

    def sign_error(self, w: np.ndarray, shots: int) -> np.ndarray:
        """Probability that each component's sign reads wrong (``w = v / ||v||`` observed, decreasing
        ``|w|``), for :func:`~torch_qode.core.readout_model.expected_relative_error`."""
        raise NotImplementedError(f"sign scheme {self.name!r} has no error model")
