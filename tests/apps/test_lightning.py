"""QODE under a real Lightning ``Trainer`` (CPU, tiny MLP): torch_qode.lightning.QODECallback.

Four batches an epoch and ``cycle=8, classical_steps=2``: the end of epoch 0 (step 4) and of epoch 2
(step 12) fall inside a matrix-free quantum window (its steps 2..7), the end of epoch 1 (step 8) on
a cycle boundary.  Checkpoints are taken at epoch ends, where Lightning resumes its data exactly.
"""
import csv
import warnings

import lightning.pytorch as pl     # in the test extra: make test runs a real Trainer
import pytest
import torch
import torch.nn as nn

from torch_qode import DissipationCheck, DissipationMonitor, QODE
from torch_qode.lightning import QODECallback
from tests.training.test_qode import _untimed as untimed, closure_for

KW = dict(lr=0.05, momentum=0.9, mode="quantum", cycle=8, classical_steps=2, sparsity=0.2, explicit=False,
          shots=3000, track_sgd=True)
N_BATCH, BATCH = 4, 6


def auto():
    """mode="auto" with the default (predicted) check; min_positive_fraction=0.35 would let the paper's criterion
    pass this tiny MLP too (its Hessian has 41-45% positive eigenvalues)."""
    return dict(mode="auto", dissipation=DissipationCheck(min_positive_fraction=0.35))


def data():
    g = torch.Generator().manual_seed(5)
    return torch.randn(N_BATCH * BATCH, 3, generator=g, dtype=torch.float64), \
        torch.randn(N_BATCH * BATCH, 2, generator=g, dtype=torch.float64)


def loader():
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data()), batch_size=BATCH)


def net(seed, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Dropout(dropout), nn.Linear(4, 2)).double()


class Lit(pl.LightningModule):
    def __init__(self, seed=0, manual=False, dropout=0.0, **kwargs):
        super().__init__()
        self.net, self.kwargs = net(seed, dropout), {**KW, **kwargs}
        self.automatic_optimization = not manual

    def loss(self, batch):
        x, y = batch
        return ((self.net(x) - y) ** 2).mean()

    def training_step(self, batch, batch_idx):
        if self.automatic_optimization:
            loss = self.loss(batch)
            self.log("train_loss", loss)
            return loss
        opt = self.optimizers()

        def closure():
            opt.zero_grad()
            loss = self.loss(batch)
            self.manual_backward(loss)
            return loss
        opt.step(closure)

    def configure_optimizers(self):
        return QODE(self.parameters(), **self.kwargs)


def trainer(tmp_path=None, epochs=5, callbacks=(), **kwargs):
    kwargs.setdefault("logger", False)
    kwargs.setdefault("devices", 1)
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path,
                      enable_checkpointing=tmp_path is not None, callbacks=list(callbacks), **kwargs)


def checkpoints(tmp_path):
    return pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_epochs=1, save_top_k=-1)


def reports(opt):
    return [untimed(r.as_dict()) for r in opt.reports]


