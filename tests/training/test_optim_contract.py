"""QODE in classical mode against PyTorch's generic optimizer contract.

PyTorch checks every built-in optimizer with the generic tests of ``TestOptimRenewed`` (its
``test/test_optim.py``, which the wheel does not ship), each driven by what an optimizer registers in
``torch.testing._internal.common_optimizers``.  Here QODE (``mode="classical"``, no pruning) is
registered the way SGD is: it takes SGD's own registration (its inputs, error inputs, schedulers, the
flags an old state_dict lacks, the sparse check's settings; read by :func:`registered`), and each test
below re-states one of the generic checks that applies to an SGD-like optimizer on the CPU — and, where
the generic test only asks for a direction or "no error", also asks for SGD's numbers bit for bit.
Classical QODE is driven the way the generic tests drive SGD (``STYLES``): gradients from
``loss.backward()`` outside the optimizer then ``opt.step()``, or ``opt.step(closure)`` with a closure
that only returns the loss, and also the LBFGS way, a closure that calls ``backward()`` (what a window
needs).  Where QODE differs from SGD by design, the test asserts the refusal and its message: a closure
at the upload and the window's steps (not in classical mode), no ``maximize`` or ``differentiable``,
complex weights only in classical mode, and no ``fused=True`` on a non-contiguous CPU weight
(PyTorch's fused kernel updates the wrong entries there: shown below on SGD itself).
"""
from __future__ import annotations

import copy
import functools
import io
import json
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch.optim import lr_scheduler
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from torch_qode.training.qode import QODE
from tests.training.test_window_core import _same

CLASSICAL = dict(mode="classical", sparsity=0.0)

#: Run in a child process: ``torch.testing._internal`` changes torch's global state on import (it
#: freezes the ``torch.backends`` flags, which the recipes set, and wraps TorchScript calls), so the
#: suite reads SGD's registration from a child that prints it as JSON.  Schedulers are rebuilt from
#: their constructor arguments, each checked there to give the registered one's learning rates.
_DUMP = r"""
import inspect, json, torch
from torch.testing._internal.common_optimizers import optim_db, optim_inputs_func_sgd, optim_error_inputs_func_sgd
info = next(o for o in optim_db if o.optim_cls is torch.optim.SGD)
ids = {}
def value(v):
    return {"tensor": v.tolist()} if isinstance(v, torch.Tensor) else v
def params(p):
    if p is None or isinstance(p, torch.Tensor):
        return None if p is None else {"param": ids.setdefault(id(p), len(ids)), "shape": list(p.shape)}
    if isinstance(p, tuple):
        return {"named": [p[0], params(p[1])]}
    if isinstance(p, dict):
        return {"group": {k: params(v) if k == "params" else value(v) for k, v in p.items()}}
    return [params(q) for q in p]
def sched(f):
    lrs = []
    for rebuilt in (None, True):
        w = torch.zeros(1, requires_grad=True)
        opt = torch.optim.SGD([w], lr=0.1)
        if rebuilt:
            s = getattr(torch.optim.lr_scheduler, name)(opt, **kw)
        else:
            s = f(opt)
            name = type(s).__name__
            kw = {n: getattr(s, n) for n in inspect.signature(type(s).__init__).parameters
                  if n not in ("self", "optimizer", "last_epoch") and hasattr(s, n)}
            if hasattr(s, "min_lrs"):
                kw["min_lr"] = s.min_lrs[0]
        seq = []
        for i in range(40):
            opt.step()
            s.step(float(i % 7)) if name == "ReduceLROnPlateau" else s.step()
            seq.append(opt.param_groups[0]["lr"])
        lrs.append(seq)
    assert lrs[0] == lrs[1], (name, kw)
    return {"cls": name, "kwargs": kw}
print(json.dumps({
    "inputs": [{"desc": i.desc, "kwargs": {k: value(v) for k, v in i.kwargs.items()}}
               for i in optim_inputs_func_sgd(device="cpu", dtype=torch.float32)],
    "errors": [{"desc": e.optimizer_error_input.desc, "params": params(e.optimizer_error_input.params),
                "kwargs": {k: value(v) for k, v in e.optimizer_error_input.kwargs.items()},
                "error": e.error_type.__name__, "warning": issubclass(e.error_type, Warning)}
               for e in optim_error_inputs_func_sgd(device="cpu", dtype=torch.float32)],
    "schedulers": [[sched(f) for f in lst] for lst in info.scheduler_inputs],
    "not_og_supported_flags": list(info.not_og_supported_flags),
    "sparse_kwarg_updates": {k: value(v) for k, v in info.metadata_for_sparse[0].items()},
}))
"""


