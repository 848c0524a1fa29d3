"""`t2d` on a nested batch against hand-written `.to()` calls.

    python benchmarks/t2d_overhead.py [--reps 15] [--smoke]

The batch: a dict with an image tensor, labels, a list of two mask tensors, a nested dict with
lengths and a list of string ids. Each repetition times a block of calls. Target ratio <= 1.10.
On a machine without a GPU the target device is the CPU, where `.to()` returns its input: the
figure is then the pure walking cost, the worst case for `t2d`.
"""

from __future__ import annotations

import time

import torch
from _common import SUMMARY_HEADER, alternate, machine, median, met, parse_args, readme_table, report, verdict

from batteries import t2d


def make_batch() -> dict:
    return {
        "image": torch.randn(64, 3, 32, 32),
        "label": torch.randint(0, 10, (64,)),
        "masks": [torch.ones(64, 32, dtype=torch.bool), torch.zeros(64, 32, dtype=torch.bool)],
        "meta": {"lengths": torch.full((64,), 32), "ids": [f"sample-{i}" for i in range(64)]},
    }


def by_hand(batch: dict, device: torch.device) -> dict:
    return {
        "image": batch["image"].to(device, non_blocking=True),
        "label": batch["label"].to(device, non_blocking=True),
        "masks": [mask.to(device, non_blocking=True) for mask in batch["masks"]],
        "meta": {"lengths": batch["meta"]["lengths"].to(device, non_blocking=True), "ids": batch["meta"]["ids"]},
    }


def main() -> None:
    args = parse_args(__doc__.split("\n")[0], reps=15)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"machine: {machine()}; device {device}")
    batch = make_batch()
    if device.type == "cuda":
        batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    calls = 200 if args.smoke else 20_000

    def block(fn):
        def run() -> float:
            start = time.perf_counter()
            for _ in range(calls):
                fn(batch, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return (time.perf_counter() - start) / calls

        return run

    times = alternate(
        {"hand-written .to()": block(by_hand), "t2d": block(lambda b, d: t2d(b, d, non_blocking=True))}, args.reps
    )
    ratio = report("time per batch", times, baseline="hand-written .to()", unit="us", scale=1e6)
    verdict("t2d", ratio, 1.10, args.smoke)
    by_hand_us, ours_us = median(times["hand-written .to()"]) * 1e6, median(times["t2d"]) * 1e6
    readme_table(
        SUMMARY_HEADER,
        [
            [
                f"`t2d` on a nested batch (image, labels, 2 masks, lengths, 64 string ids), {device.type.upper()}",
                f"hand-written `.to()`: {by_hand_us:.1f} us",
                f"{ours_us:.1f} us, ratio **{ratio:.2f}**",
                "<= 1.10",
                met(ratio, 1.10, args.smoke),
            ]
        ],
    )


if __name__ == "__main__":
    main()
