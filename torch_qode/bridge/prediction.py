"""The window's predicted linearisation error: what the upload can measure of it (issue 22).

A window of order N runs ``u(t+1) = u(t) + F0(t) + f(u(t))`` with ``f(u) = Σ_k F_k u^⊗k`` expanded
at θ0 on the upload batch (Eq. II.1, V.5); gradient descent on S runs the same step plus what the
expansion leaves out, ``ξ_t(w) = −η[∇L_t(θ0 + w) − ∇L_t(θ0)] − f(w) − η·wd·w``.  Their difference
``e = w − u`` obeys ``e(t+1) = (I + F1) e(t) + ξ_t(w(t)) + O(‖e‖²)`` and, with ``I + F1`` taken as
``I`` (it contracts the dissipative directions, so this bounds them from above),
``e(T) ≈ Σ_{t<T} ξ_t(w(t))``.  Two sources make ``ξ``:

* **the remainder** ``ξ_0``: the upload batch's own Taylor remainder (third order and up at N = 1),
  ``∝ ‖w‖^{N+1}``; the same every step (it adds coherently);
* **the curvature noise** ``ξ_t − ξ_0 ≈ −η(H_t − H_0)w``: batch t's Hessian is not the upload's,
  ``∝ ‖w‖``.  ``H_t − H_0 = (H_t − H̄) − (H_0 − H̄)``: half its variance is the upload batch's own
  deviation, common to every step (coherent), half is batch t's (independent between steps, adds in
  quadrature).

Both are measured on the predicted path, the frozen-F0 path ``u(t) = Σ_{s<t} (I + F1)^s F0(0)``
computed in the Krylov space of ``F1`` started at ``F0(0)`` (:func:`krylov_path`), at two probe points
``u(T)`` and ``u(⌈T/2⌉)``: the remainder on the upload batch (two gradients), the noise on the
window's first new batch (two more, :meth:`Prediction.complete`).  The predicted relative error at
window length τ is (:func:`error_curve`, ``s_t = ‖u(t)‖``, ``ρ`` and ``ν`` the two norms at probe ``p``)::

    E(τ)² = (ρ Σ_{t<τ} (s_t/s_p)^{N+1})² + ν²/2 [(Σ_{t<τ} s_t/s_p)² + Σ_{t<τ} (s_t/s_p)²],   rel(τ) = E(τ)/s_τ

The two probes give two curves; the prediction is the far probe's and its margin their difference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

#: Lanczos steps of the quadrature that carries a source through ``I + F1`` (:func:`error_curve`), at most
SPECTRUM_STEPS = 3

__all__ = ["Probe", "KrylovPath", "krylov_path", "error_curve", "power_law", "Prediction", "predict", "rounded"]


@dataclass
class Probe:
    """What the upload lends the prediction (vectors on S, float64).

    Attributes:
        f0: ``F0(0) = −η(∇L_0(θ0) + wd·θ0)``, the upload batch's first step.
        step: ``u -> −η(∇L_0(θ0 + u) + wd·(θ0 + u))``: gradient descent's step at ``θ0 + u`` on the
            upload batch (one gradient evaluation), or ``None`` (the remainder is not measured).
        higher: ``u -> Σ_{k≥2} F_k u^⊗k``, the window's terms beyond F1 (``None`` at degree 1); the
            window's step beyond ``F0`` is ``−η·hvp(u)`` plus these.
        degree: The window's Taylor degree (the remainder scales as ``‖u‖^{degree+1}``).
    """

    f0: torch.Tensor
    step: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    higher: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    degree: int = 1


@dataclass
class KrylovPath:
    """The frozen-F0 path ``u(t) = Σ_{s<t} (I − ηA)^s F0`` from an m-step Lanczos run on ``A`` (the
    Hessian on S plus weight decay) started at ``F0``.

    Attributes:
        norms: ``‖u(t)‖`` for t = 0..T.
        coeffs: ``(m, T+1)``: ``u(t) = Q coeffs[:, t]``.
        basis: the ``m`` orthonormal Lanczos vectors ``Q`` (``None`` once :func:`predict` has its probe
            points: nothing after the upload reads it).
        nodes: Ritz values of ``A`` (its eigenvalues as ``F0`` sees them).
        weights: Their Gauss weights (``F0``'s spectral measure, summing to 1).
        hvps: Products of ``A`` taken.
    """

    norms: np.ndarray
    coeffs: np.ndarray
    basis: Optional[list]
    nodes: np.ndarray
    weights: np.ndarray
    hvps: int

    def at(self, t: int) -> torch.Tensor:
        """``u(t)``, a vector on S (float64)."""
        out = torch.zeros(self.basis[0].shape, dtype=torch.float64, device=self.basis[0].device)
        for q, c in zip(self.basis, self.coeffs[:, t]):
            out.add_(q, alpha=float(c))
        return out


def krylov_path(hvp: Callable[[torch.Tensor], torch.Tensor], f0: torch.Tensor, lr: float, T: int,
                steps: int, dtype: torch.dtype = torch.float64) -> KrylovPath:
    """The frozen-F0 path over t = 0..T in the Krylov space ``K_m(A, F0)`` (full reorthogonalisation).

    ``(I − ηA)^s F0`` lies in ``K_{s+1}``: the path is exact while ``t ≤ m`` and, beyond, as accurate as
    the best degree-``m−1`` polynomial fit of ``(1 − (1 − ηλ)^t)/(ηλ)`` on the spectrum (smooth: a few
    steps suffice).

    Args:
        hvp: ``v -> A v`` for the symmetric ``A`` (``F1 = −ηA``).
        f0: ``F0(0)`` on S.
        lr: ``η``.
        T: The window length.
        steps: Lanczos steps ``m`` (at most ``n``; fewer when the space closes).
        dtype: The Lanczos vectors' dtype (float32 halves the basis of a large model; α, β and the
            path's coefficients are float64 either way).

    Returns:
        The :class:`KrylovPath`.

    Raises:
        FloatingPointError: A product was not finite.
    """
    v = f0.to(dtype)
    beta0 = float(torch.linalg.vector_norm(f0.to(torch.float64)))
    n = v.numel()
    if beta0 == 0.0 or not math.isfinite(beta0):
        return KrylovPath(np.zeros(T + 1), np.zeros((0, T + 1)), [], np.zeros(0), np.zeros(0), 0)
    Q = [v / beta0]
    alphas, betas = [], []
    for j in range(min(int(steps), n)):
        w = hvp(Q[j]).to(dtype, copy=True).reshape(-1)
        if not bool(torch.isfinite(w).all()):
            raise FloatingPointError("hvp produced non-finite values on the predicted path")
        alphas.append(float(torch.dot(w.double(), Q[j].double())))
        for _ in range(2):                       # full reorthogonalisation, twice (DGKS), in place
            for q in Q:
                w.sub_(q, alpha=float(torch.dot(q, w)))
        beta = float(torch.linalg.vector_norm(w))
        if j == min(int(steps), n) - 1 or beta <= 1e-12 * max(abs(a) for a in alphas + [1e-300]):
            break
        betas.append(beta)
        Q.append(w / beta)
    m = len(alphas)
    Tm = np.diag(alphas) + np.diag(betas[:m - 1], 1) + np.diag(betas[:m - 1], -1)
    lam, W = np.linalg.eigh(Tm)
    a = 1.0 - lr * lam                            # eigenvalues of I + F1 in the Krylov space
    t = np.arange(T + 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        geo = np.where(np.abs(lr * lam)[:, None] > 1e-12, (1.0 - a[:, None] ** t) / (lr * lam)[:, None],
                       t[None, :].astype(float))   # Σ_{s<t} a^s
    coeffs = beta0 * (W @ (W[0][:, None] * geo))
    return KrylovPath(np.linalg.norm(coeffs, axis=0), coeffs, Q[:m], lam, W[0] ** 2, m)


def _propagated(y: np.ndarray, a: np.ndarray, power: int = 1) -> np.ndarray:
    """``S_j(τ) = Σ_{t<τ} a_j^{power·(τ−1−t)} y_t`` for τ = 0..T, every node j: ``(k, T+1)``."""
    S = np.zeros((a.size, y.size))
    ap = a ** power
    for tau in range(1, y.size):
        S[:, tau] = ap * S[:, tau - 1] + y[tau - 1]
    return S


def error_curve(norms: np.ndarray, remainder: np.ndarray, noise: np.ndarray, lr: float = 0.0,
                remainder_spectrum: Optional[tuple] = None, noise_spectrum: Optional[tuple] = None) -> np.ndarray:
    """The predicted relative linearisation error ``rel(τ) = E(τ)/s_τ`` for τ = 0..T (module docstring).

    Each source is carried to τ by ``I + F1`` in the Gauss quadrature of its own direction
    (``(nodes, weights)`` of the Hessian as that vector sees it: a dissipative mode forgets what was
    added long ago, ``Σ_t (1 − ηλ)^{τ−1−t} → 1/(ηλ)``); without one, ``I + F1 = I``.  The remainder and
    the common half of the noise add coherently over the steps, the other half of the noise in quadrature.

    Args:
        norms: ``s_t = ‖w(t)‖``, the predicted displacement of gradient descent, t = 0..T.
        remainder: ``‖ξ_0(w(t))‖`` per t (the upload batch's Taylor remainder on the path).
        noise: ``‖ξ_1(w(t)) − ξ_0(w(t))‖`` per t (the curvature noise on the path; zeros: not measured).
        lr: ``η`` (with the spectra).
        remainder_spectrum: ``(nodes, weights)`` of the remainder's direction, or ``None``.
        noise_spectrum: ``(nodes, weights)`` of the noise's direction, or ``None``.

    Returns:
        ``rel[τ]`` (0 where ``s_τ = 0``).
    """
    s = np.asarray(norms, dtype=np.float64)

    def growth(spec):
        if spec is None or len(spec[0]) == 0:
            return np.ones(1), np.ones(1)
        return 1.0 - lr * np.asarray(spec[0], dtype=np.float64), np.asarray(spec[1], dtype=np.float64)

    ar, wr = growth(remainder_spectrum)
    an, wn = growth(noise_spectrum)
    D, N = np.asarray(remainder, dtype=np.float64), np.asarray(noise, dtype=np.float64)
    det = (wr[:, None] * _propagated(D, ar) ** 2).sum(0)
    common = 0.5 * (wn[:, None] * _propagated(N, an) ** 2).sum(0)
    independent = 0.5 * (wn[:, None] * _propagated(N ** 2, an, power=2)).sum(0)
    E = np.sqrt(det + common + independent)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(s > 0, E / np.where(s > 0, s, 1.0), 0.0)


def power_law(r: np.ndarray, r1: float, v1: float, v2: Optional[float], nominal: float) -> np.ndarray:
    """``v(r) = v1 (r/r1)^q`` through ``(r1, v1)`` and ``(r1/2, v2)``: ``q`` fitted (clipped to
    ``[1, nominal + 2]``), or ``nominal`` when ``v2`` is ``None`` or either value is 0."""
    q = nominal
    if v2 is not None and v1 > 0 and v2 > 0:
        q = min(max(math.log(v1 / v2) / math.log(2.0), 1.0), nominal + 2.0)
    r = np.asarray(r, dtype=np.float64)
    return v1 * (r / r1) ** q if r1 > 0 else np.zeros_like(r)


def rounded(x: float, digits: int = 2) -> float:
    """``x`` to ``digits`` significant digits: what a verdict compares, so that round-off far below
    that precision cannot flip it."""
    return float(f"{x:.{digits}g}") if math.isfinite(x) else x


@dataclass
class Prediction:
    """The predicted linearisation error of one window, built at the upload and completed at the
    window's first new batch (:meth:`complete`).

    The probes are two points on the ray of the frozen-F0 path's end, ``u(T)`` and ``u(T)/2``: the
    remainder (and the noise) measured at both give each its own power of ``‖u‖`` (nominally ``N+1``
    and 1), carried to the predicted displacement ``s_t`` (:meth:`norms`).  The margin is the curve's
    change when the nominal powers replace the fitted ones.

    Attributes:
        lr: ``η``.
        T: The window length asked for.
        degree: The window's degree ``N``.
        path: The frozen-F0 path (:class:`KrylovPath`).
        radius: ``‖u(T)‖``, the far probe's norm.
        points: The probe points (kept until :meth:`complete`).
        deltas: ``step(u_p) − F0(0)`` per probe (kept until :meth:`complete`, for the noise).
        rho: ``‖ξ_0(u_p)‖`` per probe (the remainder; empty when not measured).
        nu: ``‖ξ_1(u_p) − ξ_0(u_p)‖`` per probe (``None`` until :meth:`complete`).
        grads: Gradient evaluations spent (upload and next batch).
        hvps: Hessian-vector products spent.
        third_order: Products of the terms beyond F1 spent (``higher``, degree ≥ 2).
        remainder_spectrum: ``(nodes, weights)`` of the Hessian seen by the remainder's direction.
        noise_spectrum: The same for the noise's direction (after :meth:`complete`).
        f0: ``F0(0)``, kept until :meth:`complete`.
        spectrum_steps: Lanczos steps of each source's quadrature (0: F0's, the path's own, for both).
        gradient_noise: ``(‖m̂‖², σ²)``: the mean step's squared norm and the gradient noise per step
            (after :meth:`complete`; :meth:`norms`).
    """

    lr: float
    T: int
    degree: int
    path: KrylovPath
    radius: float = 0.0
    points: list = field(default_factory=list)
    deltas: list = field(default_factory=list)
    rho: list = field(default_factory=list)
    nu: Optional[list] = None
    grads: int = 0
    hvps: int = 0
    third_order: int = 0
    remainder_spectrum: Optional[tuple] = None
    noise_spectrum: Optional[tuple] = None
    f0: Optional[torch.Tensor] = None
    gradient_noise: Optional[tuple] = None
    spectrum_steps: int = SPECTRUM_STEPS

    @property
    def remainder_measured(self) -> bool:
        """Whether the remainder was measured (the probe had a ``step``)."""
        return bool(self.rho)

    @property
    def pending(self) -> bool:
        """The curvature noise is still to be measured (on the window's first new batch)."""
        return self.nu is None and self.remainder_measured and self.T >= 2

    def norms(self) -> np.ndarray:
        """``‖w(t)‖`` predicted, t = 0..T.

        The frozen-F0 path until :meth:`complete`; then the path of the mean step ``m ≈ (F0(0) + F0(1))/2``
        plus the random walk of the gradient noise ``σ² ≈ ‖F0(1) − F0(0)‖²/2`` per step, both carried by
        ``I + F1`` in F0(0)'s quadrature::

            s_t² = (‖m̂‖² − σ²/2)₊ Σ_j w_j p_t(λ_j)² + σ² Σ_j w_j Σ_{s<t} (1 − ηλ_j)^{2s},
            p_t(λ) = Σ_{s<t} (1 − ηλ)^s
        """
        if self.gradient_noise is None or not self.path.nodes.size:
            return self.path.norms
        mean2, sigma2 = self.gradient_noise
        a = 1.0 - self.lr * self.path.nodes
        w = self.path.weights
        ones = np.ones(self.T + 1)
        pt = _propagated(ones, a)                            # p_t(λ_j), (k, T+1)
        walk = _propagated(ones, a, power=2)                 # Σ_{s<t} a^{2s}
        s2 = max(mean2 - sigma2 / 2, 0.0) * (w[:, None] * pt ** 2).sum(0) + sigma2 * (w[:, None] * walk).sum(0)
        return np.sqrt(s2)

    def _sources(self, fitted: bool) -> tuple:
        """``(s, D, N)``: the predicted displacement and the two sources' magnitudes along it (their powers
        fitted through both probes, or the nominal ``N+1`` and 1)."""
        s, r1 = self.norms(), self.radius
        second = (lambda v: v[1] if fitted and len(v) > 1 else None)
        D = power_law(s, r1, self.rho[0], second(self.rho), self.degree + 1.0) if self.rho else np.zeros_like(s)
        N = power_law(s, r1, self.nu[0], second(self.nu), 1.0) if self.nu else np.zeros_like(s)
        return s, D, N

    def _curve(self, fitted: bool) -> np.ndarray:
        s, D, N = self._sources(fitted)
        return error_curve(s, D, N, self.lr, self.remainder_spectrum, self.noise_spectrum)

    def curve(self) -> np.ndarray:
        """The predicted relative error ``rel(τ)``, τ = 0..T (the noise taken as 0 while :attr:`pending`)."""
        return self._curve(True)

    def margin(self) -> np.ndarray:
        """The prediction's uncertainty per τ: the curve with the fitted powers against the nominal ones."""
        return np.abs(self._curve(True) - self._curve(False))

    def parts(self, at: Optional[int] = None) -> dict:
        """The two sources at ``at`` (default T), each alone: ``{"remainder": …, "noise": …}`` (relative)."""
        at = self.T if at is None else int(at)
        s, D, N = self._sources(True)
        zero = np.zeros_like(s)
        return {"remainder": float(error_curve(s, D, zero, self.lr, self.remainder_spectrum)[at]),
                "noise": float(error_curve(s, zero, N, self.lr, None, self.noise_spectrum)[at])}

    def complete(self, next_step: Callable[[torch.Tensor], torch.Tensor], next_f0: torch.Tensor,
                 hvp: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        """The curvature and gradient noise from the window's first new batch (a gradient evaluation per
        probe) and, with ``hvp`` (the upload batch's), the spectrum the noise's direction sees
        (:data:`SPECTRUM_STEPS` products).

        Args:
            next_step: ``u -> −η(∇L_1(θ0 + u) + wd·(θ0 + u))`` on that batch.
            next_f0: ``F0(1)``, that batch's step at θ0.
            hvp: ``v -> (H + wd·I) v`` on the upload batch, or ``None`` (the noise is not propagated).
        """
        f1 = next_f0.to(torch.float64)
        diffs = [next_step(u).to(torch.float64) - f1 - d0.to(torch.float64) for u, d0 in zip(self.points, self.deltas)]
        first = diffs[0] if diffs else None       # nothing changes before every gradient was taken
        self.grads += len(diffs)
        self.nu = [float(torch.linalg.vector_norm(d)) for d in diffs]
        if self.f0 is not None:
            f0 = self.f0.to(torch.float64)
            self.gradient_noise = (float(torch.linalg.vector_norm((f0 + f1) / 2)) ** 2,
                                   float(torch.linalg.vector_norm(f1 - f0)) ** 2 / 2)
        if hvp is not None and first is not None:
            self.noise_spectrum, k = _spectrum(hvp, first, self.spectrum_steps, self.path)
            self.hvps += k
        self.points, self.deltas, self.f0 = [], [], None      # nothing outlives the measurement

    def choose_T(self, max_error: float) -> int:
        """The largest τ ≤ T up to which the predicted error stays within ``max_error`` (compared at
        :func:`rounded` precision); 0 when already ``rel(1)`` exceeds it."""
        c = self.curve()
        ok = 0
        for tau in range(1, len(c)):
            if rounded(float(c[tau])) > max_error:
                break
            ok = tau
        return ok

    def state_dict(self) -> dict:
        """The prediction as tensors and plain values (a resume between the upload and :meth:`complete`;
        the path's basis is not kept: nothing after the upload reads it)."""
        def arr(x):
            return None if x is None else torch.as_tensor(np.asarray(x, dtype=np.float64))

        spec = (lambda sp: None if sp is None else (arr(sp[0]), arr(sp[1])))
        return {"lr": self.lr, "T": self.T, "degree": self.degree, "radius": self.radius,
                "path": {"norms": arr(self.path.norms), "nodes": arr(self.path.nodes),
                         "weights": arr(self.path.weights), "hvps": self.path.hvps},
                "points": [u.clone() for u in self.points], "deltas": [d.clone() for d in self.deltas],
                "rho": list(self.rho), "nu": None if self.nu is None else list(self.nu), "grads": self.grads,
                "hvps": self.hvps, "third_order": self.third_order, "remainder_spectrum": spec(self.remainder_spectrum),
                "noise_spectrum": spec(self.noise_spectrum), "f0": None if self.f0 is None else self.f0.clone(),
                "gradient_noise": self.gradient_noise, "spectrum_steps": self.spectrum_steps}

    @classmethod
    def from_state_dict(cls, sd: dict, device=None) -> "Prediction":
        """The prediction :meth:`state_dict` saved (its vectors on ``device``)."""
        def arr(x):
            return None if x is None else np.asarray(torch.as_tensor(x).cpu(), dtype=np.float64)

        spec = (lambda sp: None if sp is None else (arr(sp[0]), arr(sp[1])))
        P = sd["path"]
        path = KrylovPath(arr(P["norms"]), np.zeros((0, len(P["norms"]))), None, arr(P["nodes"]), arr(P["weights"]),
                          int(P["hvps"]))
        mv = (lambda t: None if t is None else t.to(device))
        return cls(float(sd["lr"]), int(sd["T"]), int(sd["degree"]), path, float(sd["radius"]),
                   [mv(u) for u in sd["points"]], [mv(d) for d in sd["deltas"]], list(sd["rho"]),
                   None if sd["nu"] is None else list(sd["nu"]), int(sd["grads"]), int(sd["hvps"]),
                   int(sd["third_order"]), spec(sd["remainder_spectrum"]), spec(sd["noise_spectrum"]), mv(sd["f0"]),
                   None if sd["gradient_noise"] is None else tuple(sd["gradient_noise"]),
                   int(sd["spectrum_steps"]))

    def as_dict(self, at: Optional[int] = None) -> dict:
        """The prediction as plain values (for the report; its parts at ``at``, default T)."""
        return {"predicted_error": self.curve().tolist(), "predicted_margin": self.margin().tolist(),
                "predicted_parts": self.parts(at), "predicted_displacement": self.norms().tolist(),
                "remainder_norm": list(self.rho), "noise_norm": None if self.nu is None else list(self.nu),
                "noise_measured": self.nu is not None, "remainder_measured": self.remainder_measured,
                "check_grads": self.grads, "check_third_order": self.third_order}


def predict(hvp: Callable[[torch.Tensor], torch.Tensor], probe: Probe, lr: float, T: int, steps: int,
            spectrum_steps: int = SPECTRUM_STEPS, dtype: torch.dtype = torch.float64) -> Prediction:
    """The upload's part of the prediction: the path (``steps`` Lanczos products) and, when the probe
    has a ``step``, the remainder at ``u(T)`` and ``u(T)/2`` (two gradients, two products of the model,
    :data:`SPECTRUM_STEPS` for its direction).

    Args:
        hvp: ``v -> A v`` (the Hessian on S plus weight decay).
        probe: The upload's :class:`Probe`.
        lr: ``η``.
        T: The window length.
        steps: Lanczos steps for the path.
        spectrum_steps: Lanczos steps of each source's quadrature (0: F0's, from the path).
        dtype: The Lanczos vectors' dtype (:func:`krylov_path`).

    Returns:
        The :class:`Prediction` (pending its noise when ``T ≥ 2`` and the remainder was measured).
    """
    path = krylov_path(hvp, probe.f0, lr, T, steps, dtype)
    pred = Prediction(float(lr), int(T), int(probe.degree), path, radius=float(path.norms[-1]), hvps=path.hvps,
                      spectrum_steps=int(spectrum_steps))
    if probe.step is None or T == 0 or pred.radius == 0.0:
        return pred
    f0 = probe.f0.to(torch.float64)
    far = path.at(T)
    first = None
    for u in (far, far / 2):
        delta = probe.step(u).to(torch.float64) - f0
        xi = delta + lr * hvp(u).to(torch.float64)
        if probe.higher is not None:
            xi -= probe.higher(u).to(torch.float64)
            pred.third_order += 1
        first = xi if first is None else first
        pred.points.append(u.to(dtype))        # kept until the first new batch: float32 for a large model
        pred.deltas.append(delta.to(dtype))
        pred.rho.append(float(torch.linalg.vector_norm(xi)))
        pred.grads += 1
        pred.hvps += 1
    pred.remainder_spectrum, k = _spectrum(hvp, first, pred.spectrum_steps, path)
    pred.hvps += k
    pred.f0 = f0.to(dtype)
    path.basis = None                          # m vectors of n: freed before the window builds its system
    return pred


def _spectrum(hvp: Callable[[torch.Tensor], torch.Tensor], v: torch.Tensor, steps: int, path: KrylovPath) -> tuple:
    """``((nodes, weights), products)``: the Gauss quadrature of the Hessian as ``v`` sees it (``steps``
    Lanczos steps; ``None`` for a zero vector), or with ``steps = 0`` F0's (``path``'s), for free."""
    if steps <= 0:
        return ((path.nodes, path.weights) if path.nodes.size else None), 0
    quad = krylov_path(hvp, v, 0.0, 0, steps)
    return ((quad.nodes, quad.weights) if quad.hvps else None), quad.hvps
