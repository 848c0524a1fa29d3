"""Rank helpers and collectives that degrade to one process: the toolkit's every use of ``torch.distributed``.

Without a process group: rank 0, world size 1, ``barrier`` a no-op, ``all_gather`` returns ``[obj]``;
gloo and NCCL alike. The samplers of :mod:`batteries.sampler` are importable from here too.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import importlib
import itertools
import os
import pickle
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from batteries._checks import check_bool, check_int, check_number

# fmt: off
__all__ = [
    "get_rank", "get_local_rank", "get_world_size", "is_main_process", "is_initialized", "barrier",
    "all_gather", "sreduce", "mreduce", "zero_rank_first", "broadcast_buffers", "collective_device",
    "gloo_group", "all_reduce_max_async", "gather_on_main", "init_distributed", "cleanup_distributed",
    "DistributedEvalSampler", "DistributedTrainSampler",  # noqa: F822 - batteries.sampler's, through __getattr__
]
# fmt: on

T = TypeVar("T")


def is_initialized() -> bool:
    """True when ``torch.distributed`` is available and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int, got {value!r}") from None


def get_rank() -> int:
    """Global rank: the process group's when one exists, else ``RANK`` (torchrun sets it early), else 0."""
    if is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def get_local_rank() -> int:
    """Rank of this process on its node: ``LOCAL_RANK`` from the environment (torchrun), else 0."""
    return _env_int("LOCAL_RANK", 0)


def get_world_size() -> int:
    """Number of processes: the process group's size when initialised, else ``WORLD_SIZE``, else 1."""
    if is_initialized():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def is_main_process() -> bool:
    """True on global rank 0 (the process that writes files)."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if is_initialized():
        dist.barrier()


def collective_device() -> torch.device:
    """The device collectives take tensors on: ``cuda:<current device>`` under NCCL, else the CPU."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gloo_group(*, dedicated: bool = False) -> dist.ProcessGroup | None:
    """The CPU process group for small agreements between ranks (as torchtnt's ``get_or_create_gloo_pg``).

    Creating a group is a collective: call it on every rank, in the same order.

    Args:
        dedicated: a new gloo group that no other collective shares (e.g. for background saves),
            even if the default group is gloo. Default False.

    Returns:
        The gloo group; None without a process group, and without ``dedicated`` in one rank.
    """
    dedicated = check_bool(dedicated, "dedicated")
    if not is_initialized() or (not dedicated and dist.get_world_size() == 1):
        return None
    if not dedicated and dist.get_backend() == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo")


def all_reduce_max_async(tensor: torch.Tensor, group: Any) -> Any:
    """Start an element-wise MAX all-reduce of ``tensor`` in place on ``group`` (e.g. :func:`gloo_group`).

    Returns the reduction's handle: its ``wait()`` returns once ``tensor`` holds the result.
    """
    return dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group, async_op=True)


_store_gathers = itertools.count()  # calls of gather_on_main in this process: the same sequence on every rank


def gather_on_main(obj: T, *, timeout_s: float, what: str = "the objects") -> list[T | None]:
    """Every rank's ``obj`` on rank 0 through the default group's key-value store; no collective runs.

    Call it the same number of times on every rank (keys are numbered by calls). Rank 0 waits at
    most ``timeout_s`` for the others; the other ranks return at once. Rank 0 alone cannot hang.
    ``what`` names the objects in the timeout's message.

    Returns:
        ``world_size`` items, index = rank; other ranks than 0 get only their own (the rest None).

    Raises:
        TimeoutError: on rank 0, naming the ranks whose objects did not come within ``timeout_s``.
        ValueError: if the environment says several ranks but no process group exists.
    """
    world_size, rank = get_world_size(), get_rank()
    if world_size == 1:
        return [obj]
    if not is_initialized():
        raise ValueError("Default process group has not been initialized, please make sure to call init_process_group.")
    store = dist.group.WORLD.get_group_store()  # the store init_process_group formed the default group with
    prefix = f"batteries/gather_on_main/{next(_store_gathers)}"
    gathered: list[Any] = [obj if other == rank else None for other in range(world_size)]
    if rank != 0:
        store.set(f"{prefix}/{rank}", pickle.dumps(obj))
        return gathered
    keys = {other: f"{prefix}/{other}" for other in range(1, world_size)}
    try:
        store.wait(list(keys.values()), datetime.timedelta(seconds=timeout_s))
    except RuntimeError:  # DistStoreError: a timeout
        late = [other for other, key in keys.items() if not store.check([key])]
        raise TimeoutError(f"waited {timeout_s:g} s on rank 0 for {what} of rank(s) {late}") from None
    for other, key in keys.items():
        gathered[other] = pickle.loads(store.get(key))  # noqa: S301 - written by this job's own ranks
        store.delete_key(key)
    return gathered