@functools.lru_cache(maxsize=None)
def registered() -> dict:
    """SGD's registration in ``torch.testing._internal.common_optimizers`` (read in a child process)."""
    out = subprocess.run([sys.executable, "-c", _DUMP], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _value(v):
    return torch.tensor(v["tensor"]) if isinstance(v, dict) and "tensor" in v else v


def sgd_inputs() -> list:
    """SGD's registered inputs as ``(desc, kwargs)``, a tensor lr as a fresh tensor each call."""
    return [(i["desc"], {k: _value(v) for k, v in i["kwargs"].items()}) for i in registered()["inputs"]]


def scheduler_lists() -> list:
    return [[functools.partial(getattr(lr_scheduler, s["cls"]), **s["kwargs"]) for s in lst]
            for lst in registered()["schedulers"]]


def _inputs(impls=("", "foreach", "fused")) -> list:
    """SGD's registered inputs, each also with ``foreach=True`` and ``fused=True`` (as PyTorch's helper
    adds the global flags), less ``maximize`` (refused: :func:`test_maximize_is_refused_naming_the_fix`)."""
    out = []
    for desc, kwargs in sgd_inputs():
        if kwargs.get("maximize"):
            continue
        for impl in impls:
            kw = dict(kwargs, **({impl: True} if impl else {}))
            out.append(pytest.param(kw, id=desc + (f", {impl}" if impl else "")))
    return out


def _lr(kw: dict) -> dict:
    """The settings for one more optimizer: SGD's default lr where the input leaves it out (QODE's default
    is 0.01, SGD's 1e-3), and a tensor lr as a fresh copy (a tensor lr is shared, not copied)."""
    kw = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    return kw if "lr" in kw else dict(kw, lr=1e-3)


def _pair(params_q, params_s, kw: dict):
    return QODE(params_q, **_lr(kw), **CLASSICAL), torch.optim.SGD(params_s, **_lr(kw))


def _weights(seed: int = 0, dtype=torch.float32, contiguous: bool = True):
    g = torch.Generator().manual_seed(seed)
    if contiguous:
        w, b = torch.randn(10, 5, generator=g, dtype=dtype), torch.randn(10, generator=g, dtype=dtype)
    else:
        w = torch.randn(10, 5, 2, generator=g, dtype=dtype)[..., 0]
        b = torch.randn(10, 2, generator=g, dtype=dtype)[..., 0]
    return w.requires_grad_(), b.requires_grad_()


def _linear_loss(w, b, x):
    return (w.mv(x) + b).pow(2).sum()


#: how a test drives an optimizer: the generic tests' SGD ways (``backward()`` outside, then ``step()``;
#: or ``step(closure)`` with a closure that only returns the loss) and the LBFGS way (the closure calls
#: ``backward()``: what a quantum window needs)
STYLES = ["closure", "step()", "loss-only closure"]


def _step(opt, loss_fn, after=None, style: str = "closure"):
    """One step of ``opt`` in ``style`` (:data:`STYLES`); ``after()`` runs once the gradients are in
    ``.grad`` (where a test touches them).  Returns what ``opt.step`` returns."""
    def grads():
        opt.zero_grad()
        loss = loss_fn()
        if loss.requires_grad:
            loss.backward()
        if after is not None:
            after()
        return loss
    if style == "closure":
        return opt.step(grads)
    loss = grads()
    return opt.step() if style == "step()" else opt.step(lambda: loss)


# ------------------------------------------------------------------------------ construction
def test_the_registered_inputs_set_no_global_flag():
    """PyTorch's rule for ``optim_inputs_func``: foreach / fused / differentiable are added by the
    harness, never by the inputs (so every input above runs on each path)."""
    assert len(sgd_inputs()) >= 9
    for _, kwargs in sgd_inputs():
        assert not {"foreach", "fused", "differentiable"} & set(kwargs)


def _build(spec, made: dict):
    """The parameters of an error input, rebuilt (the same index: the same tensor)."""
    if spec is None:
        return None
    if isinstance(spec, list):
        return [_build(q, made) for q in spec]
    if "param" in spec:
        return made.setdefault(spec["param"], nn.Parameter(torch.randn(*spec["shape"])))
    if "named" in spec:
        return (spec["named"][0], _build(spec["named"][1], made))
    return {k: _build(v, made) if k == "params" else _value(v) for k, v in spec["group"].items()}


@pytest.mark.parametrize("err", registered()["errors"], ids=lambda e: e["desc"])
def test_errors_are_sgds(err):
    """SGD's registered error inputs give QODE the same exception (or warning) type, before any step."""
    params, kwargs = _build(err["params"], {}), {k: _value(v) for k, v in err["kwargs"].items()}
    if err["warning"]:
        with pytest.warns(UserWarning, match="duplicate"):
            QODE(params, **kwargs, **CLASSICAL)
    else:
        errors = {"TypeError": TypeError, "ValueError": ValueError, "RuntimeError": RuntimeError}
        with pytest.raises(errors[err["error"]]):
            QODE(params, **kwargs, **CLASSICAL)


def test_maximize_is_refused_naming_the_fix():
    w, b = _weights()
    with pytest.raises(ValueError, match="maximize"):
        QODE([w, b], maximize=True, **CLASSICAL)


# ------------------------------------------------------------------------------ numbers
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("kw", _inputs())
def test_goes_the_right_way_as_sgd_does_bit_for_bit(kw, contiguous, style):
    """20 steps on ``(W x + b)²`` (the generic direction test), with and without SGD's registered
    schedulers, QODE driven in ``style`` and SGD as the generic test drives it (backward, ``step()``):
    the loss falls, and every weight equals SGD's after every step.  ``fused=True`` on
    non-contiguous weights is refused (:func:`test_fused_on_non_contiguous_weights_is_refused`)."""
    x = torch.randn(5, generator=torch.Generator().manual_seed(1))
    if kw.get("fused") and not contiguous:
        with pytest.raises(ValueError, match="fused=True.*not contiguous"):
            QODE(list(_weights(contiguous=False)), **_lr(kw), **CLASSICAL)
        return
    for scheds in [[]] + scheduler_lists():
        (wq, bq), (ws, bs) = _weights(contiguous=contiguous), _weights(contiguous=contiguous)
        q, s = _pair([wq, bq], [ws, bs], kw)
        sq, ss = [f(q) for f in scheds], [f(s) for f in scheds]
        first = None
        for _ in range(20):
            for opt, (w, b), sch in ((q, (wq, bq), sq), (s, (ws, bs), ss)):
                def fn(w=w, b=b):
                    return _linear_loss(w, b, x)
                if opt is q:
                    loss = _step(q, fn, style=style)
                    if style == "step()":
                        assert loss is None               # as SGD's step() returns
                        loss = fn().detach()
                else:
                    opt.zero_grad()
                    loss = fn()
                    loss.backward()
                    opt.step()
                for sc in sch:
                    sc.step(loss.detach()) if isinstance(sc, lr_scheduler.ReduceLROnPlateau) else sc.step()
            first = loss.item() if first is None else first
            assert torch.equal(wq, ws) and torch.equal(bq, bs)
        assert _linear_loss(wq, bq, x).item() < first


@pytest.mark.parametrize("num_dim", [0, 1, 2])
@pytest.mark.parametrize("kw", _inputs(impls=("", "foreach")))
def test_a_tensor_lr_of_any_one_element_shape_equals_the_float(kw, num_dim):
    kw = {k: v for k, v in kw.items() if k != "lr"}
    (w, b), (wc, bc) = _weights(), _weights()
    x = torch.randn(5, generator=torch.Generator().manual_seed(1))
    opt = QODE([w, b], lr=1e-3, **kw, **CLASSICAL)
    opt_c = QODE([wc, bc], lr=torch.tensor(1e-3).reshape([1] * num_dim), **kw, **CLASSICAL)
    for _ in range(5):
        for o, (p, q) in ((opt, (w, b)), (opt_c, (wc, bc))):
            _step(o, lambda p=p, q=q: _linear_loss(p, q, x))
        assert torch.equal(w, wc) and torch.equal(b, bc)


def _derived_model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(2, 3), nn.Sigmoid(), nn.Linear(3, 1), nn.Sigmoid()).to(torch.float64)


