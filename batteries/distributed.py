"""Rank helpers and collectives that degrade to one process.

Every helper works without an initialised process group (rank 0, world size 1, ``barrier`` a
no-op, ``all_gather`` returning ``[obj]``), on gloo (CPU tensors) and NCCL (the current CUDA device)
alike. All rank logic of the toolkit lives here.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import importlib
import math
import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler

from batteries._checks import check_bool, check_int, check_number

__all__ = [
    "get_rank",
    "get_local_rank",
    "get_world_size",
    "is_main_process",
    "is_initialized",
    "barrier",
    "collective_device",
    "all_gather",
    "sreduce",
    "mreduce",
    "zero_rank_first",
    "broadcast_buffers",
    "DistributedEvalSampler",
    "DistributedTrainSampler",
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


def collective_device() -> torch.device:
    """The device whose tensors this process's collectives take.

    NCCL works on the current CUDA device (``torch.cuda.set_device``); gloo, and a process without
    a group, on the CPU.

    Returns:
        ``cuda:<current device>`` under NCCL, else ``cpu``.
    """
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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
        TypeError: if ``num`` is not an int (Python or NumPy; a bool is not one).
        ValueError: if ``num`` is below 1.
    """
    num = check_int(num, "num", minimum=1)
    return sreduce(tensor) / num


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy ``src``'s buffers (e.g. BatchNorm running statistics) to every rank, in place.

    Without SyncBatchNorm each rank updates its running statistics from its own batches, so after
    training the ranks evaluate slightly different models. Call this before a distributed
    evaluation so every rank evaluates the model that rank ``src`` saves. No-op in one process.

    Args:
        module: the (unwrapped) model.
        src: the rank whose buffers win. Default 0.

    Raises:
        TypeError: if ``src`` is not an int.
        ValueError: if ``src`` is negative.
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

    Without ``local_rank`` the first rank is global rank 0; with it, local rank 0 of every node
    goes first (one copy per node, for nodes without a shared disk). The others wait in a
    collective that also carries the first ranks' outcome: if the body raises on a first rank, the
    waiting ranks get a ``RuntimeError`` instead of hanging, and the first rank re-raises its own
    error. Without a process group the body simply runs.

    Blocks may nest (e.g. a helper that uses one, called inside another): an inner block ordered
    the same way as the outer one runs as part of it, with no collective of its own, so the first
    rank leaves the outer block before any other rank enters it. An inner block ordered the other
    way (global inside per-node or the reverse) cannot keep its order there and is refused.

    Args:
        local_rank: this process's local rank, or None to order by global rank. Default None.

    Raises:
        TypeError: if ``local_rank`` is neither None nor an int.
        ValueError: if ``local_rank`` is negative.
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
        TypeError: if ``num_replicas`` or ``rank`` is not an int.
        ValueError: if ``rank`` is not in ``[0, num_replicas)`` or ``num_replicas < 1``.
    """

    def __init__(self, dataset: Any, num_replicas: int | None = None, rank: int | None = None) -> None:
        self.num_replicas, self.rank = _replicas_and_rank(num_replicas, rank)
        self.dataset_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.dataset_size, self.num_replicas))

    def __len__(self) -> int:
        return max(0, math.ceil((self.dataset_size - self.rank) / self.num_replicas))

    def set_epoch(self, epoch: int) -> None:
        """Accepted for symmetry with ``DistributedSampler``; the order does not depend on it."""


def _replicas_and_rank(num_replicas: Any, rank: Any) -> tuple[int, int]:
    """``num_replicas`` and ``rank``, checked, with defaults from this process (no group needed)."""
    num_replicas = get_world_size() if num_replicas is None else check_int(num_replicas, "num_replicas", minimum=1)
    rank = get_rank() if rank is None else check_int(rank, "rank")
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, {num_replicas}), got {rank!r}")
    return num_replicas, rank


class DistributedTrainSampler(DistributedSampler):
    """Sampler for training that works with and without a process group.

    torch's ``DistributedSampler`` asks the process group for the world size and rank, so a script
    that uses it fails under plain ``python``. This one takes the defaults from
    :func:`get_world_size` / :func:`get_rank` (1 and 0 without a group; torchrun's environment
    before the group exists) and otherwise is ``DistributedSampler``: for the same ``seed`` and
    epoch it yields the same indices in the same order (a permutation drawn from ``seed + epoch``),
    so switching between the two changes nothing.

    Call ``set_epoch(epoch)`` before every epoch: the order differs from epoch to epoch and is the
    same in every run. Each rank gets ``ceil(len(dataset) / num_replicas)`` indices: with
    ``drop_last=False`` the permutation is padded with its own first indices to a multiple of
    ``num_replicas`` (a few samples are seen twice per epoch); with ``drop_last=True`` its tail is
    dropped instead (``floor(len(dataset) / num_replicas)`` each; a few samples are not seen that
    epoch). With one process every index comes exactly once per epoch.

    Resuming mid-epoch: ``samples_consumed`` counts this rank's indices that the current epoch has
    already used, and iteration skips them. Iterating does not advance it (a DataLoader with
    workers draws indices ahead of the batches it delivers): set it from your own step counter,
    e.g. ``sampler.samples_consumed = batches_done * batch_size``, before :meth:`state_dict`.
    ``set_epoch`` with a new epoch resets it to 0; with the epoch it already has (a resumed run
    entering its interrupted epoch) it keeps it.

    Args:
        dataset: a sized dataset.
        num_replicas: number of ranks; default ``get_world_size()``.
        rank: this rank; default ``get_rank()``.
        shuffle: draw a new permutation every epoch; False keeps the dataset order. Default True.
        seed: seed of the permutation, the same on every rank. Default 0.
        drop_last: drop the tail instead of padding. Default False.

    Raises:
        TypeError: if an int or bool argument has another type.
        ValueError: if ``rank`` is not in ``[0, num_replicas)``, ``num_replicas < 1`` or ``seed < 0``.

    Example:
        >>> sampler = DistributedTrainSampler(dataset, seed=42)
        >>> loader = DataLoader(dataset, batch_size=32, sampler=sampler)
        >>> for epoch in range(epochs):
        ...     sampler.set_epoch(epoch)
        ...     for batch in loader: ...
    """

    def __init__(
        self,
        dataset: Any,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        num_replicas, rank = _replicas_and_rank(num_replicas, rank)
        super().__init__(
            dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=check_bool(shuffle, "shuffle"),
            seed=check_int(seed, "seed", minimum=0),
            drop_last=check_bool(drop_last, "drop_last"),
        )
        self._samples_consumed = 0

    @property
    def samples_consumed(self) -> int:
        """This rank's indices of the current epoch already used; ``__iter__`` skips them."""
        return self._samples_consumed

    @samples_consumed.setter
    def samples_consumed(self, value: int) -> None:
        self._samples_consumed = self._check_consumed(value)

    def _check_consumed(self, value: Any) -> int:
        value = check_int(value, "samples_consumed", minimum=0)
        if value > self.num_samples:
            raise ValueError(f"samples_consumed must be <= {self.num_samples} (this rank's share), got {value!r}")
        return value

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self._samples_consumed :])

    def __len__(self) -> int:
        return self.num_samples - self._samples_consumed

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch``; a new epoch starts at its first sample.

        A dataset with a ``set_epoch(epoch)`` method of its own (epoch-dependent augmentations) is
        told the epoch too, so a loop calls only ``sampler.set_epoch`` and works with any dataset.

        Args:
            epoch: the epoch number (>= 0).

        Raises:
            TypeError: if ``epoch`` is not an int.
            ValueError: if ``epoch`` is negative.
        """
        epoch = check_int(epoch, "epoch", minimum=0)
        if epoch != self.epoch:
            self._samples_consumed = 0
        self.epoch = epoch
        if callable(getattr(self.dataset, "set_epoch", None)):
            self.dataset.set_epoch(epoch)

    def state_dict(self) -> dict[str, int]:
        """Where this sampler stands: ``epoch``, ``seed``, ``samples_consumed``, ``num_replicas``, ``num_samples``.

        Returns:
            A dict of ints (loads with ``torch.load(weights_only=True)``).
        """
        return {
            "epoch": self.epoch,
            "seed": self.seed,
            "samples_consumed": self._samples_consumed,
            "num_replicas": self.num_replicas,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from :meth:`state_dict` (the seed saved wins over the one given to the constructor).

        Args:
            state: a dict from :meth:`state_dict`.

        Raises:
            KeyError: if ``epoch``, ``seed`` or ``samples_consumed`` is missing.
            ValueError: if the state is mid-epoch and was saved with another number of ranks (each
                rank's share, and so ``samples_consumed``, depends on it).
        """
        missing = [key for key in ("epoch", "seed", "samples_consumed") if key not in state]
        if missing:
            raise KeyError(f"DistributedTrainSampler state is missing {missing}")
        saved_replicas = state.get("num_replicas", self.num_replicas)
        consumed = state["samples_consumed"]
        if saved_replicas != self.num_replicas:
            if 0 < consumed < state.get("num_samples", math.inf):
                raise ValueError(
                    f"the sampler state was saved mid-epoch with num_replicas={saved_replicas!r}, this sampler has "
                    f"num_replicas={self.num_replicas}: resume with the same number of ranks, or from an epoch end"
                )
            consumed = self.num_samples if consumed else 0  # an epoch's end (or start) is one for any number of ranks
        checked = (  # all checked before any is set: a bad state leaves this sampler as it was
            check_int(state["epoch"], "epoch", minimum=0),
            check_int(state["seed"], "seed", minimum=0),
            self._check_consumed(consumed),
        )
        self.epoch, self.seed, self._samples_consumed = checked


