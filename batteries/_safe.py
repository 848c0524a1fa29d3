"""Values in a form that ``torch.load(weights_only=True)`` reads back."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["make_safe"]

_PLAIN = (type(None), bool, int, float, str, bytes, torch.dtype, torch.device)  # load with weights_only=True
_KEYS = (str, int, float, bool, type(None))  # dict keys a safe load reads


def make_safe(value: Any, where: str, state: bool = False) -> Any:
    """``value`` in a form ``torch.load(weights_only=True)`` reads back.

    NumPy scalars become Python numbers, NumPy arrays tensors, mappings dicts, ``argparse.Namespace``
    / dataclasses / namedtuples dicts, enums their value, paths strs, subclasses of plain types
    the plain value, sets lists.

    Args:
        value: what to convert, nested in any way.
        where: its key path, for error messages, e.g. ``"metrics"``.
        state: True for a state dict: tensors stay as they are (0-d ones too, e.g. an optimizer's
            ``step``) and an ``OrderedDict`` stays one, with its ``_metadata``. False (metrics,
            extras): 0-d tensors become Python numbers and other tensors move to the CPU.

    Returns:
        The converted value; plain values are returned as they are.

    Raises:
        TypeError: if a value has no such form; the message names its key path.
    """
    if type(value) in _PLAIN:
        return value
    if isinstance(value, torch.Tensor):
        return _safe_tensor(value, where, state)
    if isinstance(value, (np.generic, np.ndarray)):  # before the int / float check: np.float64 subclasses float
        return make_safe(_from_numpy(value, where), where, state)
    if isinstance(value, enum.Enum):
        return make_safe(value.value, where, state)
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
        return _safe_mapping(value, where, state)
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [make_safe(item, f"{where}[{index}]", state) for index, item in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    raise TypeError(
        f"{where}: a value of type {type(value).__name__} has no form that torch.load(weights_only=True) "
        "accepts; convert it to numbers, strings, tensors, lists or dicts"
    )


def _safe_tensor(value: torch.Tensor, where: str, state: bool) -> Any:
    """A plain tensor or parameter as it is (``state``), else detached: a number if 0-d, on the CPU if not."""
    if type(value) not in (torch.Tensor, nn.Parameter):
        raise TypeError(
            f"{where}: a tensor of the subclass {type(value).__name__}, which torch.load(weights_only=True) "
            "refuses; save value.as_subclass(torch.Tensor) instead"
        )
    if state:
        return value
    value = value.detach()
    return value.item() if value.dim() == 0 else value.cpu()


def _from_numpy(value: np.generic | np.ndarray, where: str) -> Any:
    """A NumPy scalar as a Python number, a NumPy array as a tensor."""
    if isinstance(value, np.generic):
        item = value.item()
        if isinstance(item, np.generic):  # e.g. np.longdouble: no Python type holds it
            raise TypeError(f"{where}: a NumPy {value.dtype} scalar has no Python form that a safe load reads")
        return item
    if value.dtype.kind not in "biufc":  # str, bytes, datetime64, timedelta64, object, structured
        raise TypeError(
            f"{where}: a NumPy array of dtype {value.dtype} has no form that torch.load(weights_only=True) "
            "reads; convert it to numbers or a list of strs"
        )
    if not value.dtype.isnative:
        value = value.astype(value.dtype.newbyteorder("="))
    try:
        return torch.from_numpy(np.ascontiguousarray(value))
    except TypeError as error:  # a dtype torch has no tensors of (e.g. float128)
        raise TypeError(f"{where}: a NumPy array of dtype {value.dtype} cannot become a tensor: {error}") from None


def _safe_mapping(value: Mapping[Any, Any], where: str, state: bool) -> dict[Any, Any]:
    """A dict of safe keys and values; in a state dict an ``OrderedDict`` stays one, with its ``_metadata``."""
    keep = state and isinstance(value, OrderedDict)
    out: dict[Any, Any] = OrderedDict() if keep else {}
    for key, item in value.items():
        safe_key = key.item() if isinstance(key, np.generic) else key
        if type(safe_key) not in _KEYS:
            raise TypeError(f"{where}: dict key {key!r} of type {type(key).__name__} cannot be saved safely")
        out[safe_key] = make_safe(item, f"{where}[{key!r}]", state)
    if keep and isinstance(getattr(value, "_metadata", None), Mapping):
        out._metadata = make_safe(value._metadata, f"{where}._metadata")  # type: ignore[attr-defined]
    return out
