"""DataLoaders for training loops: the position in an epoch, reproducible draws, and no worker left behind."""

from __future__ import annotations

import atexit
import functools
import math
import multiprocessing
import os
import random
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from batteries._checks import check_bool, check_int
from batteries._process import die_with_parent, outlast_stop_signals
from batteries.sampler import DistributedTrainSampler
from batteries.seed import seed_all

__all__ = ["ResumableLoader", "make_loader", "die_with_parent"]

_closing: Any = None  # shared with the workers: set when this process exits (see _closing_flag)
_closing_pid = 0  # the process that exits: not a forked child that runs its exit handlers too


def _closing_flag() -> Any:
    """The flag workers read to tell that this process exits; created with the first loader that has workers."""
    global _closing, _closing_pid
    if _closing is None:
        _closing, _closing_pid = multiprocessing.RawValue("b", 0), os.getpid()
        # registered after multiprocessing's exit handler (registered when RawValue imported it), so it
        # runs first: the workers then end on the SIGTERM that handler sends them
        atexit.register(_set_closing)
    return _closing


def _set_closing() -> None:
    if os.getpid() == _closing_pid:
        _closing.value = 1


def _derived_seed(*parts: int) -> int:
    """A 63-bit seed from ``parts``; string seeds hash with SHA-512, the same on every Python version."""
    return random.Random(":".join(map(str, parts))).getrandbits(63)


def _reseed(seed: int, index: Any) -> None:
    """Seed ``random``, NumPy and torch from (seed, epoch, index) when ``index`` tells its epoch."""
    epoch = getattr(index, "epoch", None)
    if epoch is None:  # a sampler that does not tell the epoch: the worker's seeds stay torch's
        return
    random.seed(f"{seed}:{epoch}:{int(index)}")
    torch.default_generator.manual_seed(random.getrandbits(64))
    np.random.seed(random.getrandbits(32))


def _seed_each_fetch(dataset: Dataset, seed: int) -> None:
    """Make this worker's copy of ``dataset`` reseed before each fetch (``__getitems__``: once per batch)."""
    cls = type(dataset)

    def getitem(self: Any, index: Any) -> Any:
        _reseed(seed, index)
        return cls.__getitem__(self, index)

    def getitems(self: Any, indices: list[Any]) -> Any:
        if len(indices):
            _reseed(seed, indices[0])
        return cls.__getitems__(self, indices)

    namespace = {"__slots__": (), "__getitem__": getitem, "__module__": cls.__module__}
    if getattr(cls, "__getitems__", None):
        namespace["__getitems__"] = getitems
    try:
        dataset.__class__ = type(cls)(cls.__name__, (cls,), namespace)
    except Exception as error:  # e.g. a class written in C: its draws keep torch's per-worker seeds
        warnings.warn(f"{cls.__name__}: random draws are seeded per worker, not per sample ({error!r})", stacklevel=1)


def _init_worker(
    worker_id: int, *, user_init: Callable[[int], Any] | None, training_pid: int, closing: Any, seed: int
) -> None:
    outlast_stop_signals(training_pid, closing)
    info = get_worker_info()
    if info is not None and not isinstance(info.dataset, IterableDataset):
        _seed_each_fetch(info.dataset, seed)
    if user_init is not None:
        user_init(worker_id)


def _skips(sampler: Any) -> bool:
    """Whether ``sampler`` can start an epoch mid-way (``samples_consumed``, as DistributedTrainSampler)."""
    return hasattr(sampler, "samples_consumed") and hasattr(sampler, "num_samples")


