"""Fig. 2: sparse training of a CIFAR ResNet with QODE, beside classical sparse SGD on the same batches.

The paper (supplement Sec. III B, Fig. 2) pre-trains a dense ResNet (depth 32, widen 4, 7,451,044
parameters) on CIFAR-100, then trains it sparsely: every 100 steps the model is pruned to 90%
(the tomographic download), the first 10 steps after a download are classical, and the rest of each
cycle is the quantum window; each step uses 2048 samples and lr 0.01.  The paper shows (a, b) Hessian
spectra, (c) the error proxy and (d) test accuracy.

This recipe runs exactly that cycle through :class:`torch_qode.training.qode.QODE` (``mode="auto"``: the
dissipation check decides each window) and adds what the paper never showed:

* a **classical baseline**: the same model trained with the same pruning schedule by plain SGD
  (``QODE(mode="classical")``, bit-identical to ``torch.optim.SGD``) on the same batches, so the
  test accuracy of both is comparable step for step;
* the **measured drift** of every quantum window from SGD run from the same θ0 on the same batches
  (``track_sgd``), beside the predicted error proxy;
* the quantum **resource ledger** and the tomography numbers of every window.

Outputs: ``log.jsonl`` (one ``cycle`` record per cycle with the full QODE report), ``monitor.jsonl``
(spectra, downloads, uploads, window ends, evaluations), ``fig2.png`` and a per-cycle table on stdout.

GPU (paper-sized): ``python -m recipes.train_resnet_cifar100 --config configs/train_resnet_cifar100.yaml
--data-root /path/to/cifar``.  Distributed: ``--nproc N`` (or ``torchrun --nproc_per_node N -m
recipes.train_resnet_cifar100 ...``): DDP, a ``DistributedSampler``, ``train.batch_size / N`` samples per
rank per step, QODE's products averaged over the ranks; rank 0 logs, evaluates and draws.  CPU:
``--config configs/train_resnet_cifar100_cpu.yaml`` (a ResNet-8 on scikit-learn digits; ``make demo`` runs it).
"""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from recipes import classification, cli, config, launch, loop, memory

@dataclass
class Dissipation:
    """The ``dissipation`` section (``DissipationCheck``'s arguments)."""

    criterion: str = "predicted"
    max_error: float = 0.5
    max_error_proxy: float = 1.0
    min_positive_fraction: float = 0.5
    cutoff: float = 0.4
    steps: int = 64


@dataclass
class Monitor:
    """The ``monitor`` section."""

    enabled: bool = True
    probe_batch: int = 512
    steps: int = 64
    schedule: str = "paper"
    backend: str = "torch"


#: the ``qode:`` section: QODE's SGD keys and every setting of QODEConfig, these defaults the recipe's
#: (tomography_kwargs: keyword arguments of torch_qode.core.tomography() that QODE passes through)
Qode = config.qode_section(lr=0.01, track_sgd=True, tomography_kwargs={"sign_method": "hadamard"})


@dataclass
class Train:
    """The ``train`` section."""

    steps: int = 1000
    batch_size: int = 2048
    baseline: bool = True
    # the classical twin (torch_qode.training.twin.Twin) trained beside them: each window gradient descent on
    # S then the readout's prune, no quantum error; its accuracy in the table's acc_twin column
    twin: bool = False
    # the closure backwards the batch in this many parts (gradient accumulation; a BatchNorm normalises each
    # part with its own statistics): with qode.hvp=recompute the window's peak is one part's
    micro_batches: int = 1


@dataclass
class Config:
    """The recipe's config (its schema and defaults)."""

    seed: int = 0
    device: str = "auto"
    gpu: bool = False                # true: sized for a GPU; refuses to run without CUDA unless --device cpu
    deterministic: bool = False      # run-time keys (recipes/cli.py)
    cudnn_benchmark: bool = False
    data: classification.Data = field(default_factory=classification.Data)
    model: classification.ResNet = field(default_factory=lambda: classification.ResNet(depth=32, widen=4))
    checkpoint: Any = None           # dense state_dict (weights_only) instead of pre-training
    pretrain: classification.Pretrain = field(default_factory=lambda: classification.Pretrain(epochs=50,
                                                                                              batch_size=512))
    train: Train = field(default_factory=Train)
    qode: Qode = field(default_factory=Qode)
    dissipation: Dissipation = field(default_factory=Dissipation)
    monitor: Monitor = field(default_factory=Monitor)
    eval_batch_size: int = 1000


