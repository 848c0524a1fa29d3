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


def snapshot(obj: Any, buffers: list[torch.Tensor] | None = None) -> Any:
    """A copy of ``obj`` whose tensors are CPU copies and whose containers are new.

    Taken in the caller, so that training may change the model's tensors in place right after.
    With ``buffers`` (the previous snapshot's tensors, in traversal order), a tensor of the same
    shape and dtype is copied into its old buffer instead of fresh memory: no page faults, which
    cost more than the copy itself. The list is updated in place.

    Tensors that are the same view of the same memory (tied weights: an embedding and the output
    layer that shares it) become one copy, so the file stores them once and a load ties them again,
    as ``torch.save`` of the originals does. Views that only overlap are copied separately.
    """
    index = 0
    copied: dict[tuple, torch.Tensor] = {}  # (device, address, dtype, shape, stride) -> its copy

    def copy(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        if tensor.layout != torch.strided or tensor.numel() == 0:
            return copy_one(tensor)
        key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if key not in copied:
            copied[key] = copy_one(tensor)
        return copied[key]

    def copy_one(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal index
        if buffers is None or tensor.layout != torch.strided:
            return tensor.to("cpu", copy=True)
        position, index = index, index + 1
        if (
            position < len(buffers)
            and buffers[position].shape == tensor.shape
            and buffers[position].dtype == tensor.dtype
        ):
            return buffers[position].copy_(tensor)
        fresh = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu").copy_(tensor)
        if position < len(buffers):
            buffers[position] = fresh
        else:
            buffers.append(fresh)
        return fresh

    def walk(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return copy(value)
        if isinstance(value, Mapping):
            items = [(key, walk(item)) for key, item in value.items()]
            return type(value)(items) if isinstance(value, dict) else dict(items)
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            return type(value)(*(walk(item) for item in value))
        if isinstance(value, (list, tuple)):
            return type(value)(walk(item) for item in value)
        return value

    return walk(obj)


class AsyncWriter:
    """Runs write jobs on one background thread, one at a time.

    :meth:`submit` first waits for the job in flight and re-raises its error, so an error surfaces
    at the next call at the latest; :meth:`wait` surfaces it explicitly. Snapshots reuse the
    previous snapshot's CPU buffers (it is written by then).
    """

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._lock = threading.Lock()
        self._buffers: list[torch.Tensor] = []

    def submit(self, obj: Any, job: Callable[[Any], Any]) -> None:
        """Wait for the job in flight (re-raising its error), snapshot ``obj``, run ``job(snapshot)`` behind."""
        with self._lock:
            self._wait_locked()
            data = snapshot(obj, self._buffers)  # the previous job is done: its buffers are free
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batteries-save")
            self._pending = self._executor.submit(job, data)

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
