"""Every call the seed README (shared/seeds/003_*.txt) makes, written as it writes them."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.optim as optim
from torch.utils.data import DataLoader, TensorDataset

from batteries import AverageMetter, CheckpointManager, get_logger, load_checkpoint, make_checkpoint, seed_all, t2d
from batteries.distributed import all_gather
from batteries.progress import tqdm


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_seed_readme_calls(tmp_path, one_process_group):
    logdir, stage, local_rank, device = str(tmp_path), "stage_0", 0, "cpu"
    main_metric, minimize_metric = "metric", False
    args = {"logdir": logdir, "exp_name": "experiment", "epochs": 2}
    torch.multiprocessing.set_sharing_strategy("file_system")

    # "load weights from checkpoint/pretrain or initialize with fixed seed"
    seed_all(42)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))  # SyncBatchNorm cannot train on CPU
    torch.save(model.state_dict(), os.path.join(logdir, "checkpoint.pth"))
    dist.barrier()
    load_checkpoint(os.path.join(logdir, "checkpoint.pth"), model)
    dataset = TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    loader = DataLoader(dataset, batch_size=4, num_workers=2, worker_init_fn=seed_all)

    global_logger = get_logger(args["exp_name"], log_file=os.path.join(logdir, "train.log"), disable=(local_rank == 0))
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-6)
    epoch_scheduler = optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, args["epochs"])
    model_args = {}
    criterion = nn.CrossEntropyLoss()

    checkpointer = CheckpointManager(
        logdir=f"{logdir}/{stage}",
        metric=main_metric,
        metric_minimization=minimize_metric,
        save_n_best=5,
    )
    for epoch_index in range(1, args["epochs"] + 1):
        metrics = {"loss": AverageMetter()}
        model.train()
        for batch_index, batch in enumerate(tqdm(loader)):  # noqa: B007 - as the seed writes it
            x, y = t2d(batch, device)
            optimizer.zero_grad(set_to_none=True)
            out = model(x)
            loss = criterion(out, y)
            _loss = loss.item()
            loss.backward()
            optimizer.step()
            metrics["loss"].update(_loss, x.size(0))
        train_metrics = {"loss": metrics["loss"].average}
        scores = all_gather(float(epoch_index))
        valid_metrics = {"metric": float(sum(scores))}
        global_logger.info(f"epoch {epoch_index}: {train_metrics}")
        if local_rank == 0:
            checkpointer.process(
                score=valid_metrics[main_metric],
                epoch=epoch_index,
                checkpoint=make_checkpoint(
                    stage,
                    epoch_index,
                    model,
                    optimizer,
                    epoch_scheduler,
                    metrics={"train": train_metrics, "valid": valid_metrics},
                    experiment_args=args,
                    model_args=model_args,
                ),
            )
        epoch_scheduler.step()

    assert sorted(p.name for p in (tmp_path / stage).iterdir()) == [
        "best.pth",
        "exp_1.pth",
        "exp_2.pth",
        "last.pth",
        "metrics.json",
    ]
    restored = load_checkpoint(f"{logdir}/{stage}/best.pth", model)
    assert restored["epoch"] == 2 and restored["experiment_args"] == args
    assert restored["metrics"]["train"]["loss"] == train_metrics["loss"]
