"""recipes.config: the value checks name the config key, and test numbers the package's way."""
import math

import numpy as np
import pytest
import torch

from recipes import config


@pytest.mark.parametrize("call, match", [
    (lambda: config.check_int(True, "train.steps", 1), r"^train\.steps must be an integer >= 1, got True$"),
    (lambda: config.check_int(1.0, "n", 1), r"^n must be an integer >= 1, got 1\.0$"),
    (lambda: config.check_int(7, "k", 0, 5), r"^k must be an integer in 0\.\.5, got 7$"),
    (lambda: config.check_int(7, "k", None, 5), r"^k must be an integer <= 5, got 7$"),
    (lambda: config.check_real(0.0, "qode.lr", 0.0, low_open=True), r"^qode\.lr must be a finite number > 0, got 0\.0$"),
    (lambda: config.check_real(math.inf, "x", 0.0), r"^x must be a finite number >= 0, got inf$"),
    (lambda: config.check_real(math.nan, "x", allow_inf=True), r"^x must be a number, got nan$"),
    (lambda: config.check_real(1.0, "eps", 0.0, 1.0, low_open=True, high_open=True),
     r"^eps must be a finite number > 0 and < 1, got 1\.0$"),
    (lambda: config.check_real("1", "x"), r"^x must be a finite number, got '1'$"),
    (lambda: config.check_choice(1, "monitor.backend", ("torch", "pyhessian")),
     r"^monitor\.backend must be one of 'torch', 'pyhessian', got 1$"),
    (lambda: config.check_int_list([0, 21], "proxy.report_times", 0, 20, nonempty=False, high_name="proxy.T"),
     r"^proxy\.report_times must be a list of integers in 0\.\.proxy\.T = 0\.\.20, got \[0, 21\]$"),
    (lambda: config.check_int_list([], "layers", 1), r"^layers must be a non-empty list of integers >= 1, got \[\]$"),
    (lambda: config.check_optional_str("  ", "data.root", "a folder"), r"^data\.root must be null or a folder"),
])
def test_value_checks_name_the_key(call, match):
    with pytest.raises(config.ConfigError, match=match):
        call()


def test_value_checks_accept_numbers_the_package_way():
    assert config.check_int(np.int64(3), "n", 1) == 3 and type(config.check_int(np.int64(3), "n", 1)) is int
    assert config.check_int(torch.tensor(4), "n", 1) == 4
    assert config.check_real(np.float32(0.5), "x", 0.0) == 0.5 and config.check_real(2, "x") == 2.0
    assert config.check_real(math.inf, "blowup", 0.0, low_open=True, allow_inf=True) == math.inf
    assert config.check_int_list([1, np.int64(2)], "orders", 1) == [1, np.int64(2)]
    assert config.check_choice("torch", "backend", ("torch", "pyhessian")) == "torch"
    assert config.check_optional_str(None, "checkpoint") is None


def test_keyed_error_names_the_argument_the_library_names():
    err = config.keyed_error("qode", ValueError("lr must be > 0"), ("lr", "cycle"))
    assert isinstance(err, config.ConfigError) and str(err) == "qode.lr: lr must be > 0"
    assert str(config.keyed_error("qode", TypeError("bad thing"), ("lr",))) == "qode: bad thing"


def test_validate_types_follow_the_defaults():
    schema = {"n": 1, "x": 0.5, "flag": False, "name": "a", "opt": None, "sec": {"k": 2}}
    config.validate({"n": 2, "x": 3, "flag": True, "name": "b", "opt": [1], "sec": {"k": 3}}, schema)
    for bad, match in (({"n": True}, "'n' must be of type int"), ({"x": False}, "'x' must be of type float"),
                       ({"flag": 1}, "'flag' must be of type bool"), ({"sec": {"k": 2, "j": 1}}, "unknown config key 'sec.j'"),
                       ({"n": None}, "'n' may not be null")):
        cfg = {"n": 2, "x": 3, "flag": True, "name": "b", "opt": None, "sec": {"k": 3}, **bad}
        with pytest.raises(config.ConfigError, match=match):
            config.validate(cfg, schema)