DEFAULTS = config.defaults(Config)

#: Columns of the per-cycle table (the README shows one from a real run).  ``gates/FLOP``: the window's
#: gate count (the ``gates`` column) over the FLOPs of the same window run classically (T SGD steps).
#: ``parts``: the drift's four parts over ``‖θ_SGD − θ0‖`` (``report.drift["parts"]``), written
#: ``support/linearization/readout_pruning/readout_noise`` in one column (the JSON log has each).
TABLE_COLUMNS = ["cycle", "mode", "why", "T", "proxy(T)", "pred_lin", "drift", "drift_lin", "parts", "acc", "acc_sgd",
                 "qubits", "gates", "gates/FLOP", "shots"]
#: Added after ``acc_sgd`` with ``train.twin``: the classical twin's accuracy.
TWIN_COLUMNS = ["acc_twin"]
#: Added at Carleman order ≥ 2: the order-1 state's linearisation drift (embedded) and ``order_gap``.
ORDER2_COLUMNS = ["drift_lin1", "order_gap"]


def table_columns(order: int, twin: bool = False) -> list:
    """The table's columns.

    Args:
        order: the Carleman order (≥ 2 adds :data:`ORDER2_COLUMNS` after drift_lin).
        twin: add :data:`TWIN_COLUMNS` after acc_sgd (``train.twin``).

    Returns:
        The column names.
    """
    cols = list(TABLE_COLUMNS)
    if twin:
        i = cols.index("acc_sgd") + 1
        cols = cols[:i] + TWIN_COLUMNS + cols[i:]
    if order < 2:
        return cols
    i = cols.index("drift_lin") + 1
    return cols[:i] + ORDER2_COLUMNS + cols[i:]


def _short_reason(rep) -> str:
    r = rep.reason or ""
    if rep.mode == "quantum":
        return "check passed" if "passed" in r else r.split(":")[0]
    if "first new batch" in r and "predicted error" in r:
        return "pred > max (t=1)"
    if "predicted error" in r:
        return "pred > max"
    if "proxy" in r and "positive fraction" in r:
        return "proxy & pos. fraction"
    if "proxy" in r:
        return "proxy(T) > max"
    if "positive fraction" in r:
        return "pos. fraction < min"
    return r.split(";")[0][:40] or "classical"


def parts_cell(parts: Optional[dict]) -> Optional[str]:
    """The drift's parts as one table cell, ``support/linearization/readout_pruning/readout_noise``
    (e.g. ``0.97/0.1/0.5/0.02``), or ``None`` without them."""
    if not parts:
        return None
    return "/".join(format(parts[k], ".2g") for k in ("support", "linearization", "readout_pruning", "readout_noise"))


def cycle_row(rep, acc: float, acc_sgd: Optional[float], acc_twin: Optional[float] = None) -> dict:
    """One row of the per-cycle table from a :class:`~torch_qode.training.qode.CycleReport`.

    Args:
        rep: the cycle's report.
        acc: QODE's test accuracy.
        acc_sgd: the SGD baseline's (``None``: none).
        acc_twin: the classical twin's (``None``: none).

    Returns:
        The row.
    """
    dis, res, tomo, drift = rep.dissipation or {}, rep.resources or {}, rep.tomography or {}, rep.drift or {}
    proxy, pred = dis.get("proxy"), dis.get("predicted_error")
    T = rep.window
    row = {"cycle": rep.cycle, "mode": rep.mode, "why": _short_reason(rep), "T": T,
           "proxy(T)": proxy[-1] if proxy and dis.get("criterion") == "proxy" else None,
           "pred_lin": pred[min(T, len(pred) - 1)] if pred else None, "drift": drift.get("relative"),
           "drift_lin": drift.get("linearization_relative"), "parts": parts_cell(drift.get("parts")),
           "drift_lin1": drift.get("linearization_order1_relative"),
           "order_gap": (rep.carleman or {}).get("order_gap"),
           "acc": acc, "acc_sgd": acc_sgd, "qubits": res.get("qubits"), "gates": res.get("gates_qlsa"),
           "gates/FLOP": (res.get("classical") or {}).get("gates_per_flop"),
           "shots": (tomo.get("shots") or {}).get("total")}
    if acc_twin is not None:
        row["acc_twin"] = acc_twin
    return row


