"""Recipe configs: the schema (a recipe's ``DEFAULTS``), YAML files, ``key=value`` overrides, type
validation, and the value checks that raise :class:`ConfigError` naming the config key.

A recipe's ``DEFAULTS`` dict is the complete, typed schema of its config.  Types are strict: a value
must have the type of its default (an int is accepted for a float), and ``null`` is accepted only
where the default is ``null`` (optional keys; the recipe checks their type).  A section that is an
:class:`OpenSection` takes any sub-key (keyword arguments passed through to a library call).

Files are read with ``yaml.safe_load`` only; overrides are dotted keys whose values are parsed with
``yaml.safe_load`` (``model.depth=8``, ``lr=0.01``, ``flag=true``, ``fs=[1, 0.5]``).  Unknown keys are
an error naming the key and the allowed ones.

The value checks (:func:`check_int`, :func:`check_real`, ...) are thin wrappers over the package's
own argument checks (:mod:`torch_qode._checks`): numbers are tested there, the message here names
the config key.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

from torch_qode import _checks
from torch_qode._checks import as_int, as_real

__all__ = ["ConfigError", "OpenSection", "load_config", "merge", "apply_overrides", "coerce_floats", "validate",
           "keyed_error", "check_int", "check_real", "check_choice", "check_optional_str", "check_int_list"]


class ConfigError(ValueError):
    """A config file or override is malformed, names an unknown key or has the wrong type."""


class OpenSection(dict):
    """A ``DEFAULTS`` section whose sub-keys are free (e.g. keyword arguments passed through to a
    library call): files and overrides may set any sub-key (``qode.tomography_kwargs.split=...``),
    the listed ones are only defaults; the recipe validates the whole mapping itself."""


# ------------------------------------------------------------------------------------------ config
def _flat_keys(d: Mapping, prefix: str = "") -> list:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.append(key)
        if isinstance(v, OpenSection):
            out.append(key + ".*")
        elif isinstance(v, Mapping):
            out.extend(_flat_keys(v, key + "."))
    return out


def _unknown(key: str, schema: Mapping) -> ConfigError:
    allowed = ", ".join(sorted(_flat_keys(schema)))
    return ConfigError(f"unknown config key {key!r}; allowed keys: {allowed}")


def load_config(path) -> dict:
    """Read a YAML mapping with ``yaml.safe_load`` (an empty file is ``{}``)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    with open(path, encoding="utf-8") as fh:
        try:
            data = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = " ".join(str(x) for x in (getattr(exc, "context", None), getattr(exc, "problem", None)) if x) \
                or str(exc)
            raise ConfigError(f"config file {str(path)!r}{where}: not valid (safe) YAML: {what}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values, "
                          f"got {type(data).__name__}")
    return data


def merge(schema: Mapping, base: Mapping, update: Mapping, prefix: str = "",
          root: Optional[Mapping] = None) -> dict:
    """``base`` updated recursively by ``update``; every key of ``update`` must exist in ``schema``
    (``root``: the top-level schema, listed in the error message)."""
    root = schema if root is None else root
    out = copy.deepcopy(dict(base))
    for k, v in update.items():
        key = f"{prefix}{k}"
        if k not in schema:
            raise _unknown(key, root)
        if isinstance(schema[k], OpenSection):
            if not isinstance(v, Mapping):
                raise ConfigError(f"config key {key!r} must be a mapping (of keyword arguments), got {v!r}")
            out[k] = {**copy.deepcopy(dict(out.get(k) or {})), **copy.deepcopy(dict(v))}
        elif isinstance(schema[k], Mapping):
            if not isinstance(v, Mapping):
                raise ConfigError(f"config key {key!r} must be a mapping (sub-keys: "
                                  f"{', '.join(schema[k])}), got {v!r}")
            out[k] = merge(schema[k], out.get(k, {}), v, key + ".", root)
        else:
            out[k] = copy.deepcopy(v)
    return out


