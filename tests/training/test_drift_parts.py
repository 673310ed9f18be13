"""Issue 21: the drift decomposed along the chain θ_SGD → θ_GD,S → θ_lin → θ_lin,r → θ_QODE, the classical
twin, and the two readouts (``u(T)`` or ``θ0 + u(T)``).  Every run of the chain is recomputed here by hand
(torch.optim.SGD, gradient descent on S, the readout's top-r prune) and the reported parts against it."""
import pytest
import torch

from torch_qode.training import cycle as _cycle
from torch_qode.training.qode import QODE
from torch_qode.training.shadow import PARTS, chain_parts
from tests.training.test_qode import batches, closure_for, flat, flat_loss, micro_mlp, tiny_mlp

LR, CYCLE, CS = 0.1, 6, 2


def _captured(monkeypatch) -> list:
    """The keyword arguments of every window-end drift measurement (the chain's runs)."""
    seen = []
    original = _cycle.drift_measurement

    def spy(rep, shadow, theta0, theta_q, theta_lin, *args, **kw):
        seen.append(dict(kw, theta0=theta0.clone(), theta_q=theta_q.clone(), theta_lin=theta_lin.clone(),
                         theta_s=torch.cat([p.reshape(-1) for p in shadow.params]).clone(),
                         theta_gd=None if shadow.gd is None else shadow.gd.clone()))
        return original(rep, shadow, theta0, theta_q, theta_lin, *args, **kw)

    monkeypatch.setattr(_cycle, "drift_measurement", spy)
    return seen


def _prune_by_hand(theta: torch.Tensor, support, flags: torch.Tensor, keep: int) -> torch.Tensor:
    """The readout's prune written out: on S, keep the ``keep`` largest prunable |θ_i| (counting the
    prunable non-zeros outside S first), ties to the lower index."""
    theta = theta.clone()
    on_S = torch.zeros_like(flags) if support is not None else torch.ones_like(flags)
    if support is not None:
        on_S[support] = True
    keep -= int(torch.count_nonzero(theta[flags & ~on_S]))
    cand = [i for i in range(theta.numel()) if flags[i] and on_S[i]]
    cand.sort(key=lambda i: (-abs(float(theta[i])), i))
    for i in cand[max(keep, 0):]:
        theta[i] = 0
    return theta


def _run(model, data, **kw):
    opt = QODE(model.parameters(), lr=LR, mode="quantum", cycle=CYCLE, classical_steps=CS, track_sgd=True, **kw)
    for X, Y in data:
        opt.step(closure_for(model, opt, X, Y))
    return opt


def _keep(opt, params):
    flags = torch.cat([torch.full((p.numel(),), f, dtype=torch.bool) for p, f in zip(params, opt.pruner.prunable)])
    return flags, opt.pruner.n_prunable - opt.pruner.n_pruned_target()


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
@pytest.mark.parametrize("upload", ["dense", "sparse"])
def test_the_four_parts_sum_to_the_drift_and_each_matches_its_reference(monkeypatch, upload, sparsity, order):
    """micro_mlp, noisy readout (shots=3000).  θ_SGD is torch.optim.SGD from θ0 on the window's batches,
    θ_GD,S gradient descent on S written out here, θ_lin,r the exact solution pruned by hand; the four
    part vectors sum to θ_QODE − θ_SGD to round-off and each reported part is its norm over ‖θ_SGD − θ0‖."""
    seen = _captured(monkeypatch)
    data = batches(CYCLE, seed=5, dims=(2, 1))
    model = micro_mlp(3)
    opt = _run(model, data, sparsity=sparsity, upload=upload, carleman_order=order, shots=3000)
    rep = opt.reports[0]
    assert rep.mode == "quantum" and len(seen) == 1, rep.reason
    run = seen[0]
    theta0, theta_q, theta_lin, theta_lin_r = run["theta0"], run["theta_q"], run["theta_lin"], run["theta_lin_r"]
    assert torch.equal(theta_q, flat(model))
    S = None if upload == "dense" or sparsity == 0 else opt.pruner.support()
    on_S = torch.ones_like(theta0, dtype=torch.bool) if S is None else torch.zeros_like(theta0, dtype=torch.bool)
    if S is not None:
        on_S[S] = True
        assert not on_S.all()
    # θ_SGD: torch.optim.SGD from θ0 on the window's batches (momentum 0: nothing else carries over)
    ref = micro_mlp(3)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(theta0.clone(), ref.parameters())
    sgd = torch.optim.SGD(ref.parameters(), lr=LR)
    for X, Y in data[CS:]:
        sgd.step(closure_for(ref, sgd, X, Y))
    theta_s = flat(ref)
    assert torch.allclose(run["theta_s"], theta_s, rtol=0, atol=1e-14)
    # θ_GD,S: gradient descent on S only
    theta_gd = theta0.clone()
    for X, Y in data[CS:]:
        g = torch.autograd.functional.jacobian(flat_loss(model, X, Y), theta_gd)
        theta_gd = torch.where(on_S, theta_gd - LR * g, theta_gd)
    # θ_lin,r: the exact solution pruned as the readout prunes (a dense upload with pruning)
    lin_r = theta_lin if upload == "sparse" or sparsity == 0 else \
        _prune_by_hand(theta_lin, None, *_keep(opt, list(model.parameters())))
    assert torch.equal(theta_lin_r, lin_r)
    parts = chain_parts(theta_s, theta_gd, theta_lin, lin_r, theta_q)
    total = sum(parts.values())
    assert torch.allclose(total, theta_q - theta_s, rtol=0, atol=1e-14)
    moved = float((theta_s - theta0).norm())
    d = rep.drift
    assert sorted(d["parts"]) == sorted(PARTS)
    for name in PARTS:
        assert d["parts"][name] == pytest.approx(float(parts[name].norm()) / moved, rel=1e-9, abs=1e-12), name
    # each link's own zero: no support part when S is every weight (momentum 0), no pruning part without
    # the readout's prune; the others are measured (non-zero) here
    assert (d["parts"]["support"] == 0) == (S is None)
    assert (d["parts"]["readout_pruning"] == 0) == (upload == "sparse" or sparsity == 0)
    assert d["parts"]["readout_noise"] > 0 and d["parts"]["linearization"] > 0
    # the twin: GD on S pruned as the readout prunes; against SGD and against QODE
    twin = theta_gd if upload == "sparse" or sparsity == 0 else _prune_by_hand(theta_gd, None,
                                                                                 *_keep(opt, list(model.parameters())))
    assert torch.allclose(run["theta_twin"], twin, rtol=0, atol=1e-14)
    assert d["twin"]["relative_sgd"] == pytest.approx(float((twin - theta_s).norm()) / moved, rel=1e-9, abs=1e-12)
    assert d["twin"]["relative_qode"] == pytest.approx(float((theta_q - twin).norm()) / moved, rel=1e-9)


