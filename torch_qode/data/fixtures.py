"""A small dataset in CIFAR-100's real on-disk format, so tests run torchvision's real loader offline.

:func:`write_cifar100_fixture` writes ``root/cifar-100-python/{train,test,meta}`` exactly as the
official archive lays them out: Python 2 protocol-2 pickles whose text is Python 2 ``str`` (so
``pickle.load(f, encoding="latin1")`` — torchvision's way — gives ``str`` keys and
``encoding="bytes"`` gives ``b'data'``, ``b'fine_labels'``, … as with the real files), with
``data`` a uint8 ``N × 3072`` array (row-major, channel-planar: 1024 R, 1024 G, 1024 B values),
``fine_labels``, ``coarse_labels``, ``filenames``, ``batch_label``; ``meta`` holds the real
``fine_label_names`` and ``coarse_label_names`` (alphabetical, as in the official ``meta``).

torchvision's ``CIFAR100`` checks every file against the md5 of the official release, which a
fixture can never match. The writer therefore also writes ``FIXTURE_MARKER`` (JSON: the md5 of each
file it wrote); :func:`torch_qode.data.cifar100` loads a folder carrying that marker with
torchvision's own ``CIFAR100`` code, only with the md5s of the marker in place of the official
ones — the integrity check still runs and a tampered fixture is still refused. A folder without
the marker is always checked against the official md5s.

The images are synthetic but learnable: each fine class has its own colour and coarse 4×4 pattern,
plus pixel noise.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
from pathlib import Path
from typing import Dict, Union

import numpy as np

from .._checks import check_int

__all__ = ["write_cifar100_fixture", "FIXTURE_MARKER", "CIFAR100_FOLDER",
           "CIFAR100_FINE_LABELS", "CIFAR100_COARSE_LABELS", "CIFAR100_FINE_TO_COARSE"]

CIFAR100_FOLDER = "cifar-100-python"
FIXTURE_MARKER = "TORCH_QODE_FIXTURE.json"

# The 20 superclasses of CIFAR-100 with their 5 classes each (the dataset's published layout).
_SUPERCLASSES = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
CIFAR100_COARSE_LABELS = tuple(sorted(_SUPERCLASSES))
CIFAR100_FINE_LABELS = tuple(sorted(name for names in _SUPERCLASSES.values() for name in names))
CIFAR100_FINE_TO_COARSE = tuple(
    CIFAR100_COARSE_LABELS.index(next(s for s, names in _SUPERCLASSES.items() if fine in names))
    for fine in CIFAR100_FINE_LABELS)


class _Py2Pickler(pickle._Pickler):
    """Protocol-2 pickler writing ``str`` and ``bytes`` as Python 2 ``str`` (BINSTRING opcodes)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else bytes(obj)
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = _save_py2_str
    dispatch[bytes] = _save_py2_str


def _py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _images(labels: np.ndarray, prototypes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 (N, 3072): the class prototype (3×32×32) plus Gaussian pixel noise, channel-planar."""
    noise = rng.normal(0.0, 24.0, size=(len(labels), 3, 32, 32))
    img = np.clip(prototypes[labels] + noise, 0, 255).astype(np.uint8)
    return img.reshape(len(labels), 3072)


def write_cifar100_fixture(root: Union[str, os.PathLike], n_train: int = 500, n_test: int = 100,
                           seed: int = 0) -> Path:
    """Write a CIFAR-100-format dataset of ``n_train`` + ``n_test`` images under ``root``.

    Labels cycle through all 100 classes in a seeded random order (so every class appears once
    ``n ≥ 100``); coarse labels follow the real fine-to-coarse map. Returns the dataset folder
    ``root/cifar-100-python``. Existing files there are overwritten.
    """
    n_train = check_int(n_train, "n_train", 1)
    n_test = check_int(n_test, "n_test", 1)
    seed = check_int(seed, "seed", 0)
    folder = Path(root) / CIFAR100_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    # per-class prototypes: a colour plus a coarse 4×4 pattern blown up to 32×32
    colour = rng.uniform(40, 215, size=(100, 3, 1, 1))
    pattern = np.kron(rng.uniform(-50, 50, size=(100, 3, 4, 4)), np.ones((1, 1, 8, 8)))
    prototypes = colour + pattern

    fine_to_coarse = np.asarray(CIFAR100_FINE_TO_COARSE)
    md5: Dict[str, str] = {}

    def write(name: str, obj) -> None:
        payload = _py2_pickle(obj)
        (folder / name).write_bytes(payload)
        md5[name] = hashlib.md5(payload).hexdigest()

    for name, n, batch_label in (("train", n_train, "training batch 1 of 1"),
                                 ("test", n_test, "testing batch 1 of 1")):
        fine = np.concatenate([rng.permutation(100) for _ in range(-(-n // 100))])[:n]
        write(name, {
            "filenames": [f"fixture_{name}_{i:06d}.png" for i in range(n)],
            "batch_label": batch_label,
            "fine_labels": [int(c) for c in fine],
            "coarse_labels": [int(c) for c in fine_to_coarse[fine]],
            "data": _images(fine, prototypes, rng),
        })
    write("meta", {"fine_label_names": list(CIFAR100_FINE_LABELS),
                   "coarse_label_names": list(CIFAR100_COARSE_LABELS)})

    marker = {"fixture": True, "writer": "torch_qode.data.write_cifar100_fixture",
              "n_train": n_train, "n_test": n_test, "seed": seed, "md5": md5}
    (folder / FIXTURE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return folder
