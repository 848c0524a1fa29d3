"""One epoch of the device example's model with the helpers in the loop, against bare PyTorch.

    python benchmarks/loop_overhead.py [--reps 11] [--smoke]

Helpers side: `t2d`, `AverageMeter` (tensor updates), the rank-aware tqdm preset,
`TensorboardLogger.add_metric` every step, `CheckpointManager.process` at the end (crash-safe:
fsync, hard links, metrics.json). Bare side: `.to()`, `loss.item()` summed by hand, no bar, no
TensorBoard, `torch.save` at the end. Same data, model, optimizer and seed. Target ratio <= 1.02.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import alternate, machine, parse_args, report, verdict

from batteries import AverageMeter, CheckpointManager, TensorboardLogger, make_checkpoint, t2d
from batteries.progress import tqdm

ROOT = Path(__file__).resolve().parents[1]


def load_example():
    spec = importlib.util.spec_from_file_location("device_example", ROOT / "examples" / "device" / "experiment.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    args = parse_args(__doc__.split("\n")[0], reps=11)
    print(f"machine: {machine()}")
    example = load_example()
    train_dataset, _ = example.get_datasets(seed=0)
    x_all = torch.stack([train_dataset[i][0] for i in range(len(train_dataset))])
    y_all = torch.stack([train_dataset[i][1] for i in range(len(train_dataset))])
    batches = list(zip(x_all.split(64), y_all.split(64)))
    if args.smoke:
        batches = batches[:3]
    device = torch.device("cpu")
    workdir = Path(tempfile.mkdtemp(prefix="batteries-bench-"))

    def fresh():
        torch.manual_seed(0)
        model = example.Net().to(device)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

    epoch_counter = {"bare": 0, "helpers": 0}

    def bare() -> float:
        model, optimizer = fresh()
        start = time.perf_counter()
        model.train()
        total, count = 0.0, 0
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            total += loss.item() * x.size(0)
            count += x.size(0)
        epoch_counter["bare"] += 1
        torch.save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "loss": total / count},
            workdir / f"bare_{epoch_counter['bare']}.pth",
        )
        return time.perf_counter() - start

    manager = CheckpointManager(workdir / "helpers", save_n_best=3)
    tensorboard = TensorboardLogger(workdir / "tb")

    def helpers() -> float:
        model, optimizer = fresh()
        start = time.perf_counter()
        model.train()
        meter = AverageMeter()
        epoch = epoch_counter["helpers"] = epoch_counter["helpers"] + 1
        for step, batch in enumerate(tqdm(batches, desc="bench", leave=False)):
            x, y = t2d(batch, device)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            meter.update(loss.detach(), x.size(0))
            tensorboard.add_metric("train/loss", loss.detach(), epoch * len(batches) + step)
        manager.process(score=meter.average, epoch=epoch, checkpoint=make_checkpoint("s", epoch, model, optimizer))
        return time.perf_counter() - start

    times = alternate({"bare PyTorch": bare, "with batteries helpers": helpers}, args.reps)
    tensorboard.close()
    ratio = report(f"one epoch ({len(batches)} steps of batch 64)", times, baseline="bare PyTorch")
    verdict("loop overhead", ratio, 1.02, args.smoke)


if __name__ == "__main__":
    main()
