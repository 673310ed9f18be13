"""The abstract sign scheme of the tomography readout (stage 3 of :func:`~torch_qode.core.tomography.tomography`)."""
from __future__ import annotations

from typing import ClassVar, Optional

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

    def sign_error(self, w: np.ndarray, shots: int, *, size: Optional[int] = None) -> np.ndarray:
        """Probability that each component's sign reads wrong, for
        :func:`~torch_qode.core.readout_model.expected_relative_error`.

        Args:
            w: ``v / ||v||`` observed; ``w[0]`` the largest ``|w|``, the rest in any order (an entry
                may stand for a group of components of about the same ``w``).
            shots: the sign stage's budget.
            size: the number of components in all (default ``w.size``; more when entries are groups).
        """
        raise NotImplementedError(f"sign scheme {self.name!r} has no error model")
