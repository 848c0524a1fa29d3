"""Train a small CNN on scikit-learn's handwritten digits with DistributedDataParallel.

The device example's loop, data parallel over processes: NCCL with one GPU per process when CUDA
is available, gloo on the CPU otherwise. Every launcher works unchanged:

    torchrun --nproc_per_node=2 examples/ddp/experiment.py
    python -m torch.distributed.launch --nproc_per_node=2 examples/ddp/experiment.py
    python examples/ddp/experiment.py                         # one process, no launcher
    torchrun --nnodes=2 --nproc_per_node=1 --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 --rdzv-id=job \
        examples/ddp/experiment.py                            # on each node

Only global rank 0 writes files (checkpoints, TensorBoard, the log), so nodes may share a disk.
``--batch-size`` is per process. Validation gives every sample to exactly one rank and sums the
counts over ranks, so the reported accuracy is exactly the single-process one.

Output (``--logdir``, default ``logs/ddp-experiment``):
    checkpoints/  exp_<epoch>.pth (the N best), best.pth, last.pth, metrics.json
    tensorboard/  the TensorBoard run
    train.log     the log
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from batteries import (
    AverageMeter,
    CheckpointManager,
    EarlyStopIndicator,
    TensorboardLogger,
    get_logger,
    get_rng_state,
    load_checkpoint,
    make_training_state,
    restore_training_state,
    save_checkpoint,
    seed_all,
    t2d,
)
from batteries.distributed import (
    DistributedEvalSampler,
    all_gather,
    barrier,
    broadcast_buffers,
    cleanup_distributed,
    get_rank,
    get_world_size,
    init_distributed,
    is_initialized,
    sreduce,
    zero_rank_first,
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
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=default_device, help=f"device to train on (default {default_device})")
    parser.add_argument(
        "--epochs", type=int, default=20, help="total number of epochs; a resumed run continues up to it"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="batch size per process")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--logdir", type=Path, default=Path("logs/ddp-experiment"))
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
    # torch.distributed.launch passes --local-rank=N (older versions --local_rank=N); torchrun sets LOCAL_RANK
    parser.add_argument(
        "--local-rank", "--local_rank", dest="local_rank", type=int, default=None, help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)

    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device: unknown device {args.device!r}; expected e.g. 'cpu', 'cuda', 'cuda:1'")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device: {str(args.device)!r} requested but CUDA is not available; use --device cpu")
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


def get_loader(dataset: Dataset, batch_size: int, num_workers: int, sampler, seed: int = 0) -> DataLoader:
    """A loader over ``sampler``: this rank's indices to train, a ``DistributedEvalSampler`` to validate.

    The loader draws its workers' seeds from its own generator, never from the global RNG, so
    creating a loader mid-epoch on resume leaves the dropout random stream exactly where it was.
    """
    if WORKER_START == "forkserver":  # the server imports these once; without, every worker re-imports torch
        multiprocessing.set_forkserver_preload(["torch", "numpy", "batteries"])
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        worker_init_fn=seed_all,  # workers get distinct, reproducible random / NumPy seeds
        # not "fork": forking this process, which runs threads (TensorBoard's writer, queue feeders),
        # can deadlock the new worker inside CPython; forkserver forks from a clean process
        multiprocessing_context=WORKER_START if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )


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
    """One epoch of training (or its rest, on a mid-epoch resume) on this rank's share of the data.

    ``position`` holds ``first_batch`` (batches of this epoch already trained), ``num_batches``,
    ``step`` (optimizer steps so far) and the epoch's ``meters``; it is updated as training goes,
    and ``save_step(position)`` is called on every rank every ``--save-every-steps`` optimizer steps.
    Returns ``{"loss": ..., "accuracy": ...}`` averaged over the samples of all ranks.
    """
    model.train()
    meters, num_batches = position["meters"], position["num_batches"]
    progress = tqdm(
        loader, desc=f"epoch {epoch} train", initial=position["first_batch"], total=num_batches, leave=False
    )
    optimizer.zero_grad(set_to_none=True)
    for batch_index, batch in enumerate(progress, start=position["first_batch"]):
        x, y = t2d(batch, device, non_blocking=True)
        step_now = (batch_index + 1) % args.accum_steps == 0 or batch_index + 1 == num_batches
        # micro-steps skip DDP's gradient all-reduce; the step's last batch syncs the accumulated sum
        sync = model.no_sync() if isinstance(model, DDP) and not step_now else contextlib.nullcontext()
        with sync:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(x)
                loss = loss_fn(logits, y)
            scaler.scale(loss / args.accum_steps).backward()
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
            save_step(position)  # every rank reaches it at the same step: it holds a collective
    return {name: meter.all_reduce().average for name, meter in meters.items()}  # over all ranks


@torch.no_grad()
def valid_fn(model, loader, device, loss_fn, amp_dtype):
    """Loss and accuracy over the whole validation set: this rank's share, summed over ranks.

    ``model`` is the unwrapped module (no DDP hooks); the loader's ``DistributedEvalSampler``
    gives every sample to exactly one rank, so the totals count each sample once.
    """
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for batch in loader:
        x, y = t2d(batch, device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        totals[0] += loss_fn(logits.float(), y).double() * x.size(0)
        totals[1] += (logits.argmax(1) == y).sum()
        totals[2] += x.size(0)
    loss_sum, correct, count = sreduce(totals).tolist()
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
    args = parse_args(argv)  # every rank checks the flags before any rank writes
    started = time.perf_counter()
    if args.local_rank is not None:  # torch.distributed.launch without --use-env
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    launched = "WORLD_SIZE" in os.environ
    device = init_distributed("nccl" if args.device.type == "cuda" else "gloo") if launched else args.device
    rank, world_size = get_rank(), get_world_size()

    checkpoint_dir = args.logdir / "checkpoints"
    resume, state = newest_checkpoint(checkpoint_dir) if args.resume == "auto" else (args.resume, None)
    barrier()  # every rank has read the logdir before rank 0 changes it
    if args.force and rank == 0:
        for name in OUTPUTS:
            path = args.logdir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)

    logger = get_logger("ddp-experiment", log_file=args.logdir / "train.log")  # the file on global rank 0 only
    logger.info(f"Arguments: {vars(args)}")
    logger.info(f"World size {world_size}, backend {torch.distributed.get_backend() if is_initialized() else 'none'}")

    with zero_rank_first():  # rank 0 prepares (downloads, caches) the data first, the others then read it
        train_dataset, valid_dataset = get_datasets(args.seed)
    train_sampler = DistributedSampler(train_dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
    valid_loader = get_loader(valid_dataset, args.batch_size, args.num_workers, DistributedEvalSampler(valid_dataset))
    logger.info(f"Data: {len(train_dataset)} train / {len(valid_dataset)} valid samples, {world_size} process(es)")

    seed_all(args.seed)  # the same seed on every rank: identical initial weights
    model = Net()
    has_batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_batch_norm and world_size > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif has_batch_norm and world_size > 1:
        logger.info("SyncBatchNorm needs CUDA: on CPU each rank normalises with its own batch statistics")
    model = model.to(device)
    seed_all(args.seed + rank)  # distinct dropout streams per rank, as in nanoGPT
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    loss_fn = nn.CrossEntropyLoss()
    amp_dtype = (torch.float16 if device.type == "cuda" else torch.bfloat16) if args.amp else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    early_stop = EarlyStopIndicator(args.patience, MINIMIZE_METRIC) if args.patience is not None else None
    checkpointer = None
    if rank == 0:  # the only process that writes checkpoints
        checkpointer = CheckpointManager(
            logdir=checkpoint_dir,
            metric=MAIN_METRIC,
            metric_minimization=MINIMIZE_METRIC,
            save_n_best=args.save_n_best,
        )

    components = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, "early_stop": early_stop}
    num_batches = math.ceil(len(train_sampler) / args.batch_size)  # the same on every rank

    def training_state(epoch: int, position: dict, **extra) -> dict | None:
        """Gather every rank's RNG and meter states (a collective), build the state on rank 0."""
        meters = {name: meter.state_dict() for name, meter in (position["meters"] or {}).items()}
        per_rank = all_gather({"rng": get_rng_state(), "meters": meters})
        if rank != 0:
            return None
        return make_training_state(
            model,
            epoch=epoch,
            step=position["step"],
            **components,
            rng_states=[part["rng"] for part in per_rank],
            batches_done=position["first_batch"],
            meters=[part["meters"] for part in per_rank],
            world_size=world_size,
            experiment_args=args,
            **extra,
        )

    start_epoch, position = 1, {"first_batch": 0, "step": 0, "meters": None}
    if resume is not None:
        if state is None:  # an explicit --resume PATH
            state = load_checkpoint(resume, verbose=False)  # on the CPU; load_state_dict moves it
        restore_training_state(state, model, **components, manager=checkpointer)  # this rank's RNG states
        if scheduler.T_max != args.epochs:  # --epochs changed: follow the cosine of the new length from here
            logger.info(f"--epochs {args.epochs} (was {scheduler.T_max}): the learning rate follows that schedule")
            scheduler.T_max = args.epochs
            for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
                group["lr"] = base_lr * (1 + math.cos(math.pi * scheduler.last_epoch / args.epochs)) / 2
        start_epoch, position["step"] = state["epoch"] + 1, state["step"]
        if state.get("batches_done"):  # a mid-epoch checkpoint: replay the rest of that epoch
            if state["world_size"] != world_size:
                raise SystemExit(
                    f"--resume: '{resume}' is mid-epoch from {state['world_size']} processes; "
                    f"resume it with {state['world_size']} or from last.pth"
                )
            position["first_batch"] = state["batches_done"]
            position["meters"] = {name: AverageMeter() for name in state["meters"][rank]}
            for name, meter in position["meters"].items():
                meter.load_state_dict(state["meters"][rank][name])
        where = f"epoch {start_epoch}, batch {position['first_batch'] + 1} of {num_batches}"
        logger.info(f"Resumed from '{resume}' (epoch {state['epoch']} finished); continuing at {where}")
    ddp_model = DDP(model, device_ids=[device] if device.type == "cuda" else None) if is_initialized() else model
    tensorboard = TensorboardLogger(args.logdir / "tensorboard", purge_step=start_epoch if resume else None)

    def save_step(position: dict) -> None:  # mid-epoch: resumable, but no epoch for the N-best
        state = training_state(epoch - 1, position)
        if state is not None:
            save_checkpoint(state, checkpoint_dir, STEP_CHECKPOINT)

    for epoch in range(start_epoch, args.epochs + 1):
        if early_stop is not None and early_stop.num_bad_calls > early_stop.patience:
            break  # a resumed run that had already stopped early
        if position["meters"] is None:
            position.update(first_batch=0, meters={"loss": AverageMeter(), "accuracy": AverageMeter()})
        position["num_batches"] = num_batches
        train_dataset.set_epoch(epoch)
        train_sampler.set_epoch(epoch)  # a new shuffle every epoch, the same on every rank
        order = list(train_sampler)[position["first_batch"] * args.batch_size :]
        train_loader = get_loader(train_dataset, args.batch_size, args.num_workers, order, seed=args.seed + epoch)
        save = save_step if args.save_every_steps else None
        train_metrics = train_fn(
            ddp_model, train_loader, device, loss_fn, optimizer, scaler, amp_dtype, args, epoch, position, save
        )
        broadcast_buffers(model)  # every rank validates the model rank 0 saves (BatchNorm statistics)
        valid_metrics = valid_fn(model, valid_loader, device, loss_fn, amp_dtype)
        scheduler.step()
        train_str = f"train loss {train_metrics['loss']:.4f} accuracy {train_metrics['accuracy']:.4f}"
        valid_str = f"valid loss {valid_metrics['loss']:.4f} accuracy {valid_metrics['accuracy']:.4f}"
        logger.info(f"epoch {epoch}/{args.epochs}: {train_str} | {valid_str}")
        tensorboard.add_metric("train", train_metrics, epoch)
        tensorboard.add_metric("valid", valid_metrics, epoch)
        tensorboard.add_scalar("lr", scheduler.get_last_lr()[0], epoch)
        should_stop = early_stop is not None and early_stop(valid_metrics[MAIN_METRIC])  # same on every rank
        position.update(first_batch=0, meters=None)  # the epoch is complete
        state = training_state(epoch, position, metrics={"train": train_metrics, "valid": valid_metrics})
        if checkpointer is not None:  # rank 0
            checkpointer.process(
                score={**valid_metrics, **{f"train_{k}": v for k, v in train_metrics.items()}},
                epoch=epoch,
                checkpoint=state,
            )
        if should_stop:
            logger.info(f"Early stop: no gain in valid {MAIN_METRIC} for {early_stop.num_bad_calls} epochs")
            break
    tensorboard.close()

    # ------------------------------------------------------------------------- summary
    summary = {}
    if checkpointer is not None and checkpointer.best is not None:
        best = checkpointer.best
        # a plain single-process evaluation of best.pth on the whole validation set
        best_model = Net().to(device)
        load_checkpoint(checkpoint_dir / "best.pth", best_model, map_location=device, verbose=False)
        reloaded = single_process_eval(best_model, valid_dataset, args.batch_size, device, loss_fn, amp_dtype)
        kept = sorted(path.name for path in checkpoint_dir.iterdir())
        logger.info("Summary")
        logger.info(f"  processes           {world_size}")
        logger.info(f"  best epoch          {best['epoch']} of {args.epochs}")
        logger.info(
            f"  best valid accuracy {best[MAIN_METRIC]:.4f} (best.pth re-evaluated: {reloaded['accuracy']:.4f})"
        )
        logger.info(f"  checkpoints         {checkpoint_dir}/ ({', '.join(kept)})")
        logger.info(f"  log                 {args.logdir / 'train.log'}")
        logger.info(f"  curves              tensorboard --logdir {args.logdir / 'tensorboard'}")
        logger.info(f"  elapsed             {time.perf_counter() - started:.1f} s")
        summary = {"best_epoch": best["epoch"], "best_accuracy": best[MAIN_METRIC], "reloaded": reloaded}
    del ddp_model  # DDP holds the process group: let go of it so that cleanup_distributed frees it now
    barrier()
    cleanup_distributed()
    return summary


@torch.no_grad()
def single_process_eval(model, dataset, batch_size, device, loss_fn, amp_dtype):
    """Accuracy of ``model`` on all of ``dataset`` in this process alone (no sampler, no collective)."""
    model.eval()
    correct, count = 0, 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        x, y = t2d((x, y), device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            correct += (model(x).argmax(1) == y).sum().item()
        count += x.size(0)
    return {"accuracy": correct / count}


if __name__ == "__main__":
    main()
