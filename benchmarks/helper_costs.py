"""What each helper costs, per step in microseconds and per epoch in milliseconds, against doing without.

    python benchmarks/helper_costs.py [--reps 15] [--smoke]

Per step (a block of calls timed, divided by the calls), on the loop benchmarks' batch (24 images):
- `t2d((x, y), device)` against `x.to(device), y.to(device)`;
- a tensor `AverageMeter.update(loss, n)` against `total += loss.item() * n`;
- one iteration of the tqdm preset (output to /dev/null) against a bare `for`;
- `TensorboardLogger.add_scalar(tag, loss, step)` against tensorboardX's
  `SummaryWriter.add_scalar(tag, loss.item(), step)`, and what writing it costs later, on the
  logger's thread (`flush()` time over the scalars written).
Per epoch, on the loop benchmarks' model and AdamW state (about 1.1 MB):
- `CheckpointManager.process(score, epoch, make_checkpoint(...))` against `torch.save` and against
  `torch.save` + `fsync`, each into a fresh numbered file.

On a CPU `.to("cpu")` and `.item()` wait for nothing: the per-step figures are bookkeeping alone.
The epoch benchmarks (loop_overhead.py, anchors.py) show what these add up to.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import alternate, machine, median, parse_args, readme_table
from _workload import BATCH_SIZE, dataset, fresh
from tensorboardX import SummaryWriter

from batteries import AverageMeter, CheckpointManager, TensorboardLogger, make_checkpoint, t2d
from batteries.progress import tqdm


def per_call(fn, calls: int):
    def run() -> float:
        start = time.perf_counter()
        fn(calls)
        return (time.perf_counter() - start) / calls

    return run


def main() -> None:
    args = parse_args(__doc__.split("\n")[0], reps=15)
    torch.set_num_threads(1)
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f}")
    calls = 100 if args.smoke else 2_000  # below the 4,096 pending scalars that wake the logger's thread
    device = torch.device("cpu")
    data = dataset(smoke=True)
    x, y = data.tensors[0][:BATCH_SIZE], data.tensors[1][:BATCH_SIZE]
    loss = torch.tensor(2.3)
    root = Path(tempfile.mkdtemp(prefix="batteries-costs-"))
    devnull = open(os.devnull, "w")  # noqa: SIM115 - closed at the end

    def to_by_hand(n: int) -> None:
        for _ in range(n):
            x.to(device), y.to(device)

    def to_t2d(n: int) -> None:
        for _ in range(n):
            t2d((x, y), device)

    def sum_by_hand(n: int) -> None:
        total = 0.0
        for _ in range(n):
            total += loss.item() * BATCH_SIZE

    def sum_meter(n: int) -> None:
        meter = AverageMeter()
        for _ in range(n):
            meter.update(loss, BATCH_SIZE)
        meter.average  # noqa: B018 - the one read, included

    def bare_for(n: int) -> None:
        for _ in range(n):
            pass

    def tqdm_for(n: int) -> None:
        for _ in tqdm(range(n), file=devnull, leave=False):
            pass

    summary_writer = SummaryWriter(str(root / "tensorboardX"))
    tensorboard = TensorboardLogger(root / "batteries")
    written = {"scalars": 0, "seconds": 0.0}

    def log_tensorboardx(n: int) -> None:
        for step in range(n):
            summary_writer.add_scalar("train/loss", loss.item(), step)

    def log_batteries() -> float:
        start = time.perf_counter()
        for step in range(calls):
            tensorboard.add_scalar("train/loss", loss, step)
        elapsed = time.perf_counter() - start
        start = time.perf_counter()  # the writing, which the logger's thread does every flush_secs
        tensorboard.flush()
        written["seconds"] += time.perf_counter() - start
        written["scalars"] += calls
        return elapsed / calls

    step_sides = {
        "x.to(), y.to()": per_call(to_by_hand, calls),
        "t2d((x, y))": per_call(to_t2d, calls),
        "total += loss.item() * n": per_call(sum_by_hand, calls),
        "AverageMeter.update(loss, n)": per_call(sum_meter, calls),
        "bare for": per_call(bare_for, calls),
        "tqdm preset": per_call(tqdm_for, calls),
        "SummaryWriter.add_scalar(loss.item())": per_call(log_tensorboardx, calls),
        "TensorboardLogger.add_scalar(loss)": log_batteries,
    }
    step_times = alternate(step_sides, args.reps)
    tensorboard.close()
    summary_writer.close()
    us = {name: median(values) * 1e6 for name, values in step_times.items()}
    write_us = written["seconds"] / written["scalars"] * 1e6

    # ------------------------------------------------------------------------ per epoch
    model, optimizer = fresh()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    checkpoint = make_checkpoint("train", 0, model, optimizer)
    manager = CheckpointManager(root / "manager", save_n_best=3)
    epochs = {"save": 0, "fsync": 0, "manager": 0}

    def torch_save() -> None:
        epochs["save"] += 1
        torch.save(checkpoint, root / f"save_{epochs['save']}.pth")

    def torch_save_fsync() -> None:
        epochs["fsync"] += 1
        with open(root / f"fsync_{epochs['fsync']}.pth", "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())

    def manager_process() -> None:
        epochs["manager"] += 1  # epochs only go forward: a new one each call
        state = make_checkpoint("train", epochs["manager"], model, optimizer)
        manager.process(score=1.0 / epochs["manager"], epoch=epochs["manager"], checkpoint=state)

    epoch_sides = {"torch.save": torch_save, "torch.save + fsync": torch_save_fsync, "manager": manager_process}
    epoch_times = alternate(epoch_sides, args.reps)
    size_bytes = (root / "save_1.pth").stat().st_size
    ms = {name: median(values) * 1e3 for name, values in epoch_times.items()}
    devnull.close()
    shutil.rmtree(root, ignore_errors=True)

    print(f"\nper step (median of {args.reps} blocks of {calls} calls)")
    for name, value in us.items():
        print(f"  {name:<40} {value:8.2f} us")
    print(f"  {'TensorboardLogger, writing (off the loop)':<40} {write_us:8.2f} us per scalar")
    print(f"\nper epoch, checkpoint of {size_bytes / 1e6:.2f} MB (median of {args.reps})")
    for name, value in ms.items():
        print(f"  {name:<40} {value:8.2f} ms")
    if args.smoke:
        print("helper costs: smoke run (one repetition), not a measurement")

    def extra(ours: str, theirs: str) -> str:
        return f"{us[ours] - us[theirs]:+.2f} us"

    readme_table(
        ["per step", "without the helper", "with it", "difference"],
        [
            ["`t2d((x, y), device)`", f"`.to()` x2: {us['x.to(), y.to()']:.2f} us", f"{us['t2d((x, y))']:.2f} us"]
            + [extra("t2d((x, y))", "x.to(), y.to()")],
            [
                "`AverageMeter.update(loss, n)`, tensor",
                f"`total += loss.item() * n`: {us['total += loss.item() * n']:.2f} us",
                f"{us['AverageMeter.update(loss, n)']:.2f} us",
                extra("AverageMeter.update(loss, n)", "total += loss.item() * n"),
            ],
            [
                "tqdm preset, one iteration",
                f"bare `for`: {us['bare for']:.2f} us",
                f"{us['tqdm preset']:.2f} us",
                extra("tqdm preset", "bare for"),
            ],
            [
                "`TensorboardLogger.add_scalar(tag, loss, step)`",
                f"tensorboardX `add_scalar(loss.item())`: {us['SummaryWriter.add_scalar(loss.item())']:.1f} us",
                f"**{us['TensorboardLogger.add_scalar(loss)']:.2f} us** (target <= 2 us)",
                extra("TensorboardLogger.add_scalar(loss)", "SummaryWriter.add_scalar(loss.item())"),
            ],
            ["its writing, later, on the logger's thread", "", f"{write_us:.2f} us per scalar", ""],
        ],
    )
    readme_table(
        [f"per epoch: checkpoint of {size_bytes / 1e6:.1f} MB", "time", "ratio to `torch.save`"],
        [
            ["`torch.save`", f"{ms['torch.save']:.2f} ms", "1.00"],
            [
                "`torch.save` + `fsync`",
                f"{ms['torch.save + fsync']:.2f} ms",
                f"{ms['torch.save + fsync'] / ms['torch.save']:.2f}",
            ],
            [
                "`CheckpointManager.process` (temporary file, fsyncs, rename, best/last links, metrics.json)",
                f"{ms['manager']:.2f} ms",
                f"{ms['manager'] / ms['torch.save']:.2f}",
            ],
        ],
    )


if __name__ == "__main__":
    main()