def _check(cfg: dict) -> None:
    """Every option, before anything is written or trained (errors are ConfigErrors naming the key)."""
    from torch_qode.models import cifar_resnet

    classification.check_classification(cfg)
    classes, channels = classification.DATASETS[cfg["data"]["name"]]
    with torch.device("meta"):      # the run's model shape, no memory, no random numbers
        net = cifar_resnet(cfg["model"]["depth"], cfg["model"]["widen"], classes, channels)
    probe = (torch.zeros(1, channels, 8, 8, device="meta"), torch.zeros(1, dtype=torch.long, device="meta"))
    check_sparse_training(cfg, net, probe, F.cross_entropy)


def check_sparse_training(cfg: dict, net: torch.nn.Module, probe: tuple, loss_fn) -> None:
    """The ``train``, ``qode``, ``dissipation`` and ``monitor`` sections of a Fig. 2 recipe: explicit
    checks, then QODE, DissipationCheck and DissipationMonitor built on ``net`` (the run's model on the
    meta device, no memory) so their own argument checks run now; errors are ConfigErrors naming the key."""
    from torch_qode.training.monitor import DissipationMonitor
    from torch_qode.bridge.dissipation import DissipationCheck
    from torch_qode.training.comm import LocalComm
    from torch_qode.training.qode import QODE

    config.check_int(cfg["train"]["steps"], "train.steps", 1)
    config.check_int(cfg["train"]["batch_size"], "train.batch_size", 1)
    for key, size in (("train.batch_size", cfg["train"]["batch_size"]), ("monitor.probe_batch",
                                                                         cfg["monitor"]["probe_batch"])):
        if isinstance(size, int) and size % launch.world():
            raise config.ConfigError(f"{key} = {size} does not split over {launch.world()} ranks (--nproc): each "
                                     f"rank takes {key} / N samples; pick a multiple of {launch.world()}")
    if "micro_batches" in cfg["train"]:         # the recipes whose closures micro-batch
        config.check_int(cfg["train"]["micro_batches"], "train.micro_batches", 1, cfg["train"]["batch_size"])
    q = cfg["qode"]
    config.check_real(q["lr"], "qode.lr", 0.0, low_open=True)
    cycle = config.check_qode({**q, "seed": cfg["seed"]}).cycle
    d = cfg["dissipation"]
    try:
        check = DissipationCheck(seed=cfg["seed"], **d)
    except (TypeError, ValueError) as exc:
        raise config.keyed_error("dissipation", exc, d) from None
    m = cfg["monitor"]
    config.check_int(m["probe_batch"], "monitor.probe_batch", 1)
    config.check_choice(m["schedule"], "monitor.schedule", ("paper",))
    config.check_choice(m["backend"], "monitor.backend", ("torch", "pyhessian"))
    try:
        probe_check = DissipationCheck(seed=cfg["seed"], **{**d, "steps": m["steps"]})
    except (TypeError, ValueError) as exc:
        raise config.keyed_error("monitor", exc, ("steps",)) from None
    names = [n for n, _ in net.named_parameters()]
    classical = cfg["train"]["baseline"] or cfg["train"].get("twin")    # the SGD baseline's and the twin's QODE
    for opts in ([q] + ([{**q, "mode": "classical", "track_sgd": False}] if classical else [])):
        try:
            QODE(net.parameters(), dissipation=check, seed=cfg["seed"], names=names, model=net, comm=LocalComm(),
                 **opts)
        except (TypeError, ValueError) as exc:
            raise config.keyed_error("qode", exc, q) from None
    try:
        DissipationMonitor(net, loss_fn, probe, lr=q["lr"], window=cycle - q["classical_steps"],
                           schedule=m["schedule"], backend=m["backend"], check=probe_check)
    except (TypeError, ValueError) as exc:
        raise config.keyed_error("monitor", exc, m) from None


