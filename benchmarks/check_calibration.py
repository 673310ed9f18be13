"""Calibration of the dissipation check: the predicted linearisation error against the measured one (issue 22).

Each window of the grid runs with ``mode="auto"`` and a check that lets every window through
(:class:`Both`: the ``"predicted"`` criterion at ``max_error = 1e9``) while it also computes the
paper's criterion (``DissipationCheck(criterion="proxy")``: SLQ, ``proxy(T) ≤ 1`` and positive
fraction ≥ 0.5) on the same upload's products.  ``track_sgd=True`` measures the window's relative
linearisation error ``‖θ_lin − θ_GD,S‖/‖θ_GD,S − θ0‖``, so each window pairs

* the predicted error at the T it ran (``r.dissipation["predicted_error"][T]``),
* the paper's ``proxy(T)`` and verdict,
* the measured error (``r.drift["linearization_relative"]``).

Decisions are scored offline at the default ``max_error = 0.5``: a window should be refused iff its
measured error exceeds 0.5; the predicted criterion refuses iff the prediction at two significant
digits exceeds 0.5; the paper's refuses iff its verdict fails.

Grid: four models (tanh and ReLU MLPs 64-32-10 in float64 and ResNet-8 on scikit-learn's digits, the
CPU char transformer of ``recipes/train_char_lm.py`` on the standard library's text), three learning
rates each, T = 5, 12, 25, mini-batches against one fixed batch ("full batch"), and per setting two
cycles (2 classical steps, then the window) at sparsity 0 and at 0.9 (QODE's default pruning, the
library's download at each window's end).  The first window is the same at both sparsities (the
prune comes at its end) and is counted once; the second runs from dense weights (sparsity 0) or from
the 90% prune (sparsity 0.9).  Each model is pre-trained first (SGD, the transformer AdamW) so the
weights are not at their initialisation.  Exact readout (``shots=None``): the measured error does not
depend on the shots.

Usage (1 thread per process; the published page came from the plain command):
    OMP_NUM_THREADS=1 python benchmarks/check_calibration.py [--seeds 2] [--jobs 2] [--quick]

``--quick`` runs a tiny grid (< 60 s) and writes nothing unless ``TORCH_QODE_BENCH_DOCS`` is set
(then the page, the figure and the rows go there).  A full run writes ``docs/benchmarks/check_calibration.md``,
``docs/check_calibration.png`` and the per-window rows to ``runs/check_calibration/rows.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from _tables import DOCS_DIR, ENV_DIR, ROOT, table, write_page
from torch_qode.bridge.dissipation import DissipationCheck
from torch_qode.bridge.prediction import rounded

MAX_ERROR = 0.5
MODELS = ("tanh MLP", "ReLU MLP", "ResNet-8", "char transformer")
LRS = {"tanh MLP": (0.05, 0.2, 0.5), "ReLU MLP": (0.05, 0.2, 0.5), "ResNet-8": (0.02, 0.05, 0.1),
       "char transformer": (0.03, 0.1, 0.3)}
TS = (5, 12, 25)
SPARSITIES = (0.0, 0.9)
BATCHES = ("mini-batch", "full batch")
CLASSICAL = 2


class Both(DissipationCheck):
    """The predicted criterion deciding nothing (``max_error`` huge, so every window runs), with the
    paper's proxy computed on the same upload (the same products, the same Lanczos bound)."""

    def __init__(self):
        super().__init__(max_error=1e9)
        self.paper = DissipationCheck(criterion="proxy")
        self.log = []

    def __call__(self, hvp, n, **kw):
        v = super().__call__(hvp, n, **kw)
        p = self.paper(hvp, n, lr=kw["lr"], T=kw["T"], dtype=kw.get("dtype", torch.float64),
                       device=kw.get("device"), max_steps=kw.get("max_steps"))
        self.log.append(p)
        return v


# --- models and data -------------------------------------------------------------------------------

_CORPUS = None


def _corpus():
    global _CORPUS
    if _CORPUS is None:
        from torch_qode.data.stdlib_text import stdlib_corpus
        _CORPUS = stdlib_corpus(max_files=40, val_every=10, max_chars=400_000)
    return _CORPUS


