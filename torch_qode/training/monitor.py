"""DissipationMonitor: Hessian spectra and error proxy over training (paper Fig. 2, Sec. III B).

Usable two ways:

* **attached to QODE** (``QODE(..., monitor=m)``): QODE calls :meth:`DissipationMonitor.on_upload`
  with the dissipation verdict of every upload and :meth:`DissipationMonitor.on_window_end` with
  the cycle report, so the error proxy of every quantum window is recorded as it was predicted;
* **standalone** in any training loop: ``monitor.step(step)`` records the Hessian spectrum of a
  fixed probe batch on a schedule — by default the paper's: every 10 steps for the first 200, then
  every 100.  It is not a Lightning ``Callback`` (this floor does not import Lightning): under a
  ``Trainer``, ``torch_qode.lightning.QODECallback(monitor=m)`` drives it with Lightning's hooks.

Records are plain dicts, appended to :attr:`DissipationMonitor.records` and, with ``log_path``,
written as JSON lines.  :meth:`DissipationMonitor.plot` draws the Fig. 2-style panels (needs
matplotlib).  The monitor leaves the model exactly as it found it: parameters, ``.grad``, training
modes, BatchNorm buffers and the global RNG (the spectrum is taken by
:func:`~torch_qode.dissipation.hessian_spectrum`, which restores all of them; a ``metric`` runs under
``torch.no_grad()`` on a forked RNG, and modes, buffers and ``.grad`` are restored afterwards).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from .._checks import as_int, check_choice, check_int, check_real, require_int
from .._figure import new_figure, positive as _positive, save
from ..bridge import flat as _flat
from ..bridge.collective import hvp_group
from ..bridge.flat import check_model_loss_batch
from ..bridge.dissipation import DissipationCheck, hessian_spectrum
from .window_monitor import WindowMonitor

__all__ = ["DissipationMonitor", "paper_schedule", "plot_training_panels"]


#: Keys :meth:`DissipationMonitor.step` computes itself; ``**extra`` may not override them.
_STEP_KEYS = ("step", "event", "top_eigenvalue", "positive_fraction", "proxy_T", "proxy_curve", "spectrum",
              "seconds", "deferred_from", "deferred_why")
#: The drift's parts in a window-end record and in panel (c) (``drift_`` + a key of ``report.drift["parts"]``).
PART_KEYS = ("drift_support", "drift_linearization", "drift_readout_pruning", "drift_readout_noise")


def paper_schedule(step: int) -> bool:
    """The paper's Fig. 2 schedule: every 10 steps for the first 200, then every 100."""
    return step % 10 == 0 if step < 200 else step % 100 == 0


def _jsonable(x):
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, torch.Tensor):
        return _jsonable(x.detach().cpu().tolist())
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    return x


