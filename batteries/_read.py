"""Reading a checkpoint file: ``torch.load`` with errors that name the file and say what is wrong."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["torch_load"]

# How torch.save's legacy format begins: its magic number, pickled (LONG1, 10 bytes), after the protocol header.
_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def torch_load(path: Path, map_location: Any, weights_only: bool) -> Any:
    """``torch.load(path, map_location=..., weights_only=...)``, its errors told apart.

    Args:
        path: an existing file.
        map_location: passed to ``torch.load``.
        weights_only: passed to ``torch.load``.

    Returns:
        What ``torch.load`` returns.

    Raises:
        pickle.UnpicklingError: if ``weights_only=True`` refuses the file's content; the message
            lists the refused classes (where torch can list them) and says how to opt out.
        ValueError: if the file loads on the CPU but not with ``map_location``.
        RuntimeError: if the file is not a torch checkpoint, or is truncated or corrupt.
        FileNotFoundError, MemoryError: as ``torch.load`` raises them.
    """
    instead = not_a_checkpoint(path)
    if instead is not None:
        raise RuntimeError(f"checkpoint file '{path}' is not a torch checkpoint: it is {instead}")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except (FileNotFoundError, MemoryError):
        raise
    except Exception as error:
        raise _load_error(path, error, map_location, weights_only) from error


def not_a_checkpoint(path: Path) -> str | None:
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


def _load_error(path: Path, error: Exception, map_location: Any, weights_only: bool) -> Exception:
    """The error to raise for ``error``, which ``torch.load`` raised on ``path``."""
    if weights_only and isinstance(error, pickle.UnpicklingError):
        refused = _refused_globals(path)
        if refused is None or refused:  # without a list to go by, the error's type decides
            listed = f": {', '.join(sorted(refused))}" if refused else ""
            return pickle.UnpicklingError(
                f"refused to load '{path}': it holds objects that weights_only=True does not allow "
                f"(arbitrary pickled code could run){listed}. If you trust this file, load it with "
                "load_checkpoint(..., weights_only=False), or allow its classes with "
                "torch.serialization.add_safe_globals"
            )
        message = "UnpicklingError: its pickled data is malformed"  # torch's own text advises weights_only=False
    elif weights_only and _is_torchscript(path):
        return RuntimeError(
            f"checkpoint file '{path}' is not a torch checkpoint: it is a TorchScript archive "
            "(written by torch.jit.save; load it with torch.jit.load)"
        )
    else:
        message = f"{type(error).__name__}: {error}"
    if map_location is not None and str(map_location) != "cpu" and _loads_on_cpu(path, weights_only):
        return ValueError(
            f"map_location={map_location!r} cannot be used here to load '{path}' (the file itself loads "
            f"with map_location='cpu'): {message}"
        )
    return RuntimeError(f"checkpoint file '{path}' is truncated, corrupt or not a torch checkpoint: {message}")


def _refused_globals(path: Path) -> list[str] | None:
    """The classes and functions in the file that ``weights_only=True`` refuses; None if torch cannot list them.

    torch lists them for its zip format (``get_unsafe_globals_in_checkpoint``, torch >= 2.5), not for
    its legacy format. A zip whose pickle does not parse refuses nothing: it is corrupt.
    """
    unsafe_globals = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if unsafe_globals is None or not zipfile.is_zipfile(path):
        return None
    try:
        return list(unsafe_globals(str(path)))
    except Exception:  # noqa: BLE001 - a pickle that does not parse
        return []


def _is_torchscript(path: Path) -> bool:
    """Whether the file is a ``torch.jit.save`` archive (it holds ``constants.pkl``, as torch tells them)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.split("/", 1)[-1] == "constants.pkl" for name in archive.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


def _loads_on_cpu(path: Path, weights_only: bool) -> bool:
    """Whether the file loads with ``map_location="cpu"`` (memory-mapped where the format allows)."""
    for mmap in (True, False):
        try:
            torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
            return True
        except Exception:  # noqa: BLE001 - only the answer matters
            continue
    return False
