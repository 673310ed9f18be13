"""The recipes' training loop plumbing: the JSON-lines log, progress bars, plain-text tables, fixed
batches, classifier evaluation and plain SGD (pre-)training.

Every log record is one strict-JSON line (:class:`JsonlLogger`, values through :func:`to_jsonable`);
progress bars are tqdm, off when stderr is not a terminal.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch

from recipes.config import ConfigError

if TYPE_CHECKING:       # pragma: no cover
    from recipes.cli import Run

__all__ = ["to_jsonable", "JsonlLogger", "progress", "format_table", "batch_stream", "fixed_batch", "evaluate",
           "train_classifier"]


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


def progress(iterable: Optional[Iterable] = None, enabled: bool = True, **kwargs) -> Any:
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


def batch_stream(dataset, batch_size: int, seed: int, device, *, num_workers: int = 0, pin_memory: bool = False,
                 persistent_workers: bool = False) -> Iterator[tuple]:
    """An endless stream of random ``(inputs, targets)`` batches on ``device`` (a fresh permutation
    per epoch, seeded).  ``num_workers`` processes prepare the batches (augmentation off the main
    thread, overlapped with training; the order and, with seeded workers, the draws do not depend on
    it); ``pin_memory`` (CUDA only) page-locks them so the copies run ``non_blocking``;
    ``persistent_workers`` keeps the workers between epochs (they draw no fresh seed from the
    generator per epoch, so from the second epoch on the order differs from a run without them:
    seeded and reproducible all the same)."""
    device = torch.device(device)
    pin = bool(pin_memory) and device.type == "cuda"
    loader = torch.utils.data.DataLoader(dataset, batch_size=min(batch_size, len(dataset)), shuffle=True,
                                         drop_last=len(dataset) >= batch_size,
                                         generator=torch.Generator().manual_seed(seed), num_workers=num_workers,
                                         pin_memory=pin,
                                         persistent_workers=bool(persistent_workers) and num_workers > 0)
    while True:
        for x, y in loader:
            yield x.to(device, non_blocking=pin), y.to(device, non_blocking=pin)


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
                     weight_decay: float = 0.0, schedule: str = "cosine", run: Optional[Run] = None,
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


