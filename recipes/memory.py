"""``--estimate-memory``: a recipe's predicted peak device memory, by component, before any training.

The model (issue 14) is calibrated, not guessed: the activations autograd saves per sample are
measured on the CPU (:func:`~torch_qode.training.capture.saved_bytes`, training mode, batches of 1
and 2 — their difference is the per-sample part, the rest is per batch); the graph a window retains
is ``RETAIN_GRAPH_FACTOR`` times a batch's saved activations (the forward, its ``create_graph``
backward and one product's temporaries, :mod:`torch_qode.training.config`), a transient double
backward ``DOUBLE_BACKWARD_FACTOR`` times; an SGD step's backward adds ``BACKWARD_FACTOR`` of the
saved activations in temporaries (the factors: ``benchmarks/memory.py``, CPU peaks of ResNet-8).  Parameters, gradients,
optimizer and window state, Lanczos bases and the monitor's graph are counted from their shapes.
The phases that never coexist (the upload's check, a window step, the monitor's spectrum) are
maxed, not added: a monitor spectrum waits for a retained window's end, and a recompute window
holds no graph between products.  Lanczos stores a basis only within half the memory left
(:func:`torch_qode.bridge.lanczos.basis_budget`), as the run does.

Needs no GPU (a user sizes the run before renting one): ``device_bytes`` is the device's memory
(on a GPU run, the real one; otherwise ``DEFAULT_DEVICE_BYTES``, an 80 GB card).
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F

__all__ = ["saved_per_sample", "estimate_classifier", "format_estimate", "DEFAULT_DEVICE_BYTES",
           "BACKWARD_FACTOR", "DOUBLE_BACKWARD_FACTOR", "GiB", "train_resnet_estimate", "hessian_estimate",
           "no_device_estimate"]

GiB = 2**30
#: the device memory an estimate assumes without a GPU: an 80 GB card (74.5 GiB)
DEFAULT_DEVICE_BYTES = 80 * 10**9
#: an SGD step's peak ≈ the saved activations × (1 + this): the backward's activation gradients
#: (benchmarks/memory.py, ResNet-8 on CPU: the SGD peak grows 1.9× the saved bytes per sample)
BACKWARD_FACTOR = 1.0
#: one (micro-)batch's double backward plus a product ≈ this × its saved activations (same benchmark:
#: 5.8×): what a recompute window, the monitor's spectrum and a Hessian spectrum hold while they run
DOUBLE_BACKWARD_FACTOR = 6.0


def saved_per_sample(make_model: Callable[[], torch.nn.Module], sample_shape: tuple) -> tuple:
    """``(per_sample, per_batch)`` bytes autograd saves in a training-mode forward with cross-entropy,
    measured on the CPU at batches of 1 and 2."""
    from torch_qode.training.capture import saved_bytes

    model = make_model()
    model.train()
    sizes = []
    for b in (1, 2):
        x = torch.randn(b, *sample_shape)
        with saved_bytes() as box:
            loss = F.cross_entropy(model(x), torch.zeros(b, dtype=torch.long))
        del loss
        sizes.append(box["bytes"])
    return sizes[1] - sizes[0], max(2 * sizes[0] - sizes[1], 0)


def _basis(steps: int, n: int, itemsize: int, left: float) -> float:
    """A Lanczos basis as the run stores it: only within half the memory left."""
    need = steps * n * itemsize
    return float(need) if need <= left / 2 else 0.0


#: Peak float64 columns of n per (k + 2) of a factored order-2 step (FactoredLevel2.step), measured as the
#: peak RSS of 12–30 steps at n = 300,000–400,000 in a fresh process (k = 23, 39 exact; 4, 8, 16 capped):
#: the live tensors peak at 3.9–4.8 × (k + 2) (glibc returning every freed block: MALLOC_MMAP_THRESHOLD_
#: fixed), and 4.5–7.2 × with glibc's default, which retains freed blocks (most at small k); rounded up.
FACTORED_STEP_COLUMNS = 8


def estimate_classifier(*, n_params: int, per_sample: float, per_batch: float, batch: int, micro_batches: int = 1,
                        qode: Optional[Mapping] = None, check_steps: int = 0, monitor_batch: int = 0,
                        monitor_steps: int = 0, baseline: bool = False, hessian_batch: int = 0,
                        hessian_steps: int = 0, top_steps: int = 100,
                        device_bytes: int = DEFAULT_DEVICE_BYTES) -> dict:
    """Components (bytes) and ``peak`` of a classifier run, float32 weights (see the module docstring).

    ``qode``: the recipe's QODE settings (``hvp``, ``momentum``, ``track_sgd``, ``carleman_order``,
    ``cycle``, ``classical_steps``; ``None``: no QODE training); ``check_steps``: the dissipation check's
    Lanczos steps (``mode="auto"``); ``monitor_*``: the monitor's probe batch and steps;
    ``hessian_*``: a standalone Hessian spectrum (``hessian_after_pruning``).
    """
    from torch_qode.training.config import RETAIN_GRAPH_FACTOR as RG

    P = int(n_params)
    act = lambda b: per_sample * b + per_batch                       # noqa: E731
    micro = -(-batch // micro_batches) if batch else 0
    comp = {"parameters": 4.0 * P * (2 if baseline else 1), "gradients": 4.0 * P * (2 if baseline else 1)}
    phases = {"SGD step (activations of one micro-batch)": act(micro) * (1 + BACKWARD_FACTOR) if batch else 0.0}
    if qode is not None:
        T = int(qode["cycle"]) - int(qode["classical_steps"])
        opt = 4.0 * P * (1 if qode.get("momentum", 0) else 0)
        # θ0 (4 B), the float64 level-1 state with its step's temporaries (3 × 8 B), F0(t) (8 B),
        # the track_sgd shadow (θ and its momentum, 8 B); order 2: the factored level 2 at its step's peak,
        # FACTORED_STEP_COLUMNS × (k + 2) float64 columns of n (W, G1·[W y1 v], the QR's input and factor,
        # the compressed W, the products' temporaries), k = 2T (exact) or max_rank
        window = P * (4 + 24 + 8 + (8 if qode.get("track_sgd") else 0))
        if int(qode.get("carleman_order", 1)) >= 2:
            cap = qode.get("max_rank")
            k = 2 * T if cap is None else min(2 * T, int(cap))
            window += 8.0 * P * FACTORED_STEP_COLUMNS * (k + 2)
        comp["optimizer state"] = opt
        comp["window state (θ0, Carleman state, F0, shadow)"] = float(window)
        hvp = qode.get("hvp", "auto")
        retained = RG * act(batch)
        if hvp == "auto":
            hvp = "retain" if retained <= device_bytes - sum(comp.values()) - act(micro) else "recompute"
        held = retained if hvp == "retain" else 0.0
        comp[f"retained graph (hvp={hvp!r})"] = held
        transient = 0.0 if hvp == "retain" else DOUBLE_BACKWARD_FACTOR * act(micro)   # one micro-batch's
        left = device_bytes - sum(comp.values()) - transient
        check_basis = _basis(check_steps, P, 8 if 8 * check_steps * P <= GiB else 4, left) if check_steps else 0.0
        comp["Lanczos basis (dissipation check)"] = check_basis
        phases["upload + dissipation check"] = held + transient + check_basis
        phases["window step (closure + product)"] = held + act(micro) * (1 + BACKWARD_FACTOR) + transient
    if monitor_batch:
        graph = DOUBLE_BACKWARD_FACTOR * act(monitor_batch)
        basis = _basis(monitor_steps, P, 4, device_bytes - sum(comp.values()) - graph)
        comp["monitor (probe graph + Lanczos basis; never beside a retained graph)"] = graph + basis
        phases["monitor spectrum"] = graph + basis
    if hessian_batch:
        graph = DOUBLE_BACKWARD_FACTOR * act(hessian_batch)
        left = device_bytes - sum(comp.values()) - graph
        top = _basis(min(top_steps, P), P, 4, left)
        dens = _basis(hessian_steps, P, 4, left)
        comp["Hessian graph (double backward)"] = graph
        comp["Lanczos basis (top eigenvalues / density; 0: not stored, no reorth.)"] = max(top, dens)
        phases["Hessian spectrum"] = graph + max(top, dens)
    fixed = sum(v for k, v in comp.items() if k in ("parameters", "gradients", "optimizer state")
                or k.startswith("window state"))
    comp["activations per sample (forward, measured)"] = per_sample
    peak = fixed + max(phases.values())
    return {"components": comp, "phases": phases, "peak": peak, "device_bytes": device_bytes}


def format_estimate(est: Mapping) -> str:
    """The printed table, ending with the line ``estimated peak device memory: N.N GiB``."""
    lines = ["memory estimate (float32 weights; device memory "
             f"{est['device_bytes'] / GiB:.1f} GiB):"]
    for k, v in est["components"].items():
        unit = f"{v / 2**20:10.2f} MiB" if k.startswith("activations per sample") else f"{v / GiB:10.2f} GiB"
        lines.append(f"  {k:<72} {unit}")
    if est["phases"]:
        lines.append("  phases that never coexist (the peak takes the largest):")
    for k, v in est["phases"].items():
        lines.append(f"    {k:<70} {v / GiB:10.2f} GiB")
    lines.append(f"estimated peak device memory: {est['peak'] / GiB:.1f} GiB")
    return "\n".join(lines)


def _resnet(cfg: Mapping) -> tuple:
    """``(n_params, per_sample, per_batch)`` of the recipe's ``cifar_resnet``, measured on the CPU."""
    from recipes.classification import DATASETS
    from torch_qode.models import cifar_resnet, cifar_resnet_num_params

    classes, channels = DATASETS[cfg["data"]["name"]]
    depth, widen = cfg["model"]["depth"], cfg["model"]["widen"]
    side = 32 if cfg["data"]["name"] == "cifar100" else 8
    per_sample, per_batch = saved_per_sample(lambda: cifar_resnet(depth, widen, classes, channels),
                                             (channels, side, side))
    return cifar_resnet_num_params(depth, widen, classes, channels), per_sample, per_batch


