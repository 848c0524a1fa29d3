"""What `StopOnSignal` costs a DDP training step: 2 gloo processes, the loop benchmarks' CNN and batch.

    python benchmarks/stop_on_signal.py [--reps 15] [--smoke]

Every rank must stop at the same optimizer step, so the ranks agree on it. Four variants of one
epoch of DDP steps (the 1,437 images split over 2 ranks: 30 steps of 24 per rank), alternating, timed on rank 0:
- bare: no stop check;
- `StopOnSignal()`, the default: polled every step, the ranks agree about every 0.25 s (a
  non-blocking all-reduce started at one agreement and read at the next, so it overlaps the steps);
- `StopOnSignal(every=1)`: the ranks agree at every step;
- the naive way: a blocking `all_reduce` of a flag tensor every step.
Target: the default costs <= 2 % of the bare epoch.
"""

from __future__ import annotations

import datetime
import importlib
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _common import SUMMARY_HEADER, alternate, machine, met, parse_args, readme_table, report, verdict
from _workload import BATCH_SIZE, dataset, fresh
from torch.nn.parallel import DistributedDataParallel as DDP

from batteries import StopOnSignal


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(rank: int, world_size: int, port: int, reps: int, smoke: bool, results) -> None:
    torch.set_num_threads(1)
    importlib.import_module("torch._dynamo")  # before the group, as init_distributed does (see its docstring)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=120),
    )  # fmt: skip
    data = dataset(smoke=smoke)
    share = data.tensors[0][rank::world_size], data.tensors[1][rank::world_size]
    batches = [
        (share[0][i : i + BATCH_SIZE], share[1][i : i + BATCH_SIZE]) for i in range(0, len(share[1]), BATCH_SIZE)
    ]
    model, optimizer = fresh()
    model = DDP(model)

    def epoch(check) -> float:
        start = time.perf_counter()
        for x, y in batches:
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if check() is True:
                raise RuntimeError("no signal was sent")
        return time.perf_counter() - start

    def with_stop(every: int | None) -> float:
        with StopOnSignal(every=every) as stop:  # one active at a time; built and closed outside the timing
            return epoch(stop)

    def blocking() -> bool:
        flag = torch.zeros(1, dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    sides = {
        "bare": lambda: epoch(lambda: False),
        "StopOnSignal()": lambda: with_stop(None),
        "StopOnSignal(every=1)": lambda: with_stop(1),
        "blocking all_reduce": lambda: epoch(blocking),
    }
    times = alternate(sides, reps)
    if rank == 0:
        results.put((times, len(batches)))
        results.close()
        results.join_thread()  # the result is in the pipe before the process ends
    dist.barrier()
    # End without destroy_process_group: once (1 of about 10 smoke runs) it deadlocked in
    # ~ProcessGroupGloo, the main thread holding the GIL and waiting for the group's work lock while
    # a gloo worker thread held that lock and waited for the GIL to free a finished work's tensor.
    os._exit(0)


def main() -> None:
    args = parse_args(__doc__.split("\n")[0], reps=15)
    print(f"machine: {machine()}; 2 gloo processes on loopback, 1 thread each")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    context = mp.get_context("spawn")
    results = context.Queue()
    mp.start_processes(
        worker, args=(2, free_port(), args.reps, args.smoke, results), nprocs=2, join=True, start_method="spawn"
    )
    times, steps = results.get(timeout=60)
    print(f"{steps} DDP steps per epoch and rank")
    ratios = {}
    for side in ("StopOnSignal()", "StopOnSignal(every=1)", "blocking all_reduce"):
        ratios[side] = report(f"epoch time, {side} against bare", {"bare": times["bare"], side: times[side]}, "bare")
    verdict("StopOnSignal() per step", ratios["StopOnSignal()"], 1.02, args.smoke)
    bare_ms = sorted(times["bare"])[len(times["bare"]) // 2] * 1e3
    readme_table(
        SUMMARY_HEADER,
        [
            [
                f"`StopOnSignal()` polled every DDP step ({steps} steps, 2 gloo processes)",
                f"no check: {bare_ms:.0f} ms an epoch",
                f"ratio **{ratios['StopOnSignal()']:.3f}** (every=1: {ratios['StopOnSignal(every=1)']:.3f}; "
                f"blocking all_reduce: {ratios['blocking all_reduce']:.3f})",
                "<= 1.02",
                met(ratios["StopOnSignal()"], 1.02, args.smoke),
            ]
        ],
    )


if __name__ == "__main__":
    main()
