"""Shared plumbing of the recipes: command line, config, output folder, JSON-lines log, progress, seeds.

Every recipe is a module with a ``DEFAULTS`` dict (the complete, typed schema of its config) and a
``main(argv=None)`` that starts with :func:`setup` and runs inside the returned :class:`Run`::

    DEFAULTS = {"seed": 0, "device": "auto", "n": 8, "model": {"depth": 8}}

    def main(argv=None):
        with common.setup("my_recipe", DEFAULTS, argv, description=__doc__) as run:
            run.log.write("step", step=0, loss=1.0)
            for t in run.progress(range(10), desc="steps"):
                ...
            return {"out": str(run.out)}

Command line (``python -m recipes.NAME --config configs/NAME.yaml [key=value ...]``):

``--config PATH``
    YAML file, read with ``yaml.safe_load`` only; its keys must exist in ``DEFAULTS``.
``key=value`` (any number, after the options)
    Dotted overrides (``model.depth=8``, ``lr=0.01``, ``flag=true``, ``fs=[1, 0.5]``); values are
    parsed with ``yaml.safe_load``. Unknown keys are an error naming the key and the allowed ones.
``--out DIR``
    Output folder (default ``runs/NAME/<YYYYmmdd-HHMMSS>``); receives ``config.yaml`` (the merged,
    validated config), ``log.jsonl`` and the figures.
``--seed N``, ``--device {auto,cpu,cuda,cuda:1,...}``
    Shortcuts for the ``seed`` / ``device`` keys; ``auto`` is CUDA when available, else CPU.
``--data-root DIR``, ``--download``
    Only for recipes built with ``data=True``: shortcuts for ``data.root`` / ``data.download``.
``--threads {auto,N}``
    ``torch.set_num_threads`` for the run (restored afterwards).  ``auto`` (the default) takes the
    cores that the 1-minute load average leaves free, at least one: with two threads, OpenMP's
    spinning made PyTorch up to 60x slower while another process held a core.
``--no-progress``
    No tqdm bars (they are also off when stderr is not a terminal).

Precedence: ``DEFAULTS`` < ``--config`` file < ``key=value`` overrides < dedicated flags.

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
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

__all__ = ["ConfigError", "Run", "JsonlLogger", "setup", "build_parser", "load_config", "merge",
           "apply_overrides", "coerce_floats", "validate", "seed_everything", "resolve_device", "to_jsonable",
           "progress", "format_table", "default_out", "DATA_DEFAULTS", "classification_data", "fixed_batch",
           "evaluate", "train_classifier", "load_checkpoint", "pretrained_resnet"]


class ConfigError(ValueError):
    """A config file or override is malformed, names an unknown key or has the wrong type."""


# ------------------------------------------------------------------------------------------ config
def _flat_keys(d: Mapping, prefix: str = "") -> list:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.append(key)
        if isinstance(v, Mapping):
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
        data = yaml.safe_load(fh)
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
        if isinstance(schema[k], Mapping):
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
            if not isinstance(node_schema, Mapping) or part not in node_schema:
                raise _unknown(key, schema)
            if i == len(parts) - 1:
                if isinstance(node_schema[part], Mapping) and not isinstance(value, Mapping):
                    raise ConfigError(f"config key {key!r} is a section; set its sub-keys "
                                      f"({', '.join(f'{key}.{s}' for s in node_schema[part])})")
                node[part] = merge(node_schema[part], node[part], value, key + ".", schema) \
                    if isinstance(node_schema[part], Mapping) else value
            else:
                node_schema, node = node_schema[part], node[part]
    return out


def _type_ok(default, value) -> bool:
    if default is None or value is None:
        return True  # None in DEFAULTS means "any type"; None as a value means "unset"
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
        if isinstance(default, Mapping) and isinstance(cfg[k], dict):
            coerce_floats(cfg[k], default)
        elif isinstance(default, float) and isinstance(cfg[k], str):
            try:
                cfg[k] = float(cfg[k])
            except ValueError:
                pass  # validate() reports it
    return cfg


def validate(cfg: Mapping, schema: Mapping, prefix: str = "", root: Optional[Mapping] = None) -> None:
    """Check that ``cfg`` has exactly the keys of ``schema`` with compatible types."""
    root = schema if root is None else root
    for k, default in schema.items():
        key = f"{prefix}{k}"
        if k not in cfg:
            raise ConfigError(f"config key {key!r} is missing")
        if isinstance(default, Mapping):
            validate(cfg[k], default, key + ".", root)
        elif not _type_ok(default, cfg[k]):
            raise ConfigError(f"config key {key!r} must be of type {type(default).__name__} "
                              f"(default {default!r}), got {cfg[k]!r}")
    for k in cfg:
        if k not in schema:
            raise _unknown(f"{prefix}{k}", root)


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
    """``"auto"`` → ``cuda`` if available else ``cpu``; anything else must be a valid, present device."""
    if spec in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} requested but CUDA is not available; use device=cpu or auto")
    return dev


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy/torch scalars and arrays → numbers/lists, Path → str, dataclass-like
    objects with ``as_dict()`` → dict; non-finite floats → ``None`` (strict JSON has no NaN/inf)."""
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu()
        return to_jsonable(obj.item() if obj.dim() == 0 else obj.tolist())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (bool, int, str)) or obj is None:
        return obj
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.device):
        return str(obj)
    if hasattr(obj, "as_dict"):
        return to_jsonable(obj.as_dict())
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


