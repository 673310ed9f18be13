"""torch_qode.bridge.dissipation: Lanczos, SLQ density, spectrum backends, error proxy, the dissipation check.

References: dense eigendecompositions (numpy) of explicit matrices / of the exact Hessian of tiny
models, closed forms of the error proxy, and PyHessian 0.1 itself (raw) for the faults the adapter
fixes.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from tests._models import (assert_unchanged, cnn_batch, flat_params, mlp_batch, reference_loss, state_snapshot,
                           tiny_cnn, tiny_mlp)
from torch_qode.bridge.dissipation import (Density, DissipationCheck, PyHessianAdapter, Verdict, error_proxy,
                                    hessian_spectrum, hutchinson_trace, lanczos, positive_fraction, slq_density,
                                    smooth_density, top_eigenvalues)

CE = nn.CrossEntropyLoss()


def _sym(eigs, seed=0):
    """A dense symmetric matrix with the given eigenvalues in a random orthogonal basis, and its hvp."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(len(eigs), len(eigs))))
    A = torch.as_tensor((Q * np.asarray(eigs, dtype=np.float64)) @ Q.T)
    return A, (lambda v: A.to(v.dtype) @ v)


def w1(nodes, weights, eigs) -> float:
    """Wasserstein-1 distance between a quadrature measure and the uniform measure on eigs."""
    x = np.sort(np.concatenate([nodes, eigs]))
    Fa = np.array([weights[nodes <= t].sum() for t in x])
    Fb = np.searchsorted(np.sort(eigs), x, side="right") / len(eigs)
    return float(np.sum(np.abs(Fa - Fb)[:-1] * np.diff(x)))


def _exact_hessian_eigs(model, batch):
    H = torch.autograd.functional.hessian(reference_loss(model, batch, CE), flat_params(model), vectorize=True)
    return np.linalg.eigvalsh(H.numpy())


# ------------------------------------------------------------------------------------- Lanczos
@pytest.mark.parametrize("reorth", ["full", "selective", None])
def test_lanczos_full_steps_recovers_spectrum_and_weights(reorth):
    eigs = np.linspace(-1.0, 3.0, 40)
    A, hvp = _sym(eigs)
    v0 = torch.randn(40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lz = lanczos(hvp, 40, 40, v0=v0, reorthogonalize=reorth)
    nodes, weights = lz.quadrature()
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)
    if reorth is not None:
        assert np.allclose(np.sort(nodes), eigs, atol=1e-9)
        evals, evecs = np.linalg.eigh(A.numpy())
        q = evecs.T @ (v0.numpy() / np.linalg.norm(v0.numpy()))
        assert np.allclose(weights[np.argsort(nodes)], q ** 2, atol=1e-9)
    else:  # extremes still converge without reorthogonalisation
        assert nodes.max() == pytest.approx(3.0, abs=1e-8) and nodes.min() == pytest.approx(-1.0, abs=1e-8)


def test_selective_reorthogonalisation_removes_ghosts():
    """Well-separated outliers converge early and come back as ghosts without reorthogonalisation."""
    eigs = np.concatenate([np.linspace(0.0, 1.0, 200), [50.0, 80.0, 100.0]])
    _, hvp = _sym(eigs, seed=3)
    res = {}
    for reorth in ("full", "selective", None):
        nodes, w = lanczos(hvp, eigs.size, 120, seed=0, reorthogonalize=reorth).quadrature()
        res[reorth] = int(np.sum(nodes > 40))
        if reorth is not None:
            assert np.allclose(np.sort(nodes[nodes > 40]), [50, 80, 100], atol=1e-8)
    assert res["full"] == res["selective"] == 3
    assert res[None] > 3  # the plain recurrence duplicates converged eigenvalues


def test_lanczos_breakdown_on_few_distinct_eigenvalues():
    eigs = np.repeat([1.0, 2.0, 5.0], 10)
    _, hvp = _sym(eigs)
    lz = lanczos(hvp, 30, 20, seed=0)
    assert lz.alphas.size == 3 and lz.betas.size == 2  # invariant Krylov space of dimension 3
    nodes, w = lz.quadrature()
    assert np.allclose(np.sort(nodes), [1, 2, 5], atol=1e-10)
    assert w.sum() == pytest.approx(1.0)


