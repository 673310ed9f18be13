"""Lanczos on a symmetric operator given by its products: the matrix-free spectral primitives.

The Hessian's spectrum decides whether a quantum window may run: by Eq. II.83 the spectrum of F1 is
``−η spec(H)``, so positive eigenvalues are dissipative modes and negative ones divergent
(Sec. II B 1).  This module works on any ``hvp: torch (n,) -> (n,)``:

- :func:`lanczos` — k steps of Lanczos tridiagonalisation, float64 tridiagonal, full / selective
  (Parlett–Scott) / no reorthogonalisation; :class:`Lanczos` gives the Gauss quadrature of the start
  vector's spectral measure (the building block of SLQ, Sec. III B);
- :func:`top_eigenvalues` — the k extreme eigenvalues by fully reorthogonalised Lanczos;
- :func:`hutchinson_trace` — Hutchinson's unbiased trace estimate.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch

from .._checks import check_choice, check_int, check_real, require_int

__all__ = ["Lanczos", "lanczos", "top_eigenvalues", "hutchinson_trace", "basis_budget", "BASIS_BUDGET_BYTES_CPU"]

_REORTH = ("full", "selective", None)


class Lanczos(NamedTuple):
    """The tridiagonal ``T_k`` of k Lanczos steps: diagonal ``alphas (k,)``, off-diagonal ``betas (k-1,)``.

    ``k`` is smaller than the steps asked for when the Krylov space became invariant (breakdown):
    then the quadrature is exact for the start vector.
    """

    alphas: np.ndarray
    betas: np.ndarray
    reorthogonalize: Optional[str] = "full"   # what ran: None when the basis would not fit the budget

    def quadrature(self) -> tuple[np.ndarray, np.ndarray]:
        """Gauss quadrature of the start vector's spectral measure: Ritz ``nodes`` and ``weights``
        (squared first components of T's eigenvectors; they sum to 1)."""
        return _tridiag_eig(self.alphas, self.betas)

    def matrix(self) -> np.ndarray:
        return np.diag(self.alphas) + np.diag(self.betas, 1) + np.diag(self.betas, -1)


def _tridiag_eig(alphas, betas, vectors: str = "first"):
    a = np.asarray(alphas, dtype=np.float64)
    b = np.asarray(betas, dtype=np.float64)
    if a.size == 1:
        return a.copy(), np.ones(1)
    import scipy.linalg  # 0.12 s to import: on first use (issue 19)

    vals, vecs = scipy.linalg.eigh_tridiagonal(a, b)
    if vectors == "all":
        return vals, vecs
    return vals, vecs[0] ** 2


#: off a GPU, Lanczos stores its basis (``steps · n`` numbers) only within this many bytes; beyond,
#: it runs without reorthogonalisation (assign to change it; on a GPU: half the free device memory).
BASIS_BUDGET_BYTES_CPU = 8 * 2**30


def basis_budget(device) -> int:
    """Bytes a Lanczos basis may take on ``device`` (:data:`BASIS_BUDGET_BYTES_CPU`, or half the free
    memory of a CUDA device)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] // 2)
    return int(BASIS_BUDGET_BYTES_CPU)


class _Basis:
    """The Lanczos vectors, allocated in blocks of :attr:`BLOCK` rows as the iteration reaches them: a
    run that stops early (converged top eigenvalues) never holds the rows it did not use.  A run that
    goes all its steps (``rows=steps``: a density) holds one block, so each reorthogonalisation is two
    matrix-vector products on one matrix, not two per block."""

    BLOCK = 16

    def __init__(self, n: int, dtype: torch.dtype, device, rows: Optional[int] = None):
        self.n, self.dtype, self.device = n, dtype, device
        self.blocks: list = []
        self.k = 0
        if rows is not None:
            self.BLOCK = max(1, int(rows))

    @classmethod
    def from_rows(cls, rows: torch.Tensor) -> "_Basis":
        basis = cls(rows.shape[1], rows.dtype, rows.device)
        for v in rows:
            basis.append(v)
        return basis

    def append(self, v: torch.Tensor) -> None:
        if self.k % self.BLOCK == 0:
            self.blocks.append(torch.empty(self.BLOCK, self.n, dtype=self.dtype, device=self.device))
        self.blocks[-1][self.k % self.BLOCK] = v
        self.k += 1

    def views(self) -> list:
        last = self.k - self.BLOCK * (len(self.blocks) - 1)
        return self.blocks[:-1] + [self.blocks[-1][:last]] if self.blocks else []

    def dot(self, w: torch.Tensor) -> torch.Tensor:
        """``B w`` (one entry per stored vector)."""
        views = self.views()
        return views[0] @ w if len(views) == 1 else torch.cat([B @ w for B in views])

    def sub(self, w: torch.Tensor, h: torch.Tensor) -> None:
        """``w −= Bᵀ h`` in place."""
        views = self.views()
        if len(views) == 1:
            w.addmv_(views[0].T, h, alpha=-1)
            return
        for B, hb in zip(views, h.split(self.BLOCK)):
            w.addmv_(B.T, hb, alpha=-1)

    def combine(self, C: torch.Tensor) -> torch.Tensor:
        """``C B`` for ``C (m, k)``: ``(m, n)``."""
        return sum(Cb @ B for B, Cb in zip(self.views(), C.split(self.BLOCK, dim=1)))


def _check_n_steps(n, steps, name="steps") -> tuple[int, int]:
    n = check_int(n, "n", 1, hint=" (the operator's dimension)")
    return n, check_int(steps, name, 1, n, hint=f" (n = {n})")


def _generator(seed, generator, device):
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return generator
    seed = 0 if seed is None else require_int(seed, "seed")
    return torch.Generator(device="cpu").manual_seed(seed)


def _rademacher(n, gen, dtype, device):
    v = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int8).to(device=device, dtype=dtype)
    return (2 * v - 1) / math.sqrt(n)


def _apply(hvp, v, n):
    w = hvp(v)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"hvp must return a torch tensor, got {type(w).__name__}")
    if tuple(w.shape) != (n,):
        raise ValueError(f"hvp returned shape {tuple(w.shape)}, expected ({n},)")
    return w.to(dtype=v.dtype, device=v.device)


def lanczos(hvp: Callable[[torch.Tensor], torch.Tensor], n: int, steps: int, *, v0: Optional[torch.Tensor] = None,
            seed: Optional[int] = 0, generator: Optional[torch.Generator] = None,
            dtype: torch.dtype = torch.float64, device=None,
            reorthogonalize: Optional[str] = "full",
            stop: Optional[Callable[[np.ndarray, np.ndarray, float], bool]] = None,
            max_basis_bytes: Optional[int] = None) -> Lanczos:
    """``steps`` Lanczos steps on the symmetric operator ``hvp`` (torch ``(n,) -> (n,)``).

    The start vector is ``v0`` or a normalised Rademacher vector drawn from ``generator`` / ``seed``.
    The Lanczos vectors live in ``dtype`` on ``device``; α, β are accumulated in float64.

    ``reorthogonalize``:
      ``"full"`` — classical Gram–Schmidt against every previous vector, as matrix-vector products
      with the preallocated basis, a second pass when the first cancelled much (DGKS; O(k n) memory);
      ``"selective"`` — Parlett–Scott: only against the Ritz vectors that have converged
      (residual bound β_j |s_ji| ≤ √ε ‖T‖), which is where orthogonality is lost;
      ``None`` — plain three-term recurrence (O(n) memory; ghost copies of converged eigenvalues
      may appear, which distorts densities).
    ``stop(alphas, betas, beta_next) -> bool`` may end the iteration early.  With reorthogonalisation
    the basis takes ``steps · n`` entries of ``dtype`` (float32 vectors halve it; the tridiagonal is
    float64 either way), allocated in blocks as the steps go.  A basis of ``steps · n`` entries over
    ``max_basis_bytes`` (default :func:`basis_budget`) is never stored: the run falls back to
    ``None`` and says so in ``Lanczos.reorthogonalize`` (the README's Hessian benchmark measures
    what that costs a density).
    """
    n, steps = _check_n_steps(n, steps)
    check_choice(reorthogonalize, "reorthogonalize", _REORTH)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch dtype, got {dtype!r}")
    if not callable(hvp):
        raise TypeError("hvp must be callable: torch (n,) -> (n,)")
    device = torch.device("cpu") if device is None else torch.device(device)
    if v0 is None:
        v = _rademacher(n, _generator(seed, generator, device), dtype, device)
    else:
        v = torch.as_tensor(v0).detach().to(dtype=dtype, device=device).reshape(-1)
        if v.numel() != n:
            raise ValueError(f"v0 must have shape ({n},), got {tuple(v0.shape)}")
        nv = v.norm()
        if not bool(torch.isfinite(nv)) or float(nv) == 0.0:
            raise ValueError("v0 must be finite and non-zero")
        v = v / nv
    eps = float(torch.finfo(dtype).eps)
    budget = basis_budget(device) if max_basis_bytes is None else check_int(max_basis_bytes, "max_basis_bytes", 0)
    if reorthogonalize and steps * n * (torch.finfo(dtype).bits // 8) > budget:
        reorthogonalize = None                    # the basis would not fit: the plain recurrence
    Q = _Basis(n, dtype, device, rows=steps if stop is None else None) if reorthogonalize else None
    alphas: list[float] = []
    betas: list[float] = []
    v_prev, beta_prev = None, 0.0
    anorm = 0.0
    for j in range(steps):
        last = j == steps - 1
        if Q is not None:
            Q.append(v)
        w = _apply(hvp, v, n)
        alpha = float(torch.dot(w.double(), v.double())) if dtype != torch.float64 else float(torch.dot(w, v))
        w = w - alpha * v
        if v_prev is not None:
            w.sub_(v_prev, alpha=beta_prev)
        if last:               # α_k is all the last step adds: its residual is only checked for finiteness
            beta = float(w.norm())
        elif reorthogonalize == "full":
            beta = _full_reorth(w, Q)
        else:
            if reorthogonalize == "selective" and j > 0:
                _selective_reorth(w, Q, alphas + [alpha], betas, eps)
            beta = float(w.norm())
        alphas.append(alpha)
        if not (math.isfinite(alpha) and math.isfinite(beta)):
            raise FloatingPointError("hvp produced non-finite values during Lanczos")
        anorm = max(anorm, abs(alpha) + beta + beta_prev)
        if last or beta <= 100 * eps * max(anorm, 1e-300):
            break
        if stop is not None and stop(np.asarray(alphas), np.asarray(betas), beta):
            break
        betas.append(beta)
        v_prev, v, beta_prev = v, w / beta, beta
    return Lanczos(np.asarray(alphas, dtype=np.float64), np.asarray(betas, dtype=np.float64), reorthogonalize)


def _full_reorth(w: torch.Tensor, B: _Basis) -> float:
    """Orthogonalise ``w`` in place against the rows of ``B`` (the basis so far) and return ‖w‖.

    Classical Gram–Schmidt as two matrix-vector products against the stored basis, repeated when
    the pass cancelled much of ``w`` (Daniel–Gragg–Kaufman–Stewart, "twice is enough": ‖w‖ fell below
    1/√2 of ‖w₀‖, i.e. below ‖h‖ since ‖w₀‖² = ‖w‖² + ‖h‖²).  In Lanczos the recurrence leaves ``w``
    nearly orthogonal already, so one pass is the rule.  One host synchronisation per call."""
    h = B.dot(w)
    B.sub(w, h)
    h_norm, after = torch.stack((h.norm(), w.norm())).tolist()
    if after < h_norm:
        B.sub(w, B.dot(w))
        after = float(w.norm())
    return after


def _selective_reorth(w: torch.Tensor, B: _Basis, alphas: list, betas: list, eps: float) -> None:
    """Parlett–Scott: orthogonalise ``w`` in place against the Ritz vectors that have converged
    (residual bound β_j |s_ji| ≤ √ε ‖T‖)."""
    vals, S = _tridiag_eig(alphas, betas, vectors="all")
    beta_est = float(w.norm())
    tnorm = max(abs(vals[0]), abs(vals[-1]), 1e-300)
    conv = np.nonzero(beta_est * np.abs(S[-1]) <= math.sqrt(eps) * tnorm)[0]
    if conv.size:
        Y = B.combine(torch.as_tensor(S[:, conv].T, dtype=B.dtype, device=B.device))
        Y = torch.linalg.qr(Y.T).Q.T if conv.size > 1 else Y / Y.norm()
        for _ in range(2):
            w.sub_(Y.T @ (Y @ w))


def _check_tol(tol) -> float:
    return check_real(tol, "tol", 0.0, hint=" (relative tolerance)")


def top_eigenvalues(hvp, n: int, k: int = 1, *, which: str = "algebraic", steps: Optional[int] = None,
                    tol: float = 1e-6, seed: int = 0, dtype: torch.dtype = torch.float64, device=None) -> np.ndarray:
    """The ``k`` top eigenvalues by fully reorthogonalised Lanczos.

    ``which="algebraic"``: the largest values, descending; ``"magnitude"``: the largest ``|λ|``
    (what power iteration, e.g. PyHessian's, converges to), by decreasing magnitude.  Stops when the
    residual bounds β_j |s_ji| of the k wanted Ritz pairs fall below ``tol·max|θ|`` or after
    ``steps`` (default ``min(n, max(100, 4k))``) steps.
    """
    n = check_int(n, "n", 1, hint=" (the operator's dimension)")
    k = check_int(k, "k", 1, n, hint=f" (n = {n})")
    check_choice(which, "which", ("algebraic", "magnitude"))
    tol = _check_tol(tol)
    steps = min(n, max(100, 4 * k)) if steps is None else steps
    n, steps = _check_n_steps(n, steps)

    def order(vals):
        return np.argsort(-vals if which == "algebraic" else -np.abs(vals), kind="stable")[:k]

    def stop(a, b, beta):
        if a.size < k + 1:
            return False
        vals, S = _tridiag_eig(a, b, vectors="all")
        res = beta * np.abs(S[-1, order(vals)])
        return bool(np.all(res <= tol * max(np.abs(vals).max(), 1e-300)))

    lz = lanczos(hvp, n, steps, seed=seed, dtype=dtype, device=device, reorthogonalize="full", stop=stop)
    vals = _tridiag_eig(lz.alphas, lz.betas)[0]
    if vals.size < k:
        raise ValueError(f"the Krylov space has dimension {vals.size} < k = {k}: the start vector only "
                         "reaches that many eigenvalues")
    return vals[order(vals)].copy()


def hutchinson_trace(hvp, n: int, *, samples: int = 100, seed: int = 0, dtype: torch.dtype = torch.float64,
                     device=None, return_stderr: bool = False):
    """Hutchinson's estimate ``mean_i v_iᵀ H v_i`` over ``samples`` Rademacher vectors (unbiased).

    ``return_stderr=True`` returns ``(trace, standard error)``.
    """
    samples = check_int(samples, "samples", 1)
    n = check_int(n, "n", 1, hint=" (the operator's dimension)")
    device = torch.device("cpu") if device is None else torch.device(device)
    gen = _generator(seed, None, device)
    vals = []
    for _ in range(int(samples)):
        v = _rademacher(n, gen, dtype, device) * math.sqrt(n)
        vals.append(float(torch.dot(_apply(hvp, v, n).double(), v.double())))
    vals = np.asarray(vals)
    tr = float(vals.mean())
    if return_stderr:
        return tr, float(vals.std(ddof=1) / math.sqrt(vals.size)) if vals.size > 1 else float("nan")
    return tr