@pytest.mark.parametrize("style", STYLES[:2])
@pytest.mark.parametrize("impl", ["foreach", "fused"])
@pytest.mark.parametrize("kw", _inputs(impls=("",)))
def test_foreach_and_fused_match_the_for_loop(kw, impl, style):
    """The generic derived-path check: the same model twice, one on the for-loop path and one on
    ``impl``; 7 steps with a step without gradients (2), a layer frozen (3) and unfrozen (5) — by
    setting its ``.grad`` to None, as QODE keeps every parameter trainable — and a 0-d parameter;
    weights and every entry of ``state`` equal after each step (``fused`` within SGD's own fused/for-loop
    tolerance; the for-loop and foreach paths bit for bit, as SGD's are)."""
    runs = []
    for flag in (False, True):
        model = _derived_model()
        empty = torch.randn((), dtype=torch.float64, requires_grad=True)
        params = list(model.parameters()) + [empty]
        opt = QODE(params, **_lr(kw), **{impl: flag}, **CLASSICAL)
        x = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=torch.float64).reshape(3, 2)
        trace = []
        for i in range(7):
            def after(i=i):
                if i != 2:
                    empty.grad = torch.rand_like(empty)
                if i in (3, 4):
                    for p in model[2].parameters():
                        p.grad = None
            _step(opt, (lambda: model(x).sum()) if i != 2 else (lambda: torch.tensor(0.0)), after, style)
            trace.append(([p.detach().clone() for p in params],
                          [{k: v.clone() for k, v in opt.state[p].items()} for p in params]))
        runs.append(trace)
    for (pa, sa), (pb, sb) in zip(*runs):
        for a, b in zip(pa, pb):
            if impl == "foreach":
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b)
        for da, db in zip(sa, sb):
            assert da.keys() == db.keys()
            for k in da:
                torch.testing.assert_close(da[k], db[k], rtol=0, atol=0) if impl == "foreach" else \
                    torch.testing.assert_close(da[k], db[k])


