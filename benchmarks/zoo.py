"""A model zoo through QODE's drop-in settings: does the download leave each model able to learn?

Each model is built from its library's public constructor (no weights: torchvision, Hugging Face
``transformers`` from tiny configs, ``timm``), trained for 2 cycles on small random batches with the
README's drop-in settings (``mode="auto"``, ``sparsity=0.9``, ``upload="dense"``, ``shots=10**7``,
``track_sgd=True``; ``cycle=6``, ``classical_steps=3``), once with today's defaults (ERK with a 1 %
floor and the keep-dense rule, ``model=`` given) and once as before this scheme existed (``"global"``,
``min_density=0``, every ``dim() > 1`` tensor prunable).  Per model it prints the QODE/SGD step-time
and peak-RSS ratios (each run in its own process; RSS is the whole process's peak), the cycles' modes
(and why a window fell back), the drift from SGD (``drift`` and its linearisation part ``drift_lin``),
the tensors the download emptied, and whether the loss stayed constant over the steps.

    python benchmarks/zoo.py            # all models, writes docs/benchmarks/zoo.md
    python benchmarks/zoo.py vit gpt2   # some of them

``tests/apps/test_zoo.py`` runs :func:`run` on each model.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

DROP_IN = dict(lr=0.01, mode="auto", sparsity=0.9, upload="dense", shots=10**7, track_sgd=True, cycle=6,
               classical_steps=3)
STEPS = 12          # two cycles
BATCH, IMAGE, SEQ, VOCAB, CLASSES = 4, 32, 8, 128, 10


def _resnet18():
    import torchvision
    return torchvision.models.resnet18(num_classes=CLASSES), "image"


def _mobilenet():
    import torchvision
    return torchvision.models.mobilenet_v3_small(num_classes=CLASSES), "image"


def _efficientnet():
    import torchvision
    return torchvision.models.efficientnet_b0(num_classes=CLASSES), "image"


def _vit():
    import torchvision
    return torchvision.models.VisionTransformer(image_size=IMAGE, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64, num_classes=CLASSES), "image"


def _convnext():
    import timm
    return timm.create_model("convnext_atto", pretrained=False, num_classes=CLASSES), "image"


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(cfg), "lm"


def _bert():
    from transformers import BertConfig, BertForSequenceClassification
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=16, num_labels=3)
    return BertForSequenceClassification(cfg), "cls"


MODELS = {"resnet18": _resnet18, "mobilenet_v3_small": _mobilenet, "efficientnet_b0": _efficientnet,
          "vit": _vit, "gpt2": _gpt2, "bert": _bert, "convnext_atto": _convnext}


def _batches(kind: str, n: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    if kind == "image":
        return [(torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g))
                for _ in range(n)]
    if kind == "lm":
        return [(torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), None) for _ in range(n)]
    return [(torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, 3, (BATCH,), generator=g))
            for _ in range(n)]


def _loss(model: nn.Module, kind: str, x, y) -> tuple:
    """The loss and the outputs' spread over the batch (0: the model outputs a constant)."""
    if kind == "image":
        out = model(x)
        loss = F.cross_entropy(out, y)
    else:
        res = model(input_ids=x, labels=x if kind == "lm" else y)
        out, loss = res.logits, res.loss
    o = out.detach().reshape(len(x), -1)
    return loss, float((o - o.mean(0)).abs().max())


