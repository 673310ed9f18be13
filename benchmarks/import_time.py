"""Import cost of ``torch_qode`` beyond ``torch`` (issue 19: at most 0.3 s).

Two measurements, each the best of ``--repeat`` fresh interpreters:

1. wall clock of ``python -c "import torch"`` against ``python -c "import torch_qode"``;
2. ``python -X importtime -c "import torch_qode"``: the cumulative time of the top-level
   ``torch_qode`` entry minus that of ``torch`` (which torch_qode imports on the way).  This charges
   torch_qode with whatever it happens to import before ``torch`` (numpy, ~0.06 s), so also
3. ``python -X importtime -c "import torch; import torch_qode"``: ``torch_qode``'s cumulative time
   with torch (and numpy) already loaded, i.e. exactly what ``import torch_qode`` adds.

Usage: python benchmarks/import_time.py [--repeat 5]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

BUDGET_S = 0.3


def wall(module: str) -> float:
    """Seconds for a fresh interpreter to run ``import module`` and exit."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
    return time.perf_counter() - t0


def importtime(code: str = "import torch_qode") -> tuple[float, float]:
    """(torch_qode, torch) cumulative import seconds from one ``-X importtime -c code`` run."""
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", code], check=True,
                         capture_output=True, text=True).stderr
    cum = {}
    for line in err.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, total, name = line.split("|")
            if total.strip().isdigit():
                cum.setdefault(name.strip(), int(total) / 1e6)
    return cum["torch_qode"], cum["torch"]


def main() -> None:
    """Print both measurements and their difference."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()

    t_torch = min(wall("torch") for _ in range(args.repeat))
    t_qode = min(wall("torch_qode") for _ in range(args.repeat))
    runs = [importtime() for _ in range(args.repeat)]
    it_qode, it_torch = min(runs, key=lambda r: r[0] - r[1])
    after_torch = min(importtime("import torch; import torch_qode")[0] for _ in range(args.repeat))
    print(f"wall clock (best of {args.repeat}): import torch {t_torch:.3f} s, import torch_qode {t_qode:.3f} s, "
          f"difference {t_qode - t_torch:+.3f} s")
    print(f"-X importtime (best of {args.repeat}): torch_qode {it_qode:.3f} s cumulative, torch {it_torch:.3f} s, "
          f"difference {it_qode - it_torch:+.3f} s")
    print(f"-X importtime (best of {args.repeat}): import torch_qode after import torch {after_torch:.3f} s")
    print(f"budget {BUDGET_S:.1f} s beyond torch")


if __name__ == "__main__":
    main()
