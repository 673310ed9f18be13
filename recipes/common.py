"""Shared plumbing of the recipes: command line, config, output folder, JSON-lines log, progress, seeds.

Every recipe is a module with a ``DEFAULTS`` dict (the complete, typed schema of its config) and a
``main(argv=None)`` that starts with :func:`setup` and runs inside the returned :class:`Run`::

    DEFAULTS = {"seed": 0, "device": "auto", "n": 8, "model": {"depth": 8}}

    def check(cfg):     # every option, before anything is written: ConfigErrors naming the key
        common.check_int(cfg["n"], "n", 1)

    def main(argv=None):
        with common.setup("my_recipe", DEFAULTS, argv, description=__doc__, check=check) as run:
            run.log.write("step", step=0, loss=1.0)
            for t in run.progress(range(10), desc="steps"):
                ...
            return {"out": str(run.out)}

Command line (``python -m recipes.NAME --config configs/NAME.yaml [key=value ...]``):

``--config PATH``
    YAML file, read with ``yaml.safe_load`` only; its keys must exist in ``DEFAULTS``.  A syntax
    error is a :class:`ConfigError` naming the file and the line.
``key=value`` (any number, after the options)
    Dotted overrides (``model.depth=8``, ``lr=0.01``, ``flag=true``, ``fs=[1, 0.5]``); values are
    parsed with ``yaml.safe_load``. Unknown keys are an error naming the key and the allowed ones.
``--out DIR``
    Output folder (default ``runs/NAME/<YYYYmmdd-HHMMSS>``); receives ``config.yaml`` (the merged,
    validated config; non-finite floats as ``.inf`` / ``-.inf`` / ``.nan``, so ``--config
    DIR/config.yaml`` re-runs it), ``log.jsonl`` and the figures.  An existing folder must be empty:
    two runs are never mixed in one folder.
``--seed N``, ``--device {auto,cpu,cuda,cuda:1,...}``
    Shortcuts for the ``seed`` / ``device`` keys; ``auto`` is CUDA when available, else CPU.  A config
    with ``gpu: true`` is sized for a GPU: without CUDA it refuses to start unless the command line
    asks for the CPU explicitly (``--device cpu`` or ``device=cpu``).
``--data-root DIR``, ``--download``
    Only for recipes built with ``data=True``: shortcuts for ``data.root`` / ``data.download``
    (they need ``data.name=cifar100``).
``--threads {auto,N}``
    ``torch.set_num_threads`` for the run (restored afterwards).  ``auto`` (the default) takes the
    cores that the 1-minute load average leaves free, at least one: with two threads, OpenMP's
    spinning made PyTorch up to 60x slower while another process held a core.
``--no-progress``
    No tqdm bars (they are also off when stderr is not a terminal).

Precedence: ``DEFAULTS`` < ``--config`` file < ``key=value`` overrides < dedicated flags.

Types are strict: a value must have the type of its default (an int is accepted for a float), and
``null`` is accepted only where the default is ``null`` (optional keys; the recipe checks their type).
Every key is checked (``setup``'s ``check``) before the output folder is created or any training starts.

For recipes that train classifiers there are small shared helpers below: :data:`DATA_DEFAULTS`
(the ``data`` config section), :func:`classification_data` (digits or CIFAR-100),
:func:`fixed_batch`, :func:`evaluate`, :func:`train_classifier` (plain SGD pre-training) and
:func:`load_checkpoint` (``torch.load(..., weights_only=True)``).
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

__all__ = ["ConfigError", "Run", "JsonlLogger", "setup", "build_parser", "load_config", "merge",
           "apply_overrides", "coerce_floats", "validate", "seed_everything", "resolve_device", "to_jsonable",
           "progress", "format_table", "default_out", "DATA_DEFAULTS", "classification_data", "fixed_batch",
           "evaluate", "train_classifier", "load_checkpoint", "pretrained_resnet", "OpenSection", "keyed_error",
           "check_int", "check_real", "check_choice", "check_optional_str", "check_int_list",
           "check_classification", "DATASETS"]


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
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
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


def _is_int(v) -> bool:
    from torch_qode.bridge.flat import as_int   # the package's own notion: numpy integers yes, bools no

    return as_int(v) is not None


def _is_real(v) -> bool:
    from torch_qode.bridge.flat import as_real

    return as_real(v) is not None


def check_int(value, key: str, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """``value`` an integer (not a bool) in ``[low, high]``, else a :class:`ConfigError` naming ``key``."""
    if not _is_int(value) or (low is not None and value < low) or (high is not None and value > high):
        rng = (f" in {low}..{high}" if high is not None else f" >= {low}") if low is not None else \
            (f" <= {high}" if high is not None else "")
        raise ConfigError(f"{key} must be an integer{rng}, got {value!r}")
    return int(value)


def check_real(value, key: str, low: Optional[float] = None, high: Optional[float] = None, *,
               low_open: bool = False, high_open: bool = False, allow_inf: bool = False) -> float:
    """``value`` a real number (not a bool, not NaN; finite unless ``allow_inf``) within the bounds,
    else a :class:`ConfigError` naming ``key``."""
    ok = _is_real(value) and not math.isnan(float(value)) and (allow_inf or math.isfinite(float(value)))
    if ok:
        x = float(value)
        ok = not ((low is not None and (x < low or (low_open and x == low)))
                  or (high is not None and (x > high or (high_open and x == high))))
    if not ok:
        parts = []
        if low is not None:
            parts.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            parts.append(f"{'<' if high_open else '<='} {high:g}")
        kind = "a number" if allow_inf else "a finite number"
        raise ConfigError(f"{key} must be {kind}{' ' + ' and '.join(parts) if parts else ''}, got {value!r}")
    return float(value)


def check_choice(value, key: str, allowed: Sequence) -> Any:
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
    return value


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
            any(not _is_int(v) or (low is not None and v < low) or (high is not None and v > high) for v in value):
        hi = f"{high_name} = {low}..{high}" if high_name else f"{high}"
        rng = (f" in {low}..{hi}" if high is not None else f" >= {low}") if low is not None else ""
        raise ConfigError(f"{key} must be a {'non-empty ' if nonempty else ''}list of integers{rng}, got {value!r}")
    return value


# ------------------------------------------------------------------------------------ environment
def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global RNG and torch (CPU and CUDA)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def resolve_device(spec: str) -> torch.device:
    """``"auto"`` → ``cuda`` if available else ``cpu``; otherwise ``"cpu"``, ``"cuda"`` or ``"cuda:N"``,
    and a CUDA device must be present (the recipes run on nothing else: no mps, meta, xpu, ...)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    msg = f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}"
    if not isinstance(spec, str):
        raise ConfigError(msg)
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(msg) from exc
    if dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise ConfigError(msg)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec!r} requested but CUDA is not available; use device=cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s) "
                              f"exist (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return dev


