"""Checkpoints: build, save crash-safely, load safely, average."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import enum
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from batteries import distributed
from batteries._async import DEFAULT_WRITER, snapshot
from batteries._checks import check_file_name
from batteries._io import atomic_link, atomic_write
from batteries.model import model_state_for, strip_prefixes, unwrap_model

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


_PLAIN = (type(None), bool, int, float, str, bytes, torch.dtype, torch.device)  # load with weights_only=True


def _safe(value: Any, where: str, state: bool = False) -> Any:
    """``value`` in a form ``torch.load(weights_only=True)`` reads back, or TypeError naming ``where``.

    NumPy scalars become Python numbers, NumPy arrays tensors, mappings dicts (an ``OrderedDict``
    inside a state dict stays one, with the ``_metadata`` that ``load_state_dict`` reads),
    ``argparse.Namespace`` / dataclasses / namedtuples dicts, enums their value, paths strs.
    ``state=True`` for a state dict: tensors stay as they are (0-d ones too, e.g. an optimizer's
    ``step``); elsewhere (metrics, extras) 0-d tensors become Python numbers and tensors move to the CPU.
    """
    if type(value) in _PLAIN:
        return value
    if isinstance(value, torch.Tensor):
        if type(value) not in (torch.Tensor, nn.Parameter):
            raise TypeError(
                f"{where}: a tensor of the subclass {type(value).__name__}, which torch.load(weights_only=True) "
                "refuses; save value.as_subclass(torch.Tensor) instead"
            )
        if state:
            return value
        value = value.detach()
        return value.item() if value.dim() == 0 else value.cpu()
    if isinstance(value, np.generic):  # before the int / float check: np.float64 subclasses float
        item = value.item()
        if isinstance(item, np.generic):  # e.g. np.longdouble: no Python type holds it
            raise TypeError(f"{where}: a NumPy {value.dtype} scalar has no Python form that a safe load reads")
        return _safe(item, where, state)
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biufc":  # str, bytes, datetime64, timedelta64, object, structured
            raise TypeError(
                f"{where}: a NumPy array of dtype {value.dtype} has no form that torch.load(weights_only=True) "
                "reads; convert it to numbers or a list of strs"
            )
        if not value.dtype.isnative:
            value = value.astype(value.dtype.newbyteorder("="))
        try:
            tensor = torch.from_numpy(np.ascontiguousarray(value))
        except TypeError as error:  # a dtype torch has no tensors of (e.g. float128)
            raise TypeError(f"{where}: a NumPy array of dtype {value.dtype} cannot become a tensor: {error}") from None
        return _safe(tensor, where, state)
    if isinstance(value, enum.Enum):
        return _safe(value.value, where, state)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    for plain in (int, float, str, bytes):  # a subclass of a plain type (not an enum): the plain value
        if isinstance(value, plain):
            return plain(value)
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
    elif isinstance(value, tuple) and hasattr(value, "_asdict"):  # namedtuple
        value = value._asdict()
    if isinstance(value, Mapping):
        keep = state and isinstance(value, OrderedDict)
        out: dict[Any, Any] = OrderedDict() if keep else {}
        for key, item in value.items():
            safe_key = key.item() if isinstance(key, np.generic) else key
            if type(safe_key) not in (str, int, float, bool, type(None)):
                raise TypeError(f"{where}: dict key {key!r} of type {type(key).__name__} cannot be saved safely")
            out[safe_key] = _safe(item, f"{where}[{key!r}]", state)
        if keep and isinstance(getattr(value, "_metadata", None), Mapping):
            out._metadata = _safe(value._metadata, f"{where}._metadata")  # type: ignore[attr-defined]
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_safe(item, f"{where}[{index}]", state) for index, item in enumerate(value)]
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
    ``module.`` prefix. Every value is made safe to load, so that nothing is written that a load
    then refuses: NumPy scalars become Python numbers, NumPy arrays tensors, ``argparse.Namespace``,
    dataclasses and namedtuples dicts, enums their value, ``Path`` a str. In ``metrics`` and the
    ``extra`` values 0-d tensors become Python numbers; in state dicts (the model's, optimizer's,
    scheduler's and ``extra`` keys ending in ``state_dict``, e.g. ``ema_state_dict=ema.state_dict()``)
    tensors stay tensors (0-d ones too, e.g. an optimizer's ``step``) and an ``OrderedDict`` keeps
    its ``_metadata``; a NumPy learning rate in ``param_groups`` becomes a Python float.

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
        ``scheduler_state_dict``, ``metrics`` and the ``extra`` keys. The key of a component not
        given (None) is left out, as the original toolkit did: ``"scheduler_state_dict" in
        checkpoint`` says whether it holds one.

    Raises:
        ValueError: if an ``extra`` key clashes with a standard key.
        TypeError: if ``model`` is not an ``nn.Module``, or a value (in a state dict too) has no
            form that ``torch.load(weights_only=True)`` reads, e.g. a NumPy str or datetime64
            array, a tensor subclass other than ``nn.Parameter`` or an arbitrary object; the
            message names its key path.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    clashes = sorted(set(extra) & set(CHECKPOINT_KEYS))
    if clashes:
        raise ValueError(f"extra keys {clashes} clash with the standard checkpoint keys {list(CHECKPOINT_KEYS)}")
    checkpoint = {
        "stage": _safe(stage, "stage"),
        "epoch": _safe(epoch, "epoch"),
        "model_state_dict": _safe(unwrap_model(model).state_dict(), "model_state_dict", state=True),
    }
    if optimizer is not None:
        checkpoint["optimizer_state_dict"] = _safe(optimizer.state_dict(), "optimizer_state_dict", state=True)
    if scheduler is not None:
        checkpoint["scheduler_state_dict"] = _safe(scheduler.state_dict(), "scheduler_state_dict", state=True)
    if metrics is not None:
        checkpoint["metrics"] = _safe(metrics, "metrics")
    for key, value in extra.items():
        checkpoint[key] = _safe(value, key, state=key.endswith("state_dict"))
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

    The file is written to a temporary name in the same folder, flushed and fsynced, moved into
    place with ``os.replace`` and the folder fsynced: at any instant (``kill -9``, power loss)
    ``logdir/name`` is either the previous complete file or the new complete file. ``best.pth`` and
    ``last.pth`` are then replaced the same way by hard links to the written file (copies only
    where the file system has no hard links). If saving fails (disk full, an object ``save_fn``
    cannot write) the error propagates and every existing file is left as it was.

    Only global rank 0 (``batteries.distributed.get_rank()``) writes; on other ranks the call
    checks ``name`` and returns the path without touching the folder and without any collective,
    so calling it on every rank and calling it under ``if rank == 0`` are both right.

    Args:
        checkpoint: what to save, usually from :func:`make_checkpoint`.
        logdir: folder; created if missing.
        name: file name inside ``logdir``, e.g. ``"exp_3.pth"``; ``.pth`` is appended to a name
            without it (``"exp_3"`` writes ``exp_3.pth``), as the original toolkit did.
        is_best: also make ``logdir/best.pth`` this checkpoint. Default False.
        is_last: also make ``logdir/last.pth`` this checkpoint. Default False.
        verbose: print where it was saved. Default False.
        save_fn: ``save_fn(obj, path)`` writes ``obj`` to the file at ``path``. Default ``torch.save``.
        blocking: False to return right after the tensors are copied to CPU memory and write the
            file on a background thread (at most one save in flight: a new one first waits for
            the previous). An error of a background save is raised by the next ``save_checkpoint``
            call or by :func:`wait_for_saves`; one that no call reported is printed at interpreter
            exit, which then ends with exit status 1. The crash-safety guarantees are the same.
            Default True.

    Returns:
        The path of the (possibly not yet, or on other ranks never) written file.

    Raises:
        TypeError: if ``name`` is not a str.
        ValueError: if ``name`` is not a plain file name (empty, ``"."``, ``".."``, a path separator).
        OSError: if the file cannot be written, e.g. ``ENOSPC`` / ``EFBIG`` for a full disk, naming
            the file (the previous files are untouched); with ``blocking=False``, the previous
            background save's error.
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


def _not_a_checkpoint(path: Path) -> str | None:
    """What the file is instead of a torch checkpoint, told from its first bytes; None if it may be one."""
    with open(path, "rb") as file:
        head = file.read(512)
    if not head:
        return "an empty file"
    if head.startswith(b"version https://git-lfs.github.com/spec/"):
        return "a git-lfs pointer, not the file itself (fetch the file with `git lfs pull`)"
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in text:
        return "an HTML page (a download that saved a web page, e.g. an error or login page, instead of the file)"
    if head.startswith(b"PK\x03\x04") or zipfile.is_zipfile(path) or _LEGACY_MAGIC in head[:32]:
        return None  # torch.save's zip archive (maybe truncated), or its legacy format
    if head.startswith(b"\x80"):
        return "a pickle file, not a checkpoint written by torch.save"
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy .npy file (load it with numpy.load), not a checkpoint written by torch.save"
    return "not a checkpoint written by torch.save (neither a zip archive nor torch's legacy format)"


# How torch.save's legacy format begins: its magic number, pickled (LONG1, 10 bytes), after the protocol header.
_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")

# torch's advice to load with weights_only=False, which its errors carry whatever went wrong
_RERUN_ADVICE = re.compile(
    r"This file can still be loaded, to do so you have two options.*?WeightsUnpickler error: "
    r"|In PyTorch 2\.6, we changed the default value of the `weights_only` argument.*?trusted source\.",
    re.DOTALL,
)


_REFUSED_MARKS = ("GLOBAL", "add_safe_globals", "allowlist", "unsupported class", "unrecognized function")


def _torch_load(path: Path, map_location: Any, weights_only: bool) -> Any:
    instead = _not_a_checkpoint(path)
    if instead is not None:
        raise RuntimeError(f"checkpoint file '{path}' is not a torch checkpoint: it is {instead}")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except (FileNotFoundError, MemoryError):
        raise
    except Exception as error:
        details = _RERUN_ADVICE.sub("", str(error)).strip()  # only our own advice below, where it applies
        message = f"{type(error).__name__}: {details}"
        if weights_only and isinstance(error, pickle.UnpicklingError) and any(m in str(error) for m in _REFUSED_MARKS):
            raise pickle.UnpicklingError(
                f"refused to load '{path}': it holds objects that weights_only=True does not allow "
                "(arbitrary pickled code could run). If you trust this file, load it with "
                f"load_checkpoint(..., weights_only=False). Details: {details}"
            ) from error
        if map_location is not None and str(map_location) != "cpu" and _loads_on_cpu(path, weights_only):
            raise ValueError(
                f"map_location={map_location!r} cannot be used here to load '{path}' (the file itself loads "
                f"with map_location='cpu'): {message}"
            ) from error
        raise RuntimeError(
            f"checkpoint file '{path}' is truncated, corrupt or not a torch checkpoint: {message}"
        ) from error


def _loads_on_cpu(path: Path, weights_only: bool) -> bool:
    """Whether the file loads with ``map_location="cpu"`` (memory-mapped where the format allows)."""
    for mmap in (True, False):
        try:
            torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
            return True
        except Exception:  # noqa: BLE001 - only the answer matters
            continue
    return False


def _undo_for(component: Any) -> Callable[[], None]:
    """A function that gives ``component`` back the state it has now (see :func:`load_states`)."""
    if isinstance(component, nn.Module):
        module = unwrap_model(component)
        saved = snapshot(module.state_dict())  # CPU copies: loading copies into the same tensors
        return lambda: module.load_state_dict(saved)
    if isinstance(component, torch.optim.Optimizer):
        saved = component.state_dict()  # a load replaces the state tensors, never writes into them
        return lambda: component.load_state_dict(saved)
    saved = copy.deepcopy(component.state_dict())
    attributes = dict(vars(component)) if hasattr(component, "__dict__") else None

    def undo() -> None:
        if attributes is not None:  # a scheduler's load adds the saved keys as attributes
            vars(component).clear()
            vars(component).update(attributes)
        component.load_state_dict(saved)

    return undo


def _load_one(component: Any, state: Any, strict: bool) -> None:
    """Load ``state`` into ``component``; ValueError if it visibly belongs to something else."""
    if isinstance(component, nn.Module):
        unwrap_model(component).load_state_dict(state, strict=strict)
    elif isinstance(component, torch.optim.Optimizer):
        _check_state_shapes(component, state)
        before = [set(group) for group in component.param_groups]
        component.load_state_dict(state)
        lacking = sorted(set().union(*before) - set().union(*map(set, component.param_groups)))
        if lacking:
            raise ValueError(f"its param_groups lack {lacking} (saved by another optimizer class?)")
    else:
        if isinstance(state, Mapping):  # e.g. StepLR's state into a CosineAnnealingLR
            own = component.state_dict()
            lacking = sorted(k for k in own if isinstance(k, str) and not k.startswith("_") and k not in state)
            if lacking:
                raise ValueError(f"it lacks {lacking} (saved by another class?)")
        component.load_state_dict(state)


def _check_state_shapes(optimizer: torch.optim.Optimizer, state: Any) -> None:
    """Check that the tensors of each parameter's saved state have that parameter's shape.

    ``Optimizer.load_state_dict`` pairs the saved parameters with the optimizer's by position and
    compares only their numbers, so the state of other layers would load and the next step fail or
    train wrongly. A tensor with as many dims as its parameter (``exp_avg``, ``momentum_buffer``)
    must have its shape, dims of size 1 excepted (factored states: Adafactor's ``row_var``), unless
    it is flat with as many elements as the group's parameters together (LBFGS's ``d``); 0-d
    tensors (``step``) and others are not checked. A state of another structure is left to
    ``load_state_dict`` to refuse.

    Raises:
        ValueError: naming the state, the parameter and both shapes, for the first misfit.
    """
    try:
        saved_groups, per_parameter = state["param_groups"], state["state"]
        if len(saved_groups) != len(optimizer.param_groups) or not isinstance(per_parameter, Mapping):
            return  # load_state_dict refuses it
        for index, (saved, group) in enumerate(zip(saved_groups, optimizer.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                return  # load_state_dict refuses it
            flat = sum(param.numel() for param in group["params"])
            for number, (saved_id, param) in enumerate(zip(saved["params"], group["params"])):
                entry = per_parameter.get(saved_id)
                for key, value in entry.items() if isinstance(entry, Mapping) else ():
                    if not isinstance(value, torch.Tensor) or not value.dim() == param.dim() > 0:
                        continue
                    if value.dim() == 1 and value.numel() == flat:
                        continue
                    if any(size not in (expected, 1) for size, expected in zip(value.shape, param.shape)):
                        raise ValueError(
                            f"the saved {key!r} of parameter {number} of param_groups[{index}] has shape "
                            f"{tuple(value.shape)}, the parameter {tuple(param.shape)}"
                        )
    except (TypeError, KeyError):
        return  # a state of another structure: load_state_dict refuses it


def load_states(parts: list[tuple[str, Any, Any]], source: Any, strict: bool = True) -> None:
    """Load each ``(name, component, state)`` of ``parts``: all of them or none.

    A state that does not fit its component (another optimizer class, other keys or shapes) raises
    one error naming the component and the mismatch, after every component was given back the
    state it had before the call (modules through CPU copies of their tensors).

    Args:
        parts: ``(name, component, state)`` triples, loaded in this order; ``name`` is for messages.
        source: where the states came from, for messages.
        strict: passed to ``load_state_dict`` of the part named ``"model"`` (the others load strictly).

    Raises:
        RuntimeError: if a state does not fit its component; nothing is changed then.
    """
    undo: list[Callable[[], None]] = []
    try:
        for name, component, state in parts:
            undo.append(_undo_for(component))
            try:
                _load_one(component, state, strict if name == "model" else True)
            except Exception as error:
                raise RuntimeError(
                    f"the {name} state in {source} does not fit the {type(component).__name__} given: "
                    f"{type(error).__name__}: {str(error).rstrip('.')}. Nothing was restored."
                ) from error
    except BaseException:
        for restore in reversed(undo):
            restore()
        raise


def state_parts(
    checkpoint: Mapping[str, Any], components: Mapping[str, Any], source: Any
) -> tuple[list[tuple[str, Any, Any]], list[str]]:
    """The ``(name, component, state)`` of every component given (modules last), and the missing states' keys.

    ``components`` maps a name to a component or None (skipped); the state of ``name`` is
    ``checkpoint[f"{name}_state_dict"]``, the model's as :func:`~batteries.model.model_state_for` finds it.
    """
    parts, missing = [], []
    for name, component in components.items():
        if component is None:
            continue
        if name == "model":
            try:
                parts.append((name, component, model_state_for(component, checkpoint, source)))
            except KeyError:
                missing.append("model_state_dict")
        elif checkpoint.get(f"{name}_state_dict") is None:
            missing.append(f"{name}_state_dict")
        else:
            parts.append((name, component, checkpoint[f"{name}_state_dict"]))
    return sorted(parts, key=lambda part: isinstance(part[1], nn.Module)), missing  # cheap to undo first


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
    holds a bare state dict (no ``model_state_dict`` key) is loaded into ``model`` as is. Loading
    is all or nothing: if a state is missing or does not fit, no component is changed.

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
        IsADirectoryError: if it is a folder.
        pickle.UnpicklingError: if ``weights_only=True`` refuses the file's content (the message
            says how to opt out for a trusted file).
        ValueError: if the file loads on the CPU but not with ``map_location``.
        RuntimeError: if the file is not a torch checkpoint (a git-lfs pointer, an HTML page, a
            plain pickle, a NumPy or JSON file: anything ``torch.save`` did not write), is
            truncated or corrupt (the message names the file), or a state does not fit its
            component (the message names the component; nothing is loaded).
        KeyError: naming every component given whose state the checkpoint lacks (nothing is loaded).
    """
    path = Path(checkpoint_file)
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint file '{path}' is a directory, not a checkpoint file")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file '{path}' does not exist")
    checkpoint = _torch_load(path, map_location, weights_only)
    if not isinstance(checkpoint, Mapping):
        raise RuntimeError(f"checkpoint file '{path}' holds a {type(checkpoint).__name__}, expected a dict")
    components = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    parts, missing = state_parts(checkpoint, components, f"'{path}'")
    if missing:
        raise KeyError(f"checkpoint '{path}' has no state for: {', '.join(missing)} (nothing was loaded)")
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
