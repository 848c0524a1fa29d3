"""TensorBoard scalars on global rank 0 that cost the training loop about a microsecond each.

``add_scalar`` / ``add_metric`` check the value and queue it; a background thread builds the
events and writes them into tensorboardX's event file, reading device tensors in one copy per
batch. tensorboardX is imported when the first logger is built. See docs/processes.md.
"""

from __future__ import annotations

import atexit
import collections
import logging
import numbers
import operator
import os
import threading
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batteries import distributed
from batteries._checks import check_number
from batteries._compat import event_file_writer, tensor_version

__all__ = ["TensorboardLogger"]

log = logging.getLogger(__name__)

# Pending records that wake the writer thread before ``flush_secs``: bounds memory (and the device
# memory of pending GPU tensors) in a loop that logs thousands of scalars a second.
_WAKE_AT = 4096
_NOT_REAL = {torch.bool, torch.complex32, torch.complex64, torch.complex128}
# A CPU tensor is read at the call: ``.item()`` costs 0.1 us there and waits for nothing. Tests turn
# this off to run, on CPU, the deferred path that device tensors take.
_READ_CPU_TENSORS_AT_CALL = True


def _value(value: Any, tag: str) -> Any:
    """What to record for ``value``: a float, or ``(detached tensor, its version)`` for a device tensor."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            shape = tuple(value.shape)
            raise ValueError(f"value for {tag!r} must be one number, got a tensor of shape {shape}")
        if value.dtype in _NOT_REAL:
            raise TypeError(f"value for {tag!r} must be a real number, got a {value.dtype} tensor")
        if value.is_cpu and _READ_CPU_TENSORS_AT_CALL:
            return value.item()
        # detached: a pending value never holds an autograd graph; inference tensors have no version
        return value.detach(), None if value.is_inference() else tensor_version(value)
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, np.ndarray) and value.size != 1:
        raise ValueError(f"value for {tag!r} must be a number or a one-element array, got shape {value.shape}")
    if isinstance(value, np.ndarray) and value.dtype.kind in "iuf":
        return float(value.item())
    shown = f"{value!r} ({type(value).__name__})"
    raise TypeError(f"value for {tag!r} must be a number or a one-element tensor, got {shown}")


def _step(step: Any) -> int | None:
    if step is None or type(step) is int:
        return step
    if isinstance(step, (bool, np.bool_)) or not hasattr(type(step), "__index__"):
        raise TypeError(f"global_step must be an int or None, got {step!r} ({type(step).__name__})")
    return operator.index(step)


def _wall_time(walltime: Any) -> float:
    return time.time() if walltime is None else check_number(walltime, "walltime")


class _Closed:
    """Stands in for the queue of a closed logger, so a late call fails loudly at no cost to the others."""

    def append(self, record: tuple) -> None:
        raise RuntimeError(f"TensorboardLogger is closed: cannot log {record[0]!r}")


class _Writer:
    """Rank 0's side: the queue, the thread that drains it, and the tensorboardX ``SummaryWriter``.

    Holds no reference to the ``TensorboardLogger``, so a dropped logger is collected and flushed.
    """

    def __init__(self, writer: Any, flush_secs: float, purge_step: int | None, *, comet: bool) -> None:
        from tensorboardX.proto import event_pb2, summary_pb2

        self.writer = writer
        self.queue: collections.deque = collections.deque()
        self.wake = threading.Event()
        self.error: BaseException | None = None
        self._event, self._summary = event_pb2, summary_pb2
        self._lock = threading.RLock()  # RLock: a finalizer may close the logger on this thread
        self._closed = False
        self._pid = os.getpid()  # a forked child never writes nor closes the parent's file
        self._tags: dict[str, str] = {}
        self._changed: set[str] = set()
        # events written straight into tensorboardX's event file skip its process queue; without that
        # writer (write_to_disk=False, comet on, a tensorboardX that moved it) they go through add_scalar
        self._events = None if comet else event_file_writer(writer)
        if purge_step is not None:
            # as SummaryWriter(purge_step=...) does, but written before any of our events
            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            for event in (event_pb2.Event(file_version="brain.Event:2"), event_pb2.Event(session_log=start)):
                event.step = purge_step
                self._put(event)
            writer.purge_step = purge_step
        self._thread = threading.Thread(target=self._run, args=(flush_secs,), name="TensorboardLogger", daemon=True)
        self._thread.start()
        # registered after tensorboardX's own atexit close, so it runs before it (last in, first out)
        atexit.register(self.close)

    def _put(self, event: Any) -> None:
        if self._events is None:
            self.writer.file_writer.add_event(event)
        else:
            if not event.wall_time:
                event.wall_time = time.time()
            self._events.write_event(event)

    def _run(self, flush_secs: float) -> None:
        while not self._closed:
            self.wake.wait(flush_secs)
            self.wake.clear()
            self.flush(raise_error=False)  # an error is raised by the logger's next call

    def flush(self, *, raise_error: bool = True) -> None:
        """Write every pending record and flush the event file; an error is kept for ``raise_error()``."""
        try:
            self._write()
        except Exception as error:
            self.error = error
        if raise_error:
            self.raise_error()

    def _write(self) -> None:
        with self._lock:
            queue = self.queue
            records = [queue.popleft() for _ in range(len(queue))]
            if not records:
                return
            values = self._read([record[1] for record in records], [record[0] for record in records])
            for (tag, _, step, wall_time), value in zip(records, values):
                if self._events is None:
                    self.writer.add_scalar(tag, value, step, walltime=wall_time)
                    continue
                clean = self._tags.get(tag) or self._tags.setdefault(tag, _clean_tag(tag))
                summary = self._summary.Summary(value=[self._summary.Summary.Value(tag=clean, simple_value=value)])
                event = self._event.Event(wall_time=wall_time, summary=summary)
                if step is not None:
                    event.step = step
                self._events.write_event(event)
            self.writer.flush()

    def _read(self, values: list, tags: list[str]) -> list[float]:
        """Floats for ``values``: device tensors read in one stacked copy per device."""
        by_device: dict[torch.device, list[int]] = {}
        for index, value in enumerate(values):
            if type(value) is tuple:
                by_device.setdefault(value[0].device, []).append(index)
        if not by_device:
            return values
        values = list(values)
        with torch.no_grad():
            for indices in by_device.values():
                for index in indices:
                    tensor, version = values[index]
                    if version is not None and tensor_version(tensor) != version and tags[index] not in self._changed:
                        self._changed.add(tags[index])
                        log.warning(
                            "TensorboardLogger: the tensor logged as %r was changed in place before it was written, "
                            "so its later value is logged. Log value.clone() or a number for a tensor you change.",
                            tags[index],
                        )
                read = torch.stack([values[index][0].reshape(()) for index in indices]).cpu().tolist()
                for index, number in zip(indices, read):
                    values[index] = float(number)
        return values

    def raise_error(self) -> None:
        error, self.error = self.error, None
        if error is not None:
            raise RuntimeError("TensorboardLogger: writing the event file failed") from error

    def close(self) -> None:
        with self._lock:
            if self._closed or os.getpid() != self._pid:
                return
            self._closed = True
        atexit.unregister(self.close)
        self.wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        try:
            self.flush(raise_error=False)
        finally:
            self.writer.close()
        self.raise_error()


def _clean_tag(tag: str) -> str:
    from tensorboardX.summary import scalar

    return scalar(tag, 0.0).value[0].tag  # tensorboardX's rule for illegal characters, applied once per tag


class TensorboardLogger:
    """TensorBoard scalars from the training loop at about a microsecond a call, written on global rank 0.

    Calls queue the value with its step and wall time; a background thread writes the events
    every ``flush_secs``, or once 4096 records are pending. A 0-d GPU tensor is read then, with
    the others of its batch, in one copy (no host synchronisation at the call). ``flush()``,
    ``close()``, a ``with`` block, garbage collection and interpreter exit write everything; a
    process killed outright loses at most its last ``flush_secs``. The event files hold what
    ``SummaryWriter.add_scalar`` writes. On other ranks ``writer`` is None and no file is created;
    on rank 0, ``logger.writer`` offers the rest of ``SummaryWriter`` (``add_histogram``, ...).

    Args:
        logdir: folder of the TensorBoard run.
        flush_secs: seconds between writes to the event file (default 120, as tensorboardX).
        **kwargs: passed to ``SummaryWriter`` (``purge_step`` when resuming, ``filename_suffix``, ...).

    Raises:
        TypeError: if ``flush_secs`` is not a number.
        ValueError: if ``flush_secs`` is not positive.

    Example:
        >>> tensorboard = TensorboardLogger("logs/run/tensorboard", purge_step=start_step)
        >>> for step, (x, y) in enumerate(loader, start_step):
        ...     loss = train_step(x, y)
        ...     tensorboard.add_scalar("train/loss", loss.detach(), step)  # no .item(): no sync
        >>> tensorboard.add_metric("valid", {"loss": 0.1, "accuracy": 0.97}, global_step=epoch)
        >>> tensorboard.close()
    """

    def __init__(self, logdir: str | os.PathLike, *, flush_secs: float = 120, **kwargs: Any) -> None:
        flush_secs = check_number(flush_secs, "flush_secs")
        if flush_secs <= 0:
            raise ValueError(f"flush_secs must be > 0, got {flush_secs!r}")
        self.logdir = Path(logdir)
        self.flush_secs = flush_secs
        self.writer: Any = None  # tensorboardX.SummaryWriter on global rank 0, None elsewhere
        self._queue: Any = None
        self._background: _Writer | None = None
        if distributed.is_main_process():
            from tensorboardX import SummaryWriter

            purge_step = _step(kwargs.pop("purge_step", None))
            comet = not (kwargs.get("comet_config") or {"disabled": True}).get("disabled")
            self.writer = SummaryWriter(logdir=str(self.logdir), flush_secs=flush_secs, **kwargs)
            self._background = _Writer(self.writer, flush_secs, purge_step, comet=comet)
            self._queue = self._background.queue
            self._finalizer = weakref.finalize(self, self._background.close)
            self._finalizer.atexit = False  # the writer's own atexit hook runs before tensorboardX's

    def add_scalar(self, tag: str, scalar_value: Any, global_step: int | None = None, walltime: Any = None) -> None:
        """Log one scalar, as ``SummaryWriter.add_scalar``; about 1 us, no host synchronisation.

        Args:
            tag: the curve's name, e.g. ``"train/loss"``.
            scalar_value: a number, or a one-element tensor (on a GPU, read later; do not change it
                in place afterwards, or log ``value.clone()``).
            global_step: the x axis (step or epoch), or None.
            walltime: seconds since the epoch; default the time of this call.

        Raises:
            TypeError: if ``tag`` is not a str, ``scalar_value`` not a real number or
                ``global_step`` not an int.
            ValueError: if ``scalar_value`` has more than one element.
            RuntimeError: if the logger is closed, or writing the event file failed.
        """
        value = scalar_value if type(scalar_value) is float else _value(scalar_value, tag)
        if type(tag) is not str:
            raise TypeError(f"tag must be a str, got {tag!r} ({type(tag).__name__})")
        if global_step is not None and type(global_step) is not int:
            global_step = _step(global_step)
        queue = self._queue
        if queue is not None:
            background = self._background
            if background is not None and background.error is not None:
                background.raise_error()
            queue.append((tag, value, global_step, time.time() if walltime is None else _wall_time(walltime)))
            if len(queue) >= _WAKE_AT:
                background.wake.set()

    def add_metric(self, tag: str, value: Any, global_step: int | None = None) -> None:
        """Log a scalar, or one scalar per key of a dict as ``{tag}/{key}`` (all in this one run).

        Args:
            tag: scalar name, e.g. ``"train/loss"``, or a prefix for a dict.
            value: a number, a one-element tensor, or a dict of them.
            global_step: the x axis (epoch or step). Default None.

        Raises:
            TypeError: if a value is not a number (nothing of the dict is logged then).
            ValueError: if a tensor has more than one element.
        """
        if not isinstance(value, Mapping):
            self.add_scalar(tag, value, global_step)
            return
        if type(tag) is not str:
            raise TypeError(f"tag must be a str, got {tag!r} ({type(tag).__name__})")
        records = [(f"{tag}/{key}", _value(item, f"{tag}/{key}")) for key, item in value.items()]
        step, wall_time = _step(global_step), time.time()
        queue = self._queue
        if queue is not None:
            background = self._background
            if background is not None and background.error is not None:
                background.raise_error()
            for name, item in records:
                queue.append((name, item, step, wall_time))
            if len(queue) >= _WAKE_AT:
                background.wake.set()

    def flush(self) -> None:
        """Write every pending scalar to the event file now (on rank 0; elsewhere a no-op).

        Raises:
            RuntimeError: if writing the event file failed, here or on the background thread.
        """
        if self._background is not None:
            self._background.flush()

    def close(self) -> None:
        """Write everything, close the event file and stop the thread; later calls raise. Idempotent."""
        self._queue = _Closed()
        if self._background is not None:
            self._finalizer.detach()
            self._background.close()

    def __enter__(self) -> TensorboardLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
