"""The shared part of the classifier recipes (``hessian_after_pruning``, ``train_resnet_cifar100``):
the ``data`` config section and its checks, the datasets (scikit-learn digits or CIFAR-100), and
the common start of a run — a ``cifar_resnet`` loaded from a checkpoint or pre-trained densely.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from recipes.checkpoints import load_checkpoint, save_checkpoint
from recipes.config import ConfigError, check_choice, check_int, check_optional_str, check_real, keyed_error
from recipes.loop import evaluate, train_classifier

if TYPE_CHECKING:       # pragma: no cover
    from recipes.cli import Run

__all__ = ["Data", "ResNet", "Pretrain", "DATASETS", "check_classification", "classification_data", "pretrained_resnet"]


#: The ``data`` section shared by recipes that train classifiers (``setup(..., data=True)``).
@dataclass
class Data:
    """The ``data`` section."""

    name: str = "digits"        # "digits" (scikit-learn, offline) or "cifar100" (torchvision; --data-root/--download)
    root: Any = None            # CIFAR-100: folder holding cifar-100-python/ (a fixture folder works too)
    download: bool = False
    test_fraction: float = 0.2  # digits only
    num_workers: int = 0        # DataLoader worker processes (0: the main thread; keep 0 for the CPU configs)
    pin_memory: bool = False    # page-locked batches, copied to the GPU with non_blocking=True (CUDA only)
    persistent_workers: bool = False   # keep the workers alive between epochs (with num_workers > 0)


@dataclass
class ResNet:
    """The ``model`` section (a ``cifar_resnet``)."""

    depth: int = 8
    widen: int = 1


@dataclass
class Pretrain:
    """The ``pretrain`` section."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2.0e-4
    schedule: str = "cosine"
    save: bool = True

#: ``data.name`` → ``(num_classes, in_channels)``.
DATASETS = {"digits": (10, 1), "cifar100": (100, 3)}


def check_classification(cfg: Mapping) -> None:
    """The checks shared by the ResNet recipes (``data``, ``model``, ``checkpoint``, ``pretrain``,
    ``eval_batch_size``), run before anything is written or trained; errors name the key."""
    d = cfg["data"]
    name = check_choice(d["name"], "data.name", tuple(DATASETS))
    check_optional_str(d["root"], "data.root", "a folder")
    if name != "cifar100" and (d["root"] is not None or d["download"]):
        given = [x for x, on in (("data.root / --data-root", d["root"] is not None),
                                 ("data.download / --download", d["download"])) if on]
        raise ConfigError(f"{' and '.join(given)} only apply to data.name=cifar100, but data.name={name!r} "
                          f"(scikit-learn's bundled digits need neither): add data.name=cifar100 to use CIFAR-100, "
                          f"or drop them")
    check_int(d["num_workers"], "data.num_workers", 0)
    for key in ("pin_memory", "persistent_workers"):
        if not isinstance(d[key], bool):
            raise ConfigError(f"data.{key} must be true or false, got {d[key]!r}")
    if name == "digits":
        check_real(d["test_fraction"], "data.test_fraction", 0.0, 1.0, low_open=True, high_open=True)
        from torch_qode.data import digits_split_sizes

        try:
            digits_split_sizes(d["test_fraction"])
        except ValueError as exc:
            raise ConfigError(f"data.test_fraction: {exc}") from None
    classes, channels = DATASETS[name]
    try:
        from torch_qode.models import cifar_resnet_num_params

        cifar_resnet_num_params(cfg["model"]["depth"], cfg["model"]["widen"], classes, channels)
    except (TypeError, ValueError) as exc:
        raise keyed_error("model", exc, ("depth", "widen")) from None
    if check_optional_str(cfg["checkpoint"], "checkpoint") is not None and not Path(cfg["checkpoint"]).is_file():
        raise ConfigError(f"checkpoint {cfg['checkpoint']!r} not found (a state_dict file, read with "
                          f"torch.load(weights_only=True))")
    pt = cfg["pretrain"]
    check_int(pt["epochs"], "pretrain.epochs", 0)
    check_int(pt["batch_size"], "pretrain.batch_size", 1)
    check_real(pt["lr"], "pretrain.lr", 0.0, low_open=True)
    check_real(pt["momentum"], "pretrain.momentum", 0.0)
    check_real(pt["weight_decay"], "pretrain.weight_decay", 0.0)
    check_choice(pt["schedule"], "pretrain.schedule", ("cosine", "constant"))
    check_int(cfg["eval_batch_size"], "eval_batch_size", 1)


