"""Moving (nested) batches to a device."""

from __future__ import annotations

import copy
import dataclasses
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch
from torch.nn.utils.rnn import PackedSequence

__all__ = ["t2d"]

# leaves returned as they are, recognised by exact type before any isinstance check (the hot path)
_LEAVES = frozenset({str, bytes, int, float, bool, complex, type(None)})


def t2d(data: Any, device: str | int | torch.device, non_blocking: bool = False) -> Any:
    """Move every tensor inside ``data`` to ``device``, keeping the container types.

    Walks dicts (and other mappings), lists, tuples, namedtuples and dataclass instances,
    recursively. Tensors (and ``PackedSequence``) are moved with ``.to(device, non_blocking=...)``;
    any other leaf (``str``, ``int``, ``None``, NumPy arrays, ...) is returned unchanged, never
    replaced with ``None``.

    Args:
        data: a tensor or a nested container of tensors.
        device: target device, e.g. ``"cpu"``, ``"cuda:1"``, ``0`` or a ``torch.device``.
        non_blocking: passed to ``Tensor.to``; asynchronous copies from pinned memory. Default False.

    Returns:
        A structure of the same types as ``data`` with tensors on ``device``. Containers are new
        objects; leaves that are not tensors are the same objects.

    Raises:
        RuntimeError: if ``device`` is not a valid device (raised by torch).

    Example:
        >>> batch = {"x": torch.zeros(2, 3), "ids": ["a", "b"], "n": 2}
        >>> t2d(batch, "cpu")["ids"]
        ['a', 'b']
    """
    cls = type(data)
    if cls in _LEAVES:
        return data
    if cls is torch.Tensor or isinstance(data, (torch.Tensor, PackedSequence)):
        return data.to(device, non_blocking=non_blocking)
    if cls is dict:  # tensors inline: no call per leaf
        return {
            key: value.to(device, non_blocking=non_blocking)
            if type(value) is torch.Tensor
            else t2d(value, device, non_blocking)
            for key, value in data.items()
        }
    if cls is list or cls is tuple:
        if set(map(type, data)) <= _LEAVES:  # e.g. a list of ids: nothing to move, one C-level pass
            return cls(data)
        return cls(
            [
                value.to(device, non_blocking=non_blocking)
                if type(value) is torch.Tensor
                else t2d(value, device, non_blocking)
                for value in data
            ]
        )
    if isinstance(data, Mapping):
        items = [(key, t2d(value, device, non_blocking)) for key, value in data.items()]
        if isinstance(data, defaultdict):
            return cls(data.default_factory, items)
        try:
            return cls(items)
        except TypeError:  # a mapping type that cannot be built from pairs
            return dict(items)
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # namedtuple
        return cls(*(t2d(value, device, non_blocking) for value in data))
    if isinstance(data, (list, tuple)):
        return cls(t2d(value, device, non_blocking) for value in data)
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        moved = copy.copy(data)
        for field in dataclasses.fields(data):
            object.__setattr__(moved, field.name, t2d(getattr(data, field.name), device, non_blocking))
        return moved
    return data
