"""Name -> class registries (the model: torchdiffeq's ``SOLVERS`` dict, one file per method).

A :class:`Registry` is a plain ``dict`` from a name to an implementation, with two conveniences:
it prints as the tuple of its names (so ``f"form must be one of {FORMS}"`` reads as before, when the
registries were tuples), and :meth:`Registry.lookup` refuses an unknown name with a message that
names the argument and lists the allowed values.  Adding an implementation is one new module and
one line ``REGISTRY["name"] = Class``.
"""
from __future__ import annotations

from typing import Any

__all__ = ["Registry"]


class Registry(dict):
    """``{name: implementation}``; ``repr`` is the tuple of names; unhashable keys are simply absent."""

    def __init__(self, what: str, *args, **kwargs):
        super().__init__(*args, **kwargs)
        #: what the registry holds, for messages ("Carleman form", "window solver", ...)
        self.what = what

    def __repr__(self) -> str:
        return repr(tuple(self))

    __str__ = __repr__

    def __contains__(self, key: object) -> bool:
        try:
            return dict.__contains__(self, key)
        except TypeError:        # an unhashable value is not a name
            return False

    def names(self) -> tuple:
        """The registered names, in registration order."""
        return tuple(self)

    def lookup(self, name: Any, argname: str = "name") -> Any:
        """The implementation registered as ``name``; else ``ValueError("argname must be one of (...)")``."""
        if not isinstance(name, str) or name not in self:
            raise ValueError(f"{argname} must be one of {self!r}, got {name!r}")
        return self[name]