def run(name: str, optimizer: str = "qode", steps: int = STEPS, seed: int = 0, **qode) -> dict:
    """Train ``MODELS[name]`` for ``steps`` steps with QODE (drop-in settings, ``model=`` given, ``qode``
    overriding them; ``prunable`` passes through) or ``optimizer="sgd"``; return the measurements."""
    from torch_qode import QODE

    torch.manual_seed(seed)
    model, kind = MODELS[name]()
    model.train()
    batches = _batches(kind, steps, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=DROP_IN["lr"])
    else:
        settings = {**DROP_IN, **qode}
        opt = QODE(params, names=names, model=model, **settings)
    losses, times, spreads = [], [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in batches:
            seen = []

            def closure(x=x, y=y, seen=seen):
                opt.zero_grad()
                loss, spread = _loss(model, kind, x, y)
                seen.append(spread)
                loss.backward()
                return loss
            t0 = time.perf_counter()
            loss = opt.step(closure)
            times.append(time.perf_counter() - t0)
            spreads.append(seen[0])       # the step's first evaluation: the model QODE holds now
            losses.append(float(loss.detach()) if torch.is_tensor(loss) else float(loss))
    out = {"model": name, "optimizer": optimizer, "losses": losses, "spreads": spreads,
           "step_s": sum(times) / len(times),
           "params": sum(p.numel() for p in params),
           "finite": all(bool(torch.isfinite(p).all()) for p in params),
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    out["output_spread"] = min(spreads[1:])   # step 0 shows the initialisation (a ViT's head is zero)
    out["warnings"] = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    if optimizer == "qode":
        reps = opt.reports
        out["modes"] = [r.mode for r in reps]
        out["reasons"] = [r.reason for r in reps]
        out["drift"] = [None if not r.drift else r.drift.get("relative") for r in reps]
        out["drift_lin"] = [None if not r.drift else r.drift.get("linearization_relative") for r in reps]
        # the dissipation check's Lanczos products and the window it guards (None: no check that cycle)
        out["check_hvps"] = [None if not r.dissipation else r.dissipation.get("hvps") for r in reps]
        out["window_T"] = opt.window_length
        dens = [r.download.get("density", {}) for r in reps if r.download]
        out["emptied"] = sorted({n for d in dens for n, v in d.items() if v == 0})
        out["prunable"] = int(sum(opt.pruner.prunable)) if opt.pruner else 0
        out["zero_now"] = sorted(n for n, p, f in zip(names, params, opt.pruner.prunable) if f and not p.any())
    return out


def _in_process(name: str, optimizer: str, variant: str) -> dict:
    qode = {} if variant == "after" else {"pruning": "global", "min_density": 0.0}
    if variant == "before":    # today's prunable rule before the keep-dense rule: every dim() > 1 tensor
        qode["prunable"] = lambda n, p: p.dim() > 1
    return run(name, optimizer, **qode)


def _subprocess(name: str, optimizer: str, variant: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--one", name, optimizer, variant], capture_output=True,
                         text=True, env=env, timeout=1200)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt(xs) -> str:
    return ", ".join("–" if x is None else f"{x:.3g}" for x in xs)


def _constant(losses) -> str:
    return "constant" if max(losses) - min(losses) < 1e-7 else "varies"


def main(names) -> None:
    from _tables import table, write_page

    rows, reasons = [], []
    for name in names:
        sgd, before, after = (_subprocess(name, "sgd", "after"), _subprocess(name, "qode", "before"),
                              _subprocess(name, "qode", "after"))
        if any("error" in r for r in (sgd, before, after)):
            rows.append([name] + ["error: " + next(r["error"] for r in (sgd, before, after) if "error" in r)]
                        + [""] * 11)
            continue
        row = [name, f"{after['params']:,}", f"{after['step_s'] / sgd['step_s']:.1f}",
               f"{after['peak_rss_mib'] / sgd['peak_rss_mib']:.2f}", " / ".join(after["modes"]),
               _fmt(after["drift"]), _fmt(after["drift_lin"]),
               f"{len(before['emptied'])} of {before['prunable']}", f"{len(after['emptied'])} of {after['prunable']}",
               f"{_constant(before['losses'])} / {_constant(after['losses'])}",
               f"{before['output_spread']:.2g} / {after['output_spread']:.2g}",
               f"{sgd['losses'][0]:.3g}→{sgd['losses'][-1]:.3g}", f"{after['losses'][0]:.3g}→{after['losses'][-1]:.3g}"]
        rows.append(row)
        print(" | ".join(row), flush=True)
        for i, (m, why) in enumerate(zip(after["modes"], after["reasons"])):
            reasons.append([name, str(i), m, why])
        if before["emptied"]:
            reasons.append([name, "before", "emptied", ", ".join(before["emptied"])])
    t = table(["model", "params", "QODE/SGD step time", "peak RSS ratio", "modes (after)", "drift", "drift_lin",
               "emptied before", "emptied after", "loss before / after", "output spread before / after",
               "SGD loss", "QODE loss (after)"], rows)
    r = table(["model", "cycle", "mode", "reason (after); tensors emptied (before)"], reasons, align="llll")
    print(t)
    print(r)
    write_page("zoo", "Model zoo: pruning that leaves a model able to learn",
               "Two cycles of the README's drop-in settings (`mode=\"auto\"`, `sparsity=0.9`, `upload=\"dense\"`, "
               "`shots=10**7`, `track_sgd=True`, `cycle=6`, `classical_steps=3`) on random batches "
               f"(batch {BATCH}, {IMAGE}×{IMAGE} images, sequences of {SEQ}), one thread.  *before*: "
               "`pruning=\"global\"`, `min_density=0`, every `dim() > 1` tensor prunable (the behaviour before "
               "distributions); *after*: the defaults (`pruning=\"erk\"`, `min_density=0.01`, the keep-dense rule "
               "with `model=`).  Step time and peak RSS (whole process) are QODE (after) over `torch.optim.SGD`, "
               "each in its own process.  *Output spread*: the smallest, over the steps after the first (at step 0 a "
               "ViT's zero-initialised head outputs a constant under SGD too), of the largest deviation of a "
               "sample's outputs from the batch mean (train mode, the step's first closure call; 0: the model "
               "outputs a constant).", t, r)


if __name__ == "__main__":
    torch.set_num_threads(1)
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(json.dumps(_in_process(*sys.argv[2:5])))
    else:
        main(sys.argv[1:] or list(MODELS))
