"""Moving (nested) batches to a device."""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
from collections import UserDict
from collections.abc import Mapping
from typing import Any

import torch
from torch.nn.utils.rnn import PackedSequence

__all__ = ["t2d"]

# leaves returned as they are, recognised by exact type before any isinstance check (the hot path)
_LEAVES = frozenset({str, bytes, int, float, bool, complex, type(None)})


@functools.cache
def _takes_non_blocking(cls: type) -> bool:
    """True if ``cls.to`` accepts a ``non_blocking`` keyword (by name or through ``**kwargs``)."""
    try:
        parameters = inspect.signature(cls.to).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some C methods): call it without
        return False
    return any(p.name == "non_blocking" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _own_to(data: Any, device: str | int | torch.device, non_blocking: bool) -> Any:
    """``data.to(device)``, with ``non_blocking`` only when asked for and its ``.to`` accepts it."""
    if non_blocking and _takes_non_blocking(type(data)):
        return data.to(device, non_blocking=True)
    return data.to(device)


def _keep_attributes(source: Any, new: Any) -> Any:
    """Give ``new`` the instance attributes of ``source`` that it lacks (a subclass's own fields)."""
    attributes = getattr(source, "__dict__", None)
    if attributes:
        for name, value in attributes.items():
            new.__dict__.setdefault(name, value)
    return new


def t2d(data: Any, device: str | int | torch.device, non_blocking: bool = False) -> Any:
    """Move every tensor inside ``data`` to ``device``, keeping the container types.

    Walks mappings, lists, tuples, namedtuples and dataclass instances, recursively. Tensors and
    ``PackedSequence`` are moved with ``.to``; any other object with its own ``.to`` (a tokenizer's
    ``BatchEncoding``, a graph batch) by it, with ``non_blocking=True`` only where its signature
    accepts it. Any other leaf (``str``, ``int``, ``None``, NumPy arrays, ...) is returned unchanged.
    Container types and instance attributes are kept (a ``defaultdict`` keeps its factory, a
    state dict's ``OrderedDict`` its ``_metadata``).

    Args:
        data: a tensor or a nested container of tensors.
        device: target device, e.g. ``"cpu"``, ``"cuda:1"``, ``0`` or a ``torch.device``.
        non_blocking: passed to ``Tensor.to``; asynchronous copies from pinned memory. Default False.

    Returns:
        A structure of the same types as ``data`` with tensors on ``device``. Containers are new
        objects (shallow copies for mapping subclasses); leaves that are not tensors are the same
        objects; objects moved by their own ``.to`` are whatever it returns.

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
    if callable(getattr(cls, "to", None)):  # looked up on the type: an AttrDict's __getattr__ may raise KeyError
        return _own_to(data, device, non_blocking)  # e.g. a tokenizer's BatchEncoding, a graph batch
    if isinstance(data, Mapping):
        moved = {key: t2d(value, device, non_blocking) for key, value in data.items()}
        if isinstance(data, (dict, UserDict)):  # copies own their items: safe to overwrite them
            new = copy.copy(data)  # same type, default_factory, attributes (_metadata of a state_dict)
            for key, value in moved.items():  # not update(): Counter.update adds
                new[key] = value
            return _keep_attributes(data, new)
        try:
            new = cls(moved)
        except TypeError as error:
            raise TypeError(
                f"t2d cannot rebuild a {cls.__qualname__} from a dict of its moved items ({error}); "
                "give the type a .to(device) method, or pass a dict"
            ) from error
        return _keep_attributes(data, new)
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # namedtuple
        return _keep_attributes(data, cls(*(t2d(value, device, non_blocking) for value in data)))
    if isinstance(data, (list, tuple)):
        return _keep_attributes(data, cls(t2d(value, device, non_blocking) for value in data))
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        moved = copy.copy(data)
        for field in dataclasses.fields(data):
            object.__setattr__(moved, field.name, t2d(getattr(data, field.name), device, non_blocking))
        return moved
    return data
