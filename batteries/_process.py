"""Process plumbing: the stop signals, dying with the parent process, and whether a pid is alive.

See docs/processes.md for why each exists.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from types import FrameType
from typing import Any

__all__ = ["STOP_SIGNALS", "die_with_parent", "outlast_stop_signals", "pid_alive"]

_PR_SET_PDEATHSIG = 1  # prctl option, from <linux/prctl.h>

# the signals that ask a run to stop (StopOnSignal): helper processes must not die of them
STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name)
)


def die_with_parent(ancestor_pid: int | None = None, *, sig: int = getattr(signal, "SIGKILL", signal.SIGTERM)) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent process dies (Linux; elsewhere a no-op).

    Call it in helper processes (DataLoader workers, servers), never in the training process
    itself, which would then die with the shell or launcher that started it. If the parent, or
    ``ancestor_pid``, is already gone when the request is in place, the process sends itself
    ``sig`` at once.

    Args:
        ancestor_pid: a process further up (the training process, for a worker started by a
            forkserver) whose death must end this one too. Default None.
        sig: the signal to receive. Default SIGKILL.

    Example:
        >>> die_with_parent(sig=signal.SIGTERM)  # a stop request instead of a kill
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


def outlast_stop_signals(training_pid: int, closing: Any) -> None:
    """Keep this helper process (a DataLoader worker) alive through stop signals, and end it with the training process.

    :data:`STOP_SIGNALS` get a handler that ignores them, so a signal sent to the whole process
    group (Ctrl-C) or to every process of a job (SLURM) leaves the helper running while the training
    process stops and saves. Being handled rather than ignored, they are back to their defaults in
    the programs the helper starts (``exec`` resets handlers, not ignored signals), and this call
    unblocks them. The handler ends the process at once (exit status 0) when the training process is
    gone or exiting (``closing.value`` true). On Linux the parent's death sends SIGTERM to that
    handler: a thread of the training process that forked the helper and then ended is no death.

    Args:
        training_pid: the process whose death or exit ends this one.
        closing: a shared flag (``multiprocessing`` ``RawValue``) the training process sets when it exits.
    """
    parent = os.getppid()

    def on_stop_signal(signum: int, frame: FrameType | None) -> None:
        if closing.value or os.getppid() != parent or not pid_alive(training_pid):
            os._exit(0)

    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, on_stop_signal)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    die_with_parent(training_pid, sig=signal.SIGTERM)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine.

    Args:
        pid: a process id of this host.

    Returns:
        False when the process is gone or a zombie (ended, not yet reaped by its parent); True
        when it exists, also when it may not be signalled (another user's).
    """
    if os.path.isdir("/proc/self"):  # Linux: sees zombies too
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as file:
                return file.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except FileNotFoundError:
            return False
        except (OSError, IndexError):  # unreadable: ask the kernel below
            pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True
