"""Rank helpers and collectives that degrade to one process.

Every helper works without an initialised process group (rank 0, world size 1, ``barrier`` a
no-op, ``all_gather`` returning ``[obj]``), on gloo (CPU tensors) and NCCL (the current CUDA device)
alike. All rank logic of the toolkit lives here.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import math
import os
from collections.abc import Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = [
    "get_rank",
    "get_local_rank",
    "get_world_size",
    "is_main_process",
    "is_initialized",
    "barrier",
    "all_gather",
    "sreduce",
    "mreduce",
    "zero_rank_first",
    "broadcast_buffers",
    "DistributedEvalSampler",
    "init_distributed",
    "cleanup_distributed",
]

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
    """Global rank of this process.

    The process group's rank when one is initialised; otherwise ``RANK`` from the environment
    (set by torchrun before the group exists), else 0.
    """
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


def all_gather(obj: T) -> list[T]:
    """Gather any picklable object from every rank.

    Built on ``torch.distributed.all_gather_object``: objects may differ in size between ranks. On
    NCCL the current CUDA device (``torch.cuda.set_device``) carries the bytes; on gloo the CPU.

    Args:
        obj: any picklable object (tensors, strings, dicts, ...).

    Returns:
        A list of ``world_size`` objects, index ``i`` from rank ``i``; ``[obj]`` in one process.
    """
    if not is_initialized() or dist.get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def sreduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over all ranks.

    Args:
        tensor: any shape, on a device the backend supports (CPU for gloo, CUDA for NCCL); left
            unchanged.

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
        ValueError: if ``num`` is not a positive integer.
    """
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive int, got {num!r}")
    return sreduce(tensor) / num


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy ``src``'s buffers (e.g. BatchNorm running statistics) to every rank, in place.

    Without SyncBatchNorm each rank updates its running statistics from its own batches, so after
    training the ranks evaluate slightly different models. Call this before a distributed
    evaluation so every rank evaluates the model that rank ``src`` saves. No-op in one process.

    Args:
        module: the (unwrapped) model.
        src: the rank whose buffers win. Default 0.
    """
    if not is_initialized() or dist.get_world_size() == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=src)


@contextlib.contextmanager
def zero_rank_first(local_rank: int | None = None) -> Iterator[None]:
    """Run the body on the first rank, then on the others (download or prepare data once).

    Without ``local_rank`` the first rank is global rank 0; with it, local rank 0 of every node
    goes first (one copy per node, for nodes without a shared disk). The others wait in a
    collective that also carries the first ranks' outcome: if the body raises on a first rank, the
    waiting ranks get a ``RuntimeError`` instead of hanging, and the first rank re-raises its own
    error. Without a process group the body simply runs.

    Args:
        local_rank: this process's local rank, or None to order by global rank. Default None.

    Raises:
        RuntimeError: on waiting ranks, if the body raised on a first rank.
    """
    if not is_initialized() or dist.get_world_size() == 1:
        yield
        return
    first = (local_rank if local_rank is not None else dist.get_rank()) == 0
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


class DistributedEvalSampler(Sampler[int]):
    """Sampler for evaluation that gives every sample to exactly one rank (no padding).

    ``DistributedSampler`` pads the dataset to a multiple of ``world_size`` by repeating samples,
    so metrics computed on it count some samples twice. This sampler gives rank ``r`` the indices
    ``r, r + world_size, r + 2 * world_size, ...``: ranks may get one sample less than others, and
    gathered metrics equal single-process ones. Use it only where no collective runs per batch
    (evaluation without SyncBatchNorm in train mode).

    Args:
        dataset: a sized dataset.
        num_replicas: number of ranks; default ``get_world_size()``.
        rank: this rank; default ``get_rank()``.

    Raises:
        ValueError: if ``rank`` is not in ``[0, num_replicas)`` or ``num_replicas < 1``.
    """

    def __init__(self, dataset: Any, num_replicas: int | None = None, rank: int | None = None) -> None:
        self.num_replicas = get_world_size() if num_replicas is None else num_replicas
        self.rank = get_rank() if rank is None else rank
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {self.num_replicas!r}")
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank must be in [0, {self.num_replicas}), got {self.rank!r}")
        self.dataset_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.dataset_size, self.num_replicas))

    def __len__(self) -> int:
        return max(0, math.ceil((self.dataset_size - self.rank) / self.num_replicas))

    def set_epoch(self, epoch: int) -> None:
        """Accepted for symmetry with ``DistributedSampler``; the order does not depend on it."""


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> torch.device:
    """Initialise the default process group from the environment torchrun / launch set.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``
    (``init_method="env://"``). With CUDA the backend is NCCL and this process uses
    ``cuda:<LOCAL_RANK>``; otherwise gloo on the CPU. Without ``WORLD_SIZE`` in the environment (a
    plain ``python experiment.py``) no group is created and the process runs alone.

    Before it creates the group it imports ``torch._dynamo`` (about 2 s the first time, a cost that
    ``DistributedDataParallel`` pays anyway: its constructor imports it). Imported while a group
    exists, ``torch._dynamo`` keeps references to that group forever (seen on torch 2.13), so
    ``destroy_process_group`` cannot free it: its communication threads then live on into the
    interpreter's shutdown, where they can abort a run that has finished (``terminate called
    without an active exception``; the crash is described in pytorch/pytorch PR 179291).

    Args:
        backend: ``"nccl"``, ``"gloo"`` or None to choose as above. Default None.
        timeout_s: seconds a collective may wait before failing. Default 1800.

    Returns:
        The device this process should use.

    Raises:
        ValueError: if ``timeout_s`` is not positive or the environment holds a non-integer rank.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    local_rank = get_local_rank()
    if use_cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if "WORLD_SIZE" in os.environ and not is_initialized():
        importlib.import_module("torch._dynamo")  # before the group exists: see the docstring
        dist.init_process_group(
            backend=backend or ("nccl" if use_cuda else "gloo"),
            init_method="env://",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if use_cuda else None,
        )
    return device


def cleanup_distributed() -> None:
    """Destroy the default process group if one exists; a no-op otherwise.

    Call it on every rank at the end of a run, after the last collective. With a group made by
    :func:`init_distributed` this also frees the group and joins its communication threads, even
    after ``DistributedDataParallel`` used it, so that none of them is alive when the interpreter
    shuts down. (A group created before ``torch._dynamo`` was first imported is kept alive by it.)
    """
    if is_initialized():
        dist.destroy_process_group()
