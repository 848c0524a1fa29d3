"""Train a small CNN on scikit-learn's handwritten digits with nn.DataParallel over the visible GPUs.

The device example's loop with one change: the model is wrapped in ``nn.DataParallel``, which splits every batch
over the GPUs of this one process (``CUDA_VISIBLE_DEVICES`` picks them); without a GPU it runs on the CPU and says
so. For several processes or nodes use ``examples/ddp``: PyTorch recommends DistributedDataParallel over
DataParallel. Checkpoints hold the unwrapped model's weights (no ``module.`` prefix), so they load into a bare,
DataParallel or DDP model alike.

    python examples/dp/experiment.py                    # train; --resume auto continues a stopped run
    python examples/dp/experiment.py --stages head all  # the head alone, then every layer at --lr / 10

Writes ``checkpoints/`` (the N best exp_<epoch>.pth, best.pth, last.pth, step.pth, metrics.json), ``tensorboard/``
and ``train.log`` to ``--logdir``; with several stages, checkpoints/<stage>/ and tensorboard/<stage>/.
"""

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import Dataset, TensorDataset

from batteries import (
    AverageMeter,
    CheckpointManager,
    StopOnSignal,
    TensorboardLogger,
    get_logger,
    load_checkpoint,
    make_loader,
    seed_all,
    t2d,
)
from batteries.progress import tqdm

MAIN_METRIC = "accuracy"  # the validation metric that picks the best checkpoint
MINIMIZE_METRIC = False
OUTPUTS = ("checkpoints", "tensorboard", "train.log")
STAGES = {"head": lambda model: model.head, "all": lambda model: model}  # what each stage trains


def bounded(kind: type, low: float, high: float = math.inf, above: bool = False):
    def parse(text: str):  # an argparse type: kind(text) in [low, high], low excluded if above
        if not low <= (value := kind(text)) <= high or (above and value == low):
            raise argparse.ArgumentTypeError(f"must be in {'(' if above else '['}{low}, {high}], got {value}")
        return value

    parse.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {message}\n")  # one line, no usage dump
    add = parser.add_argument
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda (all GPUs) or cuda:N")
    add("--epochs", type=bounded(int, 1), default=20, help="total epochs (of each stage); a resume continues up to it")
    add("--batch-size", type=bounded(int, 1), default=64, help="total batch size, split over the GPUs")
    add("--lr", type=bounded(float, 0, above=True), default=3e-3, help="peak AdamW learning rate, cosine to 0")
    add("--stages", nargs="+", choices=STAGES, default=["all"], help="each from the previous one's best, at lr / 10")
    add("--seed", type=bounded(int, 0, 2**32 - 1), default=42)
    add("--num-workers", type=bounded(int, 0), default=0, help="DataLoader worker processes")
    add("--logdir", type=Path, default=Path("logs/dp-experiment"))
    add("--save-n-best", type=bounded(int, 1), default=3, help="numbered checkpoints to keep")
    add("--accum-steps", type=bounded(int, 1), default=1, help="batches per optimizer step")
    add("--amp", action="store_true", help="mixed precision: bfloat16 on CPU, float16 on CUDA")
    add("--save-every-steps", type=bounded(int, 1), default=None, help="save step.pth every N optimizer steps")
    add("--resume", default=None, metavar="PATH|auto", help="checkpoint to continue; auto: the newest")
    args = parser.parse_args(argv)
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device: unknown device {args.device!r}; expected e.g. 'cpu', 'cuda', 'cuda:1'")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device: {str(args.device)!r} requested but CUDA is not available; use --device cpu")
    if args.device.type == "cuda" and (args.device.index or 0) >= torch.cuda.device_count():
        parser.error(f"--device: {str(args.device)!r}: only {torch.cuda.device_count()} GPU(s) visible")
    if args.logdir.is_file() or (args.logdir / "checkpoints").is_file():
        parser.error(f"--logdir: '{args.logdir}' (or its checkpoints) is a file; pass a folder")
    if not args.resume and any((args.logdir / name).exists() for name in OUTPUTS):
        parser.error(f"--logdir: '{args.logdir}' holds a run: --resume auto continues it (or delete it to start over)")
    several, ckpts = len(args.stages) > 1, args.logdir / "checkpoints"  # holding a folder per stage, or the files
    odd = [p.name for p in ckpts.glob("[!.]*") if p.is_dir() != several or several and p.name not in args.stages]
    if odd or len(set(args.stages)) < len(args.stages):
        parser.error(f"--stages {args.stages}: a stage twice, or '{args.logdir}' holds a run of other --stages: {odd}")
    path = None if args.resume in (None, "auto") else Path(args.resume).resolve()
    if path and not (path.is_file() and (not several or path.parent == (ckpts / args.stages[-1]).resolve())):
        parser.error(f"--resume: {args.resume!r} is not a checkpoint file (of the last stage); or pass 'auto'")
    args.sources = ["auto"] * (len(args.stages) - 1) + [args.resume]  # a PATH: of this run's last stage
    args.amp_dtype = (torch.float16 if args.device.type == "cuda" else torch.bfloat16) if args.amp else None
    return args


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


