"""Process plumbing: the stop signals, dying with the parent process, and whether a pid is alive.

See docs/processes.md for why each exists.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

__all__ = ["STOP_SIGNALS", "die_with_parent", "ignore_stop_signals", "pid_alive"]

_PR_SET_PDEATHSIG = 1  # prctl option, from <linux/prctl.h>

# the signals that ask a run to stop (StopOnSignal): helper processes must not die of them
STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name)
)


def die_with_parent(ancestor_pid: int | None = None, *, sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent process dies (Linux; elsewhere a no-op).

    Call it in helper processes (DataLoader workers, servers), never in the training process
    itself, which would then die with the shell or launcher that started it. If the parent, or
    ``ancestor_pid``, is already gone when the request is in place, the process sends itself
    ``sig`` at once.

    Args:
        ancestor_pid: a process further up (the training process, for a worker whose parent is
            the forkserver) whose death must end this one too. Default None.
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


def ignore_stop_signals() -> None:
    """Ignore :data:`STOP_SIGNALS` (SIGTERM, SIGINT, SIGUSR1) in this process.

    For helper processes (DataLoader workers): a signal sent to the whole process group then
    leaves them running, and the training process decides when to stop.
    """
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)


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
