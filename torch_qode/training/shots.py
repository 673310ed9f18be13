"""The tomography's shots for a window: a fixed budget, the exact readout (``None``) or ``shots="auto"``.

``shots="auto"`` chooses, once per window, the fewest shots for which the readout model
(:mod:`torch_qode.core.readout_model`) predicts a readout-noise part of at most ``readout_error`` times
the window's displacement, capped by ``max_shots``.  The displacement is *predicted at the upload*:
to first order ``u(T)`` is the path of T gradient steps at θ0, ``T·F0(0)`` (norm ``T·‖η g‖``), known
as soon as the upload step is recorded (:func:`predicted_displacement`).  So

- ``readout="displacement"`` reads ``u(T)``: its noise part is the tomography's relative error on ``u``
  (``‖u‖`` is the displacement), and the shots are ``shots_for_error(T·F0(0), readout_error)``;
- ``readout="weights"`` reads ``θ0 + u(T)``: its noise is ``rel_err · ‖θ‖``, so the relative error
  asked of the model is ``readout_error · ‖T·F0(0)‖ / ‖θ0‖`` on the vector θ0 (on S).

The choice depends only on the window's recorded data (θ0 and the first recorded ``F0``), so a resumed
window chooses the same shots.  The report's ``tomography["shots"]`` and the ledger's ``readout_shots``
carry the shots used (``resources["readout_gates"]``: the gates they imply).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_int
from ..core.readout_model import expected_relative_error, shots_for_error

__all__ = ["AUTO", "READOUT_WARN_ERROR", "check_shots", "check_auto", "model_options", "predicted_displacement",
           "auto_shots", "window_shots", "readout_warning"]

#: the value of ``shots`` that asks the readout model for the shots
AUTO = "auto"
#: QODE warns (once) when the tomography error model predicts more than this relative readout error.
READOUT_WARN_ERROR = 0.1


def check_shots(value, name: str):
    """The check of the ``shots`` setting: ``None`` (exact readout), ``"auto"`` or an int ≥ 1.

    Args:
        value: the value given.
        name: the argument's name (for the message).

    Returns:
        The value (an int, ``None`` or ``"auto"``).

    Raises:
        ValueError: a string other than ``"auto"``, or an int < 1.
        TypeError: a value of another kind.
    """
    if isinstance(value, str):
        if value != AUTO:
            raise ValueError(f"{name} must be an int ≥ 1, None (exact readout) or 'auto', got {value!r}")
        return value
    return None if value is None else check_int(value, name, 1)


def check_auto(cfg) -> None:
    """``shots="auto"`` needs a sign scheme with an error model (checked when the settings are made).

    Args:
        cfg: the settings.

    Raises:
        ValueError: ``shots="auto"`` with a sign scheme the readout model cannot predict."""
    if cfg.shots != AUTO:
        return
    try:
        shots_for_error(torch.tensor([1.0, 0.5, 0.25]), cfg.readout_error, **model_options(cfg))
    except NotImplementedError as exc:
        raise ValueError(f"shots='auto' needs a sign scheme with an error model: {exc}") from None


def model_options(cfg) -> dict:
    """The readout model's keywords for the settings ``cfg`` (``sign_method``, ``split``, ``norm``,
    ``norm_scale``, from :meth:`~.config.QODEConfig.readout_options`).

    Args:
        cfg: the settings.

    Returns:
        The keywords of :func:`~torch_qode.core.readout_model.shots_for_error`."""
    opts = cfg.readout_options()
    return {k: opts.get(k) for k in ("sign_method", "split", "norm", "norm_scale")}


def predicted_displacement(win) -> torch.Tensor:
    """The window's displacement as the upload predicts it: ``T·F0`` on S, F0 the first recorded step's
    (the frozen one with ``noise="frozen"``); zeros when no step was recorded yet.

    Args:
        win: the window (:class:`~.window.Window`).

    Returns:
        A vector on S."""
    rows = win.tape.rows
    f0 = win.frozen if win.frozen is not None else (rows[min(rows)] if rows else None)
    if f0 is None:
        n = win.theta0.numel() if win.support is None else win.support.numel()
        return torch.zeros(n, dtype=torch.float64, device=win.theta0.device)
    return (win.T or win.cfg.window_length) * f0


def auto_shots(cfg, theta0_S: torch.Tensor, displacement: torch.Tensor) -> tuple:
    """``shots="auto"``: the shots for which the predicted readout-noise part is ``cfg.readout_error`` of
    the displacement (the module docstring), and the cap.

    Args:
        cfg: the settings (``readout``, ``readout_error``, ``max_shots``, the tomography options).
        theta0_S: θ0 on S.
        displacement: the predicted displacement on S (:func:`predicted_displacement`).

    Returns:
        ``(shots, need)``: the shots to use (``min(need, max_shots)``) and those the model needs
        (``None`` when nothing can be predicted: a zero displacement, or zero weights; then ``max_shots``).
    """
    d = float(torch.linalg.vector_norm(displacement))
    if cfg.readout == "displacement":
        v, target = displacement, cfg.readout_error
    else:
        t = float(torch.linalg.vector_norm(theta0_S))
        v, target = theta0_S, (cfg.readout_error * d / t if t > 0 else 0.0)
    if d == 0 or target <= 0 or not bool(v.any()):
        return cfg.max_shots, None
    need = shots_for_error(v, target, **model_options(cfg))
    return min(need, cfg.max_shots), need


def window_shots(win) -> Optional[int]:
    """The shots the window's readout takes: ``cfg.shots``, or with ``"auto"`` :func:`auto_shots` on the
    window's θ0 and :func:`predicted_displacement`.

    Args:
        win: the window.

    Returns:
        An int, or ``None`` (exact readout)."""
    cfg = win.cfg
    if cfg.shots != AUTO:
        return cfg.shots
    theta0_S = (win.theta0 if win.support is None else win.theta0[win.support]).to(torch.float64)
    return auto_shots(cfg, theta0_S, predicted_displacement(win))[0]


def readout_warning(cfg, values: torch.Tensor, displacement: Optional[torch.Tensor] = None) -> Optional[str]:
    """Why the shots cannot resolve ``values`` (the vector a window reads, as the upload knows it:
    ``Window.read_estimate()``), naming the shots that give :data:`READOUT_WARN_ERROR`, or ``None``
    (exact readout, a scheme without an error model, or a predicted error within it).  With
    ``shots="auto"``: why ``max_shots`` caps the shots, naming those the model needs.  The core's model:
    :mod:`torch_qode.core.readout_model` (a relative error: it depends on the vector's shape, not its scale).

    Args:
        cfg: the settings (``shots``, ``readout``, the tomography options).
        values: with ``readout="weights"`` θ0 on S; with ``readout="displacement"`` the window's first-order
            displacement ``T·F0(0)`` on S (``u(T)`` is not known at the upload).
        displacement: with ``shots="auto"``: the predicted displacement on S (default: ``values``).

    Returns:
        The warning's text, or ``None``.
    """
    if cfg.shots is None or not bool(values.any()):
        return None
    if cfg.shots == AUTO:
        used, need = auto_shots(cfg, values, values if displacement is None else displacement)
        if need is None or need <= cfg.max_shots:
            return None
        return (f"QODE: shots='auto' needs about shots={need:,} for a predicted readout-noise part of "
                f"{cfg.readout_error:g} of the window's displacement (readout={cfg.readout!r}); max_shots="
                f"{cfg.max_shots:,} caps it: the readout takes {used:,} shots")
    model = model_options(cfg)
    try:
        err = expected_relative_error(values, cfg.shots, **model)
    except NotImplementedError:
        return None
    if err <= READOUT_WARN_ERROR:
        return None
    need = shots_for_error(values, READOUT_WARN_ERROR, **model)
    r = int(torch.count_nonzero(values))
    what = "weights θ0 + u(T)" if cfg.readout == "weights" else "components of u(T) (estimated as T·F0(0))"
    return (f"QODE: shots={cfg.shots:,} cannot resolve the {r:,} {what} the readout reads (readout="
            f"{cfg.readout!r}): the tomography error "
            f"model predicts a relative readout error of {err:.2g} with sign_method={model['sign_method']!r}; "
            f"about shots={need:,} give {READOUT_WARN_ERROR:.0%} "
            "(torch_qode.core.readout_model.shots_for_error)")
