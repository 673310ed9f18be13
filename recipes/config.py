"""Recipe configs on OmegaConf: a recipe's schema is a dataclass (an OmegaConf structured config), its
``qode:`` section is generated from QODE's own schema (:class:`~torch_qode.training.config.QODEConfig`).

OmegaConf reads the YAML files (its safe loader), parses and merges the dotted ``key=value`` overrides
(values as YAML: ``model.depth=8``, ``lr=1e-3``, ``flag=true``, ``fs=[1, 0.5]``), checks every key
against the schema (an unknown key suggests the closest one), refuses ``null`` where the field is not
``Optional`` and values of the wrong type.  What stays here: the errors as :class:`ConfigError` naming
the key and the fix, a strict check of scalars (OmegaConf would turn ``1`` into ``true`` and ``5`` into
``"5"``), old spellings (:data:`RENAMED`, with a ``DeprecationWarning``) and the value checks the
recipes share (ranges: :func:`check_int`, :func:`check_real`, ... over :mod:`torch_qode._checks`).
"""
from __future__ import annotations

import copy
import dataclasses
import re
import typing
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from torch_qode import _checks

__all__ = ["ConfigError", "RENAMED", "load_config", "build", "defaults", "qode_section", "check_qode", "keyed_error",
           "check_int", "check_real", "check_choice", "check_optional_str", "check_int_list"]

#: old spellings a config file, a saved ``config.yaml`` or an override may carry → today's key (a null
#: value is dropped; any other moves there with a DeprecationWarning)
RENAMED = {"qode.kappa_a": "qode.solver_options.kappa_a"}
#: QODE settings a recipe takes from elsewhere (the run's ``seed``), not from its ``qode:`` section
QODE_FROM_RUN = ("seed",)
#: QODE's SGD keys a recipe passes besides the settings (``qode:`` section defaults)
QODE_SGD = {"lr": 0.01, "momentum": 0.0, "weight_decay": 0.0}


class ConfigError(ValueError):
    """A config file or override is malformed, names an unknown key or has the wrong type."""


# ------------------------------------------------------------------------------------------ schema
def _field(tp, default):
    if isinstance(default, (dict, list)):
        return tp, dataclasses.field(default_factory=lambda d=default: copy.deepcopy(d))
    return tp, dataclasses.field(default=default)


def qode_section(**overrides) -> type:
    """The ``qode:`` section: QODE's SGD keys and every setting of ``QODEConfig`` (but the run's seed),
    typed for OmegaConf (a ``Literal`` is a ``str``, QODEConfig checks the choice; an ``Optional[dict]``
    an open mapping), with the schema's defaults unless ``overrides`` gives the recipe's."""
    from torch_qode.training.config import QODEConfig, settings_fields

    hints, fields = typing.get_type_hints(QODEConfig), []
    for name, default in QODE_SGD.items():
        fields.append((name, *_field(float, overrides.pop(name, default))))
    for f in settings_fields():
        if f.name in QODE_FROM_RUN:
            continue
        tp, optional = _unoptional(hints[f.name])
        default = overrides.pop(f.name, f.default)
        if tp is dict:
            tp, default = Dict[str, Any], dict(default or {})
        elif typing.get_origin(tp) is typing.Literal:
            tp = str
        elif typing.get_origin(tp) is typing.Union:     # e.g. shots: int or "auto": QODEConfig checks it
            tp = Any
        fields.append((f.name, *_field(Optional[tp] if optional else tp, default)))
    if overrides:
        raise TypeError(f"qode_section: {sorted(overrides)} are not QODE settings")
    return dataclasses.make_dataclass("qode", fields)


def defaults(schema: type) -> dict:
    """The defaults of ``schema`` as plain nested dicts."""
    return OmegaConf.to_container(OmegaConf.structured(schema))


def _unoptional(tp) -> tuple:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return tp, False


def _hints(cls) -> dict:
    return typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}


def _keys(cls, prefix: str = "") -> list:
    out = []
    for name, tp in _hints(cls).items():
        tp = _unoptional(tp)[0]
        out.append(prefix + name)
        if dataclasses.is_dataclass(tp):
            out += _keys(tp, f"{prefix}{name}.")
        elif typing.get_origin(tp) is dict:
            out.append(f"{prefix}{name}.*")
    return out


def _type_at(cls, key: str):
    """The annotation of the dotted ``key`` in ``cls`` (``Any`` inside an open mapping, ``None``: unknown)."""
    tp = cls
    for part in key.split("."):
        tp = _unoptional(tp)[0]
        if typing.get_origin(tp) is dict or tp is Any:
            return Any
        tp = _hints(tp).get(part)
        if tp is None:
            return None
    return tp


def _type_name(tp) -> str:
    base, optional = _unoptional(tp)
    name = "list" if typing.get_origin(base) is list else "mapping" if typing.get_origin(base) is dict else \
        getattr(base, "__name__", str(base))
    return f"{name} or null" if optional else name


