"""Checkpoints: build, save crash-safely, load safely, average."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import os
import pickle
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from batteries._async import DEFAULT_WRITER
from batteries._io import atomic_link, atomic_write
from batteries.model import load_model_state, strip_prefixes, unwrap_model

__all__ = [
    "make_checkpoint",
    "save_checkpoint",
    "wait_for_saves",
    "load_checkpoint",
    "average_checkpoints",
    "average_model_state_dicts",
    "CHECKPOINT_KEYS",
]

CHECKPOINT_KEYS = (
    "stage",
    "epoch",
    "model_state_dict",
    "optimizer_state_dict",
    "scheduler_state_dict",
    "metrics",
)


def _safe(value: Any, where: str) -> Any:
    """Turn ``value`` into something ``torch.load(weights_only=True)`` reads, or raise TypeError."""
    if isinstance(value, np.generic):  # before the int / float check: np.float64 subclasses float
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str, bytes, torch.dtype, torch.device)):
        return value
    if isinstance(value, torch.Tensor):
        value = value.detach()
        return value.item() if value.dim() == 0 else value.cpu()
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError(f"{where}: NumPy arrays of dtype object cannot be saved safely")
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, enum.Enum):
        return _safe(value.value, where)
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
    elif isinstance(value, tuple) and hasattr(value, "_asdict"):  # namedtuple
        value = value._asdict()
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise TypeError(f"{where}: dict key {key!r} of type {type(key).__name__} cannot be saved safely")
            out[key] = _safe(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_safe(item, f"{where}[{index}]") for index, item in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    raise TypeError(
        f"{where}: a value of type {type(value).__name__} has no form that torch.load(weights_only=True) "
        "accepts; convert it to numbers, strings, tensors, lists or dicts"
    )


def make_checkpoint(
    stage: Any,
    epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    metrics: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Collect what a checkpoint holds into one dict that loads with ``weights_only=True``.

    The model is unwrapped first (DataParallel, DDP, ``torch.compile``), so its keys carry no
    ``module.`` prefix. ``metrics`` and ``extra`` values are made safe: NumPy scalars and 0-d tensors
    become Python numbers, NumPy arrays tensors, ``argparse.Namespace`` and dataclasses dicts,
    ``Path`` a str. Extra keys ending in ``state_dict`` (e.g. ``ema_state_dict=ema.state_dict()``)
    are stored unchanged, since state dicts hold 0-d tensors that must stay tensors.

    Args:
        stage: stage name, e.g. ``"stage_0"``.
        epoch: epoch number.
        model: the model, bare or wrapped.
        optimizer: optional optimizer.
        scheduler: optional LR scheduler (anything with ``state_dict()``).
        metrics: optional dict of metrics, e.g. ``{"train": {...}, "valid": {...}}``.
        **extra: more entries, e.g. ``experiment_args=args, model_args=model_args``.

    Returns:
        A dict with keys ``stage``, ``epoch``, ``model_state_dict``, ``optimizer_state_dict``,
        ``scheduler_state_dict``, ``metrics`` (None where not given) and the ``extra`` keys.

    Raises:
        ValueError: if an ``extra`` key clashes with a standard key.
        TypeError: if ``model`` is not an ``nn.Module``, or a metrics / extra value has no safe
            form (the message names its key).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    clashes = sorted(set(extra) & set(CHECKPOINT_KEYS))
    if clashes:
        raise ValueError(f"extra keys {clashes} clash with the standard checkpoint keys {list(CHECKPOINT_KEYS)}")
    checkpoint = {
        "stage": _safe(stage, "stage"),
        "epoch": _safe(epoch, "epoch"),
        "model_state_dict": unwrap_model(model).state_dict(),
        "optimizer_state_dict": None if optimizer is None else optimizer.state_dict(),
        "scheduler_state_dict": None if scheduler is None else scheduler.state_dict(),
        "metrics": _safe(metrics, "metrics"),
    }
    for key, value in extra.items():
        # a state dict keeps its tensors as they are (0-d ones too, e.g. BatchNorm's num_batches_tracked)
        checkpoint[key] = value if key.endswith("state_dict") else _safe(value, key)
    return checkpoint


def save_checkpoint(
    checkpoint: Mapping[str, Any],
    logdir: str | os.PathLike,
    name: str,
    is_best: bool = False,
    is_last: bool = False,
    verbose: bool = False,
    save_fn: Callable[[Any, str], Any] = torch.save,
    *,
    blocking: bool = True,
) -> Path:
    """Write ``checkpoint`` to ``logdir/name`` crash-safely; optionally point best / last at it.

    The file is written to a temporary name in the same folder, flushed and fsynced, moved into
    place with ``os.replace`` and the folder fsynced: at any instant (``kill -9``, power loss)
    ``logdir/name`` is either the previous complete file or the new complete file. ``best.pth`` and
    ``last.pth`` are then replaced the same way by hard links to the written file (copies only
    where the file system has no hard links). If saving fails (disk full, an object ``save_fn``
    cannot write) the error propagates and every existing file is left as it was.

    Args:
        checkpoint: what to save, usually from :func:`make_checkpoint`.
        logdir: folder; created if missing.
        name: file name inside ``logdir``, e.g. ``"exp_3.pth"``.
        is_best: also make ``logdir/best.pth`` this checkpoint. Default False.
        is_last: also make ``logdir/last.pth`` this checkpoint. Default False.
        verbose: print where it was saved. Default False.
        save_fn: ``save_fn(obj, path)`` writes ``obj`` to the file at ``path``. Default ``torch.save``.
        blocking: False to return right after the tensors are copied to CPU memory and write the
            file on a background thread (at most one save in flight: a new one first waits for
            the previous). An error of a background save is raised by the next ``save_checkpoint``
            call or by :func:`wait_for_saves`; the crash-safety guarantees are the same. Default True.

    Returns:
        The path of the (possibly not yet) written file.

    Raises:
        ValueError: if ``name`` is empty or contains a path separator.
        OSError: if the file cannot be written (the previous files are untouched); with
            ``blocking=False``, the previous background save's error.
    """
    if not isinstance(name, str) or not name or os.sep in name or (os.altsep and os.altsep in name):
        raise ValueError(f"name must be a plain file name like 'exp_3.pth', got {name!r}")
    folder = Path(logdir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name

    def write(data: Mapping[str, Any]) -> None:
        atomic_write(path, lambda tmp: save_fn(data, str(tmp)))
        for flag, link_name in ((is_best, "best.pth"), (is_last, "last.pth")):
            if flag and link_name != name:
                atomic_link(path, folder / link_name)
        if verbose:
            print(f"=> saved checkpoint to '{path}'" + (" (best)" if is_best else ""))

    if blocking:
        DEFAULT_WRITER.wait()  # an earlier background save of the same files must not land after this one
        write(checkpoint)
    else:
        DEFAULT_WRITER.submit(checkpoint, write)
    return path


def wait_for_saves() -> None:
    """Block until the background save of ``save_checkpoint(..., blocking=False)`` is written.

    Raises:
        Exception: the error of that save, if it failed.
    """
    DEFAULT_WRITER.wait()


def _torch_load(path: Path, map_location: Any, weights_only: bool) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as error:
        if weights_only and "weights_only" in str(error).lower().replace(" ", "_"):
            raise pickle.UnpicklingError(
                f"refused to load '{path}': it holds objects that weights_only=True does not allow "
                "(arbitrary pickled code could run). If you trust this file, load it with "
                f"load_checkpoint(..., weights_only=False). Details: {error}"
            ) from error
        raise RuntimeError(f"checkpoint file '{path}' is corrupt or not a torch checkpoint: {error}") from error
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise RuntimeError(
            f"checkpoint file '{path}' is truncated, corrupt or not a torch checkpoint: {type(error).__name__}: {error}"
        ) from error


def _load_into(component: Any, checkpoint: Mapping[str, Any], key: str, path: Path) -> None:
    state = checkpoint.get(key)
    if state is None:
        raise KeyError(f"checkpoint '{path}' has no '{key}' to load into the {type(component).__name__} given")
    component.load_state_dict(state)


def load_checkpoint(
    checkpoint_file: str | os.PathLike,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    map_location: Any = "cpu",
    strict: bool = True,
    weights_only: bool = True,
    verbose: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint file and, optionally, its states into a model, optimizer and scheduler.

    The model may be bare or wrapped (DataParallel, DDP, ``torch.compile``) whichever way the
    checkpoint was saved: ``module.`` / ``_orig_mod.`` prefixes are removed as needed. A file that
    holds a bare state dict (no ``model_state_dict`` key) is loaded into ``model`` as is.

    Args:
        checkpoint_file: path of the file.
        model: module to load ``model_state_dict`` into. Default None.
        optimizer: optimizer to load ``optimizer_state_dict`` into. Default None.
        scheduler: scheduler to load ``scheduler_state_dict`` into. Default None.
        map_location: passed to ``torch.load``. Default ``"cpu"``.
        strict: passed to ``model.load_state_dict``. Default True.
        weights_only: refuse pickled objects other than tensors and plain containers, so an
            untrusted file cannot run code. Default True; pass False only for files you trust.
        verbose: print which file was loaded. Default True.

    Returns:
        The checkpoint dict.

    Raises:
        FileNotFoundError: if ``checkpoint_file`` does not exist.
        pickle.UnpicklingError: if ``weights_only=True`` refuses the file's content (the message
            says how to opt out for a trusted file).
        RuntimeError: if the file is truncated or corrupt (the message names the file), or the
            state dict does not match ``model`` with ``strict=True``.
        KeyError: if an optimizer / scheduler is given but the checkpoint has no state for it.
    """
    path = Path(checkpoint_file)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file '{path}' does not exist")
    checkpoint = _torch_load(path, map_location, weights_only)
    if not isinstance(checkpoint, Mapping):
        raise RuntimeError(f"checkpoint file '{path}' holds a {type(checkpoint).__name__}, expected a dict")
    if model is not None:
        load_model_state(model, checkpoint, path, strict)
    if optimizer is not None:
        _load_into(optimizer, checkpoint, "optimizer_state_dict", path)
    if scheduler is not None:
        _load_into(scheduler, checkpoint, "scheduler_state_dict", path)
    if verbose:
        print(f"=> loaded checkpoint '{path}'" + (f" (epoch {checkpoint['epoch']})" if "epoch" in checkpoint else ""))
    return dict(checkpoint)


