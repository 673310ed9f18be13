"""torch_qode.bridge.lanczos: the full reorthogonalisation (one Gram–Schmidt pass, a second when needed)."""
import math

import numpy as np
import torch

from torch_qode.bridge.lanczos import _full_reorth, lanczos


def test_full_reorth_second_pass_when_one_pass_cancels():
    g = torch.Generator().manual_seed(0)
    B = torch.linalg.qr(torch.randn(50, 6, generator=g, dtype=torch.float64)).Q.T.contiguous()   # orthonormal rows
    tiny = torch.randn(50, generator=g, dtype=torch.float64)
    tiny -= B.T @ (B @ tiny)
    w = 1e6 * (B.T @ torch.arange(1.0, 7.0, dtype=torch.float64)) + 1e-3 * tiny / tiny.norm()
    beta = _full_reorth(w, B)                       # one pass leaves ~1e-10 of the 1e6: a second is taken
    assert abs(beta - float(w.norm())) < 1e-15 and float((B @ w).abs().max()) < 1e-13 * beta
    assert abs(beta - 1e-3) < 1e-8
    w2 = torch.randn(50, generator=g, dtype=torch.float64)
    before = float(w2.norm())
    beta2 = _full_reorth(w2, B)                     # a generic vector: orthogonal after one pass
    assert beta2 >= before / math.sqrt(2) and float((B @ w2).abs().max()) < 1e-13 * beta2


def test_lanczos_full_keeps_a_clustered_spectrum_exact():
    """Many steps past convergence of the extreme eigenvalues: no ghost copies, weights sum to one."""
    eigs = np.concatenate([np.linspace(1.0, 1.001, 40), [50.0, 80.0, 100.0]])
    Q = np.linalg.qr(np.random.default_rng(0).standard_normal((43, 43)))[0]
    H = torch.as_tensor(Q @ np.diag(eigs) @ Q.T)
    lz = lanczos(lambda v: H @ v, 43, 43, seed=0)
    nodes, weights = lz.quadrature()
    assert np.isclose(weights.sum(), 1.0, atol=1e-12)
    assert np.sum(nodes > 10) == 3 and np.allclose(np.sort(nodes)[-3:], [50.0, 80.0, 100.0], rtol=1e-10)
