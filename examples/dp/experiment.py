"""Train a small CNN on scikit-learn's handwritten digits with nn.DataParallel over the visible GPUs.

The device example's loop with one change: the model is wrapped in ``nn.DataParallel``, which
splits every batch over the GPUs of this one process (``CUDA_VISIBLE_DEVICES`` picks them). Without
a GPU it runs on the CPU and says so. For several processes or nodes use ``examples/ddp`` instead:
DistributedDataParallel is faster, and PyTorch recommends it over DataParallel.

    python examples/dp/experiment.py                          # all visible GPUs, or the CPU
    CUDA_VISIBLE_DEVICES=0,1 python examples/dp/experiment.py --batch-size 128
    python examples/dp/experiment.py --resume auto            # continue a stopped run

Checkpoints hold the unwrapped model's weights (no ``module.`` prefix), so they load into a bare
model, a DataParallel model or a DDP model alike.

Output (``--logdir``, default ``logs/dp-experiment``):
    checkpoints/  exp_<epoch>.pth (the N best), best.pth, last.pth, metrics.json
    tensorboard/  the TensorBoard run
    train.log     the log
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from batteries import (
    AverageMeter,
    CheckpointManager,
    EarlyStopIndicator,
    TensorboardLogger,
    get_logger,
    load_checkpoint,
    make_training_state,
    restore_training_state,
    save_checkpoint,
    seed_all,
    t2d,
)
from batteries.progress import tqdm

MAIN_METRIC = "accuracy"  # validation accuracy decides the best checkpoint
MINIMIZE_METRIC = False
SPLIT_SEED = 0  # the train / validation split never changes, whatever --seed is
OUTPUTS = ("checkpoints", "tensorboard", "train.log")
WORKER_START = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else None
STEP_CHECKPOINT = "step.pth"  # the mid-epoch checkpoint of --save-every-steps, replaced each time


# ----------------------------------------------------------------------------- arguments
class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line and exits with code 2 (no usage dump)."""

    def error(self, message: str) -> None:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"  # DataParallel uses every visible GPU
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--device",
        default=default_device,
        help=f"cpu, cuda (every visible GPU) or cuda:N (GPU N first; default {default_device})",
    )
    parser.add_argument(
        "--epochs", type=int, default=20, help="total number of epochs; a resumed run continues up to it"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="total batch size, split over the GPUs")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--logdir", type=Path, default=Path("logs/dp-experiment"))
    parser.add_argument("--save-n-best", type=int, default=3, help="numbered checkpoints to keep")
    parser.add_argument("--accum-steps", type=int, default=1, help="batches per optimizer step")
    parser.add_argument("--amp", action="store_true", help="mixed precision: bfloat16 on CPU, float16 on CUDA")
    parser.add_argument("--clip-grad-norm", type=float, default=None, help="clip the gradient norm to this value")
    parser.add_argument("--patience", type=int, default=None, help="early stop after this many epochs without gain")
    parser.add_argument(
        "--save-every-steps", type=int, default=None, help="also save a resumable checkpoint every N optimizer steps"
    )
    parser.add_argument(
        "--resume", default=None, metavar="PATH|auto", help="checkpoint to continue from; auto: the newest"
    )
    parser.add_argument("-f", "--force", action="store_true", help="start over in an existing logdir")
    args = parser.parse_args(argv)

    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device: unknown device {args.device!r}; expected e.g. 'cpu', 'cuda', 'cuda:1'")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device: {str(args.device)!r} requested but CUDA is not available; use --device cpu")
    if args.device.type == "cuda" and (args.device.index or 0) >= torch.cuda.device_count():
        parser.error(f"--device: {str(args.device)!r}: only {torch.cuda.device_count()} GPU(s) visible")
    for flag, value, low in (
        ("--epochs", args.epochs, 1),
        ("--batch-size", args.batch_size, 1),
        ("--num-workers", args.num_workers, 0),
        ("--save-n-best", args.save_n_best, 1),
        ("--accum-steps", args.accum_steps, 1),
        ("--patience", args.patience, 0),
        ("--save-every-steps", args.save_every_steps, 1),
    ):
        if value is not None and value < low:
            parser.error(f"{flag}: must be >= {low}, got {value}")
    if not args.lr > 0:
        parser.error(f"--lr: must be > 0, got {args.lr}")
    if args.clip_grad_norm is not None and not args.clip_grad_norm > 0:
        parser.error(f"--clip-grad-norm: must be > 0, got {args.clip_grad_norm}")
    if args.resume not in (None, "auto") and not Path(args.resume).is_file():
        parser.error(f"--resume: checkpoint {args.resume!r} does not exist; pass a .pth file or 'auto'")
    if args.resume and args.force:
        parser.error("--resume and -f/--force exclude each other: continue a run or start it over")
    existing = [name for name in OUTPUTS if (args.logdir / name).exists()]
    if existing and not (args.force or args.resume):
        parser.error(
            f"--logdir: '{args.logdir}' already holds a run ({', '.join(existing)}); "
            "pass --resume auto to continue it or -f/--force to start over"
        )
    return args