def test_lanczos_float32_vectors_float64_tridiagonal():
    eigs = np.linspace(0.1, 2.0, 30)
    _, hvp = _sym(eigs)
    lz = lanczos(hvp, 30, 30, seed=0, dtype=torch.float32)
    assert lz.alphas.dtype == np.float64
    assert np.allclose(np.sort(lz.quadrature()[0]), eigs, atol=1e-5)


def test_lanczos_bad_input():
    _, hvp = _sym(np.ones(5))
    for kw, msg in [(dict(steps=0), "steps"), (dict(steps=6), "steps"),
                    (dict(reorthogonalize="partial"), "reorthogonalize"), (dict(dtype=torch.int64), "dtype"),
                    (dict(v0=torch.zeros(5)), "v0"), (dict(v0=torch.ones(4)), "v0")]:
        args = dict(steps=3) | kw
        with pytest.raises((ValueError, TypeError), match=msg):
            lanczos(hvp, 5, **args)
    with pytest.raises(ValueError, match="shape"):
        lanczos(lambda v: v[:3], 5, 3)
    with pytest.raises(FloatingPointError):
        lanczos(lambda v: v * float("nan"), 5, 3)


# --------------------------------------------------------------------------------------- density
def test_slq_density_vs_exact_eigendecomposition_on_models():
    for model, batch in ((tiny_mlp(), mlp_batch()), (tiny_cnn(), cnn_batch())):
        eigs = _exact_hessian_eigs(model, batch)
        H = torch.autograd.functional.hessian(reference_loss(model, batch, CE), flat_params(model), vectorize=True)
        hvp = lambda v: H @ v
        span = eigs.max() - eigs.min()
        one = slq_density(hvp, eigs.size, steps=20, runs=1, seed=0)
        many = slq_density(hvp, eigs.size, steps=20, runs=30, seed=0)
        assert many.weights.sum() == pytest.approx(1.0)
        e1, e30 = w1(one.nodes, one.weights, eigs), w1(many.nodes, many.weights, eigs)
        assert e30 < 0.03 * span  # error bound: Gauss quadrature + 30 random probes
        assert e1 < 0.15 * span
        assert many.nodes.max() == pytest.approx(eigs.max(), rel=1e-6)
        # the CDF of the quadrature follows the exact CDF
        x = np.linspace(eigs.min(), eigs.max(), 50)
        assert np.max(np.abs(many.cdf(x) - np.searchsorted(eigs, x, side="right") / eigs.size)) < 0.15


def test_smooth_density_grid_sigma_and_mass():
    d = smooth_density(np.array([0.0, 1.0]), np.array([0.25, 0.75]), steps=64)
    assert d.grid.size == 256 and d.values.size == 256
    assert d.grid[0] == pytest.approx(-0.05) and d.grid[-1] == pytest.approx(1.05)
    assert d.sigma == pytest.approx(1.1 / 63 / math.sqrt(8 * math.log(1.25)))  # Papyan's kernel, kappa = 1.25
    assert d.values.sum() * (d.grid[1] - d.grid[0]) == pytest.approx(1.0)
    assert abs(d.grid[np.argmax(d.values)] - 1.0) < 2 * (d.grid[1] - d.grid[0])
    left = d.values[d.grid < 0.5].sum() * (d.grid[1] - d.grid[0])
    assert left == pytest.approx(0.25, abs=1e-3)
    with pytest.raises(ValueError, match="grid"):
        smooth_density([0.0], [1.0], grid=1)
    with pytest.raises(ValueError, match="sigma"):
        smooth_density([0.0], [1.0], sigma=-1.0)
    json.dumps(d.as_dict())