@pytest.mark.parametrize("upload", ["dense", "sparse"])
def test_exact_readout_has_no_noise_part_and_both_readouts_give_the_same_weights(upload):
    """shots=None: θ_QODE is θ_lin,r exactly (the noise part is 0.0), and reading u(T) then adding θ0
    gives the same weights, bit for bit, as reading θ0 + u(T); so does every reported number."""
    data = batches(2 * CYCLE, seed=2)
    runs = {}
    for readout in ("displacement", "weights"):
        model = tiny_mlp(4)
        opt = _run(model, data, sparsity=0.5, upload=upload, readout=readout, shots=None, momentum=0.9)
        runs[readout] = (flat(model), opt.reports)
    (w_d, reps_d), (w_w, reps_w) = runs["displacement"], runs["weights"]
    assert torch.equal(w_d, w_w)
    for a, b in zip(reps_d, reps_w):
        assert a.mode == b.mode == "quantum"
        assert a.drift["parts"]["readout_noise"] == 0.0
        assert a.drift == b.drift
        assert a.tomography["readout"] == "displacement" and b.tomography["readout"] == "weights"
        assert a.drift["parts"]["support"] > 0          # momentum 0.9: the SGD shadow is not GD on S


def test_the_noise_part_of_a_displacement_readout_scales_with_u_not_theta(monkeypatch):
    """The same window at the same shots, both readouts: reading u(T) puts the tomography error on ‖u‖,
    reading θ0 + u(T) on ‖θ‖ (DESIGN.md), so the displacement's noise part is the smaller one."""
    data = batches(CYCLE, seed=7)
    noise = {}
    for readout in ("displacement", "weights"):
        model = tiny_mlp(2)
        opt = _run(model, data, sparsity=0.0, readout=readout, shots=20_000)
        noise[readout] = opt.reports[0].drift["parts"]["readout_noise"]
    assert noise["displacement"] < noise["weights"] / 3, noise


def test_the_twin_is_masked_gradient_descent_on_S_bit_for_bit(monkeypatch):
    """float32 tiny MLP, weight decay, sparse upload (S = the weights the upload's prune keeps): the twin is
    θ ← θ + (−η)·(∇L_t(θ) + wd·θ) on S (torch.optim.SGD's arithmetic), the gradient from the closure at the
    current θ, run here step by step; equal to the last bit.  Also with a dense upload, where the twin ends with the
    readout's prune."""
    for upload in ("sparse", "dense"):
        seen = _captured(monkeypatch)
        data = batches(CYCLE, seed=11, dtype=torch.float32)
        model, wd = tiny_mlp(6, dtype=torch.float32), 1e-3
        opt = _run(model, data, sparsity=0.5, upload=upload, weight_decay=wd, shots=None)
        assert opt.reports[0].mode == "quantum"
        run = seen[-1]
        theta0 = run["theta0"]
        S = opt.pruner.support() if upload == "sparse" else torch.arange(theta0.numel())
        ref = tiny_mlp(6, dtype=torch.float32)
        theta = theta0.clone()
        for X, Y in data[CS:]:
            with torch.no_grad():
                torch.nn.utils.vector_to_parameters(theta.clone(), ref.parameters())
            ref.zero_grad()
            ((ref(X) - Y) ** 2).mean().backward()
            g = torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
            theta[S] = theta[S].add(g[S].add(theta[S], alpha=wd), alpha=-LR)   # SGD's arithmetic
        if upload == "dense":
            theta = _prune_by_hand(theta, None, *_keep(opt, list(model.parameters())))
        assert torch.equal(run["theta_twin"], theta), upload
