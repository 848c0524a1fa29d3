"""The same epoch five ways: bare PyTorch, batteries, Lightning Fabric, HF Accelerate, PyTorch-Ignite.

    pip install -c constraints.txt -e ".[bench-anchors]"
    python benchmarks/anchors.py [--reps 15] [--threads 1] [--smoke]

The epoch (benchmarks/_workload.py): the device example's CNN on the digits, 60 steps of batch 24
from a `DataLoader`, one CPU thread by default. Each variant trains the epoch and saves one
checkpoint the way its users would:

- bare PyTorch: `torch.save({"model", "optimizer", "epoch"}, path)`;
- batteries: `t2d`, a tensor `AverageMeter`, the tqdm preset, `CheckpointManager.process(score,
  epoch, make_checkpoint(...))` (temporary file, fsync, rename, folder fsync, best/last links,
  metrics.json);
- Lightning Fabric: `fabric.setup`, `fabric.backward`, `fabric.save(path, state)`;
- HF Accelerate: `accelerator.prepare`, `accelerator.backward`, `accelerator.save_state(dir)`
  (safetensors model, optimizer, RNG states);
- PyTorch-Ignite: `create_supervised_trainer` and a `ModelCheckpoint` handler on EPOCH_COMPLETED.

Then again, each logging the loss to TensorBoard every step its way (bare: tensorboardX's
`SummaryWriter.add_scalar(loss.item())`; batteries: `TensorboardLogger.add_scalar(loss.detach())`;
Fabric: `fabric.log` with its TensorBoardLogger; Accelerate: `accelerator.log` with
`log_with="tensorboard"`; Ignite: its TensorboardLogger's OutputHandler), each writer flushed at
the end of the timed epoch. All run tensorboardX (the `tensorboard` package is not installed).

Setup (`fabric.setup`, `accelerator.prepare`, building the engine) happens before the timing: it
is paid once per run, not per epoch. The variants alternate in one process, round after round;
a ratio is the median over rounds of a variant's epoch time over the bare epoch's (the one that logs
nothing) of the same round.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

ANCHORS = {"lightning_fabric": "Lightning Fabric", "accelerate": "HF Accelerate", "ignite": "PyTorch-Ignite"}


def missing_anchors() -> list[str]:
    return [module for module in ANCHORS if importlib.util.find_spec(module) is None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=15, help="timed rounds (default 15)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--smoke", action="store_true", help="one round of 3 steps: checks that it runs")
    args = parser.parse_args()
    missing = missing_anchors()
    if missing:
        install = "pip install -c constraints.txt -e '.[bench-anchors]'"
        print(f"anchors: skipped, {', '.join(missing)} not installed: {install}")
        sys.exit(0 if args.smoke else 2)
    run(reps=1 if args.smoke else args.reps, threads=args.threads, smoke=args.smoke)


def run(reps: int, threads: int, smoke: bool) -> None:
    import torch
    import torch.nn.functional as F
    from _common import Clock, alternate, machine, median, met, paired_ratios, readme_table
    from _workload import dataset, fresh, loader
    from tensorboardX import SummaryWriter

    from batteries import AverageMeter, CheckpointManager, TensorboardLogger, make_checkpoint, t2d
    from batteries.progress import tqdm

    warnings.filterwarnings("ignore")  # the frameworks' advice about CPU training, precision, workers
    for name in ("lightning", "lightning_fabric", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from accelerate import Accelerator
    from ignite.engine import Events, create_supervised_trainer
    from ignite.handlers import ModelCheckpoint
    from ignite.handlers.tensorboard_logger import OutputHandler
    from ignite.handlers.tensorboard_logger import TensorboardLogger as IgniteTensorboardLogger
    from lightning_fabric import Fabric
    from lightning_fabric.loggers import TensorBoardLogger as FabricTensorBoardLogger

    torch.set_num_threads(threads)
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f}")
    data = loader(dataset(smoke=smoke))
    device = torch.device("cpu")
    root = Path(tempfile.mkdtemp(prefix="batteries-anchors-"))
    epochs: dict[str, int] = {}
    clock = Clock()
    steps: dict[str, int] = {}

    def next_epoch(name: str) -> int:
        epochs[name] = epochs.get(name, 0) + 1
        return epochs[name]

    # ----------------------------------------------------------------------------- bare PyTorch
    bare_writer = SummaryWriter(str(root / "tb-bare"))

    def bare(log: bool):
        def epoch() -> float:
            model, optimizer = fresh()
            name = "bare+log" if log else "bare"
            epoch_index = next_epoch(name)
            step = steps.get(name, 0)
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
                if log:
                    bare_writer.add_scalar("train/loss", value, step)
                step += 1
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch_index}
            torch.save(state, root / f"{name}_{epoch_index}.pth")
            if log:
                bare_writer.flush()
            elapsed = clock.stop(name, start)
            steps[name] = step
            return elapsed

        return epoch

    # ----------------------------------------------------------------------------- batteries
    managers = {log: CheckpointManager(root / f"batteries-{log}", save_n_best=3) for log in (False, True)}
    tensorboard = TensorboardLogger(root / "tb-batteries")
    devnull = open(os.devnull, "w")  # noqa: SIM115 - the bar's output, closed at the end

    def ours(log: bool):
        def epoch() -> float:
            model, optimizer = fresh()
            name = "batteries+log" if log else "batteries"
            epoch_index = next_epoch(name)
            step = steps.get(name, 0)
            start = clock.start()
            meter = AverageMeter()
            for batch in tqdm(data, desc=name, leave=False, file=devnull):
                x, y = t2d(batch, device)
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                meter.update(loss.detach(), x.size(0))
                if log:
                    tensorboard.add_scalar("train/loss", loss.detach(), step)
                step += 1
            checkpoint = make_checkpoint("train", epoch_index, model, optimizer)
            managers[log].process(score=meter.average, epoch=epoch_index, checkpoint=checkpoint)
            if log:
                tensorboard.flush()
            elapsed = clock.stop(name, start)
            steps[name] = step
            return elapsed

        return epoch

    # ----------------------------------------------------------------------------- Lightning Fabric
    fabric_logger = FabricTensorBoardLogger(root_dir=str(root / "tb-fabric"), name="run")
    fabrics = {
        False: Fabric(accelerator="cpu", devices=1),
        True: Fabric(accelerator="cpu", devices=1, loggers=fabric_logger),
    }

    def fabric_epoch(log: bool):
        fabric = fabrics[log]

        def epoch() -> float:
            model, optimizer = fresh()
            model, optimizer = fabric.setup(model, optimizer)
            train_data = fabric.setup_dataloaders(data)
            name = "fabric+log" if log else "fabric"
            epoch_index = next_epoch(name)
            step = steps.get(name, 0)
            start = clock.start()
            for x, y in train_data:
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                fabric.backward(loss)
                optimizer.step()
                if log:
                    fabric.log("train/loss", loss, step)
                step += 1
            state = {"model": model, "optimizer": optimizer, "epoch": epoch_index}
            fabric.save(root / f"{name}_{epoch_index}.ckpt", state)
            if log:
                fabric_logger.experiment.flush()
            elapsed = clock.stop(name, start)
            steps[name] = step
            return elapsed

        return epoch

    # ----------------------------------------------------------------------------- HF Accelerate
    accelerators = {
        False: Accelerator(cpu=True),
        True: Accelerator(cpu=True, log_with="tensorboard", project_dir=str(root / "tb-accelerate")),
    }
    accelerators[True].init_trackers("run")

    def accelerate_epoch(log: bool):
        accelerator = accelerators[log]

        def epoch() -> float:
            accelerator.free_memory()  # forget the previous round's model, or save_state saves both
            model, optimizer = fresh()
            model, optimizer, train_data = accelerator.prepare(model, optimizer, data)
            name = "accelerate+log" if log else "accelerate"
            epoch_index = next_epoch(name)
            step = steps.get(name, 0)
            start = clock.start()
            for x, y in train_data:
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                accelerator.backward(loss)
                optimizer.step()
                if log:
                    accelerator.log({"train/loss": loss.item()}, step=step)
                step += 1
            accelerator.save_state(str(root / f"{name}_{epoch_index}"))
            if log:
                accelerator.get_tracker("tensorboard", unwrap=True).flush()
            elapsed = clock.stop(name, start)
            steps[name] = step
            return elapsed

        return epoch

    # ----------------------------------------------------------------------------- PyTorch-Ignite
    ignite_writer = IgniteTensorboardLogger(log_dir=str(root / "tb-ignite"))

    def ignite_epoch(log: bool):
        def epoch() -> float:
            model, optimizer = fresh()
            name = "ignite+log" if log else "ignite"
            epoch_index = next_epoch(name)
            trainer = create_supervised_trainer(model, optimizer, F.cross_entropy, device)
            saver = ModelCheckpoint(root / f"{name}_{epoch_index}", filename_prefix="ignite", n_saved=1)
            trainer.add_event_handler(Events.EPOCH_COMPLETED, saver, {"model": model, "optimizer": optimizer})
            offset = steps.get(name, 0)

            def step(*_) -> int:
                return offset + trainer.state.iteration

            if log:
                handler = OutputHandler(
                    tag="train", output_transform=lambda loss: {"loss": loss}, global_step_transform=step
                )
                ignite_writer.attach(trainer, handler, Events.ITERATION_COMPLETED)
                trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: ignite_writer.writer.flush())
            start = clock.start()
            trainer.run(data, max_epochs=1)
            elapsed = clock.stop(name, start)
            steps[name] = step()
            return elapsed

        return epoch

    sides = {
        "bare PyTorch": bare(False),
        "batteries": ours(False),
        "Lightning Fabric": fabric_epoch(False),
        "HF Accelerate": accelerate_epoch(False),
        "PyTorch-Ignite": ignite_epoch(False),
        "bare PyTorch + tensorboardX": bare(True),
        "batteries + TensorboardLogger": ours(True),
        "Lightning Fabric + fabric.log": fabric_epoch(True),
        "HF Accelerate + accelerator.log": accelerate_epoch(True),
        "PyTorch-Ignite + OutputHandler": ignite_epoch(True),
    }
    if torch.get_num_threads() != threads:  # a framework changed it: every variant must run alike
        raise RuntimeError(f"torch threads changed from {threads} to {torch.get_num_threads()}")
    times = alternate(sides, reps)
    bare_writer.close()
    tensorboard.close()
    fabric_logger.finalize("success")
    accelerators[True].end_training()
    ignite_writer.close()
    devnull.close()
    shutil.rmtree(root, ignore_errors=True)

    medians = {name: median(values) for name, values in times.items()}
    ratios = paired_ratios(times, "bare PyTorch")
    short = dict(zip(sides, ["bare", "batteries", "fabric", "accelerate", "ignite"]))
    short.update({name: f"{short[name.split(' +')[0]]}+log" for name in sides if "+" in name})
    cpu = clock.cpu_times()
    cpu_ratios = paired_ratios({name: cpu[short[name]] for name in sides}, "bare PyTorch")
    print(f"\none epoch ({len(data)} steps of batch {data.batch_size}, {threads} thread(s)) + one checkpoint, n={reps}")
    for name, value in medians.items():
        spread = f"min {min(times[name]) * 1e3:.1f}, max {max(times[name]) * 1e3:.1f}"
        print(f"  {name:<34} median {value * 1e3:8.1f} ms ({spread})  ratio to bare {ratios[name]:.3f}", end="")
        print(f", of CPU time {cpu_ratios[name]:.3f}")
    logging_sides = [name for name in sides if "+" in name]
    best_anchor = min(ratios[name] for name in logging_sides if not name.startswith("batteries"))
    note = "smoke run (one round of 3 steps), not a measurement" if smoke else "measured"
    print(
        f"anchors: {note}; batteries + TensorboardLogger {ratios['batteries + TensorboardLogger']:.3f}x bare, ", end=""
    )
    print(f"best other logging variant {best_anchor:.3f}x")

    saves = {
        "bare PyTorch": "`torch.save` of the state dicts",
        "batteries": "`CheckpointManager.process` (fsynced, best/last links, metrics.json)",
        "Lightning Fabric": "`fabric.save`",
        "HF Accelerate": "`accelerator.save_state` (safetensors + optimizer + RNG)",
        "PyTorch-Ignite": "`ModelCheckpoint` handler (atomic, no fsync)",
    }
    rows = []
    for name, save in saves.items():
        logged = next(side for side in logging_sides if side.startswith(name))
        rows.append(
            [
                name,
                save,
                f"{ratios[name]:.3f} ({cpu_ratios[name]:.3f})",
                f"{ratios[logged]:.3f} ({cpu_ratios[logged]:.3f})",
            ]
        )
    rows[1][2], rows[1][3] = f"**{rows[1][2]}**", f"**{rows[1][3]}**"
    readme_table(
        [
            f"one epoch + one checkpoint (bare: {medians['bare PyTorch'] * 1e3:.0f} ms)",
            "checkpoint",
            "ratio to bare (of CPU time)",
            "ratio, logging the loss to TensorBoard every step (of CPU time)",
        ],
        rows,
    )
    lowest = ratios["batteries + TensorboardLogger"] <= best_anchor
    print(
        f"batteries + TensorboardLogger the lowest of the logging variants: {met(0.0 if lowest else 1.0, 0.5, smoke)}"
    )


if __name__ == "__main__":
    main()
