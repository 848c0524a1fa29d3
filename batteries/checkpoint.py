"""Checkpoints: build, save crash-safely, load safely, average."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from batteries import distributed
from batteries._async import DEFAULT_WRITER
from batteries._checks import check_file_name
from batteries._io import atomic_link, atomic_write
from batteries._read import torch_load
from batteries._safe import make_safe
from batteries._states import find_state, load_states, missing_states_error, state_parts  # resume.py imports some
from batteries.model import strip_prefixes, unwrap_model

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

_safe = make_safe  # the name batteries/_dcp.py imports from here


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
    ``module.`` prefix. Every value is converted to a form a safe load reads (NumPy numbers,
    ``argparse.Namespace``, dataclasses, enums, paths, ...; docs/checkpoint-files.md lists them).
    In ``metrics`` and ``extra`` values 0-d tensors become numbers; in state dicts (the model's,
    optimizer's, scheduler's and ``extra`` keys ending in ``state_dict``) tensors stay tensors.

    Args:
        stage: stage name, e.g. ``"stage_0"``.
        epoch: epoch number.
        model: the model, bare or wrapped.
        optimizer: optional optimizer.
        scheduler: optional LR scheduler (anything with ``state_dict()``).
        metrics: optional dict of metrics, e.g. ``{"train": {...}, "valid": {...}}``.
        **extra: more entries, e.g. ``experiment_args=args, ema_state_dict=ema.state_dict()``.

    Returns:
        A dict with keys ``stage``, ``epoch``, ``model_state_dict``, ``optimizer_state_dict``,
        ``scheduler_state_dict``, ``metrics`` and the ``extra`` keys; the key of a component not
        given (None) is left out.

    Raises:
        ValueError: if an ``extra`` key clashes with a standard key.
        TypeError: if ``model`` is not an ``nn.Module``, or a value has no form that
            ``torch.load(weights_only=True)`` reads (e.g. a NumPy str array, a tensor subclass,
            an arbitrary object); the message names its key path.

    Example:
        >>> save_checkpoint(make_checkpoint("stage_0", epoch, model, optimizer), logdir, f"exp_{epoch}")
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    clashes = sorted(set(extra) & set(CHECKPOINT_KEYS))
    if clashes:
        raise ValueError(f"extra keys {clashes} clash with the standard checkpoint keys {list(CHECKPOINT_KEYS)}")
    checkpoint = {
        "stage": make_safe(stage, "stage"),
        "epoch": make_safe(epoch, "epoch"),
        "model_state_dict": make_safe(unwrap_model(model).state_dict(), "model_state_dict", state=True),
    }
    if optimizer is not None:
        checkpoint["optimizer_state_dict"] = make_safe(optimizer.state_dict(), "optimizer_state_dict", state=True)
    if scheduler is not None:
        checkpoint["scheduler_state_dict"] = make_safe(scheduler.state_dict(), "scheduler_state_dict", state=True)
    if metrics is not None:
        checkpoint["metrics"] = make_safe(metrics, "metrics")
    for key, value in extra.items():
        checkpoint[key] = make_safe(value, key, state=key.endswith("state_dict"))
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
    """Write ``checkpoint`` to ``logdir/name`` crash-safely on global rank 0; optionally point best / last at it.

    A temporary file is written, fsynced and moved into place (``os.replace``), so ``logdir/name``
    is at any instant the previous or the new complete file; ``best.pth`` / ``last.pth`` become
    hard links to it (copies where the file system has none). On other ranks the call only checks
    ``name`` and returns the path: no file, no collective.

    Args:
        checkpoint: what to save, usually from :func:`make_checkpoint`.
        logdir: folder; created if missing.
        name: file name inside ``logdir``, e.g. ``"exp_3.pth"``; ``.pth`` is appended to a name
            without it.
        is_best: also make ``logdir/best.pth`` this checkpoint. Default False.
        is_last: also make ``logdir/last.pth`` this checkpoint. Default False.
        verbose: print where it was saved. Default False.
        save_fn: ``save_fn(obj, path)`` writes ``obj`` to the file at ``path``. Default ``torch.save``.
        blocking: False to return once the tensors are copied to CPU memory and write on a
            background thread (one save in flight at most); its error is raised by the next call
            or :func:`wait_for_saves`, else printed at exit (exit status 1). Default True.

    Returns:
        The path of the (possibly not yet, or on other ranks never) written file.

    Raises:
        TypeError: if ``name`` is not a str.
        ValueError: if ``name`` is not a plain file name (empty, ``"."``, ``".."``, a path separator).
        OSError: if the file cannot be written (e.g. ``ENOSPC``), naming the file; the previous
            files are untouched. With ``blocking=False``, the previous background save's error.
    """
    name = check_file_name(name, "name")
    if not name.endswith(".pth"):
        name = check_file_name(f"{name}.pth", "name")
    folder = Path(logdir)
    path = folder / name
    if distributed.get_rank() != 0:
        return path
    folder.mkdir(parents=True, exist_ok=True)

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

    The model may be bare or wrapped whichever way the checkpoint was saved (``module.`` /
    ``_orig_mod.`` prefixes are matched). All or nothing: if a state is missing or does not fit, no
    component is changed. Each state is looked for in this order (docs/checkpoint-files.md):
    model: ``model_state_dict``, ``state_dict``, ``model`` (the last two only if they map names to
    tensors), then the file itself if it is a bare state dict; optimizer: ``optimizer_state_dict``,
    ``optimizer``; scheduler: ``scheduler_state_dict``, ``scheduler``.

    Args:
        checkpoint_file: path of the file.
        model, optimizer, scheduler: components to load into; None skips one. Default None.
        map_location: passed to ``torch.load``. Default ``"cpu"``.
        strict: passed to ``model.load_state_dict``; with False the keys it skipped are logged as a
            warning. Default True.
        weights_only: refuse pickled objects other than tensors and plain containers, so an
            untrusted file cannot run code. Default True; pass False only for files you trust.
        verbose: print which file was loaded. Default True.

    Returns:
        The checkpoint dict.

    Raises:
        FileNotFoundError / IsADirectoryError: if ``checkpoint_file`` does not exist / is a folder.
        pickle.UnpicklingError: if ``weights_only=True`` refuses the file's content (the message
            lists what it refused and says how to opt out for a trusted file).
        ValueError: if the file loads on the CPU but not with ``map_location``.
        RuntimeError: if the file is not a torch checkpoint (git-lfs pointer, HTML page, plain
            pickle, ...), is truncated or corrupt, or a state does not fit its component.
        KeyError: naming every component given whose state the file lacks, and the keys it holds.
    """
    path = Path(checkpoint_file)
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint file '{path}' is a directory, not a checkpoint file")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file '{path}' does not exist")
    checkpoint = torch_load(path, map_location, weights_only)
    if not isinstance(checkpoint, Mapping):
        raise RuntimeError(f"checkpoint file '{path}' holds a {type(checkpoint).__name__}, expected a dict")
    components = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    parts, missing = state_parts(checkpoint, components, f"'{path}'")
    if missing:
        raise missing_states_error(f"'{path}'", missing, checkpoint, "nothing was loaded")
    load_states(parts, f"'{path}'", strict)
    if verbose:
        print(f"=> loaded checkpoint '{path}'" + (f" (epoch {checkpoint['epoch']})" if "epoch" in checkpoint else ""))
    return dict(checkpoint)


