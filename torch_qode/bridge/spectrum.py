"""Hessian spectral densities, the linearisation error proxy and ``hessian_spectrum`` (Sec. III B).

With ``a = −η λ`` (λ the Hessian's eigenvalues, Eq. II.83) and the spectral density ``p(a)``, the
paper's error proxy (Eq. III.12–III.15) is

    proxy(t) = (1/N_c) ∫_{|a| ≥ c} p(a) |1 + a|^t da,      N_c = ∫_{|a| ≥ c} p(a) da,

with cutoff ``c = 0.4`` (the abundant near-zero modes are removed and the rest renormalised).
``proxy(0) = 1`` is the level of a classical step; ``proxy(t) < 1`` means dissipative modes dominate.

- :func:`slq_density` — stochastic Lanczos quadrature (:func:`~.lanczos.lanczos` runs pooled),
  smoothed by :func:`smooth_density` with Gaussians on a 256-point grid (the kernel width of the
  authors' code: Papyan's ``LanczosApproxSpec``);
- :func:`error_proxy` (density, quadrature and exact-eigenvalue forms), :func:`positive_fraction`;
- :func:`hessian_spectrum` — top eigenvalues, trace and density of a model's loss on a batch, backend
  ``"torch"`` (this package's Lanczos on autograd HVPs) or ``"pyhessian"``
  (:class:`~.pyhessian.PyHessianAdapter`, imported on use).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from . import flat as _flat
from .collective import any_flag, hvp_group, mean_all_reduce, refuse_sharded, unwrap
from .._checks import check_choice, check_int, check_real, require_int
from .kernels import double_backward_kernels
from ..core.registry import Registry
from .lanczos import _REORTH, _check_tol, _generator, hutchinson_trace, lanczos, top_eigenvalues

__all__ = ["Density", "smooth_density", "slq_density", "error_proxy", "positive_fraction", "Spectrum",
           "hessian_spectrum", "SPECTRUM_BACKENDS"]


@dataclass
class Density:
    """A Hessian spectral density.

    ``grid``/``values``: the Gaussian-smoothed density on the grid (``Σ values·Δ = 1``).
    ``nodes``/``weights``: the raw SLQ quadrature pooled over runs (weights sum to 1), which
    :func:`error_proxy` and :func:`positive_fraction` can use directly.
    """

    grid: np.ndarray
    values: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    sigma: float
    runs: int = 1
    steps: int = 0
    reorthogonalize: Optional[str] = "full"   # what the Lanczos runs did (None: the basis did not fit)

    def cdf(self, x) -> np.ndarray:
        """Quadrature CDF ``Σ_{nodes ≤ x} weights``."""
        order = np.argsort(self.nodes)
        cw = np.cumsum(self.weights[order])
        idx = np.searchsorted(self.nodes[order], np.asarray(x, dtype=np.float64), side="right")
        return np.where(idx > 0, cw[np.maximum(idx - 1, 0)], 0.0)

    def as_dict(self) -> dict:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self.__dict__.items()}


def _check_sigma(sigma) -> Optional[float]:
    if sigma is None:
        return None
    return check_real(sigma, "sigma", 0.0, low_open=True, hint=" (kernel width in eigenvalue units) or None")


def smooth_density(nodes, weights, *, grid: int = 256, sigma: Optional[float] = None, steps: Optional[int] = None,
                   margin: float = 0.05, runs: int = 1) -> Density:
    """Gaussian-smoothed density of a quadrature measure on ``grid`` points.

    The grid spans the nodes plus ``margin`` of their range on each side.  Default ``sigma`` is the
    kernel of the authors' code (Papyan's ``LanczosApproxSpec``, κ = 1.25): on the spectrum mapped to
    [−1, 1], σ = h / √(8 ln κ) with h = 2 / (steps − 1), i.e. in eigenvalue units
    σ = range / ((steps − 1) √(8 ln 1.25)).
    """
    nodes = np.asarray(nodes, dtype=np.float64).reshape(-1)
    weights = np.asarray(weights, dtype=np.float64).reshape(-1)
    if nodes.shape != weights.shape or nodes.size == 0:
        raise ValueError("nodes and weights must be non-empty and of the same length")
    grid = check_int(grid, "grid", 2, hint=" (number of points)")
    if not np.all(np.isfinite(nodes)) or not np.all(np.isfinite(weights)):
        raise ValueError("nodes and weights must be finite")
    lo, hi = float(nodes.min()), float(nodes.max())
    span = hi - lo
    if span <= 1e-12 * max(abs(lo), abs(hi), 1.0):
        span = max(abs(hi), 1.0) * 1e-3
    lo, hi = lo - margin * span, hi + margin * span
    steps = int(steps) if steps is not None else max(nodes.size // max(runs, 1), 2)
    if sigma is None:
        sigma = (hi - lo) / (max(steps, 2) - 1) / math.sqrt(8 * math.log(1.25))
    else:
        sigma = _check_sigma(sigma)
    x = np.linspace(lo, hi, int(grid))
    vals = (weights[None, :] * np.exp(-0.5 * ((x[:, None] - nodes[None, :]) / sigma) ** 2)).sum(1)
    vals /= sigma * math.sqrt(2 * math.pi)
    dx = x[1] - x[0]
    mass = vals.sum() * dx
    if mass > 0:
        vals = vals / mass
    return Density(grid=x, values=vals, nodes=nodes, weights=weights, sigma=float(sigma), runs=runs, steps=steps)


def slq_density(hvp, n: int, *, steps: int = 64, runs: int = 1, grid: int = 256, sigma: Optional[float] = None,
                seed: int = 0, reorthogonalize: Optional[str] = "full", dtype: torch.dtype = torch.float64,
                device=None, max_basis_bytes: Optional[int] = None) -> Density:
    """Stochastic Lanczos quadrature: ``runs`` Lanczos runs of ``min(steps, n)`` steps from
    independent Rademacher vectors, pooled (each run weighted 1/runs) and smoothed
    (:func:`smooth_density`).  ``steps`` larger than n is reduced to n (reported in ``Density.steps``).
    A basis over ``max_basis_bytes`` (default :func:`~.lanczos.basis_budget`) is not stored: the runs
    go without reorthogonalisation and ``Density.reorthogonalize`` is ``None``.

    Args:
        hvp: The symmetric operator, ``v (n,) -> H v (n,)`` on torch tensors.
        n: Its dimension.
        steps: Lanczos steps per run.
        runs: Independent runs pooled.
        grid: Points of the smoothed density.
        sigma: Width of the Gaussian kernel (default: from the spectrum's range, see :func:`smooth_density`).
        seed: Seed of the Rademacher start vectors.
        reorthogonalize: ``"full"`` or ``None`` (see :func:`~.lanczos.lanczos`).
        dtype: The vectors' dtype.
        device: The vectors' device.
        max_basis_bytes: The memory cap of a stored basis described above.

    Returns:
        A :class:`Density`: the quadrature nodes and weights, the smoothed density and the HVPs spent.

    Raises:
        ValueError: An argument is out of range.
    """
    runs, steps = check_int(runs, "runs", 1), check_int(steps, "steps", 1)
    k = min(steps, int(n))
    gen = _generator(seed, None, device)
    nodes, weights, used = [], [], reorthogonalize
    for _ in range(int(runs)):
        lz = lanczos(hvp, n, k, generator=gen, dtype=dtype, device=device, reorthogonalize=reorthogonalize,
                     max_basis_bytes=max_basis_bytes)
        used = lz.reorthogonalize
        nd, wt = lz.quadrature()
        nodes.append(nd)
        weights.append(wt / runs)
    dens = smooth_density(np.concatenate(nodes), np.concatenate(weights), grid=grid, sigma=sigma, steps=k,
                          runs=int(runs))
    dens.reorthogonalize = used
    return dens



def _measure(spectrum, weights=None) -> tuple[np.ndarray, np.ndarray, str]:
    if isinstance(spectrum, Density):
        return spectrum.grid, spectrum.values, "density"
    if isinstance(spectrum, Spectrum):
        if spectrum.density is None:
            raise ValueError("spectrum: this Spectrum has no density (computed with density=False)")
        return spectrum.density.grid, spectrum.density.values, "density"
    if isinstance(spectrum, tuple) and len(spectrum) == 2:
        x, w = (np.asarray(t, dtype=np.float64).reshape(-1) for t in spectrum)
        if x.shape != w.shape:
            raise ValueError("spectrum: (nodes, weights) must have the same length")
        return x, w, "quadrature"
    if isinstance(spectrum, torch.Tensor):
        spectrum = spectrum.detach().cpu().double().numpy()
    try:
        x = np.asarray(spectrum, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise TypeError("spectrum must be a Density, a Spectrum, a (nodes, weights) pair or an array of "
                        "eigenvalues") from exc
    return x, np.ones_like(x), "eigenvalues"


def error_proxy(spectrum, lr: float, t, cutoff: float = 0.4):
    """The error proxy of Eq. III.14–III.15 at step(s) ``t`` (scalar -> float, array -> array).

    ``spectrum`` (eigenvalues λ of the Hessian, mapped to ``a = −lr·λ``):
      - a :class:`Density` / :class:`Spectrum` — density form: the smoothed density sampled on its
        grid (256 points, as the paper): ``Σ_{|a_j| ≥ c} p_j |1 + a_j|^t / Σ_{|a_j| ≥ c} p_j``;
      - ``(nodes, weights)`` — the same with a quadrature measure;
      - an array of eigenvalues — exact form: mean of ``|1 + a|^t`` over the eigenvalues with
        ``|a| ≥ c``.
    Where nothing remains after the cutoff (N_c = 0: every mode has ``|lr·λ| < c``) the proxy is
    defined as 1 for every t — the level of a classical step, as in the paper's Fig. 2c.  Values
    that overflow float64 are returned as ``inf``.

    Args:
        spectrum: One of the three forms above.
        lr: The learning rate ``η``.
        t: A step count ``≥ 0`` or an array of them.
        cutoff: The cutoff ``c`` of Eq. III.14.

    Returns:
        The proxy at ``t``: a float for a scalar ``t``, an array of ``t``'s shape otherwise.

    Raises:
        TypeError: ``spectrum`` is none of the three forms.
        ValueError: A non-finite spectrum, negative weights or a negative ``t``.

    Example:
        >>> import numpy as np
        >>> error_proxy(np.array([1.0, 5.0, 15.0]), lr=0.1, t=[0, 1, 2])   # a = −0.1 (under c), −0.5, −1.5
        array([1.  , 0.5 , 0.25])
    """
    x, p, _ = _measure(spectrum)
    lr = check_real(lr, "lr", 0.0, low_open=True)
    cutoff = check_real(cutoff, "cutoff", 0.0)
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(p))) or np.any(p < 0):
        raise ValueError("spectrum must be finite with non-negative weights")
    tt = np.asarray(t, dtype=np.float64)
    if not np.all(np.isfinite(tt)) or np.any(tt < 0):
        raise ValueError(f"t must be finite and >= 0 (steps), got {t!r}")
    a = -float(lr) * x
    keep = (np.abs(a) >= cutoff) & (p > 0)
    if not keep.any():
        out = np.ones_like(tt)
        return float(out) if out.ndim == 0 else out
    import scipy.special

    with np.errstate(divide="ignore", over="ignore"):
        la = np.log(np.abs(1.0 + a[keep]))
        lw = np.log(p[keep]) - np.log(p[keep].sum())
        flat = tt.reshape(-1)
        res = np.empty_like(flat)
        for i, ti in enumerate(flat):
            if ti == 0:
                res[i] = 1.0
            else:
                res[i] = np.exp(scipy.special.logsumexp(lw + ti * la))
    res = res.reshape(tt.shape)
    return float(res) if res.ndim == 0 else res


def positive_fraction(spectrum, zero_tol: float = 1e-3, *, flat_below: float = 0.0) -> float:
    """Fraction of the spectral mass on positive (dissipative) eigenvalues, ignoring the flat band
    ``|λ| ≤ max(zero_tol·max|λ|, flat_below)`` (neither dissipative nor divergent).  A :class:`Density`
    uses its raw quadrature; an array counts eigenvalues.  ``1.0`` when everything lies in the flat band.

    Args:
        spectrum: A :class:`Density`, a :class:`Spectrum`, a ``(nodes, weights)`` pair or an array of eigenvalues.
        zero_tol: The flat band's width relative to ``max|λ|``.
        flat_below: The flat band's absolute width.

    Returns:
        The fraction in ``[0, 1]``.

    Example:
        >>> import numpy as np
        >>> positive_fraction(np.array([-1.0, 2.0, 3.0, 1e-9]))     # 1e-9 lies in the flat band
        0.6666666666666666
    """
    if isinstance(spectrum, Spectrum):
        spectrum = spectrum.density
    if isinstance(spectrum, Density):
        x, p = spectrum.nodes, spectrum.weights
    else:
        x, p, _ = _measure(spectrum)
    zt = check_real(zero_tol, "zero_tol", 0.0, 1.0, high_open=True)
    fb = check_real(flat_below, "flat_below", 0.0)
    tau = max(zt * float(np.abs(x).max()) if x.size else 0.0, fb)
    nz = np.abs(x) > tau
    tot = p[nz].sum()
    return 1.0 if tot <= 0 else float(p[nz & (x > 0)].sum() / tot)


@dataclass
class Spectrum:
    """Hessian spectrum of a loss on a batch: top eigenvalues (descending), Hutchinson trace, density."""

    top_eigenvalues: np.ndarray
    trace: Optional[float]
    density: Optional[Density]
    n: int
    backend: str
    seconds: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"top_eigenvalues": np.asarray(self.top_eigenvalues).tolist(), "trace": self.trace,
                "density": None if self.density is None else self.density.as_dict(), "n": self.n,
                "backend": self.backend, "seconds": dict(self.seconds)}



@double_backward_kernels()      # its forward is differentiated twice: math attention, compiled code eager
def hessian_spectrum(model: nn.Module, loss_fn: Callable, batch, *, backend: str = "torch", support=None,
                     params=None, top_k: int = 1, trace_samples: int = 100, steps: int = 64, runs: int = 1,
                     grid: int = 256, sigma: Optional[float] = None, seed: int = 0,
                     reorthogonalize: Optional[str] = "full", density: bool = True, trace: bool = True,
                     which: Optional[str] = None, eig_iters: int = 100, tol: float = 1e-3,
                     process_group=None) -> Spectrum:
    """Top eigenvalues, Hutchinson trace and SLQ density of the Hessian of
    ``loss_fn(model(inputs), targets)`` on ``batch = (inputs, targets)``.

    The model is evaluated in its *current* mode (a BatchNorm in training mode uses the batch
    statistics, as in training); running buffers, modes and ``.grad`` are left exactly as they were.
    ``backend="torch"``: Lanczos / Hutchinson of this module on double-backward HVPs (support
    restriction allowed); ``top_eigenvalues`` ordered by ``which`` (default ``"algebraic"``, see
    :func:`top_eigenvalues`).  ``backend="pyhessian"``: :class:`PyHessianAdapter` — power iteration
    (``eig_iters`` and PyHessian's relative tolerance ``tol``; it finds the largest ``|λ|``, so
    ``which`` must be ``"magnitude"``, the default there), PyHessian's trace loop (``trace_samples``
    at most, ``tol``) and its fully
    reorthogonalised Lanczos (``steps``, ``runs``); the whole parameter vector only.  Densities of
    both backends go through :func:`smooth_density`.  The forward runs under
    :func:`~torch_qode.bridge.kernels.double_backward_kernels` (attention layers, compiled models).

    Under torch.distributed, with a DistributedDataParallel ``model`` or ``process_group=``, each rank
    passes its shard of the batch and every Hessian-vector product is averaged over the ranks (as DDP
    averages gradients): the spectrum is the global batch's (equal shards, a per-sample mean loss, no
    training-mode BatchNorm), the same on every rank.  Every rank of the group must call it.  DDP's
    ``.module`` runs the forward.  ``backend="torch"`` only; sharded (FSDP) parameters are refused.

    Args:
        model: The module (or its DDP wrapper) whose loss Hessian is analysed.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        batch: ``(inputs, targets)``.
        backend: A name in ``SPECTRUM_BACKENDS``: ``"torch"`` or ``"pyhessian"``.
        support: Flat indices of the parameters the Hessian is restricted to (``backend="torch"``).
        params: The parameters (default: the model's).
        top_k: How many top eigenvalues.
        trace_samples: Hutchinson samples of the trace.
        steps: Lanczos steps per SLQ run.
        runs: SLQ runs.
        grid: Points of the smoothed density.
        sigma: Width of its Gaussian kernel (default: from the spectrum's range).
        seed: Seed of the random start vectors.
        reorthogonalize: ``"full"`` or ``None``.
        density: Whether to compute the SLQ density.
        trace: Whether to compute the trace.
        which: ``"algebraic"`` or ``"magnitude"`` (see :func:`top_eigenvalues`).
        eig_iters: Power iterations (``backend="pyhessian"``).
        tol: PyHessian's relative tolerance.
        process_group: The torch.distributed group the products are averaged over.

    Returns:
        A :class:`Spectrum`: the top eigenvalues, the trace and the density, with the HVPs and seconds spent.

    Raises:
        ValueError: An unknown ``backend`` or ``which``, an argument out of range, or an option the backend
            does not support.
    """
    impl = SPECTRUM_BACKENDS.lookup(backend, "backend")
    if which is None:
        which = impl.default_which
    check_choice(which, "which", ("algebraic", "magnitude"))
    impl.refuse(which=which)
    _flat.check_model_loss_batch(model, loss_fn, batch, ("model", "loss_fn", "batch"))
    top_k, trace_samples, steps, runs, grid, eig_iters = (
        check_int(v, name, lo) for name, v, lo in (
            ("top_k", top_k, 1), ("trace_samples", trace_samples, 1), ("steps", steps, 1), ("runs", runs, 1),
            ("grid", grid, 2), ("eig_iters", eig_iters, 1)))
    sigma, tol = _check_sigma(sigma), _check_tol(tol)
    seed = 0 if seed is None else require_int(seed, "seed", "an integer or None (= 0)")
    check_choice(reorthogonalize, "reorthogonalize", _REORTH)
    group = hvp_group(model, process_group)
    model = unwrap(model)
    _flat.check_no_torch_prune(model)
    params = _flat.param_list(model if params is None else params)
    refuse_sharded(params, model=model)
    impl.refuse(group=group)
    return impl(model, loss_fn, batch, params, support=support, group=group, top_k=top_k, trace=trace,
                density=density, trace_samples=trace_samples, steps=steps, runs=runs, grid=grid, sigma=sigma,
                seed=seed, reorthogonalize=reorthogonalize, which=which, eig_iters=eig_iters, tol=tol)


class _TorchSpectrum:
    """Backend ``"torch"``: this package's Lanczos / Hutchinson on double-backward HVPs (a support allowed;
    under torch.distributed every product averaged over the ranks)."""

    default_which = "algebraic"

    @staticmethod
    def refuse(which: Optional[str] = None, group=None) -> None:
        """Nothing to refuse: every ``which`` and process group works."""

    def __call__(self, model: nn.Module, loss_fn: Callable, batch, params: list, *, support, group, top_k: int,
                 trace: bool, density: bool, trace_samples: int, steps: int, runs: int, grid: int,
                 sigma: Optional[float], seed: int, reorthogonalize: Optional[str], which: str, eig_iters: int,
                 tol: float) -> "Spectrum":
        """The spectrum (arguments checked by :func:`hessian_spectrum`; ``eig_iters`` and ``tol`` unused).

        Returns:
            The :class:`Spectrum`; the expansion is released before it returns.

        Raises:
            ValueError: ``top_k`` larger than the number of parameters on the support.
            RuntimeError: the expansion failed on another rank.
        """
        from .taylor import TaylorExpansion

        secs = {}
        t0 = time.perf_counter()
        exp, failed = None, None
        try:
            exp = TaylorExpansion.from_model(model, loss_fn, batch, lr=1.0, params=params, support=support, degree=1,
                                             backend="double_backward")
        except Exception as exc:                     # e.g. a non-finite loss on this rank's shard
            failed = exc
        if any_flag(failed is not None, group):
            if failed is not None:
                raise failed
            exp.release()
            raise RuntimeError("hessian_spectrum: the expansion failed on another rank (see its error)")
        secs["setup"] = time.perf_counter() - t0
        try:
            n, dt, dev = exp.n, exp.dtype, exp.device
            if top_k > n:
                raise ValueError(f"top_k must be an integer in 1..n = 1..{n}, got {top_k}")
            hvp = exp.hvp if group is None else (lambda V: mean_all_reduce(exp.hvp(V), group))
            t0 = time.perf_counter()
            top = top_eigenvalues(hvp, n, top_k, which=which, seed=seed, dtype=dt, device=dev)
            secs["top"] = time.perf_counter() - t0
            tr = None
            if trace:
                t0 = time.perf_counter()
                tr = hutchinson_trace(hvp, n, samples=trace_samples, seed=seed, dtype=dt, device=dev)
                secs["trace"] = time.perf_counter() - t0
            dens = None
            if density:
                t0 = time.perf_counter()
                dens = slq_density(hvp, n, steps=steps, runs=runs, grid=grid, sigma=sigma, seed=seed,
                                   reorthogonalize=reorthogonalize, dtype=dt, device=dev)
                secs["density"] = time.perf_counter() - t0
        finally:
            exp.release()
        return Spectrum(top_eigenvalues=top, trace=tr, density=dens, n=n, backend="torch", seconds=secs)


class _PyHessianSpectrum:
    """Backend ``"pyhessian"``: :class:`~.pyhessian.PyHessianAdapter` (imported on use) — power iteration,
    its trace loop and its Lanczos, on the whole parameter vector of one process."""

    default_which = "magnitude"

    @staticmethod
    def refuse(which: Optional[str] = None, group=None) -> None:
        """Refuse what PyHessian cannot do.

        Args:
            which: the eigenvalue order asked for (``None``: not checked here).
            group: the process group the products would be averaged over (``None``: one process).

        Raises:
            ValueError: ``which`` other than ``"magnitude"``, or a process group.
        """
        if which is not None and which != "magnitude":
            raise ValueError("backend='pyhessian' finds eigenvalues by power iteration, i.e. by magnitude: "
                             "use which='magnitude' or backend='torch'")
        if group is not None:
            raise ValueError("backend='pyhessian' computes each rank's own Hessian: under torch.distributed use "
                             "backend='torch', whose products are averaged over the ranks")

    def __call__(self, model: nn.Module, loss_fn: Callable, batch, params: list, *, support, group, top_k: int,
                 trace: bool, density: bool, trace_samples: int, steps: int, runs: int, grid: int,
                 sigma: Optional[float], seed: int, reorthogonalize: Optional[str], which: str, eig_iters: int,
                 tol: float) -> "Spectrum":
        """The spectrum (arguments checked by :func:`hessian_spectrum`; ``group``, ``which`` and
        ``reorthogonalize`` unused: PyHessian's Lanczos reorthogonalises fully).

        Returns:
            The :class:`Spectrum`.

        Raises:
            ValueError: a ``support``, or ``top_k`` larger than the number of parameters.
        """
        secs = {}
        if support is not None:
            raise ValueError("support restriction is only available with backend='torch' (PyHessian works on "
                             "the whole parameter vector)")
        n = _flat.numel(params)
        if top_k > n:
            raise ValueError(f"top_k must be an integer in 1..n = 1..{n}, got {top_k}")
        k = min(steps, n)
        from .pyhessian import PyHessianAdapter   # on use: `import torch_qode` does not load pyhessian
        h = PyHessianAdapter(model, loss_fn, data=batch, params=params, seed=seed)
        t0 = time.perf_counter()
        top = np.asarray(h.eigenvalues(maxIter=eig_iters, tol=tol, top_n=top_k)[0], dtype=np.float64)
        secs["top"] = time.perf_counter() - t0
        tr = None
        if trace:
            t0 = time.perf_counter()
            tr = float(np.mean(h.trace(maxIter=trace_samples, tol=tol)))
            secs["trace"] = time.perf_counter() - t0
        dens = None
        if density:
            t0 = time.perf_counter()
            ev, wt = h.density(iter=k, n_v=runs)
            dens = smooth_density(np.concatenate(ev), np.concatenate(wt) / runs, grid=grid, sigma=sigma, steps=k,
                                  runs=runs)
            secs["density"] = time.perf_counter() - t0
        del h
        return Spectrum(top_eigenvalues=top, trace=tr, density=dens, n=n, backend="pyhessian", seconds=secs)


#: :func:`hessian_spectrum`'s backends, ``backend=`` name -> the object that checks and computes
SPECTRUM_BACKENDS = Registry("spectrum backend", {"torch": _TorchSpectrum(), "pyhessian": _PyHessianSpectrum()})


