"""Background writer threads for asynchronous checkpoint saves (at most one save in flight per writer).

A background save's error is never lost. :meth:`AsyncWriter.submit` and :meth:`AsyncWriter.wait`
re-raise it; a job whose outcome no call has seen by interpreter exit is reported then, whichever
writer ran it (the default one of ``save_checkpoint``, a ``CheckpointManager``'s own, or one that
was garbage collected): its traceback is printed to stderr and the process ends with exit status 1.
A child forked (``os.fork``) meanwhile inherits neither the saves in flight nor their errors.
"""

from __future__ import annotations

import atexit
import copy
import os
import sys
import threading
import traceback
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from batteries._compat import atexit_handler_count, run_exit_handlers


def snapshot(obj: Any, buffers: list[torch.Tensor] | None = None) -> Any:
    """A copy of ``obj`` whose tensors are CPU copies and whose containers are new.

    The file written from it stores what ``torch.save(obj)`` at the call would have stored, even if
    training changes the tensors in place right after. Containers keep their type and attributes
    (``copy.copy`` of a dict or list subclass, then its items replaced; tuples and namedtuples
    rebuilt); an ``nn.Parameter`` stays one and a tensor keeps its ``requires_grad``; any other
    object (an ``nn.Module``, a dataclass) is copied whole with ``copy.deepcopy``, its tensors left
    on their device. Tensors that are the same view of the same memory (tied weights) become one
    copy; views that only overlap, and conjugate or negative views, are copied separately.

    Args:
        obj: what to save: nested dicts, lists, tuples, tensors and other objects.
        buffers: the previous snapshot's CPU tensors, in traversal order: a tensor of the same shape
            and dtype is copied into its old buffer. Updated in place. Default None (fresh memory).

    Returns:
        The copy.

    Raises:
        Exception: what ``copy.deepcopy`` raises for an object it cannot copy (e.g. a lock).
    """
    index = 0
    copied: dict[tuple, torch.Tensor] = {}  # (device, address, dtype, shape, stride, conj, neg) -> its copy
    done: dict[int, tuple] = {}  # id of a tensor given -> (it, kept alive so the id stays its own; its snapshot)
    memo: dict[int, Any] = {}  # copy.deepcopy's: an object met twice is copied once

    def copy_tensor(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) in done:
            return done[id(tensor)][1]
        data = tensor.detach()
        if data.layout != torch.strided or data.numel() == 0:
            new = copy_one(data)
        else:
            key = (data.device, data.data_ptr(), data.dtype, data.shape, data.stride(), data.is_conj(), data.is_neg())
            if key not in copied:
                copied[key] = copy_one(data)
            new = copied[key]
        if isinstance(tensor, nn.Parameter):
            new = nn.Parameter(new, requires_grad=tensor.requires_grad)  # a new tensor on the same memory
        elif tensor.requires_grad:
            new = new.detach().requires_grad_()  # not the buffer itself: it is copied into again
        done[id(tensor)] = (tensor, new)
        return new

    def copy_one(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal index
        if buffers is None or tensor.layout != torch.strided:
            return tensor.to("cpu", copy=True)
        index += 1
        return _copy_into(buffers, index - 1, tensor)

    def walk(value: Any) -> Any:
        if type(value) in _IMMUTABLE:
            return value
        if isinstance(value, torch.Tensor):
            return copy_tensor(value)
        if isinstance(value, (dict, list)):
            new = copy.copy(value)  # same type, same attributes (default_factory, _metadata)
            for key in new if isinstance(new, dict) else range(len(new)):
                new[key] = walk(new[key])
            return new
        if isinstance(value, Mapping):
            return {key: walk(item) for key, item in value.items()}
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            return type(value)(*(walk(item) for item in value))
        if isinstance(value, tuple):
            return type(value)(walk(item) for item in value)
        return copy.deepcopy(value, memo)  # a module, a dataclass, any object: training must not change it

    return walk(obj)


_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)


