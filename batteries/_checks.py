"""Argument checks shared by every module: one wording, no coercion of look-alike values.

``"False"`` is not a bool, ``None`` is not a bool, ``True`` is not an int; NumPy integers are
ints and NumPy floats are floats. Each check returns the value as a plain Python type.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any

import numpy as np


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_bool(value: Any, name: str) -> bool:
    """``value`` as a bool; only ``True`` / ``False`` (and NumPy bools) are accepted.

    Raises:
        TypeError: for anything else, ``"False"``, ``None``, ``0`` and ``1`` included.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {_show(value)}")


def check_int(value: Any, name: str, minimum: int | None = None) -> int:
    """``value`` as an int (Python or NumPy integer, not a bool), at least ``minimum`` if given.

    Raises:
        TypeError: if ``value`` is not an integer (a bool or a float such as ``3.0`` included).
        ValueError: if it is below ``minimum``.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {_show(value)}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_number(value: Any, name: str, minimum: float | None = None, finite: bool = True) -> float:
    """``value`` as a float (Python / NumPy int or float, not a bool), at least ``minimum`` if given.

    Raises:
        TypeError: if ``value`` is not a real number.
        ValueError: if it is NaN / inf (with ``finite=True``) or below ``minimum``.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {_show(value)}")
    value = float(value)
    if finite and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and not value >= minimum:
        raise ValueError(f"{name} must be a number >= {minimum}, got {value!r}")
    return value


def check_file_name(value: Any, name: str) -> str:
    """``value`` as a plain file name: a non-empty str, no path separator, not ``.`` / ``..``.

    Raises:
        TypeError: if ``value`` is not a str.
        ValueError: if it is empty, ``"."``, ``".."``, or holds a separator or a NUL byte.
    """
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str (a plain file name), got {_show(value)}")
    if (
        value in ("", ".", "..")
        or "/" in value
        or os.sep in value
        or (os.altsep is not None and os.altsep in value)
        or "\0" in value
    ):
        raise ValueError(f"{name} must be a plain file name (no folder, not '.' or '..'), got {value!r}")
    return value