def to_jsonable(obj: Any, keep_nonfinite: bool = False) -> Any:
    """Plain JSON types: numpy/torch scalars and arrays → numbers/lists, Path → str, dataclass-like
    objects with ``as_dict()`` → dict; non-finite floats → ``None`` (strict JSON has no NaN/inf),
    or kept as floats with ``keep_nonfinite`` (for YAML, which writes them ``.inf``/``-.inf``/``.nan``)."""
    def rec(o):
        return to_jsonable(o, keep_nonfinite)

    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu()
        return rec(obj.item() if obj.dim() == 0 else obj.tolist())
    if isinstance(obj, np.ndarray):
        return rec(obj.tolist())
    if isinstance(obj, np.generic):
        return rec(obj.item())
    if isinstance(obj, float):
        return obj if keep_nonfinite or math.isfinite(obj) else None
    if isinstance(obj, (bool, int, str)) or obj is None:
        return obj
    if isinstance(obj, Mapping):
        return {str(k): rec(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [rec(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.device):
        return str(obj)
    if hasattr(obj, "as_dict"):
        return rec(obj.as_dict())
    return str(obj)


class JsonlLogger:
    """One JSON object per line, flushed after every record: ``{"event": ..., "elapsed_s": ..., **fields}``."""

    def __init__(self, path):
        self.path = Path(path)
        self._fh = open(self.path, "a", encoding="utf-8")
        self._t0 = time.perf_counter()

    def write(self, event: str, **fields) -> dict:
        rec = {"event": event, "elapsed_s": round(time.perf_counter() - self._t0, 4)}
        rec.update(to_jsonable(fields))
        self._fh.write(json.dumps(rec, allow_nan=False) + "\n")
        self._fh.flush()
        return rec

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


def progress(iterable: Optional[Iterable] = None, enabled: bool = True, **kwargs):
    """A tqdm bar, disabled when ``enabled`` is false or stderr is not a terminal."""
    from tqdm.auto import tqdm

    disable = (not enabled) or not sys.stderr.isatty()
    return tqdm(iterable, disable=disable, dynamic_ncols=True, leave=False, **kwargs)


def format_table(rows: Sequence[Mapping], columns: Optional[Sequence[str]] = None, floatfmt: str = ".3g") -> str:
    """A plain-text table of ``rows`` (dicts); floats formatted with ``floatfmt``, ``None`` as ``-``."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, bool):
            return str(v)
        if isinstance(v, (float, np.floating)):
            return format(float(v), floatfmt)
        return str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.rjust(w) for c, w in zip(columns, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in cells]
    return "\n".join([line, sep, *body])


# ---------------------------------------------------------------------------------------- the run
def default_out(name: str) -> Path:
    """``runs/NAME/<YYYYmmdd-HHMMSS>`` (with a numeric suffix if it already exists)."""
    base = Path("runs") / name / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out, i = base, 1
    while out.exists():
        out, i = base.with_name(f"{base.name}-{i}"), i + 1
    return out


def build_parser(name: str, description: Optional[str] = None, data: bool = False) -> argparse.ArgumentParser:
    """The common command line (see the module docstring)."""
    p = argparse.ArgumentParser(prog=f"python -m recipes.{name}", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (read with yaml.safe_load); default: built-in defaults")
    p.add_argument("--out", help=f"output folder (default runs/{name}/<timestamp>)")
    p.add_argument("--seed", type=int, help="random seed (overrides the config's seed)")
    p.add_argument("--device", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--threads", default="auto", help="torch CPU threads for this run (torch.set_num_threads): "
                   "a number, or auto (default: the cores the load average leaves free, at least 1)")
    p.add_argument("--no-progress", action="store_true", help="disable tqdm progress bars")
    if data:
        p.add_argument("--data-root", help="folder holding an existing dataset copy (sets data.root)")
        p.add_argument("--download", action="store_true",
                       help="download the dataset where a network exists (sets data.download=true)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides with dotted keys, values parsed as YAML (model.depth=8, fs=[1,0.5])")
    return p


def free_cores() -> int:
    """Cores this process may use that the 1-minute load average leaves idle (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):       # no load average on this platform
        return cores
    return max(1, min(cores, cores - math.floor(busy + 0.5)))


def resolve_threads(threads) -> int:
    """``--threads``: ``"auto"`` (see :func:`free_cores`) or an integer ≥ 1 (also as a string)."""
    if threads == "auto":
        return free_cores()
    try:
        n = int(threads)
    except (TypeError, ValueError):
        raise ConfigError(f"--threads must be 'auto' or an integer >= 1, got {threads!r}") from None
    if n < 1 or str(n) != str(threads).strip():
        raise ConfigError(f"--threads must be 'auto' or an integer >= 1, got {threads!r}")
    return n


class Run:
    """One recipe run: the merged ``cfg``, the output folder ``out``, the JSON-lines ``log``, the
    torch ``device`` and a ``progress`` factory. Use as a context manager (closes the log)."""

    def __init__(self, name: str, cfg: dict, out: Path, device: torch.device, show_progress: bool,
                 threads: Optional[int] = None):
        self.name, self.cfg, self.out, self.device = name, cfg, Path(out), device
        self.show_progress = show_progress
        self._threads_before = None
        if threads is not None:
            threads = resolve_threads(threads)
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        self.log = JsonlLogger(self.out / "log.jsonl")

    def path(self, filename: str) -> Path:
        """A file in the output folder."""
        return self.out / filename

    def progress(self, iterable: Optional[Iterable] = None, **kwargs):
        return progress(iterable, self.show_progress, **kwargs)

    def close(self) -> None:
        """Close the log and restore the torch thread count changed by ``--threads``."""
        self.log.close()
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self.log.write("error", type=exc_type.__name__, message=str(exc))
        self.close()


def _check_out(out: Path) -> None:
    """An output folder must be new or empty: a second run would append to ``log.jsonl`` and
    ``monitor.jsonl`` and overwrite ``config.yaml``, mixing two runs."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        held = sorted(p.name for p in out.iterdir())
        raise ConfigError(f"--out {str(out)!r} already exists and is not empty (holds {', '.join(held[:5])}"
                          f"{', ...' if len(held) > 5 else ''}): runs are never mixed in one folder; choose a "
                          f"new --out (or leave it out for runs/NAME/<timestamp>), or empty that folder")


def _check_gpu(cfg: Mapping, device: torch.device, explicit_cpu: bool, config_file) -> None:
    """``gpu: true`` marks a config sized for a GPU: refuse to fall back to the CPU silently."""
    if cfg.get("gpu") is True and device.type != "cuda" and not explicit_cpu:
        src = f"config {str(config_file)!r}" if config_file else "this config"
        raise ConfigError(f"{src} is sized for a GPU (gpu: true) but the run would use {device} "
                          f"(device={cfg['device']!r}, CUDA available: {torch.cuda.is_available()}); run it on a "
                          f"machine with CUDA, use the CPU config (configs/*_cpu.yaml), or pass --device cpu to "
                          f"run it on the CPU anyway (slow)")


def setup(name: str, defaults: Mapping, argv: Optional[Sequence[str]] = None,
          description: Optional[str] = None, data: bool = False,
          check: Optional[Callable[[dict], None]] = None, cli_defaults: Optional[Mapping] = None) -> Run:
    """Parse ``argv``, build and validate the config, run ``check(cfg)`` (the recipe's own checks,
    raising :class:`ConfigError`), resolve the device, refuse a non-empty ``--out``, then create the
    output folder, save ``config.yaml``, seed everything and open the log: nothing is written before
    every check has passed.  ``defaults`` must hold ``seed`` and ``device``, and ``data.root`` /
    ``data.download`` when ``data`` is true.  ``cli_defaults``: defaults of the command-line options
    (``{"config": PATH, "threads": "1"}``; the command line still overrides them, in every spelling)."""
    import yaml

    parser = build_parser(name, description, data)
    if cli_defaults:
        parser.set_defaults(**cli_defaults)
    args = parser.parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    cfg = copy.deepcopy(dict(defaults))
    if args.config:
        cfg = merge(defaults, cfg, load_config(args.config))
    cfg = apply_overrides(cfg, args.overrides, defaults)
    device_overridden = any(o.partition("=")[0].strip() == "device" for o in args.overrides)
    if args.seed is not None:
        cfg["seed"] = args.seed
    if args.device is not None:
        cfg["device"] = args.device
    if data:
        if args.data_root is not None:
            cfg["data"]["root"] = args.data_root
        if args.download:
            cfg["data"]["download"] = True
    validate(coerce_floats(cfg, defaults), defaults)
    if isinstance(cfg["seed"], bool) or not isinstance(cfg["seed"], int) or cfg["seed"] < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {cfg['seed']!r}")
    if check is not None:
        check(cfg)
    device = resolve_device(cfg["device"])
    _check_gpu(cfg, device, explicit_cpu=(args.device is not None or device_overridden) and cfg["device"] == "cpu",
               config_file=args.config)
    out = Path(args.out) if args.out else default_out(name)
    _check_out(out)
    if args.threads is not None:
        resolve_threads(args.threads)
    seed_everything(cfg["seed"])
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "config.yaml", "w", encoding="utf-8") as fh:
        yaml.safe_dump(to_jsonable(cfg, keep_nonfinite=True), fh, sort_keys=False)
    run = Run(name, cfg, out, device, show_progress=not args.no_progress, threads=args.threads)
    run.log.write("start", recipe=name, config=cfg, config_file=args.config, device=str(device),
                  argv=list(argv) if argv is not None else sys.argv[1:],
                  torch=torch.__version__, out=str(out), threads=run.threads)
    return run


# ------------------------------------------------------------------ classification: data, training
#: The ``data`` section shared by recipes that train classifiers (``setup(..., data=True)``).
DATA_DEFAULTS = {
    "name": "digits",       # "digits" (scikit-learn, offline) or "cifar100" (torchvision; --data-root/--download)
    "root": None,           # CIFAR-100: folder holding cifar-100-python/ (a fixture folder works too)
    "download": False,
    "test_fraction": 0.2,   # digits only
    "num_workers": 0,
}

#: ``data.name`` → ``(num_classes, in_channels)``.
DATASETS = {"digits": (10, 1), "cifar100": (100, 3)}


def check_classification(cfg: Mapping) -> None:
    """The checks shared by the ResNet recipes (``data``, ``model``, ``checkpoint``, ``pretrain``,
    ``eval_batch_size``), run before anything is written or trained; errors name the key."""
    d = cfg["data"]
    name = check_choice(d["name"], "data.name", tuple(DATASETS))
    check_optional_str(d["root"], "data.root", "a folder")
    if name != "cifar100" and (d["root"] is not None or d["download"]):
        given = [x for x, on in (("data.root / --data-root", d["root"] is not None),
                                 ("data.download / --download", d["download"])) if on]
        raise ConfigError(f"{' and '.join(given)} only apply to data.name=cifar100, but data.name={name!r} "
                          f"(scikit-learn's bundled digits need neither): add data.name=cifar100 to use CIFAR-100, "
                          f"or drop them")
    check_int(d["num_workers"], "data.num_workers", 0)
    if name == "digits":
        check_real(d["test_fraction"], "data.test_fraction", 0.0, 1.0, low_open=True, high_open=True)
        from torch_qode.data import digits_split_sizes

        try:
            digits_split_sizes(d["test_fraction"])
        except ValueError as exc:
            raise ConfigError(f"data.test_fraction: {exc}") from None
    classes, channels = DATASETS[name]
    try:
        from torch_qode.models import cifar_resnet_num_params

        cifar_resnet_num_params(cfg["model"]["depth"], cfg["model"]["widen"], classes, channels)
    except (TypeError, ValueError) as exc:
        raise keyed_error("model", exc, ("depth", "widen")) from None
    if check_optional_str(cfg["checkpoint"], "checkpoint") is not None and not Path(cfg["checkpoint"]).is_file():
        raise ConfigError(f"checkpoint {cfg['checkpoint']!r} not found (a state_dict file, read with "
                          f"torch.load(weights_only=True))")
    pt = cfg["pretrain"]
    check_int(pt["epochs"], "pretrain.epochs", 0)
    check_int(pt["batch_size"], "pretrain.batch_size", 1)
    check_real(pt["lr"], "pretrain.lr", 0.0, low_open=True)
    check_real(pt["momentum"], "pretrain.momentum", 0.0)
    check_real(pt["weight_decay"], "pretrain.weight_decay", 0.0)
    check_choice(pt["schedule"], "pretrain.schedule", ("cosine", "constant"))
    check_int(cfg["eval_batch_size"], "eval_batch_size", 1)


def classification_data(data: Mapping, seed: int = 0) -> dict:
    """``{"train", "test", "plain_train", "in_channels", "num_classes", "name", "root", "is_fixture"}``
    for ``data`` (see :data:`DATA_DEFAULTS`); ``plain_train`` is the training split without
    augmentation (for Hessians); ``is_fixture`` tells the CIFAR-100 test fixture
    (:func:`torch_qode.data.write_cifar100_fixture`) from real data.
    CIFAR-100 errors name both remedies (``--data-root``, ``--download``)."""
    name = data["name"]
    if name == "digits":
        from torch.utils.data import TensorDataset

        from torch_qode.data import DIGITS_CLASSES, digits_tensors

        try:
            tr = TensorDataset(*digits_tensors("train", data["test_fraction"], seed))
            te = TensorDataset(*digits_tensors("test", data["test_fraction"], seed))
        except ValueError as exc:
            raise ConfigError(f"data.test_fraction: {exc}") from None
        return {"train": tr, "test": te, "plain_train": tr, "in_channels": 1, "num_classes": DIGITS_CLASSES,
                "name": "digits", "root": None, "is_fixture": False}
    if name == "cifar100":
        from torch_qode.data import cifar100

        if data["root"] is None:
            raise ConfigError("data.name=cifar100 needs --data-root (a folder holding cifar-100-python/), "
                              "plus --download where a network exists")
        kw = dict(download=bool(data["download"]))
        train = cifar100(data["root"], train=True, **kw)
        return {"train": train,
                "test": cifar100(data["root"], train=False),
                "plain_train": cifar100(data["root"], train=True, augment=False),
                "in_channels": 3, "num_classes": 100, "name": "cifar100", "root": str(data["root"]),
                "is_fixture": bool(getattr(train, "is_fixture", False))}
    raise ConfigError(f"data.name must be 'digits' or 'cifar100', got {name!r}")


def fixed_batch(dataset, size: int, seed: int = 0, device=None) -> tuple:
    """``(inputs, targets)``: ``size`` samples drawn without replacement with ``seed`` (all if fewer)."""
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(len(dataset), generator=g)[: min(int(size), len(dataset))].tolist()
    xs, ys = zip(*(dataset[i] for i in idx))
    return torch.stack(xs).to(device), torch.as_tensor(ys).to(device)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device) -> dict:
    """``{"acc", "loss"}`` of a classifier over ``loader`` (cross-entropy), in eval mode; the model's
    mode is restored afterwards."""
    was_training = model.training
    model.eval()
    correct, total, loss = 0, 0, 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss += float(torch.nn.functional.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        total += int(y.numel())
    model.train(was_training)
    return {"acc": correct / max(total, 1), "loss": loss / max(total, 1)}


def train_classifier(model: torch.nn.Module, loader, device, *, epochs: int, lr: float, momentum: float = 0.9,
                     weight_decay: float = 0.0, schedule: str = "cosine", run: Optional["Run"] = None,
                     test_loader=None, tag: str = "pretrain") -> list:
    """Plain SGD (momentum, weight decay, ``cosine`` or ``constant`` lr) for ``epochs`` epochs with
    cross-entropy; logs one ``tag`` record per epoch to ``run.log`` (train loss, test accuracy).
    Returns the per-epoch records."""
    if schedule not in ("cosine", "constant"):
        raise ConfigError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    total = max(epochs * len(loader), 1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total) if schedule == "cosine" else None
    records = []
    bar = progress(total=epochs * len(loader), enabled=run.show_progress if run else False, desc=tag)
    model.train()
    for epoch in range(epochs):
        seen, loss_sum = 0, 0.0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{tag}: non-finite loss at epoch {epoch}; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            seen += int(y.numel())
            loss_sum += float(loss.detach()) * int(y.numel())
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        rec = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "lr": opt.param_groups[0]["lr"]}
        if test_loader is not None:
            rec["test_acc"] = evaluate(model, test_loader, device)["acc"]
        records.append(rec)
        if run is not None:
            run.log.write(tag, **rec)
    bar.close()
    return records


def load_checkpoint(model: torch.nn.Module, path, device=None, describe: Optional[str] = None) -> dict:
    """Load weights with ``torch.load(..., weights_only=True)`` (no arbitrary code is unpickled).
    Accepts a bare ``state_dict`` or a dict holding one under ``"model"`` or ``"state_dict"``.
    Returns the (possibly outer) dict that was read.  A state_dict that does not fit ``model``
    (``describe``: how the model was built, for the message) or holds non-finite floats raises
    :class:`ConfigError` naming ``checkpoint``; the model is left unchanged then."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} not found")
    obj = torch.load(path, map_location=device or "cpu", weights_only=True)
    state = obj
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                state = obj[key]
                break
    if not isinstance(state, dict):
        raise ConfigError(f"checkpoint {str(path)!r} holds no state_dict (got {type(state).__name__})")
    bad = [k for k, v in state.items() if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())
           and not bool(torch.isfinite(v).all())]
    if bad:
        raise ConfigError(f"checkpoint {str(path)!r} holds non-finite values (NaN or inf) in {len(bad)} tensor(s), "
                          f"e.g. {', '.join(bad[:3])}: refusing to load them")
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(want[k].shape)}" for k in want
              if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != want[k].shape]
    if missing or unexpected or shapes:
        what = []
        if missing:
            what.append(f"{len(missing)} missing key(s), e.g. {', '.join(missing[:3])}")
        if unexpected:
            what.append(f"{len(unexpected)} unexpected key(s), e.g. {', '.join(unexpected[:3])}")
        if shapes:
            what.append(f"{len(shapes)} shape mismatch(es) (checkpoint vs model), e.g. {'; '.join(shapes[:2])}")
        raise ConfigError(f"checkpoint {str(path)!r} does not fit the model"
                          f"{' ' + describe if describe else ''}: {'; '.join(what)}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"checkpoint {str(path)!r} does not fit the model"
                          f"{' ' + describe if describe else ''}: {exc}") from None
    return obj


