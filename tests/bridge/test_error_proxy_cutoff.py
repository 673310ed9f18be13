"""The error proxy's cutoff is inclusive, ``|ηλ| ≥ c`` (Eq. III.14): modes exactly on the cutoff count, in
error_proxy (torch_qode/bridge/spectrum.py) and in DissipationCheck's kept mass (dissipation.py)."""
import numpy as np
import pytest

from torch_qode.bridge.dissipation import Density, DissipationCheck, error_proxy

LR, C = 0.25, 0.5
#: λ = ±2 gives |ηλ| = 0.5 = c exactly in floating point (powers of two); 8 is beyond, 0.5 below
NODES = np.array([2.0, -2.0, 8.0, 0.5])
WEIGHTS = np.array([0.1, 0.2, 0.3, 0.4])


def _want(t):
    """a = −ηλ = −0.5, +0.5, −2 kept (|1 + a| = 0.5, 1.5, 1), −0.125 removed."""
    t = np.asarray(t, dtype=np.float64)
    return (0.1 * 0.5 ** t + 0.2 * 1.5 ** t + 0.3 * 1.0 ** t) / 0.6


def test_boundary_is_exact_in_floating_point():
    assert np.all(np.abs(-LR * NODES[:2]) == C)


def test_error_proxy_keeps_modes_on_the_cutoff():
    t = np.arange(6)
    np.testing.assert_allclose(error_proxy((NODES, WEIGHTS), LR, t, cutoff=C), _want(t), rtol=1e-13)
    d = Density(grid=NODES, values=WEIGHTS, nodes=NODES, weights=WEIGHTS, sigma=1.0)
    np.testing.assert_allclose(error_proxy(d, LR, t, cutoff=C), _want(t), rtol=1e-13)
    # exact (eigenvalue) form: mean of |1 + a|^t over the kept eigenvalues 2, −2, 8
    np.testing.assert_allclose(error_proxy(NODES, LR, t, cutoff=C), (0.5 ** t + 1.5 ** t + 1.0) / 3, rtol=1e-13)
    # only modes on the cutoff: they are kept, the proxy is not the "nothing beyond" constant 1
    assert error_proxy(np.array([2.0, 2.0]), LR, 3, cutoff=C) == pytest.approx(0.125)


@pytest.mark.parametrize("form", ["quadrature", "density"])
def test_dissipation_check_kept_mass_counts_modes_on_the_cutoff(form):
    d = Density(grid=NODES, values=WEIGHTS, nodes=NODES, weights=WEIGHTS, sigma=1.0)
    proxy, _, kept = DissipationCheck(cutoff=C, form=form).evaluate(d, LR, 5)
    assert kept == pytest.approx(0.6, rel=1e-14)
    np.testing.assert_allclose(proxy, _want(np.arange(6)), rtol=1e-13)
