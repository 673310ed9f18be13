"""Fig. 3: the Hessian eigenvalue density of a pre-trained ResNet right after 90% magnitude pruning.

The paper (supplement Sec. III B, Fig. 3) takes a pre-trained 103-million-parameter ResNet (we read it
as ``cifar_resnet(56, 11, 100)``, 103,024,340 parameters), prunes 90% of the parameters and shows the
Hessian spectrum with no further training: dissipative modes (λ > 0) dominate divergent ones.

Steps: build the ResNet; load a checkpoint (``torch.load(..., weights_only=True)``) or pre-train it
with plain SGD; evaluate; optionally take the dense Hessian density for comparison; prune globally by
magnitude (:class:`torch_qode.bridge.pruning.MagnitudePruner`, weights only: biases and BN scales are kept);
evaluate again; Hessian of the training loss on a fixed batch by stochastic Lanczos quadrature
(:func:`torch_qode.bridge.dissipation.hessian_spectrum`: top eigenvalues, Hutchinson trace, density on 256
points).  Reported: positive / negative spectral mass (of the raw Lanczos quadrature, near-zero
nodes included), the positive fraction outside the flat band ``|λ| ≤ 10⁻³ max|λ|``
(``dissipation.positive_fraction``), the mass ``N_c`` that survives the cutoff ``|ηλ| ≥ c`` with its
dissipative (λ > 0) share, the λ > 0 share of the mass with ``|λ| ≥ r·max|λ|`` for
``r = 10⁻³, 10⁻², 10⁻¹``, and the error proxy of Eq. III.14 over ``t = 0..T``.  The near-zero
modes dominate the raw masses and their signs are Lanczos noise; the proxy ignores them.

Our choices where the paper is silent: the Hessian batch (a fixed random subset of the
un-augmented training set), BatchNorm in eval mode while taking the Hessian (running statistics,
as PyHessian is used; ``hessian.mode=train`` uses batch statistics), the Lanczos steps/runs, and the
pre-training recipe (the authors' public code: 50 epochs, lr 0.1, momentum 0.9, weight decay 2e-4).

GPU (paper-sized, needs CIFAR-100): ``python -m recipes.hessian_after_pruning --config
configs/hessian_after_pruning.yaml --data-root /path/to/cifar [checkpoint=/path/to/dense.pt]``.
CPU: ``--config configs/hessian_after_pruning_cpu.yaml`` (a ResNet-8 on scikit-learn digits).
Distributed: ``--nproc N`` (or under ``torchrun``): each rank takes ``hessian.batch_size / N`` samples of
the Hessian batch and every Hessian-vector product is averaged over the ranks (the whole batch's
Hessian; with ``hessian.mode=train`` BatchNorm uses each rank's own batch statistics); rank 0 writes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

import numpy as np
from torch import nn

from recipes import classification, cli, config, launch, loop, memory
from torch_qode._checks import as_int, as_real

@dataclass
class Prune:
    """The ``prune`` section."""

    sparsity: float = 0.9


@dataclass
class Hessian:
    """The ``hessian`` section."""

    batch_size: int = 512
    mode: str = "eval"
    backend: str = "torch"
    support: str = "all"
    steps: int = 64
    runs: int = 1
    grid: int = 256
    top_k: int = 3
    trace_samples: int = 20
    before_pruning: bool = True


@dataclass
class Proxy:
    """The ``proxy`` section."""

    lr: float = 0.01
    cutoff: float = 0.4
    T: int = 100
    report_times: List[Any] = field(default_factory=lambda: [1, 10, 50, 100])


@dataclass
class Config:
    """The recipe's config (its schema and defaults)."""

    seed: int = 0
    device: str = "auto"
    gpu: bool = False                 # true: sized for a GPU; refuses to run without CUDA unless --device cpu
    deterministic: bool = False       # run-time keys (recipes/cli.py)
    cudnn_benchmark: bool = False
    data: classification.Data = field(default_factory=classification.Data)
    model: classification.ResNet = field(default_factory=classification.ResNet)  # in_channels, classes: the data's
    checkpoint: Any = None            # state_dict file (weights_only); skips pre-training
    pretrain: classification.Pretrain = field(default_factory=classification.Pretrain)
    prune: Prune = field(default_factory=Prune)
    hessian: Hessian = field(default_factory=Hessian)
    proxy: Proxy = field(default_factory=Proxy)
    eval_batch_size: int = 512


