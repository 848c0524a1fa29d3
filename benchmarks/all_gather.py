"""`batteries.distributed.all_gather` against `torch.distributed.all_gather_object`, 2 gloo processes.

    python benchmarks/all_gather.py [--reps 15] [--smoke]

Each process gathers a dict of per-rank metrics (a few numbers and a list of 1,000 floats); every
repetition times a block of calls of each, alternating. Target ratio <= 1.10.
"""

from __future__ import annotations

import datetime
import os
import socket
import statistics
import time

import torch.distributed as dist
import torch.multiprocessing as mp
from _common import SUMMARY_HEADER, alternate, machine, met, parse_args, readme_table, report, verdict

from batteries.distributed import all_gather


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(rank: int, world_size: int, port: int, reps: int, calls: int, results) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=120),
    )
    payload = {"rank": rank, "loss": 0.25 * rank, "correct": 100 + rank, "scores": [float(i) for i in range(1000)]}

    def direct() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            out = [None] * world_size
            dist.all_gather_object(out, payload)
        return (time.perf_counter() - start) / calls

    def ours() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            all_gather(payload)
        return (time.perf_counter() - start) / calls

    times = alternate({"dist.all_gather_object": direct, "batteries all_gather": ours}, reps)
    if rank == 0:
        results.put(times)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    args = parse_args(__doc__.split("\n")[0], reps=15)
    print(f"machine: {machine()}; 2 gloo processes on loopback")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    context = mp.get_context("spawn")
    results = context.Queue()
    calls = 5 if args.smoke else 200
    mp.start_processes(
        worker, args=(2, free_port(), args.reps, calls, results), nprocs=2, join=True, start_method="spawn"
    )
    times = results.get(timeout=60)
    ratio = report("latency per gather", times, baseline="dist.all_gather_object", unit="us", scale=1e6)
    verdict("all_gather", ratio, 1.10, args.smoke)
    print(f"  (medians only: {statistics.median(times['batteries all_gather']) * 1e6:.1f} us)")
    theirs_us = statistics.median(times["dist.all_gather_object"]) * 1e6
    ours_us = statistics.median(times["batteries all_gather"]) * 1e6
    readme_table(
        SUMMARY_HEADER,
        [
            [
                "`all_gather` of a dict (1,000 floats), 2 gloo processes",
                f"`all_gather_object`: {theirs_us:.0f} us",
                f"{ours_us:.0f} us, ratio **{ratio:.2f}**",
                "<= 1.10",
                met(ratio, 1.10, args.smoke),
            ]
        ],
    )


if __name__ == "__main__":
    main()
