"""The examples in the docstrings run and print what they show (``doctest``, module by module).

Only the modules listed here: a global ``--doctest-modules`` would also import the recipes and the
optional extras.  Add a module when you give one of its docstrings an example.
"""
import doctest
import importlib

import pytest

MODULES = [
    "torch_qode._lazy",
    "torch_qode.core.ode",
    "torch_qode.core.carleman",
    "torch_qode.core.linsolve",
    "torch_qode.core.window",
    "torch_qode.core.tomography",
    "torch_qode.bridge.spectrum",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False, report=True)
    assert result.attempted > 0, f"{name} has no examples: drop it from MODULES"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed (see the output)"