def all_gather(obj: T, *, group: Any = None) -> list[T]:
    """Gather any picklable object from every rank (sizes may differ; NCCL: via the current CUDA device).

    Args:
        obj: any picklable object (tensors, strings, dicts, ...).
        group: the process group (e.g. :func:`gloo_group`); None for the default one.

    Returns:
        A list of ``world_size`` objects, index ``i`` from rank ``i``; ``[obj]`` in one process.
    """
    if not is_initialized() or dist.get_world_size(group) == 1:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def sreduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over all ranks.

    Args:
        tensor: any shape, on the backend's device (CPU for gloo, CUDA for NCCL); left unchanged.

    Returns:
        A new tensor, same shape, dtype and device as ``tensor``.

    Raises:
        TypeError: if ``tensor`` is not a tensor.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    result = tensor.detach().clone()
    if is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(result, op=dist.ReduceOp.SUM)
    return result


def mreduce(tensor: torch.Tensor, num: int) -> torch.Tensor:
    """Mean of ``tensor`` over all ranks.

    Args:
        tensor: any shape; left unchanged. Integer tensors are divided with true division.
        num: number of processes to divide by, usually ``get_world_size()``.

    Returns:
        A new tensor, same shape and device as ``tensor``.

    Raises:
        TypeError: if ``num`` is not an int (Python or NumPy; a bool is not one).
        ValueError: if ``num`` is below 1.
    """
    num = check_int(num, "num", minimum=1)
    return sreduce(tensor) / num


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy ``src``'s buffers (e.g. BatchNorm running statistics) to every rank, in place.

    Call it before a distributed evaluation without SyncBatchNorm, so that every rank evaluates the
    model rank ``src`` saves. No-op in one process.

    Args:
        module: the (unwrapped) model.
        src: the rank whose buffers win. Default 0.

    Raises:
        TypeError / ValueError: if ``src`` is not an int >= 0.
    """
    src = check_int(src, "src", minimum=0)
    if not is_initialized() or dist.get_world_size() == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=src)


_nesting = threading.local()  # .by_local_rank: how the zero_rank_first block this thread is in orders the ranks


@contextlib.contextmanager
def zero_rank_first(local_rank: int | None = None) -> Iterator[None]:
    """Run the body on the first rank, then on the others (download or prepare data once).

    The first rank is global rank 0, or with ``local_rank`` local rank 0 of every node (one copy per
    node). If the body raises on a first rank, the waiting ranks get a ``RuntimeError`` instead of
    hanging. A nested block of the same kind runs as part of the outer one; one of the other kind
    is refused. Without a process group the body simply runs.

    Args:
        local_rank: this process's local rank, or None to order by global rank. Default None.

    Raises:
        TypeError / ValueError: if ``local_rank`` is not None or an int >= 0.
        RuntimeError: on waiting ranks, if the body raised on a first rank; on entering a block
            nested in one that orders the ranks the other way.
    """
    if local_rank is not None:
        local_rank = check_int(local_rank, "local_rank", minimum=0)
    if not is_initialized() or dist.get_world_size() == 1:
        yield
        return
    by_local_rank = local_rank is not None
    outer = getattr(_nesting, "by_local_rank", None)
    if outer is not None:
        if outer != by_local_rank:
            kinds = {True: "zero_rank_first(local_rank=...)", False: "zero_rank_first()"}
            raise RuntimeError(
                f"{kinds[by_local_rank]} nested inside {kinds[outer]}: the outer block orders the ranks "
                "differently, so the inner one cannot run on its first rank before the others; "
                "nest blocks of the same kind or move the inner block out"
            )
        yield  # the outer block already runs on the first rank(s) before the others
        return
    _nesting.by_local_rank = by_local_rank
    try:
        first = (local_rank if by_local_rank else dist.get_rank()) == 0
        if not first:
            failures = [status for status in all_gather(None) if status is not None]
            if failures:
                raise RuntimeError(f"zero_rank_first: the body failed on the first rank(s): {'; '.join(failures)}")
            yield
            return
        try:
            yield
        except BaseException as error:
            all_gather(f"rank {dist.get_rank()}: {type(error).__name__}: {error}")
            raise
        all_gather(None)
    finally:
        _nesting.by_local_rank = None


def __getattr__(name: str) -> Any:
    """The samplers, from :mod:`batteries.sampler` (imported on first use: no import cycle)."""
    if name in ("DistributedEvalSampler", "DistributedTrainSampler"):
        from batteries import sampler

        return getattr(sampler, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def init_distributed(*, backend: str | None = None, timeout_s: float = 1800.0) -> torch.device:
    """Initialise the default process group from the environment torchrun / launch set.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. With CUDA
    the backend is NCCL on ``cuda:<LOCAL_RANK>``, else gloo on the CPU. Without ``WORLD_SIZE`` (a
    plain ``python experiment.py``) no group is created. Under torchrun the group forms under keys
    of its own, so it survives ``--max-restarts``; ``torch._dynamo`` is imported first, so that
    :func:`cleanup_distributed` can free the group (docs/distributed.md says why).

    Args:
        backend: ``"nccl"``, ``"gloo"`` or None to choose as above. Default None.
        timeout_s: seconds a collective may wait before failing, and that the ranks may take to
            all reach ``init_distributed``. Default 1800.

    Returns:
        The device this process should use.

    Raises:
        TypeError / ValueError: if ``timeout_s`` is not a number > 0, or a rank in the environment not an int.
        TimeoutError: under torchrun, naming the ranks that did not reach it within ``timeout_s``.
    """
    timeout_s = check_number(timeout_s, "timeout_s")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    local_rank = get_local_rank()  # checked also without CUDA
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ and not is_initialized():
        importlib.import_module("torch._dynamo")  # before the group exists: docs/distributed.md
        timeout = datetime.timedelta(seconds=timeout_s)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun's store, kept across restarts
            rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
            where = {"store": _fresh_group_store(rank, world_size, timeout), "rank": rank, "world_size": world_size}
        else:  # rank 0 hosts a new store at MASTER_PORT: nothing of an earlier group is in it
            where = {"init_method": "env://"}
        backend = backend or ("nccl" if use_cuda else "gloo")
        dist.init_process_group(backend=backend, timeout=timeout, device_id=device if use_cuda else None, **where)
    return device


_GROUP_KEYS = "batteries/init_distributed"  # the keys of _fresh_group_store in torchrun's store


def _fresh_group_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """torchrun's store (``MASTER_ADDR:MASTER_PORT``) under a prefix only this formation of the group uses.

    Rank 0 draws the prefix and writes it under ``answer/<token>`` for the token each other rank put
    in its mailbox; it stops once every rank acknowledged under the new prefix (docs/distributed.md).
    """
    address, port = os.environ["MASTER_ADDR"], _env_int("MASTER_PORT", 0)
    store = dist.TCPStore(host_name=address, port=port, world_size=world_size, is_master=False, timeout=timeout)
    if rank == 0:
        prefix = f"{_GROUP_KEYS}/{uuid.uuid4().hex}"
        deadline = time.monotonic() + timeout.total_seconds()
        waiting, answered = set(range(1, world_size)), {}
        while waiting:
            progress = False
            for other in sorted(waiting):
                mailbox = f"{_GROUP_KEYS}/mailbox/{other}"
                if store.check([mailbox]) and answered.get(other) != (token := store.get(mailbox).decode()):
                    store.set(f"{_GROUP_KEYS}/answer/{token}", prefix)
                    answered[other], progress = token, True
                if store.check([f"{prefix}/ack/{other}"]):
                    waiting.discard(other)
                    progress = True
            if not progress and waiting:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"init_distributed: rank 0 waited {timeout.total_seconds():g} s (timeout_s) for "
                        f"{len(waiting)} rank(s) to reach init_distributed: {sorted(waiting)[:20]}"
                    )
                time.sleep(0.005)
    else:
        token = uuid.uuid4().hex
        store.set(f"{_GROUP_KEYS}/mailbox/{rank}", token)
        answer = f"{_GROUP_KEYS}/answer/{token}"
        try:
            store.wait([answer])
        except RuntimeError as error:  # DistStoreError: the store's timeout
            raise TimeoutError(
                f"init_distributed: rank {rank} got no answer from rank 0 within {timeout.total_seconds():g} s "
                f"(timeout_s): {error}"
            ) from error
        prefix = store.get(answer).decode()
        store.delete_key(answer)
        store.set(f"{prefix}/ack/{rank}", "")
    return dist.PrefixStore(f"{prefix}/group", store)


def cleanup_distributed() -> None:
    """Destroy the default process group if one exists; a no-op otherwise.

    Call it on every rank at the end of a run, after the last collective and a :func:`barrier` (it
    does not call one itself: that would hang a ``finally`` block whose peers never reach it). With
    a group made by :func:`init_distributed` it also joins the group's communication threads.
    """
    if is_initialized():
        gc.collect()  # modules in reference cycles (FSDP's hooks) that hold the group: gone before it is destroyed
        dist.destroy_process_group()