# ----------------------------------------------------------------------------- data
class DigitsDataset(Dataset):
    """8x8 grey images as ``(1, 8, 8)`` float tensors in [0, 1], with labels.

    With ``augment=True`` each image is shifted by up to one pixel. The shift is drawn from a
    generator seeded by ``(seed, epoch, index)``, so it is the same whichever worker loads the
    sample and in whatever order: a resumed run sees exactly the augmentations it would have.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: bool = False, seed: int = 0) -> None:
        self.images = torch.from_numpy(images).unsqueeze(1)  # (N, 1, 8, 8)
        self.labels = torch.from_numpy(labels).long()
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.augment:
            dy, dx = np.random.default_rng((self.seed, self.epoch, index)).integers(0, 3, size=2)
            image = nn.functional.pad(image, (1, 1, 1, 1))[:, dy : dy + 8, dx : dx + 8]
        return image, self.labels[index]


def get_datasets(seed: int) -> tuple[Dataset, Dataset]:
    """The one place to swap in your own data: returns ``(train_dataset, valid_dataset)``.

    scikit-learn's bundled digits (1,797 8x8 images, 10 classes; no download), split 80 / 20,
    stratified by class, with a fixed seed.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    x_train, x_valid, y_train, y_valid = train_test_split(
        images, digits.target, test_size=0.2, stratify=digits.target, random_state=SPLIT_SEED
    )
    return DigitsDataset(x_train, y_train, augment=True, seed=seed), DigitsDataset(x_valid, y_valid)


def get_loader(dataset: Dataset, batch_size: int, num_workers: int, order: list[int] | None = None, seed: int = 0):
    """A loader over ``order`` (the epoch's shuffled indices), or over the dataset in order.

    The loader draws its workers' seeds from its own generator, never from the global RNG, so
    creating a loader mid-epoch on resume leaves the dropout random stream exactly where it was.
    """
    if WORKER_START == "forkserver":  # the server imports these once; without, every worker re-imports torch
        multiprocessing.set_forkserver_preload(["torch", "numpy", "batteries"])
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=order,  # a list of indices is a valid sampler; None = sequential
        num_workers=num_workers,
        worker_init_fn=seed_all,  # workers get distinct, reproducible random / NumPy seeds
        # not "fork": forking this process, which runs threads (TensorBoard's writer, queue feeders),
        # can deadlock the new worker inside CPython; forkserver forks from a clean process
        multiprocessing_context=WORKER_START if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )


