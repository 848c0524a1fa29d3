"""The values of a sharded checkpoint, written so that DCP gives them back as they were given.

DCP flattens nested dicts into leaves keyed by ``str(key)`` and unflattens them into plain dicts:
int keys would come back as strs, an empty dict and an ``OrderedDict``'s type would vanish. The
entries rank 0 writes (all but the model and optimizer states) are encoded here before the write
and decoded after the read; a value that cannot come back exactly is refused before any rank
writes. docs/checkpoint-manager.md says more.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from batteries._safe import _KEYS, _PLAIN, make_safe

__all__ = ["encode", "decode", "check_keys", "state_leaves", "check_flat_keys"]

_MARK = "batteries: "  # the start of every marker: a value of the caller's starting so is refused
_EMPTY_DICT = (f"{_MARK}an empty dict",)  # an empty dict (DCP would keep nothing of it)
_WHOLE = f"{_MARK}a value stored whole"  # (_WHOLE, value): a dict with other keys than strs, or an empty OrderedDict
_ORDER = f"{_MARK}OrderedDict"  # key of an OrderedDict's encoding: (_ORDER, its keys in order, its _metadata)


def encode(value: Any, where: str) -> Any:
    """``value`` (an entry other than the model / optimizer states) in a form DCP gives back exactly.

    Raises:
        TypeError: for a value of another type than ``make_safe`` gives, naming its key path.
        ValueError: for a value that reads as one of the encoding's markers.
    """
    if isinstance(value, torch.Tensor) or type(value) in _PLAIN:
        return _check_leaf(value, where)
    if type(value) is tuple:  # DCP stores a tuple whole
        if value and type(value[0]) is str and value[0].startswith(_MARK):
            raise ValueError(f"{where}: a tuple that starts with {value[0]!r} cannot be saved in a sharded checkpoint")
        return _check_whole(value, where)
    if type(value) is list:
        return [encode(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if type(value) not in (dict, OrderedDict):
        return _check_leaf(value, where)  # raises
    if _ORDER in value:
        raise ValueError(f"{where}: the key {_ORDER!r} cannot be saved in a sharded checkpoint")
    if (not value and type(value) is OrderedDict) or any(type(key) is not str for key in value):
        return (_WHOLE, _check_whole(value, where))
    if not value:
        return _EMPTY_DICT
    encoded = {key: encode(item, f"{where}[{key!r}]") for key, item in value.items()}
    if type(value) is OrderedDict:
        metadata = getattr(value, "_metadata", None)
        metadata = None if metadata is None else make_safe(metadata, f"{where}._metadata")
        encoded[_ORDER] = (_ORDER, list(value), metadata)
    return encoded


def decode(value: Any) -> Any:
    """What :func:`encode` was given, from what DCP read back (also the files of earlier versions)."""
    if type(value) is tuple and value == _EMPTY_DICT:
        return {}
    if type(value) is tuple and len(value) == 2 and value[0] == _WHOLE:
        return value[1]
    if isinstance(value, Mapping):
        order = value.get(_ORDER)
        items = {key: decode(item) for key, item in value.items() if key != _ORDER}
        if type(order) is not tuple or len(order) != 3 or order[0] != _ORDER:
            return items
        ordered = OrderedDict((key, items[key]) for key in order[1])
        if order[2] is not None:
            ordered._metadata = order[2]  # type: ignore[attr-defined]
        return ordered
    if isinstance(value, list):
        return [decode(item) for item in value]
    return value


def _check_leaf(value: Any, where: str) -> Any:
    if type(value) in _PLAIN or type(value) in (torch.Tensor, nn.Parameter):
        return value
    raise TypeError(
        f"{where}: a value of type {type(value).__name__} cannot be saved in a sharded checkpoint and read back as "
        "it was; build the checkpoint with make_training_state(..., sharded=True), which converts it"
    )


def _check_whole(value: Any, where: str) -> Any:
    """``value`` as it is, after checking that ``torch.load(weights_only=True)`` gives it back exactly."""
    if type(value) in (list, tuple):
        for index, item in enumerate(value):
            _check_whole(item, f"{where}[{index}]")
    elif type(value) in (dict, OrderedDict):
        for key, item in value.items():
            if type(key) not in _KEYS:
                raise TypeError(f"{where}: dict key {key!r} of type {type(key).__name__} cannot be saved safely")
            _check_whole(item, f"{where}[{key!r}]")
    else:
        _check_leaf(value, where)
    return value


def check_keys(value: Any, where: str) -> Any:
    """``value`` (a model or optimizer state, loaded in place by name) as it is, after checking its keys.

    Raises:
        TypeError: for a dict key other than a str, naming its key path (it would come back a str).
    """
    if isinstance(value, Mapping):
        for key, item in value.items():
            if type(key) is not str:
                raise TypeError(
                    f"{where}: dict key {key!r} of type {type(key).__name__} would come back as a str from a sharded "
                    "checkpoint; use str keys in model and optimizer states"
                )
            check_keys(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            check_keys(item, f"{where}[{index}]")
    return value


def state_leaves(value: Any, where: str) -> Any:
    """A state dict from ``get_state_dict`` with its non-tensor leaves made safe to load (tensors kept)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        return {key: state_leaves(item, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [state_leaves(item, f"{where}[{index}]") for index, item in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    return make_safe(value, where, state=True)


def check_flat_keys(share: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` if two values of ``share`` would be written under one flat key (``a.b`` twice)."""
    from torch.distributed.checkpoint import DefaultSavePlanner

    try:
        DefaultSavePlanner().set_up_planner(dict(share))  # DCP's own flattening: "a" / "b" and "a.b" are one key
    except ValueError as error:
        raise ValueError(
            f"checkpoint: two entries would be written under one key of the sharded checkpoint ({error}); "
            "rename one of them"
        ) from None
