"""Checkpoint I/O: bytes written per `CheckpointManager.process()`, `save_checkpoint` against
`torch.save` + `fsync`, and both against the disk's own sequential write speed.

    python benchmarks/checkpoint_io.py [--reps 5] [--sizes 1,100,1000] [--dir PATH] [--smoke]

1. Bytes: `/proc/self/io` `write_bytes` around one `process()` over the checkpoint's file size
   (target 1.0: best.pth / last.pth are hard links, not copies).
2. Time: `save_checkpoint` (temporary file, fsync, rename, folder fsync) against `torch.save`
   to the final name plus `fsync` of the same dict, for 1 MB, 100 MB and 1 GB states (target <= 1.10).
3. The physical limit: `dd if=/dev/zero bs=1M conv=fsync` of the same size; save throughput is
   reported as a fraction of it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import SUMMARY_HEADER, alternate, machine, median, met, readme_table, report, verdict

from batteries import CheckpointManager, save_checkpoint

MB = 1 << 20


def state_of(size_mb: int) -> dict:
    """A model-like state dict of ``size_mb`` MB in float32 tensors of 1 MB to 16 MB."""
    chunks, left, index = {}, size_mb * MB // 4, 0
    while left > 0:
        numel = min(left, 4 * MB)
        chunks[f"layer{index}.weight"] = torch.randn(numel)
        left -= numel
        index += 1
    return {"model_state_dict": chunks, "epoch": 1}


def write_bytes() -> int | None:
    try:
        with open("/proc/self/io") as file:
            return next(int(line.split()[1]) for line in file if line.startswith("write_bytes"))
    except (OSError, StopIteration):
        return None


def torch_save_fsync(state: dict, path: Path) -> None:
    """The bare baseline: ``torch.save`` to the final name (as save_checkpoint's default save_fn is
    called, with a path), then ``fsync`` of that file. Not crash-safe: a kill mid-write leaves a
    truncated file under the real name."""
    torch.save(state, path)
    with open(path, "rb+") as file:
        os.fsync(file.fileno())


def dd_seconds(path: Path, size_mb: int) -> float:
    start = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={size_mb}", "conv=fsync"],
        check=True,
        capture_output=True,
    )
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--sizes", default="1,100,1000", help="state sizes in MB, comma-separated")
    parser.add_argument("--dir", type=Path, default=None, help="folder on the disk to measure (default: a temp dir)")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    sizes = [1] if args.smoke else [int(size) for size in args.sizes.split(",")]
    reps = 1 if args.smoke else args.reps
    root = Path(tempfile.mkdtemp(prefix="batteries-io-", dir=args.dir))
    print(f"machine: {machine()}; folder {root}")
    try:
        # 1. bytes written per process()
        state = state_of(sizes[-1] if args.smoke else min(sizes[-1], 100))
        manager = CheckpointManager(root / "manager", save_n_best=2)
        manager.process(score=1.0, epoch=1, checkpoint={**state, "epoch": 1})  # warm up: folder and metrics.json exist
        before = write_bytes()
        manager.process(score=0.5, epoch=2, checkpoint={**state, "epoch": 2})
        after = write_bytes()
        size = (root / "manager" / "exp_2.pth").stat().st_size
        rows, speeds = [], []
        if before is None:
            print("\nbytes written per process(): /proc/self/io is not readable here")
        else:
            ratio = (after - before) / size
            print(f"\nbytes written per process(): {after - before:,} for a {size:,}-byte checkpoint")
            print(f"bytes written / checkpoint size: {ratio:.4f} (target 1.0; metrics.json is the rest)")
            rows.append(
                [
                    "bytes written per `CheckpointManager.process()` (`/proc/self/io`)",
                    f"checkpoint size {size:,} B",
                    f"{after - before:,} B, ratio **{ratio:.4f}**",
                    "1.0",
                    "smoke run" if args.smoke else ("yes (metrics.json is the rest)" if ratio < 1.001 else "no"),
                ]
            )
        shutil.rmtree(root / "manager")

        # 2. and 3. time against torch.save + fsync, and the disk's own speed
        for size_mb in sizes:
            state = state_of(size_mb)

            # each side first deletes its previous file, untimed: freeing 1 GB of old blocks is
            # the file system's work, not the save's
            def ours(state: dict = state) -> float:
                (root / "ours.pth").unlink(missing_ok=True)
                start = time.perf_counter()
                save_checkpoint(state, root, "ours.pth")
                return time.perf_counter() - start

            def theirs(state: dict = state) -> float:
                (root / "theirs.pth").unlink(missing_ok=True)
                start = time.perf_counter()
                torch_save_fsync(state, root / "theirs.pth")
                return time.perf_counter() - start

            times = alternate({"torch.save + fsync": theirs, "save_checkpoint": ours}, reps)
            ratio = report(f"{size_mb} MB state", times, baseline="torch.save + fsync")
            verdict(f"save_checkpoint {size_mb} MB", ratio, 1.10, args.smoke)
            disk = sorted(dd_seconds(root / "dd.bin", size_mb) for _ in range(reps))[reps // 2]
            file_mb = (root / "ours.pth").stat().st_size / MB
            ours_s = sorted(times["save_checkpoint"])[reps // 2]
            print(
                f"  disk (dd conv=fsync): {size_mb / disk:8.1f} MB/s; save_checkpoint: {file_mb / ours_s:8.1f} MB/s "
                f"= {file_mb / ours_s / (size_mb / disk):.2f} of the disk's speed"
            )
            for name in ("ours.pth", "theirs.pth"):
                (root / name).unlink(missing_ok=True)
            theirs_ms, ours_ms = median(times["torch.save + fsync"]) * 1e3, median(times["save_checkpoint"]) * 1e3
            size_name = f"{size_mb // 1000} GB" if size_mb >= 1000 else f"{size_mb} MB"
            rows.append(
                [
                    f"`save_checkpoint`, {size_name}",
                    f"`torch.save` + `fsync`: {theirs_ms:.1f} ms",
                    f"{ours_ms:.1f} ms, ratio **{ratio:.2f}**",
                    "<= 1.10",
                    met(ratio, 1.10, args.smoke),
                ]
            )
            speeds.append((size_mb / disk, file_mb / ours_s / (size_mb / disk)))
        disks, fractions = [speed for speed, _ in speeds], [fraction for _, fraction in speeds]
        rows.append(
            [
                "save throughput against the disk (`dd conv=fsync`)",
                f"{min(disks) / 1000:.1f} to {max(disks) / 1000:.1f} GB/s",
                f"{min(fractions):.2f} to {max(fractions):.2f} of it",
                "report",
                "",
            ]
        )
        readme_table(SUMMARY_HEADER, rows)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
