"""Run a function in N processes (gloo, or NCCL with a GPU each) on loopback; re-raise failures; never hang.

``run_workers(fn, world_size, *args)`` starts ``world_size`` spawned processes, each with a
process group (gloo, ``tcp://127.0.0.1:<free port>``), calls ``fn(rank, world_size, *args)`` and
returns the results ordered by rank. A worker's exception is re-raised in the parent with the
worker's traceback; a run that exceeds ``timeout_s`` kills every worker and fails. With
``init_group=False`` the worker gets the environment torchrun sets (``MASTER_ADDR``, ``MASTER_PORT``,
``RANK``, ...) and no group: ``fn`` creates and destroys one itself.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing as mp
import os
import pickle
import queue
import select
import signal
import socket
import time
import traceback
from pathlib import Path
from typing import Any, Callable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(fn, rank, world_size, port, args, results, timeout_s, backend, init_group):
    import torch
    import torch.distributed as dist

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank)})
    try:
        if not init_group:
            os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
            results.put((rank, True, pickle.dumps(fn(rank, world_size, *args))))
            return
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        try:
            # plain pickle copies tensors; multiprocessing would share them through a socket of this
            # process, which may have exited by the time the parent reads the queue
            results.put((rank, True, pickle.dumps(fn(rank, world_size, *args))))
        finally:
            dist.destroy_process_group()
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def _context() -> mp.context.BaseContext:
    """Fresh processes, as "spawn" gives, that start in a fraction of its time: a forkserver that has
    imported torch once (and has run nothing: no thread pool to inherit) forks each of them."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torch.distributed", "batteries"])
    return context


def run_workers(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 60.0,
    backend: str = "gloo",
    init_group: bool = True,
) -> list[Any]:
    context = _context()
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(
            target=_worker,
            args=(fn, rank, world_size, port, args, results, timeout_s, backend, init_group),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    collected: dict[int, Any] = {}
    failures: list[str] = []
    try:
        while len(collected) + len(failures) < world_size:
            try:
                rank, ok, value = results.get(timeout=timeout_s)
            except queue.Empty:
                raise TimeoutError(f"workers did not finish within {timeout_s} s") from None
            if ok:
                collected[rank] = pickle.loads(value)
            else:
                failures.append(f"rank {rank} failed:\n{value}")
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
    if failures:
        raise RuntimeError("\n".join(failures))
    return [collected[rank] for rank in range(world_size)]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pids: list[int]) -> list[int]:
    """The processes of ``pids`` still running (a zombie has ended: only its parent has not reaped it yet)."""
    running = []
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                running.append(pid)
        except OSError:
            pass
    return running


def wait_gone(pids: list[int], timeout_s: float = 10.0) -> list[int]:
    """Wait up to ``timeout_s`` for ``pids`` to end; the ones still running then (``alive``)."""
    deadline = time.monotonic() + timeout_s
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive(pids)


def run_in_child(fn: Callable[[], Any], timeout_s: float = 60) -> dict:
    """``fn()`` in a forked child (torch is imported already); the JSON it returns, or on an exception
    ``{"error": "Type: message", "type", "errno", "message"}``. A child that hangs is killed."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            result = fn()
        except BaseException as error:  # noqa: BLE001 - reported to the parent, never escapes the child
            kind, number = type(error).__name__, getattr(error, "errno", None)
            result = {"error": f"{kind}: {error}", "type": kind, "errno": number, "message": str(error)}
        os.write(write_end, json.dumps(result).encode())
        os._exit(0)
    os.close(write_end)
    ready, _, _ = select.select([read_end], [], [], timeout_s)
    if not ready:
        os.kill(pid, signal.SIGKILL)
    with os.fdopen(read_end) as pipe:
        output = pipe.read() if ready else ""
    os.waitpid(pid, 0)
    assert output, f"the child did not answer within {timeout_s} s"
    return json.loads(output)