def same_weights(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def fit(lit, tr, ckpt_path=None):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*(does not have many workers|LightningModule.*checkpoint).*")
        tr.fit(lit, loader(), ckpt_path=ckpt_path)
    return lit, tr.optimizers[0]


def plain_loop(model, opt, epochs, before_step=None):
    """The reference: ``opt`` trains ``model`` on the same batches in a plain loop (``before_step(opt)``
    first at each step); returns ``opt``."""
    for _ in range(epochs):
        for x, y in loader():
            if before_step is not None:
                before_step(opt)
            opt.step(closure_for(model, opt, x, y))
    return opt


# ------------------------------------------------------------------------------------- fit
@pytest.mark.parametrize("with_callback", [False, True])
def test_fit_equals_a_plain_loop_bit_for_bit(with_callback):
    lit, opt = fit(Lit(), trainer(epochs=3, callbacks=[QODECallback()] if with_callback else []))
    model = net(0)
    ref = plain_loop(model, QODE(model.parameters(), **KW), epochs=3)
    assert opt.step_count == ref.step_count == 12
    assert [r.mode for r in ref.reports] == ["quantum", "quantum"]
    assert same_weights(lit.net, model) and reports(opt) == reports(ref)


# ---------------------------------------------------------------------------------- resume
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Five epochs (20 steps) with a checkpoint at every epoch end."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    lit, opt = fit(Lit(), trainer(tmp, callbacks=[QODECallback(), checkpoints(tmp)]))
    assert [r.mode for r in opt.reports] == ["quantum"] * 3
    return lit, opt, tmp / "ckpt"


@pytest.mark.parametrize("step,where", [(4, "mid-window"), (8, "cycle boundary"), (12, "mid-window")])
def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(uninterrupted, step, where):
    ref, ref_opt, ckpt = uninterrupted
    saved = torch.load(ckpt / f"step={step}.ckpt", weights_only=True)
    upload = saved["callbacks"]["QODECallback"]["upload"]
    assert (upload is None) == (where == "cycle boundary")
    if upload is not None:
        assert upload["step"] == step // 8 * 8 + 2 and upload["batch_idx"] == 2
        assert saved["optimizer_states"][0]["qode"]["window"]["terms"] is None      # matrix-free
    lit, opt = fit(Lit(seed=7), trainer(callbacks=[QODECallback()]), ckpt_path=ckpt / f"step={step}.ckpt")
    assert opt.step_count == 20
    assert same_weights(lit.net, ref.net) and reports(opt) == reports(ref_opt)


def test_without_the_callback_a_mid_window_resume_is_not_exact(uninterrupted):
    """The control: Lightning alone re-expands on the next batch and drifts from the uninterrupted run."""
    ref, ref_opt, ckpt = uninterrupted
    lit, opt = fit(Lit(seed=7), trainer(), ckpt_path=ckpt / "step=4.ckpt")
    assert any("re-expanded" in f for f in opt.reports[0].faults)
    assert not same_weights(lit.net, ref.net)


class KeepRNG(pl.Callback):
    """The global RNG through a checkpoint (Lightning does not keep it): dropout resumes too."""

    def state_dict(self):
        return {"rng": torch.get_rng_state()}

    def load_state_dict(self, state):
        torch.set_rng_state(state["rng"])      # before the resumed epoch's DataLoader draws its seed


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_mid_window_resume_with_dropout_and_manual_optimisation(tmp_path, manual):
    """The upload's dropout masks are drawn again (its RNG state is in the checkpoint); in manual
    optimisation the module's own training_step rebuilds the expansion."""
    make = dict(manual=manual, dropout=0.25)
    ref, ref_opt = fit(Lit(**make), trainer(tmp_path, epochs=3, callbacks=[QODECallback(), KeepRNG(),
                                                                             checkpoints(tmp_path)]))
    lit, opt = fit(Lit(seed=7, **make), trainer(epochs=3, callbacks=[QODECallback(), KeepRNG()]),
                   ckpt_path=tmp_path / "ckpt" / "step=4.ckpt")
    assert opt.step_count == 12 and not any("re-expanded" in f for f in opt.reports[0].faults)
    assert same_weights(lit.net, ref.net) and reports(opt) == reports(ref_opt)


# --------------------------------------------------------------------------------- monitor
def monitor_for(model, log_path=None):
    x, y = data()
    return DissipationMonitor(model, lambda out, t: ((out - t) ** 2).mean(), (x[:8], y[:8]), lr=KW["lr"], window=6,
                              schedule=[0, 3, 8, 12], log_path=log_path)


def test_the_monitor_as_a_callback_records_on_schedule(tmp_path):
    lit = Lit(**auto())
    mon = monitor_for(lit.net, tmp_path / "monitor.jsonl")
    lit, opt = fit(lit, trainer(epochs=3, callbacks=[QODECallback(monitor=mon)]))
    assert opt.monitor is mon
    events = [(r["event"], r["step"]) for r in mon.records]
    # spectra scheduled inside a window that holds its graph (steps 3 and 12) wait for its end: the one
    # of step 3 is taken at step 8 and says so; the window around step 12 outlasts the run
    spectra = [r for r in mon.records if r["event"] == "spectrum"]
    assert [r["step"] for r in spectra] == [0, 8]
    assert [r.get("deferred_from") for r in spectra] == [None, [3]]
    assert [s for e, s in events if e == "download"] == [0, 8]
    assert [s for e, s in events if e == "upload"] == [2, 10]
    assert [r.mode for r in opt.reports] == ["quantum", "quantum"]
    assert [s for e, s in events if e == "window_end"] == [7]      # the second window ends at step 15
    assert len((tmp_path / "monitor.jsonl").read_text().splitlines()) == len(mon.records)

    model = net(0)                    # reference: the same monitor driven by hand in a plain loop
    ref_mon = monitor_for(model)
    ref = plain_loop(model, QODE(model.parameters(), **{**KW, **auto()}, monitor=ref_mon), epochs=3,
                     before_step=lambda o: ref_mon.step(o.step_count))
    ref_mon.step(ref.step_count)
    key = lambda r: (r["step"], r["event"])                                       # noqa: E731
    assert sorted(map(untimed, ref_mon.records), key=key) == \
        sorted((untimed(r) for r in mon.records if r["event"] != "download"), key=key)
    assert same_weights(lit.net, model)


def test_a_bare_monitor_in_the_trainer_says_what_to_use():
    lit = Lit()
    with pytest.raises(AttributeError, match=r"not a Lightning Callback.*QODECallback\(monitor=monitor\)"):
        fit(lit, trainer(epochs=1, callbacks=[monitor_for(lit.net)]))


# --------------------------------------------------------------------------------- logging
def test_each_cycle_is_logged_to_lightning_loggers(tmp_path):
    logger = pl.loggers.CSVLogger(tmp_path, name="run", version=0)
    tr = trainer(epochs=4, logger=logger, log_every_n_steps=8, callbacks=[QODECallback()])
    lit, opt = fit(Lit(**auto()), tr)
    rows = [r for r in csv.DictReader(open(tmp_path / "run" / "version_0" / "metrics.csv"))
            if r.get("qode/cycle")]
    assert [int(r["step"]) for r in rows] == [7, 15]
    for row, rep in zip(rows, opt.reports):
        assert int(float(row["qode/cycle"])) == rep.cycle
        assert float(row["qode/quantum"]) == float(rep.mode == "quantum")
        assert rep.dissipation["criterion"] == "predicted"
        assert not row.get("qode/proxy_T")          # the paper's proxy is logged under criterion="proxy" only
        assert float(row["qode/pred_lin"]) == pytest.approx(rep.dissipation["predicted_error"][rep.window], rel=1e-6)
        assert int(float(row["qode/window"])) == rep.window
        assert float(row["qode/loss"]) == pytest.approx(rep.loss_last, rel=1e-6)
        assert int(float(row["qode/support_size"])) == rep.support_size
        if rep.mode == "quantum":
            assert float(row["qode/drift"]) == pytest.approx(rep.drift["relative"], rel=1e-6)
            assert float(row["qode/drift_lin"]) == pytest.approx(rep.drift["linearization_relative"], rel=1e-6)
            for part in ("support", "linearization", "readout_pruning", "readout_noise"):
                assert float(row[f"qode/drift_{part}"]) == pytest.approx(rep.drift["parts"][part], rel=1e-6, abs=0)
    assert [r.mode for r in opt.reports] == ["quantum", "quantum"]
    last = opt.reports[-1]
    assert float(tr.callback_metrics["qode/cycle"]) == last.cycle == 1
    assert float(tr.callback_metrics["qode/loss"]) == pytest.approx(last.loss_last, rel=1e-6)


def test_a_log_interval_that_misses_cycle_ends_warns(tmp_path):
    logger = pl.loggers.CSVLogger(tmp_path, name="run", version=0)
    with pytest.warns(UserWarning, match=r"log_every_n_steps=3 does not divide cycle=8"):
        fit(Lit(), trainer(epochs=1, logger=logger, log_every_n_steps=3, callbacks=[QODECallback()]))


# ---------------------------------------------------------------------------------- errors
class SGDLit(Lit):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("lit,kwargs,match", [
    (SGDLit, {}, r"exactly one torch_qode.QODE optimizer.*\['SGD'\]"),
    (Lit, {"accumulate_grad_batches": 2}, r"accumulate_grad_batches=2.*use accumulate_grad_batches=1"),
])
def test_unsupported_set_ups_are_refused_before_training(lit, kwargs, match):
    model = lit()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        fit(model, trainer(epochs=1, callbacks=[QODECallback()], **kwargs))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_bad_monitor_arguments():
    with pytest.raises(TypeError, match="monitor must be a DissipationMonitor or None, got str"):
        QODECallback(monitor="spectra")
    lit = Lit()
    lit.kwargs["monitor"] = monitor_for(lit.net)
    with pytest.raises(ValueError, match="already has another monitor"):
        fit(lit, trainer(epochs=1, callbacks=[QODECallback(monitor=monitor_for(lit.net))]))


# --------------------------------------------------------------------------------- DDP
def upload_of(rank):
    return {"step": 2, "batch_idx": 2, "rng": {"cpu": torch.get_rng_state()},
            "batch": (torch.full((3, 4), float(rank)), torch.full((3, 1), -float(rank)))}


def ddp_checkpoint_worker(rank, world):
    """Each rank's callback saves (a collective); rank 0's dict is the checkpoint every rank loads."""
    import torch.distributed as dist
    cb = QODECallback()
    cb._upload = upload_of(rank)
    saved = cb.state_dict()
    ckpt = [saved if rank == 0 else None]
    dist.broadcast_object_list(ckpt, src=0)       # what Lightning writes: rank 0's
    fresh = QODECallback()
    fresh.load_state_dict(ckpt[0])
    return fresh._pending["batch"][0][0, 0].item(), len(saved["ranks"])


def test_a_ddp_checkpoint_keeps_every_ranks_upload_batch():
    from tests._dist import run_ranks
    assert run_ranks("tests.apps.test_lightning:ddp_checkpoint_worker", timeout=120) == [(0.0, 2), (1.0, 2)]


def test_a_mid_window_ddp_checkpoint_needs_the_same_number_of_ranks():
    cb = QODECallback()
    with pytest.raises(ValueError, match="inside a quantum window on 2 ranks, this run has 1"):
        cb.load_state_dict({"upload": upload_of(0), "ranks": [upload_of(0), upload_of(1)]})
    cb.load_state_dict({"upload": None, "ranks": [None, None]})      # between windows: any number of ranks
    assert cb._pending is None
    assert QODECallback().state_dict()["ranks"] is None                # one process: nothing gathered



def lightning_ddp_worker(rank, world, root, port, resume):
    """One rank of a Lightning DDP fit (gloo, DistributedSampler: 2 of the 4 batches per epoch); with
    ``resume`` from the checkpoint at step 4, inside the window of steps 2..7."""
    import os
    from pathlib import Path

    from lightning.pytorch.strategies import DDPStrategy
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world), RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cbs = [QODECallback()] + ([] if resume else [checkpoints(Path(root))])
    tr = trainer(None if resume else Path(root), epochs=5, callbacks=cbs, devices=world,
                 strategy=DDPStrategy(process_group_backend="gloo"))
    lit, opt = fit(Lit(seed=7 if resume else 0), tr, ckpt_path=Path(root) / "ckpt" / "step=4.ckpt" if resume else None)
    return [p.detach().clone() for p in lit.parameters()], type(opt.comm).__name__, opt.step_count, reports(opt)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_lightning_ddp_fit_resumes_mid_window_bit_for_bit(tmp_path):
    """Two gloo ranks under Lightning's DDP strategy: QODE takes DistComm, and a checkpoint inside a
    window resumes on both ranks to the uninterrupted run's weights and reports (each rank restores
    from its own upload batch; with rank 0's for both, the weights differ)."""
    from tests._dist import run_ranks
    target = "tests.apps.test_lightning:lightning_ddp_worker"
    ref = run_ranks(target, root=str(tmp_path), port=_free_port(), resume=False, timeout=240)
    res = run_ranks(target, root=str(tmp_path), port=_free_port(), resume=True, timeout=240)
    for r in ref + res:
        assert r[1] == "DistComm" and r[2] == 10
    assert all(torch.equal(p, q) for p, q in zip(ref[0][0], ref[1][0]))          # ranks identical
    for a, b in zip(ref, res):
        assert all(torch.equal(p, q) for p, q in zip(a[0], b[0])) and a[3] == b[3]


