"""Simulated tomography of the sparse solution state (DESIGN.md step 7; paper Sec. II D).

The quantum solver ends with the state ``|v>/||v||`` of ``m = ceil(log2 n)`` qubits, where ``v`` is
the level-1 block of the Carleman solution at ``t = T`` (Eq. II.121–II.122).  The classical side
only learns what finitely many measurements reveal.  :func:`tomography` simulates that readout
faithfully, shot by shot (all randomness from one seeded :class:`numpy.random.Generator`):

1. **support** — computational-basis shots: a multinomial over the ``r`` non-zero components with
   Born probabilities ``p_a = v_a² / ||v||²``.  Whatever is observed is the support (weighted
   coupon collector, Eq. II.123); a component never observed reads as exactly 0, so tomography
   prunes.
2. **magnitudes** — ``|v̂_a| = ||v̂|| sqrt(c_a / S)`` from the same counts ``c_a`` (no extra shots).
3. **signs** — interference with a reference component (the most-observed one), see
   :func:`tomography` for the circuits; finite shots, exact Born probabilities.
4. **norm** — ``||v||`` is not in the state: it is read from a simulated success-probability
   measurement of the block encoding against its known constant ``norm_scale``, or given.

The simulator knows the truth, so the result also reports the error, the missed mass and the
sign errors, beside the paper's cost formulas (``O(r log r)`` draws for the support and
``O(m² r³ / ε²)`` shots for the shadow scheme of Sec. II D).

Cost: one pass over ``v`` to find its non-zeros, then ``O(r)`` work (numpy's multinomial and
binomial samplers are O(1) per category, independent of the number of shots), i.e. never
``O(n · shots)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Optional, Union

import numpy as np
import torch

from .._checks import check_real, expect_int, expect_real
from .._lazy import lazy_module
from .readout import SIGN_SCHEMES
from .readout import hadamard_signs as _hadamard_signs, pair_signs as _pair_signs  # noqa: F401

if TYPE_CHECKING:  # scipy.sparse loads on first use (issue 19)
    import scipy.sparse as sp
else:
    sp = lazy_module("scipy.sparse")

__all__ = ["tomography", "TomographyResult", "coupon_collector_expected_draws", "coupon_cost",
           "shadow_cost", "DEFAULT_SPLIT", "DEFAULT_SIGN_METHOD", "SIGN_METHODS", "SIGN_SCHEMES"]

#: Default share of a shot budget per stage (renormalised over the stages that actually run).
DEFAULT_SPLIT = {"support": 0.5, "signs": 0.4, "norm": 0.1}
#: Sign-stage circuits of :func:`tomography`: the registry of :mod:`torch_qode.core.readout`.
SIGN_METHODS = SIGN_SCHEMES
#: The default sign circuits: ``O(r log r)`` shots (``"pairs"`` needs ``O(r²)``).
DEFAULT_SIGN_METHOD = "hadamard"
_STAGES = ("support", "signs", "norm")


# ------------------------------------------------------------------------------- cost formulas
def coupon_cost(r: int) -> float:
    """Expected draws to collect ``r`` equally likely coupons, ``r · H_r`` (the ``O(r log r)`` of
    Sec. II D; Eq. II.123 with ``p_a = 1/r``, the minimum over all distributions on ``r`` items)."""
    r = _check_count(r, "r", minimum=0)
    if r == 0:
        return 0.0
    import scipy.special

    return float(r * (scipy.special.digamma(r + 1) + np.euler_gamma))


def shadow_cost(r: int, n: int, eps: float) -> float:
    """Shots of the Clifford-shadow amplitude estimation of Sec. II D, ``m² r³ / ε²`` with
    ``m = max(1, ceil(log2 n))`` qubits (logarithmic factors and constants set to 1).

    ``eps = 0`` gives ``inf`` (exact recovery needs infinitely many shots).
    """
    r = _check_count(r, "r", minimum=0)
    n = _check_count(n, "n", minimum=1)
    eps = check_real(eps, "eps", 0.0)
    m = qubits(n)
    if r == 0:
        return 0.0
    return math.inf if eps == 0 else float(m * m * r**3 / eps**2)


def coupon_collector_expected_draws(p) -> float:
    """Expected number of draws until every outcome of ``p`` has been seen at least once,
    Eq. (II.123):  ``E = ∫_0^∞ (1 − Π_a (1 − e^{−p_a y})) dy``, by :func:`scipy.integrate.quad`.

    ``p``: non-negative weights (numpy/torch/sequence), normalised here to sum 1; zero weights are
    dropped (they are not part of the support and are never collected).  For equal weights this
    is ``r · H_r`` (:func:`coupon_cost`).  The integrand is evaluated in log space,
    ``1 − exp(Σ_a log(−expm1(−p_a y)))``, so it stays accurate for ``r`` up to ~10⁵.

    Args:
        p: The outcome weights described above.

    Returns:
        The expected number of draws ``E``.

    Raises:
        ValueError: ``p`` has a negative or non-finite weight, or no positive one.

    Example:
        >>> round(coupon_collector_expected_draws([0.5, 0.5]), 10)    # 1 + 2: the second coupon takes 2
        3.0
        >>> round(coupon_collector_expected_draws([1, 1, 1]), 10), round(coupon_cost(3), 10)   # 3 (1 + 1/2 + 1/3)
        (5.5, 5.5)
    """
    if isinstance(p, torch.Tensor):
        p = p.detach().cpu().double().numpy()
    try:
        w = np.asarray(p, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"p must be a 1-D array of weights, got {type(p).__name__}") from exc
    if w.ndim != 1:
        raise ValueError(f"p must be 1-D, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("p contains non-finite entries (NaN or inf)")
    if np.any(w < 0):
        raise ValueError("p must be non-negative")
    w = w[w > 0]
    if w.size == 0:
        raise ValueError("p must have at least one positive weight")
    w = np.sort(w / w.sum())[::-1]
    if w.size == 1:
        return 1.0

    def integrand(y: float) -> float:
        with np.errstate(divide="ignore"):
            log_all = np.sum(np.log(-np.expm1(-w * y)))
        return float(-np.expm1(log_all))

    # The integrand is ~1 until the big coupons are in, then decays like Σ_a e^{−p_a y}; past
    # y_end every term is below 1e-16 of the total.  Break points on the time scales 1/p_a.
    r = w.size
    y_end = (math.log(r) + 40.0) / w[-1]
    points = np.unique(np.geomspace(1.0 / w[0], y_end, 48)[:-1])
    import scipy.integrate  # 0.14 s to import: on first use (issue 19)

    value, _ = scipy.integrate.quad(integrand, 0.0, y_end, points=points, limit=500,
                                    epsabs=0.0, epsrel=1e-10)
    return float(value)


# ------------------------------------------------------------------------------------- result
@dataclass
class TomographyResult:
    """Outcome of :func:`tomography`.

    Attributes:
        estimate: The reconstructed vector (numpy or torch, like the input; float64): zero off ``support``.
        support: Sorted indices of the components that were read out (observed, or kept by ``top_r``).
        shots: Shots per stage, ``{"support", "magnitudes", "signs", "norm", "total"}``; the magnitudes reuse the
            support counts (0 extra shots); all zero for exact readout.
        norm: The norm used for the estimate (``||v̂||`` before ``top_r`` pruning).
        norm_source: ``"measured"`` (success-probability measurement), ``"given"`` (``norm=`` a float) or ``"exact"``
            (``norm="exact"`` or exact readout).
        missed_mass: ``Σ v_a² / ||v||²`` over the true non-zeros never observed (the simulator knows it).
        pruned_mass: The same over components observed but dropped by ``top_r``.
        relative_error: ``||v̂ − v|| / ||v||``.
        sign_errors: Components of ``support`` whose estimated sign differs from the truth.
        reference: Index of the reference component of the ``"pairs"`` sign stage (the most-observed kept one; ``None``
            for exact readout and for ``"hadamard"``).
        n, r, m: Dimension, true number of non-zeros, qubits ``max(1, ceil(log2 n))``.
        coupon_cost: ``r' · H_{r'}`` expected support draws for ``r'`` equal weights (Sec. II D, Eq. II.123), with
            ``r' = top_r`` if given, else the true ``r``.
        shadow_cost: ``m² r'³ / ε²`` shots of the shadow scheme (Sec. II D) for the same ``r'``.
        shadow_eps: The ``ε`` in ``shadow_cost``: ``eps=`` if given (``eps_source = "requested"``), else the achieved
            ``relative_error`` (``"achieved"``; ``shadow_cost = inf`` when it is 0).  The paper's ε is a 1-norm error,
            ours a relative 2-norm error: an order-of-magnitude comparison only.
        split: The shares of ``shots`` actually used per stage.
        sign_method: ``"pairs"`` or ``"hadamard"`` (``None`` for exact readout).
    """

    estimate: Union[np.ndarray, torch.Tensor]
    support: np.ndarray
    shots: dict
    norm: float
    norm_source: str
    missed_mass: float
    pruned_mass: float
    relative_error: float
    sign_errors: int
    reference: Optional[int]
    n: int
    r: int
    m: int
    coupon_cost: float
    shadow_cost: float
    shadow_eps: float
    eps_source: str
    split: dict = field(default_factory=dict)
    sign_method: Optional[str] = None

    def as_dict(self, arrays: bool = True) -> dict:
        """All fields as a dict (copies of ``shots`` and ``split``).

        Args:
            arrays: ``False`` leaves out ``estimate`` and ``support`` and adds ``observed`` = the support
                size (for logging).

        Returns:
            One entry per field, keyed by the field's name.
        """
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["shots"] = dict(self.shots)
        out["split"] = dict(self.split)
        if not arrays:
            del out["estimate"], out["support"]
            out["observed"] = int(self.support.size)
        return out

    def __str__(self) -> str:
        return (f"TomographyResult(n={self.n}, r={self.r}, observed={self.support.size}, "
                f"shots={self.shots['total']}, rel_err={self.relative_error:.3g}, "
                f"missed_mass={self.missed_mass:.3g}, sign_errors={self.sign_errors}, "
                f"norm={self.norm_source})")


# ----------------------------------------------------------------------------------- tomography
def tomography(v, shots: Optional[int], seed=None, *, norm: Union[None, str, float] = None,
               norm_scale: Optional[float] = None, top_r: Optional[int] = None,
               eps: Optional[float] = None, split: Optional[Mapping[str, float]] = None,
               sign_method: str = DEFAULT_SIGN_METHOD) -> TomographyResult:
    """Read back a real vector ``v`` from the simulated state ``|v>/||v||`` with finite shots.

    Sign circuits, ``sign_method="pairs"``:
    The reference ``ref`` is the most-observed kept component (ties to the lower index).
    *Relative sign of* ``a``: a two-level Hadamard on ``span{|a>, |ref>}`` (``|a> -> (|a>+|ref>)/√2``,
    ``|ref> -> (|a>−|ref>)/√2``; CNOTs that make the two bit strings differ in one qubit, then a
    multi-controlled H, ``O(m)`` gates), then a computational-basis measurement.  Outcomes,
    drawn as one multinomial with the exact Born probabilities: ``+`` (``|a>``) with
    ``(v_a+v_ref)²/(2||v||²)``, ``−`` (``|ref>``) with ``(v_a−v_ref)²/(2||v||²)``, or
    "elsewhere".  ``sign(v_a v_ref) = sign(n₊ − n₋)`` (ties: +).
    *Global sign*: a Hadamard test of the state against the classically prepared ``r``-sparse
    state ``|ŵ>`` of the relative-sign estimate (ancilla-controlled state preparation; assumes
    controlled access to the solver), ``P(0) = (1 + <ŵ|v>/||v||)/2``; ``+`` if ``n₀ ≥ n₁``.
    Since ``<ŵ|v>/||v|| ≈ ±1`` a few shots settle it.  The sign shots are split evenly over the
    ``k`` circuits (1 global test + ``k − 1`` pairs), the remainder first to the global test,
    then to the pairs in decreasing count order; a pair with 0 shots reads ``+``.
    A pair shot is informative only when it lands on ``|a>`` or ``|ref>``, so a component of
    weight ``p_a`` needs ``≳ 1/p_a`` shots of its own: ``O(r²)`` sign shots in all.

    Sign circuits, ``sign_method="hadamard"``:
    One Hadamard test of the state against the classically prepared reference state
    ``|φ> = Σ_{a kept} φ_a |a>``, ``φ_a = sqrt(c_a / Σ c)`` the measured magnitudes (positive,
    ``O(r m)`` gates): ancilla ``|+>``, prepare ``|v>/||v||`` controlled on ``0`` and ``|φ>`` on
    ``1`` (controlled access to the solver), H on the ancilla, then measure ancilla and system.
    Outcomes, one multinomial: ``(a, 0)`` with ``(v_a/||v|| + φ_a)²/4``, ``(a, 1)`` with
    ``(v_a/||v|| − φ_a)²/4`` for each kept ``a``, or "elsewhere" (a component that is not kept).
    ``sign(v_a) = +`` iff ``n_{a,0} ≥ n_{a,1}``: signs are absolute (no global-sign test), and
    since ``φ_a ≈ |v_a|/||v||`` one hit on ``a`` nearly settles its sign — ``O(r log r)`` shots,
    like the support.

    Args:
        v: Real 1-D numpy array, torch tensor or sequence (the level-1 block at ``t = T``); finite, not all zero.  The
            estimate comes back as the same kind (float64; torch on ``v``'s device).
        shots: Total shot budget (a positive integer), divided over the stages by ``split``; ``None`` means exact
            readout (no noise: ``v`` itself, or ``v`` rescaled to ``norm=`` a float).
        seed: ``None``, an int or a :class:`numpy.random.Generator`; equal seeds give equal results.
        norm: ``None``: measure it (stage 4); ``"exact"``: use ``||v||`` (0 shots); a positive float: a known norm (0
            shots).
        norm_scale: The block encoding's known normalisation ``α ≥ ||v||`` for the measured norm: the circuit leaves its
            flag qubit in ``|0>`` with amplitude ``||v|| / α``, so ``P(success) = (||v||/α)²`` is sampled with the norm
            shots and ``||v̂|| = α sqrt(successes / shots)``. Default: the smallest power of two ``≥ ||v||``, our
            stand-in for the constant a real block encoding (an LCU or sparse-access normalisation) would know in
            advance (it keeps ``P(success)`` in ``(1/4, 1]``).  Sampling only: amplitude estimation, which would need
            ``O(1/ε)`` instead of ``O(1/ε²)`` shots, is not simulated.
        top_r: Keep only the ``top_r`` largest observed components (by counts; exact readout: by ``|v_a|``; ties to the
            lower index), the paper's "tomography as pruning" for dense uploads (end of Sec. II D).  The signs are
            measured for the kept ones only.
        eps: Target error for the reported ``shadow_cost`` (default: the achieved error).
        split: Shares of ``shots`` for ``"support"``, ``"signs"``, ``"norm"`` (default :data:`DEFAULT_SPLIT`, partial
            dicts update it); renormalised over the stages that run (no ``"norm"`` stage when the norm is given).  Each
            running stage gets ≥ 1 shot.
        sign_method: A name in ``SIGN_SCHEMES`` (:mod:`torch_qode.core.readout`): ``"hadamard"`` (default; interference
            with a reference state, ``O(r log r)`` shots) or ``"pairs"`` (interference of each component with a
            reference component, ``O(r²)`` shots); see above.  The expected error and the shots for a target error:
            :mod:`torch_qode.core.readout_model`.

    Returns:
        A :class:`TomographyResult`: the estimate, the shots spent per stage, the errors and the
        cost formulas of the readout.

    Raises:
        ValueError: ``v`` is zero, not finite or not 1-D, or an argument is out of range (``shots``,
            ``norm``, ``norm_scale``, ``top_r``, ``eps``, ``split``, ``sign_method``).
        TypeError: ``v`` is not a real numeric vector.

    Example:
        >>> import numpy as np
        >>> res = tomography(np.array([3.0, 0.0, -4.0]), shots=None)    # exact readout
        >>> res.estimate.tolist(), res.support.tolist(), res.norm
        ([3.0, 0.0, -4.0], [0, 2], 5.0)
        >>> tomography(np.array([3.0, 0.0, -4.0]), shots=10_000, seed=0).sign_errors
        0
    """
    rng = np.random.default_rng(seed)
    values, kind = _as_vector(v)
    n = values.size
    nz = np.flatnonzero(values)
    if nz.size == 0:
        raise ValueError("v is the zero vector: there is no state |v>/||v|| to read out")
    vals = values[nz].astype(np.float64, copy=False)
    if not np.all(np.isfinite(vals)):
        raise ValueError("v contains non-finite entries (NaN or inf)")
    true_norm = float(np.linalg.norm(vals))
    if not (true_norm > 0 and math.isfinite(true_norm)):
        raise ValueError(f"||v|| = {true_norm} is not a positive finite number (over/underflow)")
    r = int(nz.size)
    shots = _check_shots(shots)
    top_r = _check_top_r(top_r, n)
    norm_source, known_norm = _check_norm(norm, true_norm)
    if norm_scale is not None:
        if norm_source != "measured":
            raise ValueError("norm_scale applies only to a measured norm (norm=None)")
        if shots is None:
            raise ValueError("norm_scale applies only to a measured norm; shots=None reads exactly")
        norm_scale = _check_positive(norm_scale, "norm_scale")
        if norm_scale < true_norm * (1 - 1e-12):
            raise ValueError(f"norm_scale = {norm_scale!r} is below ||v|| = {true_norm!r}: the "
                             "success probability (||v||/norm_scale)² would exceed 1")
    if eps is not None:
        eps = _check_positive(eps, "eps")
    scheme = SIGN_SCHEMES.lookup(sign_method, "sign_method")()
    fractions = _check_split(split)
    p = (vals / true_norm) ** 2
    p /= p.sum()

    if shots is None:
        est_vals, kept, ref = _exact_readout(vals, top_r)
        if norm_source == "measured":
            norm_source = "exact"
        used_norm = true_norm if known_norm is None else known_norm
        est_vals = est_vals * (used_norm / true_norm)
        est_signs = np.sign(est_vals)
        missed = np.zeros(0, dtype=np.int64)
        dropped = np.setdiff1d(np.arange(r), kept, assume_unique=True)
        budget = {"support": 0, "magnitudes": 0, "signs": 0, "norm": 0, "total": 0}
        used_split: dict = {}
    else:
        running = ["support", "signs"] + (["norm"] if norm_source == "measured" else [])
        budget, used_split = _allocate(shots, running, fractions)
        # 1. support: computational-basis shots, one multinomial over the r non-zeros
        counts = rng.multinomial(budget["support"], p)
        observed = np.flatnonzero(counts)
        missed = np.flatnonzero(counts == 0)
        # top_r: the largest counts, ties to the lower index
        order = np.lexsort((nz[observed], -counts[observed]))
        kept = observed[order] if top_r is None else observed[order[:top_r]]
        dropped = np.setdiff1d(observed, kept, assume_unique=True)
        c = counts[kept].astype(np.float64)       # decreasing counts; kept[0] is the reference
        ref = int(kept[0])
        # 2. magnitudes (unit norm) from the same counts
        mags = np.sqrt(c / budget["support"])
        # 3. signs
        signs = scheme.signs(rng, vals[kept] / true_norm, mags, budget["signs"])
        # 4. norm
        if norm_source == "measured":
            alpha = norm_scale if norm_scale is not None else _pow2_ceil(true_norm)
            p_succ = min(1.0, (true_norm / alpha) ** 2)
            succ = rng.binomial(budget["norm"], p_succ)
            used_norm = alpha * math.sqrt(succ / budget["norm"])
        else:
            used_norm = known_norm if known_norm is not None else true_norm
        est_vals = used_norm * signs * mags
        est_signs = signs
    order = np.argsort(kept, kind="stable")
    kept, est_vals, est_signs = kept[order], est_vals[order], est_signs[order]
    support = nz[kept]

    err_vec = -vals.copy()
    err_vec[kept] += est_vals
    rel_err = float(np.linalg.norm(err_vec) / true_norm)
    sign_errors = int(np.sum(est_signs != np.sign(vals[kept])))
    r_cost = r if top_r is None else min(top_r, r)
    if eps is None:
        shadow_eps, eps_source = rel_err, "achieved"
    else:
        shadow_eps, eps_source = eps, "requested"
    estimate = _like(est_vals, support, n, kind)
    return TomographyResult(
        estimate=estimate, support=support, shots=budget, norm=float(used_norm),
        norm_source=norm_source, missed_mass=float(p[missed].sum()),
        pruned_mass=float(p[dropped].sum()), relative_error=rel_err, sign_errors=sign_errors,
        reference=int(nz[ref]) if shots is not None and scheme.reports_reference else None,
        n=n, r=r, m=qubits(n),
        coupon_cost=coupon_cost(r_cost), shadow_cost=shadow_cost(r_cost, n, shadow_eps),
        shadow_eps=float(shadow_eps), eps_source=eps_source, split=used_split,
        sign_method=None if shots is None else sign_method)


# ------------------------------------------------------------------------------------ internals
def _exact_readout(vals: np.ndarray, top_r: Optional[int]):
    idx = np.arange(vals.size)
    if top_r is None:
        return vals.copy(), idx, 0
    order = np.lexsort((idx, -np.abs(vals)))[:top_r]
    return vals[order], order, int(order[0])


def _allocate(shots: int, running: list, fractions: dict):
    if shots < len(running):
        raise ValueError(f"shots = {shots} is too few: the stages {running} need at least one "
                         f"shot each ({len(running)})")
    total_frac = sum(fractions[s] for s in running)
    budget = {s: 0 for s in _STAGES}
    for s in running[1:]:
        budget[s] = max(1, int(math.floor(shots * fractions[s] / total_frac)))
    budget["support"] = shots - sum(budget[s] for s in running[1:])
    if budget["support"] < 1:                   # only with extreme splits: take back from the largest
        big = max(running[1:], key=lambda s: budget[s])
        budget[big] -= 1 - budget["support"]
        budget["support"] = 1
    out = {"support": budget["support"], "magnitudes": 0, "signs": budget["signs"],
           "norm": budget["norm"], "total": shots}
    return out, {s: fractions[s] / total_frac for s in running}


def _as_vector(v):
    """``v`` as a 1-D numpy array (no float64 copy of the whole vector) and the output kind."""
    if isinstance(v, torch.Tensor):
        if v.is_complex():
            raise TypeError("v must be real: the simulated state has real amplitudes")
        if v.dtype == torch.bool:
            raise TypeError("v must be a real floating-point or integer vector, got torch.bool")
        kind = ("torch", v.device)
        t = v.detach()
        if t.dtype not in (torch.float32, torch.float64):
            t = t.double()
        arr = t.cpu().numpy()
    else:
        if sp.issparse(v):
            raise TypeError("v: a sparse matrix is not accepted here, pass a dense 1-D vector")
        kind = ("numpy", None)
        try:
            arr = np.asarray(v)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"v must be a numpy array or torch tensor, got {type(v).__name__}") from exc
        if arr.dtype.kind == "c":
            raise TypeError("v must be real: the simulated state has real amplitudes")
        if arr.dtype.kind not in "iuf":
            raise TypeError(f"v must be a real numeric vector, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"v must be 1-D (a state vector), got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ValueError("v is empty: it must have at least one component")
    return arr, kind


def _like(vals: np.ndarray, support: np.ndarray, n: int, kind):
    if kind[0] == "torch":
        out = torch.zeros(n, dtype=torch.float64, device=kind[1])
        out[torch.as_tensor(support, device=kind[1])] = torch.as_tensor(vals, device=kind[1])
        return out
    out = np.zeros(n)
    out[support] = vals
    return out


def _check_shots(shots) -> Optional[int]:
    if shots is None:
        return None
    hint = " (a positive integer) or None (exact readout)"
    v = expect_real(shots, "shots", 0.0, low_open=True, hint=hint)
    if v != int(v):
        raise ValueError(f"shots must be a positive integer or None (exact readout), got {shots!r}")
    return int(v)


def _check_top_r(top_r, n: int) -> Optional[int]:
    if top_r is None:
        return None
    return expect_int(top_r, "top_r", 1, n, hint=f" (1..n = {n}) or None")


def _check_norm(norm, true_norm: float):
    if norm is None:
        return "measured", None
    if isinstance(norm, str):
        if norm != "exact":
            raise ValueError(f"norm must be None (measure it), 'exact' or a positive float, got {norm!r}")
        return "exact", true_norm
    return "given", _check_positive(norm, "norm")


def _check_positive(x, name: str) -> float:
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = x.reshape(())
    return expect_real(x, name, 0.0, low_open=True)


def _check_split(split) -> dict:
    out = dict(DEFAULT_SPLIT)
    if split is None:
        return out
    if not isinstance(split, Mapping):
        raise TypeError(f"split must be a dict with keys {list(_STAGES)}, got {type(split).__name__}")
    for key, val in split.items():
        if key not in _STAGES:
            raise ValueError(f"split: unknown stage {key!r}; allowed: {list(_STAGES)}")
        out[key] = _check_positive(val, f"split[{key!r}]")
    return out


def _check_count(x, name: str, minimum: int) -> int:
    return expect_int(x, name, minimum)


def qubits(n: int) -> int:
    """``max(1, ceil(log2 n))``: qubits holding an ``n``-dimensional state (exact integer arithmetic)."""
    return max(1, (int(n) - 1).bit_length())


def _pow2_ceil(x: float) -> float:
    """The smallest power of two ``≥ x`` (``x > 0``)."""
    mant, exp = math.frexp(x)                   # x = mant · 2**exp, mant in [0.5, 1)
    return math.ldexp(1.0, exp - 1) if mant == 0.5 else math.ldexp(1.0, exp)