def classification_data(data: Mapping, seed: int = 0) -> dict:
    """``{"train", "test", "plain_train", "in_channels", "num_classes", "name", "root", "is_fixture"}``
    for ``data`` (see :class:`Data`); ``plain_train`` is the training split without
    augmentation (for Hessians); ``is_fixture`` tells the CIFAR-100 test fixture
    (:func:`torch_qode.data.write_cifar100_fixture`) from real data.
    CIFAR-100 errors name both remedies (``--data-root``, ``--download``)."""
    name = data["name"]
    if name == "digits":
        from torch.utils.data import TensorDataset

        from torch_qode.data import DIGITS_CLASSES, digits_tensors

        try:
            tr = TensorDataset(*digits_tensors("train", data["test_fraction"], seed))
            te = TensorDataset(*digits_tensors("test", data["test_fraction"], seed))
        except ValueError as exc:
            raise ConfigError(f"data.test_fraction: {exc}") from None
        return {"train": tr, "test": te, "plain_train": tr, "in_channels": 1, "num_classes": DIGITS_CLASSES,
                "name": "digits", "root": None, "is_fixture": False}
    if name == "cifar100":
        from torch_qode.data import cifar100

        if data["root"] is None:
            raise ConfigError("data.name=cifar100 needs --data-root (a folder holding cifar-100-python/), "
                              "plus --download where a network exists")
        kw = dict(download=bool(data["download"]))
        train = cifar100(data["root"], train=True, **kw)
        return {"train": train,
                "test": cifar100(data["root"], train=False),
                "plain_train": cifar100(data["root"], train=True, augment=False),
                "in_channels": 3, "num_classes": 100, "name": "cifar100", "root": str(data["root"]),
                "is_fixture": bool(getattr(train, "is_fixture", False))}
    raise ConfigError(f"data.name must be 'digits' or 'cifar100', got {name!r}")


def pretrained_resnet(run: Run, checkpoint_name: str = "pretrained.pt") -> dict:
    """The shared start of the ResNet recipes, from ``run.cfg``'s ``data``, ``model``, ``checkpoint``,
    ``pretrain``, ``eval_batch_size`` and ``seed``: the data, a ``cifar_resnet`` on ``run.device``, the
    loaders, then the ``checkpoint`` loaded (``weights_only``) or dense pre-training (saved as
    ``checkpoint_name`` when ``pretrain.save``).  Logs ``model`` and ``dense`` records.

    Returns ``{"data", "model", "train_loader", "test_loader", "params", "dense"}`` (``dense``: the
    ``{"acc", "loss"}`` of :func:`evaluate`)."""
    from torch_qode.data import loaders
    from torch_qode.models import cifar_resnet

    cfg, dev = run.cfg, run.device
    data = classification_data(cfg["data"], cfg["seed"])
    run.log.write("data", name=data["name"], root=data["root"], is_fixture=data["is_fixture"],
                  train_samples=len(data["train"]), test_samples=len(data["test"]))
    src = {"digits": "scikit-learn's bundled digits"}.get(data["name"], f"CIFAR-100 from {data['root']}")
    if getattr(run, "rank0", True):
        print(f"data: {src} ({len(data['train'])} train / {len(data['test'])} test samples)"
              + (" -- the torch_qode TEST FIXTURE (synthetic images), not real CIFAR-100" if data["is_fixture"]
                 else ""))
    model = cifar_resnet(cfg["model"]["depth"], cfg["model"]["widen"], data["num_classes"],
                         data["in_channels"]).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    run.log.write("model", depth=cfg["model"]["depth"], widen=cfg["model"]["widen"], params=n_params,
                  train_samples=len(data["train"]), test_samples=len(data["test"]))
    pt = cfg["pretrain"]
    train_loader, test_loader = loaders(data["train"], data["test"], batch_size=pt["batch_size"],
                                        test_batch_size=cfg["eval_batch_size"], seed=cfg["seed"],
                                        num_workers=cfg["data"]["num_workers"])
    if cfg["checkpoint"] is not None:
        load_checkpoint(model, cfg["checkpoint"], dev,
                        describe=f"cifar_resnet(depth={cfg['model']['depth']}, widen={cfg['model']['widen']}, "
                                 f"num_classes={data['num_classes']}, in_channels={data['in_channels']}) built from "
                                 f"model.depth, model.widen and data.name={data['name']!r}")
        run.log.write("checkpoint", path=cfg["checkpoint"])
    elif pt["epochs"] > 0:
        train_classifier(model, train_loader, dev, epochs=pt["epochs"], lr=pt["lr"], momentum=pt["momentum"],
                         weight_decay=pt["weight_decay"], schedule=pt["schedule"], run=run, test_loader=test_loader)
        if pt["save"] and getattr(run, "rank0", True):
            save_checkpoint(model, run.path(checkpoint_name))
    dense = evaluate(model, test_loader, dev)
    run.log.write("dense", **dense)
    return {"data": data, "model": model, "train_loader": train_loader, "test_loader": test_loader,
            "params": n_params, "dense": dense}
