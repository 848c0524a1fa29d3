"""Import time: `import batteries` against `import torch`, each in a fresh interpreter.

    python benchmarks/import_time.py [--reps 21] [--smoke]

Target: at most 3% more than `import torch` (tensorboardX and other heavy imports only when first used).
"""

from __future__ import annotations

import subprocess
import sys

from _common import alternate, machine, parse_args, report, verdict


def fresh(statement: str) -> None:
    subprocess.run([sys.executable, "-c", statement], check=True)


def main() -> None:
    args = parse_args(__doc__.split("\n")[0], reps=21)
    print(f"machine: {machine()}")
    heavy = "import sys; import batteries; assert 'tensorboardX' not in sys.modules, 'tensorboardX imported eagerly'"
    fresh(heavy)
    times = alternate(
        {"import torch": lambda: fresh("import torch"), "import batteries": lambda: fresh("import batteries")},
        args.reps,
    )
    ratio = report("wall time of a fresh `python -c <import>`", times, baseline="import torch")
    verdict("import time", ratio, 1.03, args.smoke)


if __name__ == "__main__":
    main()
