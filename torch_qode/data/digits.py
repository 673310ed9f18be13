"""scikit-learn's bundled handwritten digits (1,797 images of 8×8 pixels, labels 0–9): real data
that needs no network, for CPU runs and ``make demo``.

The split is stratified per class and depends only on ``seed`` and ``test_fraction`` (a numpy
``default_rng`` permutation, not scikit-learn's splitter). Pixels (0–16) are scaled to [0, 1] and
then standardised with the mean and standard deviation of the *training* split, so the test split
never leaks into the normalisation.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .._checks import check_bool, check_int, check_real

__all__ = ["digits", "digits_tensors", "digits_split_sizes", "DIGITS_CLASSES"]

DIGITS_CLASSES = 10


def _check_test_fraction(test_fraction) -> float:
    return check_real(test_fraction, "test_fraction", 0.0, 1.0, low_open=True, high_open=True)


def _test_counts(labels: np.ndarray, test_fraction: float) -> np.ndarray:
    """Test samples per class: ``round(test_fraction · class size)``; refuses an empty split."""
    sizes = np.array([int((labels == c).sum()) for c in range(DIGITS_CLASSES)])
    k = np.array([int(round(test_fraction * n)) for n in sizes])
    n_test, n_train = int(k.sum()), int((sizes - k).sum())
    if n_test == 0 or n_train == 0:
        empty = "test" if n_test == 0 else "training"
        raise ValueError(f"test_fraction={test_fraction!r} leaves the {empty} split empty ({n_train} train / "
                         f"{n_test} test samples of {int(sizes.sum())}; each class of ~{int(sizes.min())} images "
                         f"is split by rounding): choose a value between about {1 / sizes.min():.3g} and "
                         f"{1 - 1 / sizes.min():.3g}")
    return k


def _split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    counts = _test_counts(labels, test_fraction)
    train, test = [], []
    for c in range(DIGITS_CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(counts[c])
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def digits_split_sizes(test_fraction: float = 0.2) -> Tuple[int, int]:
    """``(n_train, n_test)`` of the split (it does not depend on the seed); ``ValueError`` when
    ``test_fraction`` leaves either split empty."""
    from sklearn.datasets import load_digits

    test_fraction = _check_test_fraction(test_fraction)
    labels = np.asarray(load_digits().target, dtype=np.int64)
    k = _test_counts(labels, test_fraction)
    return int(labels.size - k.sum()), int(k.sum())


def digits_tensors(split: str = "train", test_fraction: float = 0.2, seed: int = 0, image: bool = True,
                   dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(X, y)`` tensors of a split, for full-batch use.

    ``X``: ``(N, 1, 8, 8)`` if ``image`` else ``(N, 64)``, standardised with train-split statistics;
    ``y``: ``(N,)`` int64 labels 0–9. ``split`` is ``"train"``, ``"test"`` or ``"all"`` (every image,
    still with train-split statistics).  A ``test_fraction`` that leaves either split empty is refused
    (``ValueError``).
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    test_fraction = _check_test_fraction(test_fraction)
    seed = check_int(seed, "seed", 0)
    check_bool(image, "image")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float64) / 16.0
    y = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = _split_indices(y, test_fraction, seed)
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    idx = {"train": train_idx, "test": test_idx, "all": np.arange(len(y))}[split]
    X = torch.as_tensor(x[idx], dtype=dtype)
    if image:
        X = X.reshape(-1, 1, 8, 8)
    return X, torch.as_tensor(y[idx])


def digits(split: str = "train", test_fraction: float = 0.2, seed: int = 0, image: bool = True,
           dtype: torch.dtype = torch.float32) -> TensorDataset:
    """The digits split as a ``TensorDataset`` of (image ``1×8×8`` or vector ``64``, label); see
    :func:`digits_tensors`."""
    return TensorDataset(*digits_tensors(split, test_fraction, seed, image, dtype))
