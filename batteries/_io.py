"""Crash-safe file writes: temporary file in the same folder, fsync, ``os.replace``, fsync folder."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"


def fsync_dir(folder: Path) -> None:
    """Make a rename or unlink inside ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as file:
        os.fsync(file.fileno())


def tmp_path(final: Path) -> Path:
    """A unique temporary name beside ``final``, hidden and marked so leftovers can be recognised."""
    return final.with_name(f".{final.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _discard(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def atomic_write(final: Path, write: Callable[[Path], Any], *, sync_file: bool = True) -> None:
    """Write ``final`` through ``write(tmp)`` so that ``final`` is either the old or the new file.

    Any error (disk full, a failing ``write``) removes the temporary file and propagates.
    ``sync_file=False`` when ``write`` makes the data durable itself (a hard link to a synced file).
    """
    tmp = tmp_path(final)
    try:
        write(tmp)
        if sync_file:
            fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        _discard(tmp)
        raise
    fsync_dir(final.parent)


def atomic_write_json(final: Path, obj: Any) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as file:
            json.dump(obj, file, indent=2, allow_nan=False)
            file.write("\n")

    atomic_write(final, write)


def atomic_link(source: Path, final: Path) -> None:
    """Point ``final`` at ``source``'s content: a hard link, or a copy where links are unsupported."""
    if final.exists() and os.path.samefile(source, final):
        return

    def link_or_copy(tmp: Path) -> None:
        try:
            os.link(source, tmp)  # same inode: nothing new to sync but the folder
        except OSError:  # no hard links on this file system (FAT, some network mounts)
            shutil.copyfile(source, tmp)
            fsync_file(tmp)

    atomic_write(final, link_or_copy, sync_file=False)


def remove_durably(paths: list[Path]) -> None:
    """Delete ``paths`` (missing ones are fine), then fsync their folders."""
    folders = set()
    for path in paths:
        _discard(path)
        folders.add(path.parent)
    for folder in folders:
        fsync_dir(folder)
