"""Carleman error bounds (Eq. II.69–II.76) and the dissipativity test (Theorem II.1, Eq. II.105)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from ..._checks import check_int, check_real
from ..._lazy import lazy_module
from .base import CarlemanSystem

if TYPE_CHECKING:  # scipy.sparse loads on first use (issue 19)
    import scipy.sparse as sp
else:
    sp = lazy_module("scipy.sparse")

__all__ = ["carleman_error_bound", "required_order", "dissipativity", "Dissipativity"]


# -------------------------------------------------------------------------------- error bounds
def carleman_error_bound(order: int, u_norm: float, norms: Sequence[float], rate: float) -> float:
    """Linearisation-error bound ``3 N ||ū||^{N+1} Σ_{ℓ=2}^q (ℓ−1)||F_ℓ|| / rate`` (Eq. II.69–II.74).

    ``norms = [||F0||, ||F1||, …, ||Fq||]`` (e.g. ``ode.norms()``), ``u_norm`` the bound
    ``||u(t)|| ≤ ||ū|| < 1`` of Eq. (II.67)–(II.68) and ``rate`` the dissipation scale that the
    paper writes ``||A||`` in Eq. (II.74)–(II.76) (e.g. ``1 − ||I + F1||`` or ``η λ_min``).
    """
    _check_bound_args(u_norm, norms, rate)
    order = check_int(order, "order", 1, hint=" (the Carleman order N)")
    s = sum((l - 1) * float(norms[l]) for l in range(2, len(norms)))
    return 3.0 * order * u_norm ** (order + 1) * s / rate


def required_order(eps: float, u_norm: float, norms: Sequence[float], rate: float, *,
                   max_order: int = 10_000) -> int:
    """The smallest Carleman order ``N`` with ``carleman_error_bound(N, …) ≤ eps`` (Eq. II.76).

    Our reconstruction of Eq. (II.76) solves ``3 N ||ū||^{N+1} Σ_{ℓ=2}^q (ℓ−1)||F_ℓ|| / rate ≤ ε``
    (the bound of Eq. II.74) for ``N`` by an upward search, so the two functions never disagree; the
    closed form ``⌈log(3Σ/(rate·ε)) / log(1/||ū||)⌉`` drops the factor ``N`` and can fall short.  A
    linear ODE (all ``F_ℓ = 0`` for ℓ ≥ 2) or ``||ū|| = 0`` needs ``N = 1``.

    Args:
        eps: The target truncation error (> 0).
        u_norm: ``||ū|| < 1``, the bound on the state's norm over the window.
        norms: ``[||F0||, ||F1||, …, ||Fq||]`` (e.g. ``ode.norms()``), as in :func:`carleman_error_bound`.
        rate: The dissipation scale of Eq. (II.74) (> 0).
        max_order: The largest order searched.

    Returns:
        The smallest order ``N ≥ 1`` whose bound is at most ``eps``.

    Raises:
        ValueError: An argument is out of range, or no ``N ≤ max_order`` reaches ``eps``.
    """
    _check_bound_args(u_norm, norms, rate)
    eps = check_real(eps, "eps", 0.0, low_open=True)
    max_order = check_int(max_order, "max_order", 1)
    s = sum((l - 1) * float(norms[l]) for l in range(2, len(norms)))
    if s == 0 or u_norm == 0:
        return 1
    # bound(N) ≥ 3 s u^{N+1} / rate, so no N below log(3s/(rate ε)) / log(1/u) − 1 can reach eps
    low = (math.log(3.0 * s) - math.log(rate) - math.log(eps)) / math.log(1.0 / u_norm) - 1.0
    N = max(1, math.floor(low)) if math.isfinite(low) else max_order + 1
    while N <= max_order:
        if carleman_error_bound(N, u_norm, norms, rate) <= eps:
            return N
        N += 1
    raise ValueError(f"no Carleman order N ≤ max_order={max_order} reaches eps={eps:g} (Eq. II.74: "
                     f"3N·||ū||^(N+1)·{s:.3g}/rate with ||ū||={u_norm:.10g}, rate={rate:.3g}); rescale u so that "
                     "||ū|| is further below 1, raise eps or max_order")


def _check_bound_args(u_norm, norms, rate) -> None:
    if not (0 <= u_norm < 1):
        raise ValueError(f"u_norm must satisfy 0 ≤ ||ū|| < 1 (Eq. II.68; rescale u), got {u_norm!r}")
    if len(norms) < 2 or any(not math.isfinite(float(x)) or float(x) < 0 for x in norms):
        raise ValueError("norms must be [||F0||, ||F1||, ..., ||Fq||], finite and non-negative")
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate must be a positive finite dissipation scale, got {rate!r}")


# ------------------------------------------------------------------------------- dissipativity
@dataclass
class Dissipativity:
    """Dissipation numbers of a Carleman system (Theorem II.1, Eq. II.105, II.77–II.83)."""

    norm_I_plus_A: float            # ||I + A||_2 of the whole system (Theorem II.1 asks ≤ 1)
    fully_dissipative: bool         # ||I + A|| ≤ 1
    level1_eigenvalues: np.ndarray  # spectrum of I + F1, the level-1 block of I + A (both forms)
    level1_spectral_radius: float
    dissipative_fraction: float     # fraction of level-1 modes with |1 + λ(F1)| < 1

    def as_dict(self) -> dict:
        d = asdict(self)
        d["level1_eigenvalues"] = self.level1_eigenvalues.tolist()
        return d


def dissipativity(system: CarlemanSystem, t: int = 0, *, max_bytes: Optional[int] = None) -> Dissipativity:
    """Test ``||I + A(t)|| ≤ 1`` (Theorem II.1) and report the level-1 spectrum of ``I + F1``.

    Args:
        system: The :class:`CarlemanSystem` tested.
        t: The step whose ``A(t)`` is tested (only matters for a time-dependent ``F0``).
        max_bytes: Memory budget for building ``A`` (default: the system's).

    Returns:
        A :class:`Dissipativity`: ``||I + A(t)||_2``, whether it is at most 1, and the eigenvalues and
        spectral radius of ``I + F1``.

    Raises:
        TypeError: ``system`` is not a :class:`CarlemanSystem`, or ``A`` is matrix-free (the test needs
            the explicit matrix).
        CarlemanTooLarge: ``A`` would not fit in ``max_bytes``.
    """
    if not isinstance(system, CarlemanSystem):
        raise TypeError(f"system must be a CarlemanSystem, got {type(system).__name__}")
    A = system.matrix(t, max_bytes=max_bytes)
    IA = (sp.identity(system.dim, format="csr") + A).tocsr()
    if system.dim <= 2000:
        norm = float(np.linalg.norm(IA.toarray(), 2))
    else:
        from scipy.sparse.linalg import svds

        norm = float(svds(IA, k=1, return_singular_vectors=False)[0])
    F1 = system.ode.terms[1]
    n = system.n
    G1 = np.eye(n) + (F1.to_scipy().toarray() if F1 is not None else 0.0)
    eig = np.linalg.eigvalsh(G1) if np.allclose(G1, G1.T) else np.linalg.eigvals(G1)
    mod = np.abs(eig)
    return Dissipativity(norm_I_plus_A=norm, fully_dissipative=bool(norm <= 1 + 1e-12),
                         level1_eigenvalues=eig, level1_spectral_radius=float(mod.max()),
                         dissipative_fraction=float(np.mean(mod < 1)))