def average_checkpoints(*files: str | os.PathLike) -> OrderedDict[str, torch.Tensor]:
    """Average the model weights of several checkpoints (checkpoint averaging / SWA-style blending).

    Floating-point tensors are averaged in float64 and cast back; integer tensors (e.g.
    ``num_batches_tracked``) are taken from the last file. The approach follows fairseq's
    ``scripts/average_checkpoints.py``.

    Args:
        *files: checkpoint paths (or one list of paths), each holding ``model_state_dict`` or a
            bare state dict. Loaded on the CPU with ``weights_only=True``.

    Returns:
        A model state dict (keys without wrapper prefixes) to pass to ``model.load_state_dict``.

    Raises:
        ValueError: if no file is given, or the files hold different keys or shapes.
        FileNotFoundError / RuntimeError: as :func:`load_checkpoint`.
    """
    if len(files) == 1 and isinstance(files[0], (list, tuple)):
        files = tuple(files[0])
    if not files:
        raise ValueError("average_checkpoints needs at least one checkpoint file, got none")
    sums: OrderedDict[str, torch.Tensor] = OrderedDict()
    last: Mapping[str, torch.Tensor] = {}
    for index, file in enumerate(files):
        checkpoint = load_checkpoint(file, verbose=False)
        state = checkpoint.get("model_state_dict", checkpoint)
        state = strip_prefixes(state, set(sums) or {""})
        if index == 0:
            for key, value in state.items():
                sums[key] = value.double() if value.is_floating_point() else value
        else:
            if set(state) != set(sums):
                diff = sorted(set(state) ^ set(sums))
                raise ValueError(f"checkpoint '{file}' holds different keys than '{files[0]}': {diff[:5]}")
            for key, value in state.items():
                if value.shape != sums[key].shape:
                    raise ValueError(
                        f"checkpoint '{file}': '{key}' has shape {tuple(value.shape)}, "
                        f"expected {tuple(sums[key].shape)}"
                    )
                if value.is_floating_point():
                    sums[key] += value.double()
        last = state
    averaged: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in sums.items():
        if last[key].is_floating_point():
            averaged[key] = (value / len(files)).to(last[key].dtype)
        else:
            averaged[key] = last[key].clone()
    return averaged


average_model_state_dicts = average_checkpoints
