"""`AverageMeter.update` cost: tensor values (no host sync) against Python floats.

    python benchmarks/meter_update.py [--reps 15] [--smoke]

Three ways to track a loss per step: `update(loss.item(), n)` (a host sync per step on a GPU),
`update(float, n)` with the float already on the host (the floor), and `update(loss, n)` with
the tensor, which accumulates on the tensor's device and syncs once when `.average` is read. On
a CPU there is no sync to save, so the figures show the bookkeeping cost alone; on a GPU the
`.item()` variant also waits for the step's kernels every step.
"""

from __future__ import annotations

import time

import torch
from _common import SUMMARY_HEADER, alternate, machine, median, parse_args, readme_table, report

from batteries import AverageMeter


def main() -> None:
    args = parse_args(__doc__.split("\n")[0], reps=15)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"machine: {machine()}; device {device}")
    loss = torch.rand((), device=device)
    value = loss.item()
    updates = 200 if args.smoke else 20_000

    def block(update):
        def run() -> float:
            meter = AverageMeter()
            start = time.perf_counter()
            for _ in range(updates):
                update(meter)
            meter.average  # noqa: B018 - the one sync, included
            return (time.perf_counter() - start) / updates

        return run

    times = alternate(
        {
            "update(float)": block(lambda m: m.update(value, 64)),
            "update(tensor)": block(lambda m: m.update(loss, 64)),
            "update(loss.item())": block(lambda m: m.update(loss.item(), 64)),
        },
        args.reps,
    )
    report(
        "time per update (float meter as baseline)",
        {k: times[k] for k in ("update(float)", "update(tensor)")},
        "update(float)",
        "us",
        1e6,
    )
    report(
        "time per update (.item() per step as baseline)",
        {k: times[k] for k in ("update(loss.item())", "update(tensor)")},
        "update(loss.item())",
        "us",
        1e6,
    )
    print("meter update: no target on CPU (see docstring); host syncs per update with tensors: 0")
    us = {name: median(values) * 1e6 for name, values in times.items()}
    readme_table(
        SUMMARY_HEADER,
        [
            [
                f"`AverageMeter.update` with a tensor, {device.type.upper()}",
                f"`update(float)`: {us['update(float)']:.2f} us; "
                f"`update(loss.item())`: {us['update(loss.item())']:.2f} us",
                f"{us['update(tensor)']:.2f} us",
                "none on CPU" if device.type == "cpu" else "below `update(loss.item())`",
                "no host sync per update" if args.smoke or device.type == "cpu" else "see figures",
            ]
        ],
    )


if __name__ == "__main__":
    main()
