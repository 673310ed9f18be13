"""torch_qode.bridge.lanczos: the full reorthogonalisation (one Gram–Schmidt pass, a second when needed)."""
import math

import numpy as np
import torch

from torch_qode.bridge.lanczos import _Basis, _full_reorth, lanczos, top_eigenvalues
from torch_qode.bridge.spectrum import slq_density


def test_full_reorth_second_pass_when_one_pass_cancels():
    g = torch.Generator().manual_seed(0)
    B = torch.linalg.qr(torch.randn(50, 6, generator=g, dtype=torch.float64)).Q.T.contiguous()   # orthonormal rows
    tiny = torch.randn(50, generator=g, dtype=torch.float64)
    tiny -= B.T @ (B @ tiny)
    w = 1e6 * (B.T @ torch.arange(1.0, 7.0, dtype=torch.float64)) + 1e-3 * tiny / tiny.norm()
    beta = _full_reorth(w, _Basis.from_rows(B))     # one pass leaves ~1e-10 of the 1e6: a second is taken
    assert abs(beta - float(w.norm())) < 1e-15 and float((B @ w).abs().max()) < 1e-13 * beta
    assert abs(beta - 1e-3) < 1e-8
    w2 = torch.randn(50, generator=g, dtype=torch.float64)
    before = float(w2.norm())
    beta2 = _full_reorth(w2, _Basis.from_rows(B))   # a generic vector: orthogonal after one pass
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


def _clustered(n=43, seed=0):
    eigs = np.concatenate([np.linspace(1.0, 1.001, n - 3), [50.0, 80.0, 100.0]])
    Q = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))[0]
    return torch.as_tensor(Q @ np.diag(eigs) @ Q.T)


def test_a_basis_over_the_budget_is_never_stored():
    """Over max_basis_bytes the run is the plain recurrence (bit-identical to reorthogonalize=None) and
    says so; within it, full reorthogonalisation as asked — past 16 steps, over several basis blocks."""
    H = _clustered()
    op = lambda v: H @ v
    need = 40 * 43 * 8
    over = lanczos(op, 43, 40, seed=0, max_basis_bytes=need - 1)
    plain = lanczos(op, 43, 40, seed=0, reorthogonalize=None)
    assert over.reorthogonalize is None
    assert np.array_equal(over.alphas, plain.alphas) and np.array_equal(over.betas, plain.betas)
    full = lanczos(op, 43, 40, seed=0, max_basis_bytes=need)
    assert full.reorthogonalize == "full"
    nodes = full.quadrature()[0]
    assert np.sum(nodes > 10) == 3                       # full: no ghost copies of the converged eigenvalues
    assert np.sum(plain.quadrature()[0] > 10) > 3        # plain: ghosts (what the fallback costs)
    dens = slq_density(op, 43, steps=40, max_basis_bytes=need - 1)
    assert dens.reorthogonalize is None
    assert slq_density(op, 43, steps=40).reorthogonalize == "full"


def test_top_eigenvalues_store_only_the_blocks_they_reach():
    """Converged after a few steps: the basis holds one block of 16 rows, not the 100 steps allowed."""
    H = _clustered()
    blocks = []
    original = _Basis.append

    def spy(self, v):
        original(self, v)
        blocks.append(len(self.blocks))

    _Basis.append = spy
    try:
        top = top_eigenvalues(lambda v: H @ v, 43, 1, tol=1e-8)
    finally:
        _Basis.append = original
    assert abs(top[0] - 100.0) < 1e-6
    assert len(blocks) < 43 and max(blocks) == -(-len(blocks) // 16)


def test_the_check_says_when_its_basis_did_not_fit(monkeypatch):
    from torch_qode.bridge import lanczos as lz
    from torch_qode.bridge.dissipation import DissipationCheck

    H = _clustered()
    fits = DissipationCheck(criterion="proxy", steps=20)(lambda v: H @ v, 43, lr=0.01, T=5)
    assert "without reorthogonalisation" not in fits.reason
    monkeypatch.setattr(lz, "BASIS_BUDGET_BYTES_CPU", 100)
    over = DissipationCheck(criterion="proxy", steps=20)(lambda v: H @ v, 43, lr=0.01, T=5)
    assert "without reorthogonalisation" in over.reason and over.density.reorthogonalize is None