def apply_overrides(cfg: dict, overrides: Sequence[str], schema: Mapping) -> dict:
    """Apply ``key=value`` strings (dotted keys, values through ``yaml.safe_load``)."""
    import yaml

    out = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value "
                              f"(e.g. n=8, model.depth=8, fs=[1, 0.5])")
        key, _, text = item.partition("=")
        key = key.strip()
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
        parts = key.split(".")
        node_schema, node = schema, out
        for i, part in enumerate(parts):
            if isinstance(node_schema, OpenSection) and i == len(parts) - 1 and part:
                node[part] = value          # a free sub-key (keyword argument) of an open section
                break
            if not isinstance(node_schema, Mapping) or isinstance(node_schema, OpenSection) \
                    or part not in node_schema:
                raise _unknown(key, schema)
            if i == len(parts) - 1:
                if isinstance(node_schema[part], OpenSection) and not isinstance(value, Mapping):
                    raise ConfigError(f"config key {key!r} must be a mapping of keyword arguments: set "
                                      f"{key}.NAME=value or {key}={{NAME: value}}, got {value!r}")
                if isinstance(node_schema[part], Mapping) and not isinstance(value, Mapping):
                    raise ConfigError(f"config key {key!r} is a section; set its sub-keys "
                                      f"({', '.join(f'{key}.{s}' for s in node_schema[part])})")
                if isinstance(node_schema[part], OpenSection):
                    node[part] = {**dict(node[part] or {}), **copy.deepcopy(dict(value))}
                else:
                    node[part] = merge(node_schema[part], node[part], value, key + ".", schema) \
                        if isinstance(node_schema[part], Mapping) else value
            else:
                node_schema, node = node_schema[part], node[part]
    return out


def _type_ok(default, value) -> bool:
    if default is None:
        return True  # None in DEFAULTS: an optional key of any type (the recipe checks it)
    if value is None:
        return False  # null only where the default is null
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return as_int(value) is not None
    if isinstance(default, float):
        return as_real(value) is not None
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, list):
        return isinstance(value, list)
    return True


def coerce_floats(cfg: dict, schema: Mapping) -> dict:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string: turn such strings into floats where the schema's
    default is a float (in place; returns ``cfg``)."""
    for k, default in schema.items():
        if k not in cfg:
            continue
        if isinstance(default, OpenSection):
            continue
        if isinstance(default, Mapping) and isinstance(cfg[k], dict):
            coerce_floats(cfg[k], default)
        elif isinstance(default, float) and isinstance(cfg[k], str):
            cfg[k] = _float_or_same(cfg[k])
        elif isinstance(default, list) and default and all(isinstance(d, float) for d in default) \
                and isinstance(cfg[k], list):   # a list of floats: fs=[1, 1e-1]
            cfg[k] = [_float_or_same(v) if isinstance(v, str) else v for v in cfg[k]]
    return cfg


def _float_or_same(text: str):
    try:
        return float(text)
    except ValueError:
        return text  # validate() or the recipe's check reports it


def validate(cfg: Mapping, schema: Mapping, prefix: str = "", root: Optional[Mapping] = None) -> None:
    """Check that ``cfg`` has exactly the keys of ``schema`` with compatible types."""
    root = schema if root is None else root
    for k, default in schema.items():
        key = f"{prefix}{k}"
        if k not in cfg:
            raise ConfigError(f"config key {key!r} is missing")
        if isinstance(default, OpenSection):
            if not isinstance(cfg[k], Mapping) or not all(isinstance(s, str) for s in cfg[k]):
                raise ConfigError(f"config key {key!r} must be a mapping of keyword arguments, got {cfg[k]!r}")
        elif isinstance(default, Mapping):
            if not isinstance(cfg[k], Mapping):
                raise ConfigError(f"config key {key!r} must be a mapping (sub-keys: {', '.join(default)}), "
                                  f"got {cfg[k]!r}")
            validate(cfg[k], default, key + ".", root)
        elif not _type_ok(default, cfg[k]):
            if cfg[k] is None:
                raise ConfigError(f"config key {key!r} may not be null: it must be of type "
                                  f"{type(default).__name__} (default {default!r}); null is only for optional keys")
            raise ConfigError(f"config key {key!r} must be of type {type(default).__name__} "
                              f"(default {default!r}), got {cfg[k]!r}")
    for k in cfg:
        if k not in schema:
            raise _unknown(f"{prefix}{k}", root)


# ------------------------------------------------------------------------------ checks of values
def keyed_error(section: str, exc: BaseException, keys: Iterable[str] = ()) -> ConfigError:
    """A :class:`ConfigError` for ``exc``, raised by a library constructor fed the config ``section``:
    named ``section.KEY`` when the message starts with one of ``keys`` (the library names its
    argument first), else ``section``."""
    msg = str(exc)
    m = re.match(r"[A-Za-z_][A-Za-z0-9_]*", msg)
    key = m.group(0) if m and m.group(0) in set(keys) else None
    return ConfigError(f"{section}.{key}: {msg}" if key else f"{section}: {msg}")


def _int_range(low: Optional[int], high: Optional[int], high_text: Optional[str] = None) -> str:
    """`` in low..high`` / `` >= low`` / `` <= high`` / ``""``, as the recipes' messages write it."""
    hi = f"{high}" if high_text is None else high_text
    if low is not None:
        return f" in {low}..{hi}" if high is not None else f" >= {low}"
    return f" <= {hi}" if high is not None else ""


