"""One training epoch three ways: with the batteries helpers, hand-written with tensorboardX, bare.

    python benchmarks/loop_overhead.py [--reps 21] [--threads 1] [--smoke]

The epoch (benchmarks/_workload.py): the device example's CNN on the digits, 60 steps of batch 24,
one CPU thread by default (the machine has 2 cores; TensorBoard writers run their own thread).

- bare: `.to()`, `loss.item()` summed by hand; logs nothing.
- hand-written: the bare loop plus tensorboardX's `SummaryWriter.add_scalar("train/loss", loss.item(), step)`
  every step, as most loops log.
- batteries: `t2d`, a tensor `AverageMeter`, the rank-aware tqdm preset and
  `TensorboardLogger.add_scalar("train/loss", loss.detach(), step)` every step.

Both logging loops call their writer's `flush()` at the end of the timed epoch, so every event is
built and written inside the timing (with one fsync of the event file an epoch, which a real run
pays once per `flush_secs`). Checkpoints are per-epoch costs: see helper_costs.py and anchors.py.
The loops alternate in one process; a ratio is the median over rounds of a loop's epoch time over
the bare epoch's of the same round. Targets: batteries <= 1.02x bare, and below hand-written.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import Clock, alternate, machine, median, met, paired_ratios, readme_table
from _workload import dataset, fresh, loader

from batteries import AverageMeter, TensorboardLogger, t2d
from batteries.progress import tqdm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=21, help="timed epochs of each loop (default 21)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--smoke", action="store_true", help="one repetition of 3 steps: checks that it runs")
    args = parser.parse_args()
    reps = 1 if args.smoke else args.reps
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f}")
    data = loader(dataset(smoke=args.smoke))
    device = torch.device("cpu")
    workdir = Path(tempfile.mkdtemp(prefix="batteries-loop-"))
    from tensorboardX import SummaryWriter

    summary_writer = SummaryWriter(str(workdir / "hand-written"))
    tensorboard = TensorboardLogger(workdir / "batteries")
    devnull = open(os.devnull, "w")  # noqa: SIM115 - the bar's output, closed at the end
    steps = {"hand-written": 0, "batteries": 0}
    clock = Clock()

    def bare() -> float:
        model, optimizer = fresh()
        start = clock.start()
        total, count = 0.0, 0
        for x, y in data:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            total += loss.item() * x.size(0)
            count += x.size(0)
        total / count  # noqa: B018 - the epoch's loss, as the others compute it
        return clock.stop("bare", start)

    def hand_written() -> float:
        model, optimizer = fresh()
        start = clock.start()
        total, count = 0.0, 0
        for x, y in data:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            value = loss.item()
            total += value * x.size(0)
            count += x.size(0)
            summary_writer.add_scalar("train/loss", value, steps["hand-written"])
            steps["hand-written"] += 1
        total / count  # noqa: B018
        summary_writer.flush()
        return clock.stop("hand-written", start)

    def helpers() -> float:
        model, optimizer = fresh()
        start = clock.start()
        meter = AverageMeter()
        step = steps["batteries"]
        for x, y in tqdm(data, desc="train", leave=False, file=devnull):
            x, y = t2d((x, y), device)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            meter.update(loss.detach(), x.size(0))
            tensorboard.add_scalar("train/loss", loss.detach(), step)
            step += 1
        steps["batteries"] = step
        meter.average  # noqa: B018
        tensorboard.flush()
        return clock.stop("batteries", start)

    sides = {"bare": bare, "hand-written": hand_written, "batteries": helpers}
    times = alternate(sides, reps)
    summary_writer.close()
    tensorboard.close()
    devnull.close()
    shutil.rmtree(workdir, ignore_errors=True)

    medians = {name: median(values) for name, values in times.items()}
    ratios = paired_ratios(times, "bare")
    cpu_ratios = paired_ratios(clock.cpu_times(), "bare")
    print(f"\none epoch ({len(data)} steps of batch {data.batch_size}, {torch.get_num_threads()} thread(s)), n={reps}")
    for name, value in medians.items():
        spread = f"min {min(times[name]) * 1e3:.1f}, max {max(times[name]) * 1e3:.1f}"
        print(f"  {name:<14} median {value * 1e3:8.1f} ms ({spread})  ratio to bare {ratios[name]:.3f}", end="")
        print(f", of CPU time {cpu_ratios[name]:.3f}")
    below = ratios["batteries"] < ratios["hand-written"]
    if args.smoke:
        print("loop overhead: smoke run (one repetition, 3 steps), not a measurement")
    else:
        print(f"loop overhead: batteries {ratios['batteries']:.3f}x bare (target <= 1.02), hand-written ", end="")
        print(f"{ratios['hand-written']:.3f}x: {'MET' if ratios['batteries'] <= 1.02 and below else 'NOT MET'}")

    def ms(name: str) -> str:
        return f"{medians[name] * 1e3:.0f} ms"

    def cpu(name: str) -> str:
        return f"{cpu_ratios[name]:.3f}"

    readme_table(
        [
            "loop: one epoch, 60 steps of batch 24, 1 thread",
            "median",
            "ratio to bare",
            "CPU time ratio",
            "target",
            "met",
        ],
        [
            ["bare: `.to()`, `loss.item()` summed; logs nothing", ms("bare"), "1.000", "1.000", "", ""],
            [
                "hand-written: bare + tensorboardX `add_scalar(loss.item())` every step",
                ms("hand-written"),
                f"{ratios['hand-written']:.3f}",
                cpu("hand-written"),
                "",
                "",
            ],
            [
                "batteries: `t2d`, tensor `AverageMeter`, tqdm preset, `TensorboardLogger.add_scalar` every step",
                ms("batteries"),
                f"**{ratios['batteries']:.3f}**",
                cpu("batteries"),
                "<= 1.02, < hand-written",
                met(ratios["batteries"], 1.02 if below else 0.0, args.smoke),
            ],
        ],
    )


if __name__ == "__main__":
    main()