def panel_records(monitor, cfg: dict) -> tuple:
    """``(records, proxy_note)`` for :func:`~torch_qode.training.monitor.plot_training_panels`: the
    monitor's records, plus ``error_proxy ≡ 1`` at every step with ``qode.mode=classical`` (no
    window, no linearisation error); with ``qode.mode=quantum`` the dissipation check never runs, so
    there is no predicted proxy and the note says so."""
    recs = monitor.panel_records()
    mode, steps = cfg["qode"]["mode"], cfg["train"]["steps"]
    note = None
    if mode == "classical":
        recs += [{"step": k, "error_proxy": 1.0} for k in range(steps + 1)]
        note = "qode.mode=classical: every step classical, proxy ≡ 1"
    elif mode == "quantum":
        note = "qode.mode=quantum: no dissipation check runs,\nso no proxy is predicted"
    return recs, note


def main(argv: Optional[Sequence[str]] = None, *, name: str = "train_resnet_cifar100",
         cli_defaults: Optional[dict] = None) -> dict:
    """Run the recipe; returns ``{"out", "rows", "table", "reports", "figures"}``.  ``name`` is the
    command shown by ``--help`` and logged (``recipes.demo`` runs this recipe as ``demo``);
    ``cli_defaults``: defaults of the command-line options (``recipes.demo``: its config, one thread)."""
    spawned = cli.maybe_spawn("recipes.train_resnet_cifar100:main", argv, name, name=name,
                                 cli_defaults=cli_defaults)
    if spawned is not None:                      # --nproc N: rank 0's result
        return spawned
    launch.from_environment()                    # a rank under torchrun
    with cli.setup(name, Config, argv, description=__doc__, data=True, check=_check,
                   cli_defaults=cli_defaults, estimate=memory.train_resnet_estimate) as run:
        cfg, dev = run.cfg, run.device
        ddp = launch.world() > 1
        from torch_qode.training.monitor import DissipationMonitor
        from torch_qode.bridge.dissipation import DissipationCheck
        from torch_qode.training.qode import QODE
        from torch_qode.bridge.taylor import decomposed_norms

        start = classification.pretrained_resnet(run, "dense.pt")
        data, model, test_dl, n_params = start["data"], start["model"], start["test_loader"], start["params"]
        dense_acc = start["dense"]["acc"]

        q = dict(cfg["qode"])
        check = DissipationCheck(seed=cfg["seed"], **cfg["dissipation"])
        baseline = copy.deepcopy(model) if cfg["train"]["baseline"] else None
        twin = copy.deepcopy(model) if cfg["train"]["twin"] else None
        # under DDP the closures run the wrapped models (gradients averaged); QODE, evaluation and the
        # Hessian tools take the modules themselves (DDP's own forward never runs in a double backward)
        net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
        net_sgd = torch.nn.parallel.DistributedDataParallel(baseline) if ddp and baseline is not None else baseline
        net_twin = torch.nn.parallel.DistributedDataParallel(twin) if ddp and twin is not None else twin
        monitor = None
        if cfg["monitor"]["enabled"]:
            probe = launch.shard(loop.fixed_batch(data["plain_train"], cfg["monitor"]["probe_batch"], cfg["seed"] + 1,
                                                  dev), "monitor.probe_batch")
            m = cfg["monitor"]
            probe_check = DissipationCheck(seed=cfg["seed"], **{**cfg["dissipation"], "steps": m["steps"]})
            monitor = DissipationMonitor(net, F.cross_entropy, probe, lr=q["lr"],
                                         window=q["cycle"] - q["classical_steps"], schedule=m["schedule"],
                                         backend=m["backend"], check=probe_check,
                                         log_path=run.path("monitor.jsonl") if run.rank0 else None)
        names = [n for n, _ in model.named_parameters()]
        opt = QODE(model.parameters(), dissipation=check, monitor=monitor, seed=cfg["seed"], names=names,
                   model=net, **q)
        if monitor is not None:
            monitor.record({"step": 0, "event": "eval", "test_acc": dense_acc, "test_acc_sgd": dense_acc})
        opt_sgd = None
        if baseline is not None:
            opt_sgd = QODE(baseline.parameters(), **{**q, "mode": "classical", "track_sgd": False, "hvp": "retain"},
                           model=net_sgd)        # the DDP wrapper: a DistComm under --nproc (global-batch losses)
        opt_twin = None
        if twin is not None:
            from torch_qode.training.twin import Twin

            opt_twin = Twin(twin.parameters(), **{**q, "hvp": "retain"}, model=net_twin,
                            length=lambda: opt.reports[-1].window if opt.reports else None)   # QODE's T

        # Carleman order ≥ 2 needs third derivatives, which PyTorch's fused norm layers get wrong:
        # run the QODE model's norms decomposed (same loss, same running-statistics updates).
        norms = (lambda net: decomposed_norms(net, update_running_stats=True)) if q["carleman_order"] >= 2 \
            else (lambda net: contextlib.nullcontext())

        parts = cfg["train"]["micro_batches"]

        def closure_for(net, optimizer, x, y):
            def closure():                    # micro-batches: each part's graph is freed by its backward
                optimizer.zero_grad(set_to_none=True)
                total = 0.0
                for xs, ys in zip(x.chunk(parts), y.chunk(parts)):
                    with norms(net):
                        loss = F.cross_entropy(net(xs), ys) * (xs.shape[0] / x.shape[0])
                    loss.backward()
                    total = total + loss.detach()
                return total
            return closure

        d = cfg["data"]
        stream = (launch.shard_stream if ddp else loop.batch_stream)(
            data["train"], cfg["train"]["batch_size"], cfg["seed"], dev, num_workers=d["num_workers"],
            pin_memory=d["pin_memory"], persistent_workers=d["persistent_workers"])
        rows, t0 = [], time.perf_counter()
        bar = run.progress(total=cfg["train"]["steps"], desc="QODE")
        for k in range(cfg["train"]["steps"]):
            if monitor is not None:
                if k % q["cycle"] == 0 and q["sparsity"] > 0:   # this step starts with a prune / download
                    monitor.record({"step": k, "event": "download", "download": True})
                monitor.step(k)
            x, y = next(stream)
            model.train()
            loss = opt.step(closure_for(net, opt, x, y))
            if opt_sgd is not None:
                baseline.train()
                opt_sgd.step(closure_for(net_sgd, opt_sgd, x, y))
            if opt_twin is not None:
                twin.train()
                opt_twin.step(closure_for(net_twin, opt_twin, x, y))
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", mode=opt.reports[-1].mode)
            if ((k + 1) % q["cycle"] == 0 or k + 1 == cfg["train"]["steps"]) and run.rank0:
                rep = opt.reports[-1]
                acc = loop.evaluate(model, test_dl, dev)["acc"]
                acc_sgd = loop.evaluate(baseline, test_dl, dev)["acc"] if baseline is not None else None
                acc_twin = loop.evaluate(twin, test_dl, dev)["acc"] if twin is not None else None
                row = cycle_row(rep, acc, acc_sgd, acc_twin)
                rows.append(row)
                run.log.write("cycle", step=k + 1, row=row, report=rep.as_dict(),
                              seconds=time.perf_counter() - t0)
                if monitor is not None:
                    monitor.record({"step": k + 1, "event": "eval", "test_acc": acc, "test_acc_sgd": acc_sgd})
        bar.close()
        table = loop.format_table(rows, table_columns(q["carleman_order"], twin is not None))
        if not run.rank0:                        # rank 0 prints, draws and returns the run
            return {"out": str(run.out), "rows": rows, "table": table, "reports": [], "figures": {}}
        print(f"\n{n_params:,}-parameter ResNet-{cfg['model']['depth']} (widen {cfg['model']['widen']}), "
              f"dense test accuracy {dense_acc:.3f}; {cfg['train']['steps']} steps, cycle {q['cycle']}, "
              f"{q['classical_steps']} classical steps, sparsity {q['sparsity']}, Carleman order "
              f"{q['carleman_order']}, shots {q['shots']}\n")
        print(table)
        figures = {}
        if monitor is not None:
            from torch_qode.training.monitor import plot_training_panels

            recs, note = panel_records(monitor, cfg)
            figures["fig2"] = str(plot_training_panels(recs, run.path("fig2.png"), every=q["cycle"],
                                                       early_steps=min(200, cfg["train"]["steps"]),
                                                       proxy_note=note))
        run.log.write("done", rows=rows, seconds=time.perf_counter() - t0, figures=figures)
        return {"out": str(run.out), "rows": rows, "table": table, "reports": [r.as_dict() for r in opt.reports],
                "figures": figures}


if __name__ == "__main__":
    main()