def average_checkpoints(*files: str | os.PathLike) -> OrderedDict[str, torch.Tensor]:
    """Average the model weights of several checkpoints (checkpoint averaging / SWA-style blending).

    Floating-point tensors are averaged in float64 and cast back; integer tensors (e.g.
    ``num_batches_tracked``) are taken from the last file. The approach follows fairseq's
    ``scripts/average_checkpoints.py``.

    Args:
        *files: checkpoint paths (or one list of paths), each holding a model state where
            :func:`load_checkpoint` finds it (``model_state_dict``, ...) or a bare state dict.
            Loaded on the CPU with ``weights_only=True``.

    Returns:
        A model state dict (keys without wrapper prefixes) to pass to ``model.load_state_dict``.

    Raises:
        ValueError: if no file is given, or the files hold different keys or shapes.
        KeyError: if a file holds no model state.
        FileNotFoundError / RuntimeError: as :func:`load_checkpoint`.
    """
    return _average(files, keep_first=False)[0]


def average_model_state_dicts(*files: str | os.PathLike) -> dict[str, Any]:
    """The original toolkit's averaging: the first checkpoint, its model state replaced by the average.

    Averages as :func:`average_checkpoints` does. The model state is replaced under the key it was
    found under (``model_state_dict`` in this toolkit's files); a bare state dict file gives
    ``{"model_state_dict": averaged}``.

    Args:
        *files: checkpoint paths (or one list of paths), as for :func:`average_checkpoints`.

    Returns:
        The first file's checkpoint dict, with the averaged model state.

    Raises:
        ValueError, KeyError, FileNotFoundError, RuntimeError: as :func:`average_checkpoints`.

    Example:
        >>> averaged = average_model_state_dicts("exp_8.pth", "exp_9.pth", "exp_10.pth")
        >>> model.load_state_dict(averaged["model_state_dict"])
    """
    averaged, first, key = _average(files, keep_first=True)
    return {**first, key or "model_state_dict": averaged}


def _average(
    files: tuple[Any, ...], keep_first: bool
) -> tuple[OrderedDict[str, torch.Tensor], Mapping[str, Any], str | None]:
    """``(averaged model state, first checkpoint or {}, the key of its model state or None)``."""
    if len(files) == 1 and isinstance(files[0], (list, tuple)):
        files = tuple(files[0])
    if not files:
        raise ValueError("average_checkpoints needs at least one checkpoint file, got none")
    sums: OrderedDict[str, torch.Tensor] = OrderedDict()
    last: Mapping[str, torch.Tensor] = {}
    first: Mapping[str, Any] = {}
    first_key = None
    for index, file in enumerate(files):
        checkpoint = load_checkpoint(file, verbose=False)
        found = find_state(checkpoint, "model")
        if found is None:
            raise missing_states_error(f"'{file}'", ["model_state_dict"], checkpoint, "nothing was averaged")
        state = strip_prefixes(found[1], set(sums) or {""})
        if index == 0:
            first_key = found[0]
            first = checkpoint if keep_first and first_key is not None else {}  # a bare state dict: nothing else
            for key, value in state.items():  # a copy: tied float64 tensors are one object
                sums[key] = value.to(torch.float64, copy=True) if value.is_floating_point() else value
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
    return averaged, first, first_key