def setup(name: str, seed: int):
    """``(pre-trained model, sampler, loss)``: ``sampler(gen, full)`` gives a batch (a random mini-batch,
    or with ``full`` the same fixed batch every call)."""
    torch.manual_seed(seed)
    if name == "char transformer":
        from torch_qode.data.stdlib_text import char_windows
        from torch_qode.models import CharTransformer, lm_loss
        c = _corpus()
        ctx, B = 32, 32
        model = CharTransformer(len(c.vocab), d_model=32, heads=2, layers=1, ff=64, context=ctx)
        ids = c.train
        fixed = char_windows(ids, torch.randint(0, ids.numel() - ctx - 1, (B,),
                                                generator=torch.Generator().manual_seed(1000 + seed)), ctx)

        def sample(gen, full):
            if full:
                return fixed
            return char_windows(ids, torch.randint(0, ids.numel() - ctx - 1, (B,), generator=gen), ctx)

        loss_fn = lm_loss
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        steps = 100
    else:
        from torch_qode.data.digits import digits_tensors
        image = name == "ResNet-8"
        dtype = torch.float32 if image else torch.float64
        X, y = digits_tensors("train", image=image, dtype=dtype)
        if image:
            from torch_qode.models import cifar_resnet
            model = cifar_resnet(8, 1, 10, in_channels=1)
        else:
            from torch_qode.models.mlp import mlp
            model = mlp([64, 32, 10], "tanh" if name.startswith("tanh") else "relu").double()
        perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(1000 + seed))[:256]
        fixed = (X[perm], y[perm])

        def sample(gen, full):
            if full:
                return fixed
            idx = torch.randint(0, X.shape[0], (128,), generator=gen)
            return X[idx], y[idx]

        loss_fn = F.cross_entropy
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        steps = 40
    gen = torch.Generator().manual_seed(2000 + seed)
    model.train()
    for _ in range(steps):                  # the warm-up: the weights are not at their initialisation
        x, t = sample(gen, False)
        opt.zero_grad()
        loss_fn(model(x), t).backward()
        opt.step()
    return model, sample, loss_fn


# --- one setting -----------------------------------------------------------------------------------

def run_setting(job: tuple) -> list:
    """``job = (model, seed, lr index, T, batch mode)``: both sparsities, two cycles each; one row per
    quantum window (the first window once)."""
    from torch_qode.training.qode import QODE
    torch.set_num_threads(1)
    name, seed, li, T, batch = job
    lr = LRS[name][li]
    base, sample, loss_fn = setup(name, seed)
    rows = []
    for sparsity in SPARSITIES:
        model = copy.deepcopy(base)
        chk = Both()
        opt = QODE(model.parameters(), lr=lr, cycle=T + CLASSICAL, classical_steps=CLASSICAL, mode="auto",
                   dissipation=chk, track_sgd=True, model=model, sparsity=sparsity, shots=None, seed=seed)
        gen = torch.Generator().manual_seed(3000 + seed)
        secs = []
        for _ in range(2 * (T + CLASSICAL)):
            x, t = sample(gen, batch == "full batch")

            def closure():
                opt.zero_grad()
                loss = loss_fn(model(x), t)
                loss.backward()
                return loss
            t0 = time.perf_counter()
            opt.step(closure)
            secs.append(time.perf_counter() - t0)
        log = iter(chk.log)
        for i, r in enumerate(opt.reports):
            d = r.dissipation
            paper = next(log) if d is not None else None
            if sparsity > 0 and i == 0:
                continue                      # the same window as at sparsity 0 (the prune is at its end)
            state = "first window" if i == 0 else ("dense, 2nd window" if sparsity == 0 else
                                                   f"{sparsity:.0%} pruned, 2nd window")
            if r.mode != "quantum" or not r.drift or r.drift.get("linearization_relative") is None:
                pe = (d or {}).get("predicted_error") or []
                rows.append({"model": name, "seed": seed, "lr": lr, "lr_index": li, "T": T, "batch": batch,
                             "state": state, "skipped": r.reason, "report_window": r.window,
                             "verdict_T": (d or {}).get("T"),
                             "predicted": float(pe[min(T, len(pe) - 1)]) if pe else None,
                             "predicted_curve": pe, "hvps": (d or {}).get("hvps"),
                             "paper_passed": None if paper is None else bool(paper.passed),
                             "proxy": None if paper is None else float(paper.proxy[-1])})
                continue
            start = i * (T + CLASSICAL) + CLASSICAL
            window_s = sum(secs[start:start + r.window]) - d["seconds"] - paper.seconds
            rows.append({
                "model": name, "seed": seed, "lr": lr, "lr_index": li, "T": r.window, "batch": batch,
                "state": state,
                "sparsity": sparsity, "cycle": i,
                "measured": float(r.drift["linearization_relative"]),
                "predicted": float(d["predicted_error"][r.window]),
                "margin": float(d["predicted_margin"][r.window]),
                "parts": d.get("predicted_parts"),
                # within its margin of the default max_error (the check's own flag is against 1e9 here)
                "borderline": abs(float(d["predicted_error"][r.window]) - MAX_ERROR)
                <= float(d["predicted_margin"][r.window]),
                "hvps": int(d["hvps"]), "check_grads": int(d.get("check_grads") or 0),
                "work_ratio": float(d["work_ratio"]), "cost_ratio": float(d["cost_ratio"]),
                "pred_seconds": float(d["seconds"]),
                "proxy": float(paper.proxy[-1]), "positive_fraction": float(paper.positive_fraction),
                "paper_passed": bool(paper.passed), "paper_hvps": int(paper.hvps),
                "paper_seconds": float(paper.seconds), "window_seconds": float(window_s),
                "n": int(r.support_size or 0)})
    return rows