DEFAULTS = config.defaults(Config)


def spectrum_stats(spectrum, lr: float, cutoff: float, T: int, report_times: Sequence[int]) -> dict:
    """Numbers of one :class:`~torch_qode.bridge.dissipation.Spectrum`: masses, proxy, top eigenvalues
    (``report_times``: integers in ``0..T``)."""
    from torch_qode.bridge.dissipation import error_proxy, positive_fraction

    bad = [t for t in report_times if as_int(t) is None or not 0 <= t <= T]
    if bad:
        raise ValueError(f"report_times must be integers in 0..T = 0..{T}, got {list(report_times)!r}")

    d = spectrum.density
    nodes, w = np.asarray(d.nodes), np.asarray(d.weights)
    w = w / w.sum()
    proxy = np.asarray(error_proxy(d, lr, np.arange(T + 1), cutoff=cutoff), dtype=float)
    keep = np.abs(lr * nodes) >= cutoff
    top = float(np.abs(nodes).max())
    bands = {}
    for rel in (1e-3, 1e-2, 1e-1):  # dissipative (λ > 0) share of the mass with |λ| ≥ rel·max|λ|
        sel = np.abs(nodes) >= rel * top
        bands[f"{rel:g}"] = float(w[sel & (nodes > 0)].sum() / w[sel].sum()) if w[sel].sum() > 0 else None
    return {
        "n": spectrum.n,
        "top_eigenvalues": np.asarray(spectrum.top_eigenvalues).tolist(),
        "trace": spectrum.trace,
        "lambda_min": float(nodes.min()), "lambda_max": float(nodes.max()),
        "positive_mass": float(w[nodes > 0].sum()),
        "negative_mass": float(w[nodes < 0].sum()),
        "positive_fraction": positive_fraction(d),      # outside the flat band |λ| ≤ 1e-3 max|λ|
        "positive_share_by_band": bands,
        "kept_mass_Nc": float(w[keep].sum()),  # mass with |ηλ| ≥ c, what the proxy averages over
        "dissipative_share_Nc": float(w[keep & (nodes > 0)].sum() / w[keep].sum()) if keep.any() else None,
        "proxy": proxy,
        "proxy_at": {str(t): float(proxy[t]) for t in report_times},
        "seconds": dict(spectrum.seconds),
    }


