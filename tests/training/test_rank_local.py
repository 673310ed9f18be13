"""Rank-local optimizers (issue 20): under an initialised process group QODE takes DistComm only when the
model is DDP-wrapped or ``process_group=`` / ``comm=`` says so, by the one rule ``hessian_spectrum``
follows (:func:`~torch_qode.bridge.collective.hvp_group`); a QODE built on rank 0 alone trains with no
collective while rank 1 waits at a barrier (two gloo ranks, bounded by a timeout: a hang fails)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests._dist import run_ranks
from torch_qode.bridge.collective import hvp_group
from torch_qode.training.comm import LocalComm
from torch_qode.training.distributed import DistComm, bind_comm, window_comm
from torch_qode.training.qode import QODE


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))


def train_alone(model, opt, steps=8):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g)

        def closure():
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    return [(r.mode, r.reason) for r in opt.reports]


def rules_and_rank0_alone(rank, world):
    import torch.distributed as dist

    model = mlp()
    ddp = nn.parallel.DistributedDataParallel(model)       # (a collective: on both ranks)
    world_group = dist.group.WORLD
    rules = {}
    for name, pg, m in (("nothing", None, None), ("plain model", None, model), ("ddp model", None, ddp),
                        ("process_group", world_group, None), ("process_group, plain model", world_group, model)):
        group, comm = hvp_group(m, pg), window_comm(None, pg, m)
        rules[name] = (group is not None, type(comm).__name__, getattr(comm, "group", None) is group)
    out = {"rules": rules, "built": type(QODE(list(model.parameters()), model=ddp).comm).__name__}
    if rank == 0:                                 # rank 1 never builds these: any collective would hang or die
        alone = {}
        for name, kw in (("no model", {}), ("plain model", {"model": "plain"})):
            net = mlp()
            kw = {k: (net if v == "plain" else v) for k, v in kw.items()}
            opt = QODE(net.parameters(), lr=0.1, mode="quantum", cycle=4, classical_steps=1, sparsity=0.0, **kw)
            alone[name] = (type(opt.comm).__name__, train_alone(net, opt), opt.step_count)
        out["alone"] = alone
    dist.barrier()
    return out


def test_a_qode_built_on_rank_0_alone_trains_with_no_collective():
    ranks = run_ranks("tests.training.test_rank_local:rules_and_rank0_alone", timeout=180)
    for r in ranks:
        assert r["rules"] == {"nothing": (False, "LocalComm", True), "plain model": (False, "LocalComm", True),
                              "ddp model": (True, "DistComm", True), "process_group": (True, "DistComm", True),
                              "process_group, plain model": (True, "DistComm", True)}
        assert r["built"] == "DistComm"
    assert "alone" not in ranks[1]
    for name, (comm, modes, steps) in ranks[0]["alone"].items():
        assert comm == "LocalComm" and steps == 8, name
        assert modes == [("quantum", "mode='quantum'")] * 2, name


def test_one_process_the_rules_agree_and_bind_comm_checks():
    model = mlp()
    assert hvp_group(model) is None and isinstance(window_comm(None, None, model), LocalComm)
    comm = LocalComm()
    assert window_comm(comm, None, model) is comm
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        window_comm(None, object(), model)
    with pytest.raises(ValueError, match="DistComm needs torch.distributed initialised"):
        DistComm()
    opt = QODE(model.parameters(), lr=0.1, mode="quantum", cycle=4, classical_steps=1, sparsity=0.0)
    bind_comm(opt, comm)
    assert opt.comm is comm
    with pytest.raises(TypeError, match="comm must be"):
        bind_comm(opt, "world")
    train_alone(model, opt, steps=2)              # step 1 opened a window
    assert opt.in_quantum_window
    with pytest.raises(RuntimeError, match="inside a quantum window"):
        bind_comm(opt, LocalComm())
