"""The Hessian tools under torch.distributed (issue 12): two gloo ranks, each with half of the probe batch,
compute the global batch's spectrum — hessian_spectrum on a DDP model or with process_group=, a standalone
DissipationCheck(process_group=), DissipationMonitor on a DDP model — equal to one process on the whole
batch to 1e-6 and identical on both ranks."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_qode import DissipationCheck, DissipationMonitor, TaylorExpansion, hessian_spectrum
from tests._dist import run_ranks

BATCH = 32
KW = dict(top_k=2, trace_samples=16, steps=24)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def probe(rank=0, world=1):
    g = torch.Generator().manual_seed(5)
    X, y = torch.randn(BATCH, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (BATCH,), generator=g)
    per = BATCH // world
    return X[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


def numbers(spec):
    return {"top": np.asarray(spec.top_eigenvalues), "trace": spec.trace, "nodes": spec.density.nodes,
            "weights": spec.density.weights}


def spectra(rank, world):
    import torch.distributed as dist

    model = mlp()
    batch = probe(rank, world)
    out = {}
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(model)
        out["ddp"] = numbers(hessian_spectrum(ddp, F.cross_entropy, batch, **KW))
        out["group"] = numbers(hessian_spectrum(model, F.cross_entropy, batch, process_group=dist.group.WORLD, **KW))
        try:
            hessian_spectrum(ddp, F.cross_entropy, batch, backend="pyhessian")
        except ValueError as exc:
            out["pyhessian"] = str(exc)
        monitored = ddp
    else:
        monitored = model
    out["local"] = numbers(hessian_spectrum(model, F.cross_entropy, batch, **KW))
    exp = TaylorExpansion.from_model(model, F.cross_entropy, batch, lr=1.0, degree=1)
    check = DissipationCheck(criterion="proxy", steps=24, cutoff=0.01,
                             process_group=dist.group.WORLD if world > 1 else None)
    v = check(exp.hvp, exp.n, lr=0.5, T=10)
    out["verdict"] = (v.passed, v.top_eigenvalue, np.asarray(v.proxy))
    mon = DissipationMonitor(monitored, F.cross_entropy, batch, lr=0.5, window=10, schedule=[0],
                             check=DissipationCheck(criterion="proxy", steps=24, cutoff=0.01))
    out["monitor"] = mon.step(0)["top_eigenvalue"]
    return out


def _close(a, b, tol=1e-6):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and np.allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max())))


def test_spectrum_check_and_monitor_are_the_global_batchs_on_every_rank():
    ranks = run_ranks("tests.bridge.test_distributed_spectrum:spectra", timeout=120)
    one = spectra(0, 1)                           # one process on the whole probe batch
    for r in ranks:
        for kind in ("ddp", "group"):
            for key in ("top", "trace", "nodes", "weights"):
                assert _close(r[kind][key], one["local"][key]), (kind, key, r[kind][key], one["local"][key])
        assert r["verdict"][0] == one["verdict"][0] and _close(r["verdict"][1], one["verdict"][1])
        assert _close(r["verdict"][2], one["verdict"][2])
        assert _close(r["monitor"], one["monitor"])
        assert "backend='torch'" in r["pyhessian"]
    for kind in ("ddp", "group"):                 # bit-identical on the two ranks
        for key in ("top", "trace", "nodes", "weights"):
            assert np.array_equal(ranks[0][kind][key], ranks[1][kind][key])
    # without the averaging each rank has its own, different spectrum: the test above can fail
    assert not _close(ranks[0]["local"]["top"], one["local"]["top"], 1e-2)
    assert not _close(ranks[0]["local"]["top"], ranks[1]["local"]["top"], 1e-2)


def test_a_process_group_needs_torch_distributed():
    with pytest.raises(ValueError, match="process_group"):
        hessian_spectrum(mlp(), F.cross_entropy, probe(), process_group=object())
    with pytest.raises(ValueError, match="process_group"):
        DissipationCheck(criterion="proxy", process_group=object())
