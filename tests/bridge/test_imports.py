"""The bridge's module layout: pyhessian is loaded on use only; moved names keep their old import paths."""
import subprocess
import sys


def _runs_alone(code: str) -> None:
    """``code`` runs in a fresh interpreter (nothing imported yet) and prints ``ok``."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_import_torch_qode_does_not_load_pyhessian():
    code = ("import sys, torch_qode\n"
            "assert not [m for m in sys.modules if m.split('.')[0] == 'pyhessian'], 'pyhessian loaded'\n"
            "from torch_qode.bridge import dissipation, spectrum, lanczos, flat, norms, taylor, pruning\n"
            "assert 'pyhessian' not in sys.modules, 'pyhessian loaded by a bridge module'\n"
            "A = torch_qode.PyHessianAdapter\n"
            "from torch_qode.bridge.dissipation import PyHessianAdapter\n"
            "from torch_qode.bridge.pyhessian import PyHessianAdapter as B\n"
            "assert A is PyHessianAdapter is B and 'pyhessian' in sys.modules\n"
            "print('ok')\n")
    _runs_alone(code)


def test_import_torch_qode_does_not_load_lightning():
    code = ("import sys, torch_qode\n"
            "from torch_qode import QODE, DissipationMonitor\n"
            "assert not [m for m in sys.modules if m.split('.')[0] == 'lightning'], 'lightning loaded'\n"
            "A = torch_qode.QODECallback\n"
            "from torch_qode.lightning import QODECallback\n"
            "import lightning.pytorch as pl\n"
            "assert A is QODECallback and issubclass(A, pl.Callback)\n"
            "print('ok')\n")
    _runs_alone(code)


def test_unknown_attributes_still_raise():
    import pytest

    import torch_qode
    from torch_qode.bridge import dissipation

    for mod in (torch_qode, dissipation):
        with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
            getattr(mod, "nonsense")


def test_moved_names_keep_their_old_paths():
    from torch_qode.bridge import dissipation, flat, lanczos, norms, spectrum, taylor

    for name in ("lanczos", "Lanczos", "top_eigenvalues", "hutchinson_trace"):
        assert getattr(dissipation, name) is getattr(lanczos, name)
    for name in ("Density", "Spectrum", "slq_density", "smooth_density", "error_proxy", "positive_fraction",
                 "hessian_spectrum"):
        assert getattr(dissipation, name) is getattr(spectrum, name)
    for name in ("decomposed_norms", "batch_stats_no_update", "fused_norm_nodes"):
        assert getattr(flat, name) is getattr(norms, name)
    assert taylor.decomposed_norms is norms.decomposed_norms and taylor.make_loss_fn is flat.make_loss_fn
