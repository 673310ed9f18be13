"""`make demo`: the main job on an embedded default, no data download and no GPU needed.

Sparse-trains a ResNet-8 (77,754 parameters) on scikit-learn's bundled digits with QODE
(``mode="auto"``, Carleman order 1, tomography with 10⁷ shots, ``track_sgd`` on) beside classical
sparse SGD on the same batches, for four cycles, and prints the per-cycle table: the mode each
window took and why, the predicted error proxy, the measured drift from SGD (total and its
linearisation part), the test accuracy of both, and the quantum resources of each window.
Figures and logs go to ``runs/demo/<timestamp>/``.

It is :mod:`recipes.train_resnet_cifar100` with ``configs/train_resnet_cifar100_cpu.yaml``; every
option of that recipe works here too (``python -m recipes.demo train.steps=60``).  It runs on one
thread unless ``--threads`` says otherwise, so its table is the same on an idle or a busy machine.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from recipes import train_resnet_cifar100

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "train_resnet_cifar100_cpu.yaml"


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run :mod:`recipes.train_resnet_cifar100` with the demo's defaults (the CPU configuration, one thread).

    Args:
        argv: that recipe's command-line arguments (default: ``sys.argv[1:]``); ``--config``, ``--threads``
            and ``--out`` given there win over the demo's defaults.

    Returns:
        The recipe's result: ``{"out", "rows", "table", "reports", "figures"}``.
    """
    # defaults of the command-line options, so that --config/--threads/--out given in any spelling
    # (--out DIR, --out=DIR) win; the output folder defaults to runs/demo/<timestamp>
    result = train_resnet_cifar100.main(argv, name="demo", cli_defaults={
        "config": str(CONFIG),
        "threads": "1",                        # the same digits on every machine, idle or busy
    })
    print(f"\nlogs and figures: {result['out']}")
    return result


if __name__ == "__main__":
    main()