def train_resnet_estimate(cfg: Mapping, device_bytes: int) -> dict:
    """``train_resnet_cifar100``: pre-training, QODE with its check and monitor, the SGD baseline."""
    P, s, b = _resnet(cfg)
    q, tr, m = cfg["qode"], cfg["train"], cfg["monitor"]
    est = estimate_classifier(n_params=P, per_sample=s, per_batch=b, batch=tr["batch_size"],
                              micro_batches=tr["micro_batches"], qode=q, baseline=tr["baseline"],
                              check_steps=cfg["dissipation"]["steps"] if q["mode"] == "auto" else 0,
                              monitor_batch=m["probe_batch"] if m["enabled"] else 0, monitor_steps=m["steps"],
                              device_bytes=device_bytes)
    pre = (s * cfg["pretrain"]["batch_size"] + b) * (1 + BACKWARD_FACTOR) + 12.0 * P   # SGD with momentum
    if cfg["checkpoint"] is None and cfg["pretrain"]["epochs"] > 0 and pre > est["peak"]:
        est["phases"]["dense pre-training"] = pre
        est["peak"] = pre
    est["knobs"] = ["train.micro_batches", "qode.hvp=recompute", "train.batch_size", "monitor.probe_batch",
                    "monitor.steps", "dissipation.steps", "pretrain.batch_size"]
    return est


