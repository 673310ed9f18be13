"""Argument checking, one home for every floor (it sits below the math core and imports only numpy/torch).

Every check raises with the argument's name, the allowed values and what was given; none clamps.
Numbers are accepted in any real form a user has at hand — Python, numpy scalars, 0-d arrays and 0-d
tensors — but never ``bool`` (``True`` is not a step count) and never a string.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence

import numpy as np
import torch

__all__ = ["as_real", "as_int", "check_int", "check_real", "check_choice", "check_bool", "check_optional_int",
           "require_real", "require_int", "expect_int", "expect_real"]


def _scalar(x):
    """A 0-d numpy array or 0-d torch tensor as its Python / numpy scalar; anything else unchanged."""
    if isinstance(x, torch.Tensor) and x.dim() == 0 and not (x.dtype == torch.bool or x.is_complex()):
        return x.item()
    if isinstance(x, np.ndarray) and x.ndim == 0:
        return x[()]
    return x


def as_real(x) -> Optional[float]:
    """``x`` as a float if it is a real number (Python, numpy scalar, 0-d array / tensor; not bool), else None."""
    x = _scalar(x)
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
        return None
    return float(x)


def as_int(x) -> Optional[int]:
    """``x`` as an int if it is an integer (Python, numpy integer, 0-d integer array / tensor; not bool), else None."""
    x = _scalar(x)
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral):
        return None
    return int(x)


def _range(low, high, low_open: bool = False, high_open: bool = False) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}" \
            if isinstance(low, float) or isinstance(high, float) else f" in {low}..{high}"
    if low is not None:
        return f" {'>' if low_open else '≥'} {low:g}" if isinstance(low, float) else f" ≥ {low}"
    if high is not None:
        return f" {'<' if high_open else '≤'} {high:g}" if isinstance(high, float) else f" ≤ {high}"
    return ""


def check_int(value, name: str, low: Optional[int] = None, high: Optional[int] = None, *, hint: str = "") -> int:
    """``value`` as an ``int`` in ``[low, high]``; else ``ValueError("name must be an integer ≥ low …")``."""
    v = as_int(value)
    if v is None or (low is not None and v < low) or (high is not None and v > high):
        raise ValueError(f"{name} must be an integer{_range(low, high)}{hint}, got {value!r}")
    return v


def check_optional_int(value, name: str, low: Optional[int] = None, high: Optional[int] = None, *,
                       none: str = "") -> Optional[int]:
    """``None`` (meaning ``none``) or an integer in ``[low, high]``."""
    if value is None:
        return None
    v = as_int(value)
    if v is None or (low is not None and v < low) or (high is not None and v > high):
        raise ValueError(f"{name} must be an integer{_range(low, high)} or None{f' ({none})' if none else ''}, "
                         f"got {value!r}")
    return v


def check_real(value, name: str, low: Optional[float] = None, high: Optional[float] = None, *,
               low_open: bool = False, high_open: bool = False, finite: bool = True, hint: str = "") -> float:
    """``value`` as a ``float`` in the interval given (closed unless ``*_open``), finite unless ``finite=False``."""
    v = as_real(value)
    bad = v is None or math.isnan(v) or (finite and not math.isfinite(v))
    if not bad and low is not None:
        bad = v <= low if low_open else v < low
    if not bad and high is not None:
        bad = v >= high if high_open else v > high
    if bad:
        kind = "a finite number" if finite else "a number"
        lo = None if low is None else float(low)
        hi = None if high is None else float(high)
        raise ValueError(f"{name} must be {kind}{_range(lo, hi, low_open, high_open)}{hint}, got {value!r}")
    return v


def check_choice(value: Any, name: str, allowed: Sequence) -> Any:
    """``value`` if it is one of ``allowed`` (compared with ``==``, types included for bools)."""
    if not any(value is a or (type(value) is type(a) and value == a) for a in allowed):
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


def check_bool(value, name: str) -> bool:
    """``value`` if it is a ``bool`` (numpy bools too); ``1``/``0``/strings are refused."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def require_real(value, name: str, what: str = "a real number") -> float:
    """``value`` as a float; ``TypeError("name must be what, got <type>")`` when it is no real number at all
    (a wrong kind of value, told apart from a wrong value, which the range checks above report)."""
    v = as_real(value)
    if v is None:
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    return v


def require_int(value, name: str, what: str = "an integer") -> int:
    """``value`` as an int; ``TypeError("name must be what, got …")`` when it is no integer (bools refused)."""
    v = as_int(value)
    if v is None:
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    return v


def expect_int(value, name: str, low: Optional[int] = None, high: Optional[int] = None, *, hint: str = "") -> int:
    """:func:`check_int` with the math core's exception types: ``TypeError`` when ``value`` is not an
    integer at all (a float, a string, a bool), ``ValueError`` when it is one outside ``[low, high]``."""
    require_int(value, name, f"an integer{_range(low, high)}{hint}")
    return check_int(value, name, low, high, hint=hint)


def expect_real(value, name: str, low: Optional[float] = None, high: Optional[float] = None, *,
                low_open: bool = False, high_open: bool = False, hint: str = "") -> float:
    """:func:`check_real` (finite) with the math core's exception types: ``TypeError`` when ``value`` is
    not a real number at all, ``ValueError`` when it is NaN, infinite or outside the interval."""
    lo = None if low is None else float(low)
    hi = None if high is None else float(high)
    require_real(value, name, f"a finite number{_range(lo, hi, low_open, high_open)}{hint}")
    return check_real(value, name, low, high, low_open=low_open, high_open=high_open, hint=hint)
