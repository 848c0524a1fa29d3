"""FSDP2 with sharded checkpoints: per-rank memory against the unsharded model's share, save time
against one `torch.save` file.

    python benchmarks/fsdp_memory_io.py [--reps 5] [--size-mb 64] [--world-sizes 2,4] [--smoke]

A model of `--size-mb` MB of float32 parameters (square `nn.Linear` layers of 1024 x 1024, 4 MB
each), AdamW after one step (its state is twice the parameters). For each world size, gloo
processes on the CPU:

1. Memory: the bytes of the parameters and of the optimizer state each rank holds under
   `fully_shard` (the local shards of the DTensors, the `step` counters included), against the
   unsharded model's bytes divided by the world size. Target <= 1.10 on every rank.
2. Save time, three sides in the same processes, alternating (A B C, then C B A) after a warm-up
   round, each timed on rank 0 from a barrier to the barrier that follows it (every rank done):
   `CheckpointManager(sharded=True).process(...)` with `make_training_state(..., sharded=True)`
   (every rank writes its shards, fsynced; rank 0 renames the folder, records metrics.json, links
   best / last and deletes the previous last folder); a bare `dcp.save` of the same model and
   optimizer state into a new folder (no temporary name, rename, links, metrics or deletion), to
   tell DCP's cost from the manager's; and the baseline, rank 0 alone writing the same state
   unsharded (a whole copy of the model built on rank 0) with `torch.save` + `fsync` to one file
   (not crash-safe). Reported, no target: on a machine with fewer cores than processes the ranks
   share the cores.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import SUMMARY_HEADER, machine, met, readme_table
from torch import nn

from batteries import CheckpointManager, make_training_state

MB = 1 << 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build(size_mb: int, width: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    layers = max(1, size_mb * MB // (width * width * 4))
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def step(model: nn.Module, optimizer: torch.optim.Optimizer, width: int) -> None:
    model(torch.randn(4, width)).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def local_bytes(tensors) -> int:
    total = 0
    for tensor in tensors:
        tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        total += tensor.numel() * tensor.element_size()
    return total


def held_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """(parameter bytes, optimizer-state bytes) this process holds."""
    states = [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
    return local_bytes(model.parameters()), local_bytes(states)


def torch_save_fsync(state: dict, path: Path) -> None:
    torch.save(state, path)
    with open(path, "rb+") as file:
        os.fsync(file.fileno())


def worker(rank: int, world_size: int, port: int, args: argparse.Namespace, root: str, results) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=600))  # fmt: skip
    model, _ = build(args.size_mb, args.width)
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step(model, optimizer, args.width)
    memory = held_bytes(model, optimizer)
    if rank == 0:  # the same model and optimizer state, whole, for the one-file baseline
        whole, whole_optimizer = build(args.size_mb, args.width)
        step(whole, whole_optimizer, args.width)
    manager = CheckpointManager(Path(root) / f"sharded-{world_size}", sharded=True, save_n_best=1)
    epochs = iter(range(1, 10**6))

    def one_file() -> None:  # rank 0 alone; the others wait at the barrier after it
        if rank == 0:
            state = {"model_state_dict": whole.state_dict(), "optimizer_state_dict": whole_optimizer.state_dict()}
            torch_save_fsync(state, Path(root) / "one.pth")

    def bare() -> None:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        folder = Path(root) / f"bare-{world_size}"
        dist.barrier()
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)  # untimed: the manager's deletion is timed, not this one
        dist.barrier()
        start = time.perf_counter()
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))
        return time.perf_counter() - start

    def process() -> None:
        epoch = next(epochs)
        manager.process(float(epoch), epoch, make_training_state(model, epoch=epoch, optimizer=optimizer, sharded=True))

    sides = {"torch.save + fsync": one_file, "bare dcp.save": bare, "manager.process": process}
    times: dict[str, list[float]] = {name: [] for name in sides}
    for round_index in range(args.reps + 1):  # alternating A B C, C B A; the first round is a warm-up
        for name in list(sides) if round_index % 2 == 0 else list(sides)[::-1]:
            dist.barrier()
            start = time.perf_counter()
            measured = sides[name]()
            dist.barrier()  # every rank done
            if round_index:
                times[name].append(measured if measured is not None else time.perf_counter() - start)
    results.put((rank, memory, times))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--size-mb", type=int, default=64)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--world-sizes", default="2,4")
    parser.add_argument("--smoke", action="store_true", help="tiny and fast: checks that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.reps, args.size_mb, args.width, args.world_sizes = 1, 1, 256, "2"
    world_sizes = [int(size) for size in args.world_sizes.split(",")]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    root = tempfile.mkdtemp(prefix="batteries-fsdp-")
    try:
        model, optimizer = build(args.size_mb, args.width)
        step(model, optimizer, args.width)
        params, states = held_bytes(model, optimizer)
        del model, optimizer
        print(f"machine: {machine()}; model {params / MB:.1f} MB of parameters, AdamW state {states / MB:.1f} MB")

        rows = []
        for world_size in world_sizes:
            context = mp.get_context("spawn")
            results = context.Queue()
            mp.start_processes(worker, args=(world_size, free_port(), args, root, results), nprocs=world_size,
                               join=True, start_method="spawn")  # fmt: skip
            reports = sorted(results.get(timeout=60) for _ in range(world_size))
            share_bytes = (params + states) / world_size
            ratios = [sum(memory) / share_bytes for _, memory, _ in reports]
            worst = max(ratios)
            times = reports[0][2]  # rank 0's: the one-file baseline runs there
            baseline_s, bare_s, saved_s = (statistics.median(times[name]) for name in times)
            print(f"\n{world_size} processes")
            for rank, (rank_params, rank_states), _ in reports:
                print(f"  rank {rank}: parameters {rank_params / MB:.2f} MB, optimizer state {rank_states / MB:.2f} MB,"
                      f" ratio to the unsharded share {ratios[rank]:.4f}")  # fmt: skip
            print(f"  memory: worst ratio {worst:.4f}, target <= 1.10: {'MET' if worst <= 1.10 else 'NOT MET'}")
            print(f"  sharded process(): median {saved_s * 1e3:.1f} ms over {args.reps}, "
                  f"ratio to torch.save + fsync {saved_s / baseline_s:.2f}")  # fmt: skip
            print(f"  bare dcp.save: median {bare_s * 1e3:.1f} ms, ratio {bare_s / baseline_s:.2f}")
            share = (params + states) / world_size / MB
            rows.append([
                f"FSDP2, {world_size} gloo processes: parameter + AdamW bytes per rank",
                f"unsharded / {world_size}: {share:.1f} MB",
                f"{share * worst:.1f} MB, ratio **{worst:.3f}**",
                "<= 1.10",
                met(worst, 1.10, args.smoke),
            ])  # fmt: skip
            rows.append([
                f"sharded `CheckpointManager.process`, {world_size} processes, {(params + states) / MB:.0f} MB state",
                f"`torch.save` + `fsync`, one file: {baseline_s * 1e3:.0f} ms",
                f"{saved_s * 1e3:.0f} ms, ratio **{saved_s / baseline_s:.2f}** (bare `dcp.save`: "
                f"{bare_s * 1e3:.0f} ms, {bare_s / baseline_s:.2f})",
                "report",
                "",
            ])  # fmt: skip
        if args.smoke:
            print("\n(smoke run: tiny sizes, one repetition, not a measurement)")
        readme_table(SUMMARY_HEADER, rows)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