def test_top_eigenvalues_and_trace():
    eigs = np.concatenate([np.linspace(-2.0, 1.0, 60), [4.0, 5.0]])
    A, hvp = _sym(eigs)
    assert np.allclose(top_eigenvalues(hvp, 62, k=3), [5.0, 4.0, 1.0], atol=1e-6)
    eigs2 = np.concatenate([np.linspace(-1.0, 1.0, 30), [-7.0, 3.0]])
    _, hvp2 = _sym(eigs2)
    assert np.allclose(top_eigenvalues(hvp2, 32, k=2, which="magnitude"), [-7.0, 3.0], atol=1e-6)
    tr, se = hutchinson_trace(hvp, 62, samples=200, seed=0, return_stderr=True)
    assert abs(tr - eigs.sum()) < 4 * se
    with pytest.raises(ValueError, match="which"):
        top_eigenvalues(hvp, 62, which="smallest")
    with pytest.raises(ValueError, match="k must be"):
        top_eigenvalues(hvp, 62, k=0)
    with pytest.raises(ValueError, match="samples"):
        hutchinson_trace(hvp, 62, samples=0)


# ------------------------------------------------------------------------- spectrum backends
def _convex_mlp():
    """Small MLP at a point where the top eigenvalue dominates in magnitude (power iteration converges)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(4)
    return m, (3 * torch.randn(40, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (40,), generator=g))


def test_backends_agree_with_each_other_and_the_exact_spectrum():
    model, batch = _convex_mlp()
    eigs = _exact_hessian_eigs(model, batch)
    n = eigs.size
    span = eigs.max() - eigs.min()
    kw = dict(steps=n, runs=1, trace_samples=300, seed=0, top_k=1)
    own = hessian_spectrum(model, CE, batch, backend="torch", which="magnitude", **kw)
    pyh = hessian_spectrum(model, CE, batch, backend="pyhessian", eig_iters=500, tol=1e-7, **kw)
    lead = eigs[np.argmax(np.abs(eigs))]
    assert own.top_eigenvalues[0] == pytest.approx(lead, rel=1e-8)
    assert pyh.top_eigenvalues[0] == pytest.approx(lead, rel=1e-3)
    alg = hessian_spectrum(model, CE, batch, backend="torch", top_k=2, density=False, trace=False)
    assert np.allclose(alg.top_eigenvalues, eigs[::-1][:2], rtol=1e-8)
    assert own.n == pyh.n == n
    for s in (own, pyh):  # both densities: W1 to the exact spectrum within the single-probe error
        assert w1(s.density.nodes, s.density.weights, eigs) < 0.15 * span
        assert abs(s.trace - eigs.sum()) < 0.5 * np.abs(eigs).sum()
    # with full steps every node of the own quadrature is an exact eigenvalue (repeated eigenvalues, e.g. the
    # zero modes of the softmax, appear once: the Krylov space sees one direction per eigenspace)
    assert np.abs(own.density.nodes[:, None] - eigs[None, :]).min(axis=1).max() < 1e-8 * span
    json.dumps(own.as_dict())


def test_same_start_vector_gives_the_same_quadrature():
    """Own Lanczos from PyHessian's Rademacher start vector reproduces PyHessian-fixed's nodes/weights."""
    model, batch = tiny_cnn(), cnn_batch()
    params = list(model.parameters())
    h = PyHessianAdapter(model, CE, data=batch, seed=7)
    ev, wt = h.density(iter=15, n_v=1)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        v = torch.cat([torch.randint_like(p, high=2).reshape(-1) for p in params]) * 2 - 1
    from torch_qode.bridge.taylor import TaylorExpansion
    exp = TaylorExpansion.from_model(model, CE, batch, lr=1.0, degree=1)
    nodes, weights = lanczos(exp.hvp, exp.n, 15, v0=v).quadrature()
    o = np.argsort(nodes)
    p = np.argsort(ev[0])
    assert np.allclose(nodes[o], np.asarray(ev[0])[p], rtol=1e-5, atol=1e-6)
    assert np.allclose(weights[o], np.asarray(wt[0])[p], atol=1e-5)


def test_support_restricted_spectrum():
    model, batch = tiny_mlp(), mlp_batch()
    H = torch.autograd.functional.hessian(reference_loss(model, batch, CE), flat_params(model), vectorize=True)
    S = torch.tensor([0, 2, 3, 9, 10, 11, 20, 25, 30])
    eigs = np.linalg.eigvalsh(H[S][:, S].numpy())
    sp = hessian_spectrum(model, CE, batch, support=S, steps=9, top_k=2, trace_samples=50)
    assert sp.n == 9
    assert np.allclose(np.sort(sp.density.nodes), eigs, atol=1e-10)
    assert np.allclose(sp.top_eigenvalues, eigs[::-1][:2], atol=1e-10)
    with pytest.raises(ValueError, match="support"):
        hessian_spectrum(model, CE, batch, backend="pyhessian", support=S)
    with pytest.raises(ValueError, match="magnitude"):
        hessian_spectrum(model, CE, batch, backend="pyhessian", which="algebraic")
    with pytest.raises(ValueError, match=r"^backend must be one of \('torch', 'pyhessian'\), got 'jax'$"):
        hessian_spectrum(model, CE, batch, backend="jax")


def test_spectrum_backends_are_a_registry():
    """``backend=`` names a registered backend: its default ``which`` and its refusals come with it."""
    from torch_qode.bridge.spectrum import SPECTRUM_BACKENDS
    assert SPECTRUM_BACKENDS.names() == ("torch", "pyhessian")
    assert [SPECTRUM_BACKENDS[b].default_which for b in SPECTRUM_BACKENDS] == ["algebraic", "magnitude"]
    SPECTRUM_BACKENDS["torch"].refuse(which="algebraic", group=object())        # the torch backend refuses nothing
    with pytest.raises(ValueError, match="torch.distributed"):
        SPECTRUM_BACKENDS["pyhessian"].refuse(group=object())
    with pytest.raises(ValueError, match=r"^backend must be one of \('torch', 'pyhessian'\), got 1$"):
        SPECTRUM_BACKENDS.lookup(1, "backend")


@pytest.mark.parametrize("backend", ["torch", "pyhessian"])
def test_spectrum_leaves_no_side_effects(backend):
    model, batch = tiny_cnn(), cnn_batch()
    model[0].weight.grad = torch.full_like(model[0].weight, 3.0)
    model[2].eval()  # mixed modes are kept as they are
    snap = state_snapshot(model)
    rng = torch.get_rng_state()
    hessian_spectrum(model, CE, batch, backend=backend, steps=8, trace_samples=5, top_k=1, eig_iters=5)
    assert_unchanged(model, snap)
    assert torch.equal(rng, torch.get_rng_state())
    h = PyHessianAdapter(model, CE, data=batch)
    h.eigenvalues(maxIter=3)
    h.trace(maxIter=3)
    h.density(iter=4)
    assert_unchanged(model, snap)
    assert all(p.grad is None or p.grad.grad_fn is None for p in model.parameters())


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
def test_raw_pyhessian_faults_that_the_adapter_fixes():
    from pyhessian import hessian as raw

    model, batch = tiny_cnn(dtype=torch.float32), tuple(t.float() if t.is_floating_point() else t for t in cnn_batch())
    model.train()
    h = raw(model, CE, data=batch, cuda=False)
    assert not model.training  # fault: the constructor switched the model to eval()
    assert model[0].weight.grad is not None and model[0].weight.grad.grad_fn is not None  # graph left in .grad
    with pytest.raises((AttributeError, RuntimeError), match="removed|eig"):  # fault: torch.eig is gone
        h.density(iter=3)
    model.zero_grad(set_to_none=True)  # break the parameter <-> graph cycle the raw constructor created

    # fault: trace() stops after two samples when the running trace is negative
    neg = lambda out, y: -CE(out, y) * 100  # a loss with a negative-definite-leaning Hessian
    model2 = tiny_mlp(dtype=torch.float32)
    b2 = tuple(t.float() if t.is_floating_point() else t for t in mlp_batch())
    with torch.random.fork_rng():
        torch.manual_seed(0)
        raw_samples = raw(model2, neg, data=b2, cuda=False).trace(maxIter=50, tol=1e-3)
    model2.zero_grad(set_to_none=True)
    fixed = PyHessianAdapter(model2, neg, data=b2).trace(maxIter=50, tol=1e-3)
    assert np.mean(fixed) < 0
    assert len(raw_samples) == 2 and len(fixed) > 2


def test_torch_prune_reparametrisation_is_refused():
    from torch.nn.utils import prune

    model, batch = tiny_mlp(), mlp_batch()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    for backend in ("torch", "pyhessian"):
        with pytest.raises(ValueError, match=r"0\.weight.*prune\.remove"):
            hessian_spectrum(model, CE, batch, backend=backend, steps=4)
    with pytest.raises(ValueError, match="weight_orig"):
        PyHessianAdapter(model, CE, data=batch)
    prune.remove(model[0], "weight")
    hessian_spectrum(model, CE, batch, steps=4, trace=False)


def test_adapter_device_and_arguments():
    model, batch = tiny_mlp(), mlp_batch()
    with pytest.raises(ValueError, match="cuda"):
        PyHessianAdapter(model, CE, data=batch, cuda=True)
    with pytest.raises(ValueError, match="exactly one"):
        PyHessianAdapter(model, CE)
    h = PyHessianAdapter(model, CE, data=batch, cuda=False)
    assert h.device == torch.device("cpu")
    loader = [mlp_batch(5, seed=2), mlp_batch(5, seed=3)]
    hl = PyHessianAdapter(model, CE, dataloader=loader)
    v = [torch.ones_like(p) for p in model.parameters()]
    _, Hv = hl.dataloader_hv_product(v)
    f = lambda th: 0.5 * (reference_loss(model, loader[0], CE)(th) + reference_loss(model, loader[1], CE)(th))
    ref = torch.autograd.functional.hvp(f, flat_params(model), torch.ones(31, dtype=torch.float64))[1]
    assert torch.allclose(torch.cat([t.reshape(-1) for t in Hv]), ref, atol=1e-12)


# ----------------------------------------------------------------------------------- error proxy
def test_error_proxy_closed_forms():
    lr = 0.1
    t = np.arange(8)
    lam = np.full(10, 5.0)                      # a = -0.5 everywhere
    assert np.allclose(error_proxy(lam, lr, t), 0.5 ** t)
    assert error_proxy(lam, lr, 3) == pytest.approx(0.125) and isinstance(error_proxy(lam, lr, 3), float)
    mixed = np.array([5.0, 5.0, -5.0, 1.0, -1.0])  # a = -0.5, -0.5, +0.5; ±0.1 removed by the cutoff
    assert np.allclose(error_proxy(mixed, lr, t), (2 * 0.5 ** t + 1.5 ** t) / 3)
    assert np.allclose(error_proxy(mixed, lr, t, cutoff=0.0), (2 * 0.5 ** t + 1.5 ** t + 0.9 ** t + 1.1 ** t) / 5)
    assert np.array_equal(error_proxy(np.array([1.0, -2.0]), lr, t), np.ones(8))  # nothing beyond the cutoff
    assert np.allclose(error_proxy(np.array([10.0]), lr, t), 0.0 ** t)  # a = -1: the mode is gone after one step
    assert error_proxy(np.array([-1e4]), lr, 400) == math.inf  # overflow reads as inf, no warning
    # quadrature and density forms with the same measure
    nodes, weights = np.array([5.0, -5.0, 0.2]), np.array([0.6, 0.2, 0.2])
    assert np.allclose(error_proxy((nodes, weights), lr, t), (0.6 * 0.5 ** t + 0.2 * 1.5 ** t) / 0.8)
    d = Density(grid=nodes, values=weights, nodes=nodes, weights=weights, sigma=1.0)
    assert np.allclose(error_proxy(d, lr, t), (0.6 * 0.5 ** t + 0.2 * 1.5 ** t) / 0.8)
    assert np.allclose(error_proxy(torch.tensor(lam), lr, t), 0.5 ** t)


def test_error_proxy_density_form_approaches_exact():
    rng = np.random.default_rng(0)
    lam = np.concatenate([rng.uniform(4.5, 15.0, 150), rng.uniform(-0.1, 0.1, 350)])
    A, hvp = _sym(lam)
    d = slq_density(hvp, lam.size, steps=80, runs=10, seed=1)
    t = np.arange(0, 11)
    exact = error_proxy(lam, 0.1, t)
    approx = error_proxy(d, 0.1, t)
    assert np.allclose(approx, exact, rtol=0.25, atol=0.02)
    assert np.all(np.diff(approx) < 0)  # a dissipative spectrum: the proxy decays


def test_error_proxy_bad_input():
    with pytest.raises(ValueError, match="lr"):
        error_proxy([1.0], 0.0, 1)
    with pytest.raises(ValueError, match="cutoff"):
        error_proxy([1.0], 0.1, 1, cutoff=-1)
    with pytest.raises(ValueError, match="t must be"):
        error_proxy([1.0], 0.1, -1)
    with pytest.raises(ValueError, match="finite"):
        error_proxy([float("nan")], 0.1, 1)
    with pytest.raises(TypeError, match="spectrum"):
        error_proxy(object(), 0.1, 1)


@settings(max_examples=30, deadline=None)
@given(a=st.lists(st.floats(-1.9, -0.4), min_size=1, max_size=20), T=st.integers(0, 30))
def test_property_all_dissipative_modes_never_exceed_one(a, T):
    """Every kept mode with a ∈ [-1.9, -0.4] has |1 + a| < 1: the proxy is ≤ 1 and non-increasing."""
    lam = -np.asarray(a) / 0.01
    p = error_proxy(lam, 0.01, np.arange(T + 1))
    assert p[0] == 1.0 and np.all(p <= 1.0 + 1e-12) and np.all(np.diff(p) <= 1e-12)
    assert p[-1] == pytest.approx(np.mean(np.abs(1 + np.asarray(a)) ** T), rel=1e-9)


def test_positive_fraction():
    assert positive_fraction(np.array([1.0, 2.0, -1.0, 0.0])) == pytest.approx(2 / 3)
    assert positive_fraction(np.array([1.0, 1e-6, -1e-6])) == 1.0  # the flat band is neither
    assert positive_fraction(np.zeros(3)) == 1.0
    d = smooth_density(np.array([1.0, -1.0]), np.array([0.8, 0.2]))
    assert positive_fraction(d) == pytest.approx(0.8)


# ------------------------------------------------------------------------------- the check
def test_check_passes_on_a_dissipative_spectrum_with_closed_form_proxy():
    lam = np.full(20, 5.0)
    lam[:5] = 0.001  # flat modes, below the cutoff
    _, hvp = _sym(lam)
    v = DissipationCheck(criterion="proxy")(hvp, 20, lr=0.1, T=10)
    assert isinstance(v, Verdict) and v.passed and v.reason.startswith("passed")
    assert v.proxy.shape == (11,) and v.proxy[0] == 1.0
    assert v.top_eigenvalue == pytest.approx(5.0)
    assert v.positive_fraction == 1.0
    assert v.proxy[-1] == pytest.approx(0.5 ** 10, rel=1e-6)  # Gauss quadrature form: exact here
    dens = DissipationCheck(criterion="proxy", form="density")(hvp, 20, lr=0.1, T=10)
    # the paper's smoothed density overestimates: averaging the convex |1 + a|^t over the kernel (Jensen)
    assert 0.5 ** 10 < dens.proxy[-1] < 1.3 * 0.5 ** 10
    assert v.hvps <= 20
    json.dumps(v.as_dict())


def test_check_fails_on_divergent_modes_and_on_few_positive_modes():
    lam = np.concatenate([np.full(15, 5.0), np.full(5, -5.0)])  # a = -0.5 and +0.5
    _, hvp = _sym(lam)
    v = DissipationCheck(criterion="proxy")(hvp, 20, lr=0.1, T=20)
    assert not v.passed and "proxy(T=20)" in v.reason
    assert v.proxy[-1] > 1
    # (3·0.25 + 2.25)/4 = 0.75: still fine after 2 steps
    v_short = DissipationCheck(criterion="proxy")(hvp, 20, lr=0.1, T=2)
    assert v_short.passed
    lam2 = np.concatenate([np.full(5, 5.0), np.full(15, -1.0)])  # divergent directions are the majority
    _, hvp2 = _sym(lam2)
    v2 = DissipationCheck(criterion="proxy")(hvp2, 20, lr=0.1, T=5)   # -1.0 stays below the cutoff: proxy fine
    assert not v2.passed and "positive fraction" in v2.reason and "proxy" not in v2.reason
    assert v2.positive_fraction == pytest.approx(0.25, abs=0.1)  # one Rademacher probe: weights fluctuate
    assert DissipationCheck(criterion="proxy", min_positive_fraction=0.2)(hvp2, 20, lr=0.1, T=5).passed


def test_window_flat_band_in_the_positive_fraction():
    """Tiny negative modes that barely move over the window are flat; real divergent ones are not."""
    lam = np.concatenate([np.full(5, 5.0), np.full(15, -0.02)])
    _, hvp = _sym(lam)
    # η = 0.1, T = 20: |ηλ|·T = 0.04 ≤ 0.1 for the negative modes -> flat -> all the moving mass is positive
    v = DissipationCheck(criterion="proxy")(hvp, 20, lr=0.1, T=20)
    assert v.passed and v.positive_fraction == pytest.approx(1.0)
    assert not DissipationCheck(criterion="proxy", flat_growth=0.0)(hvp, 20, lr=0.1, T=20).passed   # relative band only
    # T = 200: the same modes grow by (1.002)^200 ≈ 1.5 -> they count, and they are the majority
    v_long = DissipationCheck(criterion="proxy")(hvp, 20, lr=0.1, T=200)
    assert not v_long.passed and "positive fraction" in v_long.reason
    assert positive_fraction(lam, flat_below=0.05) == 1.0 and positive_fraction(lam) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="flat_below"):
        positive_fraction(lam, flat_below=-1.0)
    with pytest.raises(ValueError, match="flat_growth"):
        DissipationCheck(criterion="proxy", flat_growth=-0.1)


def test_check_nothing_beyond_the_cutoff_and_non_finite():
    _, hvp = _sym(np.linspace(0.1, 1.0, 10))
    v = DissipationCheck(criterion="proxy")(hvp, 10, lr=0.01, T=50)
    assert v.passed and np.array_equal(v.proxy, np.ones(51)) and "proxy ≡ 1" in v.reason and v.kept_mass == 0
    bad = DissipationCheck(criterion="proxy")(lambda x: x * float("nan"), 10, lr=0.1, T=5)
    assert not bad.passed and "non-finite" in bad.reason
    assert bad.proxy.shape == (6,)


def test_check_on_a_model_hvp_is_deterministic_and_side_effect_free():
    from torch_qode.bridge.taylor import TaylorExpansion

    model, batch = tiny_cnn(), cnn_batch()
    snap = state_snapshot(model)
    exp = TaylorExpansion.from_model(model, CE, batch, lr=0.5, degree=1)
    chk = DissipationCheck(criterion="proxy", steps=16)
    a = chk(exp.hvp, exp.n, lr=0.5, T=10)
    b = chk(exp.hvp, exp.n, lr=0.5, T=10, dtype=torch.float32)
    assert a.as_dict()["proxy"] == pytest.approx(chk(exp.hvp, exp.n, lr=0.5, T=10).as_dict()["proxy"])
    assert a.top_eigenvalue == pytest.approx(b.top_eigenvalue, rel=1e-4)
    exp.release()
    assert_unchanged(model, snap)


def test_check_bad_arguments():
    for kw in (dict(max_error_proxy=0), dict(min_positive_fraction=1.5), dict(cutoff=-0.1), dict(steps=0),
               dict(runs=0), dict(reorthogonalize="some"), dict(grid=1)):
        with pytest.raises(ValueError):
            DissipationCheck(criterion="proxy", **kw)
    _, hvp = _sym(np.ones(4))
    with pytest.raises(ValueError, match="T must be"):
        DissipationCheck(criterion="proxy")(hvp, 4, lr=0.1, T=-1)
    with pytest.raises(ValueError, match="lr"):
        DissipationCheck(criterion="proxy")(hvp, 4, lr=0.0, T=1)


# ------------------------------------------------------------------------ argument checks, numbers
@pytest.mark.parametrize("backend", ["torch", "pyhessian"])
def test_spectrum_arguments_are_checked_for_both_backends(backend):
    model, batch = tiny_mlp(), mlp_batch()
    fast = dict(steps=4, trace_samples=3, eig_iters=5, backend=backend)
    for kw, exc, msg in [(dict(top_k=0), ValueError, "top_k"), (dict(top_k=32), ValueError, "top_k"),
                         (dict(trace_samples=0), ValueError, "trace_samples"), (dict(steps=0), ValueError, "steps"),
                         (dict(runs=0), ValueError, "runs"), (dict(eig_iters=0), ValueError, "eig_iters"),
                         (dict(grid=1), ValueError, "grid"), (dict(tol=-1.0), ValueError, "tol"),
                         (dict(sigma=-1.0), ValueError, "sigma"), (dict(seed=1.5), TypeError, "seed"),
                         (dict(steps=2.0), ValueError, "steps"), (dict(reorthogonalize="x"), ValueError, "reorth")]:
        with pytest.raises(exc, match=msg):
            hessian_spectrum(model, CE, batch, **{**fast, **kw})
    with pytest.raises(ValueError, match="scalar"):
        hessian_spectrum(model, nn.CrossEntropyLoss(reduction="none"), batch, **fast)
    with pytest.raises(TypeError, match="batch must be a pair"):
        hessian_spectrum(model, CE, (batch[0], batch[1], batch[1]), **fast)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        hessian_spectrum(model, None, batch, **fast)
    a = hessian_spectrum(model, CE, batch, seed=None, **fast)
    b = hessian_spectrum(model, CE, batch, seed=0, **fast)
    assert np.array_equal(a.top_eigenvalues, b.top_eigenvalues) and a.trace == b.trace
    c = hessian_spectrum(model, CE, batch, **{**fast, "top_k": np.int64(2), "steps": np.int64(4),
                                              "sigma": np.float32(0.25), "tol": np.float32(1e-3)})
    assert c.top_eigenvalues.shape == (2,) and c.density.sigma == pytest.approx(0.25)


def test_numpy_scalars_are_numbers():
    eigs = np.array([3.0, 2.0, 0.5, -0.2, 1e-6])
    _, hvp = _sym(eigs)
    ref = DissipationCheck(criterion="proxy", cutoff=float(np.float32(0.3)), zero_tol=1e-3, steps=5,
                           seed=1)(hvp, 5, lr=0.5, T=4)
    chk = DissipationCheck(criterion="proxy", cutoff=np.float32(0.3), zero_tol=np.float64(1e-3), steps=np.int64(5),
                           seed=np.int32(1), max_error_proxy=np.float32(1.0), sigma=None)
    got = chk(hvp, 5, lr=np.float32(0.5), T=np.int64(4))
    assert np.allclose(got.proxy, ref.proxy, rtol=1e-6) and got.passed == ref.passed
    assert chk.cutoff == pytest.approx(0.3) and type(chk.steps) is int
    assert positive_fraction(eigs, np.float32(0.05)) == positive_fraction(eigs, 0.05) == pytest.approx(3 / 4)
    assert positive_fraction(eigs, np.float32(0.1)) == 1.0                   # -0.2 now inside the flat band
    assert positive_fraction(eigs, torch.tensor(0.05)) == pytest.approx(3 / 4)
    d1 = slq_density(hvp, 5, steps=5, sigma=np.float32(0.25))
    d2 = slq_density(hvp, 5, steps=5, sigma=0.25)
    assert d1.sigma == pytest.approx(0.25) and np.allclose(d1.values, d2.values, rtol=1e-6)
    for kw in (dict(cutoff=np.bool_(True)), dict(zero_tol=np.array([0.1])), dict(sigma="0.1")):
        with pytest.raises(ValueError):
            DissipationCheck(criterion="proxy", **kw)
    with pytest.raises(TypeError, match="seed"):
        DissipationCheck(criterion="proxy", seed=None)
    with pytest.raises(ValueError, match="zero_tol"):
        positive_fraction(eigs, np.float32(1.0))
    for tol in (-1.0, float("nan"), "x"):
        with pytest.raises(ValueError, match="tol"):
            top_eigenvalues(hvp, 5, tol=tol)
    assert top_eigenvalues(hvp, 5, tol=np.float32(0.0))[0] == pytest.approx(3.0)


def test_verdict_reason_never_prints_a_failing_number_equal_to_its_threshold():
    from torch_qode.bridge.dissipation import _beside
    assert _beside(0.4999996, 0.5, 3) == "0.4999996" and float(_beside(0.4999996, 0.5, 3)) < 0.5
    assert _beside(0.54, 0.5, 3) == "0.54" and _beside(0.5, 0.5, 3) == "0.5"
    assert _beside(1.00000001, 1.0, 4) == "1.00000001"
