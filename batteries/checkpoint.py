"""Checkpoints: build, save crash-safely, load safely, average."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import os
import pickle
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from batteries import distributed
from batteries._async import DEFAULT_WRITER
from batteries._io import atomic_link, atomic_write
from batteries.seed import get_rng_state, set_rng_state

__all__ = [
    "make_checkpoint",
    "save_checkpoint",
    "wait_for_saves",
    "load_checkpoint",
    "average_checkpoints",
    "average_model_state_dicts",
    "unwrap_model",
    "make_training_state",
    "restore_training_state",
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
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside ``nn.DataParallel``, ``DistributedDataParallel`` and ``torch.compile`` wrappers.

    Args:
        model: a bare or wrapped module (wrappers may be nested).

    Returns:
        The innermost module.
    """
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


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


def _strip_prefixes(state_dict: Mapping[str, Any], target_keys: set[str]) -> Mapping[str, Any]:
    """Drop ``module.`` / ``_orig_mod.`` prefixes a wrapped model's state dict carries."""
    while state_dict and not (set(state_dict) & target_keys):
        for prefix in _WRAPPER_PREFIXES:
            if all(key.startswith(prefix) for key in state_dict):
                state_dict = OrderedDict((key[len(prefix) :], value) for key, value in state_dict.items())
                break
        else:
            break
    return state_dict


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


def _load_model(model: nn.Module, checkpoint: Mapping[str, Any], path: Any, strict: bool) -> None:
    target = unwrap_model(model)
    if "model_state_dict" in checkpoint:
        state_dict = checkpoint["model_state_dict"]
    elif all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        state_dict = checkpoint
    else:
        raise KeyError(f"checkpoint '{path}' has no 'model_state_dict' and is not a bare state dict")
    target.load_state_dict(_strip_prefixes(state_dict, set(target.state_dict())), strict=strict)


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
        _load_model(model, checkpoint, path, strict)
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
        state = _strip_prefixes(state, set(sums) or {""})
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


# Keys of the training state next to the standard ones, and the component each one restores.
_STATE_PARTS = {
    "optimizer": "optimizer_state_dict",
    "scheduler": "scheduler_state_dict",
    "scaler": "scaler_state_dict",
    "ema": "ema_state_dict",
    "early_stop": "early_stop_state_dict",
}


def make_training_state(
    model: nn.Module,
    *,
    epoch: int,
    step: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    ema: nn.Module | None = None,
    early_stop: Any | None = None,
    rng_states: list[dict[str, Any]] | None = None,
    stage: Any = "train",
    metrics: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Everything a resume needs, in one checkpoint dict that loads with ``weights_only=True``.

    A :func:`make_checkpoint` dict plus ``step``, ``scaler_state_dict`` (AMP GradScaler),
    ``ema_state_dict``, ``early_stop_state_dict`` and ``rng_states``: the Python, NumPy, torch CPU
    and CUDA RNG states of every rank. Give it to :func:`save_checkpoint` or
    ``CheckpointManager.process`` and restore it with :func:`restore_training_state`. (The
    CheckpointManager keeps its own state in its metrics file, written on every ``process``.)

    Args:
        model: the model, bare or wrapped.
        epoch: the last finished epoch.
        step: optimizer steps taken so far. Default 0.
        optimizer, scheduler, scaler, ema, early_stop: optional components (anything with
            ``state_dict()``); None ones are stored as None.
        rng_states: one :func:`~batteries.get_rng_state` dict per rank, index = rank; under
            ``torch.distributed`` pass ``all_gather(get_rng_state())`` (a collective: call it on every
            rank). Default: ``[get_rng_state()]`` of this process.
        stage: stage name. Default ``"train"``.
        metrics: optional metrics dict.
        **extra: more entries (made safe as in :func:`make_checkpoint`).

    Returns:
        The checkpoint dict.

    Raises:
        ValueError / TypeError: as :func:`make_checkpoint`, or if ``step`` is not an int >= 0.
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    components = {"scaler": scaler, "ema": ema, "early_stop": early_stop}
    return make_checkpoint(
        stage,
        epoch,
        model,
        optimizer,
        scheduler,
        metrics,
        step=int(step),
        **{_STATE_PARTS[name]: None if part is None else part.state_dict() for name, part in components.items()},
        rng_states=[get_rng_state()] if rng_states is None else list(rng_states),
        **extra,
    )


def restore_training_state(
    checkpoint: Mapping[str, Any] | str | os.PathLike,
    model: nn.Module | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    ema: nn.Module | None = None,
    early_stop: Any | None = None,
    manager: Any | None = None,
    restore_rng: bool = True,
    map_location: Any = "cpu",
    strict: bool = True,
) -> dict[str, Any]:
    """Restore what :func:`make_training_state` saved into the components given.

    Every component passed must find its state in the checkpoint; otherwise nothing is loaded and
    a ``KeyError`` lists every missing part. The RNG states of this rank (``get_rank()``) are
    restored when the checkpoint was saved by as many ranks as run now; with another world size
    they cannot match and a warning says so. A ``manager`` is rewound to the checkpoint's epoch
    (records of later epochs, from the run that is being replaced, are forgotten).

    Args:
        checkpoint: the dict :func:`load_checkpoint` returned, or a path to load (``weights_only=True``).
        model, optimizer, scheduler, scaler, ema, early_stop: components to restore; None skips.
        manager: a ``CheckpointManager`` to rewind; None skips.
        restore_rng: restore the RNG states. Default True.
        map_location: for a path. Default ``"cpu"``.
        strict: passed to ``model.load_state_dict``. Default True.

    Returns:
        The checkpoint dict (``epoch``, ``step`` and extras are read from it).

    Raises:
        KeyError: naming every part asked for that the checkpoint lacks.
        FileNotFoundError / RuntimeError / pickle.UnpicklingError: as :func:`load_checkpoint`.
    """
    source: Any = "<checkpoint dict>"
    if not isinstance(checkpoint, Mapping):
        source = checkpoint
        checkpoint = load_checkpoint(checkpoint, map_location=map_location, verbose=False)
    components = {
        "optimizer": optimizer,
        "scheduler": scheduler,
        "scaler": scaler,
        "ema": ema,
        "early_stop": early_stop,
    }
    missing = [
        _STATE_PARTS[name]
        for name, part in components.items()
        if part is not None and checkpoint.get(_STATE_PARTS[name]) is None
    ]
    if model is not None and "model_state_dict" not in checkpoint:
        missing.insert(0, "model_state_dict")
    if restore_rng and not checkpoint.get("rng_states"):
        missing.append("rng_states")
    if manager is not None and "epoch" not in checkpoint:
        missing.append("epoch")
    if missing:
        raise KeyError(f"checkpoint {source} has no state for: {', '.join(missing)}")

    if model is not None:
        _load_model(model, checkpoint, source, strict)
    for name, part in components.items():
        if part is not None:
            part.load_state_dict(checkpoint[_STATE_PARTS[name]])
    if restore_rng:
        rng_states = checkpoint["rng_states"]
        world_size = distributed.get_world_size()
        if len(rng_states) == world_size:
            set_rng_state(rng_states[distributed.get_rank()])
        else:
            warnings.warn(
                f"checkpoint {source} holds RNG states of {len(rng_states)} rank(s) but {world_size} run now: "
                "RNG states not restored, the random streams differ from the saved run's",
                stacklevel=2,
            )
    if manager is not None:
        manager.rewind(checkpoint["epoch"])
    return dict(checkpoint)
