"""The recipes' command line and run: argparse, the output folder, device, threads and seeds.

Every recipe is a module with a ``Config`` dataclass (the complete, typed schema of its config, an
OmegaConf structured config, see :mod:`recipes.config`) and a ``main(argv=None)`` that starts with
:func:`setup` and runs inside the returned :class:`Run`::

    @dataclass
    class Config:
        seed: int = 0
        device: str = "auto"
        n: int = 8

    def check(cfg):     # every option, before anything is written: ConfigErrors naming the key
        config.check_int(cfg["n"], "n", 1)

    def main(argv=None):
        with cli.setup("my_recipe", Config, argv, description=__doc__, check=check) as run:
            run.log.write("step", step=0, loss=1.0)
            for t in run.progress(range(10), desc="steps"):
                ...
            return {"out": str(run.out)}

Command line (``python -m recipes.NAME --config configs/NAME.yaml [key=value ...]``):

``--config PATH``
    YAML file, read with OmegaConf's safe loader; its keys must exist in ``Config``.  A syntax
    error is a :class:`~recipes.config.ConfigError` naming the file and the line.
``key=value`` (any number, after the options)
    Dotted overrides (``model.depth=8``, ``lr=0.01``, ``flag=true``, ``fs=[1, 0.5]``), parsed and
    merged by OmegaConf (values as YAML).  An unknown key is an error naming it, the closest key and
    the allowed ones.
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
``--nproc N``
    Recipes that train or measure on batches (``train_resnet_cifar100``, ``hessian_after_pruning``):
    N torch.distributed processes on this machine (gloo; NCCL with ``--device cuda``), each with 1/N of
    every batch; or run the recipe under ``torchrun --nproc_per_node N``.  Rank 0 writes the folder, the
    log, the figures and the progress bars; ``--threads auto`` splits the free cores over the ranks.

Precedence: ``Config``'s defaults < ``--config`` file < ``key=value`` overrides < dedicated flags.
Every key is checked (``setup``'s ``check``) before the output folder is created or any training starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import functools
import math
import os
import random
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

from recipes import launch
from recipes.config import ConfigError, build, check_int, load_config
from recipes.loop import JsonlLogger, progress, to_jsonable

__all__ = ["Run", "setup", "build_parser", "seed_everything", "resolve_device", "resolve_threads", "free_cores",
           "default_out", "maybe_spawn"]


# ------------------------------------------------------------------------------------ environment
#: run-time keys of every recipe's config (``setup`` adds them to the recipe's ``Config``):
#: ``cudnn_benchmark`` lets cuDNN time its kernels for the shapes it meets (GPU configs; the fastest
#: kernel may differ run to run); ``deterministic`` asks for bit-for-bit reruns and resumes on a GPU:
#: ``torch.use_deterministic_algorithms(True)`` (an op without a deterministic kernel raises),
#: cuDNN deterministic and not benchmarking, TF32 off, and ``CUBLAS_WORKSPACE_CONFIG=:4096:8``.
RUNTIME_DEFAULTS = {"deterministic": False, "cudnn_benchmark": False}


def with_runtime(schema: type) -> type:
    """``schema`` with the run-time keys (:data:`RUNTIME_DEFAULTS`) it does not declare itself."""
    have = {f.name for f in dataclasses.fields(schema)}
    extra = [(k, bool, v) for k, v in RUNTIME_DEFAULTS.items() if k not in have]
    return dataclasses.make_dataclass(schema.__name__, extra, bases=(schema,)) if extra else schema


def apply_runtime(cfg: Mapping) -> Callable[[], None]:
    """Set the torch back-end flags of ``cfg``'s run-time keys; returns the function restoring them."""
    cudnn, cuda = torch.backends.cudnn, torch.backends.cuda
    before = (cudnn.benchmark, cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
              cuda.matmul.allow_tf32, cudnn.allow_tf32)
    if cfg["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        cudnn.deterministic, cudnn.benchmark = True, False
        cuda.matmul.allow_tf32 = cudnn.allow_tf32 = False
    else:
        cudnn.benchmark = bool(cfg["cudnn_benchmark"])

    def restore() -> None:
        cudnn.benchmark, cudnn.deterministic = before[0], before[1]
        torch.use_deterministic_algorithms(before[2])
        cuda.matmul.allow_tf32, cudnn.allow_tf32 = before[3], before[4]
    return restore


def _check_runtime(cfg: Mapping) -> None:
    if cfg["deterministic"] and cfg["cudnn_benchmark"]:
        raise ConfigError("deterministic=true and cudnn_benchmark=true contradict each other (benchmarking picks "
                          "kernels by timing): set cudnn_benchmark=false")


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global RNG and torch (CPU and CUDA)."""
    seed = check_int(seed, "seed", 0)
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
    p.add_argument("--nproc", type=int, default=1, help="torch.distributed processes (spawned here; or run "
                   "under torchrun): each takes 1/N of every batch")
    p.add_argument("--estimate-memory", action="store_true",
                   help="print the predicted peak device memory by component and exit without training (needs "
                        "no GPU; assumes an 80 GB device unless one is present)")
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
        return max(1, free_cores() // launch.world())
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
        self._restore_runtime = apply_runtime({**RUNTIME_DEFAULTS, **cfg})
        self.rank0 = launch.is_rank0()           # logs, bars and figures come from rank 0 only
        self.log = JsonlLogger(self.out / "log.jsonl") if self.rank0 else launch.NullLog()

    def path(self, filename: str) -> Path:
        """A file in the output folder."""
        return self.out / filename

    def progress(self, iterable: Optional[Iterable] = None, **kwargs) -> Any:
        """A tqdm bar (see :func:`recipes.loop.progress`), off with ``--no-progress``."""
        return progress(iterable, self.show_progress and self.rank0, **kwargs)

    def close(self) -> None:
        """Close the log and restore the torch thread count changed by ``--threads``."""
        self.log.close()
        if self._restore_runtime is not None:
            self._restore_runtime()
            self._restore_runtime = None
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


def _check_fits(est: Mapping) -> None:
    """Refuse a GPU run whose estimated peak exceeds the device's memory, naming the knobs."""
    if est["peak"] > est["device_bytes"]:
        from recipes.memory import GiB, format_estimate

        raise ConfigError(f"the estimated peak device memory {est['peak'] / GiB:.1f} GiB exceeds this device's "
                          f"{est['device_bytes'] / GiB:.1f} GiB; lower it with {', '.join(est['knobs'])} "
                          f"(--estimate-memory prints the components)\n{format_estimate(est)}")


def _check_gpu(cfg: Mapping, device: torch.device, explicit_cpu: bool, config_file) -> None:
    """``gpu: true`` marks a config sized for a GPU: refuse to fall back to the CPU silently."""
    if cfg.get("gpu") is True and device.type != "cuda" and not explicit_cpu:
        src = f"config {str(config_file)!r}" if config_file else "this config"
        raise ConfigError(f"{src} is sized for a GPU (gpu: true) but the run would use {device} "
                          f"(device={cfg['device']!r}, CUDA available: {torch.cuda.is_available()}); run it on a "
                          f"machine with CUDA, use the CPU config (configs/*_cpu.yaml), or pass --device cpu to "
                          f"run it on the CPU anyway (slow)")


def setup(name: str, schema: type, argv: Optional[Sequence[str]] = None,
          description: Optional[str] = None, data: bool = False,
          check: Optional[Callable[[dict], None]] = None, cli_defaults: Optional[Mapping] = None,
          estimate: Optional[Callable[[dict, int], dict]] = None) -> Run:
    """Parse ``argv``, build and validate the config, run ``check(cfg)`` (the recipe's own checks,
    raising :class:`ConfigError`), resolve the device, refuse a non-empty ``--out``, then create the
    output folder, save ``config.yaml``, seed everything and open the log: nothing is written before
    every check has passed.  ``schema`` (a dataclass, see :mod:`recipes.config`) must hold ``seed`` and
    ``device``, and ``data.root`` / ``data.download`` when ``data`` is true.  ``cli_defaults``: defaults
    of the command-line options (``{"config": PATH, "threads": "1"}``; the command line still overrides
    them, in every spelling).
    ``estimate(cfg, device_bytes)``: the recipe's memory model (:mod:`recipes.memory`); with
    ``--estimate-memory`` it is printed and the process exits (``SystemExit(0)``) before anything is
    written, and a CUDA run whose estimate exceeds the device's memory is refused, naming the knobs."""
    import yaml

    schema = with_runtime(schema)
    parser = build_parser(name, description, data)
    if cli_defaults:
        parser.set_defaults(**cli_defaults)
    args = parser.parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    cfg = build(schema, [load_config(args.config)] if args.config else [], args.overrides)
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
    if args.nproc > 1 and launch.world() == 1:
        raise ConfigError(f"--nproc {args.nproc}: recipes.{name} runs in one process (--nproc is for "
                          "train_resnet_cifar100, demo and hessian_after_pruning)")
    check_int(cfg["seed"], "seed", 0)
    _check_runtime(cfg)
    if check is not None:
        check(cfg)
    if args.estimate_memory:
        from recipes.memory import DEFAULT_DEVICE_BYTES, format_estimate, no_device_estimate

        gpu = torch.cuda.is_available() and cfg["device"] != "cpu"
        size = torch.cuda.get_device_properties(resolve_device(cfg["device"])).total_memory if gpu \
            else DEFAULT_DEVICE_BYTES
        print(format_estimate((estimate or no_device_estimate)(cfg, size)))
        raise SystemExit(0)
    device = resolve_device(cfg["device"])
    if device.type == "cuda" and estimate is not None:
        _check_fits(estimate(cfg, torch.cuda.get_device_properties(device).total_memory))
    _check_gpu(cfg, device, explicit_cpu=(args.device is not None or device_overridden) and cfg["device"] == "cpu",
               config_file=args.config)
    if device.type == "cuda" and launch.world() > 1:   # one GPU per rank
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", launch.rank())))
    out = Path(args.out) if args.out else default_out(name)
    error = None
    if launch.is_rank0():                        # the folder is rank 0's; every rank refuses with it
        try:
            _check_out(out)
        except ConfigError as exc:
            error = exc
    launch.agree(error)
    if args.threads is not None:
        resolve_threads(args.threads)
    seed_everything(cfg["seed"])
    if launch.is_rank0():
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "config.yaml", "w", encoding="utf-8") as fh:
            yaml.safe_dump(to_jsonable(cfg, keep_nonfinite=True), fh, sort_keys=False)
    run = Run(name, cfg, out, device, show_progress=not args.no_progress, threads=args.threads)
    run.log.write("start", recipe=name, config=cfg, config_file=args.config, device=str(device),
                  argv=list(argv) if argv is not None else sys.argv[1:],
                  torch=torch.__version__, out=str(out), threads=run.threads)
    return run




