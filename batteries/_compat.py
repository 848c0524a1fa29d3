"""The only home of private internals of torch, CPython and tensorboardX that batteries uses.

Each name here has no public equivalent that serves (docs/internals.md says why, and the versions
it was tested on), and a test in tests/test_compat.py that fails with a message naming the torch
(or tensorboardX) version when the internal moves. Everything else in batteries uses public APIs.
"""

from __future__ import annotations

import atexit
from typing import Any

import torch

# CPython's atexit: batteries/_async.py reports a failed background save at exit and sets the exit status.


def atexit_handler_count() -> int | None:
    """How many exit handlers are registered (``atexit._ncallbacks()``); None where there is no such count."""
    count = getattr(atexit, "_ncallbacks", None)
    return count() if count is not None else None


def run_exit_handlers() -> None:
    """Run every registered exit handler now, newest first, and unregister them (``atexit._run_exitfuncs()``)."""
    atexit._run_exitfuncs()


# torch: batteries/tensorboard.py tells a logged tensor changed in place before it was read.


def tensor_version(tensor: torch.Tensor) -> int:
    """The counter of in-place changes of ``tensor`` (``Tensor._version``); inference tensors have none."""
    return tensor._version


# tensorboardX: batteries/tensorboard.py writes events without tensorboardX's process queue.


def event_file_writer(summary_writer: Any) -> Any | None:
    """The ``EventsWriter`` of ``summary_writer``'s event file (``file_writer.event_writer._ev_writer``).

    Returns:
        An object whose ``write_event(event)`` appends to the file at once; None where there is
        none (``write_to_disk=False``) or tensorboardX moved it.
    """
    events = getattr(getattr(summary_writer.file_writer, "event_writer", None), "_ev_writer", None)
    return events if callable(getattr(events, "write_event", None)) else None