# --- statistics ------------------------------------------------------------------------------------

def spearman(a, b) -> float:
    from scipy.stats import spearmanr
    if len(a) < 3:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def summary(rows: list) -> dict:
    m = np.array([r["measured"] for r in rows])
    p = np.array([r["predicted"] for r in rows])
    q = np.array([r["proxy"] for r in rows])
    truth = m > MAX_ERROR
    pred_refuse = np.array([rounded(x) > MAX_ERROR for x in p])
    paper_refuse = np.array([not r["paper_passed"] for r in rows])
    within = (lambda e: float(np.mean((e <= 2 * m) & (e >= m / 2))))
    win_s = np.array([max(r["window_seconds"], 1e-9) for r in rows])
    return {
        "n": len(rows), "refuse": int(truth.sum()),
        "rho_pred": spearman(p, m), "rho_proxy": spearman(q, m),
        "within_pred": within(p), "within_proxy": within(q),
        "acc_pred": float(np.mean(pred_refuse == truth)), "acc_paper": float(np.mean(paper_refuse == truth)),
        "fp_pred": int((pred_refuse & ~truth).sum()), "fn_pred": int((~pred_refuse & truth).sum()),
        "fp_paper": int((paper_refuse & ~truth).sum()), "fn_paper": int((~paper_refuse & truth).sum()),
        "work": float(np.median([r["work_ratio"] for r in rows])),
        "work_max": float(np.max([r["work_ratio"] for r in rows])),
        "paper_cost": float(np.median([r["paper_hvps"] / r["T"] for r in rows])),
        "pred_s": float(np.median([r["pred_seconds"] for r in rows] / win_s)),
        "paper_s": float(np.median([r["paper_seconds"] for r in rows] / win_s)),
        "borderline": float(np.mean([r["borderline"] for r in rows])),
        "in_margin": float(np.mean([abs(r["predicted"] - r["measured"]) <= r["margin"] for r in rows])),
        "ratio": float(np.exp(np.median(np.log(p / m)))),
        "ratio_lo": float(np.quantile(p / m, 0.1)), "ratio_hi": float(np.quantile(p / m, 0.9)),
    }


