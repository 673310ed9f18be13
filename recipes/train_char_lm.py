"""Fig. 2 for an LLM-shaped model: a character-level transformer trained by QODE beside sparse SGD.

The paper argues for quantum training of large models, language models included (Sec. III B trains a
ResNet).  This recipe runs the same training cycle on a small causal transformer language model
(:class:`torch_qode.models.CharTransformer`: ``nn.TransformerEncoderLayer`` blocks with the default
scaled-dot-product attention; QODE expands the upload on the math kernel, see
:mod:`torch_qode.bridge.kernels`):

* **text**: the Python standard library's own ``.py`` sources read from this interpreter's
  installation (:func:`torch_qode.data.stdlib_corpus`: a sorted file list, every 10th file for
  validation), no network;
* **start**: the model pre-trained densely with AdamW for ``pretrain.steps`` steps;
* **sparse training**: QODE (``mode="auto"``, pruning every ``qode.cycle`` steps, the first
  ``qode.classical_steps`` classical, the rest a quantum window when the dissipation check passes)
  beside the same model trained classically (``QODE(mode="classical")``, bit-identical to
  ``torch.optim.SGD``) on the same batches;
* **Fig. 2's panels**: (a, b) Hessian spectra of a fixed probe batch (``DissipationMonitor``), (c) the
  predicted error proxy with the measured drift of every window (``track_sgd``), (d) validation
  next-character accuracy of both; ``perplexity.png``: validation loss and perplexity of both.

Outputs: ``log.jsonl`` (``cycle`` records with the full QODE report), ``monitor.jsonl``, ``fig2.png``,
``perplexity.png`` and a per-cycle table on stdout.

CPU: ``python -m recipes.train_char_lm --config configs/train_char_lm_cpu.yaml``.  GPU:
``--config configs/train_char_lm.yaml``.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from recipes import cli, config, loop
from recipes.train_resnet_cifar100 import (TABLE_COLUMNS, Dissipation, Monitor, Qode, check_sparse_training,
                                          cycle_row, panel_records, table_columns)

@dataclass
class Data:
    """The ``data`` section."""

    max_files: Any = None
    val_every: int = 10
    max_chars: Any = None


@dataclass
class Model:
    """The ``model`` section."""

    d_model: int = 64
    heads: int = 4
    layers: int = 2
    ff: int = 128
    context: int = 64


@dataclass
class Pretrain:
    """The ``pretrain`` section."""

    steps: int = 500
    batch_size: int = 64
    lr: float = 3.0e-3


@dataclass
class Train:
    """The ``train`` section."""

    steps: int = 1000
    batch_size: int = 64
    baseline: bool = True
    twin: bool = False          # the classical twin beside them (torch_qode.training.twin): acc_twin, ppl_twin


@dataclass
class Eval:
    """The ``eval`` section."""

    batches: int = 8
    batch_size: int = 64


@dataclass
class Config:
    """The recipe's config (its schema and defaults)."""

    seed: int = 0
    device: str = "auto"
    gpu: bool = False
    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)
    pretrain: Pretrain = field(default_factory=Pretrain)
    train: Train = field(default_factory=Train)
    qode: Qode = field(default_factory=lambda: Qode(lr=0.1))
    dissipation: Dissipation = field(default_factory=Dissipation)
    monitor: Monitor = field(default_factory=lambda: Monitor(probe_batch=32))
    eval: Eval = field(default_factory=Eval)


DEFAULTS = config.defaults(Config)

COLUMNS = TABLE_COLUMNS + ["ppl", "ppl_sgd"]
#: With ``train.twin``: the classical twin's accuracy after ``acc_sgd`` and its perplexity after ``ppl_sgd``.
TWIN_COLUMNS = table_columns(1, twin=True) + ["ppl", "ppl_sgd", "ppl_twin"]


def _model(cfg: dict, vocab: int):
    from torch_qode.models import CharTransformer

    return CharTransformer(vocab, **cfg["model"])


def _check(cfg: dict) -> None:
    """Every option, before anything is written or trained; errors name the key."""
    from torch_qode.models import lm_loss

    d = cfg["data"]
    if d["max_files"] is not None:
        config.check_int(d["max_files"], "data.max_files", 2)
    config.check_int(d["val_every"], "data.val_every", 2)
    if d["max_chars"] is not None:
        config.check_int(d["max_chars"], "data.max_chars", 2)
    p = cfg["pretrain"]
    config.check_int(p["steps"], "pretrain.steps", 0)
    config.check_int(p["batch_size"], "pretrain.batch_size", 1)
    config.check_real(p["lr"], "pretrain.lr", 0.0, low_open=True)
    config.check_int(cfg["eval"]["batches"], "eval.batches", 1)
    config.check_int(cfg["eval"]["batch_size"], "eval.batch_size", 1)
    try:
        with torch.device("meta"):
            net = _model(cfg, 128)
    except (TypeError, ValueError) as exc:
        raise config.keyed_error("model", exc, cfg["model"]) from None
    L = cfg["model"]["context"]
    probe = (torch.zeros(1, L, dtype=torch.long, device="meta"), torch.zeros(1, L, dtype=torch.long, device="meta"))
    check_sparse_training(cfg, net, probe, lm_loss)


