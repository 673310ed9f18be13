"""Taylor expansion of a real loss: the polynomial ODE of gradient descent on a support (DESIGN.md step 4).

Around the upload point θ0, with u = θ − θ0 restricted to the support S (all other entries fixed at
θ0), gradient descent with step η is the polynomial difference equation (Eq. II.1, V.5; Sec. II B,
Eq. II.83: spec(F1) = −η spec(H))

    u(t+1) = u(t) + F0 + F1 u + F2 u⊗u + … + Fq u^{⊗q},
    F0 = −η ∇L(θ0),  F1 = −η H,  F2 = −(η/2) ∇³L,  …,  Fk = −(η/k!) ∇^{k+1}L,

each ``Fk`` reshaped to ``(n, n**k)`` with row-major Kronecker column order.  Weight decay ``wd``
(PyTorch's SGD convention, ``grad += wd·θ``) is the loss ``L + (wd/2)||θ||²``: it adds ``wd·θ0`` to
the gradient and ``wd·I`` to the Hessian and nothing to higher derivatives.

Two ways to differentiate (``backend``):

- ``"double_backward"``: one ``autograd.grad(loss, params, create_graph=True)``; Hessian-vector
  products are a second backward through that graph (columns batched with ``is_grads_batched``,
  ``chunk`` at a time), third-order products a third one (one pair at a time: a batched backward
  through a batched HVP graph costs batch² work).  :meth:`TaylorExpansion.from_loss` always uses it
  (the loss graph is all it has).
- ``"jvp"``: torch.func forward-over-reverse ``jvp(grad(L))`` (third order: forward-over-forward-over-
  reverse), columns batched with ``vmap``.  Needs a pure function of the flat parameter vector
  (:meth:`TaylorExpansion.from_function`, :func:`make_loss_fn`).

``backend="auto"`` (:data:`AUTO_BACKEND`) picks ``"double_backward"``: in ``benchmarks/taylor.py`` and
``benchmarks/hessian.py`` (CPU, float32, MLPs of 1.7k/26k parameters and a 78k-parameter ResNet-8
with BatchNorm) it was faster for every single-vector HVP (1.3–8x) and third-order product
(1.2–3x), and within ±10 % of ``jvp`` for 8-column HVP batches.  The graph is built once per window
and each product then only runs backward passes, whereas ``jvp(grad)`` re-runs the forward and the
backward for every product.

Normalisation layers: PyTorch's fused batch / layer / instance norm kernels have correct first and
second derivatives but refuse (double backward) or silently corrupt (forward mode) the third
(pytorch/pytorch#186256, #175754).  :func:`make_loss_fn` therefore runs them decomposed
(:func:`decomposed_norms`), and :meth:`TaylorExpansion.from_loss` with ``degree >= 2`` refuses a graph
that holds a fused training-mode norm (:class:`UnsupportedGraphError`) — compute that loss inside
``with decomposed_norms(model):`` instead.

BatchNorm choice: the expansion sees the loss as in training — a BatchNorm in training mode
normalises with the statistics of the expansion batch — and the expansion never modifies the running
buffers (``from_loss`` only runs backward passes; ``make_loss_fn`` disables the update; the
forward that built the ``from_loss`` graph is the caller's training forward).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from . import flat as _flat
from .._checks import as_real, check_int, check_real, require_real
from .engines import FuncEngine, GraphEngine
from .flat import make_loss_fn
from .recompute import RecomputeEngine
from .norms import decomposed_norms, fused_norm_nodes
from ..core.ode import NonFiniteError, PolynomialODE
from ..core.registry import Registry

__all__ = ["TaylorExpansion", "UnsupportedGraphError", "make_loss_fn", "decomposed_norms",
           "EXPLICIT_BUDGET_BYTES", "AUTO_BACKEND", "TAYLOR_BACKENDS"]

#: ``ode(explicit=None)`` builds explicit (dense) coefficients when F1..Fq, held in float64, need at
#: most this many bytes (32 MiB: n ≤ 2048 for degree 1, n ≤ 160 for degree 2, n ≤ 45 for degree 3).
EXPLICIT_BUDGET_BYTES = 32 * 2**20

#: What ``backend="auto"`` resolves to (measured in benchmarks/taylor.py; see the module docstring).
AUTO_BACKEND = "double_backward"

#: HVP columns pushed through one batched backward / vmap (bounds the memory of batched products).
DEFAULT_CHUNK = 32



def _double_backward(loss_fn: Callable, theta0: torch.Tensor, leaf: torch.Tensor, loss: torch.Tensor,
                     chunk: int) -> tuple:
    """Backend ``"double_backward"``: the gradient's graph, built once at θ0, answers every product.

    Args:
        loss_fn: the pure loss of the flat parameter vector (unused: the graph is all this backend needs).
        theta0: the expansion point ``(N,)`` (detached).
        leaf: the leaf ``loss`` was computed at (a clone of ``theta0`` that requires grad).
        loss: ``loss_fn(leaf)``, a scalar.
        chunk: HVP columns per batched backward.

    Returns:
        ``(engine, gradient)``: a :class:`~torch_qode.bridge.engines.GraphEngine` and ``∇L(θ0)`` (detached).
    """
    if loss.requires_grad:
        (g,) = torch.autograd.grad(loss.reshape(()), leaf, create_graph=True, allow_unused=True,
                                   materialize_grads=True)
    else:
        g = torch.zeros_like(leaf)
    return GraphEngine([leaf], g, chunk), g.detach()


def _jvp(loss_fn: Callable, theta0: torch.Tensor, leaf: torch.Tensor, loss: torch.Tensor, chunk: int) -> tuple:
    """Backend ``"jvp"``: torch.func forward-over-reverse on ``loss_fn``; the loss graph is freed at once.

    Args and Returns: as :func:`_double_backward` (the engine a
    :class:`~torch_qode.bridge.engines.FuncEngine`).
    """
    grad_full = (torch.autograd.grad(loss.reshape(()), leaf, allow_unused=True, materialize_grads=True)[0]
                 if loss.requires_grad else torch.zeros_like(leaf))
    return FuncEngine(loss_fn, theta0, chunk), grad_full


#: Taylor backends, ``backend=`` name -> ``build(loss_fn, theta0, leaf, loss, chunk) -> (engine, ∇L(θ0))``;
#: ``"auto"`` is the one :data:`AUTO_BACKEND` names.
TAYLOR_BACKENDS = Registry("Taylor backend", {"auto": None, "jvp": _jvp, "double_backward": _double_backward})
TAYLOR_BACKENDS["auto"] = TAYLOR_BACKENDS[AUTO_BACKEND]


class UnsupportedGraphError(ValueError):
    """The loss graph holds an op whose third derivatives PyTorch cannot compute correctly."""


class TaylorExpansion:
    """Derivatives of a loss at θ0 restricted to a support, and the polynomial ODE they define.

    Build with :meth:`from_loss` (a live loss graph over the optimizer's parameters) or
    :meth:`from_function` (a pure function of the flat parameter vector).  Everything returned is
    detached.  Call :meth:`release` (or use ``with``) at the end of the window: no graph outlives it.

    Args:
        engine: The product engine of the backend (:class:`~torch_qode.bridge.engines.GraphEngine`,
            :class:`~torch_qode.bridge.engines.FuncEngine` or :class:`~.recompute.RecomputeEngine`).
        theta0_full: The expansion point θ0, the flat ``(N,)`` parameter vector.
        grad_full: ``∇L(θ0)``, flat ``(N,)`` (without weight decay).
        lr: The step ``η``.
        support: The support ``S`` (an index tensor), or ``None`` for all ``N`` entries.
        degree: The degree ``q`` of the ODE.
        weight_decay: A 0-d or flat ``(N,)`` tensor (see :meth:`from_loss`).
        backend: The backend's name (``"double_backward"``, ``"jvp"`` or ``"recompute"``).

    Raises:
        NonFiniteError: The gradient at θ0 (plus weight decay) holds NaN or ±inf.
    """

    def __init__(self, *, engine, theta0_full: torch.Tensor, grad_full: torch.Tensor, lr: float,
                 support, degree: int, weight_decay, backend: str):
        self._engine = engine
        self.backend = backend
        self.lr = lr
        self.degree = degree
        self.support = support
        self.N = theta0_full.numel()
        self.dtype, self.device = theta0_full.dtype, theta0_full.device
        S = support
        self.theta0 = (theta0_full if S is None else theta0_full[S]).detach().clone()
        self.n = int(self.theta0.numel())
        self._wd = weight_decay if S is None or weight_decay.dim() == 0 else weight_decay[S]
        self._wd_zero = not bool(self._wd.any())
        g = (grad_full if S is None else grad_full[S]).detach()
        self._grad = g + self._wd * self.theta0
        if not bool(torch.isfinite(self._grad).all()):
            raise NonFiniteError("the gradient at θ0 is not finite (NaN or inf)")

    # ------------------------------------------------------------------------------ constructors
    @classmethod
    def from_loss(cls, loss: torch.Tensor, params, *, lr: float, support=None, degree: int = 2,
                  weight_decay=0.0, chunk: int = DEFAULT_CHUNK) -> "TaylorExpansion":
        """Expand around the current parameter values using the live graph of ``loss``.

        ``loss``: scalar tensor whose graph is alive (not yet backwarded).  The gradient graph
        ``autograd.grad(loss, params, create_graph=True)`` is built once and kept until
        :meth:`release`; ``.grad`` of the parameters is never touched and ``loss`` can still be
        backwarded afterwards.  ``degree >= 2`` refuses graphs through fused training-mode norms
        (:class:`UnsupportedGraphError`).
        """
        params = _flat.param_list(params)
        lr, degree, chunk = _check_lr(lr), _check_degree(degree), _check_chunk(chunk)
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss must be a scalar torch tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"loss must be a scalar (one element), got shape {tuple(loss.shape)}")
        if not loss.requires_grad:
            raise ValueError("loss does not require grad: it has no graph to differentiate "
                             "(computed under torch.no_grad(), or detached?)")
        if not bool(torch.isfinite(loss.detach()).all()):
            raise NonFiniteError(f"loss is not finite ({float(loss.detach())})")
        if degree >= 2:
            _refuse_fused(fused_norm_nodes(loss))
        frozen = [i for i, p in enumerate(params) if not p.requires_grad]
        if frozen:
            raise ValueError(f"params{frozen} do not require grad: pass only trainable parameters "
                             "(the expansion differentiates with respect to every entry)")
        N = _flat.numel(params)
        S = _flat.check_support(support, N, params[0].device)
        wd = _check_weight_decay(weight_decay, params)
        try:
            g = torch.autograd.grad(loss.reshape(()), params, create_graph=True, allow_unused=True,
                                    materialize_grads=True)
        except RuntimeError as exc:
            if "second time" in str(exc) or "freed" in str(exc):
                raise ValueError("loss: its graph was already freed (backward() was called on it); pass "
                                 "the loss before any backward, or use retain_graph=True") from exc
            raise
        g_flat = _flat.flatten(g)
        theta0 = _flat.flatten([p.detach() for p in params])
        engine = GraphEngine(params, g_flat, chunk)
        return cls(engine=engine, theta0_full=theta0, grad_full=g_flat.detach(), lr=lr, support=S,
                   degree=degree, weight_decay=wd, backend="double_backward")

    @classmethod
    def from_replay(cls, replay: Callable, params, grad: torch.Tensor, *, lr: float, support=None,
                    degree: int = 2, weight_decay=0.0, losses=None, fused=(),
                    chunk: int = DEFAULT_CHUNK) -> "TaylorExpansion":
        """Expand around the current parameter values without holding a graph (backend ``"recompute"``).

        ``replay(on_loss)`` re-runs the expansion batch's closure, handing each backward's loss to
        ``on_loss``; every product block replays it once (:class:`~.recompute.RecomputeEngine`).
        ``grad``: the flat ``(N,)`` gradient at θ0; ``losses``: the micro-batch losses a replay must
        reproduce; ``fused``: fused-norm nodes of the closure's graph (refused at ``degree >= 2``).
        The caller keeps buffers, RNG and ``.grad`` out of the replays' reach."""
        params = _flat.param_list(params)
        lr, degree, chunk = _check_lr(lr), _check_degree(degree), _check_chunk(chunk)
        if degree >= 2:
            _refuse_fused(list(fused))
        if not callable(replay):
            raise TypeError("replay must be callable: replay(on_loss) re-runs the closure")
        N = _flat.numel(params)
        if not isinstance(grad, torch.Tensor) or tuple(grad.shape) != (N,):
            raise ValueError(f"grad must be the flat ({N},) gradient at θ0, got "
                             f"{tuple(grad.shape) if isinstance(grad, torch.Tensor) else type(grad).__name__}")
        S = _flat.check_support(support, N, params[0].device)
        wd = _check_weight_decay(weight_decay, params)
        engine = RecomputeEngine(replay, params, chunk, losses=losses)
        theta0 = _flat.flatten([p.detach() for p in params])
        return cls(engine=engine, theta0_full=theta0, grad_full=grad.detach().to(theta0), lr=lr, support=S,
                   degree=degree, weight_decay=wd, backend="recompute")

    @classmethod
    def from_function(cls, loss_fn: Callable[[torch.Tensor], torch.Tensor], theta0, *, lr: float,
                      support=None, degree: int = 2, weight_decay=0.0, backend: str = "auto",
                      chunk: int = DEFAULT_CHUNK) -> "TaylorExpansion":
        """Expand ``loss_fn`` (flat full parameter vector ``(N,)`` -> scalar) around ``theta0``.

        ``backend``: ``"jvp"`` (torch.func forward-over-reverse), ``"double_backward"`` (a graph
        built once at θ0) or ``"auto"`` (= :data:`AUTO_BACKEND`).  ``loss_fn`` must be pure
        (:func:`make_loss_fn` builds one from a model: decomposed norms, BatchNorm buffers untouched,
        fixed dropout masks).
        """
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable: flat parameter vector (N,) -> scalar loss")
        if not isinstance(theta0, torch.Tensor):
            raise TypeError(f"theta0 must be a 1-D torch tensor, got {type(theta0).__name__}")
        if theta0.dim() != 1 or theta0.numel() == 0 or not theta0.is_floating_point():
            raise ValueError(f"theta0 must be a non-empty 1-D floating tensor, got shape {tuple(theta0.shape)} "
                             f"dtype {theta0.dtype}")
        lr, degree, chunk = _check_lr(lr), _check_degree(degree), _check_chunk(chunk)
        TAYLOR_BACKENDS.lookup(backend, "backend")
        resolved = AUTO_BACKEND if backend == "auto" else backend
        theta0 = theta0.detach().clone()
        N = theta0.numel()
        S = _flat.check_support(support, N, theta0.device)
        wd = _check_weight_decay(weight_decay, [theta0])
        leaf = theta0.clone().requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(leaf)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn must return a scalar torch tensor")
        if not bool(torch.isfinite(loss.detach()).all()):
            raise NonFiniteError(f"loss_fn(theta0) is not finite ({float(loss.detach())})")
        if degree >= 2 and loss.requires_grad:
            bad = fused_norm_nodes(loss)
            if bad:
                raise UnsupportedGraphError(
                    f"loss_fn: it runs {', '.join(bad)}, whose third derivatives PyTorch refuses or gets wrong "
                    "(pytorch/pytorch#186256, #175754). Build loss_fn with make_loss_fn (decomposed norms) or "
                    "run the model inside `with decomposed_norms(model):`, or pass degree=1")
        engine, grad_full = TAYLOR_BACKENDS[resolved](loss_fn, theta0, leaf, loss, chunk)
        del loss, leaf
        return cls(engine=engine, theta0_full=theta0, grad_full=grad_full, lr=lr, support=S, degree=degree,
                   weight_decay=wd, backend=resolved)

    @classmethod
    def from_model(cls, model: torch.nn.Module, criterion: Callable, batch, *, lr: float, params=None,
                   support=None, degree: int = 2, weight_decay=0.0, backend: str = "auto",
                   seed: int = 0, chunk: int = DEFAULT_CHUNK) -> "TaylorExpansion":
        """:meth:`from_function` on ``make_loss_fn(model, criterion, batch, params)``: see :func:`_from_model`."""
        return _from_model(cls, model, criterion, batch, lr=lr, params=params, support=support, degree=degree,
                           weight_decay=weight_decay, backend=backend, seed=seed, chunk=chunk)

    # ------------------------------------------------------------------------------- products
    def _live(self):
        if self._engine is None:
            raise RuntimeError("this TaylorExpansion was released: its graph is gone; expand again")
        return self._engine

    def _cols(self, V, name: str) -> tuple[torch.Tensor, bool]:
        """``V`` (n,) or (n, m) -> rows (m, N) on the full vector in the expansion's dtype/device."""
        if not isinstance(V, torch.Tensor):
            V = torch.as_tensor(np.asarray(V, dtype=np.float64))
        vec = V.dim() == 1
        if V.dim() not in (1, 2) or V.shape[0] != self.n:
            raise ValueError(f"{name} must have shape ({self.n},) or ({self.n}, m); got {tuple(V.shape)}")
        rows = V.detach().to(dtype=self.dtype, device=self.device).reshape(self.n, -1).T
        return _flat.scatter_rows(rows, self.support, self.N), vec

    def _restrict(self, R: torch.Tensor) -> torch.Tensor:
        return R if self.support is None else R[:, self.support]

    def gradient(self) -> torch.Tensor:
        """``∇L(θ0)`` on S plus ``weight_decay·θ0``.

        Returns:
            A copy, of shape ``(n,)``.
        """
        return self._grad.clone()

    def hvp(self, V) -> torch.Tensor:
        """``(H_SS + wd·I) V``, the Hessian-vector products on S (``F1 = −η`` times this).

        Args:
            V: ``(n,)`` or ``(n, m)`` (m = 0 allowed); numpy is accepted.

        Returns:
            The products, of ``V``'s shape, detached.

        Raises:
            RuntimeError: The expansion was released.
            ValueError: ``V`` is not of shape ``(n,)`` or ``(n, m)``.
        """
        eng = self._live()
        rows, vec = self._cols(V, "V")
        if rows.shape[0] == 0:
            return rows.new_zeros(self.n, 0)
        with torch.enable_grad():
            HV = self._restrict(eng.hvp(rows)).detach()
        HV = HV.T
        if not self._wd_zero:
            HV = HV + self._wd_col() * (rows if self.support is None else rows[:, self.support]).T
        return HV[:, 0] if vec else HV

    def third(self, A, B) -> torch.Tensor:
        """Columns ``∇³L[a_i, b_i]`` restricted to S (``F2 (a ⊗ b) = −(η/2)`` times this).

        Args:
            A: ``(n,)`` or ``(n, m)``: the first directions ``a_i``.
            B: The second directions ``b_i``, of ``A``'s shape.

        Returns:
            ``(n, m)`` (``(n,)`` for vectors), detached.

        Raises:
            RuntimeError: The expansion was released.
            ValueError: ``degree < 2``, or ``A`` and ``B`` of a bad or differing shape.
        """
        eng = self._live()
        self._need_third()
        ra, va = self._cols(A, "A")
        rb, vb = self._cols(B, "B")
        if ra.shape != rb.shape:
            raise ValueError(f"A and B must have the same shape; got {tuple(A.shape)} and {tuple(B.shape)}")
        if ra.shape[0] == 0:
            return ra.new_zeros(self.n, 0)
        with torch.enable_grad():
            T = self._restrict(eng.third(ra, rb)).detach().T
        return T[:, 0] if va else T

    def third_sym(self, Z) -> torch.Tensor:
        """``Σ_ab ∇³L_{iab} Z_ab`` for a general ``(n, n)`` matrix ``Z``: ``(n,)``.

        Only ``sym(Z)`` matters (∇³L is symmetric); ``sym(Z) = Σ λ_r v_r v_rᵀ`` (exact zeros
        dropped) turns it into ``Σ λ_r ∇³L[v_r, v_r]``, one batched set of third-order products.

        Args:
            Z: A real ``(n, n)`` matrix (numpy or torch).

        Returns:
            ``Σ_ab ∇³L_{iab} Z_ab`` on S, of shape ``(n,)``, detached.

        Raises:
            RuntimeError: The expansion was released.
            ValueError: ``degree < 2``, or ``Z`` is not of shape ``(n, n)``.
            NonFiniteError: ``Z`` holds NaN or ±inf.
        """
        eng = self._live()
        self._need_third()
        Z = torch.as_tensor(Z).detach().to(dtype=torch.float64, device="cpu")
        if tuple(Z.shape) != (self.n, self.n):
            raise ValueError(f"Z must have shape ({self.n}, {self.n}); got {tuple(Z.shape)}")
        if not bool(torch.isfinite(Z).all()):
            raise NonFiniteError("Z holds NaN or inf: third_sym needs a finite (n, n) matrix")
        lam, Q = torch.linalg.eigh(0.5 * (Z + Z.T))
        keep = lam != 0
        if not bool(keep.any()):
            return torch.zeros(self.n, dtype=self.dtype, device=self.device)
        V = Q[:, keep].T.to(dtype=self.dtype, device=self.device)
        rows = _flat.scatter_rows(V, self.support, self.N)
        with torch.enable_grad():
            out = eng.sym_sum(rows, lam[keep].to(dtype=self.dtype, device=self.device)).detach()
        return out if self.support is None else out[self.support]

    def derivative(self, k: int) -> torch.Tensor:
        """Dense ``∇^k L`` on S as an ``(n, n**(k-1))`` tensor, ``k = 1 .. degree+1``.

        Includes weight decay (``k = 1``: ``+wd·θ0``; ``k = 2``: ``+wd·I``).  Built with batched
        backward passes (``is_grads_batched``) or nested torch.func ``jvp``/``vmap`` — n**(k-1)
        products, so for small n only.

        Args:
            k: The order, ``1 ≤ k ≤ degree + 1``.

        Returns:
            ``∇^k L`` on S, of shape ``(n, n**(k-1))``, detached.

        Raises:
            ValueError: ``k`` is outside ``1..degree+1``.
            RuntimeError: The expansion was released (``k ≥ 2``).
        """
        k = check_int(k, "k", 1, self.degree + 1, hint=" (degree + 1)")
        n = self.n
        if k == 1:
            return self.gradient().reshape(n, 1)
        eng = self._live()
        with torch.enable_grad():
            if not isinstance(eng, FuncEngine):
                D = eng.derivative(k, self.support, n).detach()
            else:
                D = eng.derivative_fn(k, self.support, n).detach()
        D = D.reshape(n, n ** (k - 1))
        if k == 2:
            D = D + torch.diag(self._wd_col()[:, 0].expand(n))
        return D

    # ------------------------------------------------------------------------------------ ODE
    def ode(self, F0=None, explicit: Optional[bool] = None, *, dtype: torch.dtype = torch.float64,
            device=None, budget_bytes: int = EXPLICIT_BUDGET_BYTES) -> PolynomialODE:
        """The gradient-descent ODE on S: ``[F0, F1, …, Fq]`` with q = ``degree``
        (:func:`~torch_qode.bridge.taylor_ode.expansion_ode`).

        Matrix-free terms (degree ≤ 2) take F1 by HVPs and F2 by third-order products (``F2.matmat`` on
        a general n² column uses :meth:`third_sym`) and convert to ``dtype`` on the fly.

        Args:
            F0: ``None`` -> ``−lr·gradient()``; otherwise the ``(n,)`` vector or callable ``t -> (n,)`` used
                as F0 itself (already multiplied by −lr).
            explicit: ``True``: dense coefficients; ``False``: matrix-free terms; ``None``: decide by
                ``budget_bytes``.
            dtype: The ODE's dtype.
            device: The ODE's device (default: the parameters').
            budget_bytes: The most bytes of float64 F1..Fq that ``explicit=None`` builds densely.

        Returns:
            The :class:`~torch_qode.core.ode.PolynomialODE` ``u(t+1) = u(t) + F0 + Σ_k Fk u^{⊗k}``
            with ``Fk = −(η/k!) ∇^{k+1}L`` on S (Eq. II.1, V.5).

        Raises:
            RuntimeError: The expansion was released.
            ValueError: A bad ``explicit``, or matrix-free coefficients asked for (or needed by the budget)
                at degree > 2.
        """
        return expansion_ode(self, F0, explicit, dtype=dtype, device=device, budget_bytes=budget_bytes)

    def third_sym_sum(self, Z, lam) -> torch.Tensor:
        """``Σ_l lam_l ∇³L[z_l, z_l]`` restricted to S.

        One backward of ``Σ_l lam_l z_l·H(θ)z_l`` (chunked); the columns are scattered onto
        the support for a sparse upload.  ``F2``'s ``sym_sum`` is ``−(η/2)`` times this.

        Args:
            Z: The directions ``z_l`` as columns, ``(n, m)``.
            lam: The weights, ``(m,)``.

        Returns:
            The sum, of shape ``(n,)``, detached.

        Raises:
            RuntimeError: The expansion was released.
            ValueError: ``degree < 2``, a bad shape of ``Z``, or ``lam`` without one entry per column.
        """
        eng = self._live()
        self._need_third()
        rows, _ = self._cols(Z, "Z")
        lam = torch.as_tensor(lam).detach().to(dtype=self.dtype, device=self.device).reshape(-1)
        if lam.numel() != rows.shape[0]:
            raise ValueError(f"lam must have one entry per column of Z ({rows.shape[0]}); got {lam.numel()}")
        if rows.shape[0] == 0:
            return torch.zeros(self.n, dtype=self.dtype, device=self.device)
        with torch.enable_grad():
            out = eng.sym_sum(rows, lam).detach()
        return out if self.support is None else out[self.support]

    def _need_third(self):
        if self.degree < 2:
            raise ValueError("third-order products need an expansion of degree >= 2 (this one has degree 1, "
                             "whose graph may hold fused norms that PyTorch cannot differentiate three times)")

    # ------------------------------------------------------------------------------- lifetime
    def _wd_col(self) -> torch.Tensor:
        wd = self._wd
        return (wd if wd.dim() else wd.expand(self.n)).reshape(self.n, 1)

    def release(self) -> None:
        """Drop the graph / closure: every later product raises; cheap to call twice."""
        if self._engine is not None:
            self._engine.release()
        self._engine = None

    @property
    def released(self) -> bool:
        return self._engine is None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False

    def __repr__(self) -> str:
        return (f"TaylorExpansion(n={self.n}, N={self.N}, degree={self.degree}, lr={self.lr}, "
                f"backend={self.backend!r}, dtype={self.dtype}, released={self.released})")


# ====================================================================================== checks
def _refuse_fused(bad: list) -> None:
    if bad:
        raise UnsupportedGraphError(
            f"loss: its graph holds {', '.join(bad)}, whose third derivatives PyTorch refuses or gets "
            "wrong (pytorch/pytorch#186256, #175754); degree >= 2 needs them. Compute the loss inside "
            "`with torch_qode.taylor.decomposed_norms(model):`, use TaylorExpansion.from_function with "
            "make_loss_fn(model, criterion, batch), or pass degree=1")


def _check_lr(lr) -> float:
    return check_real(require_real(lr, "lr", "a positive float"), "lr", 0.0, low_open=True)


def _check_degree(degree) -> int:
    return check_int(degree, "degree", 1, hint=" (1: linear ODE, 2: quadratic, ...)")


def _check_chunk(chunk) -> int:
    return check_int(chunk, "chunk", 1, hint=" (columns per batched product)")


def _check_weight_decay(weight_decay, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """A number (Python, numpy, 0-d tensor) -> 0-d tensor; a list of per-tensor numbers or a flat
    ``(N,)`` tensor / array -> ``(N,)`` tensor."""
    ref = params[0]
    N = _flat.numel(params)
    kinds = ("weight_decay must be a float, a list of floats (one per parameter tensor) or a flat "
             f"({N},) tensor / array")
    scalar = as_real(weight_decay)
    if scalar is not None:
        wd = torch.tensor(scalar, dtype=ref.dtype, device=ref.device)
    elif isinstance(weight_decay, (torch.Tensor, np.ndarray)) and weight_decay.ndim == 1:
        dt = weight_decay.dtype
        real = (dt != torch.bool and not dt.is_complex) if isinstance(weight_decay, torch.Tensor) \
            else (np.issubdtype(dt, np.integer) or np.issubdtype(dt, np.floating))
        if weight_decay.shape[0] != N or not real:
            raise ValueError(f"weight_decay as a tensor must be real with shape ({N},) (flat), got "
                             f"{tuple(weight_decay.shape)} {weight_decay.dtype}")
        wd = torch.as_tensor(weight_decay).detach().to(dtype=ref.dtype, device=ref.device)
    elif isinstance(weight_decay, (list, tuple)):
        if len(weight_decay) != len(params):
            raise ValueError(f"weight_decay as a list needs one float per parameter tensor ({len(params)}), "
                             f"got {len(weight_decay)}; pass a flat ({N},) tensor for per-entry values")
        vals = [as_real(w) for w in weight_decay]
        if any(v is None for v in vals):
            raise TypeError(f"{kinds}; the list holds {weight_decay!r}")
        wd = torch.cat([torch.full((p.numel(),), v, dtype=ref.dtype, device=ref.device)
                        for v, p in zip(vals, params)])
    else:
        raise TypeError(f"{kinds}, got {type(weight_decay).__name__}")
    if not bool(torch.isfinite(wd).all()) or bool((wd < 0).any()):
        raise ValueError("weight_decay must be finite and >= 0")
    return wd


def _from_model(cls, model, criterion, batch, *, lr, params, support, degree, weight_decay, backend, seed, chunk):
        """:meth:`from_function` on ``make_loss_fn(model, criterion, batch, params)`` at the current values.

        Normalisation layers run decomposed when ``degree >= 2`` (third derivatives needed) and fused
        otherwise (faster, exact to second order).  ``weight_decay`` takes the forms of
        :meth:`from_loss` (a float, one float per tensor of ``params``, or a flat ``(N,)`` vector).
        """
        loss_fn = make_loss_fn(model, criterion, batch, params, seed=seed,
                               decompose_norms=_check_degree(degree) >= 2)
        wd = _check_weight_decay(weight_decay, loss_fn.params)   # per-tensor values -> the flat vector
        theta0 = _flat.flatten([p.detach() for p in loss_fn.params])
        return cls.from_function(loss_fn, theta0, lr=lr, support=support, degree=degree,
                                 weight_decay=wd, backend=backend, chunk=chunk)


from .taylor_ode import expansion_ode  # noqa: E402  (the ODE of an expansion: its own module)
