"""DataLoaders for training loops: reproducible worker seeds, and no worker outliving its run."""

from __future__ import annotations

import ctypes
import functools
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from batteries._checks import check_int
from batteries._io import pid_alive
from batteries.seed import seed_all

__all__ = ["make_loader", "die_with_parent", "ignore_stop_signals"]

# Modules the forkserver imports once, so that a worker starts in milliseconds instead of
# importing torch again; _orphan_guard makes the server die with the process that started it.
_PRELOAD = ["batteries._orphan_guard", "torch", "numpy", "batteries"]
_PR_SET_PDEATHSIG = 1
# the signals that ask a run to stop (StopOnSignal): helper processes must not die of them
STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name)
)


def die_with_parent(ancestor_pid: int | None = None, *, sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` (SIGKILL) to this process when its parent process dies (Linux; elsewhere a no-op).

    ``make_loader`` calls it in its forkserver and in every worker, so that killing the training
    process ends them too. Call it in helper processes of your own for the same effect; never in
    the training process itself, which would then die with the shell or launcher that started it
    (``StopOnSignal`` asks for SIGTERM, a stop request, in torchrun's workers). If the parent, or
    ``ancestor_pid`` (the training process, for a worker whose parent is the forkserver), is already
    gone when the request is in place, the process sends itself ``sig`` at once.

    Args:
        ancestor_pid: a process further up whose death must end this one too. Default None.
        sig: the signal to receive. Default SIGKILL.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig))
    except (OSError, AttributeError):  # no libc prctl: the process behaves as Python's default
        return
    if os.getppid() != parent or (ancestor_pid is not None and not pid_alive(ancestor_pid)):
        os.kill(os.getpid(), sig)  # it died before the request was in place


def ignore_stop_signals() -> None:
    """Ignore SIGTERM, SIGINT and SIGUSR1 in this process (a DataLoader worker, a helper process).

    A signal sent to a whole process group (Ctrl-C in a terminal, torchrun's shutdown of its
    workers) reaches the DataLoader workers too; without this a worker dies and the training
    process's next batch raises, before :class:`~batteries.StopOnSignal` could save a checkpoint.
    ``make_loader`` calls it in its workers (its forkserver starts with them blocked); they die with
    the training process.
    """
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)


def _start_forkserver() -> None:
    """Start the forkserver now (a no-op once it runs), with SIGTERM / SIGINT / SIGUSR1 blocked.

    The server and every worker it forks inherit the blocked mask from the moment they exist: a
    Ctrl-C or a launcher's SIGTERM to the process group while the server still imports torch would
    otherwise kill it (Python's forkserver ignores SIGINT only after its preload), and the training
    process could not finish its step and save (``StopOnSignal``). This process's mask is restored
    at once; a signal that came meanwhile is delivered then.
    """
    if not hasattr(signal, "pthread_sigmask"):
        return
    import multiprocessing.forkserver
    import multiprocessing.resource_tracker

    # first the resource tracker the server needs: starting it unblocks SIGINT and SIGTERM in this
    # thread (Python's own fix for the same race, bpo-33613), which would undo the mask below
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

    - Worker seeds: ``worker_init_fn=seed_all`` and a generator seeded with ``seed``: every
      worker's ``random`` / NumPy / torch seeds differ from each other and from epoch to epoch, and
      repeat exactly in a run with the same seed. Creating the loader draws nothing from the
      global RNG.
    - Workers (``num_workers > 0``) start from a forkserver, not by forking this process: a fork
      of a process that runs threads (TensorBoard writers, queue feeders, background saves) can
      deadlock the new worker inside CPython. The server preloads torch once, so a worker starts
      in milliseconds, and on Linux it dies with the process that started it: a run killed with
      ``kill -9`` or SIGTERM leaves no server or worker behind (without this, both stay forever).
      Where there is no forkserver (Windows, macOS' default), the platform's default is used.
    - Signals: workers ignore SIGTERM, SIGINT and SIGUSR1 (:func:`ignore_stop_signals`), so that
      Ctrl-C or a launcher's SIGTERM to the process group leaves them running until the training
      process, which may be finishing a step and saving (:class:`~batteries.StopOnSignal`), ends.
      A ``worker_init_fn`` given in ``kwargs`` replaces ``seed_all`` and still runs in every worker.

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
