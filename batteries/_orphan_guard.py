"""Imported by the DataLoader forkserver (see ``data.make_loader``): die with the parent process.

Python's forkserver, and the DataLoader workers it forks, stay alive forever when the training
process is killed (``kill -9``, SIGTERM); they hold memory and the caller's output pipes. On
Linux, ``PR_SET_PDEATHSIG`` makes the kernel send SIGKILL to the server when its parent dies; the
workers then see their parent gone and exit on their own (DataLoader's watchdog).
"""

import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1

if sys.platform.startswith("linux"):
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # no libc prctl: the server behaves as Python's default
        pass
