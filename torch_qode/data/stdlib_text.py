r"""Real text without a network: the Python standard library's own ``.py`` sources, as characters.

The files are the top-level ``*.py`` of the running interpreter's ``sysconfig.get_paths()["stdlib"]``,
sorted by name: a fixed list for a given Python version.  The split is by file and deterministic
(every ``val_every``-th file, counting from the ``val_every``-th, is validation), so no function
is cut between train and validation.  The vocabulary is the training text's characters, sorted;
characters met only in validation read as index 0 (the unknown character ``"\0"``).
"""
from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from .._checks import check_int

__all__ = ["CharCorpus", "stdlib_files", "stdlib_corpus", "char_batches", "char_windows"]

UNKNOWN = "\0"


@dataclass
class CharCorpus:
    """Token ids of the train and validation text, the vocabulary and the files they came from."""

    train: torch.Tensor        # (n_train,) int64
    val: torch.Tensor          # (n_val,) int64
    vocab: str                 # index -> character; vocab[0] is UNKNOWN
    train_files: list
    val_files: list
    root: str

    def decode(self, ids) -> str:
        return "".join(self.vocab[int(i)] for i in ids)


def stdlib_files(root: Optional[str] = None) -> list:
    """The sorted top-level ``*.py`` files of the standard library (``root``: another folder)."""
    folder = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    files = sorted(p for p in folder.glob("*.py") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no .py files in {str(folder)!r} (the standard library's sources)")
    return files


def stdlib_corpus(max_files: Optional[int] = None, *, val_every: int = 10, max_chars: Optional[int] = None,
                  root: Optional[str] = None) -> CharCorpus:
    """The corpus of the first ``max_files`` files (all by default), at most ``max_chars`` characters per
    split (from the start of each split's text)."""
    val_every = check_int(val_every, "val_every", 2)
    files = stdlib_files(root)
    if max_files is not None:
        files = files[:check_int(max_files, "max_files", val_every)]
    if max_chars is not None:
        max_chars = check_int(max_chars, "max_chars", 2)
    val = [f for i, f in enumerate(files) if i % val_every == val_every - 1]
    train = [f for i, f in enumerate(files) if i % val_every != val_every - 1]

    def text(fs):
        t = "".join(f.read_text(encoding="utf-8", errors="replace") for f in fs)
        return t if max_chars is None else t[:max_chars]

    train_text, val_text = text(train), text(val)
    vocab = UNKNOWN + "".join(sorted(set(train_text) - {UNKNOWN}))
    points = np.array([ord(c) for c in vocab], dtype=np.int64)     # sorted: UNKNOWN is code point 0

    def encode(t):
        cps = np.frombuffer(t.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        idx = np.minimum(np.searchsorted(points, cps), points.size - 1)
        return torch.from_numpy(np.where(points[idx] == cps, idx, 0))

    return CharCorpus(encode(train_text), encode(val_text), vocab, [f.name for f in train], [f.name for f in val],
                      str(files[0].parent))


def char_windows(ids: torch.Tensor, starts: torch.Tensor, context: int) -> tuple:
    """``(x, y)``: the ``context`` characters from each start and the same shifted by one."""
    offsets = torch.arange(context + 1)
    seq = ids[starts[:, None] + offsets]
    return seq[:, :-1], seq[:, 1:]


def char_batches(ids: torch.Tensor, batch_size: int, context: int, seed: int, device=None) -> Iterator[tuple]:
    """An endless stream of ``(x, y)`` batches of random windows (seeded ``torch.Generator``)."""
    batch_size, context = check_int(batch_size, "batch_size", 1), check_int(context, "context", 1)
    if ids.numel() <= context + 1:
        raise ValueError(f"the text ({ids.numel()} characters) is shorter than context + 2 = {context + 2}")
    g = torch.Generator().manual_seed(int(seed))
    while True:
        starts = torch.randint(0, ids.numel() - context - 1, (batch_size,), generator=g)
        x, y = char_windows(ids, starts, context)
        yield x.to(device), y.to(device)
