"""recipes.quadratic_ode (Fig. 4) end to end on the CPU config with tiny overrides."""
import json

import numpy as np
import pytest
import yaml

from recipes import config, quadratic_ode as rq
from torch_qode.core.carleman import carleman, dissipativity

CPU = "configs/quadratic_ode_cpu.yaml"
TINY = ["n=4", "T=40", "trials=2", "report_times=[10, 40]", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("quadratic_ode")
    return rq.main(["--config", CPU, "--out", str(out)] + TINY)


def test_writes_log_config_and_figures(result):
    out = result["out"]
    recs = [json.loads(line) for line in open(out / "log.jsonl", encoding="utf-8")]
    events = {r["event"] for r in recs}
    assert {"start", "system", "trial", "resources", "curve", "summary"} <= events
    assert recs[0]["config"]["n"] == 4 and recs[-1]["event"] == "summary"
    assert yaml.safe_load((out / "config.yaml").read_text())["T"] == 40   # overrides are saved
    for name in ("fig4a", "fig4b"):
        p = result["figures"][name]
        assert p.is_file() and p.stat().st_size > 10_000 and p.read_bytes()[:4] == b"\x89PNG"


def test_discrete_error_falls_with_order_at_full_dissipation(result):
    c = result["curves"]
    err10 = [c[(1.0, N, "discrete")][10] for N in (1, 2, 3, 4)]
    assert err10[0] > err10[1] > err10[2] > err10[3], err10
    assert err10[3] < 1e-3 * err10[0]
    # f = 1: every mode dissipative, the error keeps falling in time (Fig. 4a)
    assert c[(1.0, 4, "discrete")][40] < c[(1.0, 4, "discrete")][10]


def test_continuous_form_blows_up_and_divergent_modes_hurt(result):
    c = result["curves"]
    # the continuous (Kronecker-sum) form leaves the unit disc at higher levels
    assert c[(1.0, 4, "continuous")][40] > 1e3 * c[(1.0, 4, "discrete")][40]
    # Fig. 4b: fewer dissipative modes, larger error at N = 4
    assert c[(0.5, 4, "discrete")][40] > 10 * c[(1.0, 4, "discrete")][40]


def test_summary_rows_and_resource_ledger(result):
    rows = result["summary"]
    assert len(rows) == 2 * 7            # (1,1..4) + (0.9, 0.75, 0.5 at N=4), two forms each
    row = next(r for r in rows if r["f"] == 1.0 and r["N"] == 4 and r["form"] == "discrete")
    assert row["panel"] == "ab" and row["Δ"] == 4 + 16 + 64 + 256 and row["qubits"] > 0


def test_system_construction():
    rng = np.random.default_rng(0)
    trial = rq.draw_trial(6, rng)
    assert np.linalg.norm(trial["u0"]) == pytest.approx(0.5)
    for f in (1.0, 0.5, 0.0):
        ode, lam = rq.quadratic_ode(trial, f)
        assert (lam > 0).sum() == round(6 * f)
        H = -ode.term(1).dense().numpy()
        np.testing.assert_allclose(H, H.T, atol=1e-14)
        np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(H)), np.sort(lam), atol=1e-12)
        assert dissipativity(carleman(ode, 1)).dissipative_fraction == pytest.approx(round(6 * f) / 6)
        exact, div = rq.exact_trajectory(ode, trial["u0"], 20)
        assert div is None
        np.testing.assert_allclose(exact, ode.iterate(trial["u0"], 20), atol=1e-15)
    with pytest.raises(ValueError, match="f must lie"):
        rq.quadratic_ode(trial, 1.5)


@pytest.mark.parametrize("override, match", [
    ("nn=3", r"unknown config key 'nn'; allowed keys: .*u0_norm"),
    ("resources.eps_=1", r"unknown config key 'resources\.eps_'"),
    ("u0_norm=1.5", r"u0_norm must lie in \(0, 1\)"),
    ("forms=[euler]", r"forms must be"),
    ("fs=[1.2]", r"fs must be"),
    ("coordinate=9", r"coordinate must be"),
    ("coordinate=true", r"coordinate must be null \(random\) or an integer in 0\.\.3"),
    ("eig_pos=[]", r"eig_pos must be a list \[lo, hi\] of two finite numbers with 0 <= lo <= hi <= 2"),
    ("eig_pos=[0, 1, 2]", r"eig_pos must be a list \[lo, hi\]"),
    ("eig_pos=[0.5, 0.1]", r"eig_pos must be a list \[lo, hi\]"),
    ("eig_pos=[-0.1, 1.0]", r"eig_pos must be"),
    ("eig_neg=[-0.01, 0.5]", r"eig_neg must be a list \[lo, hi\] of two finite numbers with lo <= hi <= 0"),
    ("eig_pos=[0, abc]", r"eig_pos must be"),
    ("f2_scale=.nan", r"f2_scale must be a finite number >= 0"),
    ("report_times=[-1, 10]", r"report_times must be a list of integers in 0\.\.T = 0\.\.40"),
    ("report_times=[10, 41]", r"report_times must be a list of integers in 0\.\.T = 0\.\.40"),
    ("orders=[true]", r"orders must be a non-empty list of integers >= 1"),
    ("fs=[true]", r"fs must be a non-empty list of fractions"),
    ("error_threshold=.inf", r"error_threshold must be a finite number > 0"),
    ("blowup=0.0", r"blowup must be a number > 0"),
    ("resources.eps=-1.0", r"resources\.eps must be a finite number > 0 and < 1"),
    ("T=null", r"'T' may not be null"),
])
def test_bad_config_raises(tmp_path, override, match):
    with pytest.raises(config.ConfigError, match=match):
        rq.main(["--config", CPU, "--out", str(tmp_path / "o")] + TINY + [override])
    assert not (tmp_path / "o").exists()


def test_yaml_float_lists_and_infinite_blowup_rerun_from_the_saved_config(tmp_path):
    """``1e-1`` (a YAML 1.1 string) in a float list is read as a float; ``blowup=.inf`` is saved as
    ``.inf`` so the saved config.yaml re-runs the same experiment."""
    a = rq.main(["--config", CPU, "--out", str(tmp_path / "a"), "eig_pos=[0, 1e-1]", "blowup=.inf",
                 "orders=[1]", "fs=[1.0]", "order_b=1", "forms=[discrete]"] + TINY)
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert saved["eig_pos"] == [0, 0.1] and saved["blowup"] == float("inf")
    b = rq.main(["--config", str(tmp_path / "a" / "config.yaml"), "--out", str(tmp_path / "b"),
                 "--no-progress", "--threads", "1"])
    np.testing.assert_array_equal(a["curves"][(1.0, 1, "discrete")], b["curves"][(1.0, 1, "discrete")])