def init_distributed(*, backend: str | None = None, timeout_s: float = 1800.0) -> torch.device:
    """Initialise the default process group from the environment torchrun / launch set.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``
    (``init_method="env://"``). With CUDA the backend is NCCL and this process uses
    ``cuda:<LOCAL_RANK>``; otherwise gloo on the CPU. Without ``WORLD_SIZE`` in the environment (a
    plain ``python experiment.py``) no group is created and the process runs alone.

    Under torchrun (``TORCHELASTIC_USE_AGENT_STORE=True``) the group survives restarts
    (``--max-restarts``): torchrun keeps one store for the whole job, and torch writes the keys
    that form a group (gloo's listening addresses, NCCL's unique id) under the same names in every
    attempt, so a restarted group can read those of the killed attempt before its peers replace
    them, then connect to dead ports (``Gloo connectFullMesh failed ... Connection refused``) or
    wait for a connection that never comes (a hang of ``timeout_s``). Here every formation of the
    group uses keys of its own instead: rank 0 draws a fresh id and hands it to every other rank
    through the store (about 30 ms for 2 ranks on a loaded 2-core machine), and the group forms
    under that prefix.

    Before it creates the group it imports ``torch._dynamo`` (about 2 s the first time, a cost that
    ``DistributedDataParallel`` pays anyway: its constructor imports it). Imported while a group
    exists, ``torch._dynamo`` keeps references to that group forever (seen on torch 2.13), so
    ``destroy_process_group`` cannot free it: its communication threads then live on into the
    interpreter's shutdown, where they can abort a run that has finished (``terminate called
    without an active exception``; the crash is described in pytorch/pytorch PR 179291).

    Args:
        backend: ``"nccl"``, ``"gloo"`` or None to choose as above. Default None.
        timeout_s: seconds a collective may wait before failing, and that the ranks may take to
            all reach ``init_distributed``. Default 1800.

    Returns:
        The device this process should use.

    Raises:
        TypeError: if ``timeout_s`` is not a number.
        ValueError: if ``timeout_s`` is not positive or the environment holds a non-integer rank.
        TimeoutError: under torchrun, if some rank has not reached ``init_distributed`` within
            ``timeout_s`` (the message names the ranks rank 0 waited for).
    """
    timeout_s = check_number(timeout_s, "timeout_s")
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
        timeout = datetime.timedelta(seconds=timeout_s)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun's store, kept across restarts
            rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
            where = {"store": _fresh_group_store(rank, world_size, timeout), "rank": rank, "world_size": world_size}
        else:  # rank 0 hosts a new store at MASTER_PORT: nothing of an earlier group is in it
            where = {"init_method": "env://"}
        dist.init_process_group(
            backend=backend or ("nccl" if use_cuda else "gloo"),
            timeout=timeout,
            device_id=device if use_cuda else None,
            **where,
        )
    return device


