"""recipes.loop: strict JSON records and plain-text tables; the training-panels figure the recipes draw."""
import json
import math

import numpy as np
import pytest
import torch

from recipes import loop


def test_to_jsonable_and_table():
    obj = {"a": np.float64(2.0), "b": torch.ones(2), "c": (1, np.int64(2)), "d": math.inf, "e": None}
    assert json.loads(json.dumps(loop.to_jsonable(obj), allow_nan=False)) == \
        {"a": 2.0, "b": [1.0, 1.0], "c": [1, 2], "d": None, "e": None}
    table = loop.format_table([{"x": 1, "y": 0.123456, "z": None}, {"x": 22, "y": 1e-9, "z": "s"}])
    lines = table.splitlines()
    assert lines[0].split() == ["x", "y", "z"] and "0.123" in lines[2] and "-" in lines[2] and "1e-09" in lines[3]


def test_training_panels_figure(tmp_path):
    from torch_qode.plotting import plot_training_panels

    grid = np.linspace(-5, 20, 64)
    records = []
    for step in range(0, 301, 10):
        rec = {"step": step, "error_proxy": 1.0 if step % 100 < 10 else 0.9 ** (step % 100),
               "download": step % 100 == 0, "drift": 1e-3 * (step % 100)}
        rec["spectrum"] = {"grid": grid.tolist(), "density": np.exp(-(grid - step / 100) ** 2).tolist()}
        if step % 50 == 0:
            rec["test_acc"], rec["test_acc_sgd"] = 0.5 + step / 1000, 0.52 + step / 1000
        records.append(rec)
    p = plot_training_panels(records, tmp_path / "fig2.png")
    assert p.is_file() and p.stat().st_size > 10_000
    from torch_qode.bridge.dissipation import smooth_density

    dens = smooth_density(np.array([-1.0, 0.0, 5.0]), np.array([0.2, 0.5, 0.3]))
    p1 = plot_training_panels([{"step": 0, "spectrum": dens}, {"step": 10, "spectrum": dens}], tmp_path / "d.png")
    assert p1.stat().st_size > 10_000                                  # a Density object works as well
    p2 = plot_training_panels([{"step": 0}], tmp_path / "empty.png")   # every panel says "no data"
    assert p2.is_file() and p2.stat().st_size > 0
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        plot_training_panels(records, tmp_path / "e.png", every=0)
    with pytest.raises(ValueError, match="early_steps must be an integer >= 0"):
        plot_training_panels(records, tmp_path / "e.png", early_steps=-1)
    with pytest.raises(ValueError, match=r"records\[1\] needs an integer 'step'"):
        plot_training_panels([{"step": 0}, {"test_acc": 0.5}], tmp_path / "e.png")
    with pytest.raises(ValueError, match="step 0 needs 1-D 'grid' and 'density' of the same length"):
        plot_training_panels([{"step": 0, "spectrum": {"grid": [0.0, 1.0], "density": [1.0]}}], tmp_path / "e.png")