def _check(cfg: dict) -> None:
    """Every option, before anything is written or trained; errors name the key."""
    import torch

    from torch_qode.models import cifar_resnet
    from torch_qode.bridge.pruning import MagnitudePruner

    classification.check_classification(cfg)
    h, p = cfg["hessian"], cfg["proxy"]
    if h["mode"] not in ("eval", "train"):
        raise config.ConfigError(f"hessian.mode must be 'eval' or 'train', got {h['mode']!r}")
    if h["backend"] not in ("torch", "pyhessian"):
        raise config.ConfigError(f"hessian.backend must be 'torch' or 'pyhessian', got {h['backend']!r}")
    if h["support"] not in ("all", "kept"):
        raise config.ConfigError(f"hessian.support must be 'all' (dense upload) or 'kept' (the unpruned "
                                 f"entries, sparse upload), got {h['support']!r}")
    if h["support"] == "kept" and h["backend"] != "torch":
        raise config.ConfigError("hessian.support=kept needs hessian.backend=torch")
    for key in ("batch_size", "steps", "runs", "trace_samples", "top_k"):
        config.check_int(h[key], f"hessian.{key}", 1)
    if h["batch_size"] % launch.world():
        raise config.ConfigError(f"hessian.batch_size = {h['batch_size']} does not split over {launch.world()} "
                                 f"ranks (--nproc): pick a multiple of {launch.world()}")
    if h["backend"] != "torch" and launch.world() > 1:
        raise config.ConfigError("hessian.backend=pyhessian computes each rank's own Hessian: use "
                                 "hessian.backend=torch with --nproc / torchrun")
    config.check_int(h["grid"], "hessian.grid", 2)
    sparsity = cfg["prune"]["sparsity"]
    if as_real(sparsity) is None or not 0 <= sparsity < 1:
        raise config.ConfigError(f"prune.sparsity must lie in [0, 1), got {sparsity!r}")
    config.check_real(p["lr"], "proxy.lr", 0.0, low_open=True)
    config.check_real(p["cutoff"], "proxy.cutoff", 0.0)
    T = config.check_int(p["T"], "proxy.T", 0)
    config.check_int_list(p["report_times"], "proxy.report_times", 0, T, nonempty=False, high_name="proxy.T")
    # top_k Lanczos eigenvalues need a Hessian of at least top_k rows: the parameters of the run's model
    # (hessian.support=kept: those that survive pruning); counted on the meta device, no memory used
    classes, channels = classification.DATASETS[cfg["data"]["name"]]
    with torch.device("meta"):
        net = cifar_resnet(cfg["model"]["depth"], cfg["model"]["widen"], classes, channels)
    n = sum(q.numel() for q in net.parameters())
    if h["support"] == "kept":
        n -= MagnitudePruner(net, sparsity).n_pruned_target()
    if h["top_k"] > n:
        raise config.ConfigError(f"hessian.top_k must be at most the Hessian's size n = {n:,} "
                                 f"({'kept' if h['support'] == 'kept' else 'all'} parameters of the model), "
                                 f"got {h['top_k']}")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the recipe; returns ``{"out", "dense", "pruned", "sparsity", "accuracy", "figures"}``."""
    spawned = cli.maybe_spawn("recipes.hessian_after_pruning:main", argv, "hessian_after_pruning")
    if spawned is not None:                      # --nproc N: rank 0's result
        return spawned
    launch.from_environment()                    # a rank under torchrun
    with cli.setup("hessian_after_pruning", Config, argv, description=__doc__, data=True,
                   check=_check, estimate=memory.hessian_estimate) as run:
        cfg, dev = run.cfg, run.device
        from torch_qode.bridge.dissipation import hessian_spectrum
        from torch_qode.plotting import plot_curves, plot_density
        from torch_qode.bridge.pruning import MagnitudePruner

        start = classification.pretrained_resnet(run, "pretrained.pt")
        data, model, test_loader, n_params = start["data"], start["model"], start["test_loader"], start["params"]
        acc_dense = start["dense"]

        h, px = cfg["hessian"], cfg["proxy"]
        batch = launch.shard(loop.fixed_batch(data["plain_train"], h["batch_size"], cfg["seed"], dev))
        loss_fn = nn.CrossEntropyLoss()
        model.train(h["mode"] == "train")

        def spectrum(support=None):
            return hessian_spectrum(model, loss_fn, batch, backend=h["backend"], support=support,
                                    top_k=h["top_k"], trace_samples=h["trace_samples"], steps=h["steps"],
                                    runs=h["runs"], grid=h["grid"], seed=cfg["seed"],
                                    process_group=launch.group())

        results = {}
        if h["before_pruning"]:
            spec_dense = spectrum()
            results["dense"] = (spec_dense, spectrum_stats(spec_dense, px["lr"], px["cutoff"], px["T"],
                                                           px["report_times"]))
            run.log.write("spectrum", stage="dense", **results["dense"][1],
                          density={"grid": spec_dense.density.grid, "values": spec_dense.density.values})

        pruner = MagnitudePruner(model, cfg["prune"]["sparsity"])
        pruner.prune()
        rep = pruner.report()
        run.log.write("pruned", sparsity=cfg["prune"]["sparsity"], global_sparsity=rep.global_sparsity,
                      total_sparsity=rep.total_sparsity, n_prunable=rep.n_prunable, n_total=rep.n_total)
        acc_pruned = loop.evaluate(model, test_loader, dev)
        model.train(h["mode"] == "train")
        run.log.write("pruned_eval", **acc_pruned)
        support = pruner.support() if h["support"] == "kept" else None
        spec = spectrum(support)
        stats = spectrum_stats(spec, px["lr"], px["cutoff"], px["T"], px["report_times"])
        results["pruned"] = (spec, stats)
        run.log.write("spectrum", stage="pruned", **stats,
                      density={"grid": spec.density.grid, "values": spec.density.values})

        # ---- figures and summary (rank 0)
        if not run.rank0:
            return {"out": run.out, "dense": results.get("dense", (None, None))[1], "pruned": stats}
        note = (f"{n_params:,} params, {rep.global_sparsity:.0%} of weights pruned\n"
                f"λ>0 mass {stats['positive_mass']:.3f}, λ<0 mass {stats['negative_mass']:.3f}\n"
                f"λ_max {stats['top_eigenvalues'][0]:.3g}, trace {stats['trace']:.3g}\n"
                f"N_c(|ηλ|≥{px['cutoff']}) = {stats['kept_mass_Nc']:.3g} at η={px['lr']}")
        ref = None
        if "dense" in results:
            d0 = results["dense"][0].density
            ref = {"grid": d0.grid, "density": d0.values, "label": "dense (before pruning)"}
        figs = {"density": plot_density(spec.density.grid, spec.density.values, run.path("hessian_density.png"),
                                        lr=px["lr"], cutoff=px["cutoff"], eigenvalues=spec.top_eigenvalues,
                                        title=f"Hessian right after {cfg['prune']['sparsity']:.0%} pruning",
                                        note=note, label="pruned", reference=ref)}
        t = np.arange(px["T"] + 1)
        figs["proxy"] = plot_curves(
            [{"title": f"error proxy (Eq. III.14), η={px['lr']}, c={px['cutoff']}",
              "curves": [{"label": stage if st["kept_mass_Nc"] > 0 else f"{stage} (no |ηλ| ≥ c: ≡ 1)",
                          "x": t, "y": st["proxy"]} for stage, (_, st) in results.items()]}],
            run.path("error_proxy.png"), ylabel="error proxy", xlabel="t (steps)")
        rows = []
        for stage, (_, st) in results.items():
            acc = acc_dense if stage == "dense" else acc_pruned
            row = {"stage": stage, "test_acc": acc["acc"], "λ_max": st["top_eigenvalues"][0],
                   "λ_min(SLQ)": st["lambda_min"], "trace": st["trace"], "λ>0 mass": st["positive_mass"],
                   "λ<0 mass": st["negative_mass"], "pos.frac": st["positive_fraction"],
                   "pos.frac(|λ|≥0.1max)": st["positive_share_by_band"]["0.1"], "N_c": st["kept_mass_Nc"],
                   "N_c λ>0 share": st["dissipative_share_Nc"]}
            row.update({f"proxy@{k}": v for k, v in st["proxy_at"].items()})
            rows.append(row)
        print(loop.format_table(rows))
        print(f"model: cifar_resnet({cfg['model']['depth']}, {cfg['model']['widen']}) with {n_params:,} parameters; "
              f"pruned {rep.global_sparsity:.1%} of the prunable weights ({rep.total_sparsity:.1%} of all)")
        print(f"figures: {', '.join(str(p) for p in figs.values())}")
        run.log.write("summary", rows=rows, figures={k: str(v) for k, v in figs.items()})
        return {"out": run.out, "dense": results.get("dense", (None, None))[1], "pruned": stats,
                "sparsity": rep.as_dict(), "accuracy": {"dense": acc_dense, "pruned": acc_pruned},
                "figures": figs}


if __name__ == "__main__":
    main()