def test_fused_on_non_contiguous_weights_is_refused():
    """torch 2.14's fused CPU SGD reads a contiguous gradient with a non-contiguous weight's strides:
    shown here on SGD itself (the update lands on the wrong entries), and refused by QODE."""
    base = torch.randn(10, 5, 2, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(10, 5, generator=torch.Generator().manual_seed(1))
    moved = {}
    for fused in (False, True):
        w = base.clone()[..., 0].requires_grad_()
        opt = torch.optim.SGD([w], lr=0.1, fused=fused)
        w.grad = grad.clone()
        opt.step()
        moved[fused] = w.detach() - base[..., 0]
    torch.testing.assert_close(moved[False], -0.1 * grad)
    assert not torch.allclose(moved[True], -0.1 * grad)       # PyTorch's fused kernel, not ours
    with pytest.raises(ValueError, match=r"fused=True.*params\[0\].*not contiguous"):
        QODE([base.clone()[..., 0].requires_grad_()], fused=True, **CLASSICAL)
    QODE([base.clone()[..., 0].requires_grad_()], foreach=True, **CLASSICAL)


def test_fused_equals_sgds_fused_bit_for_bit():
    (wq, bq), (ws, bs) = _weights(dtype=torch.float64), _weights(dtype=torch.float64)
    kw = dict(lr=0.05, momentum=0.9, weight_decay=0.1, nesterov=True, fused=True)
    q, s = _pair([wq, bq], [ws, bs], kw)
    x = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for _ in range(6):
        for o, (w, b) in ((q, (wq, bq)), (s, (ws, bs))):
            _step(o, lambda w=w, b=b: _linear_loss(w, b, x))
        assert torch.equal(wq, ws) and torch.equal(bq, bs)


@pytest.mark.parametrize("kw", _inputs(impls=("", "foreach")))
def test_complex_weights_train_as_sgd_and_as_their_real_views(kw):
    """The generic complex check (complex64 weights against ``view_as_real`` twins, 3 steps, the same
    gradients), plus SGD's numbers bit for bit; a window's ODE is real, so only ``mode="classical"``
    takes complex weights, and the other modes say so."""
    g = torch.Generator().manual_seed(0)
    zw, zb = (torch.randn(*s, dtype=torch.complex64, generator=g) for s in ((10, 5), (10,)))
    rw = torch.randn(10, 5, generator=g)
    cplx = [t.clone().requires_grad_() for t in (zw, zb, rw)]
    sgd = [t.clone().requires_grad_() for t in (zw, zb, rw)]
    real = [torch.view_as_real(t).clone().requires_grad_() if t.is_complex() else t.clone().requires_grad_()
            for t in (zw, zb, rw)]
    q, s_ = QODE(cplx, **_lr(kw), **CLASSICAL), torch.optim.SGD(sgd, **_lr(kw))
    r = QODE(real, **_lr(kw), **CLASSICAL)
    for i in range(3):
        grads = [torch.randn(t.shape, dtype=t.dtype, generator=torch.Generator().manual_seed(10 + i + j))
                 for j, t in enumerate(cplx)]

        def setter(ps, gs):
            def after():
                for p, gr in zip(ps, gs):
                    p.grad = gr.clone()
            return after
        _step(q, lambda: sum((p.abs() ** 2).sum() for p in cplx), setter(cplx, grads))
        _step(s_, lambda: sum((p.abs() ** 2).sum() for p in sgd), setter(sgd, grads))
        _step(r, lambda: sum((p ** 2).sum() for p in real),
              setter(real, [torch.view_as_real(gr) if gr.is_complex() else gr for gr in grads]))
        for a, b, c in zip(cplx, sgd, real):
            assert torch.equal(a, b)
            torch.testing.assert_close(torch.view_as_real(a) if a.is_complex() else a, c)
    for mode in ("auto", "quantum"):
        with pytest.raises(ValueError, match=r"params\[0\] is complex.*mode='classical'"):
            QODE([zw.clone().requires_grad_()], mode=mode, sparsity=0.0)


def test_sparse_gradients_train_as_sgd_on_its_sparse_input():
    """SGD's sparse check runs its one sparse-compatible input (``metadata_for_sparse``: dampening,
    lr 0.0048); here QODE and SGD take the same uncoalesced sparse gradients, bit for bit, and the
    steps go where the dense twin goes."""
    kw_updates = registered()["sparse_kwarg_updates"]   # the keys SGD's sparse check strips, and its lr
    kws = {tuple(sorted((k, v) for k, v in kw.items() if k not in kw_updates)) for _, kw in sgd_inputs()} - {()}
    assert len(kws) == 1                              # {dampening: 0.5}, as PyTorch's check finds
    kw = dict(next(iter(kws)), lr=kw_updates["lr"])
    weights = {k: torch.tensor([1.5, 1.5], requires_grad=True) for k in ("qode", "sgd", "dense")}
    opts = {"qode": QODE([weights["qode"]], **kw, **CLASSICAL), "sgd": torch.optim.SGD([weights["sgd"]], **kw),
            "dense": QODE([weights["dense"]], **kw, **CLASSICAL)}
    for i in range(1800):                           # as PyTorch's check
        for name, opt in opts.items():
            w = weights[name]

            def after(w=w, name=name, i=i):
                j = i % 2                          # cyclic coordinate descent on Rosenbrock
                x, y = w.detach()
                grad = [-400 * x * (y - x ** 2) - 2 * (1 - x), 200 * (y - x ** 2)][j]
                idx = torch.tensor([[j, j]])
                vals = torch.stack([grad / 4, grad * 3 / 4])
                sparse = torch.sparse_coo_tensor(idx, vals, (2,), check_invariants=True)   # uncoalesced: j twice
                w.grad = sparse if name != "dense" else sparse.to_dense()
            _step(opt, lambda w=w: (1 - w[0]) ** 2 + 100 * (w[1] - w[0] ** 2) ** 2, after)
        assert torch.equal(weights["qode"], weights["sgd"])
        torch.testing.assert_close(weights["qode"], weights["dense"], atol=5e-6, rtol=5e-6)
    assert (weights["qode"] - 1).norm() < (torch.tensor([1.5, 1.5]) - 1).norm()


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("kw", _inputs())
def test_no_gradients_or_zero_gradients_change_nothing(kw, style):
    """As SGD: a step where every ``.grad`` is None moves nothing (and keeps no state); zero gradients
    move nothing without weight decay, and move as SGD's with it."""
    (w, b), (ws, bs) = _weights(), _weights()
    before = (w.detach().clone(), b.detach().clone())
    opt, sgd = _pair([w, b], [ws, bs], kw)
    _step(opt, lambda: torch.tensor([1.0]), style=style)       # no .grad at all
    sgd.step()
    assert w.grad is None and torch.equal(w, before[0]) and torch.equal(b, before[1])
    assert not opt.state and not sgd.state
    _step(opt, lambda: (w * 0).sum() + (b * 0).sum(), style=style)   # zero gradients
    _step(sgd, lambda: (ws * 0).sum() + (bs * 0).sum(), style="step()")
    assert torch.equal(w, ws) and torch.equal(b, bs)
    if kw.get("weight_decay", 0) == 0:
        assert torch.equal(w, before[0]) and torch.equal(b, before[1])
    assert opt.step_count == 2 and opt.reports[0].skipped_steps == 0


@pytest.mark.parametrize("mode", ["auto", "quantum"])
def test_the_classical_steps_of_a_cycle_take_step_without_a_closure_and_the_upload_names_itself(mode):
    """In mode auto/quantum the classical steps (c < classical_steps) are SGD's, ``step()`` included, bit
    for bit; the upload (the window expands its loss) raises a TypeError naming it, changing nothing,
    and then takes the closure."""
    (wq, bq), (ws, bs) = _weights(dtype=torch.float64), _weights(dtype=torch.float64)
    x = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    q = QODE([wq, bq], lr=0.01, momentum=0.9, weight_decay=0.1, mode=mode, cycle=5, classical_steps=3,
             sparsity=0.0, shots=None)
    s = torch.optim.SGD([ws, bs], lr=0.01, momentum=0.9, weight_decay=0.1)
    for i in range(3):
        _step(q, lambda: _linear_loss(wq, bq, x), style=STYLES[1 + i % 2])
        _step(s, lambda: _linear_loss(ws, bs, x), style="step()")
        assert torch.equal(wq, ws) and torch.equal(bq, bs)
    before = (wq.detach().clone(), bq.detach().clone())
    with pytest.raises(TypeError, match=rf"(?s)step 3 is the upload \(c = classical_steps\) of its cycle "
                                        rf"\(mode='{mode}'\), which needs a closure.*torch.optim.SGD"):
        _step(q, lambda: _linear_loss(wq, bq, x), style="step()")
    assert q.step_count == 3 and not q.in_quantum_window
    assert torch.equal(wq, before[0]) and torch.equal(bq, before[1])
    with pytest.raises(RuntimeError, match=r"did not call loss.backward"):   # the loss-only closure, too
        _step(q, lambda: _linear_loss(wq, bq, x), style="loss-only closure")
    assert q.step_count == 3 and torch.equal(wq, before[0])
    _step(q, lambda: _linear_loss(wq, bq, x))            # the upload with a closure: the window opens
    assert q.in_quantum_window
    with pytest.raises(TypeError, match=r"step 4 is step t=1 of a quantum window"):
        _step(q, lambda: _linear_loss(wq, bq, x), style="step()")
    _step(q, lambda: _linear_loss(wq, bq, x))
    assert q.step_count == 5 and q.reports[0].mode == "quantum"


@pytest.mark.parametrize("kw", _inputs())
def test_gradients_are_never_written_in_place(kw):
    w, b = _weights()
    opt = QODE([w, b], **_lr(kw), **CLASSICAL)
    x = torch.randn(5, generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        versions = []
        _step(opt, lambda: _linear_loss(w, b, x), lambda: versions.append((w.grad._version, b.grad._version)))
        assert (w.grad._version, b.grad._version) == versions[0]


# ------------------------------------------------------------------------------ state
def _primed(kw, steps: int = 10, named: bool = False):
    w, b = _weights()
    x = torch.randn(5, generator=torch.Generator().manual_seed(1))
    opt = QODE([("w", w), ("b", b)] if named else [w, b], **_lr(kw), **CLASSICAL)

    def closure():
        opt.zero_grad()
        loss = _linear_loss(w, b, x)
        loss.backward()
        return loss
    for _ in range(steps):
        opt.step(closure)
    return opt, (w, b), x


@pytest.mark.parametrize("style", STYLES[:2])
@pytest.mark.parametrize("named", [False, True])
@pytest.mark.parametrize("kw", _inputs())
def test_a_loaded_state_dict_continues_identically_and_stays_equal(kw, named, style):
    opt, (w, b), x = _primed(kw, named=named)
    wc, bc = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    opt_c = QODE([("w", wc), ("b", bc)] if named else [wc, bc], **_lr(kw), **CLASSICAL)
    opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(10):
        for o, (p, q) in ((opt, (w, b)), (opt_c, (wc, bc))):
            _step(o, lambda p=p, q=q: _linear_loss(p, q, x), style=style)
        assert torch.equal(w, wc) and torch.equal(b, bc)
    sd, sd_c = opt.state_dict(), opt_c.state_dict()
    assert _same(sd, sd_c)
    if named:
        assert sd["param_groups"][0]["param_names"] == ["w", "b"]


@pytest.mark.parametrize("kw", _inputs())
def test_state_dict_saves_and_loads_with_weights_only(kw):
    opt, _, _ = _primed(kw, steps=3)
    sd = opt.state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    for weights_only in (False, True):
        buf.seek(0)
        assert _same(torch.load(buf, weights_only=weights_only), sd)


@pytest.mark.parametrize("kw", _inputs())
def test_a_state_dict_without_the_newer_flags_loads_and_steps(kw):
    opt, (w, b), x = _primed(kw, steps=3)
    sd = copy.deepcopy(opt.state_dict())
    for group in sd["param_groups"]:
        for flag in registered()["not_og_supported_flags"]:
            group.pop(flag, None)
    opt.load_state_dict(sd)
    _step(opt, lambda: _linear_loss(w, b, x))
    assert torch.isfinite(w).all()


@pytest.mark.parametrize("kw", _inputs())
def test_printable_deep_copied_with_every_public_attribute_and_no_empty_state(kw):
    opt, _, _ = _primed(kw, steps=3)
    assert "QODE" in repr(opt)
    assert set(k for k in vars(opt) if not k.startswith("_")) == \
        set(k for k in vars(copy.deepcopy(opt)) if not k.startswith("_"))
    assert all(len(v) > 0 for v in opt.state.values())
    pickle.loads(pickle.dumps(opt))


# ------------------------------------------------------------------------------ hooks
def test_state_dict_and_load_state_dict_hooks_run_in_order_around_the_whole_state():
    """The generic hook checks, and QODE's own part: a ``state_dict`` post-hook sees the ``"qode"``
    entry, a load pre-hook may change it, a load post-hook sees the optimizer fully loaded."""
    opt, _, _ = _primed({"lr": 1e-3}, steps=3)
    opt.register_state_dict_pre_hook(lambda o: o.state.__setitem__("test", 1))
    seen = {}

    def post(o, sd):
        seen["post"] = "test" in sd["state"] and sd["qode"]["k"] == 3
    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert sd["state"]["test"] == 1 and seen["post"]
    del opt.state["test"]
    sd["state"].pop("test")

    def first(o, s):
        s = copy.deepcopy(s)
        s["param_groups"][0]["lr"] = 0.003
        s["qode"]["k"] = 7
        return s

    def last(o, s):
        s["param_groups"][0]["lr"] = 0.002
    opt.register_load_state_dict_pre_hook(last)
    opt.register_load_state_dict_pre_hook(first, prepend=True)
    opt.register_load_state_dict_post_hook(lambda o: seen.setdefault("loaded", (o.param_groups[0]["lr"], o.step_count)))
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.002 and opt.step_count == 7 and seen["loaded"] == (0.002, 7)
    assert sd["qode"]["k"] == 3                      # the caller's dict is left alone


def test_qode_own_hooks_stay_outermost_whatever_users_register_and_copies_keep_them_once():
    """QODE's part of the state goes through torch's public hooks: with user hooks registered before and
    after, with and without ``prepend``, every user state_dict post-hook sees the ``"qode"`` entry, every
    user load pre-hook sees it (and runs before QODE takes it out), every user load post-hook sees the
    optimizer fully loaded; deepcopy and pickle carry QODE's hooks exactly once, and no user hook."""
    opt, _, _ = _primed({"lr": 1e-3}, steps=3)
    seen = []
    for prepend in (False, True):
        opt.register_state_dict_post_hook(lambda o, sd, p=prepend: seen.append(("post", p, "qode" in sd)),
                                          prepend=prepend)
        opt.register_load_state_dict_pre_hook(
            lambda o, sd, p=prepend: seen.append(("pre", p, sd.get("qode", {}).get("k"))), prepend=prepend)
        opt.register_load_state_dict_post_hook(lambda o, p=prepend: seen.append(("loaded", p, o.step_count)),
                                               prepend=prepend)
    sd = opt.state_dict()
    assert sorted(seen) == [("post", False, True), ("post", True, True)]
    seen.clear()
    opt.load_state_dict(sd)
    assert [e for e in seen if e[0] == "pre"] == [("pre", True, 3), ("pre", False, 3)]
    assert [e for e in seen if e[0] == "loaded"] == [("loaded", True, 3), ("loaded", False, 3)]
    for twin in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        seen.clear()
        got = twin.state_dict()
        assert seen == [] and _same(got, sd)                 # QODE's entry, no user hook
        assert [len(getattr(twin, t)) for t in ("_optimizer_state_dict_post_hooks",
                                                "_optimizer_load_state_dict_pre_hooks",
                                                "_optimizer_load_state_dict_post_hooks")] == [1, 1, 1]
        twin.load_state_dict(got)
        assert twin.step_count == 3
    with pytest.raises(ValueError, match="missing the 'qode' entry"):
        opt.load_state_dict({k: v for k, v in sd.items() if k != "qode"})
    assert opt.step_count == 3


def test_step_hooks_local_and_global_run_in_order_and_come_off():
    w = torch.tensor([[1.0, 1.0]], requires_grad=True)
    opt = QODE([w], lr=1e-3, **CLASSICAL)
    order = []
    handles = [register_optimizer_step_pre_hook(lambda *a: order.append(0)),
               opt.register_step_pre_hook(lambda *a: order.append(1)),
               opt.register_step_post_hook(lambda *a: order.append(2)),
               register_optimizer_step_post_hook(lambda *a: order.append(5))]
    try:
        for _ in range(3):
            _step(opt, lambda: w.sum())
        assert order == [0, 1, 2, 5] * 3
    finally:
        for h in handles:
            h.remove()
    _step(opt, lambda: w.sum())
    assert order == [0, 1, 2, 5] * 3
