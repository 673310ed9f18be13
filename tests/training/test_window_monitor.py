"""The monitor protocol QODE calls (torch_qode.training.window_monitor): WindowMonitor's no-ops, the
adapter over an object with only some of the methods, and QODE wrapping its monitor once."""
import copy
import pickle

import torch
import torch.nn as nn

from torch_qode import DissipationMonitor, QODE
from torch_qode.training.window_monitor import (WINDOW_EVENTS, MonitorAdapter, WindowMonitor,
                                                as_window_monitor)


class OnlyEnd:
    """A user monitor with one of the four methods."""

    def __init__(self):
        self.ends = []

    def on_window_end(self, step, report):
        self.ends.append((step, report.mode))


def test_the_protocols_methods_do_nothing():
    m = WindowMonitor()
    assert [getattr(m, name)(*(0,) * n) for name, n in zip(WINDOW_EVENTS, (2, 2, 1, 2))] == [None] * 4
    assert WINDOW_EVENTS == ("on_upload", "on_window_open", "on_window_closed", "on_window_end")


def test_the_adapter_has_all_four_and_calls_what_the_object_has():
    user = OnlyEnd()
    m = as_window_monitor(user)
    assert isinstance(m, MonitorAdapter) and m.monitor is user
    assert all(callable(getattr(m, name)) for name in WINDOW_EVENTS)
    assert m.on_upload(2, None) is None and m.on_window_open(2, {}) is None and m.on_window_closed(3) is None

    class Rep:
        mode = "quantum"
    m.on_window_end(7, Rep())
    assert user.ends == [(7, "quantum")]
    assert type(as_window_monitor(None)) is WindowMonitor
    x = nn.Linear(2, 1)
    dm = DissipationMonitor(x, lambda o, t: ((o - t) ** 2).mean(), (torch.zeros(3, 2), torch.zeros(3, 1)), lr=0.1)
    assert as_window_monitor(dm) is dm                       # the package's own is a WindowMonitor


def test_qode_wraps_its_monitor_once_and_a_partial_monitor_sees_its_windows():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    user = OnlyEnd()
    opt = QODE(model.parameters(), lr=0.05, mode="quantum", cycle=6, classical_steps=2, sparsity=0.0,
               shots=2000, monitor=user)
    assert opt.monitor is user and opt.window_monitor.monitor is user
    wrapped = opt.window_monitor
    assert opt.window_monitor is wrapped                     # built once, not per call

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss
    for _ in range(12):
        opt.step(closure)
    assert user.ends == [(5, "quantum"), (11, "quantum")]
    twin = copy.deepcopy(opt)
    assert twin.window_monitor.monitor is twin.monitor and twin.monitor is not user
    assert pickle.loads(pickle.dumps(opt)).monitor.ends == user.ends
    opt.monitor = None                                       # assigning wraps again
    assert opt.monitor is None and type(opt.window_monitor) is WindowMonitor
