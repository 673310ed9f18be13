"""RecomputeEngine (torch_qode/bridge/recompute.py) on the bridge floor: a replay of several micro-batches
gives the products of the summed loss, against torch.autograd.functional on a tiny model."""
import pytest
import torch
import torch.nn as nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

from torch_qode.bridge.recompute import LossMismatchError, RecomputeEngine, replaying_backward


def _setup(sizes=(5, 3, 7), seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    g = torch.Generator().manual_seed(seed + 1)
    micro = [(torch.randn(m, 3, generator=g, dtype=torch.float64), torch.randn(m, 2, generator=g, dtype=torch.float64))
             for m in sizes]
    params = list(model.parameters())
    total = sum(sizes)

    def closure():
        for x, y in micro:                    # one backward per micro-batch, as gradient accumulation does
            loss = ((model(x) - y) ** 2).sum() / total
            loss.backward()

    def replay(on_loss):
        with replaying_backward(on_loss):
            closure()

    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in params]
    numels = [p.numel() for p in params]

    def summed_loss(theta, batches=None):     # Σ_b L_b(θ) as a function of the flat weights
        parts = dict(zip(names, (c.view(s) for c, s in zip(theta.split(numels), shapes))))
        return sum(((functional_call(model, parts, (x,)) - y) ** 2).sum() / total
                   for x, y in (micro if batches is None else batches))

    theta0 = torch.cat([p.detach().reshape(-1) for p in params])
    return model, params, replay, summed_loss, theta0, micro


@pytest.mark.parametrize("sizes", [(5, 3), (5, 3, 7)])
def test_replayed_hvp_equals_the_hessian_of_the_summed_loss(sizes):
    model, params, replay, f, theta0, micro = _setup(sizes)
    N = theta0.numel()
    engine = RecomputeEngine(replay, params, chunk=2)
    V = torch.randn(5, N, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for p in params:
        p.grad = None
    HV = engine.hvp(V)
    H = hessian(f, theta0)
    torch.testing.assert_close(HV, V @ H, atol=1e-13, rtol=1e-12)
    # each micro-batch alone gives a different product: the sum is over all of them, not the last one
    H_last = hessian(lambda t: f(t, micro[-1:]), theta0)
    assert float((HV - V @ H_last).abs().max()) > 1e-3
    # one replay per product block; the losses it saw are the micro-batches'; .grad as the closure's backward
    assert engine.replays == 1 and len(engine.losses) == len(sizes)
    assert sum(engine.losses) == pytest.approx(float(f(theta0)), rel=1e-13)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in params]), jacobian(f, theta0),
                               atol=1e-14, rtol=1e-12)
    # the weights are untouched
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in params]), theta0)


def test_replayed_third_derivative_and_sym_sum_equal_autograd():
    model, params, replay, f, theta0, _ = _setup((4, 6, 2), seed=2)
    N = theta0.numel()
    engine = RecomputeEngine(replay, params, chunk=3)
    g = torch.Generator().manual_seed(7)
    A, B = (torch.randn(3, N, dtype=torch.float64, generator=g) for _ in range(2))
    lam = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)

    def hvp_at(theta, b):
        return torch.autograd.grad(torch.autograd.grad(f(theta), theta, create_graph=True)[0] @ b, theta,
                                   create_graph=True)[0]

    def third(a, b):                           # ∇³L[a, b] = d/dθ (a·H(θ)b)
        theta = theta0.clone().requires_grad_(True)
        return torch.autograd.grad(hvp_at(theta, b) @ a, theta)[0]

    want = torch.stack([third(A[i], B[i]) for i in range(3)])
    torch.testing.assert_close(engine.third(A, B), want, atol=1e-13, rtol=1e-12)
    want_sym = sum(lam[i] * third(A[i], A[i]) for i in range(3))
    torch.testing.assert_close(engine.sym_sum(A, lam), want_sym, atol=1e-13, rtol=1e-12)
    assert engine.replays == 2


def test_a_replay_of_another_batch_is_refused():
    model, params, replay, f, theta0, micro = _setup((4, 4))
    engine = RecomputeEngine(replay, params, chunk=2)
    V = torch.ones(1, theta0.numel(), dtype=torch.float64)
    engine.hvp(V)
    micro[1][0].mul_(2.0)                     # the closure now re-evaluates another batch
    with pytest.raises(LossMismatchError, match="micro-batch losses"):
        engine.hvp(V)
