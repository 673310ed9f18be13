"""Model checkpoints of the recipes: a ``state_dict`` saved with ``torch.save`` and read back with
``torch.load(..., weights_only=True)`` (no arbitrary code is unpickled), refused with a
:class:`~recipes.config.ConfigError` naming ``checkpoint`` when it holds non-finite values or does
not fit the model — the model is left unchanged then.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import torch

from recipes.config import ConfigError

__all__ = ["save_checkpoint", "load_checkpoint", "read_state_dict", "non_finite_keys", "misfit"]


def save_checkpoint(model: torch.nn.Module, path) -> Path:
    """Write ``model.state_dict()`` to ``path`` (readable by :func:`load_checkpoint`); returns the path."""
    path = Path(path)
    torch.save(model.state_dict(), path)
    return path


def read_state_dict(path, device=None) -> tuple:
    """``(obj, state)``: what the file holds (``torch.load(..., weights_only=True)``) and the
    ``state_dict`` in it — ``obj`` itself, or ``obj["model"]`` / ``obj["state_dict"]``."""
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
    return obj, state


def non_finite_keys(state: dict) -> List[str]:
    """The keys of ``state`` whose floating-point (or complex) tensors hold a NaN or an inf."""
    return [k for k, v in state.items() if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())
            and not bool(torch.isfinite(v).all())]


def misfit(state: dict, model: torch.nn.Module) -> List[str]:
    """What keeps ``state`` from fitting ``model``: missing and unexpected keys, shape mismatches
    (``[]`` when it fits)."""
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(want[k].shape)}" for k in want
              if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != want[k].shape]
    what = []
    if missing:
        what.append(f"{len(missing)} missing key(s), e.g. {', '.join(missing[:3])}")
    if unexpected:
        what.append(f"{len(unexpected)} unexpected key(s), e.g. {', '.join(unexpected[:3])}")
    if shapes:
        what.append(f"{len(shapes)} shape mismatch(es) (checkpoint vs model), e.g. {'; '.join(shapes[:2])}")
    return what


def load_checkpoint(model: torch.nn.Module, path, device=None, describe: Optional[str] = None) -> Any:
    """Load weights with ``torch.load(..., weights_only=True)`` (no arbitrary code is unpickled).
    Accepts a bare ``state_dict`` or a dict holding one under ``"model"`` or ``"state_dict"``.
    Returns the (possibly outer) dict that was read.  A state_dict that does not fit ``model``
    (``describe``: how the model was built, for the message) or holds non-finite floats raises
    :class:`ConfigError` naming ``checkpoint``; the model is left unchanged then."""
    path = Path(path)
    obj, state = read_state_dict(path, device)
    bad = non_finite_keys(state)
    if bad:
        raise ConfigError(f"checkpoint {str(path)!r} holds non-finite values (NaN or inf) in {len(bad)} tensor(s), "
                          f"e.g. {', '.join(bad[:3])}: refusing to load them")
    what = misfit(state, model)
    if what:
        raise ConfigError(f"checkpoint {str(path)!r} does not fit the model"
                          f"{' ' + describe if describe else ''}: {'; '.join(what)}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"checkpoint {str(path)!r} does not fit the model"
                          f"{' ' + describe if describe else ''}: {exc}") from None
    return obj