def train_fn(state: dict, meters: dict, args: argparse.Namespace, stop: StopOnSignal, save) -> None:
    """One epoch, or its rest after a mid-epoch resume, or up to a stop request; counts ``state["steps"]``."""
    model, optimizer, scaler, loader = state["model"], state["optimizer"], state["scaler"], state["loader"]
    model.train()
    if stop(wait=True):  # a signal came during the last validation or save: stop before the first step
        return
    for batch in tqdm(loader, desc=f"epoch {loader.epoch} train", leave=False):
        x, y = t2d(batch, args.device, non_blocking=True)
        step_now = loader.batches_done % args.accum_steps == 0 or loader.batches_done == len(loader)  # or epoch end
        with torch.autocast(args.device.type, dtype=args.amp_dtype, enabled=args.amp_dtype is not None):
            metrics = compute_metrics(model(augment(x)), y)
        scaler.scale(metrics["loss"].mean() / args.accum_steps).backward()
        for name, value in metrics.items():
            meters[name].update(value.detach().mean(), len(y))  # tensors: no host sync per step
        if not step_now:
            continue  # accumulate the gradient of the next batch too
        progress = min(state["steps"] / (args.epochs * math.ceil(len(loader) / args.accum_steps)), 1.0)  # of the step
        for group in optimizer.param_groups:
            group["lr"] = optimizer.defaults["lr"] * 0.5 * (1 + math.cos(math.pi * progress))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        state["steps"] += 1
        if args.save_every_steps and state["steps"] % args.save_every_steps == 0:
            save()  # step.pth: a resume continues after this batch
        if stop():  # SIGTERM / SIGINT / SIGUSR1 (preemption, Ctrl-C) arrived: stop after this step
            break


@torch.no_grad()
def valid_fn(model, loader, args) -> dict[str, float]:
    """Every metric over the whole loader, each sample counted once."""
    model.eval()
    sums, count = {}, 0
    for batch in loader:
        x, y = t2d(batch, args.device, non_blocking=True)
        with torch.autocast(args.device.type, dtype=args.amp_dtype, enabled=args.amp_dtype is not None):
            metrics = compute_metrics(model(x), y)
        for name, value in metrics.items():  # sums of per-sample values: exact for counts, in any batching
            sums[name] = sums.get(name, 0.0) + value.double().sum()
        count += len(y)
    return {name: float(total) / count for name, total in sums.items()}


def line(metrics: dict[str, float]) -> str:
    return " ".join(f"{name} {value:.4f}" for name, value in metrics.items())


