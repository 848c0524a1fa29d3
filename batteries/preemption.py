"""Preemption: SIGTERM, SIGINT and SIGUSR1 become a stop request that every rank sees at the same step.

Clusters stop jobs with a signal and a grace period: SLURM and Kubernetes send SIGTERM, then
SIGKILL some seconds later; SLURM's ``--signal=USR1@60`` sends SIGUSR1 ahead of the time limit;
Ctrl-C sends SIGINT. :class:`StopOnSignal` turns each into a request that a training loop polls
once per optimizer step; the loop then finishes the step, saves a resumable checkpoint and exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

import torch

from batteries import distributed
from batteries._checks import check_int, check_number
from batteries._process import STOP_SIGNALS, die_with_parent

__all__ = ["StopOnSignal", "STOP_SIGNALS"]

_ACTIVE: list[StopOnSignal] = []  # the instance whose handlers are installed (signals are per process)


class StopOnSignal:
    """Turn SIGTERM / SIGINT / SIGUSR1 into a stop request that every rank acts on at the same step.

    Build it on every rank (after ``init_distributed``, in the main thread) and call it once per
    optimizer step on every rank: once any rank has received one of ``signals``, it returns True on
    every rank at the same call, so a checkpoint saved then is consistent. The ranks agree with a
    non-blocking all-reduce on :func:`~batteries.distributed.gloo_group` about every ``interval_s``
    seconds (or every ``every`` calls); ``stop(wait=True)`` agrees at once, e.g. before an epoch's
    first step. A repeated signal within ``repeat_window_s`` is the same request; a later one kills
    the process at once, also while the main thread waits in a collective (a thread sees the
    signals: docs/preemption.md). One instance per process at a time.

    Args:
        signals: the signals that request a stop (one given twice counts once). Default SIGTERM, SIGINT, SIGUSR1.
        every: agree every this many calls (int >= 1), or None for every ``interval_s``. Default None.
        interval_s: with ``every=None``, the seconds between agreements (float > 0). Default 0.25.
        repeat_window_s: seconds after the first signal in which more are the same request. Default 1.0.

    Attributes:
        signum, signal_name: the signal that stopped the loop or that this process received, or None.
        exit_code: ``128 + signum`` (143 for SIGTERM, 130 for SIGINT, 138 for SIGUSR1); 0 without one.
        stopped: True once a call has returned True.

    Raises:
        RuntimeError: if built outside the main thread, or while another instance is active.
        TypeError / ValueError: on a bad ``signals`` (also one that cannot be caught), ``every``,
            ``interval_s`` or ``repeat_window_s``.

    Example:
        >>> stop = StopOnSignal()
        >>> for batch in loader:
        ...     train_step(batch)
        ...     if stop():  # True on every rank at the same step
        ...         save_checkpoint(make_training_state(...), "checkpoints", "step.pth")
        ...         sys.exit(stop.exit_code)
    """

    def __init__(
        self,
        signals: Iterable[int] = STOP_SIGNALS,
        every: int | None = None,
        interval_s: float = 0.25,
        repeat_window_s: float = 1.0,
    ) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("StopOnSignal must be built in the main thread: only it receives signals in Python")
        self.every = None if every is None else check_int(every, "every", minimum=1)
        self.interval_s = check_number(interval_s, "interval_s")
        if not 0 < self.interval_s < float("inf"):
            raise ValueError(f"interval_s must be a finite number > 0, got {interval_s!r}")
        self.repeat_window_s = check_number(repeat_window_s, "repeat_window_s")
        if not 0 <= self.repeat_window_s < float("inf"):
            raise ValueError(f"repeat_window_s must be a finite number >= 0, got {repeat_window_s!r}")
        try:
            self.signals = tuple(dict.fromkeys(signal.Signals(s) for s in signals))  # one listed twice: once
        except (TypeError, ValueError) as error:
            raise ValueError(f"signals must be signal numbers such as signal.SIGTERM, got {signals!r}") from error
        if not self.signals:
            raise ValueError(f"signals must name at least one signal, got {signals!r}")
        if _ACTIVE:
            raise RuntimeError(
                "another StopOnSignal is active in this process (signal handlers are per process): "
                "close() it before building a new one, or keep using it"
            )
        self.signum: int | None = None
        self.stopped = False
        self._first_delivery: float | None = None  # when the first signal was delivered (time.monotonic)
        self._calls = 0  # since the last agreement call
        self._spacing = self.every or 1  # calls between agreement calls: the same on every rank
        self._agreed_at = time.perf_counter()
        self._pending: tuple[Any, torch.Tensor] | None = None
        self._group = distributed.gloo_group()  # None in one process
        self._closed = False
        self._previous: dict[signal.Signals, Any] = {}
        self._deliveries: _Deliveries | None = None
        try:
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        except (OSError, ValueError) as error:  # SIGKILL, SIGSTOP, ...: cannot be caught
            self._restore()
            raise ValueError(f"signals must be signals a process can catch, got {s!r}: {error}") from error
        try:
            self._deliveries = _Deliveries(self._delivered)
        except BaseException:
            self._restore()
            raise
        _ACTIVE.append(self)
        if "TORCHELASTIC_RUN_ID" in os.environ and signal.SIGTERM in self.signals:
            die_with_parent(sig=signal.SIGTERM)  # torchrun's agent dies: stop like on its SIGTERM

    # ----------------------------------------------------------------- signals
    def _handle(self, signum: int, frame: FrameType | None) -> None:
        """The Python handler (main thread): records the request; the deliveries are counted by the thread."""
        if self.signum is None:
            self.signum = signum
        if self._deliveries is None or not self._deliveries.watching():  # a forked child, or an asyncio loop's fd
            self._delivered(signum)  # no thread sees the deliveries: count them here

    def _delivered(self, signum: int) -> None:
        """One delivery of a signal: the first is the request; one after ``repeat_window_s`` ends the process."""
        if signum not in self.signals:  # the wakeup socket carries every signal Python handles
            return
        now = time.monotonic()
        if self.signum is None:
            self.signum = signum  # also while the main thread waits in C and runs no handler
        if self._first_delivery is None:
            self._first_delivery = now
        elif now - self._first_delivery > self.repeat_window_s:
            _die_of(signum)

    @property
    def signal_name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum if self.signum else 0

    @property
    def requested(self) -> bool:
        """True once this process received a signal (this rank only; the loop should call the object)."""
        return self.signum is not None

    # ----------------------------------------------------------------- the poll
    def __call__(self, wait: bool = False) -> bool:
        """Poll once per optimizer step, on every rank: True on every rank at the same call after a request.

        Args:
            wait: agree now, with a blocking all-reduce, on what every rank has received so far
                (instead of on what they had received ``every`` calls ago). Pass the same value on
                every rank. Default False.

        Returns:
            True when the loop should stop now; then True on every later call too.

        Raises:
            RuntimeError: if a process group of several ranks exists but did not when the object was
                built (the ranks could not agree).
        """
        if self.stopped or self._closed:
            return self.stopped
        self._calls += 1
        if self._group is None:
            if _several_ranks():
                raise RuntimeError(
                    "StopOnSignal was built before the process group existed, so the ranks cannot agree on "
                    "when to stop: build it after init_distributed / init_process_group"
                )
            self.stopped = self.requested
            return self.stopped
        if not wait and self._calls < self._spacing:
            return False
        if self._pending is not None:
            work, agreed = self._pending
            self._pending = None
            work.wait()
            if self._agree(agreed):
                return True
        now = time.perf_counter()
        step_us = (now - self._agreed_at) / self._calls * 1e6  # this rank's time per call since the last agreement
        self._calls, self._agreed_at = 0, now
        # MAX of [signal, slowest step]: the signal any rank received; the spacing that suits the slowest rank
        received = torch.tensor([self.signum or 0, max(1, round(step_us))], dtype=torch.int64)
        work = distributed.all_reduce_max_async(received, self._group)
        if wait:
            work.wait()
            return self._agree(received)
        self._pending = (work, received)
        return False

    def _agree(self, agreed: torch.Tensor) -> bool:
        signum, step_us = agreed.tolist()
        if signum:
            self.signum = self.signum or signum  # a rank that received none learns which signal it was
            self.stopped = True
        elif self.every is None:  # the same on every rank: it comes from the all-reduce
            self._spacing = max(1, min(10_000, int(self.interval_s * 1e6 // step_us)))
        return self.stopped

    def close(self) -> None:
        """Wait for the reduction in flight (call it on every rank) and restore the previous signal handlers.

        Call it before ``destroy_process_group``: it lets go of the group. Afterwards the signals act
        as before this object, a call returns whether it had stopped, and another instance may be
        built. Closing twice is a no-op.

        Raises:
            RuntimeError: if called outside the main thread (only it can restore signal handlers).
        """
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("StopOnSignal.close() must be called in the main thread: only it can restore handlers")
        try:
            if self._pending is not None:
                work, _ = self._pending
                self._pending = None
                work.wait()  # raises if a peer died: the handlers are restored all the same
        finally:
            self._restore()
            self._group, self._closed = None, True  # holds no process group: destroy_process_group can free it

    def _restore(self) -> None:
        deliveries, self._deliveries = self._deliveries, None
        try:
            if deliveries is not None:
                deliveries.close()
        finally:
            for s, previous in self._previous.items():
                signal.signal(s, previous if previous is not None else signal.SIG_DFL)
            self._previous = {}
            if self in _ACTIVE:
                _ACTIVE.remove(self)

    def __enter__(self) -> StopOnSignal:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _several_ranks() -> bool:
    return distributed.is_initialized() and distributed.get_world_size() > 1


def _die_of(signum: int) -> None:
    """End the process at once by ``signum``'s default action (killed by the signal), from any thread."""
    os.write(2, f"{signal.Signals(signum).name} again: exiting at once, without saving\n".encode())
    if threading.current_thread() is threading.main_thread():
        signal.signal(signum, signal.SIG_DFL)
    else:  # Python's signal.signal works in the main thread only: the C library's signal()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).signal(int(signum), ctypes.c_void_p(0))  # 0: SIG_DFL
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])  # delivered to this thread, now
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)  # only where the default action could not be restored


