"""Train a small CNN on scikit-learn's handwritten digits with DistributedDataParallel.

The device example's loop, data parallel over processes: NCCL with one GPU per process when CUDA is available, gloo
on the CPU otherwise. Only global rank 0 writes the device example's files; ``--batch-size`` is per process; each
validation sample goes to exactly one rank, so the metrics equal the single-process ones. Every launcher works:

    torchrun --nproc_per_node=2 examples/ddp/experiment.py
    python -m torch.distributed.launch --nproc_per_node=2 examples/ddp/experiment.py
    python examples/ddp/experiment.py                             # one process, no launcher
    torchrun --nnodes=2 --nproc_per_node=1 --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 --rdzv-id=job \
        examples/ddp/experiment.py                                # on each node
"""

import argparse
import contextlib
import copy
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import Dataset, TensorDataset

from batteries import (
    AverageMeter,
    CheckpointManager,
    EarlyStopIndicator,
    StopOnSignal,
    TensorboardLogger,
    distributed,
    get_logger,
    load_checkpoint,
    make_loader,
    seed_all,
    t2d,
)
from batteries.progress import tqdm

MAIN_METRIC = "accuracy"  # the validation metric that picks the best checkpoint and stops early
MINIMIZE_METRIC = False
OUTPUTS = ("checkpoints", "tensorboard", "train.log")


# ----------------------------------------------------------------------------- arguments
def bounded(kind: type, low: float, high: float = math.inf, above: bool = False):
    def parse(text: str):  # an argparse type: kind(text) in [low, high], low excluded if above
        if not low <= (value := kind(text)) <= high or (above and value == low):
            raise argparse.ArgumentTypeError(f"must be in {'(' if above else '['}{low}, {high}], got {value}")
        return value

    parse.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    rank = int(os.environ.get("RANK") or 0)

    def error(message: str) -> None:  # a bad flag: one line, no usage dump, exit 2. Rank 0 reports it; the others
        time.sleep(10 if rank else 0)  # wait to be stopped by the launcher as rank 0 exits: one that exited first
        parser.exit(2, f"{parser.prog}: error: {message}\n")  # could have rank 0 stopped before it said why

    parser.error = error
    add = parser.add_argument
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    add("--epochs", type=bounded(int, 1), default=20, help="total epochs; a resumed run continues up to it")
    add("--batch-size", type=bounded(int, 1), default=64, help="batch size per process")
    add("--lr", type=bounded(float, 0, above=True), default=3e-3, help="peak AdamW learning rate, cosine to 0")
    add("--seed", type=bounded(int, 0, 2**32 - 1), default=42)
    add("--num-workers", type=bounded(int, 0), default=0, help="DataLoader worker processes")
    add("--logdir", type=Path, default=Path("logs/ddp-experiment"))
    add("--save-n-best", type=bounded(int, 1), default=3, help="numbered checkpoints to keep")
    add("--accum-steps", type=bounded(int, 1), default=1, help="batches per optimizer step")
    add("--amp", action="store_true", help="mixed precision: bfloat16 on CPU, float16 on CUDA")
    add("--patience", type=bounded(int, 0), default=None, help="epochs in a row without gain tolerated, then stop")
    add("--save-every-steps", type=bounded(int, 1), default=None, help="save step.pth every N optimizer steps")
    add("--resume", default=None, metavar="PATH|auto", help="checkpoint to continue; auto: the newest")
    add("--local-rank", "--local_rank", type=int, help=argparse.SUPPRESS)  # from torch.distributed.launch
    args = parser.parse_args(argv)
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device: unknown device {args.device!r}; expected e.g. 'cpu', 'cuda', 'cuda:1'")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device: {str(args.device)!r} requested but CUDA is not available; use --device cpu")
    if args.logdir.is_file():
        parser.error(f"--logdir: '{args.logdir}' is a file; pass a folder")
    if args.resume not in (None, "auto") and not Path(args.resume).is_file():
        parser.error(f"--resume: checkpoint {args.resume!r} does not exist; pass a .pth file or 'auto'")
    if not args.resume and any((args.logdir / name).exists() for name in OUTPUTS):
        parser.error(f"--logdir: '{args.logdir}' holds a run: --resume auto continues it (or delete it to start over)")
    return args


