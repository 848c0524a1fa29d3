"""The store of sharded checkpoints: one DCP folder per checkpoint, relative symbolic links best / last.

Saving is a collective: every rank writes its shards into a hidden temporary folder that rank 0
names, then rank 0 renames it into place and records it (docs/checkpoint-manager.md describes the
protocol). Only rank 0 renames, links or deletes.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from batteries import _dcp, distributed
from batteries._async import AsyncWriter
from batteries._io import tmp_path


class DcpStore:
    """Writes each checkpoint as a ``torch.distributed.checkpoint`` folder, every rank its own shards.

    Args:
        logdir: the folder of the checkpoints.
        save_fn: must be ``torch.save`` (DCP writes the shards).
        async_save: write with ``dcp.async_save`` on a gloo group of its own, at most one save in flight.
        history: ``(share, adopt)``: ``share()`` gives rank 0's history, ``adopt(shared)`` takes it
            on the other ranks (it travels with the save's own agreements).

    Raises:
        ValueError: if ``save_fn`` is not ``torch.save``.
    """

    suffix = ""
    links = ("best", "last")
    marks: dict[str, Any] = {"sharded": True}  # what metrics.json records of the kind
    keeps_last = True  # a symbolic link cannot keep a deleted folder alive: the newest folder stays while last
    overwrites = False  # a folder cannot be renamed over another: those of epochs after the history go first
    missing = "checkpoint folders of recorded epochs {epochs} are missing from '{logdir}'"

    def __init__(
        self,
        logdir: Path,
        *,
        save_fn: Callable[[Any, str], Any],
        async_save: bool,
        history: tuple[Callable[[], Any], Callable[[Any], None]],
    ) -> None:
        if save_fn is not torch.save:
            raise ValueError(f"save_fn is not used with sharded=True (DCP writes the shards), got {save_fn!r}")
        self.logdir = logdir
        self.save_fn = save_fn
        self.async_save = async_save
        self.in_flight: int | None = None  # epoch of the asynchronous save in flight (rank 0)
        self._share, self._adopt = history
        self._writer = AsyncWriter()
        self._group: Any = None  # the gloo group of asynchronous saves, made by the first one

    def save(
        self,
        checkpoint: Mapping[str, Any],
        name: str,
        *,
        check: Callable[[], None],
        commit: Callable[[Any], None],
        epoch: int | None = None,
    ) -> None:
        """Every rank: write its shards, then rank 0 runs ``check()`` before and ``commit(tmp)`` after.

        Args:
            checkpoint: this rank's state (``make_training_state(..., sharded=True)``).
            name: the name the folder will have (its temporary name is derived from it).
            check: rank 0: raises to refuse the save before any rank writes.
            commit: rank 0, once every rank's shards are in the temporary folder ``tmp``.
            epoch: the epoch saved (None for a named save: the history is then not re-shared).

        Raises:
            RuntimeError: on every rank, naming the rank that failed.
        """
        tmp, share = self._begin(checkpoint, name, check)
        self._write(share, tmp, lambda: commit(tmp), epoch)

    def _begin(self, checkpoint: Mapping[str, Any], name: str, check: Callable[[], None]) -> tuple[Path, dict]:
        """Every rank: wait for its save in flight, check, agree on rank 0's temporary folder name.

        One collective carries every rank's outcome, so that all ranks raise together. Returns the
        temporary folder and this rank's share (:func:`_dcp.rank_share`).
        """
        main = distributed.is_main_process()
        try:
            self._writer.wait()
            pending = None
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as error:  # noqa: BLE001 - exchanged below, then raised
            pending = _dcp.plain_error(error)
        mine, proposal, share = None, None, {}
        try:
            share = _dcp.rank_share(checkpoint)  # refuses what would not read back as given
            if pending is None and main:
                check()
                self.logdir.mkdir(parents=True, exist_ok=True)
                proposal = tmp_path(self.logdir / name).name  # the writer's pid and host: abandoned ones are removed
        except Exception as error:  # noqa: BLE001 - exchanged below, then raised
            mine = error
        outcomes = distributed.all_gather(
            (_describe(pending), _describe(mine), proposal, self._share() if main else None)
        )
        if not main and outcomes[0][3] is not None:  # rank 0's history, as of its last commit
            self._adopt(outcomes[0][3])
        if pending is not None:
            raise pending
        if mine is not None:
            raise mine
        for rank, (earlier, error, *_) in enumerate(outcomes):
            if earlier or error:
                what = f"a previous asynchronous save failed on rank {rank}" if earlier else f"rank {rank} failed"
                raise RuntimeError(f"CheckpointManager: {what}: {earlier or error}; nothing was saved")
        return self.logdir / outcomes[0][2], share

    def _write(self, share: dict[str, Any], tmp: Path, commit: Callable[[], None], epoch: int | None) -> None:
        """Every rank writes its ``share`` into ``tmp``; once all are written, rank 0 runs ``commit``."""
        main = distributed.is_main_process()
        if self.async_save:
            if self._group is None and distributed.is_initialized():
                self._group = distributed.gloo_group(dedicated=True)  # DCP's background collectives: not training's
            future = _dcp.save(share, tmp, group=self._group, asynchronous=True)
            if main:
                self.in_flight = epoch
            try:
                self._writer.submit(None, lambda _: self._finish(future, tmp, commit if main else None, epoch))
            except BaseException:
                self.in_flight = None
                raise
            return
        try:
            _dcp.save(share, tmp)  # raises on every rank if any rank failed (DCP gathers the errors)
        except BaseException:
            if main:
                self.discard(tmp)
            raise
        self._commit_everywhere(commit if main else None, epoch, group=None)

    def _finish(self, future: Any, tmp: Path, commit: Callable[[], None] | None, epoch: int | None) -> None:
        """The background job of an asynchronous save: wait for DCP, then commit (rank 0) and share the outcome."""
        try:
            try:
                future.result()
            except BaseException as error:
                if commit is not None:
                    self.discard(tmp)
                mapped = _dcp.plain_error(error)
                if mapped is error:
                    raise
                raise mapped from error
            self._commit_everywhere(commit, epoch, group=self._group)  # the saves' own group: not training's
        finally:
            self.in_flight = None

    def _commit_everywhere(self, commit: Callable[[], None] | None, epoch: int | None, *, group: Any) -> None:
        """Every rank, once every shard is written: rank 0 runs ``commit``; one collective on ``group``
        gives every rank its outcome and history, so that all ranks raise together or hold the same history."""
        error: BaseException | None = None
        if commit is not None:
            try:
                commit()
            except Exception as caught:  # noqa: BLE001 - exchanged below, then raised
                error = caught
        main = distributed.is_main_process()
        outcomes = distributed.all_gather((_describe(error), self._share() if main else None), group=group)
        if error is not None:
            raise error
        if outcomes[0][0]:
            raise RuntimeError(f"CheckpointManager: rank 0 failed to commit the checkpoint: {outcomes[0][0]}")
        if not main and epoch is not None:
            self._adopt(outcomes[0][1])

    def publish(self, tmp: Path, path: Path) -> None:
        """Rank 0: make the complete folder ``tmp`` visible as ``path`` (which must not exist)."""
        _dcp.commit_folder(tmp, path)

    def publish_named(self, tmp: Path, link: Path) -> None:
        """Rank 0: make ``tmp`` the folder ``{link}.<n>``, point ``link`` at it, delete the older ones."""
        pattern = re.compile(rf"^{re.escape(link.name)}\.(\d+)$")
        numbers = [int(match[1]) for entry in self.logdir.iterdir() if (match := pattern.match(entry.name))]
        final = self.logdir / f"{link.name}.{max(numbers, default=0) + 1}"
        try:
            self.publish(tmp, final)
        except BaseException:
            self.discard(tmp)
            raise
        _dcp.atomic_symlink(final.name, link)
        for entry in self.logdir.iterdir():
            if pattern.match(entry.name) and entry.name != final.name:
                _dcp.remove_tree(entry)

    def discard(self, tmp: Path) -> None:
        """Remove the temporary folder of a save that failed."""
        with contextlib.suppress(OSError):
            _dcp.remove_temporary(tmp)

    def exists(self, path: Path) -> bool:
        """Whether the checkpoint ``path`` is complete."""
        return _dcp.is_checkpoint(path)

    def restore(self, path: Path, identity: Any) -> bool:
        """A lost folder cannot be restored (a symbolic link does not keep its files): always False."""
        return False

    def point_links(self, best: Path | None, last: Path | None) -> None:
        """Point best, then last, at their folders; a link whose target is None is removed."""
        for name, target in (("best", best), ("last", last)):
            if target is not None:
                _dcp.atomic_symlink(target.name, self.logdir / name)
            elif (self.logdir / name).is_symlink():
                _dcp.remove_tree(self.logdir / name)  # it would point at a folder deleted next (or none)

    def remove(self, paths: Sequence[Path], temporaries: Sequence[Path] = ()) -> None:
        """Delete numbered folders (renamed away first) and abandoned temporary folders or files."""
        for path in paths:
            _dcp.remove_tree(path)
        for path in temporaries:
            _dcp.remove_temporary(path)

    def wait(self) -> None:
        """Block until this rank's save in flight (if any) is written; re-raise its error."""
        self._writer.wait()


def _describe(error: BaseException | None) -> str | None:
    """An error as one picklable line for the other ranks (None stays None)."""
    return None if error is None else f"{type(error).__name__}: {error}"