class DissipationMonitor(WindowMonitor):
    """Record Hessian spectra, error-proxy curves and a test metric over training.

    Attached to QODE it implements the whole :class:`~torch_qode.training.window_monitor.WindowMonitor`
    protocol, the four methods QODE calls: :meth:`on_upload` ``(step, verdict)`` at each upload of
    ``mode="auto"`` (the predicted proxy curve), :meth:`on_window_open` ``(step, carleman)`` and
    :meth:`on_window_closed` ``(step)`` around a window (scheduled spectra wait while a window holds its
    upload graph), :meth:`on_window_end` ``(step, report)`` once a window is read out.  Any object with
    some of these methods may be QODE's monitor (QODE wraps it once, at construction, into one that has
    all four: :func:`~torch_qode.training.window_monitor.as_window_monitor`); subclass
    :class:`~torch_qode.training.window_monitor.WindowMonitor` to write one.

    Args:
        model, loss_fn, probe_batch: the spectrum is that of ``loss_fn(model(inputs), targets)`` on
            the fixed ``probe_batch = (inputs, targets)``.
        lr: learning rate η of the proxy's ``a = −ηλ`` (Eq. III.12).
        window: horizon ``T`` of the predicted proxy curve ``proxy(0..T)``.
        schedule: ``"paper"`` (:func:`paper_schedule`), a callable ``step -> bool`` or an iterable
            of integer steps (a list, range, numpy / torch integer array).
        backend, support, params: passed to :func:`~torch_qode.dissipation.hessian_spectrum`.
        check: the :class:`~torch_qode.dissipation.DissipationCheck` whose settings (Lanczos steps,
            runs, grid, seed, proxy form, cutoff ``c`` of Eq. III.14, flat bands) the monitor uses, so
            its numbers are the ones QODE's check would compute (default: ``DissipationCheck()``; the
            paper's code used 256 Lanczos steps).
        metric: optional ``model -> float`` (e.g. test accuracy) evaluated at scheduled steps.
        log_path: JSON-lines file (appended to; not a directory).
        process_group: under torch.distributed, average the probe spectrum's Hessian-vector products over
            this group (automatic for a DistributedDataParallel ``model``): each rank passes its shard of
            the probe batch and every rank records the global batch's spectrum.  Every rank must call
            :meth:`step` at the same steps; write ``log_path`` from one rank only.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, probe_batch, *, lr: float, window: int = 90,
                 schedule: Union[str, Callable[[int], bool], Iterable[int]] = "paper", backend: str = "torch",
                 check: Optional[DissipationCheck] = None, support=None, params=None,
                 metric: Optional[Callable[[nn.Module], float]] = None, log_path=None, process_group=None):
        check_model_loss_batch(model, loss_fn, probe_batch, ("model", "loss_fn", "probe_batch"))
        lr_f = check_real(lr, "lr", 0.0, low_open=True)
        window_i = check_int(window, "window", 0, hint=" (the proxy's horizon T)")
        self._scheduled = self._check_schedule(schedule)
        check_choice(backend, "backend", ("torch", "pyhessian"))
        if metric is not None and not callable(metric):
            raise TypeError("metric must be callable: model -> float")
        if check is not None and not isinstance(check, DissipationCheck):
            raise TypeError(f"check must be a DissipationCheck or None, got {type(check).__name__}")
        self.check = check if check is not None else DissipationCheck()
        hvp_group(model, process_group)               # a bad process_group is refused now, not at the first step
        self.model, self.loss_fn, self.probe_batch = model, loss_fn, tuple(probe_batch)
        self.lr, self.window = lr_f, window_i
        self.backend, self.metric = backend, metric
        c = self.check
        self._spectrum_kw = dict(backend=backend, steps=c.steps, runs=c.runs, grid=c.grid, sigma=c.sigma,
                                 support=support, params=params, seed=c.seed, trace=False,
                                 process_group=process_group)
        self.records: list[dict] = []
        self._holding: Optional[int] = None   # the upload step of a live window that holds its graph
        self._deferred: list[int] = []        # scheduled steps that fell inside such a window
        if log_path is not None and not isinstance(log_path, (str, os.PathLike)):
            raise TypeError(f"log_path must be None or a file path (str or os.PathLike), got {type(log_path).__name__}")
        self.log_path = None if log_path is None else Path(log_path)
        if self.log_path is not None:
            if self.log_path.is_dir():
                raise ValueError(f"log_path must be a file (JSON lines), got the directory {str(self.log_path)!r}")
            self.log_path.parent.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _check_schedule(schedule) -> Callable[[int], bool]:
        msg = "schedule must be 'paper', a callable step -> bool or an iterable of integer steps"
        if isinstance(schedule, str):
            if schedule == "paper":
                return paper_schedule
            raise ValueError(f"{msg}, got {schedule!r}")
        if callable(schedule):
            return schedule
        if isinstance(schedule, (torch.Tensor, np.ndarray)) and schedule.ndim != 1:
            raise TypeError(f"{msg}; an array schedule must be 1-D, got shape {tuple(schedule.shape)}")
        try:
            items = list(schedule)
        except TypeError:
            raise TypeError(f"{msg}, got {type(schedule).__name__} {schedule!r} (wrap a single step as [step])") \
                from None
        steps = set()
        for s in items:
            i = as_int(s)
            if i is None:
                raise TypeError(f"{msg}; schedule holds {s!r}, which is not an integer")
            steps.add(i)
        return steps.__contains__

    # ---------------------------------------------------------------------------- recording
    def scheduled(self, step: int) -> bool:
        """Whether the schedule takes a spectrum at integer ``step``.

        Args:
            step: a training step.

        Returns:
            ``True`` when the schedule includes ``step``.

        Raises:
            TypeError: ``step`` is not an integer.
        """
        return bool(self._scheduled(require_int(step, "step", "an integer (a training step)")))

    def step(self, step: int, force: bool = False, **extra) -> Optional[dict]:
        """At a scheduled ``step`` (or with ``force``), take the probe spectrum and record it.

        ``extra`` keys are added to the record; they may not override the computed ones
        (``step``, ``event``, ``top_eigenvalue``, …, and ``test_acc`` when a ``metric`` is set).
        While a window holds its upload graph, a due spectrum waits: it is taken at the first call after
        the window (the record says ``deferred_from``).

        Args:
            step: the training step (completed steps: the state the spectrum describes).
            force: take a spectrum even when ``step`` is not scheduled.
            **extra: more JSON-able values for the record.

        Returns:
            The record written (:meth:`record`), or ``None`` when no spectrum was taken.

        Raises:
            TypeError: ``step`` is not an integer.
            ValueError: an ``extra`` key is one the monitor computes.
        """
        step = require_int(step, "step", "an integer (a training step)")
        reserved = _STEP_KEYS + (("test_acc",) if self.metric is not None else ())
        clash = sorted(k for k in extra if k in reserved)
        if clash:
            raise ValueError(f"step(): extra keys {clash} are computed by the monitor and may not be overridden "
                             f"(reserved: {list(reserved)})")
        due = force or self.scheduled(step)
        if self._holding is not None:         # never a second graph beside the window's retained one
            if due:
                self._deferred.append(step)
            return None
        deferred, self._deferred = self._deferred, []
        if not (due or deferred):
            return None
        spec = hessian_spectrum(self.model, self.loss_fn, self.probe_batch, **self._spectrum_kw)
        dens = spec.density
        curve, pos, _ = self.check.evaluate(dens, self.lr, self.window)
        rec = {"step": step, "event": "spectrum", "top_eigenvalue": float(spec.top_eigenvalues[0]),
               "positive_fraction": pos, "proxy_T": float(curve[-1]),
               "proxy_curve": curve, "spectrum": {"grid": dens.grid, "density": dens.values},
               "seconds": float(sum(spec.seconds.values()))}
        if deferred:
            rec["deferred_from"] = deferred
            rec["deferred_why"] = ("scheduled inside a quantum window that held the upload batch's graph "
                                   "(hvp='retain'): taken at the first step after it, so that two graphs never coexist")
        if self.metric is not None:
            rec["test_acc"] = self._metric()
        rec.update(extra)
        return self.record(rec)

    def __getattr__(self, name: str):
        """Lightning's hooks (``setup``, ``on_*``, ``state_key``) are absent: say what to use instead."""
        hint = (": DissipationMonitor is not a Lightning Callback; pass it as Trainer(callbacks=[torch_qode.lightning."
                "QODECallback(monitor=monitor)])") if name in ("setup", "state_key") or name.startswith("on_") else ""
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}{hint}")

    def record(self, rec: dict) -> dict:
        """Append a record (any JSON-able dict with a ``step``) and write it to the log.

        The record is serialised first: a value JSON cannot hold raises ``TypeError`` and nothing is
        appended, neither to :attr:`records` nor to the log.

        Args:
            rec: the record (numpy / torch values become lists and numbers; non-finite floats ``None``).

        Returns:
            The record as appended (its JSON-able copy).

        Raises:
            TypeError: ``rec`` is not a dict, or holds a value JSON cannot hold.
            ValueError: ``rec`` has no ``step``.
        """
        if not isinstance(rec, Mapping):
            raise TypeError(f"rec must be a dict, got {type(rec).__name__}")
        if "step" not in rec:
            raise ValueError("a record needs a 'step'")
        rec = _jsonable(rec)
        try:
            line = json.dumps(rec)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"rec must hold only JSON-able values (numbers, strings, lists, dicts, numpy / torch "
                            f"arrays): {exc}") from None
        if self.log_path is not None:
            with open(self.log_path, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
        self.records.append(rec)
        return rec

    def _metric(self) -> float:
        """``metric(model)`` under no_grad on a forked RNG; modes, buffers and ``.grad`` restored after."""
        with _flat.preserved(self.model), _flat.forked_rng(list(self.model.parameters())), torch.no_grad():
            return float(self.metric(self.model))

    # ------------------------------------------------------------------------- QODE hooks
    def on_upload(self, step: int, verdict) -> dict:
        """QODE's upload: the verdict's predicted proxy curve over the coming window.

        Args:
            step: the upload's step.
            verdict: the dissipation check's :class:`~torch_qode.bridge.dissipation.Verdict`.

        Returns:
            The ``"upload"`` record written.
        """
        rec = {"step": int(step), "event": "upload", "passed": bool(verdict.passed), "reason": verdict.reason,
               "top_eigenvalue": verdict.top_eigenvalue, "positive_fraction": verdict.positive_fraction,
               "proxy_curve": verdict.proxy, "proxy_T": float(np.asarray(verdict.proxy)[-1]),
               "criterion": getattr(verdict, "criterion", "proxy")}
        dens = getattr(verdict, "density", None)
        if dens is not None:
            rec["spectrum"] = {"grid": dens.grid, "density": dens.values}
        return self.record(rec)

    def on_window_open(self, step: int, carleman: Mapping) -> None:
        """QODE opened a window at ``step``; while one that keeps its upload graph (``carleman["hvp"]``
        ``"retain"``) is live, scheduled spectra wait for its end (:meth:`step` says so in the record).

        Args:
            step: the upload's step.
            carleman: the window's ``CycleReport.carleman`` (its ``"hvp"``).
        """
        self._holding = int(step) if carleman.get("hvp", "retain") == "retain" else None

    def on_window_closed(self, step: int) -> None:
        """QODE's window ended (read out or aborted): deferred spectra are taken at the next :meth:`step`.

        Args:
            step: the step at which it ended.
        """
        self._holding = None

    def on_window_end(self, step: int, report) -> dict:
        """QODE's window end: mode, drift vs SGD (track_sgd), readout numbers.

        Args:
            step: the step during which the window was read out.
            report: the cycle's :class:`~torch_qode.training.report.CycleReport`.

        Returns:
            The ``"window_end"`` record written.
        """
        self.on_window_closed(step)
        drift = (report.drift or {}).get("relative")
        tomo = report.tomography or {}
        pred = (report.dissipation or {}).get("predicted_error")
        T = min(report.window, len(pred) - 1) if pred else None
        rec = {"step": int(step), "event": "window_end", "mode": report.mode, "drift": drift,
               "pred_lin": pred[T] if pred else None, "pred_curve": list(pred[:T + 1]) if pred else None,
               "drift_lin": (report.drift or {}).get("linearization_relative"),
               "drift_lin1": (report.drift or {}).get("linearization_order1_relative"),
               "order_gap": (report.carleman or {}).get("order_gap"),
               "loss_qode": (report.drift or {}).get("loss_qode"), "loss_sgd": (report.drift or {}).get("loss_sgd"),
               "tomography_error": tomo.get("relative_error"), "missed_mass": tomo.get("missed_mass")}
        for part, value in ((report.drift or {}).get("parts") or {}).items():
            rec["drift_" + part] = value
        if self.metric is not None:
            rec["test_acc"] = self._metric()
        return self.record(rec)

    # ------------------------------------------------------------------------------- figure
    def panel_records(self) -> list[dict]:
        """The records in :func:`plot_training_panels`' format, with the per-step error proxy.

        A panel record's ``step`` counts completed training steps (the state the numbers describe):
        a spectrum taken by ``step(k)`` before training step ``k`` is at ``k``, an upload at ``s``
        predicts ``proxy(t)`` for the state after ``s + t`` steps, and a window end reported during
        step ``k`` (QODE's step counter) describes the state after it, ``k + 1`` — where ``proxy(T)``
        of its window and an accuracy measured after that step are drawn too.

        When QODE reported uploads checked by the paper's criterion, every step gets an error proxy as in
        the paper's Fig. 2c: a passed upload at step ``s`` contributes ``proxy(t)`` at steps ``s + t`` of
        its window (the prediction made from the upload spectrum), and every other step — classical, no
        linearisation error — is exactly 1.  A window checked by the predicted criterion contributes its
        predicted linearisation error ``pred_curve`` at the steps of the window it ran.

        Returns:
            One dict per record (and per step for the error proxy), as :func:`plot_training_panels` reads.
        """
        out = []
        windows = {}
        for r in self.records:
            row = {k: r[k] for k in ("step", "spectrum", "test_acc", "test_acc_sgd", "drift", "drift_lin", "pred_lin",
                                     "drift_lin1", "order_gap", "download", "error_proxy", *PART_KEYS)
                   if r.get(k) is not None}
            if r.get("event") == "window_end":
                row["step"] = r["step"] + 1
                curve = r.get("pred_curve") or []
                out += [{"step": row["step"] - (len(curve) - 1) + t, "pred_curve": v}
                        for t, v in enumerate(curve) if t > 0 and v > 0]
            out.append(row)
            if r.get("event") == "upload" and r.get("passed") and r.get("criterion", "proxy") == "proxy":
                for t, p in enumerate(r["proxy_curve"]):
                    windows[r["step"] + t] = p
        if any(r.get("event") == "upload" and r.get("criterion", "proxy") == "proxy" for r in self.records):
            last = max(r["step"] for r in out)
            out += [{"step": k, "error_proxy": windows.get(k, 1.0)} for k in range(last + 1)]
        return out

    def plot(self, path, **kwargs) -> Path:
        """Fig. 2-style panels (spectra early / every 100 steps, error proxy, accuracy) to ``path``.

        Args:
            path: the image file to write.
            **kwargs: keyword arguments of :func:`plot_training_panels` (``early_steps``, ``every``,
                ``title``, ``proxy_note``).

        Returns:
            The path written.
        """
        return plot_training_panels(self.panel_records(), path, **kwargs)


# ------------------------------------------------------------------------ Fig. 2 training panels
def _runs(points: list) -> list:
    """``(step, value)`` pairs split where the steps are not consecutive (one line per window)."""
    out: list = []
    for s, v in points:
        if out and s == out[-1][-1][0] + 1:
            out[-1].append((s, v))
        else:
            out.append([(s, v)])
    return out


def _spectrum_of(rec: Mapping):
    spec = rec.get("spectrum")
    if spec is None:
        return None
    if hasattr(spec, "density") and hasattr(spec.density, "grid"):   # dissipation.Spectrum
        spec = spec.density
    if hasattr(spec, "grid") and hasattr(spec, "values"):             # dissipation.Density
        return np.asarray(spec.grid, dtype=float), np.asarray(spec.values, dtype=float)
    if not isinstance(spec, Mapping):
        return None
    grid, dens = spec.get("grid"), spec.get("density", spec.get("values"))
    if grid is None or dens is None:
        return None
    grid, dens = np.asarray(grid, dtype=float), np.asarray(dens, dtype=float)
    if grid.ndim != 1 or grid.shape != dens.shape:
        raise ValueError(f"the spectrum of the record at step {rec.get('step')!r} needs 1-D 'grid' and 'density' "
                         f"of the same length, got shapes {grid.shape} and {dens.shape}")
    return grid, dens


def _spectra_panel(ax, recs, title):
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    steps = [r["step"] for r in recs]
    lo, hi = (min(steps), max(steps)) if steps else (0, 1)
    for r in recs:
        grid, dens = _spectrum_of(r)
        c = cmap(0.0 if hi == lo else (r["step"] - lo) / (hi - lo))
        ax.plot(grid, _positive(dens), color=c, lw=1.0, label=f"step {r['step']}" if len(recs) <= 8 else None)
    ax.set_yscale("log")
    peaks = [np.nanmax(_positive(_spectrum_of(r)[1])) for r in recs]
    peaks = [p for p in peaks if np.isfinite(p)]
    if peaks:
        ax.set_ylim(max(peaks) * 1e-8, max(peaks) * 5)
    ax.set_xlabel("Hessian eigenvalue λ")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if recs and len(recs) <= 8:
        ax.legend(fontsize=7)
    elif recs:
        ax.text(0.98, 0.98, f"steps {lo}–{hi} (dark→light)", transform=ax.transAxes, ha="right", va="top",
                fontsize=7)


def plot_training_panels(records: Sequence[Mapping], path, *, early_steps: int = 200, every: int = 100,
                         title: Optional[str] = None, proxy_note: Optional[str] = None) -> Path:
    """The paper's Fig. 2 as four panels, from a list of plain dicts (one per logged step).

    ``early_steps`` (integer ≥ 0) and ``every`` (integer ≥ 1) select the spectra of panels (a) and
    (b); ``proxy_note`` is written in panel (c) (e.g. why there is no proxy).

    Keys of each record (all but ``step`` optional; a panel without data says so):

    ``step`` (int)
        Training step.
    ``spectrum`` (``{"grid": [λ...], "density": [p...]}``)
        Hessian eigenvalue density at this step; a ``dissipation.Density`` or ``Spectrum`` is
        accepted too (its ``grid``/``values`` are used).  Panel (a) draws those with
        ``step <= early_steps``; panel (b) those with
        ``step % every == 0`` or at a step some record marks as a download.
    ``download`` (bool)
        True at the step of a prune/download (marked in panels (c) and (d) by dotted lines); it may
        be a record of its own (``{"step": s, "download": True}``).
    ``error_proxy`` (float)
        Eq. (III.14) proxy for this step; 1 for classical steps.  Panel (c), log axis.
    ``drift`` / ``drift_lin`` (float)
        Optional measured ``||θ_QODE − θ_SGD|| / ||θ_SGD − θ0||`` at a window end (track_sgd), total and
        its linearisation part (before the readout); drawn as markers beside the proxy.
    ``pred_curve`` (float)
        Optional, per step of a window the predicted criterion checked: its predicted linearisation error
        after that many window steps; drawn as a dashed line.
    ``pred_lin`` (float)
        Optional, at a window end: the linearisation error the dissipation check predicted for it
        (criterion ``"predicted"``); drawn beside ``drift_lin``.
    ``drift_lin1`` / ``order_gap`` (float)
        Optional, at a window end of Carleman order ≥ 2: the linearisation drift of the order-1 state the
        window carries (what order 1 would have drifted on the same batches) and the embedded estimate
        ``‖u⁽²⁾(T) − u⁽¹⁾(T)‖ / ‖u⁽²⁾(T)‖``; drawn beside ``drift_lin`` (then labelled order 2).
    ``drift_support`` / ``drift_linearization`` / ``drift_readout_pruning`` / ``drift_readout_noise`` (float)
        Optional, at a window end (track_sgd): the drift's four parts (``report.drift["parts"]``), each
        over ``||θ_SGD − θ0||``; drawn as small markers beside ``drift`` (a part that is 0 has no marker on
        the log axis; logs without them draw as before).
    ``test_acc`` / ``test_acc_sgd`` (float in [0, 1] or percent)
        Test accuracy of the trained model / of the SGD reference.  Panel (d).
    """
    early_i, every_i = as_int(early_steps), as_int(every)
    if early_i is None or early_i < 0:
        raise ValueError(f"early_steps must be an integer >= 0, got {early_steps!r}")
    if every_i is None or every_i < 1:
        raise ValueError(f"every must be an integer >= 1 (spectra every that many steps), got {every!r}")
    early_steps, every = early_i, every_i
    if proxy_note is not None and not isinstance(proxy_note, str):
        raise TypeError(f"proxy_note must be a string or None, got {type(proxy_note).__name__}")
    checked = []
    for i, r in enumerate(records):
        if not isinstance(r, Mapping):
            raise TypeError(f"records[{i}] must be a dict, got {type(r).__name__}")
        step = as_int(r.get("step"))
        if step is None:
            raise ValueError(f"records[{i}] needs an integer 'step' (a training step), got {r.get('step', '(none)')!r}")
        checked.append({**r, "step": step})
    records = sorted(checked, key=lambda r: r["step"])
    fig, axes = new_figure(2, 2)
    downloads = sorted({r["step"] for r in records if r.get("download")})
    early = [r for r in records if r["step"] <= early_steps and _spectrum_of(r) is not None]
    late = [r for r in records if _spectrum_of(r) is not None and (r["step"] % every == 0 or r["step"] in downloads)]
    _spectra_panel(axes[0], early, f"(a) spectra, first {early_steps} steps")
    _spectra_panel(axes[1], late, f"(b) spectra every {every} steps / at downloads")

    ax = axes[2]
    pr = [(r["step"], r["error_proxy"]) for r in records if r.get("error_proxy") is not None]
    if pr:
        ax.semilogy(*zip(*[(s, v) for s, v in pr]), "-", color="C0", lw=1.2, label="error proxy")
    pc = sorted((r["step"], r["pred_curve"]) for r in records if r.get("pred_curve") is not None)
    for i, seg in enumerate(_runs(pc)):
        ax.semilogy(*zip(*seg), "--", color="C2", lw=1.0, label="linearisation error, predicted" if i == 0 else None)
    order2 = any(r.get("drift_lin1") is not None or r.get("order_gap") is not None for r in records)
    for key, label, color, marker in (
            ("drift", "drift vs SGD (total)", "C1", "o"),
            ("drift_lin", "drift: linearisation" + (", order 2" if order2 else ""), "C2", "o"),
            ("pred_lin", "linearisation, predicted at T", "C2", "+"),
            ("drift_lin1", "drift: linearisation, order 1 (embedded)", "C3", "s"),
            ("order_gap", "order_gap (estimate of order 1's error)", "C4", "x")):
        dr = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if dr:
            ax.semilogy(*zip(*dr), marker, color=color, ms=4, label=label, mfc="none" if marker == "s" else None)
    for key, (color, marker) in zip(PART_KEYS, (("C5", "v"), ("C6", "^"), ("C7", "<"), ("C8", ">"))):
        dr = [(r["step"], r[key]) for r in records if r.get(key) is not None and r[key] > 0]
        if dr:
            ax.semilogy(*zip(*dr), marker, color=color, ms=3, label="part: " + key[len("drift_"):].replace("_", " "))
    ax.axhline(1.0, color="gray", lw=0.6)
    ax.set_title("(c) predicted error (check) and drift (measured)")
    ax.set_xlabel("step")
    has_drift = any(r.get(k) is not None for r in records
                    for k in ("drift", "drift_lin", "pred_lin", "pred_curve", "drift_lin1", "order_gap", *PART_KEYS))
    if pr or has_drift:
        ax.legend(fontsize=7)
    if proxy_note:
        ax.text(0.5, 0.08 if (pr or has_drift) else 0.5, proxy_note, transform=ax.transAxes, ha="center",
                va="bottom" if (pr or has_drift) else "center", fontsize=7, color="dimgray",
                bbox=dict(boxstyle="round", facecolor="white", alpha=0.85, lw=0.5))

    ax = axes[3]
    any_acc = False
    for key, label, color in (("test_acc", "QODE", "C0"), ("test_acc_sgd", "SGD", "C1")):
        acc = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if acc:
            any_acc = True
            ax.plot(*zip(*acc), "o-", ms=3, color=color, label=label)
    ax.set_title("(d) test accuracy")
    ax.set_xlabel("step")
    if any_acc:
        ax.legend(fontsize=7)
    for ax in axes[2:]:
        ax.grid(True, alpha=0.3)
        for s in downloads:
            ax.axvline(s, color="gray", ls=":", lw=0.6)
    for ax, has in zip(axes, (early, late, pr or has_drift or proxy_note, any_acc)):
        if not has:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="gray")
    if title:
        fig.suptitle(title)
    return save(fig, path)