def epoch_order(num_samples: int, seed: int, epoch: int) -> list[int]:
    """The shuffled sample order of ``epoch``: a function of the seed and epoch only."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_samples, generator=generator).tolist()


# ----------------------------------------------------------------------------- model
class Net(nn.Module):
    """A small CNN for ``(B, 1, 8, 8)`` images -> ``(B, num_classes)`` logits."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.2) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

        self.features = nn.Sequential(block(1, 32), block(32, 64), nn.MaxPool2d(2), block(64, 128))
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(128, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ----------------------------------------------------------------------------- train / valid
def train_fn(model, loader, device, loss_fn, optimizer, scaler, amp_dtype, args, epoch, position, save_step=None):
    """One epoch of training (or its rest, on a mid-epoch resume).

    ``position`` holds ``first_batch`` (batches of this epoch already trained), ``num_batches``,
    ``step`` (optimizer steps so far) and the epoch's ``meters``; it is updated as training goes,
    and ``save_step(position)`` is called every ``--save-every-steps`` optimizer steps.
    Returns ``{"loss": ..., "accuracy": ...}`` averaged over the epoch's samples.
    """
    model.train()
    meters, num_batches = position["meters"], position["num_batches"]
    progress = tqdm(
        loader, desc=f"epoch {epoch} train", initial=position["first_batch"], total=num_batches, leave=False
    )
    optimizer.zero_grad(set_to_none=True)
    for batch_index, batch in enumerate(progress, start=position["first_batch"]):
        x, y = t2d(batch, device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
            loss = loss_fn(logits, y)
        scaler.scale(loss / args.accum_steps).backward()
        step_now = (batch_index + 1) % args.accum_steps == 0 or batch_index + 1 == num_batches
        if step_now:
            if args.clip_grad_norm is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            position["step"] += 1
        meters["loss"].update(loss.detach(), x.size(0))  # tensors: no host sync per step
        meters["accuracy"].update((logits.argmax(1) == y).float().mean(), x.size(0))
        position["first_batch"] = batch_index + 1
        if batch_index % 10 == 0:
            progress.set_postfix(loss=f"{meters['loss'].average:.4f}")
        if step_now and save_step is not None and position["step"] % args.save_every_steps == 0:
            save_step(position)
    return {name: meter.average for name, meter in meters.items()}


@torch.no_grad()
def valid_fn(model, loader, device, loss_fn, amp_dtype):
    """Loss and accuracy over the whole loader, every sample counted once."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for batch in loader:
        x, y = t2d(batch, device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        loss_sum += loss_fn(logits.float(), y).item() * x.size(0)
        correct += (logits.argmax(1) == y).sum().item()
        count += x.size(0)
    return {"loss": loss_sum / count, "accuracy": correct / count}


# ----------------------------------------------------------------------------- experiment
def newest_checkpoint(checkpoint_dir: Path) -> tuple[Path | None, dict | None]:
    """The newer of ``last.pth`` (end of an epoch) and ``step.pth`` (mid-epoch) and its loaded state,
    or ``(None, None)``. The state is returned so that the file chosen is read only once."""
    found = []
    for name in ("last.pth", STEP_CHECKPOINT):
        if (checkpoint_dir / name).is_file():
            state = load_checkpoint(checkpoint_dir / name, verbose=False)
            position = (state["epoch"], state.get("batches_done", 0), name == "last.pth")
            found.append((position, checkpoint_dir / name, state))
    if not found:
        return None, None
    _, path, state = max(found, key=lambda item: item[0])
    return path, state


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.force:
        for name in OUTPUTS:
            path = args.logdir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    checkpoint_dir = args.logdir / "checkpoints"
    resume, state = newest_checkpoint(checkpoint_dir) if args.resume == "auto" else (args.resume, None)

    logger = get_logger("dp-experiment", log_file=args.logdir / "train.log")
    logger.info(f"Arguments: {vars(args)}")

    seed_all(args.seed)
    train_dataset, valid_dataset = get_datasets(args.seed)
    valid_loader = get_loader(valid_dataset, args.batch_size, args.num_workers)
    logger.info(f"Data: {len(train_dataset)} train / {len(valid_dataset)} valid samples")

    device = args.device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    model = Net().to(device)
    # every visible GPU, the chosen one first: DataParallel keeps the weights there and gathers outputs on it
    gpus = []
    if device.type == "cuda":
        gpus = [device.index, *(i for i in range(torch.cuda.device_count()) if i != device.index)]
    if len(gpus) > 1:
        model = nn.DataParallel(model, device_ids=gpus)  # batches split over every visible GPU
        logger.info(f"DataParallel over {len(gpus)} GPUs: {gpus}")
    elif device.type == "cuda":
        logger.info("One GPU visible: training on it without DataParallel")
    else:
        logger.info("No GPU: training on the CPU without DataParallel")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    loss_fn = nn.CrossEntropyLoss()
    amp_dtype = (torch.float16 if device.type == "cuda" else torch.bfloat16) if args.amp else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    early_stop = EarlyStopIndicator(args.patience, MINIMIZE_METRIC) if args.patience is not None else None
    checkpointer = CheckpointManager(
        logdir=checkpoint_dir,
        metric=MAIN_METRIC,
        metric_minimization=MINIMIZE_METRIC,
        save_n_best=args.save_n_best,
    )
    components = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, "early_stop": early_stop}
    num_batches = math.ceil(len(train_dataset) / args.batch_size)

    def training_state(epoch: int, position: dict, **extra) -> dict:
        return make_training_state(
            model,
            epoch=epoch,
            step=position["step"],
            **components,
            batches_done=position["first_batch"],
            meters={name: meter.state_dict() for name, meter in position["meters"].items()},
            experiment_args=args,
            **extra,
        )

    start_epoch, position = 1, {"first_batch": 0, "step": 0, "meters": None}
    if resume is not None:
        if state is None:  # an explicit --resume PATH
            state = load_checkpoint(resume, verbose=False)  # on the CPU; load_state_dict moves it
        restore_training_state(state, model, **components, manager=checkpointer)
        if scheduler.T_max != args.epochs:  # --epochs changed: follow the cosine of the new length from here
            logger.info(f"--epochs {args.epochs} (was {scheduler.T_max}): the learning rate follows that schedule")
            scheduler.T_max = args.epochs
            for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
                group["lr"] = base_lr * (1 + math.cos(math.pi * scheduler.last_epoch / args.epochs)) / 2
        start_epoch, position["step"] = state["epoch"] + 1, state["step"]
        if state.get("batches_done"):  # a mid-epoch checkpoint: replay the rest of that epoch
            position["first_batch"] = state["batches_done"]
            position["meters"] = {name: AverageMeter() for name in state["meters"]}
            for name, meter in position["meters"].items():
                meter.load_state_dict(state["meters"][name])
        where = f"epoch {start_epoch}, batch {position['first_batch'] + 1} of {num_batches}"
        logger.info(f"Resumed from '{resume}' (epoch {state['epoch']} finished); continuing at {where}")
    tensorboard = TensorboardLogger(args.logdir / "tensorboard", purge_step=start_epoch if resume else None)

    def save_step(position: dict) -> None:  # mid-epoch: resumable, but no epoch for the N-best
        save_checkpoint(training_state(epoch - 1, position), checkpoint_dir, STEP_CHECKPOINT)

    for epoch in range(start_epoch, args.epochs + 1):
        if early_stop is not None and early_stop.num_bad_calls > early_stop.patience:
            break  # a resumed run that had already stopped early
        if position["meters"] is None:
            position.update(first_batch=0, meters={"loss": AverageMeter(), "accuracy": AverageMeter()})
        position["num_batches"] = num_batches
        train_dataset.set_epoch(epoch)
        order = epoch_order(len(train_dataset), args.seed, epoch)[position["first_batch"] * args.batch_size :]
        train_loader = get_loader(train_dataset, args.batch_size, args.num_workers, order, seed=args.seed + epoch)
        save = save_step if args.save_every_steps else None
        train_metrics = train_fn(
            model, train_loader, device, loss_fn, optimizer, scaler, amp_dtype, args, epoch, position, save
        )
        valid_metrics = valid_fn(model, valid_loader, device, loss_fn, amp_dtype)
        scheduler.step()
        train_str = f"train loss {train_metrics['loss']:.4f} accuracy {train_metrics['accuracy']:.4f}"
        valid_str = f"valid loss {valid_metrics['loss']:.4f} accuracy {valid_metrics['accuracy']:.4f}"
        logger.info(f"epoch {epoch}/{args.epochs}: {train_str} | {valid_str}")
        tensorboard.add_metric("train", train_metrics, epoch)
        tensorboard.add_metric("valid", valid_metrics, epoch)
        tensorboard.add_scalar("lr", scheduler.get_last_lr()[0], epoch)
        should_stop = early_stop is not None and early_stop(valid_metrics[MAIN_METRIC])
        position.update(first_batch=0, meters=None)  # the epoch is complete
        checkpointer.process(
            score={**valid_metrics, **{f"train_{k}": v for k, v in train_metrics.items()}},
            epoch=epoch,
            checkpoint=training_state(
                epoch, {**position, "meters": {}}, metrics={"train": train_metrics, "valid": valid_metrics}
            ),
        )
        if should_stop:
            logger.info(f"Early stop: no gain in valid {MAIN_METRIC} for {early_stop.num_bad_calls} epochs")
            break
    tensorboard.close()

    # ------------------------------------------------------------------------- summary
    best = checkpointer.best
    if best is None:
        logger.error("No finite validation score was recorded; nothing to summarise")
        return {}
    best_model = Net().to(device)
    load_checkpoint(checkpoint_dir / "best.pth", best_model, map_location=device, verbose=False)
    reloaded = valid_fn(best_model, valid_loader, device, loss_fn, amp_dtype)
    kept = sorted(path.name for path in checkpoint_dir.iterdir())
    logger.info("Summary")
    logger.info(f"  best epoch          {best['epoch']} of {args.epochs}")
    logger.info(f"  best valid accuracy {best[MAIN_METRIC]:.4f} (best.pth re-evaluated: {reloaded['accuracy']:.4f})")
    logger.info(f"  checkpoints         {checkpoint_dir}/ ({', '.join(kept)})")
    logger.info(f"  log                 {args.logdir / 'train.log'}")
    logger.info(f"  curves              tensorboard --logdir {args.logdir / 'tensorboard'}")
    logger.info(f"  elapsed             {time.perf_counter() - started:.1f} s")
    return {"best_epoch": best["epoch"], "best_accuracy": best[MAIN_METRIC], "reloaded": reloaded}


if __name__ == "__main__":
    main()