def fmt(x, spec=".2f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def calibration_table(groups: list) -> str:
    head = ["windows", "windows to refuse (measured > 0.5)", "Spearman ρ: predicted", "Spearman ρ: proxy(T)",
            "within ×2: predicted", "within ×2: proxy(T)", "decisions right: predicted (FP/FN)",
            "decisions right: paper (FP/FN)", "borderline (predicted within its margin of 0.5)",
            "measured within predicted ± margin"]
    rows = []
    for label, rs in groups:
        if not rs:
            continue
        s = summary(rs)
        rows.append([label, s["n"], s["refuse"], fmt(s["rho_pred"]), fmt(s["rho_proxy"]),
                     f"{s['within_pred']:.0%}", f"{s['within_proxy']:.0%}",
                     f"{s['acc_pred']:.0%} ({s['fp_pred']}/{s['fn_pred']})",
                     f"{s['acc_paper']:.0%} ({s['fp_paper']}/{s['fn_paper']})", f"{s['borderline']:.0%}",
                     f"{s['in_margin']:.0%}"])
    return table(["grid", *head], rows)


def cost_table(groups: list) -> str:
    rows = []
    for label, rs in groups:
        if not rs:
            continue
        s = summary(rs)
        rows.append([label, f"{s['work']:.2f} (max {s['work_max']:.2f})", f"{s['paper_cost']:.2f}",
                     f"{s['pred_s']:.2f}", f"{s['paper_s']:.2f}"])
    return table(["grid", "predicted: work_ratio, median", "paper: HVPs / T, median",
                  "predicted: check s / window s, median", "paper: check s / window s, median"], rows)


def bias_table(rows: list, key: str, values, label=None) -> str:
    out = []
    for v in values:
        rs = [r for r in rows if r[key] == v]
        if not rs:
            continue
        s = summary(rs)
        out.append([label(v) if label else v, s["n"], f"{s['ratio']:.2f}", f"{s['ratio_lo']:.2f}–{s['ratio_hi']:.2f}",
                    f"{s['within_pred']:.0%}", fmt(s["rho_pred"]), f"{np.median([r['measured'] for r in rs]):.3g}"])
    return table([key, "windows", "predicted / measured, geometric median", "10–90% range", "within ×2",
                  "Spearman ρ", "measured, median"], out)


def model_bias_table(rows: list) -> str:
    out = []
    for mname in MODELS:
        for key, vals in (("batch", BATCHES), ("T", TS), ("lr_index", (0, 1, 2)),
                          ("state", ("first window", "dense, 2nd window", "90% pruned, 2nd window"))):
            for v in vals:
                rs = [r for r in rows if r["model"] == mname and r[key] == v]
                if not rs:
                    continue
                s = summary(rs)
                what = (f"lr {LRS[mname][v]}" if key == "lr_index" else f"T = {v}" if key == "T" else v)
                out.append([mname, what, s["n"], f"{s['ratio']:.2f}", f"{s['ratio_lo']:.2f}–{s['ratio_hi']:.2f}",
                            f"{s['within_pred']:.0%}", f"{s['acc_pred']:.0%}", f"{s['acc_paper']:.0%}"])
    return table(["model", "slice", "windows", "predicted / measured, geometric median", "10–90% range",
                  "within ×2", "decisions right: predicted", "decisions right: paper"], out, align="llrrrrrr")


def parts_table(rows: list) -> str:
    """The bias by the part that dominates the prediction (the upload batch's Taylor remainder, or the
    curvature noise between batches), windows with measured error ≤ 1."""
    out = []
    for mname in MODELS:
        for batch in BATCHES:
            rs = [r for r in rows if r["model"] == mname and r["batch"] == batch and r["measured"] <= 1]
            cells = []
            for noisy in (True, False):
                sel = [r for r in rs if (r["parts"]["noise"] > r["parts"]["remainder"]) == noisy]
                if sel:
                    ratio = np.array([r["predicted"] / r["measured"] for r in sel])
                    cells += [len(sel), f"{np.exp(np.median(np.log(ratio))):.2f}",
                              f"{np.quantile(ratio, 0.1):.2f}–{np.quantile(ratio, 0.9):.2f}"]
                else:
                    cells += [0, "–", "–"]
            out.append([mname, batch, *cells])
    return table(["model", "batch", "noise-dominated: windows", "predicted / measured", "10–90%",
                  "remainder-dominated: windows", "predicted / measured", "10–90%"], out, align="llrrrrrr")


# --- figure ----------------------------------------------------------------------------------------

def figure(rows: list, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(MODELS, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    m_all = np.array([r["measured"] for r in rows])
    lo, hi = m_all.min() / 3, m_all.max() * 3
    for ax, key, ylabel in ((axes[0], "predicted", "predicted error at T"),
                            (axes[1], "proxy", "paper's proxy(T) (not an error: other units)")):
        for mname in MODELS:
            rs = [r for r in rows if r["model"] == mname]
            if not rs:
                continue
            for batch, marker in zip(BATCHES, ("o", "^")):
                sel = [r for r in rs if r["batch"] == batch]
                if sel:
                    ax.scatter([r["measured"] for r in sel], [max(r[key], 1e-12) for r in sel], s=16, marker=marker,
                               color=colours[mname], alpha=0.7, label=f"{mname}, {batch}")
        xs = np.array([lo, hi])
        ax.plot(xs, xs, "k-", lw=1, label="y = x")
        ax.fill_between(xs, xs / 2, xs * 2, color="grey", alpha=0.2, label="factor 2")
        ax.axvline(MAX_ERROR, color="k", ls=":", lw=1)
        ax.axhline(MAX_ERROR if key == "predicted" else 1.0, color="k", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        if key == "predicted":
            ax.set_ylim(lo, hi)
        ax.set_xlabel("measured relative linearisation error at T")
        ax.set_ylabel(ylabel)
    axes[0].set_title("predicted criterion (dotted: max_error = 0.5)")
    axes[1].set_title("paper's criterion (dotted: proxy = 1, measured = 0.5)")
    axes[1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"(figure written to {os.path.relpath(path)})")


# --- main ------------------------------------------------------------------------------------------

def source_digest() -> str:
    """A short digest of the library's sources (the tree may differ from the commit the page names)."""
    import hashlib
    h = hashlib.sha256()
    for f in sorted((ROOT / "torch_qode").rglob("*.py")):
        h.update(f.relative_to(ROOT).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def aborted_table(skipped: list) -> str:
    """Windows that did not run to their end: what each criterion said at the upload."""
    out = []
    for r in skipped:
        pred = r.get("predicted")
        pred_refuse = pred is None or not math.isfinite(pred) or rounded(pred) > MAX_ERROR
        out.append([r["model"], r["batch"], r["lr"], r["T"], r["state"], r["seed"], fmt(pred, ".3g"),
                    "refuse" if pred_refuse else "run", fmt(r.get("proxy"), ".3g"),
                    "–" if r.get("paper_passed") is None else ("run" if r["paper_passed"] else "refuse"),
                    r["skipped"][:110]])
    return table(["model", "batch", "lr", "T", "window", "seed", "predicted error at T", "predicted: decision",
                  "paper: proxy(T)", "paper: decision", "why it did not run (first 110 characters)"], out,
                 align="llrrlrrlrll")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=2, help="seeds per setting (pre-training, batches)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (1 thread each)")
    ap.add_argument("--quick", action="store_true", help="a tiny grid (< 60 s); writes nothing unless "
                    f"{ENV_DIR} is set")
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    if args.quick:
        jobs = [(m, 0, 1, 5, b) for m in MODELS for b in BATCHES]
    else:
        jobs = [(m, s, li, T, b) for s in range(args.seeds) for m in MODELS for li in range(3) for T in TS
                for b in BATCHES]
    # the longest first, so the pool ends together
    jobs.sort(key=lambda j: -j[3] * (8 if j[0] in ("ResNet-8", "char transformer") else 1))
    rows, skipped = [], []
    if args.jobs > 1:
        with mp.get_context("fork").Pool(args.jobs) as pool:
            results = list(pool.imap_unordered(run_setting, jobs))
    else:
        results = [run_setting(j) for j in jobs]
    for res in results:
        for r in res:
            (skipped if "skipped" in r else rows).append(r)
    order = {m: i for i, m in enumerate(MODELS)}
    rows.sort(key=lambda r: (order[r["model"]], r["seed"], r["lr"], r["T"], r["batch"], r["state"]))
    wall = time.perf_counter() - start

    overall = [("all", rows)]
    by_model = [(m, [r for r in rows if r["model"] == m]) for m in MODELS]
    by_batch = [(b, [r for r in rows if r["batch"] == b]) for b in BATCHES]
    by_model_batch = [(f"{m}, {b}", [r for r in rows if r["model"] == m and r["batch"] == b])
                      for m in MODELS for b in BATCHES]
    by_state = [(s, [r for r in rows if r["state"] == s])
                for s in ("first window", "dense, 2nd window", "90% pruned, 2nd window")]
    by_size = [("measured ≤ 1", [r for r in rows if r["measured"] <= 1]),
               ("measured > 1 (the window diverges from GD)", [r for r in rows if r["measured"] > 1])]
    groups = overall + by_model + by_batch + by_model_batch + by_state + by_size
    t_cal = calibration_table(groups)
    t_cost = cost_table(overall + by_model + by_batch + [(f"T = {T}", [r for r in rows if r["T"] == T]) for T in TS])
    t_bias = "\n\n".join([bias_table(rows, "batch", BATCHES), bias_table(rows, "T", TS),
                          bias_table(rows, "lr_index", (0, 1, 2), label=lambda v: ("low", "mid", "high")[v]),
                          bias_table(rows, "state", ("first window", "dense, 2nd window", "90% pruned, 2nd window"))])
    t_model_bias = model_bias_table(rows)
    s = summary(rows)
    goals = [("Spearman ρ ≥ 0.8", s["rho_pred"] >= 0.8, fmt(s["rho_pred"])),
             ("within ×2 on ≥ 80% of windows", s["within_pred"] >= 0.8, f"{s['within_pred']:.0%}"),
             ("decisions ≥ 90% right", s["acc_pred"] >= 0.9, f"{s['acc_pred']:.0%}"),
             ("cost ≤ 0.5 of the window (work_ratio, median)", s["work"] <= 0.5, f"{s['work']:.2f}")]
    t_goals = table(["goal (predicted criterion, all windows)", "met", "measured"],
                    [[g, "yes" if ok else "**no**", v] for g, ok, v in goals])
    misses = []
    for label, rs in by_model + by_batch + by_model_batch:
        if len(rs) < 3:
            continue
        x = summary(rs)
        bad = [f"ρ {x['rho_pred']:.2f}" if x["rho_pred"] < 0.8 else "",
               f"within ×2 {x['within_pred']:.0%}" if x["within_pred"] < 0.8 else "",
               f"decisions {x['acc_pred']:.0%}" if x["acc_pred"] < 0.9 else ""]
        bad = [b for b in bad if b]
        if bad:
            misses.append(f"- {label} ({x['n']} windows; predicted/measured {x['ratio']:.2f}): " + ", ".join(bad))
    grid = ("a tiny smoke grid (one lr, T = 5, seed 0)" if args.quick else
            f"{len(MODELS)} models × 3 learning rates × T ∈ {{5, 12, 25}} × mini-batch/full batch × "
            f"sparsity {{0, 0.9}} × {args.seeds} seed(s)")
    intro = (f"What `benchmarks/check_calibration.py` measured: {len(rows)} quantum windows ({grid}; "
             f"{len(skipped)} did not run), {wall:.0f} s wall on {args.jobs} worker process(es) of one thread.  "
             "Every window ran (the predicted criterion at `max_error = 1e9`), with the paper's criterion "
             "(`criterion=\"proxy\"`: SLQ on the same upload's products, `proxy(T) ≤ 1` and positive fraction "
             "≥ 0.5) computed beside it, and `track_sgd=True` measured the relative linearisation error "
             "`‖θ_lin − θ_GD,S‖/‖θ_GD,S − θ0‖`.  Decisions are scored at `max_error = 0.5`: a window should be "
             "refused iff its measured error exceeds 0.5 (FP: refused a window that was fine; FN: let through "
             "one that was not).  The paper's `proxy(T)` is a spectral growth factor, not an error: its "
             "'within ×2' column takes it as if it were one, and only its rank correlation and its decisions "
             "compare like with like.\n\n"
             "Models: tanh and ReLU MLPs 64-32-10 (float64; 2,410 weights; lr 0.05/0.2/0.5), ResNet-8 "
             "(`cifar_resnet(8, 1, 10, in_channels=1)`, 77,754 weights, float32; lr 0.02/0.05/0.1) on "
             "scikit-learn's digits (mini-batches of 128 drawn at random, or one fixed batch of 256), and the "
             "char transformer of `configs/train_char_lm_cpu.yaml` (d_model 32, one layer, context 32; lr "
             "0.03/0.1/0.3; 32 windows of the standard library's text, random or fixed).  Warm-up: 40 SGD "
             "steps (lr 0.1, momentum 0.9; the transformer 100 AdamW steps at 3e-3).  Then two cycles of "
             "2 classical steps and a window of T, `window=\"fixed\"`, exact readout; the first window is the "
             "same at both sparsities and counted once, the second runs from dense weights or after the "
             "90% prune (ERK, the library's default pruning).  Check seconds are against the window's own "
             "wall time (its T steps less the two checks; with `track_sgd` each step also runs the SGD "
             "shadow).\n\n"
             f"Library sources at digest `{source_digest()}` (sha256 of `torch_qode/**/*.py`, the tree "
             "was being edited).\n\n"
             "![measured against predicted error, and against the paper's proxy](../check_calibration.png)")
    cost_by_T = ", ".join(f"T = {T}: {summary([r for r in rows if r['T'] == T])['work']:.2f}" for T in TS
                          if any(r["T"] == T for r in rows))
    text_misses = (("Where the predicted criterion misses a calibration or decision goal (per model and batch "
                    "mode):\n\n" + "\n".join(misses)) if misses else
                   "Every model and batch mode meets the calibration and decision goals.")
    chk = DissipationCheck()
    plans = ", ".join(f"T = {T}: {chk.max_hvps(T, T)}" for T in TS)
    half = next(T for T in range(1, 1000) if (chk.max_hvps(T, T) + 4) / (2 * T) <= 0.5)
    text_misses += (f"\n\nCost: the check's work does not depend on the model, only on T (`work_ratio` "
                    f"{cost_by_T}): it takes `DissipationCheck().max_hvps(T, T)` products ({plans}: the path, "
                    "two probes, two quadratures that shrink with the budget) and four gradients, so it costs "
                    f"≤ 0.5 of an order-1 window (T products and T gradients) from T = {half} on.")
    blocks = ["## Goals\n\n" + t_goals, text_misses,
              "## Calibration against the measured error\n\n" + t_cal,
              "## Cost of the check\n\n`work_ratio` = (check HVPs + check gradients) / (window HVPs + T); the "
              "paper's check spends `max(8, min(64, T))` Lanczos steps.\n\n" + t_cost,
              "## Bias of the prediction\n\n" + t_bias,
              "### By the part that dominates the prediction\n\nWindows with measured error ≤ 1; a window is "
              "noise-dominated when the predicted curvature-noise part at T exceeds the remainder part "
              "(`predicted_parts`).  With the full batch the noise is zero by construction.\n\n" + parts_table(rows),
              "### By model\n\n" + t_model_bias,
              "## Windows that did not run to their end\n\nNot in the tables above (no measured error): "
              "aborted windows (the library's `max_displacement` guard) and windows whose prediction came out "
              "NaN (refused by the check even at `max_error = 1e9`; their paper `proxy(T)` is huge, the window "
              "diverges) would have needed refusing.\n\n"
              + (aborted_table(skipped) if skipped else "None.")]
    print(intro)
    for b in blocks:
        print("\n" + b)
    print(f"\ntotal {wall:.0f} s")
    if args.quick and not os.environ.get(ENV_DIR):
        print(f"\n(--quick: nothing written; set {ENV_DIR} to write the page)")
        return
    out_dir = Path(os.environ.get(ENV_DIR) or DOCS_DIR)
    fig_path = (out_dir if os.environ.get(ENV_DIR) else DOCS_DIR.parent) / "check_calibration.png"
    out_dir.mkdir(parents=True, exist_ok=True)
    figure(rows, fig_path)
    raw = out_dir / "check_calibration_rows.json" if os.environ.get(ENV_DIR) else \
        ROOT / "runs" / "check_calibration" / "rows.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps({"rows": rows, "skipped": skipped}, indent=1))
    print(f"(rows written to {os.path.relpath(raw)})")
    write_page("check_calibration", "Calibration of the dissipation check", intro, *blocks)


if __name__ == "__main__":
    main()