_GROUP_KEYS = "batteries/init_distributed"  # the keys of _fresh_group_store in torchrun's store


def _fresh_group_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """torchrun's store (``MASTER_ADDR:MASTER_PORT``) under a prefix that only this formation of the group uses.

    Rank 0 draws the prefix (a random id). Every other rank writes a random token of its own to its
    mailbox key and waits for the key ``answer/<token>``, where rank 0 writes the id. A mailbox may
    still hold the token of a killed earlier worker: rank 0 answers it too (nobody waits for that
    answer) and keeps reading the mailbox until the rank acknowledges under the new prefix, which no
    earlier attempt can have written to. So no rank acts on a key an earlier attempt wrote: a rank's
    answer is keyed by its own fresh token, and rank 0 stops only on acknowledgements under the new id.
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
                    missing = sorted(waiting)
                    raise TimeoutError(
                        f"init_distributed: rank 0 waited {timeout.total_seconds():g} s (timeout_s) for "
                        f"{len(missing)} rank(s) to reach init_distributed: {missing[:20]}"
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

    Call it on every rank at the end of a run, after the last collective and after a
    :func:`barrier`: a rank that destroys its group while another still communicates with it can
    abort the other at exit (``terminate called without an active exception``, seen in 2 of 7
    runs of a sharded save loop without the barrier, 0 of 7 with it). It does not call the barrier
    itself, which would hang a ``finally`` block whose peers never reach it. With a group made by
    :func:`init_distributed` this also frees the group and joins its communication threads, even
    after ``DistributedDataParallel`` used it, so that none of them is alive when the interpreter
    shuts down. (A group created before ``torch._dynamo`` was first imported is kept alive by it.)
    """
    if is_initialized():
        gc.collect()  # modules in reference cycles (FSDP's hooks) that hold the group: gone before it is destroyed
        dist.destroy_process_group()
