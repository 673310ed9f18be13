"""Modules imported on first attribute access, so that ``import torch_qode`` stays cheap (issue 19).

Floor 0, beside ``_checks``: it imports only the standard library.  Use it for a module that a file
needs in several functions but not at import time::

    from typing import TYPE_CHECKING

    from .._lazy import lazy_module

    if TYPE_CHECKING:
        import scipy.sparse as sp
    else:
        sp = lazy_module("scipy.sparse")

A single-use heavy import is simpler as a function-level ``import``.
"""
from __future__ import annotations

import importlib
import types
from typing import Any

__all__ = ["lazy_module"]


class _LazyModule:
    """Stands in for a module until one of its attributes is read; then imports it and delegates."""

    __slots__ = ("_name", "_module")

    def __init__(self, name: str):
        self._name = name
        self._module: types.ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        module = self._module
        if module is None:
            module = self._module = importlib.import_module(self._name)
        return getattr(module, attr)

    def __repr__(self) -> str:
        state = "loaded" if self._module is not None else "not loaded yet"
        return f"<lazy module {self._name!r} ({state})>"


def lazy_module(name: str) -> Any:
    """A stand-in for module ``name`` that imports it when an attribute is first read.

    Args:
        name: The absolute module name, e.g. ``"scipy.sparse"``.

    Returns:
        An object whose attributes are those of the module, imported on first access.

    Example:
        >>> import sys
        >>> m = lazy_module("json")
        >>> m.dumps([1, 2])
        '[1, 2]'
        >>> m.loads is sys.modules["json"].loads
        True
    """
    return _LazyModule(name)