# --------------------------------------------------------------------------------- conventions
def test_the_callback_reads_no_private_attribute_and_swaps_no_method():
    """QODECallback talks to QODE and Lightning through their public APIs: no ``x._name`` except on
    itself, no assignment to another object's method (``opt.step = ...``, ``pl_module.log = ...``
    happen only in the documented ``_silenced``), and Lightning's ``@override`` on every hook."""
    import ast
    import inspect

    import torch_qode.lightning as mod
    tree = ast.parse(inspect.getsource(mod))
    private = [(n.lineno, ast.unparse(n)) for n in ast.walk(tree)
               if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")
               and not (isinstance(n.value, ast.Name) and n.value.id in ("self", "QODECallback"))]
    assert private == []
    silenced = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_silenced")
    inside = {id(n) for n in ast.walk(silenced)}
    methods = {"step", "zero_grad", "log", "log_dict", "training_step", "state_dict", "load_state_dict"}
    swaps = [(n.lineno, ast.unparse(n)) for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.Delete))
             and id(n) not in inside and any(isinstance(t, ast.Attribute) and t.attr in methods for t in n.targets)]
    assert swaps == []
    hooks = [name for name, f in vars(QODECallback).items() if name.startswith("on_") or name.endswith("state_dict")]
    assert hooks and all(getattr(vars(QODECallback)[h], "__override__", False) for h in hooks)