# -------------------------------------------------------------------------------------- checks
def _strict(cls, key: str, value) -> None:
    """What OmegaConf converts silently is refused: a scalar field takes only its own kind of value
    (``1`` is not ``true``, ``5`` not ``"5"``, ``"3"`` not ``3``); a section takes only a mapping."""
    tp = _type_at(cls, key)
    base = _unoptional(tp)[0]
    if tp is None or value is None:
        return                                         # unknown key / null: OmegaConf's errors
    if dataclasses.is_dataclass(base):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r} is a section; set its sub-keys "
                              f"({', '.join(f'{key}.{s}' for s in _hints(base))})")
        for k, v in value.items():
            _strict(cls, f"{key}.{k}", v)
        return
    if typing.get_origin(base) is dict and not isinstance(value, Mapping):
        raise ConfigError(f"config key {key!r} must be a mapping of keyword arguments: set {key}.NAME=value "
                          f"or {key}={{NAME: value}}, got {value!r}")
    kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(base)
    if kinds and (not isinstance(value, kinds) or (base is not bool and isinstance(value, bool))):
        hint = " (write it as an integer, e.g. 10000000, not 1e7)" if base is int and isinstance(value, float) else ""
        raise ConfigError(f"config key {key!r} must be of type {_type_name(tp)}, got {value!r}{hint}")


def _error(exc: OmegaConfBaseException, cls, key: Optional[str] = None) -> ConfigError:
    """OmegaConf's error as a ConfigError naming the key (and, for an unknown key, the allowed ones)."""
    key = getattr(exc, "full_key", None) or key
    msg = str(exc).splitlines()[0]
    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)):
        return ConfigError(f"unknown config key {key!r}; allowed keys: {', '.join(sorted(_keys(cls)))}. {msg}")
    if getattr(exc, "value", 0) is None or "'None'" in msg or "is None" in msg:
        tp = _type_at(cls, key or "")
        return ConfigError(f"config key {key!r} may not be null: it must be of type {_type_name(tp)}; null is only "
                           f"for optional keys ({msg})")
    return ConfigError(f"config key {key!r} must be of type {_type_name(_type_at(cls, key or ''))} ({msg})")


def _renamed(key: str, value, where: str):
    new = RENAMED.get(key)
    if new is None:
        return key, value
    if value is not None:
        warnings.warn(f"{where}: config key {key!r} is deprecated: write {new}={value!r}", DeprecationWarning,
                      stacklevel=4)
    return (new if value is not None else None), value


def _upgrade(data: Mapping, where: str) -> dict:
    """``data`` (a file's mapping) with the old spellings of :data:`RENAMED` moved to today's keys."""
    data = OmegaConf.create(dict(data))
    for old in RENAMED:
        node, leaf = (old.rpartition(".")[0], old.rpartition(".")[2])
        parent = OmegaConf.select(data, node) if node else data
        if isinstance(parent, DictConfig) and leaf in parent:
            value = parent.pop(leaf)
            key, value = _renamed(old, value, where)
            if key is not None:
                OmegaConf.update(data, key, value, merge=True)
    return OmegaConf.to_container(data)


# ------------------------------------------------------------------------------------------ config
def load_config(path) -> dict:
    """Read a YAML mapping (OmegaConf's safe loader; an empty file is ``{}``)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        data = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = " ".join(str(x) for x in (getattr(exc, "context", None), getattr(exc, "problem", None)) if x) \
            or str(exc)
        raise ConfigError(f"config file {str(path)!r}{where}: not valid (safe) YAML: {what}") from exc
    if not isinstance(data, DictConfig):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values, "
                          f"got {type(data).__name__}")
    return OmegaConf.to_container(data)


def build(schema: type, files: Iterable[Mapping] = (), overrides: Sequence[str] = ()) -> dict:
    """The config of ``schema`` (a dataclass) updated by the mappings ``files`` (in order), then by the
    ``key=value`` strings ``overrides``; plain nested dicts.  Every error is a :class:`ConfigError`."""
    import yaml

    cfg = OmegaConf.structured(schema)
    for data in files:
        data = _upgrade(data, "config file")
        for k, v in data.items():
            _strict(schema, k, v)
        try:
            cfg = OmegaConf.merge(cfg, data)
        except OmegaConfBaseException as exc:
            raise _error(exc, schema) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. n=8, model.depth=8, fs=[1, 0.5])")
        try:
            parsed = OmegaConf.from_dotlist([item])
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
        key = item.partition("=")[0].strip()
        value = OmegaConf.select(parsed, key)
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        key, value = _renamed(key, value, f"override {item!r}")
        if key is None:
            continue
        _strict(schema, key, value)
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as exc:
            raise _error(exc, schema, key) from None
    return OmegaConf.to_container(cfg)


def check_qode(q: Mapping, section: str = "qode"):
    """The settings of the ``qode:`` section checked by ``QODEConfig`` itself (plus the run's seed);
    its error as a :class:`ConfigError` naming ``qode.<key>``.  Returns the ``QODEConfig``."""
    from torch_qode.training.config import QODEConfig, settings_fields

    names = [f.name for f in settings_fields()]
    settings = {k: v for k, v in q.items() if k in names}
    try:
        return QODEConfig(**settings)
    except (TypeError, ValueError) as exc:
        if str(exc).startswith("shots="):           # tomography() refused: the shots, or the kwargs?
            try:
                QODEConfig(**{**settings, "tomography_kwargs": None})
                key = "tomography_kwargs"
            except (TypeError, ValueError):
                key = "shots"
            raise ConfigError(f"{section}.{key}: {exc}") from None
        options = [f"solver_options.{k}" for k in (q.get("solver_options") or {})]
        msg = str(exc)
        first = re.match(r"[A-Za-z_]\w*", msg)
        if first and f"solver_options.{first.group(0)}" in options:
            raise ConfigError(f"{section}.solver_options.{first.group(0)}: {msg}") from None
        raise keyed_error(section, exc, names) from None


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
