"""Theorem III.1: the degree of the gradient-descent ODE of an MLP with polynomial activations.

Setting (supplement Sec. III A, Eq. III.1–III.6): an MLP of ``L`` Linear layers with biases,
``z^(1) = b^(1) + W^(1) x``, ``z^(ℓ+1) = b^(ℓ+1) + W^(ℓ+1) σ(z^(ℓ))``, an activation ``σ`` that is a
polynomial of degree ``s_p``, and the MSE loss ``L(θ) = 1/(2|A|) Σ_a ||z^(L)(x_a) − y_a||²``.  The
gradient-descent map ``θ ↦ θ − η ∇L(θ)`` is then a polynomial ODE ``u ↦ u + Σ_k F_k u^{⊗k}`` of some
degree ``q`` in ``u = θ − θ0`` — the ``q`` of ``PolynomialODE`` and of the Carleman construction.

**Symbolic degree (degree propagation through the architecture).**  Count degrees in θ (the data
``x, y`` are constants):

* ``deg z^(1) = 1`` — ``W^(1) x`` is linear in θ, ``b^(1)`` too;
* ``deg σ(p) = s_p · deg p`` for a polynomial ``p`` (the leading coefficient of σ is non-zero);
* ``deg z^(ℓ+1) = 1 + s_p · deg z^(ℓ)`` — ``W^(ℓ+1)`` adds one degree; the bias ``b^(ℓ+1)`` is of
  degree 1 ≤ that, so biases never raise the degree (without biases it is the same number, the
  polynomial is then homogeneous in the first layer);
* hence ``D_L := deg z^(L) = 1 + s_p + … + s_p^{L−1} = (s_p^L − 1)/(s_p − 1)`` (``= L`` for ``s_p = 1``);
* ``deg L = 2 D_L`` (a square of the residual ``z^(L) − y``);
* ``q = deg ∇L = 2 D_L − 1``: each partial derivative lowers the degree by one.

For generic parameters, data and activation coefficients these are *exact* degrees, not only
bounds: the top homogeneous part of ``z^(L)`` is ``c_s^{…} W^(L) (W^(L−1)(…)^{s_p})^{s_p}`` and does
not vanish.  (``L = 1`` is linear regression: ``q = 1`` whatever ``s_p``, since σ is never applied.)

**The paper's expression** (Eq. III.11; the OCR loses the typesetting, our reading):
``q = O( s_p(s_p^{L−1} − 1)/(s_p − 1) + 1 + (L − 1) + Σ_{ℓ=1}^{L−1} (s_p^ℓ − 1) )``.
The first two terms are ``deg z^(L) = D_L`` (the residual in Eq. III.7), the last two the degree of
``dz^(L)/dθ`` from the chain rule Eq. III.9 (``L − 1`` weight matrices plus the factors ``σ'(z^(ℓ))``
of degree ``(s_p − 1) D_ℓ = s_p^ℓ − 1``), which add up to ``D_L − 1``; the sum is ``2 D_L − 1``, our
``q``.  A second reading of the garbled sum term, ``(s_p^ℓ − 1)/(s_p − 1)`` (= ``D_ℓ``), gives
``D_L + (L − 1) + Σ_{ℓ<L} D_ℓ``: equal to ours for ``s_p = 2``, larger for ``s_p = 1`` and *below* the
measured degree for ``s_p ≥ 3, L ≥ 2`` (6 < 7 at ``L = 2``, 20 < 25 at ``L = 3``), so it cannot be
what the theorem, a bound, meant; both readings are printed.

**Numerical check, independent of autograd.**  The gradient is computed by a hand-written float64
numpy forward/backward pass (:func:`numpy_loss_grad`, cross-checked against autograd once per
setting).  Along a random line ``θ0 + s v`` and a random direction ``w``, ``g(s) = w · ∇L(θ0 + s v)`` is
a polynomial of degree exactly ``q``, so its ``k``-th finite difference on ``k + 1`` points
``s_j = (j − k/2) h`` (``h = span/k``) is ``k! h^k a_k`` for ``k = q`` and exactly zero for ``k > q``.  The
computed difference is compared with its round-off scale ``ε_64 Σ_j C(k, j) |g(s_j)|``; the numerical
degree is the largest ``k`` whose ratio exceeds ``threshold``.  A claimed degree is accepted when
the ``q``-th ratio is above the threshold and every ratio beyond it is below (a wrong claim, one too
low or one too high, fails).  Very high degrees (``q`` beyond ~60 with ``span = 8``) sink the ``q``-th
difference itself into round-off; those settings are reported as symbolic only
(``check_max_degree``).  The loss ``s ↦ L(θ0 + s v)`` is checked the same way for degree ``q + 1``.

Run: ``python -m recipes.mlp_ode_order --config configs/mlp_ode_order.yaml``.
"""
from __future__ import annotations

