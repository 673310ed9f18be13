"""CIFAR-100 through torchvision's real ``CIFAR100`` loader (DESIGN.md, "Data and machines").

No machine of this project reaches the internet: point ``root`` (the recipes' ``--data-root``) at an
existing copy holding ``cifar-100-python/``, or pass ``download=True`` (``--download``) where a
network exists. A folder written by :func:`torch_qode.data.write_cifar100_fixture` (it carries a
marker file) is loaded by the same torchvision code with the fixture's own md5s; see
:mod:`torch_qode.data.fixtures`.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Optional, Union

from .._checks import check_bool
from .fixtures import CIFAR100_FOLDER, FIXTURE_MARKER

__all__ = ["cifar100", "cifar100_transform", "CIFAR100_MEAN", "CIFAR100_STD", "DatasetNotFoundError"]

# Per-channel mean and standard deviation of the 50,000 CIFAR-100 training images (pixels in [0, 1]).
CIFAR100_MEAN = (0.5070751592371323, 0.48654887331495095, 0.4409178433670343)
CIFAR100_STD = (0.2673342858792401, 0.2564384629170883, 0.27615047132568404)

_FILES = ("train", "test", "meta")

#: What torchvision's loader raises on files that pass the md5 check but are not valid CIFAR pickles
#: (a fixture marker updated for broken files, a truncated copy): unpickling and layout errors.
_UNREADABLE = (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, IndexError, AttributeError,
               UnicodeDecodeError)


class DatasetNotFoundError(FileNotFoundError):
    """The dataset is not under ``root`` (or is corrupted) and was not downloaded."""


def _remedies(root: Path) -> str:
    return (f"Either point --data-root (the `root` argument) at an existing copy, i.e. a folder "
            f"containing {CIFAR100_FOLDER}/ with the files train, test and meta, or pass --download "
            f"(download=True) on a machine with network access to fetch it into {root}.")


def cifar100_transform(train: bool = True, augment: Optional[bool] = None):
    """ToTensor + CIFAR-100 normalisation, preceded for augmentation by RandomCrop(32, padding=4)
    and RandomHorizontalFlip. ``augment`` defaults to ``train``."""
    from torchvision import transforms

    augment = train if augment is None else augment
    steps = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
    steps += [transforms.ToTensor(), transforms.Normalize(CIFAR100_MEAN, CIFAR100_STD)]
    return transforms.Compose(steps)


def _fixture_md5(folder: Path) -> Optional[dict]:
    marker = folder / FIXTURE_MARKER
    if not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text())
        md5 = {name: str(info["md5"][name]) for name in _FILES}
    except (ValueError, KeyError, TypeError) as exc:
        raise DatasetNotFoundError(f"fixture marker {marker} is unreadable ({exc}); rewrite the fixture "
                                   f"with torch_qode.data.write_cifar100_fixture") from exc
    if info.get("fixture") is not True:
        raise DatasetNotFoundError(f"fixture marker {marker} does not mark a fixture")
    return md5


def _fixture_class():
    from torchvision.datasets import CIFAR100

    class CIFAR100Fixture(CIFAR100):
        """torchvision's ``CIFAR100`` with the md5s of a torch_qode fixture instead of the official ones."""

        is_fixture = True

        def __init__(self, root, md5: dict, **kwargs):
            # instance attributes shadow the class lists that _check_integrity and _load_meta read
            self.train_list = [["train", md5["train"]]]
            self.test_list = [["test", md5["test"]]]
            self.meta = {**CIFAR100.meta, "md5": md5["meta"]}
            super().__init__(root, **kwargs)

        def download(self) -> None:
            raise RuntimeError("a fixture is never downloaded; call download=False")

        def extra_repr(self) -> str:
            return super().extra_repr() + "\nFixture: torch_qode.data.write_cifar100_fixture (not real CIFAR-100)"

    return CIFAR100Fixture


def cifar100(root: Union[str, os.PathLike], train: bool = True, download: bool = False,
             augment: Optional[bool] = None, transform=None, target_transform=None):
    """The CIFAR-100 train or test split as a torchvision ``CIFAR100`` dataset of (image, fine label).

    ``transform`` defaults to :func:`cifar100_transform` ``(train, augment)``; ``augment`` defaults to
    ``train`` (random crop 32 with padding 4 and horizontal flip), images are normalised with
    :data:`CIFAR100_MEAN` / :data:`CIFAR100_STD`. ``dataset.is_fixture`` tells a fixture from real data.

    Raises :class:`DatasetNotFoundError` naming both remedies (``--data-root``, ``--download``) when the
    files are missing or fail the md5 check and ``download`` is false.
    """
    from torchvision.datasets import CIFAR100

    train = check_bool(train, "train")
    if augment is not None and not isinstance(augment, bool):
        raise TypeError(f"augment must be a bool or None, got {type(augment).__name__}")
    root = Path(os.path.expanduser(os.fspath(root)))
    folder = root / CIFAR100_FOLDER
    if transform is None:
        transform = cifar100_transform(train, augment)
    kwargs = dict(train=train, transform=transform, target_transform=target_transform)

    fixture_md5 = _fixture_md5(folder)
    if fixture_md5 is not None:
        try:
            return _fixture_class()(root, fixture_md5, **kwargs)
        except (RuntimeError,) + _UNREADABLE as exc:
            raise DatasetNotFoundError(f"the CIFAR-100 fixture in {folder} is corrupted "
                                       f"({type(exc).__name__}: {exc}); rewrite it with "
                                       f"torch_qode.data.write_cifar100_fixture") from exc

    if not download:
        missing = [name for name in _FILES if not (folder / name).is_file()]
        if missing:
            raise DatasetNotFoundError(
                f"CIFAR-100 not found: {folder} lacks {', '.join(missing)}. " + _remedies(root))
    try:
        dataset = CIFAR100(root, download=download, **kwargs)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted" (md5 mismatch)
        raise DatasetNotFoundError(
            f"CIFAR-100 under {folder} failed torchvision's integrity check ({exc}). " + _remedies(root)) from exc
    except _UNREADABLE as exc:  # md5 passed but the pickles do not read as CIFAR-100
        raise DatasetNotFoundError(
            f"CIFAR-100 under {folder} is unreadable ({type(exc).__name__}: {exc}). " + _remedies(root)) from exc
    except OSError as exc:  # e.g. no network while downloading
        if isinstance(exc, DatasetNotFoundError):
            raise
        raise DatasetNotFoundError(f"CIFAR-100 download into {root} failed ({exc}). " + _remedies(root)) from exc
    dataset.is_fixture = False
    return dataset
