"""What QODE tells a monitor about its quantum windows: the :class:`WindowMonitor` protocol.

QODE calls four methods of the monitor it is given (``QODE(..., monitor=m)``), at these points of a
cycle (DESIGN.md, "one cycle"):

* :meth:`WindowMonitor.on_upload` ``(step, verdict)`` — at the upload of ``mode="auto"``, with the
  dissipation check's verdict (:class:`~torch_qode.bridge.dissipation.Verdict`), whether
  the window then opens or not;
* :meth:`WindowMonitor.on_window_open` ``(step, carleman)`` — a quantum window opened (``carleman``:
  the report's Carleman record, e.g. ``carleman["hvp"]``, how the window takes its products);
* :meth:`WindowMonitor.on_window_closed` ``(step)`` — a window was aborted by a fault (its
  parameters are back at θ0);
* :meth:`WindowMonitor.on_window_end` ``(step, report)`` — a window was read out, once the step is
  complete (``report``: the cycle's :class:`~torch_qode.training.report.CycleReport`).

A monitor subclasses :class:`WindowMonitor` (its methods are no-ops: override the ones you need), or
is any object with some of these methods: QODE wraps it once, at construction (:func:`as_window_monitor`),
into an object that has all four, so QODE calls them unconditionally.
:class:`~torch_qode.training.monitor.DissipationMonitor` is the package's own.
"""
from __future__ import annotations

from typing import Any, Mapping

__all__ = ["WindowMonitor", "MonitorAdapter", "as_window_monitor", "WINDOW_EVENTS"]

#: the methods QODE calls, in the order a window meets them
WINDOW_EVENTS = ("on_upload", "on_window_open", "on_window_closed", "on_window_end")


class WindowMonitor:
    """The monitor protocol QODE calls (see the module docstring); every method does nothing here."""

    def on_upload(self, step: int, verdict: Any) -> Any:
        """The upload of ``mode="auto"`` at ``step`` was checked.

        Args:
            step: the optimizer step of the upload.
            verdict: the dissipation check's verdict (``passed``, ``reason``, ``proxy``, …).

        Returns:
            Anything (QODE ignores it).
        """

    def on_window_open(self, step: int, carleman: Mapping) -> Any:
        """A quantum window opened at ``step``.

        Args:
            step: the optimizer step of the upload.
            carleman: the report's Carleman record (``carleman["hvp"]``: ``"retain"`` while the window
                holds its upload graph).

        Returns:
            Anything (QODE ignores it).
        """

    def on_window_closed(self, step: int) -> Any:
        """A quantum window was aborted at ``step`` (a fault; the parameters are back at θ0).

        Args:
            step: the optimizer step.

        Returns:
            Anything (QODE ignores it).
        """

    def on_window_end(self, step: int, report: Any) -> Any:
        """A quantum window was read out at ``step`` (called once the step is complete).

        Args:
            step: the window's last optimizer step.
            report: the cycle's :class:`~torch_qode.training.report.CycleReport`.

        Returns:
            Anything (QODE ignores it).
        """


class MonitorAdapter(WindowMonitor):
    """A :class:`WindowMonitor` over an object that has only some of the four methods.

    Each method the object has (a callable attribute of that name) is looked up once, here, and
    called from then on; the others are :class:`WindowMonitor`'s no-ops.

    Args:
        monitor: the object (not ``None``).

    Attributes:
        monitor: the wrapped object.
    """

    def __init__(self, monitor: Any):
        self.monitor = monitor
        for name in WINDOW_EVENTS:
            method = getattr(monitor, name, None)
            if callable(method):
                setattr(self, name, method)

    def __repr__(self) -> str:
        return f"MonitorAdapter({self.monitor!r})"


def as_window_monitor(monitor: Any) -> WindowMonitor:
    """The object QODE calls for ``monitor``: always a :class:`WindowMonitor`.

    Args:
        monitor: ``None``, a :class:`WindowMonitor`, or any object with some of the four methods.

    Returns:
        A do-nothing :class:`WindowMonitor` for ``None``, ``monitor`` itself when it is one, else a
        :class:`MonitorAdapter` over it.
    """
    if monitor is None:
        return WindowMonitor()
    if isinstance(monitor, WindowMonitor):
        return monitor
    return MonitorAdapter(monitor)