def _copy_into(buffers: list[torch.Tensor], position: int, tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy of ``tensor`` in ``buffers[position]``: the old buffer if shape and dtype match, else new memory."""
    if position < len(buffers) and buffers[position].shape == tensor.shape and buffers[position].dtype == tensor.dtype:
        return buffers[position].copy_(tensor)
    fresh = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu").copy_(tensor)
    if position < len(buffers):
        buffers[position] = fresh
    else:
        buffers.append(fresh)
    return fresh


# Every job whose outcome (its error, if it failed) no caller has seen yet, whichever writer ran it.
# Futures, not writers: the error of a writer that was garbage collected (its owner dropped) is
# still reported at exit; a finished job that succeeded leaves the set at once.
_unreported: set[Future] = set()
_unreported_lock = threading.Lock()


def _forget_if_ok(future: Future) -> None:
    if not future.cancelled() and future.exception() is None:
        with _unreported_lock:
            _unreported.discard(future)


class AsyncWriter:
    """Runs write jobs on one background thread, one at a time.

    :meth:`submit` first waits for the job in flight and re-raises its error, so an error surfaces
    at the next call at the latest; :meth:`wait` surfaces it explicitly. A job whose error no call
    has seen by interpreter exit is reported then (see the module docstring). Snapshots reuse the
    previous snapshot's CPU buffers (it is written by then).
    """

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._lock = threading.Lock()
        self._buffers: list[torch.Tensor] = []
        _writers.add(self)

    def _forget_parents_job(self) -> None:
        """In a child forked from this process: the job in flight and the thread are the parent's, not its own."""
        self._executor, self._pending, self._lock = None, None, threading.Lock()

    def submit(self, obj: Any, job: Callable[[Any], Any]) -> None:
        """Wait for the job in flight (re-raising its error), snapshot ``obj``, run ``job(snapshot)`` behind."""
        with self._lock:
            self._wait_locked()
            data = snapshot(obj, self._buffers)  # the previous job is done: its buffers are free
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batteries-save")
            future = self._executor.submit(job, data)
            with _unreported_lock:
                _unreported.add(future)
            future.add_done_callback(_forget_if_ok)
            self._pending = future
            _run_report_first()

    def wait(self) -> None:
        """Block until the save in flight (if any) is written; re-raise its error."""
        with self._lock:
            self._wait_locked()

    def _wait_locked(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.result()
            finally:
                with _unreported_lock:
                    _unreported.discard(pending)


_writers: weakref.WeakSet[AsyncWriter] = weakref.WeakSet()  # every writer of this process
DEFAULT_WRITER = AsyncWriter()


def _forget_parents_saves() -> None:
    """After ``os.fork``, in the child: the saves in flight and their errors are the parent's to report.

    The child's writers start afresh (the parent's writer threads are not in the child, and a lock a
    thread held at the fork would stay held), so the child exits with its own status, at once.
    """
    global _unreported_lock
    _unreported_lock = threading.Lock()
    _unreported.clear()
    for writer in list(_writers):
        writer._forget_parents_job()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_parents_saves)


def _report_at_exit() -> None:
    """Interpreter exit: print every background save that failed unseen to stderr, then exit with status 1.

    Kept the newest exit handler (the first to run), it runs the other exit handlers once each
    before ``os._exit(1)``; if one was registered after the last submit, some have run already and
    the rest are skipped rather than any run twice. See docs/processes.md.
    """
    if _exiting:  # called again by run_exit_handlers below
        return
    with _unreported_lock:
        futures = list(_unreported)
        _unreported.clear()
    failures = [future.exception() for future in futures if not future.cancelled() and future.exception()]
    if not failures:
        return
    for error in failures:
        print(
            "batteries: a background checkpoint save failed and no later call reported its error "
            "(call wait_for_saves() or manager.close() before the program ends); its file was not written:",
            file=sys.stderr,
        )
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    _exiting.append(True)
    if _newest_registered():
        run_exit_handlers()  # the others, once each: nothing runs after os._exit
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream: nothing to flush
            pass
    os._exit(1)


_exiting: list[bool] = []  # not empty once _report_at_exit is ending the process
_registered_at: list[int | None] = [None]  # the number of exit handlers right after this module registered its own


def _newest_registered() -> bool:
    count = atexit_handler_count()
    return count is not None and count == _registered_at[0]


def _run_report_first() -> None:
    """Make :func:`_report_at_exit` the newest exit handler (the first to run), unless it is already."""
    if _newest_registered():
        return
    atexit.unregister(_report_at_exit)
    atexit.register(_report_at_exit)
    _registered_at[0] = atexit_handler_count()


_run_report_first()
