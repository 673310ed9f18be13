"""Readout sign schemes of the simulated tomography: one module per scheme over :class:`SignScheme`.

:data:`SIGN_SCHEMES` maps a name to its class (``tomography(..., sign_method=name)``).  To add a
scheme: a new module with a ``SignScheme`` subclass and one line in ``SIGN_SCHEMES`` below.
"""
from __future__ import annotations

from ..registry import Registry
from .base import SignScheme
from .hadamard import HadamardSigns, hadamard_signs
from .pairs import PairSigns, pair_signs

__all__ = ["SIGN_SCHEMES", "SignScheme", "PairSigns", "HadamardSigns", "pair_signs", "hadamard_signs"]

#: sign schemes, name -> SignScheme subclass (prints as the tuple of names)
SIGN_SCHEMES = Registry("sign scheme", {"pairs": PairSigns, "hadamard": HadamardSigns})
