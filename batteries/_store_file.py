"""The store of one-file checkpoints: ``{name}.pth`` written by ``save_fn``, hard links best.pth / last.pth.

A store writes, links, restores and removes what :class:`~batteries.CheckpointManager` (the ledger)
decides; it keeps no history. Only global rank 0 writes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from batteries import distributed
from batteries._async import AsyncWriter
from batteries._io import atomic_link, atomic_write, remove_durably


class FileStore:
    """Writes each checkpoint as one file on global rank 0 (``save`` is a no-op on the other ranks).

    Args:
        logdir: the folder of the checkpoints.
        save_fn: ``save_fn(obj, path)``, e.g. ``torch.save``.
        async_save: write on a background thread, at most one save in flight.
        history: unused (the ranks other than 0 keep no history of one-file checkpoints).
    """

    suffix = ".pth"
    links = ("best.pth", "last.pth")
    marks: dict[str, Any] = {}  # what metrics.json records of the kind
    keeps_last = False  # a hard link keeps the newest file's data alive: no need to keep its numbered file
    overwrites = True  # os.replace puts a new file over an interrupted save's file of the same name
    missing = (
        "checkpoints of recorded epochs {epochs} are missing from '{logdir}' and neither best.pth nor last.pth "
        "holds them"
    )

    def __init__(
        self, logdir: Path, *, save_fn: Callable[[Any, str], Any], async_save: bool, history: Any = None
    ) -> None:
        self.logdir = logdir
        self.save_fn = save_fn
        self.async_save = async_save
        self.in_flight: int | None = None  # epoch of the asynchronous save in flight
        self._writer = AsyncWriter()

    def save(
        self,
        checkpoint: Mapping[str, Any],
        name: str,
        *,
        check: Callable[[], None],
        commit: Callable[[Any], None],
        epoch: int | None = None,
    ) -> None:
        """On rank 0: ``check()``, then ``commit(checkpoint)`` (on the background thread with ``async_save``).

        Args:
            checkpoint: what to save.
            name: the file name it will have (the temporary name is made by ``publish``).
            check: raises to refuse the save before anything is written.
            commit: writes and records it: calls :meth:`publish` with the checkpoint (a snapshot
                of it with ``async_save``).
            epoch: the epoch saved, marked ``in_flight`` while written in the background.
        """
        if not distributed.is_main_process():
            return
        if not self.async_save:
            self._writer.wait()
        check()
        if not self.async_save:
            commit(checkpoint)
            return
        self.in_flight = epoch  # before the job may start (and end, setting it back to None)
        try:
            self._writer.submit(checkpoint, lambda data: self._finish(commit, data))
        except BaseException:
            self.in_flight = None
            raise

    def _finish(self, commit: Callable[[Any], None], data: Any) -> None:
        try:
            commit(data)
        finally:
            self.in_flight = None

    def publish(self, data: Any, path: Path) -> list[int]:
        """Write ``data`` to ``path`` crash-safely; return its ``[inode, size]`` (to know its hard links later)."""
        atomic_write(path, lambda tmp: self.save_fn(data, str(tmp)))
        written = path.stat()
        return [written.st_ino, written.st_size]

    def publish_named(self, data: Any, path: Path) -> None:
        """Write the checkpoint of a named save (``manager.save``) to ``path``."""
        self.logdir.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: self.save_fn(data, str(tmp)))

    def discard(self, data: Any) -> None:
        """Nothing to clean after a failed :meth:`publish` (``atomic_write`` removed its temporary file)."""

    def exists(self, path: Path) -> bool:
        """Whether the checkpoint ``path`` is complete."""
        return path.exists()

    def restore(self, path: Path, identity: Any) -> bool:
        """Hard-link ``path`` back from best.pth / last.pth if one of them is the file written as ``identity``.

        Decided from the inode and size :meth:`publish` returned, never from the content (another
        manager's checkpoint may hold the same epoch); a copy (no hard links) is not recognised.
        """
        for name in self.links:
            try:
                stat = os.stat(self.logdir / name)
            except OSError:
                continue
            if identity == [stat.st_ino, stat.st_size]:
                atomic_link(self.logdir / name, path)
                return True
        return False

    def point_links(self, best: Path | None, last: Path | None) -> None:
        """Point last.pth, then best.pth, at their files; a link whose target is None stays as it is."""
        if last is not None:
            atomic_link(last, self.logdir / "last.pth")
        if best is not None:
            atomic_link(best, self.logdir / "best.pth")

    def remove(self, paths: Sequence[Path], temporaries: Sequence[Path] = ()) -> None:
        """Delete numbered files and abandoned temporary files durably."""
        remove_durably([*paths, *temporaries])

    def wait(self) -> None:
        """Block until the save in flight (if any) is written; re-raise its error."""
        self._writer.wait()
