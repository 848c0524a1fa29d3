"""DataLoaders for training loops: reproducible worker seeds, and no worker outliving its run."""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from batteries._checks import check_int
from batteries._process import STOP_SIGNALS, die_with_parent, ignore_stop_signals
from batteries.seed import seed_all

__all__ = ["make_loader", "die_with_parent", "ignore_stop_signals"]

# Modules the forkserver imports once, so that a worker starts in milliseconds instead of
# importing torch again; _orphan_guard makes the server die with the process that started it.
_PRELOAD = ["batteries._orphan_guard", "torch", "numpy", "batteries"]


def _start_forkserver() -> None:
    """Start the forkserver now (a no-op once it runs), with the stop signals blocked.

    The server and every worker it forks inherit the blocked mask; this process's mask is restored
    at once, and a signal that came meanwhile is delivered then. See docs/processes.md.
    """
    if not hasattr(signal, "pthread_sigmask"):
        return
    import multiprocessing.forkserver
    import multiprocessing.resource_tracker

    # the resource tracker first: starting it unblocks SIGINT and SIGTERM in this thread
    multiprocessing.resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _init_worker(worker_id: int, user_init: Callable[[int], Any] | None, training_pid: int) -> None:
    die_with_parent(training_pid)  # ends with the forkserver, which ends with the training process
    ignore_stop_signals()  # the training process decides when to stop (StopOnSignal); workers end with it
    if user_init is not None:
        user_init(worker_id)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    sampler: Sampler | None = None,
    num_workers: int = 0,
    seed: int = 0,
    **kwargs: Any,
) -> DataLoader:
    """A ``DataLoader`` whose randomness is reproducible and whose workers never outlive the run.

    - Seeds: ``worker_init_fn=seed_all`` and a generator seeded with ``seed``: workers' seeds differ
      from each other and from epoch to epoch, and repeat in a run with the same seed. Creating
      the loader draws nothing from the global RNG.
    - Workers (``num_workers > 0``) start from a forkserver that preloads torch, and on Linux die
      with the process that started it, ``kill -9`` included. Where there is no forkserver
      (Windows, macOS' default), the platform's default start method is used.
    - Workers ignore SIGTERM, SIGINT and SIGUSR1: the training process decides when to stop
      (:class:`~batteries.StopOnSignal`). A ``worker_init_fn`` in ``kwargs`` replaces ``seed_all``.

    Why each of these: docs/processes.md.

    Args:
        dataset: a map-style dataset.
        batch_size: samples per batch (int >= 1).
        sampler: the order, e.g. :class:`~batteries.distributed.DistributedTrainSampler` for training;
            None reads the dataset in order (evaluation). Default None.
        num_workers: worker processes (int >= 0). Default 0.
        seed: seed of the loader's generator (int >= 0). Default 0.
        **kwargs: passed to ``DataLoader`` (``pin_memory``, ``drop_last``, ``collate_fn``, ...).

    Returns:
        The ``DataLoader``.

    Raises:
        TypeError / ValueError: if ``batch_size``, ``num_workers`` or ``seed`` is not an int in range.

    Example:
        >>> sampler = DistributedTrainSampler(train_dataset, seed=42)
        >>> loader = make_loader(train_dataset, 64, sampler=sampler, num_workers=2, seed=42)
    """
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    num_workers = check_int(num_workers, "num_workers", minimum=0)
    seed = check_int(seed, "seed", minimum=0)
    context = None
    if num_workers > 0 and "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        multiprocessing.set_forkserver_preload(_PRELOAD)  # read when the server starts (the first loader)
        _start_forkserver()
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        worker_init_fn=functools.partial(
            _init_worker, user_init=kwargs.pop("worker_init_fn", seed_all), training_pid=os.getpid()
        ),
        multiprocessing_context=kwargs.pop("multiprocessing_context", context),
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )
