"""Preemption: SIGTERM, SIGINT and SIGUSR1 become a stop request that every rank sees at the same step.

Clusters stop jobs with a signal and a grace period: SLURM and Kubernetes send SIGTERM, then
SIGKILL some seconds later; SLURM's ``--signal=USR1@60`` sends SIGUSR1 ahead of the time limit;
Ctrl-C sends SIGINT. :class:`StopOnSignal` turns each into a request that a training loop polls
once per optimizer step; the loop then finishes the step, saves a resumable checkpoint and exits.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterable
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from batteries._checks import check_int, check_number
from batteries.data import STOP_SIGNALS, die_with_parent

__all__ = ["StopOnSignal", "STOP_SIGNALS"]

_ACTIVE: list[StopOnSignal] = []  # the instance whose handlers are installed (signals are per process)


class StopOnSignal:
    """Turn SIGTERM / SIGINT / SIGUSR1 into a stop request that every rank acts on at the same step.

    Build it on every rank (after ``init_distributed``, in the main thread) and call it once per
    optimizer step on every rank, the same number of times: it returns True on every rank at the
    same call once any rank has received one of ``signals``. A checkpoint saved at that step is
    then consistent (ranks that stopped at different steps would save different steps' states).

    How the ranks agree: at an agreement call, each rank waits for the all-reduce it started at the
    previous agreement call, and starts a new one, non-blocking, of a small CPU tensor holding the
    signal it received (0 for none); the answer of the earlier all-reduce is the decision, so all
    ranks decide alike at the same call, and every rank learns which signal it was. The reduction
    runs on gloo in the background while the steps compute: no GPU synchronisation, no host round
    trip on the critical path. Agreement calls come every ``every`` calls; by default (``every=None``)
    about every ``interval_s`` seconds: each reduction also carries each rank's measured step time,
    and all ranks take the next spacing from its result (so they stay in step). A request is
    therefore acted on within two spacings of the signal, about ``2 * interval_s`` seconds plus a
    step. ``benchmarks/stop_on_signal.py`` measures the cost: on two CPU processes, an all-reduce
    every step costs about a millisecond a step; the default, a few per second, costs nothing
    measurable. ``stop(wait=True)`` agrees at once instead (a blocking
    all-reduce): call it where a loop resumes after a long pause, such as before an epoch's first
    step, so that a signal that came during validation or a save is acted on before the next step.
    Without a process group (one process) a call just returns whether a signal came. Under an NCCL
    default group a gloo group is created for this (a collective, hence "on every rank").

    Signals:
        - The first signal sets the request; the process goes on until the loop stops.
        - The same request often arrives twice within milliseconds (SLURM signals every process of
          the job and torchrun forwards the signal to its workers; a terminal's Ctrl-C reaches the
          whole process group): repeats within ``repeat_window_s`` of the first are ignored.
        - A later signal is a second request: the process ends at once, killed by that signal
          (with the signal's default action, so no traceback and the shell's status 128 + signal).
          Files the toolkit writes stay complete (every write is atomic); the step is lost.
        - Under torchrun (a worker of its agent), the agent's death (SIGKILL, or a signal torchrun
          does not handle, such as SIGUSR1 unless ``TORCHELASTIC_SIGNALS_TO_HANDLE`` lists it)
          becomes a SIGTERM to this worker: the workers stop together instead of training on
          orphaned.

    Only one instance may be active in a process at a time (signal handlers are per process):
    :meth:`close` it (or leave its ``with`` block) before building another.

    DataLoader workers also receive the signal when it goes to the whole process group (Ctrl-C,
    torchrun's shutdown): :func:`~batteries.make_loader`'s workers block it, and die with the
    training process instead. Workers of a plain ``DataLoader`` die on SIGTERM / SIGINT, and the
    next batch then raises: use ``make_loader``, or ignore the signals in your ``worker_init_fn``.
    Before the object is built (while torch imports, say) the signals act as usual.

    Args:
        signals: the signals that request a stop. Default SIGTERM, SIGINT and SIGUSR1.
        every: agree across ranks every this many calls (int >= 1), or None to agree about every
            ``interval_s`` seconds. Default None.
        interval_s: with ``every=None``, the seconds between agreements (float > 0). Default 0.25.
        repeat_window_s: seconds after the first signal during which more signals are the same
            request (float >= 0). Default 1.0.

    Attributes:
        signum: the signal that stopped the loop, or that this process received (an ``int``), or None.
        signal_name: its name, e.g. ``"SIGTERM"``, or None.
        exit_code: the status to exit with after a stop, ``128 + signum`` (the shell's status for a
            process ended by that signal: 143 for SIGTERM, 130 for SIGINT, 138 for SIGUSR1); 0
            without a signal.
        stopped: True once a call has returned True.

    Raises:
        RuntimeError: if built outside the main thread (only it can receive signals in Python), or
            while another instance is active.
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
            self.signals = tuple(signal.Signals(s) for s in signals)
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
        self._received_at = 0.0
        self._calls = 0  # since the last agreement call
        self._spacing = self.every or 1  # calls between agreement calls: the same on every rank
        self._agreed_at = time.perf_counter()
        self._pending: tuple[Any, torch.Tensor] | None = None
        self._group = None
        if _world_size() > 1:
            self._group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self._closed = False
        self._previous: dict[signal.Signals, Any] = {}
        try:
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        except (OSError, ValueError) as error:  # SIGKILL, SIGSTOP, ...: cannot be caught
            self._restore()
            raise ValueError(f"signals must be signals a process can catch, got {s!r}: {error}") from error
        _ACTIVE.append(self)
        if "TORCHELASTIC_RUN_ID" in os.environ and signal.SIGTERM in self.signals:
            die_with_parent(sig=signal.SIGTERM)  # torchrun's agent dies: stop like on its SIGTERM

    # ----------------------------------------------------------------- signals
    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._received_at = signum, now
        elif now - self._received_at > self.repeat_window_s:
            sys.stderr.write(f"{signal.Signals(signum).name} again: exiting at once, without saving\n")
            sys.stderr.flush()
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

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
            if _world_size() > 1:
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
        work = dist.all_reduce(received, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
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
        if self._pending is not None:
            work, _ = self._pending
            self._pending = None
            work.wait()
        self._restore()
        self._group, self._closed = None, True  # holds no process group: destroy_process_group can free it

    def _restore(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}
        if self in _ACTIVE:
            _ACTIVE.remove(self)

    def __enter__(self) -> StopOnSignal:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