from math import comb
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from recipes import cli, config, loop
from torch_qode.models import Polynomial, mlp

EPS64 = float(np.finfo(np.float64).eps)

@dataclass
class Config:
    """The recipe's config (its schema and defaults)."""

    seed: int = 0
    device: str = "cpu"         # all arithmetic is float64 numpy; kept for the common command line
    layers: List[Any] = field(default_factory=lambda: [1, 2, 3, 4])   # L
    degrees: List[Any] = field(default_factory=lambda: [1, 2, 3])     # s_p
    activation: str = "full"    # "full": σ(z) = Σ_{k≤s_p} z^k / k!  (every coefficient non-zero); "monomial": z^s_p
    bias: bool = True
    inputs: int = 3             # n_0
    width: int = 3              # hidden widths n_1 … n_{L−1}
    outputs: int = 2            # n_L
    samples: int = 4            # |A|, random x ~ N(0, 1), y ~ N(0, 1)
    lines: int = 3              # random lines per setting; all must give the same degree
    span: float = 8.0           # width of the finite-difference stencil in s
    direction_scale: float = 0.5  # entries of v ~ N(0, direction_scale²)
    threshold: float = 1000.0   # |Δ^k g| / round-off scale above which the k-th difference is "non-zero"
    extra_orders: int = 2       # differences computed up to k = q + extra_orders
    check_max_degree: int = 64  # settings with q above this are reported symbolically only


DEFAULTS = config.defaults(Config)


# ------------------------------------------------------------------------------------ symbolic
def activation_module(s_p: int, kind: str = "full") -> Polynomial:
    """σ of degree ``s_p``: ``"full"`` = ``Σ_{k=0}^{s_p} z^k/k!``, ``"monomial"`` = ``z^{s_p}``."""
    if kind == "monomial":
        return Polynomial.monomial(s_p)
    if kind == "full":
        coeffs, f = [], 1.0
        for k in range(s_p + 1):
            f = f * k if k else 1.0
            coeffs.append(1.0 / f)
        return Polynomial(coeffs)
    raise config.ConfigError(f"activation must be 'full' or 'monomial', got {kind!r}")


def build_mlp(L: int, s_p: int, cfg: dict) -> nn.Sequential:
    """The experiment's MLP: ``L`` linear layers with the degree-``s_p`` activation between them, in float64.

    Args:
        L: the number of linear layers.
        s_p: the activation's degree.
        cfg: the model section (``inputs``, ``width``, ``outputs``, ``activation``, ``bias``).

    Returns:
        The model (:func:`~torch_qode.models.mlp`).
    """
    widths = [cfg["inputs"]] + [cfg["width"]] * (L - 1) + [cfg["outputs"]]
    return mlp(widths, activation_module(s_p, cfg["activation"]), bias=cfg["bias"]).double()


def propagate_degree(model: nn.Sequential) -> dict:
    """Degrees in θ by walking the layers: Linear ``d ↦ 1 + d`` (bias: degree 1 ≤ that), Polynomial
    ``d ↦ s·d``.  Returns ``{"per_layer": [deg z^(1), …], "output": D_L, "loss": 2 D_L, "q": 2 D_L − 1}``."""
    d, per_layer = 0, []
    for m in model:
        if isinstance(m, nn.Linear):
            d = 1 + d
            per_layer.append(d)
        elif isinstance(m, Polynomial):
            d = m.degree * d
        else:
            raise TypeError(f"degree propagation needs Linear and Polynomial layers, got {type(m).__name__}")
    return {"per_layer": per_layer, "output": d, "loss": 2 * d, "q": 2 * d - 1}


