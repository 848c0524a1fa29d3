"""Import time: `import batteries` against `import torch`, each in a fresh interpreter.

    python benchmarks/import_time.py [--reps 21] [--smoke]

Target: at most 3% more than `import torch` (tensorboardX and other heavy imports only when first used).

Both sides read bytecode from one cache folder (`PYTHONPYCACHEPREFIX`, filled by the untimed first
round), as an installed package does: pip compiles torch's `.pyc` at install, but an editable
checkout under `PYTHONDONTWRITEBYTECODE=1` would otherwise compile batteries' sources in every
fresh interpreter, and the figure would time the compiler.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from _common import SUMMARY_HEADER, alternate, machine, median, met, parse_args, readme_table, report, verdict


def fresh(statement: str, cache: str) -> None:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([sys.executable, "-c", statement], check=True, env={**env, "PYTHONPYCACHEPREFIX": cache})


def main() -> None:
    args = parse_args(__doc__.split("\n")[0], reps=21)
    print(f"machine: {machine()}")
    heavy = "import sys; import batteries; assert 'tensorboardX' not in sys.modules, 'tensorboardX imported eagerly'"
    cache = tempfile.mkdtemp(prefix="batteries-pycache-")
    try:
        fresh(heavy, cache)
        times = alternate(
            {
                "import torch": lambda: fresh("import torch", cache),
                "import batteries": lambda: fresh("import batteries", cache),
            },
            args.reps,
        )
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    ratio = report("wall time of a fresh `python -c <import>`", times, baseline="import torch")
    verdict("import time", ratio, 1.03, args.smoke)
    torch_ms, ours_ms = median(times["import torch"]) * 1e3, median(times["import batteries"]) * 1e3
    readme_table(
        SUMMARY_HEADER,
        [
            [
                "import time, fresh interpreter",
                f"`import torch`: {torch_ms:.0f} ms",
                f"`import batteries`: {ours_ms:.0f} ms, ratio **{ratio:.2f}**",
                "<= 1.03",
                met(ratio, 1.03, args.smoke),
            ]
        ],
    )


if __name__ == "__main__":
    main()