class _Deliveries:
    """Every delivery of a signal that Python handles, seen by a thread as it happens (docs/preemption.md).

    Python runs signal handlers only between the main thread's bytecodes, so not while it waits in C
    (a collective), and a signal delivered twice meanwhile runs its handler once. With
    ``signal.set_wakeup_fd``, the C-level handler writes each delivery's number to a socket, which a
    thread reads and passes to ``on_delivery`` (the wakeup fd set before, e.g. asyncio's, gets them too).
    """

    def __init__(self, on_delivery: Callable[[int], None]) -> None:
        self._read, self._write = socket.socketpair()
        self._write.setblocking(False)
        try:
            self._previous = signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        except BaseException:
            self._read.close()
            self._write.close()
            raise
        self._thread = threading.Thread(target=self._run, args=(on_delivery,), name="batteries-signals", daemon=True)
        self._thread.start()

    def _run(self, on_delivery: Callable[[int], None]) -> None:
        while True:
            try:
                data = self._read.recv(512)
            except OSError:
                return
            if not data:
                return
            if self._previous >= 0:
                with contextlib.suppress(OSError):
                    os.write(self._previous, data)
            for signum in data:
                on_delivery(signum)

    def watching(self) -> bool:
        """Whether the wakeup fd is still this socket (main thread; other code may have set its own since)."""
        current = signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        if current != self._write.fileno():
            signal.set_wakeup_fd(current)  # theirs stays
        return current == self._write.fileno()

    def close(self, *, forked: bool = False) -> None:
        """Give the wakeup fd back and end the thread; ``forked``: in a forked child (the thread is not there)."""
        with contextlib.suppress(ValueError):  # not in the main thread
            current = signal.set_wakeup_fd(self._previous)
            if current != self._write.fileno():  # another took it over since: theirs stays
                signal.set_wakeup_fd(current)
        if not forked:
            with contextlib.suppress(OSError):
                self._read.shutdown(socket.SHUT_RDWR)  # the thread's recv returns
            self._thread.join(timeout=5)
        self._read.close()
        self._write.close()


def _forget_deliveries_in_child() -> None:
    """After ``os.fork``, in the child: its signals must not reach the parent's thread through the shared socket."""
    for stop in _ACTIVE:
        deliveries, stop._deliveries = stop._deliveries, None
        if deliveries is not None:
            deliveries.close(forked=True)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_deliveries_in_child)