def pretrained_resnet(run: "Run", checkpoint_name: str = "pretrained.pt") -> dict:
    """The shared start of the ResNet recipes, from ``run.cfg``'s ``data``, ``model``, ``checkpoint``,
    ``pretrain``, ``eval_batch_size`` and ``seed``: the data, a ``cifar_resnet`` on ``run.device``, the
    loaders, then the ``checkpoint`` loaded (``weights_only``) or dense pre-training (saved as
    ``checkpoint_name`` when ``pretrain.save``).  Logs ``model`` and ``dense`` records.

    Returns ``{"data", "model", "train_loader", "test_loader", "params", "dense"}`` (``dense``: the
    ``{"acc", "loss"}`` of :func:`evaluate`)."""
    from torch_qode.data import loaders
    from torch_qode.models import cifar_resnet

    cfg, dev = run.cfg, run.device
    data = classification_data(cfg["data"], cfg["seed"])
    run.log.write("data", name=data["name"], root=data["root"], is_fixture=data["is_fixture"],
                  train_samples=len(data["train"]), test_samples=len(data["test"]))
    src = {"digits": "scikit-learn's bundled digits"}.get(data["name"], f"CIFAR-100 from {data['root']}")
    print(f"data: {src} ({len(data['train'])} train / {len(data['test'])} test samples)"
          + (" -- the torch_qode TEST FIXTURE (synthetic images), not real CIFAR-100" if data["is_fixture"] else ""))
    model = cifar_resnet(cfg["model"]["depth"], cfg["model"]["widen"], data["num_classes"],
                         data["in_channels"]).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    run.log.write("model", depth=cfg["model"]["depth"], widen=cfg["model"]["widen"], params=n_params,
                  train_samples=len(data["train"]), test_samples=len(data["test"]))
    pt = cfg["pretrain"]
    train_loader, test_loader = loaders(data["train"], data["test"], batch_size=pt["batch_size"],
                                        test_batch_size=cfg["eval_batch_size"], seed=cfg["seed"],
                                        num_workers=cfg["data"]["num_workers"])
    if cfg["checkpoint"] is not None:
        load_checkpoint(model, cfg["checkpoint"], dev,
                        describe=f"cifar_resnet(depth={cfg['model']['depth']}, widen={cfg['model']['widen']}, "
                                 f"num_classes={data['num_classes']}, in_channels={data['in_channels']}) built from "
                                 f"model.depth, model.widen and data.name={data['name']!r}")
        run.log.write("checkpoint", path=cfg["checkpoint"])
    elif pt["epochs"] > 0:
        train_classifier(model, train_loader, dev, epochs=pt["epochs"], lr=pt["lr"], momentum=pt["momentum"],
                         weight_decay=pt["weight_decay"], schedule=pt["schedule"], run=run, test_loader=test_loader)
        if pt["save"]:
            torch.save(model.state_dict(), run.path(checkpoint_name))
    dense = evaluate(model, test_loader, dev)
    run.log.write("dense", **dense)
    return {"data": data, "model": model, "train_loader": train_loader, "test_loader": test_loader,
            "params": n_params, "dense": dense}