# ----------------------------------------------------------------------------- data and model
def get_datasets() -> tuple[Dataset, Dataset]:
    """Your data goes here. Here scikit-learn's 1,797 8x8 digits in [0, 1] (no download), split 80 / 20 by class."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8)
    split = train_test_split(images, torch.tensor(digits.target), test_size=0.2, stratify=digits.target, random_state=0)
    return TensorDataset(split[0], split[2]), TensorDataset(split[1], split[3])


def augment(x: torch.Tensor) -> torch.Tensor:
    """Shift a batch of ``(B, 1, 8, 8)`` images by up to one pixel (from the global RNG: resumes exactly)."""
    dy, dx = torch.randint(0, 3, (2,)).tolist()
    return nn.functional.pad(x, (1, 1, 1, 1))[..., dy : dy + 8, dx : dx + 8]


class Net(nn.Module):
    """A small CNN: ``(B, 1, 8, 8)`` images -> ``(B, num_classes)`` logits."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.2) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

        self.features = nn.Sequential(block(1, 32), block(32, 64), nn.MaxPool2d(2), block(64, 128))
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))  # global average pooling


def compute_metrics(logits: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every metric, one value per sample (shape ``(B,)``); training minimises the mean of ``"loss"``."""
    loss = nn.functional.cross_entropy(logits.float(), y, reduction="none")
    return {"loss": loss, "accuracy": (logits.argmax(1) == y).float()}


# ----------------------------------------------------------------------------- train / valid
def train_fn(state: dict, meters: dict, args: argparse.Namespace, stop: StopOnSignal, save) -> None:
    """One epoch, or its rest after a mid-epoch resume, or up to a stop request; counts ``state["steps"]``."""
    model, optimizer, scaler, loader = state["model"], state["optimizer"], state["scaler"], state["loader"]
    model.train()
    if stop(wait=True):  # a signal came during the last validation or save: stop before the first step
        return
    total_steps = args.epochs * math.ceil(len(loader) / args.accum_steps)
    for batch in tqdm(loader, desc=f"epoch {loader.epoch} train", leave=False):
        x, y = t2d(batch, args.device, non_blocking=True)
        step_now = loader.batches_done % args.accum_steps == 0 or loader.batches_done == len(loader)  # or epoch end
        # micro-steps skip DDP's gradient all-reduce; the step's last batch syncs the accumulated sum
        with model.no_sync() if isinstance(model, DDP) and not step_now else contextlib.nullcontext():
            with torch.autocast(args.device.type, dtype=args.amp_dtype, enabled=args.amp_dtype is not None):
                metrics = compute_metrics(model(augment(x)), y)
            scaler.scale(metrics["loss"].mean() / args.accum_steps).backward()
        for name, value in metrics.items():
            meters[name].update(value.detach().mean(), len(y))  # tensors: no host sync per step
        if not step_now:
            continue  # accumulate the gradient of the next batch too
        progress = min(state["steps"] / total_steps, 1.0)  # nanoGPT's cosine to 0, a function of the step
        for group in optimizer.param_groups:
            group["lr"] = optimizer.defaults["lr"] * 0.5 * (1 + math.cos(math.pi * progress))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        state["steps"] += 1
        if args.save_every_steps and state["steps"] % args.save_every_steps == 0:
            save()  # step.pth, on every rank: a resume continues after this batch
        if stop():  # a signal (preemption, Ctrl-C) reached any rank: every rank stops after this step
            break


@torch.no_grad()
def valid_fn(model, loader, args, all_ranks: bool = True) -> dict[str, float]:
    """Every metric, each sample once: summed over the ranks (a collective), or this loader alone if not all_ranks."""
    model.eval()
    sums, count = {}, 0
    for batch in loader:
        x, y = t2d(batch, args.device, non_blocking=True)
        with torch.autocast(args.device.type, dtype=args.amp_dtype, enabled=args.amp_dtype is not None):
            metrics = compute_metrics(model(x), y)
        for name, value in metrics.items():  # sums of per-sample values: exact for counts, in any batching
            sums[name] = sums.get(name, 0.0) + value.double().sum()
        count += len(y)
    totals = torch.stack([*sums.values(), torch.tensor(count, dtype=torch.float64, device=args.device)])
    *totals, count = (distributed.sreduce(totals) if all_ranks else totals).tolist()  # summed over the ranks' shares
    return {name: total / count for name, total in zip(sums, totals)}


def line(metrics: dict[str, float]) -> str:
    return " ".join(f"{name} {value:.4f}" for name, value in metrics.items())


# ----------------------------------------------------------------------------- training
def fit(model: nn.Module, train_loader, valid_loader, args, logger, stop) -> CheckpointManager:
    """Train up to ``--epochs`` with DDP, resumed where the run stopped (on every rank; only rank 0 writes)."""
    ddp_model = DDP(model) if distributed.is_initialized() else model  # on the model's device: CPU or this rank's GPU
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(args.device.type, enabled=args.amp_dtype == torch.float16)
    early_stop = EarlyStopIndicator(args.patience, MINIMIZE_METRIC) if args.patience is not None else None
    manager = CheckpointManager(args.logdir / "checkpoints", metric=MAIN_METRIC, metric_minimization=MINIMIZE_METRIC,
                                save_n_best=args.save_n_best)  # fmt: skip  # on every rank; rank 0 writes
    state = {"model": ddp_model, "optimizer": optimizer, "scaler": scaler, "early_stop": early_stop,
             "loader": train_loader, "steps": 0, "meters": []}  # fmt: skip  # what a checkpoint holds
    start = manager.resume(state, args.resume)  # every rank: its RNG states, its loader position; 0 if fresh
    meters = defaultdict(AverageMeter)  # this rank's train metrics of the running epoch, by name
    for name, meter_state in (state["meters"][distributed.get_rank()] if train_loader.batches_done else {}).items():
        meters[name].load_state_dict(meter_state)  # mid-epoch (at an epoch's end, any number of ranks: nothing)
    stopped_early = early_stop is not None and early_stop.num_bad_calls > early_stop.patience
    if start or state["steps"]:
        where = "it had stopped early: nothing to continue" if stopped_early else \
            f"continuing at epoch {start + 1}, batch {train_loader.batches_done + 1}"  # fmt: skip
        logger.info(f"Resumed from '{manager.logdir if args.resume == 'auto' else args.resume}' "
                    f"(epoch {start} finished); {where}")  # fmt: skip

    def save() -> None:  # step.pth, a collective: the position, every rank's meters and RNG states
        state["meters"] = distributed.all_gather({name: meter.state_dict() for name, meter in meters.items()})
        manager.save(state)

    tensorboard = TensorboardLogger(args.logdir / "tensorboard", purge_step=start + 1 if start else None)
    for epoch in range(start + 1, start if stopped_early else args.epochs + 1):
        train_loader.set_epoch(epoch)  # the epoch's shuffle, the same on every rank
        train_fn(state, meters, args, stop, save)
        if stop.stopped:  # save where every rank stopped; --resume auto continues from there
            save()
            logger.info(f"stopped by {stop.signal_name} at epoch {epoch}, batch {train_loader.batches_done}; "
                        "continue with --resume auto")  # fmt: skip
            break
        distributed.broadcast_buffers(model)  # every rank validates the model rank 0 saves (BatchNorm statistics)
        train = {name: copy.deepcopy(meter).all_reduce().average for name, meter in meters.items()}  # over all ranks
        valid = valid_fn(model, valid_loader, args)
        logger.info(f"epoch {epoch}/{args.epochs}: train {line(train)} | valid {line(valid)}")
        for tag, value in {"train": train, "valid": valid, "lr": optimizer.param_groups[0]["lr"]}.items():
            tensorboard.add_metric(tag, value, epoch)  # curves: train/loss, valid/accuracy, lr, ...
        should_stop = early_stop is not None and early_stop(valid[MAIN_METRIC])  # the same on every rank
        state["meters"] = distributed.all_gather({name: meter.state_dict() for name, meter in meters.items()})
        manager.process({**valid, **{f"train_{k}": v for k, v in train.items()}}, epoch, state)
        meters.clear()
        if should_stop:
            logger.info(f"Early stop: no gain in valid {MAIN_METRIC} for {early_stop.num_bad_calls} epochs")
            break
    tensorboard.close()
    return manager  # and lets go of DDP, which holds the process group: cleanup_distributed can free it


# ----------------------------------------------------------------------------- experiment
def main(argv=None) -> dict:
    args = parse_args(argv)  # every rank checks the flags before any rank writes
    started = time.perf_counter()
    backend = "nccl" if args.device.type == "cuda" else "gloo"
    if "WORLD_SIZE" in os.environ:  # a launcher started this process
        args.device = distributed.init_distributed(backend=backend)
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    stop = StopOnSignal()  # a signal no longer kills the run: it finishes the step, saves, exits 128 + signal
    distributed.barrier()  # every rank has checked the logdir (parse_args) before rank 0 writes train.log
    logger = get_logger("ddp-experiment", log_file=args.logdir / "train.log")  # the file on global rank 0 only
    logger.info(f"Arguments: {vars(args)}")
    logger.info(f"World size {world_size}, backend {backend if distributed.is_initialized() else 'none'}")

    seed_all(args.seed)  # the same seed on every rank: identical initial weights
    with distributed.zero_rank_first():  # rank 0 prepares (downloads, caches) the data first, the others then
        train_dataset, valid_dataset = get_datasets()
    train_loader = make_loader(train_dataset, args.batch_size, shuffle=True, num_workers=args.num_workers,
                               seed=args.seed)  # fmt: skip  # this rank's share, a new order every epoch
    valid_sampler = distributed.DistributedEvalSampler(valid_dataset)  # every sample on exactly one rank
    valid_loader = make_loader(valid_dataset, args.batch_size, sampler=valid_sampler, num_workers=args.num_workers)
    logger.info(f"Data: {len(train_dataset)} train / {len(valid_dataset)} valid samples, {world_size} process(es)")
    args.amp_dtype = (torch.float16 if args.device.type == "cuda" else torch.bfloat16) if args.amp else None
    model = Net().to(args.device)
    if world_size > 1 and args.device.type == "cuda":  # on the CPU each rank normalises with its own statistics
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    seed_all(args.seed + rank)  # distinct dropout and augmentation streams per rank, as in nanoGPT
    manager = fit(model, train_loader, valid_loader, args, logger, stop)
    stop.close()

    summary, best = {}, manager.best
    if rank == 0 and best is None and not stop.stopped:
        logger.error("No finite validation score was recorded; nothing to summarise")
    elif rank == 0 and not stop.stopped:  # a plain single-process evaluation of best.pth on the whole validation set
        load_checkpoint(manager.logdir / "best.pth", best_model := Net().to(args.device), verbose=False)
        reloaded = valid_fn(best_model, make_loader(valid_dataset, args.batch_size), args, all_ranks=False)
        logger.info(f"Summary: best valid {MAIN_METRIC} {best[MAIN_METRIC]:.4f} at epoch {best['epoch']} of "
                    f"{args.epochs} (best.pth re-evaluated: {reloaded[MAIN_METRIC]:.4f}), {world_size} process(es), "
                    f"{time.perf_counter() - started:.1f} s; checkpoints in {manager.logdir}/")  # fmt: skip
        logger.info(f"Curves: tensorboard --logdir {args.logdir / 'tensorboard'} (after pip install tensorboard)")
        summary = {"best_epoch": best["epoch"], f"best_{MAIN_METRIC}": best[MAIN_METRIC], "reloaded": reloaded}
    distributed.barrier()
    distributed.cleanup_distributed()
    if stop.stopped:
        sys.exit(stop.exit_code)
    return summary


if __name__ == "__main__":
    main()