def hessian_estimate(cfg: Mapping, device_bytes: int) -> dict:
    """``hessian_after_pruning``: pre-training, then the Hessian spectra of one batch."""
    P, s, b = _resnet(cfg)
    h = cfg["hessian"]
    est = estimate_classifier(n_params=P, per_sample=s, per_batch=b, batch=0, hessian_batch=h["batch_size"],
                              hessian_steps=h["steps"], top_steps=min(P, max(100, 4 * h["top_k"])),
                              device_bytes=device_bytes)
    pre = (s * cfg["pretrain"]["batch_size"] + b) * (1 + BACKWARD_FACTOR) + 12.0 * P
    if cfg["checkpoint"] is None and cfg["pretrain"]["epochs"] > 0 and pre > est["peak"]:
        est["phases"]["dense pre-training"] = pre
        est["peak"] = pre
    est["knobs"] = ["hessian.batch_size", "hessian.steps", "hessian.top_k", "pretrain.batch_size"]
    return est


def no_device_estimate(cfg: Mapping, device_bytes: int) -> dict:
    """Recipes that compute on the CPU only (numpy / small torch): nothing on the device."""
    return {"components": {"(this recipe computes on the CPU: nothing on the device)": 0.0}, "phases": {},
            "peak": 0.0, "device_bytes": device_bytes, "knobs": []}
