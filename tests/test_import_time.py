"""``import torch_qode`` stays cheap (issue 19): heavy dependencies load when first used, not on import.

Deterministic: each test runs a fresh interpreter and reads ``sys.modules``; the timing itself is
measured by ``benchmarks/import_time.py``.  (``tests/bridge/test_imports.py`` checks the lazy
``PyHessianAdapter`` / ``QODECallback`` attributes.)
"""
import json
import subprocess
import sys

import pytest

#: what ``import torch_qode`` must not load (each costs 0.03-0.6 s to import)
HEAVY = ("scipy.sparse", "scipy.sparse.linalg", "scipy.linalg", "scipy.stats", "scipy.integrate", "scipy.special",
         "scipy.optimize", "matplotlib", "pyhessian", "lightning", "omegaconf", "torchvision", "sklearn",
         "torch.utils.flop_counter")   # the ledger's FLOP counter: it imports triton where triton is installed


def _loaded_after(code: str) -> set:
    """Names from ``HEAVY`` (or a submodule of one) in ``sys.modules`` after running ``code`` alone."""
    probe = (f"import sys\n{code}\nimport json\n"
             f"heavy = {HEAVY!r}\n"
             "print(json.dumps(sorted(h for h in heavy if any(m == h or m.startswith(h + '.') for m in sys.modules))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_import_torch_qode_loads_no_heavy_module():
    assert _loaded_after("import torch_qode") == set()


def test_importing_every_core_and_bridge_module_loads_no_heavy_module():
    """Not only the package's ``__init__``: every module of the two lowest floors imports cheaply."""
    code = ("import pkgutil, importlib, torch_qode.core, torch_qode.bridge\n"
            "for pkg in (torch_qode.core, torch_qode.bridge):\n"
            "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
            "        if m.name != 'torch_qode.bridge.pyhessian':\n"
            "            importlib.import_module(m.name)\n")
    assert _loaded_after(code) == set()


@pytest.mark.parametrize("use, loads", [
    ("torch_qode.coupon_collector_expected_draws([0.5, 0.3, 0.2])", {"scipy.integrate", "scipy.sparse"}),
    ("from torch_qode.core.readout_model import expected_relative_error\n"
     "expected_relative_error(np.ones(8), 10_000)", {"scipy.stats"}),
    ("from torch_qode.core.window import condition_number\n"
     "condition_number(scipy_sparse.eye(4, format='csr'))", {"scipy.linalg", "scipy.sparse.linalg"}),
    ("torch_qode.carleman(torch_qode.PolynomialODE([np.zeros(2), -np.eye(2)]), 2).matrix()", {"scipy.sparse"}),
], ids=["quad", "poisson-table", "condition-number", "carleman"])
def test_the_heavy_modules_load_on_first_use(use, loads):
    """The probe can fail: using the code that needs a module does load it (and it still works)."""
    code = f"import numpy as np, torch_qode\n{use.replace('scipy_sparse', 'torch_qode.core.window.sp')}"
    assert loads <= _loaded_after(code)