class ResumableLoader(DataLoader):
    """A ``DataLoader`` that knows its epoch and how many of its batches the loop has taken.

    What :func:`make_loader` returns. Iterating it runs one epoch (the rest of one after
    :meth:`load_state_dict` of a mid-epoch state) and advances :attr:`epoch` once the epoch is
    finished. Batches count when handed to the loop: batches that workers prefetched do not. With a
    sampler that skips (``samples_consumed``, as :class:`~batteries.distributed.DistributedTrainSampler`)
    the loader keeps it in step: its epoch, and ``samples_consumed`` = the samples of the batches
    before the one the loop holds (a loop that adds ``len(batch)`` itself stays exact). A sampler
    moved by the loop (``set_epoch``, ``load_state_dict``) is followed. ``len(loader)`` counts the
    batches of a whole epoch; a resumed iteration yields ``len(loader) - batches_done`` of them.

    Attributes:
        epoch: the epoch the next (or running) iteration belongs to.
        samples_done: this rank's samples of ``epoch`` handed to the loop.
        seed: the seed of the shuffle, the worker seeds and the per-sample draws.

    Example:
        >>> loader = make_loader(train_dataset, 64, shuffle=True, num_workers=2, seed=42)
        >>> loader.load_state_dict(checkpoint["loader"])  # when resuming: continues mid-epoch
        >>> while loader.epoch < epochs:
        ...     for batch in loader:
        ...         ...  # a step; a step checkpoint stores loader.state_dict()
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=batch_size, generator=torch.Generator(), **kwargs)
        self.seed = seed
        self.epoch = getattr(self.sampler, "epoch", 0)
        self.samples_done = self.sampler.samples_consumed if _skips(self.sampler) else 0
        self._left = self._sampler_place()  # where this loader last left the sampler

    @property
    def batches_done(self) -> int:
        """Batches of :attr:`epoch` handed to the loop."""
        return math.ceil(self.samples_done / self.batch_size)

    def __len__(self) -> int:
        if not _skips(self.sampler):
            return super().__len__()
        samples = self.sampler.num_samples
        return samples // self.batch_size if self.drop_last else math.ceil(samples / self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        self.epoch, self.samples_done = self._place()
        if not _skips(self.sampler):
            self.samples_done = 0  # this sampler cannot skip: an iteration starts at the epoch's beginning
        self._push()
        self.generator.manual_seed(_derived_seed(self.seed, self.epoch))  # workers' seeds: those of this epoch
        try:
            left = len(self.sampler)
        except TypeError:  # a sampler without a length (an iterable dataset): every batch counts as full
            left = math.inf
        return self._hand_over(super().__iter__(), left)

    def _hand_over(self, batches: Iterator[Any], left: float) -> Iterator[Any]:
        skips = _skips(self.sampler)
        for batch in batches:
            if skips:
                self.sampler.samples_consumed = self.samples_done
                self._left = self._sampler_place()
            size = min(self.batch_size, left)
            left -= size
            self.samples_done += int(size)
            yield batch
        if skips:
            self.sampler.samples_consumed = self.sampler.num_samples
            self._left = self._sampler_place()
        self.epoch, self.samples_done = self.epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        """Go to ``epoch``: at its first batch, or where it stands if it is the current epoch.

        Args:
            epoch: the epoch number (int >= 0).

        Raises:
            TypeError / ValueError: if ``epoch`` is not an int >= 0.
        """
        epoch = check_int(epoch, "epoch", minimum=0)
        current, done = self._place()
        self.epoch, self.samples_done = epoch, done if epoch == current else 0
        self._push()

    def state_dict(self) -> dict[str, Any]:
        """Where the loop stands: ``epoch``, ``batches_done``, ``samples_done``, and the sampler's state if it has one.

        Returns:
            A dict of ints and dicts of ints (loads with ``torch.load(weights_only=True)``).
        """
        epoch, done = self._place()
        batches = math.ceil(done / self.batch_size)
        state: dict[str, Any] = {"epoch": epoch, "batches_done": batches, "samples_done": done}
        if callable(getattr(self.sampler, "state_dict", None)):
            state["sampler"] = self.sampler.state_dict()
            if _skips(self.sampler):
                state["sampler"].update(epoch=epoch, samples_consumed=done)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`: the next iteration yields the rest of its epoch.

        Args:
            state: a dict from :meth:`state_dict` (``samples_done`` and ``sampler`` optional).

        Raises:
            KeyError: if ``epoch`` or ``batches_done`` is missing.
            ValueError: if the state is mid-epoch and the sampler cannot skip, or the sampler refuses its state.
        """
        missing = [key for key in ("epoch", "batches_done") if key not in state]
        if missing:
            raise KeyError(f"loader state is missing {missing}")
        epoch = check_int(state["epoch"], "epoch", minimum=0)
        done = check_int(state["batches_done"], "batches_done", minimum=0) * self.batch_size
        done = check_int(state.get("samples_done", done), "samples_done", minimum=0)
        skips = _skips(self.sampler)
        if done and not skips:
            raise ValueError(
                f"the loader state is mid-epoch (samples_done={done}) and the sampler {type(self.sampler).__name__} "
                "cannot skip samples: use a DistributedTrainSampler (shuffle=True), or resume at an epoch end"
            )
        if "sampler" in state and callable(getattr(self.sampler, "load_state_dict", None)):
            position = {"epoch": epoch, "samples_consumed": done} if skips else {}
            self.sampler.load_state_dict({**state["sampler"], **position})
            done = self.sampler.samples_consumed if skips else done  # after the sampler's checks and conversions
        self.epoch, self.samples_done = epoch, done
        self._push()

    def _sampler_place(self) -> tuple[Any, Any]:
        return getattr(self.sampler, "epoch", None), getattr(self.sampler, "samples_consumed", None)

    def _place(self) -> tuple[int, int]:
        """The epoch and samples done where the next iteration starts."""
        epoch, done = self.epoch, self.samples_done
        sampler_epoch, consumed = self._sampler_place()
        if (sampler_epoch, consumed) != self._left:  # the loop moved the sampler itself: follow it
            epoch = epoch if sampler_epoch is None else sampler_epoch
            done = done if consumed is None else consumed
        return epoch, done

    def _push(self) -> None:
        """Put the sampler at this loader's epoch and position."""
        if callable(getattr(self.sampler, "set_epoch", None)) and hasattr(self.sampler, "epoch"):
            self.sampler.set_epoch(self.epoch)
        if _skips(self.sampler):
            self.sampler.samples_consumed = self.samples_done
        self._left = self._sampler_place()


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    sampler: Sampler | None = None,
    num_workers: int = 0,
    seed: int = 0,
    **kwargs: Any,
) -> ResumableLoader:
    """A ``DataLoader`` that resumes mid-epoch exactly, draws reproducibly, and leaves no worker behind.

    - Position: a :class:`ResumableLoader`, with ``epoch``, ``state_dict()`` / ``load_state_dict()``.
      ``shuffle=True`` splits the data between DDP ranks (a :class:`~batteries.distributed.DistributedTrainSampler`
      seeded with ``seed``, a new order every epoch); neither ``shuffle`` nor ``sampler`` reads the
      whole dataset in order.
    - Draws: with workers, ``random``, NumPy and torch are seeded before each sample from (``seed``,
      epoch, index), whichever worker fetches it (indices of a ``DistributedTrainSampler``: with
      ``shuffle``, without ``sampler``, or given). Nothing is drawn from the main process's RNGs.
    - Workers (the platform's start method, as ``DataLoader``) outlast SIGTERM, SIGINT and SIGUSR1
      (the training process decides when to stop: :class:`~batteries.StopOnSignal`) and end with
      the training process, ``kill -9`` included (Linux). ``worker_init_fn`` defaults to ``seed_all``.

    Why each of these: docs/processes.md.

    Args:
        dataset: a map-style dataset (an iterable one works, without shuffle and mid-epoch resume).
        batch_size: samples per batch (int >= 1).
        shuffle: a new order every epoch, split between ranks. Default False.
        sampler: the order instead (not with ``shuffle``). Default None.
        num_workers: worker processes (int >= 0). Default 0.
        seed: seed of the shuffle and of the workers' draws (int >= 0). Default 0.
        **kwargs: passed to ``DataLoader`` (``pin_memory``, ``drop_last``, ``persistent_workers``, ...).

    Returns:
        The :class:`ResumableLoader`.

    Raises:
        TypeError / ValueError: on an argument of the wrong type or range, or ``shuffle`` with ``sampler``.

    Example:
        >>> loader = make_loader(train_dataset, 64, shuffle=True, num_workers=2, seed=42)
    """
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    num_workers = check_int(num_workers, "num_workers", minimum=0)
    seed = check_int(seed, "seed", minimum=0)
    if check_bool(shuffle, "shuffle") and (sampler is not None or isinstance(dataset, IterableDataset)):
        raise ValueError(f"shuffle=True needs a map-style dataset and no sampler, got sampler={sampler!r}")
    if sampler is None and not isinstance(dataset, IterableDataset):
        replicas = {} if shuffle else {"num_replicas": 1, "rank": 0}  # in order: the whole dataset on every rank
        sampler = DistributedTrainSampler(dataset, shuffle=shuffle, seed=seed, **replicas)
    if num_workers > 0:
        user_init = kwargs.pop("worker_init_fn", seed_all)
        kwargs["worker_init_fn"] = functools.partial(
            _init_worker, user_init=user_init, training_pid=os.getpid(), closing=_closing_flag(), seed=seed
        )
    return ResumableLoader(dataset, batch_size, sampler=sampler, num_workers=num_workers, seed=seed, **kwargs)