def train_stage(index: int, model: nn.Module, train_loader, valid_loader, args, logger, stop) -> CheckpointManager:
    """Train stage ``index`` up to ``--epochs`` in its own folders, from the previous stage's best weights."""
    stage, source = args.stages[index], args.sources[index]
    sub = stage if len(args.stages) > 1 else ""  # a folder per stage if several
    if index > 0:
        load_checkpoint(args.logdir / "checkpoints" / args.stages[index - 1] / "best.pth", model, verbose=False)
    trained = STAGES[stage](getattr(model, "module", model).requires_grad_(False)).requires_grad_(True)  # unwrapped
    optimizer = torch.optim.AdamW(trained.parameters(), lr=args.lr / 10**index, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(args.device.type, enabled=args.amp_dtype == torch.float16)
    manager = CheckpointManager(args.logdir / "checkpoints" / sub, metric=MAIN_METRIC,
                                metric_minimization=MINIMIZE_METRIC, save_n_best=args.save_n_best)  # fmt: skip
    state = {"model": model, "optimizer": optimizer, "scaler": scaler, "loader": train_loader, "steps": 0,
             "meters": {}}  # fmt: skip  # what a checkpoint holds
    start = manager.resume(state, source)  # restored in place; the last finished epoch, 0 for a fresh start
    meters, batch = defaultdict(AverageMeter), train_loader.batches_done  # the running epoch's train metrics, by name
    for name, meter_state in (state["meters"] if batch else {}).items():  # mid-epoch
        meters[name].load_state_dict(meter_state)
    if start or state["steps"]:  # a resume: say from where; a stage that a later one follows is done
        done = start >= args.epochs or any((args.logdir / "checkpoints" / s).exists() for s in args.stages[index + 1 :])
        then = "its epochs are done" if done else f"continuing at epoch {start + 1}, batch {batch + 1}"
        logger.info(f"Resumed from '{source if source != 'auto' else manager.logdir}' (epoch {start} finished); {then}")
        if done:
            return manager

    def save(*record) -> None:  # step.pth, or with (scores, epoch) the epoch's: position, meters, RNG states
        state["meters"] = {name: meter.state_dict() for name, meter in meters.items()}
        manager.process(*record, state) if record else manager.save(state)

    tensorboard = TensorboardLogger(args.logdir / "tensorboard" / sub, purge_step=start + 1 if start else None)
    for epoch in range(start + 1, args.epochs + 1):
        train_loader.set_epoch(epoch)  # the epoch's shuffle (an interrupted epoch keeps its position)
        train_fn(state, meters, args, stop, save)
        if stop.stopped:  # save where it stopped and exit; --resume auto continues from there
            save()
            logger.info(f"stopped by {stop.signal_name} at epoch {epoch}, batch {train_loader.batches_done}; "
                        "continue with --resume auto")  # fmt: skip
            sys.exit(stop.exit_code)
        train, valid = {name: meter.average for name, meter in meters.items()}, valid_fn(model, valid_loader, args)
        logger.info(f"{stage} " * bool(sub) + f"epoch {epoch}/{args.epochs}: train {line(train)} | valid {line(valid)}")
        for tag, value in {"train": train, "valid": valid, "lr": optimizer.param_groups[0]["lr"]}.items():
            tensorboard.add_metric(tag, value, epoch)  # curves: train/loss, valid/accuracy, lr, ...
        save({**valid, **{f"train_{k}": v for k, v in train.items()}}, epoch)  # the N best, best.pth, last.pth
        meters.clear()
    tensorboard.close()
    return manager


def main(argv=None) -> dict:
    args = parse_args(argv)
    logger = get_logger("dp-experiment", log_file=args.logdir / "train.log")
    logger.info(f"Arguments: {vars(args)}")
    stop = StopOnSignal()  # a signal no longer kills the run: it finishes the step, saves, exits 128 + signal

    seed_all(args.seed)
    train_dataset, valid_dataset = get_datasets()
    train_loader = make_loader(train_dataset, args.batch_size, shuffle=True, num_workers=args.num_workers,
                               seed=args.seed)  # fmt: skip  # a new order every epoch; counts its batches for resumes
    valid_loader = make_loader(valid_dataset, args.batch_size, num_workers=args.num_workers)
    logger.info(f"Data: {len(train_dataset)} train / {len(valid_dataset)} valid samples")
    if args.device.type == "cuda" and args.device.index is None:
        args.device = torch.device("cuda", torch.cuda.current_device())
    model = Net().to(args.device)
    gpus = []  # every visible GPU, the chosen one first: DataParallel keeps the weights there, gathers outputs there
    if args.device.type == "cuda":
        gpus = [args.device.index, *(i for i in range(torch.cuda.device_count()) if i != args.device.index)]
    if len(gpus) > 1:
        model = nn.DataParallel(model, device_ids=gpus)  # each batch split over every visible GPU
    where = f"DataParallel over GPUs {gpus}" if len(gpus) > 1 else "One GPU: no DataParallel" if gpus else None
    logger.info(where or "No GPU: training on the CPU")
    for index in range(len(args.stages)):
        manager = train_stage(index, model, train_loader, valid_loader, args, logger, stop)

    if (best := manager.best) is None:
        logger.error("No finite validation score was recorded; nothing to summarise")
        return {}
    load_checkpoint(manager.logdir / "best.pth", best_model := Net().to(args.device), verbose=False)
    reloaded = valid_fn(best_model, valid_loader, args)
    logger.info(f"Summary: best valid {MAIN_METRIC} {best[MAIN_METRIC]:.4f} at epoch {best['epoch']} of {args.epochs} "
                f"(best.pth re-evaluated: {reloaded[MAIN_METRIC]:.4f}); checkpoints in {manager.logdir}/")  # fmt: skip
    logger.info(f"Curves: tensorboard --logdir {args.logdir / 'tensorboard'} (after pip install tensorboard)")
    return {"best_epoch": best["epoch"], f"best_{MAIN_METRIC}": best[MAIN_METRIC], "reloaded": reloaded}


if __name__ == "__main__":
    main()