@torch.no_grad()
def evaluate(model, batches) -> dict:
    """Validation loss (nats per character), perplexity and next-character accuracy over fixed batches."""
    from torch_qode.models import lm_loss

    was = model.training
    model.eval()
    loss, correct, total = 0.0, 0, 0
    for x, y in batches:
        logits = model(x)
        loss += float(lm_loss(logits, y)) * y.numel()
        correct += int((logits.argmax(-1) == y).sum())
        total += y.numel()
    model.train(was)
    loss /= total
    return {"loss": loss, "ppl": float(torch.tensor(loss).exp()), "acc": correct / total}


def pretrain(model, stream, steps: int, lr: float, run) -> list:
    """Dense AdamW pre-training; one ``pretrain`` record every 10% of the steps."""
    from torch_qode.models import lm_loss

    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    recs = []
    bar = run.progress(total=steps, desc="pretrain")
    for k in range(steps):
        x, y = next(stream)
        loss = lm_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(1)
        if (k + 1) % max(1, steps // 10) == 0 or k + 1 == steps:
            recs.append(run.log.write("pretrain", step=k + 1, loss=float(loss.detach())))
    bar.close()
    return recs


def plot_perplexity(rows: list, path):
    """Validation loss and perplexity of QODE and of SGD per cycle."""
    from torch_qode._figure import new_figure, save

    fig, (ax_l, ax_p) = new_figure(1, 2)
    steps = [r["step"] for r in rows]
    for key, label, color in (("", "QODE", "C0"), ("_sgd", "SGD", "C1")):
        if all(r.get("ppl" + key) is not None for r in rows):
            ax_l.plot(steps, [r["loss" + key] for r in rows], "o-", ms=3, color=color, label=label)
            ax_p.plot(steps, [r["ppl" + key] for r in rows], "o-", ms=3, color=color, label=label)
    for ax, title in ((ax_l, "validation loss (nats / char)"), (ax_p, "validation perplexity")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return save(fig, path)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the recipe; returns ``{"out", "rows", "table", "reports", "figures"}``."""
    with cli.setup("train_char_lm", Config, argv, description=__doc__, check=_check) as run:
        cfg, dev, seed = run.cfg, run.device, run.cfg["seed"]
        from torch_qode.bridge.dissipation import DissipationCheck
        from torch_qode.data import char_batches, char_windows, stdlib_corpus
        from torch_qode.models import lm_loss
        from torch_qode.training.monitor import DissipationMonitor, plot_training_panels
        from torch_qode.training.qode import QODE

        d, L = cfg["data"], cfg["model"]["context"]
        corpus = stdlib_corpus(d["max_files"], val_every=d["val_every"], max_chars=d["max_chars"])
        run.log.write("data", name="python-stdlib", root=corpus.root, train_files=len(corpus.train_files),
                      val_files=len(corpus.val_files), train_chars=corpus.train.numel(),
                      val_chars=corpus.val.numel(), vocab=len(corpus.vocab))
        print(f"data: the Python standard library's sources in {corpus.root} ({len(corpus.train_files)} train / "
              f"{len(corpus.val_files)} validation files, {corpus.train.numel():,} / {corpus.val.numel():,} "
              f"characters, vocabulary {len(corpus.vocab)})")
        g = torch.Generator().manual_seed(seed + 2)
        e = cfg["eval"]
        val_batches = [tuple(t.to(dev) for t in char_windows(
            corpus.val, torch.randint(0, corpus.val.numel() - L - 1, (e["batch_size"],), generator=g), L))
            for _ in range(e["batches"])]
        model = _model(cfg, len(corpus.vocab)).to(dev)
        n_params = sum(p.numel() for p in model.parameters())
        pre = cfg["pretrain"]
        pretrain(model, char_batches(corpus.train, pre["batch_size"], L, seed + 3, dev), pre["steps"], pre["lr"], run)
        dense = evaluate(model, val_batches)
        run.log.write("dense", **dense)

        q = dict(cfg["qode"])
        baseline = copy.deepcopy(model) if cfg["train"]["baseline"] else None
        twin = copy.deepcopy(model) if cfg["train"]["twin"] else None
        monitor = None
        if cfg["monitor"]["enabled"]:
            m = cfg["monitor"]
            probe = tuple(t.to(dev) for t in next(char_batches(corpus.train, m["probe_batch"], L, seed + 1)))
            monitor = DissipationMonitor(
                model, lm_loss, probe, lr=q["lr"], window=q["cycle"] - q["classical_steps"], schedule=m["schedule"],
                backend=m["backend"], check=DissipationCheck(seed=seed, **{**cfg["dissipation"], "steps": m["steps"]}),
                log_path=run.path("monitor.jsonl"))
            monitor.record({"step": 0, "event": "eval", "test_acc": dense["acc"], "test_acc_sgd": dense["acc"]})
        names = [n for n, _ in model.named_parameters()]
        opt = QODE(model.parameters(), dissipation=DissipationCheck(seed=seed, **cfg["dissipation"]),
                   monitor=monitor, seed=seed, names=names, model=model, **q)
        # the baselines prune as QODE does (model=: the same keep-dense rule; names: the same report)
        opt_sgd = QODE(baseline.parameters(), **{**q, "mode": "classical", "track_sgd": False}, names=names,
                       model=baseline) if baseline is not None else None
        opt_twin = None
        if twin is not None:
            from torch_qode.training.twin import Twin

            opt_twin = Twin(twin.parameters(), **q, names=names, model=twin,
                            length=lambda: opt.reports[-1].window if opt.reports else None)   # QODE's T

        def closure_for(net, optimizer, x, y):
            def closure():
                optimizer.zero_grad(set_to_none=True)
                loss = lm_loss(net(x), y)
                loss.backward()
                return loss
            return closure

        stream = char_batches(corpus.train, cfg["train"]["batch_size"], L, seed, dev)
        rows, t0 = [], time.perf_counter()
        bar = run.progress(total=cfg["train"]["steps"], desc="QODE")
        for k in range(cfg["train"]["steps"]):
            if monitor is not None:
                if k % q["cycle"] == 0 and q["sparsity"] > 0:
                    monitor.record({"step": k, "event": "download", "download": True})
                monitor.step(k)
            x, y = next(stream)
            loss = opt.step(closure_for(model, opt, x, y))
            if opt_sgd is not None:
                opt_sgd.step(closure_for(baseline, opt_sgd, x, y))
            if opt_twin is not None:
                opt_twin.step(closure_for(twin, opt_twin, x, y))
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", mode=opt.reports[-1].mode)
            if (k + 1) % q["cycle"] == 0 or k + 1 == cfg["train"]["steps"]:
                rep = opt.reports[-1]
                ev = evaluate(model, val_batches)
                ev_sgd = evaluate(baseline, val_batches) if baseline is not None else {}
                ev_twin = evaluate(twin, val_batches) if twin is not None else {}
                row = {**cycle_row(rep, ev["acc"], ev_sgd.get("acc"), ev_twin.get("acc")), "ppl": ev["ppl"],
                       "ppl_sgd": ev_sgd.get("ppl"), "loss": ev["loss"], "loss_sgd": ev_sgd.get("loss"), "step": k + 1}
                if twin is not None:
                    row.update(ppl_twin=ev_twin["ppl"], loss_twin=ev_twin["loss"])
                rows.append(row)
                run.log.write("cycle", step=k + 1, row=row, report=rep.as_dict(), seconds=time.perf_counter() - t0)
                if monitor is not None:
                    monitor.record({"step": k + 1, "event": "eval", "test_acc": ev["acc"],
                                    "test_acc_sgd": ev_sgd.get("acc")})
        bar.close()
        table = loop.format_table(rows, TWIN_COLUMNS if twin is not None else COLUMNS)
        print(f"\n{n_params:,}-parameter CharTransformer ({cfg['model']['layers']} layers, d_model "
              f"{cfg['model']['d_model']}, context {L}), dense validation perplexity {dense['ppl']:.2f}; "
              f"{cfg['train']['steps']} steps, cycle {q['cycle']}, {q['classical_steps']} classical steps, sparsity "
              f"{q['sparsity']}, Carleman order {q['carleman_order']}, shots {q['shots']}\n")
        print(table)
        figures = {"perplexity": str(plot_perplexity(rows, run.path("perplexity.png")))}
        if monitor is not None:
            recs, note = panel_records(monitor, cfg)
            figures["fig2"] = str(plot_training_panels(recs, run.path("fig2.png"), every=q["cycle"],
                                                       early_steps=min(200, cfg["train"]["steps"]), proxy_note=note,
                                                       title="character-level transformer LM (acc: next character)"))
        run.log.write("done", rows=rows, seconds=time.perf_counter() - t0, figures=figures)
        return {"out": str(run.out), "rows": rows, "table": table, "reports": [r.as_dict() for r in opt.reports],
                "figures": figures, "dense": dense}


if __name__ == "__main__":
    main()