def maybe_spawn(target: str, argv, recipe: str, **kwargs):
    """``--nproc N`` (N > 1) outside torch.distributed: start N ranks (:func:`recipes.launch.spawn`) that
    each run ``target(argv, **kwargs)`` (the recipe's ``main``) with the same output folder, and return
    rank 0's result; else ``None``: the caller runs itself (one process, or a rank under ``torchrun``)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--out")
    p.add_argument("--device")
    argv = list(sys.argv[1:] if argv is None else argv)
    known, _ = p.parse_known_args(argv)
    if known.nproc < 1:
        raise ConfigError(f"--nproc must be an integer >= 1, got {known.nproc}")
    if known.nproc == 1 or launch.world() > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None
    if known.out is None:
        argv += ["--out", str(default_out(recipe))]
    # NCCL when the command line asks for CUDA; gloo otherwise (it also reduces CUDA tensors)
    device = resolve_device(known.device) if known.device not in (None, "auto") else torch.device("cpu")
    res = launch.spawn(functools.partial(launch.recipe_rank, target), known.nproc, (argv, kwargs),
                       backend=launch.backend_for(device, known.nproc), threads=None)
    errors = [r["config_error"] for r in res if "config_error" in r]
    if errors:
        raise ConfigError(errors[0])
    return res[0]["result"]