def setup(name: str, defaults: Mapping, argv: Optional[Sequence[str]] = None,
          description: Optional[str] = None, data: bool = False) -> Run:
    """Parse ``argv``, build and validate the config, create the output folder, save ``config.yaml``,
    seed everything, resolve the device and open the log. ``defaults`` must hold ``seed`` and
    ``device``, and ``data.root`` / ``data.download`` when ``data`` is true."""
    import yaml

    parser = build_parser(name, description, data)
    args = parser.parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    cfg = copy.deepcopy(dict(defaults))
    if args.config:
        cfg = merge(defaults, cfg, load_config(args.config))
    cfg = apply_overrides(cfg, args.overrides, defaults)
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
    device = resolve_device(cfg["device"])
    seed_everything(cfg["seed"])
    out = Path(args.out) if args.out else default_out(name)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "config.yaml", "w", encoding="utf-8") as fh:
        yaml.safe_dump(to_jsonable(cfg), fh, sort_keys=False)
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


def classification_data(data: Mapping, seed: int = 0) -> dict:
    """``{"train", "test", "plain_train", "in_channels", "num_classes"}`` for ``data`` (see
    :data:`DATA_DEFAULTS`); ``plain_train`` is the training split without augmentation (for Hessians).
    CIFAR-100 errors name both remedies (``--data-root``, ``--download``)."""
    name = data["name"]
    if name == "digits":
        from torch.utils.data import TensorDataset

        from torch_qode.data import DIGITS_CLASSES, digits_tensors

        tr = TensorDataset(*digits_tensors("train", data["test_fraction"], seed))
        te = TensorDataset(*digits_tensors("test", data["test_fraction"], seed))
        return {"train": tr, "test": te, "plain_train": tr, "in_channels": 1, "num_classes": DIGITS_CLASSES}
    if name == "cifar100":
        from torch_qode.data import cifar100

        if data["root"] is None:
            raise ConfigError("data.name=cifar100 needs --data-root (a folder holding cifar-100-python/), "
                              "plus --download where a network exists")
        kw = dict(download=bool(data["download"]))
        return {"train": cifar100(data["root"], train=True, **kw),
                "test": cifar100(data["root"], train=False),
                "plain_train": cifar100(data["root"], train=True, augment=False),
                "in_channels": 3, "num_classes": 100}
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


def load_checkpoint(model: torch.nn.Module, path, device=None) -> dict:
    """Load weights with ``torch.load(..., weights_only=True)`` (no arbitrary code is unpickled).
    Accepts a bare ``state_dict`` or a dict holding one under ``"model"`` or ``"state_dict"``.
    Returns the (possibly outer) dict that was read."""
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
    model.load_state_dict(state)
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
    model = cifar_resnet(cfg["model"]["depth"], cfg["model"]["widen"], data["num_classes"],
                         data["in_channels"]).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    run.log.write("model", depth=cfg["model"]["depth"], widen=cfg["model"]["widen"], params=n_params,
                  train_samples=len(data["train"]), test_samples=len(data["test"]))
    pt = cfg["pretrain"]
    train_loader, test_loader = loaders(data["train"], data["test"], batch_size=pt["batch_size"],
                                        test_batch_size=cfg["eval_batch_size"], seed=cfg["seed"],
                                        num_workers=cfg["data"]["num_workers"])
    if cfg["checkpoint"]:
        load_checkpoint(model, cfg["checkpoint"], dev)
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
