"""Asynchronous save: the time the training loop is blocked, against a synchronous save.

    python benchmarks/async_save.py [--reps 7] [--size-mb 100] [--smoke]

A 100 MB state. Synchronous: `save_checkpoint(...)` and `CheckpointManager.process(...)` return
once the file is written and fsynced. Asynchronous: `save_checkpoint(..., blocking=False)` and
`CheckpointManager(..., async_save=True).process(...)` return once the tensors are copied to CPU
memory; a background thread writes the file. Only the caller's blocked time is measured; the
background write is waited for, untimed, before the next repetition. Target: blocked time <= 0.10
of the synchronous save.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from _common import SUMMARY_HEADER, alternate, machine, median, met, readme_table, report, verdict
from checkpoint_io import state_of

from batteries import CheckpointManager, save_checkpoint, wait_for_saves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    reps, size_mb = (1, 1) if args.smoke else (args.reps, args.size_mb)
    root = Path(tempfile.mkdtemp(prefix="batteries-async-"))
    print(f"machine: {machine()}; {size_mb} MB state")
    state = state_of(size_mb)
    try:

        def blocked(fn) -> float:
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            wait_for_saves()  # untimed: the background write finishes before the next round
            return elapsed

        times = alternate(
            {
                "save_checkpoint": lambda: blocked(lambda: save_checkpoint(state, root, "sync.pth")),
                "save_checkpoint(blocking=False)": lambda: blocked(
                    lambda: save_checkpoint(state, root, "async.pth", blocking=False)
                ),
            },
            reps,
        )
        ratio = report("caller blocked per save", times, baseline="save_checkpoint")
        verdict("save_checkpoint(blocking=False)", ratio, 0.10, args.smoke)
        rows = [
            [
                f"`save_checkpoint(blocking=False)`, {size_mb} MB: time the caller is blocked",
                f"synchronous: {median(times['save_checkpoint']) * 1e3:.0f} ms",
                f"{median(times['save_checkpoint(blocking=False)']) * 1e3:.1f} ms, ratio **{ratio:.3f}**",
                "<= 0.10",
                met(ratio, 0.10, args.smoke),
            ]
        ]

        sync_manager = CheckpointManager(root / "sync", save_n_best=2)
        async_manager = CheckpointManager(root / "async", save_n_best=2, async_save=True)
        epochs = {"sync": 0, "async": 0}

        def process(manager: CheckpointManager, key: str) -> float:
            epochs[key] += 1
            start = time.perf_counter()
            manager.process(score=float(epochs[key]), epoch=epochs[key], checkpoint={**state, "epoch": epochs[key]})
            elapsed = time.perf_counter() - start
            manager.wait()
            return elapsed

        times = alternate(
            {
                "CheckpointManager.process": lambda: process(sync_manager, "sync"),
                "CheckpointManager(async_save=True).process": lambda: process(async_manager, "async"),
            },
            reps,
        )
        ratio = report("caller blocked per process()", times, baseline="CheckpointManager.process")
        verdict("CheckpointManager(async_save=True)", ratio, 0.10, args.smoke)
        blocked_ms = median(times["CheckpointManager(async_save=True).process"]) * 1e3
        rows.append(
            [
                f"`CheckpointManager(async_save=True).process`, {size_mb} MB",
                f"synchronous: {median(times['CheckpointManager.process']) * 1e3:.0f} ms",
                f"{blocked_ms:.1f} ms, ratio **{ratio:.3f}**",
                "<= 0.10",
                met(ratio, 0.10, args.smoke),
            ]
        )
        readme_table(SUMMARY_HEADER, rows)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
