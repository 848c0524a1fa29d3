"""One background writer thread for asynchronous checkpoint saves (at most one save in flight)."""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

logger = logging.getLogger(__name__)


def snapshot(obj: Any) -> Any:
    """A copy of ``obj`` whose tensors are new CPU tensors and whose containers are new.

    Taken in the caller, so that training may change the model's tensors in place right after.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, Mapping):
        return (
            type(obj)((key, snapshot(value)) for key, value in obj.items())
            if isinstance(obj, dict)
            else {key: snapshot(value) for key, value in obj.items()}
        )
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(snapshot(value) for value in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(value) for value in obj)
    return obj


class AsyncWriter:
    """Runs write jobs on one background thread, one at a time.

    :meth:`submit` first waits for the job in flight and re-raises its error, so an error surfaces
    at the next call at the latest; :meth:`wait` surfaces it explicitly.
    """

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], Any]) -> None:
        with self._lock:
            self._wait_locked()
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batteries-save")
            self._pending = self._executor.submit(job)

    def wait(self) -> None:
        """Block until the save in flight (if any) is written; re-raise its error."""
        with self._lock:
            self._wait_locked()

    def _wait_locked(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    @property
    def busy(self) -> bool:
        return self._pending is not None and not self._pending.done()


DEFAULT_WRITER = AsyncWriter()


@atexit.register
def _finish_at_exit() -> None:
    try:
        DEFAULT_WRITER.wait()
    except BaseException:  # noqa: BLE001 - the interpreter is exiting: report, do not hide
        logger.exception("an asynchronous checkpoint save failed")