def closed_form_degree(L: int, s_p: int) -> int:
    """``q = 2 (s_p^L − 1)/(s_p − 1) − 1`` (``2L − 1`` for ``s_p = 1``)."""
    D = L if s_p == 1 else (s_p**L - 1) // (s_p - 1)
    return 2 * D - 1


def paper_degree(L: int, s_p: int, reading: str = "A") -> int:
    """Eq. III.11 as we read it (module docstring); ``reading="B"`` takes the sum term as ``D_ℓ``."""
    def D(l):
        return l if s_p == 1 else (s_p**l - 1) // (s_p - 1)

    first = 1 + (L - 1 if s_p == 1 else s_p * (s_p ** (L - 1) - 1) // (s_p - 1))  # = D_L
    if reading == "A":
        return first + (L - 1) + sum(s_p**l - 1 for l in range(1, L))
    return first + (L - 1) + sum(D(l) for l in range(1, L))


# ----------------------------------------------------------------------- numpy forward/backward
def flat_params(model: nn.Module) -> tuple:
    """``(θ as float64 numpy, [(name, shape), …])`` in ``model.parameters()`` order."""
    layout = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    theta = np.concatenate([p.detach().double().cpu().numpy().ravel() for p in model.parameters()])
    return theta, layout


def numpy_loss_grad(theta: np.ndarray, model: nn.Sequential, X: np.ndarray, Y: np.ndarray) -> tuple:
    """MSE loss ``1/(2|A|) Σ ||z^(L) − y||²`` and its gradient by hand (Eq. III.7–III.9), float64 numpy."""
    layers, i = [], 0
    act = None
    for m in model:
        if isinstance(m, nn.Linear):
            W = theta[i:i + m.weight.numel()].reshape(m.weight.shape)
            i += m.weight.numel()
            b = None
            if m.bias is not None:
                b = theta[i:i + m.bias.numel()]
                i += m.bias.numel()
            layers.append((W, b))
        elif isinstance(m, Polynomial):
            act = np.asarray(m.coefficients, dtype=np.float64)
    if i != theta.size:
        raise ValueError(f"theta has {theta.size} entries, the model {i}")

    def sigma(z):
        return np.polynomial.polynomial.polyval(z, act)

    def dsigma(z):
        return np.polynomial.polynomial.polyval(z, np.polynomial.polynomial.polyder(act)) if act.size > 1 \
            else np.zeros_like(z)

    a, zs = [X], []
    for l, (W, b) in enumerate(layers):
        z = a[-1] @ W.T + (0.0 if b is None else b)
        zs.append(z)
        if l < len(layers) - 1:
            a.append(sigma(z))
    B = X.shape[0]
    r = zs[-1] - Y
    loss = 0.5 * float(np.sum(r * r)) / B
    delta = r / B
    grads = [None] * len(layers)
    for l in reversed(range(len(layers))):
        W, b = layers[l]
        gW = delta.T @ a[l]
        grads[l] = (gW, None if b is None else delta.sum(axis=0))
        if l > 0:
            delta = (delta @ W) * dsigma(zs[l - 1])
    flat = []
    for gW, gb in grads:
        flat.append(gW.ravel())
        if gb is not None:
            flat.append(gb)
    return loss, np.concatenate(flat)


def autograd_grad(theta: np.ndarray, model: nn.Sequential, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """The same gradient through torch autograd (used only to validate :func:`numpy_loss_grad`)."""
    params = dict(model.named_parameters())
    tensors, i = {}, 0
    for name, p in params.items():
        tensors[name] = torch.tensor(theta[i:i + p.numel()].reshape(p.shape), requires_grad=True)
        i += p.numel()
    out = torch.func.functional_call(model, tensors, (torch.as_tensor(X),))
    loss = 0.5 * ((out - torch.as_tensor(Y)) ** 2).sum() / X.shape[0]
    grads = torch.autograd.grad(loss, list(tensors.values()))
    return np.concatenate([g.numpy().ravel() for g in grads])


# ---------------------------------------------------------------------------- finite differences
def difference_ratios(fn, kmax: int, span: float) -> np.ndarray:
    """``ratio[k] = |Δ^k fn| / (ε_64 Σ_j C(k,j)|fn(s_j)|)`` for ``k = 0..kmax``, each on ``k + 1``
    points ``s_j = (j − k/2)·span/k`` (``s_0 = 0`` for ``k = 0``, ratio ``1/ε_64``)."""
    ratios = np.empty(kmax + 1)
    for k in range(kmax + 1):
        h = span / k if k else 0.0
        s = (np.arange(k + 1) - k / 2) * h
        vals = np.array([fn(si) for si in s], dtype=np.float64)
        coef = np.array([(-1) ** (k - j) * comb(k, j) for j in range(k + 1)], dtype=np.float64)
        diff = float(coef @ vals)
        scale = EPS64 * float(np.abs(coef) @ np.abs(vals))
        ratios[k] = abs(diff) / scale if scale > 0 else (0.0 if diff == 0 else np.inf)
    return ratios


def numerical_degree(ratios: Sequence[float], threshold: float) -> int:
    """The largest ``k`` whose difference stands above round-off (``-1`` if none)."""
    above = np.flatnonzero(np.asarray(ratios) > threshold)
    return int(above[-1]) if above.size else -1


def degree_consistent(ratios: Sequence[float], claimed: int, threshold: float) -> bool:
    """True iff the ``claimed``-th difference is above round-off and every higher one is below."""
    r = np.asarray(ratios)
    if not 0 <= claimed < r.size - 1:
        raise ValueError(f"claimed degree {claimed} needs differences up to {claimed + 1}; have 0..{r.size - 1}")
    return bool(r[claimed] > threshold and np.all(r[claimed + 1:] <= threshold))


# ---------------------------------------------------------------------------------------- run
def check_setting(L: int, s_p: int, cfg: dict, rng: np.random.Generator) -> dict:
    """Symbolic and numerical degree for one ``(L, s_p)``; returns a row of the table."""
    torch.manual_seed(int(rng.integers(2**31)))
    model = build_mlp(L, s_p, cfg)
    sym = propagate_degree(model)
    q = sym["q"]
    if q != closed_form_degree(L, s_p):
        raise AssertionError(f"degree propagation {q} != closed form {closed_form_degree(L, s_p)} (L={L}, s_p={s_p})")
    row = {"L": L, "s_p": s_p, "params": sum(p.numel() for p in model.parameters()),
           "deg_z_L": sym["output"], "q_symbolic": q, "q_paper": paper_degree(L, s_p, "A"),
           "q_paper_B": paper_degree(L, s_p, "B"), "q_numeric": None, "loss_numeric": None,
           "lines_agree": None, "ratio_q": None, "ratio_q+1": None, "consistent": None, "grad_vs_autograd": None}
    X = rng.normal(size=(cfg["samples"], cfg["inputs"]))
    Y = rng.normal(size=(cfg["samples"], cfg["outputs"]))
    theta0, _ = flat_params(model)
    g_np = numpy_loss_grad(theta0, model, X, Y)[1]
    g_ag = autograd_grad(theta0, model, X, Y)
    row["grad_vs_autograd"] = float(np.max(np.abs(g_np - g_ag)) / max(np.max(np.abs(g_ag)), 1e-300))
    if q > cfg["check_max_degree"]:
        row["note"] = f"q={q} > check_max_degree={cfg['check_max_degree']}: not resolvable in float64"
        return row
    kmax = q + cfg["extra_orders"]
    degs, ldegs, ok, r_q, r_q1, curves = [], [], [], [], [], []
    for _ in range(cfg["lines"]):
        v = rng.normal(size=theta0.size) * cfg["direction_scale"]
        w = rng.normal(size=theta0.size)
        grad_ratios = difference_ratios(lambda s: float(w @ numpy_loss_grad(theta0 + s * v, model, X, Y)[1]),
                                        kmax, cfg["span"])
        loss_ratios = difference_ratios(lambda s: numpy_loss_grad(theta0 + s * v, model, X, Y)[0],
                                        kmax + 1, cfg["span"])
        degs.append(numerical_degree(grad_ratios, cfg["threshold"]))
        ldegs.append(numerical_degree(loss_ratios, cfg["threshold"]))
        ok.append(degree_consistent(grad_ratios, q, cfg["threshold"])
                  and degree_consistent(loss_ratios, q + 1, cfg["threshold"]))
        r_q.append(grad_ratios[q])
        r_q1.append(grad_ratios[q + 1])
        curves.append(grad_ratios)
    # one number when every line agrees, else the list of per-line values (the table shows it, the
    # figure draws their range); the per-line values are always kept
    row.update(q_numeric=degs[0] if len(set(degs)) == 1 else degs,
               loss_numeric=ldegs[0] if len(set(ldegs)) == 1 else ldegs,
               lines_agree=len(set(degs)) == 1 and len(set(ldegs)) == 1,
               q_numeric_lines=degs, loss_numeric_lines=ldegs,
               ratio_q=float(np.min(r_q)), **{"ratio_q+1": float(np.max(r_q1))}, consistent=all(ok))
    row["_curve"] = curves[0]
    return row


def _check(cfg: dict) -> None:
    """Every option, before anything is written; errors name the key."""
    for key in ("inputs", "width", "outputs", "samples", "lines"):
        config.check_int(cfg[key], key, 1)
    config.check_int_list(cfg["layers"], "layers", 1)
    config.check_int_list(cfg["degrees"], "degrees", 1)
    if cfg["activation"] not in ("full", "monomial"):
        raise config.ConfigError(f"activation must be 'full' or 'monomial', got {cfg['activation']!r}")
    config.check_real(cfg["span"], "span", 0.0, low_open=True)
    config.check_real(cfg["direction_scale"], "direction_scale", 0.0, low_open=True)
    config.check_real(cfg["threshold"], "threshold", 1.0, low_open=True)
    config.check_int(cfg["extra_orders"], "extra_orders", 1)
    config.check_int(cfg["check_max_degree"], "check_max_degree", 0)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the recipe; returns ``{"out", "rows", "figures"}``."""
    with cli.setup("mlp_ode_order", Config, argv, description=__doc__, check=_check) as run:
        cfg = run.cfg
        rng = np.random.default_rng(cfg["seed"])
        rows, diffs = [], []
        grid = [(L, s) for L in cfg["layers"] for s in cfg["degrees"]]
        for L, s_p in run.progress(grid, desc="(L, s_p)"):
            row = check_setting(L, s_p, cfg, rng)
            curve = row.pop("_curve", None)
            run.log.write("setting", **row, difference_ratios=curve)
            if curve is not None and row["q_symbolic"] > 1:
                diffs.append({"label": f"L={L}, s_p={s_p} (q={row['q_symbolic']})", "s_p": s_p,
                              "k": list(range(len(curve))), "ratio": curve, "q": row["q_symbolic"]})
            rows.append(row)

        from torch_qode.plotting import plot_ode_order

        # right panel: the highest checked degree of each s_p
        pick = {}
        for d in diffs:
            if d["s_p"] not in pick or d["q"] > pick[d["s_p"]]["q"]:
                pick[d["s_p"]] = d
        pick = sorted(pick.values(), key=lambda d: d["q"])[:4]
        cols = ["L", "s_p", "params", "deg_z_L", "q_symbolic", "q_numeric", "loss_numeric", "q_paper",
                "q_paper_B", "ratio_q", "ratio_q+1", "consistent", "grad_vs_autograd"]
        # the results first (table and log), the figure after: a failing figure loses nothing
        print(loop.format_table(rows, cols, floatfmt=".2g"))
        print("q_symbolic = 2(s_p^L - 1)/(s_p - 1) - 1; q_paper: Eq. III.11 read as "
              "s_p(s_p^(L-1)-1)/(s_p-1) + 1 + (L-1) + Σ_{l<L}(s_p^l - 1); q_paper_B: sum term read as D_l")
        for r in rows:
            if r.get("note"):
                print(f"L={r['L']}, s_p={r['s_p']}: {r['note']}")
        split = [r for r in rows if r["lines_agree"] is False]
        if split:
            print(f"{len(split)} setting(s) where the {cfg['lines']} random lines disagree (per-line values in the "
                  f"table as lists): " + ", ".join(f"L={r['L']}, s_p={r['s_p']}" for r in split))
        checked = [r for r in rows if r["consistent"] is not None]
        run.log.write("summary", rows=rows, checked=len(checked),
                      all_consistent=all(r["consistent"] for r in checked))
        fig = plot_ode_order(rows, run.path("ode_order.png"), differences=pick)
        print(f"figure: {fig}")
        run.log.write("figure", path=str(fig))
        return {"out": run.out, "rows": rows, "figures": {"ode_order": fig}}


if __name__ == "__main__":
    main()
