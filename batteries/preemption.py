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

__all__ = ["StopOnSignal", "STOP_SIGNALS"]

STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name)
)


class StopOnSignal:
    """Turn SIGTERM / SIGINT / SIGUSR1 into a stop request that every rank acts on at the same step.

    Build it on every rank (after ``init_distributed``, in the main thread) and call it once per
    optimizer step on every rank, the same number of times: it returns True on every rank at the
    same call once any rank has received one of ``signals``. A checkpoint saved at that step is
    then consistent (ranks that stopped at different steps would save different steps' states).

    How the ranks agree: every ``every`` calls, each rank starts a non-blocking all-reduce (MAX) of
    a one-element CPU tensor holding its own flag, and waits for the one it started ``every`` calls
    before; the answer of that earlier all-reduce is the decision, so all ranks decide alike. The
    reduction runs on gloo in the background while the step computes: no GPU synchronisation, no
    host round trip on the critical path (``benchmarks/helper_costs.py`` measures the cost). A
    request is therefore acted on within ``2 * every`` calls of the signal. Without a process group
    (one process) the call just returns the flag. Under an NCCL default group a gloo group is
    created for this (a collective, hence "on every rank").

    Signals:
        - The first signal sets the request; the process goes on until the loop stops.
        - The same request often arrives twice within milliseconds (SLURM signals every process of
          the job and torchrun forwards the signal to its workers; a terminal's Ctrl-C reaches the
          whole process group): repeats within ``repeat_window_s`` of the first are ignored.
        - A later signal is a second request: the process ends at once, killed by that signal
          (with the signal's default action, so no traceback and the shell's status 128 + signal).
          Files the toolkit writes stay complete (every write is atomic); the step is lost.

    DataLoader workers also receive the signal when it goes to the whole process group (Ctrl-C,
    torchrun's shutdown): :func:`~batteries.make_loader`'s workers ignore it, and die with the
    training process instead. Workers of a plain ``DataLoader`` die on SIGTERM / SIGINT, and the
    next batch then raises: use ``make_loader``, or ignore the signals in your ``worker_init_fn``.

    Args:
        signals: the signals that request a stop. Default SIGTERM, SIGINT and SIGUSR1.
        every: agree across ranks every this many calls (int >= 1). Default 1.
        repeat_window_s: seconds after the first signal during which more signals are the same
            request (float >= 0). Default 1.0.

    Attributes:
        signum: the first signal received (an ``int``), or None.
        signal_name: its name, e.g. ``"SIGTERM"``, or None.
        exit_code: the status to exit with after a stop, ``128 + signum`` (the shell's status for a
            process ended by that signal: 143 for SIGTERM, 130 for SIGINT, 138 for SIGUSR1).
        stopped: True once a call has returned True.

    Raises:
        RuntimeError: if built outside the main thread (only it can receive signals in Python).
        TypeError / ValueError: on a bad ``signals``, ``every`` or ``repeat_window_s``.

    Example:
        >>> stop = StopOnSignal()
        >>> for batch in loader:
        ...     train_step(batch)
        ...     if stop():  # True on every rank at the same step
        ...         save_checkpoint(make_training_state(...), "checkpoints", "step.pth")
        ...         sys.exit(stop.exit_code)
    """

    def __init__(self, signals: Iterable[int] = STOP_SIGNALS, every: int = 1, repeat_window_s: float = 1.0) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("StopOnSignal must be built in the main thread: only it receives signals in Python")
        self.every = check_int(every, "every", minimum=1)
        self.repeat_window_s = check_number(repeat_window_s, "repeat_window_s")
        if not 0 <= self.repeat_window_s < float("inf"):
            raise ValueError(f"repeat_window_s must be a finite number >= 0, got {repeat_window_s!r}")
        try:
            self.signals = tuple(signal.Signals(s) for s in signals)
        except (TypeError, ValueError) as error:
            raise ValueError(f"signals must be signal numbers such as signal.SIGTERM, got {signals!r}") from error
        if not self.signals or signal.SIGKILL in self.signals:
            raise ValueError(f"signals must name at least one signal that can be caught, got {signals!r}")
        self.signum: int | None = None
        self.stopped = False
        self._received_at = 0.0
        self._calls = 0
        self._pending: tuple[Any, torch.Tensor] | None = None
        self._group = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self._group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self._previous = {s: signal.signal(s, self._handle) for s in self.signals}

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
        return 128 + (self.signum or 0)

    @property
    def requested(self) -> bool:
        """True once this process received a signal (this rank only; the loop should call the object)."""
        return self.signum is not None

    # ----------------------------------------------------------------- the poll
    def __call__(self) -> bool:
        """Poll once per optimizer step, on every rank: True on every rank at the same call after a request.

        Returns:
            True when the loop should stop now; then True on every later call too.
        """
        if self.stopped:
            return True
        self._calls += 1
        if self._group is None:
            self.stopped = self.requested
            return self.stopped
        if self._calls % self.every:
            return False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            self._pending = None
            if flag.item():
                self.stopped = True
                return True
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        return False

    def close(self) -> None:
        """Wait for the reduction in flight (call it on every rank) and restore the previous signal handlers.

        Call it before ``destroy_process_group``. Afterwards the signals act as before this object.
        """
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None
        if threading.current_thread() is threading.main_thread():
            for s, previous in self._previous.items():
                signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def __enter__(self) -> StopOnSignal:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
