"""The first batch of an epoch: make_loader against torch's DataLoader, 2 workers, in a script with heavy imports.

    python benchmarks/loader_epoch_start.py [--reps 15] [--smoke]

Many training scripts import heavy modules at their top (scikit-learn, SciPy, torchvision). A loader
whose workers start that script's ``__main__`` again (spawn, forkserver) pays those imports at the
start of every epoch; forked workers do not. The measured loop runs in a child process whose
``__main__`` imports scikit-learn and SciPy at its top, as such a script does. Each side is a loader
of 2 workers over 128 samples of 3x32x32 in batches of 16 (no persistent workers: they start every
epoch); a round times, for each side, ``iter(loader)`` up to its first batch, then drains the epoch
untimed. Target: make_loader <= 1.5x DataLoader.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import SUMMARY_HEADER, machine, met, paired_ratios, parse_args, readme_table, report, verdict

TARGET = 1.5
HERE = Path(__file__).resolve().parent

# the child: a training script's shape, heavy imports first
SCRIPT = """
import scipy.stats  # noqa: F401 - the heavy imports of a training script's top
import sklearn.ensemble  # noqa: F401

import json
import sys
import time

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, {benchmarks!r})
from _common import alternate

from batteries import make_loader


class Images(Dataset):
    def __len__(self):
        return 128

    def __getitem__(self, index):
        return torch.full((3, 32, 32), float(index)), index


def first_batch(loader):
    start = time.perf_counter()
    batches = iter(loader)
    next(batches)
    elapsed = time.perf_counter() - start
    for _ in batches:
        pass
    return elapsed


if __name__ == "__main__":
    torch.set_num_threads(1)
    loaders = {{
        "DataLoader": DataLoader(Images(), batch_size=16, num_workers=2),
        "make_loader": make_loader(Images(), 16, num_workers=2),
    }}
    sides = {{name: (lambda loader=loader: first_batch(loader)) for name, loader in loaders.items()}}
    print(json.dumps(alternate(sides, {reps})))
"""


def main() -> None:
    args = parse_args(__doc__.split("\n")[0], reps=15)
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="batteries-loader-") as folder:
        script = Path(folder) / "train.py"
        script.write_text(SCRIPT.format(benchmarks=str(HERE), reps=args.reps))
        result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        sys.exit(f"the measured script failed:\n{result.stderr[-3000:]}")
    times = json.loads(result.stdout.strip().splitlines()[-1])
    report("first batch of an epoch, 2 workers, heavy imports in __main__", times, "DataLoader")
    ratio = paired_ratios(times, "DataLoader")["make_loader"]
    print(f"  paired ratio make_loader / DataLoader (median over rounds): {ratio:.3f}")
    verdict("make_loader first batch", ratio, TARGET, args.smoke)
    base_ms = sorted(times["DataLoader"])[len(times["DataLoader"]) // 2] * 1e3
    readme_table(
        SUMMARY_HEADER,
        [
            [
                "first batch of an epoch, 2 workers, scikit-learn + SciPy imported in `__main__`",
                f"DataLoader: {base_ms:.0f} ms",
                f"make_loader ratio **{ratio:.2f}**",
                f"<= {TARGET}",
                met(ratio, TARGET, args.smoke),
            ]
        ],
    )


if __name__ == "__main__":
    main()
