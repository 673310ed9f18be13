"""recipes.mlp_ode_order (Theorem III.1): symbolic degree vs float64 finite differences."""
import json

import numpy as np
import pytest

from recipes import config, mlp_ode_order as rm

CPU = "configs/mlp_ode_order_cpu.yaml"
FAST = ["lines=1", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("mlp_ode_order")
    return rm.main(["--config", CPU, "--out", str(out)] + FAST)


def test_numerical_degree_equals_symbolic(result):
    rows = result["rows"]
    assert {(r["L"], r["s_p"]) for r in rows} == {(L, s) for L in (1, 2, 3) for s in (1, 2, 3)}
    for r in rows:
        assert r["q_numeric"] == r["q_symbolic"], r
        assert r["loss_numeric"] == r["q_symbolic"] + 1, r
        assert r["consistent"] is True, r
        assert r["ratio_q"] > 1e6 and r["ratio_q+1"] < 1e3, r
        assert r["grad_vs_autograd"] < 1e-12, r        # the hand-written backward pass is right
    by = {(r["L"], r["s_p"]): r["q_symbolic"] for r in rows}
    assert by[(1, 3)] == 1 and by[(2, 1)] == 3 and by[(2, 2)] == 5 and by[(3, 2)] == 13 and by[(3, 3)] == 25


def test_log_and_figure(result):
    recs = [json.loads(line) for line in open(result["out"] / "log.jsonl", encoding="utf-8")]
    settings = [r for r in recs if r["event"] == "setting"]
    assert len(settings) == 9 and all(len(r["difference_ratios"]) == r["q_symbolic"] + 3 for r in settings)
    summary = next(r for r in recs if r["event"] == "summary")
    assert summary["all_consistent"] is True and recs[-1]["event"] == "figure"
    assert all(r["lines_agree"] is True for r in summary["rows"])
    p = result["figures"]["ode_order"]
    assert p.is_file() and p.stat().st_size > 10_000


def test_a_wrong_degree_is_caught():
    cfg = dict(rm.DEFAULTS, lines=1)
    rng = np.random.default_rng(1)
    model = rm.build_mlp(3, 2, cfg)
    q = rm.propagate_degree(model)["q"]
    assert q == 13
    X, Y = rng.normal(size=(4, 3)), rng.normal(size=(4, 2))
    theta0, _ = rm.flat_params(model)
    v, w = rng.normal(size=theta0.size) * 0.5, rng.normal(size=theta0.size)
    ratios = rm.difference_ratios(lambda s: float(w @ rm.numpy_loss_grad(theta0 + s * v, model, X, Y)[1]),
                                  q + 3, 8.0)
    assert rm.numerical_degree(ratios, 1e3) == q
    assert rm.degree_consistent(ratios, q, 1e3)
    assert not rm.degree_consistent(ratios, q - 1, 1e3)     # its (q)-th difference does not vanish
    assert not rm.degree_consistent(ratios, q + 1, 1e3)     # its (q+1)-th difference is round-off
    assert not rm.degree_consistent(ratios, q - 2, 1e3)


def test_symbolic_forms_agree_with_the_papers_expression():
    for L in range(1, 7):
        for s in range(1, 5):
            q = rm.closed_form_degree(L, s)
            model = rm.build_mlp(L, s, dict(rm.DEFAULTS, activation="monomial"))
            assert rm.propagate_degree(model)["q"] == q
            assert rm.paper_degree(L, s, "A") == q            # Eq. III.11, our reading
    assert rm.paper_degree(3, 3, "B") == 20 < rm.closed_form_degree(3, 3)   # the other reading undercuts it


def test_no_bias_and_monomial_activation_give_the_same_degree(tmp_path):
    res = rm.main(["--config", CPU, "--out", str(tmp_path), "layers=[2, 3]", "degrees=[2]", "bias=false",
                   "activation=monomial"] + FAST)
    for r in res["rows"]:
        assert r["q_numeric"] == r["q_symbolic"] == rm.closed_form_degree(r["L"], 2) and r["consistent"]


def test_too_high_degrees_are_reported_symbolically(tmp_path):
    res = rm.main(["--config", CPU, "--out", str(tmp_path), "layers=[3]", "degrees=[3]",
                   "check_max_degree=20"] + FAST)
    (r,) = res["rows"]
    assert r["q_symbolic"] == 25 and r["q_numeric"] is None and "not resolvable" in r["note"]


def test_disagreeing_lines_are_reported_and_plotted(tmp_path, capsys):
    """A tiny stencil (span=0.01) sinks the top differences into round-off on some lines only: the
    per-line degrees disagree; the table, the log and the figure all still come out."""
    res = rm.main(["--config", CPU, "--out", str(tmp_path), "layers=[2]", "degrees=[2]", "span=0.01", "lines=3",
                   "--no-progress", "--threads", "1"])
    (r,) = res["rows"]
    assert isinstance(r["q_numeric"], list) and len(set(r["q_numeric"])) > 1 and r["lines_agree"] is False
    assert r["q_numeric_lines"] == r["q_numeric"] and r["consistent"] is False
    out = capsys.readouterr().out
    assert "q_symbolic" in out and str(r["q_numeric"]) in out and "random lines disagree" in out
    p = res["figures"]["ode_order"]
    assert p.is_file() and p.stat().st_size > 10_000
    recs = [json.loads(line) for line in open(tmp_path / "log.jsonl", encoding="utf-8")]
    assert [x["event"] for x in recs][-2:] == ["summary", "figure"]


@pytest.mark.parametrize("override, match", [
    ("depth=3", r"unknown config key 'depth'; allowed keys: .*layers"),
    ("activation=tanh", r"activation must be 'full' or 'monomial'"),
    ("layers=[0]", r"layers must be"),
    ("span=abc", r"'span' must be of type float"),
    ("layers=[true]", r"layers must be a non-empty list of integers >= 1"),
    ("degrees=[true, 2]", r"degrees must be a non-empty list of integers >= 1"),
    ("direction_scale=0.0", r"direction_scale must be a finite number > 0"),
    ("span=.inf", r"span must be a finite number > 0"),
    ("threshold=.nan", r"threshold must be a finite number > 1"),
    ("check_max_degree=-1", r"check_max_degree must be an integer >= 0"),
    ("lines=null", r"'lines' may not be null"),
])
def test_bad_config_raises(tmp_path, override, match):
    with pytest.raises(config.ConfigError, match=match):
        rm.main(["--config", CPU, "--out", str(tmp_path / "o")] + FAST + [override])
    assert not (tmp_path / "o").exists()
