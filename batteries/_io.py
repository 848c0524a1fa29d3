"""Crash-safe file writes: temporary file in the same folder, fsync, ``os.replace``, fsync folder."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batteries._process import pid_alive

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
    """A unique temporary name beside ``final``, hidden and marked so leftovers can be recognised:
    ``.{name}.tmp-{pid}-{8 hex digits}-{host}``. The pid and host name of the writer let a later
    process tell whether the writer is gone (a pid is only meaningful on its own host)."""
    return final.with_name(f".{final.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}-{socket.gethostname()}")


def _discard(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def write_error(error: BaseException, final: Path, tmp: Path) -> BaseException:
    """The error to raise for a failed write of ``final`` (through ``tmp``): an ``OSError`` naming ``final``.

    ``torch.save`` reports a full disk (``ENOSPC``) or a file past the size limit (``EFBIG``) as a
    ``RuntimeError`` ("file write failed", "unexpected pos"); it becomes the ``OSError`` it is,
    ``EFBIG`` when the temporary file reached the ``RLIMIT_FSIZE`` limit, else ``ENOSPC``. An
    ``OSError`` with an errno but no file name (``file.write`` on a full disk) gets ``final`` as
    its file name. Anything else is returned unchanged.
    """
    if isinstance(error, RuntimeError) and any(
        mark in str(error) for mark in ("file write failed", "unexpected pos", "failed writing file")
    ):
        code = errno.EFBIG if _at_size_limit(tmp) else errno.ENOSPC
        return OSError(code, f"{os.strerror(code)} (torch.save: {str(error).strip()})", str(final))
    if isinstance(error, OSError) and error.errno is not None and error.filename is None:
        return OSError(error.errno, error.strerror or str(error), str(final))
    return error


def _at_size_limit(tmp: Path) -> bool:
    try:
        import resource
    except ImportError:  # Windows: no file size limit
        return False
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    try:
        return limit != resource.RLIM_INFINITY and tmp.stat().st_size >= limit
    except OSError:
        return False


def atomic_write(final: Path, write: Callable[[Path], Any], *, sync_file: bool = True) -> None:
    """Write ``final`` through ``write(tmp)`` so that ``final`` is either the old or the new file.

    Any error (disk full, a failing ``write``) removes the temporary file and propagates; a full
    disk or a file past the size limit as an ``OSError`` (``ENOSPC`` / ``EFBIG``) that names
    ``final``, also where ``torch.save`` reports it as a ``RuntimeError`` (see :func:`write_error`).
    ``sync_file=False`` when ``write`` makes the data durable itself (a hard link to a synced file).
    """
    tmp = tmp_path(final)
    try:
        write(tmp)
        if sync_file:
            fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException as error:
        mapped = write_error(error, final, tmp)
        _discard(tmp)
        if mapped is error:
            raise
        raise mapped from error
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


# the writer's pid and host in a temporary name (tmp_path); names of older versions carry no host
_TMP_WRITER = re.compile(rf"^\..+{re.escape(TMP_MARK)}(\d+)-[0-9a-f]{{8}}(?:-(.+))?$")


def abandoned_temporaries(folder: Path) -> list[Path]:
    """The temporary files and folders in ``folder`` (from :func:`tmp_path`) whose writer, on this host, is gone."""
    matches = [(entry, _TMP_WRITER.match(entry.name)) for entry in folder.iterdir()]
    return [entry for entry, m in matches if m and m[2] in (None, socket.gethostname()) and not pid_alive(int(m[1]))]
