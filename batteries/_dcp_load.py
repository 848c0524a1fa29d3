"""Load a sharded (DCP) checkpoint's model and optimizer states in place, all or nothing.

The states are read into copies of this rank's current shards first (DCP reshards, so the folder
may come from any number of processes); a misfit or an unreadable shard changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from batteries import _dcp
from batteries._dcp import MODEL, OPTIMIZER


def prepare_load(
    folder: Path,
    metadata: Any,
    model: nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    strict: bool,
    source: str,
) -> Any:
    """Read the model / optimizer states for ``model`` / ``optimizer`` from ``folder`` without changing them.

    The states are read into copies of this rank's current shards (DCP reshards: the folder may
    come from any number of processes); nothing is gathered.

    Returns:
        ``(apply, cancel)``: ``apply()`` loads them (``set_state_dict``); ``cancel()`` undoes what
        reading them did (``get_state_dict`` fills an empty optimizer state with zeros), for a
        restore that fails later. ``(None, None)`` when neither is given.

    Raises:
        ValueError: if ``optimizer`` is given without ``model``.
        RuntimeError: naming the part, if the saved states do not fit (other names, other shapes,
            another optimizer class) or a file cannot be read; nothing is changed then.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    if model is None and optimizer is None:
        return None, None
    if model is None:
        raise ValueError("restoring an optimizer from a sharded checkpoint needs its model (states are keyed by name)")
    had_state = optimizer is not None and bool(optimizer.state)

    def cancel() -> None:
        if optimizer is not None and not had_state:
            optimizer.state.clear()  # as it was: get_state_dict filled it with zeros

    try:
        # get_state_dict may initialise an empty optimizer state (cancel empties it again)
        current = _dcp.model_and_optimizer_states(model, optimizer)
        target = {key: _copy_tensors(value) for key, value in current.items()}
        flat = _dcp.flat_items(target, metadata)
        for part in target:
            given = type(model if part == MODEL else optimizer).__name__
            _check_fit(flat, metadata.state_dict_metadata, part, strict or part == OPTIMIZER, source, given)
        _read_into(folder, target, source)
    except BaseException:
        cancel()
        raise
    options = StateDictOptions(strict=strict)

    def apply() -> None:
        if optimizer is None:
            set_model_state_dict(model, target[MODEL], options=options)
        else:
            set_state_dict(
                model, optimizer, model_state_dict=target[MODEL], optim_state_dict=target[OPTIMIZER], options=options
            )

    return apply, cancel


def _check_fit(flat: dict[str, Any], saved: dict[str, Any], part: str, exact: bool, source: str, given: str) -> None:
    """Raise ``RuntimeError`` if the saved ``part`` has other keys (``exact``: extra ones too) or shapes."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    what = part.removesuffix("_state_dict")
    wanted = {key for key in flat if key.startswith(f"{part}.")}
    present = {key for key in saved if key.startswith(f"{part}.")}
    missing, unexpected = sorted(wanted - present), sorted(present - wanted)
    if missing or (unexpected and exact):
        shown = "; ".join(
            f"{name} {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}"
            for name, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        )
        raise RuntimeError(
            f"the {what} state in {source} does not fit the {given} given: {shown}. Nothing was restored."
        )
    for key in wanted:
        value, item = flat[key], saved[key]
        is_tensor = isinstance(value, torch.Tensor)
        mine = tuple(value.shape) if is_tensor else "a non-tensor"  # a DTensor's shape is the global one
        theirs = tuple(item.size) if isinstance(item, TensorStorageMetadata) else "a non-tensor"
        if is_tensor != isinstance(item, TensorStorageMetadata) or (is_tensor and mine != theirs):
            raise RuntimeError(
                f"the {what} state in {source} does not fit: {key!r} is {theirs} in the checkpoint, {mine} here. "
                "Nothing was restored."
            )


def _read_into(folder: Path, target: dict[str, Any], source: str) -> None:
    try:
        _dcp.load(folder, target, flatten=True)
    except Exception as error:
        raise RuntimeError(
            f"sharded checkpoint {source} cannot be read: {type(error).__name__}: {error}. Nothing was restored."
        ) from error


def _copy_tensors(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, Mapping):
        return {key: _copy_tensors(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy_tensors(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_copy_tensors(item) for item in value)
    return value
