"""Datasets of the recipes: CIFAR-100 (torchvision's real loader), a CIFAR-100-format fixture writer,
scikit-learn's bundled digits and the Python standard library's sources as character-level text; plus
seeded DataLoaders.

Floor 4 (applications). torchvision and scikit-learn are imported only when a dataset is built, so
``import torch_qode.data`` works with the base install.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from .._checks import check_int
from .cifar import CIFAR100_MEAN, CIFAR100_STD, DatasetNotFoundError, cifar100, cifar100_transform
from .digits import DIGITS_CLASSES, digits, digits_split_sizes, digits_tensors
from .fixtures import FIXTURE_MARKER, write_cifar100_fixture
from .stdlib_text import CharCorpus, char_batches, char_windows, stdlib_corpus, stdlib_files

__all__ = ["cifar100", "cifar100_transform", "CIFAR100_MEAN", "CIFAR100_STD", "DatasetNotFoundError",
           "write_cifar100_fixture", "FIXTURE_MARKER", "digits", "digits_tensors", "digits_split_sizes",
           "DIGITS_CLASSES", "CharCorpus", "stdlib_corpus", "stdlib_files", "char_batches", "char_windows",
           "loader", "loaders"]


def loader(dataset: Dataset, batch_size: int = 128, shuffle: bool = False, seed: int = 0,
           num_workers: int = 0, drop_last: bool = False) -> DataLoader:
    """A DataLoader; with ``shuffle`` the order comes from a ``torch.Generator`` seeded with ``seed``
    (the same seed gives the same batches, independent of the global RNG)."""
    batch_size = check_int(batch_size, "batch_size", 1)
    num_workers = check_int(num_workers, "num_workers", 0)
    generator = torch.Generator().manual_seed(int(seed)) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=num_workers, drop_last=drop_last)


def loaders(train: Dataset, test: Optional[Dataset] = None, batch_size: int = 128,
            test_batch_size: Optional[int] = None, seed: int = 0, num_workers: int = 0,
            drop_last: bool = False) -> Tuple[DataLoader, Optional[DataLoader]]:
    """``(train_loader, test_loader)``: the train loader shuffled with ``seed`` (and ``drop_last``),
    the test loader in order with ``test_batch_size`` (default ``batch_size``); ``None`` without ``test``."""
    train_loader = loader(train, batch_size, True, seed, num_workers, drop_last)
    test_loader = None
    if test is not None:
        test_loader = loader(test, batch_size if test_batch_size is None else test_batch_size,
                             False, seed, num_workers, False)
    return train_loader, test_loader