def _is_int_in(value, low: Optional[int], high: Optional[int]) -> bool:
    try:
        _checks.check_int(value, "value", low, high)
    except ValueError:
        return False
    return True


def check_int(value, key: str, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """``value`` an integer (not a bool) in ``[low, high]``, else a :class:`ConfigError` naming ``key``."""
    try:
        return _checks.check_int(value, key, low, high)
    except ValueError:
        raise ConfigError(f"{key} must be an integer{_int_range(low, high)}, got {value!r}") from None


def check_real(value, key: str, low: Optional[float] = None, high: Optional[float] = None, *,
               low_open: bool = False, high_open: bool = False, allow_inf: bool = False) -> float:
    """``value`` a real number (not a bool, not NaN; finite unless ``allow_inf``) within the bounds,
    else a :class:`ConfigError` naming ``key``."""
    try:
        return _checks.check_real(value, key, low, high, low_open=low_open, high_open=high_open,
                                  finite=not allow_inf)
    except ValueError:
        parts = []
        if low is not None:
            parts.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            parts.append(f"{'<' if high_open else '<='} {high:g}")
        kind = "a number" if allow_inf else "a finite number"
        raise ConfigError(f"{key} must be {kind}{' ' + ' and '.join(parts) if parts else ''}, got {value!r}") \
            from None


def check_choice(value, key: str, allowed: Sequence[str]) -> str:
    """``value`` if it is one of the strings ``allowed``, else a :class:`ConfigError` naming ``key``."""
    try:
        return _checks.check_choice(value, key, tuple(allowed))
    except ValueError:
        raise ConfigError(f"{key} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}") from None


def check_optional_str(value, key: str, what: str = "a file path") -> Optional[str]:
    """``None`` or a non-empty string."""
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ConfigError(f"{key} must be null or {what} (a non-empty string), got {value!r}")
    return value


def check_int_list(value, key: str, low: Optional[int] = None, high: Optional[int] = None,
                   nonempty: bool = True, high_name: Optional[str] = None) -> list:
    """A (non-empty) list of integers (not bools) within ``[low, high]`` (``high_name``: the key
    ``high`` comes from, for the message)."""
    if not isinstance(value, list) or (nonempty and not value) or \
            not all(_is_int_in(v, low, high) for v in value):
        rng = _int_range(low, high, f"{high_name} = {low}..{high}" if high_name else None) if low is not None else ""
        raise ConfigError(f"{key} must be a {'non-empty ' if nonempty else ''}list of integers{rng}, got {value!r}")
    return value
