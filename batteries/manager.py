"""CheckpointManager: the ledger of the N best checkpoints (history, ranking, metrics.json, rewind).

It decides what to keep, link and delete; a store (``_store_file``: one file per checkpoint,
``_store_dcp``: one DCP folder) writes, links and removes. See docs/checkpoint-manager.md.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batteries import _history, distributed
from batteries._checks import check_bool, check_file_name, check_int
from batteries._io import TMP_MARK, atomic_write_json
from batteries._process import pid_alive
from batteries._store_dcp import DcpStore
from batteries._store_file import FileStore

__all__ = ["CheckpointManager"]

# the writer's pid and host in a temporary name (_io.tmp_path); names of older versions carry no host
_TMP_WRITER = re.compile(rf"^\..+{re.escape(TMP_MARK)}(\d+)-[0-9a-f]{{8}}(?:-(.+))?$")


class CheckpointManager:
    """Save a checkpoint per epoch, keep the ``save_n_best`` best, and record every score.

    :meth:`process` writes ``{checkpoint_names}_{epoch}.pth``, records the score in ``metrics_file``,
    points ``best.pth`` / ``last.pth`` at it and deletes the files that fell out of the N best, on
    global rank 0. A folder with ``metrics_file`` is continued; epochs only go forward (:meth:`rewind`
    goes back). With ``sharded=True`` each checkpoint is a DCP folder and ``best`` / ``last`` are
    symbolic links; :meth:`process` and :meth:`save` are then collectives. See docs/checkpoint-manager.md.

    Args:
        logdir: folder for the checkpoints; created (on rank 0) if missing.
        checkpoint_names: file name prefix. Default ``"exp"``.
        metric: the key of the score that decides the best. Default ``"loss"``.
        metric_minimization: True if lower is better (a bool). Default True.
        save_n_best: number of numbered checkpoints to keep (int >= 1). Default 1.
        save_fn: ``save_fn(obj, path)``. Default ``torch.save``; not used with ``sharded=True``.
        metrics_file: name of the history file inside ``logdir``. Default ``"metrics.json"``.
        async_save: write on a background thread (at most one save in flight); an error is raised
            by the next :meth:`process`, :meth:`wait` or :meth:`close`. Default False.
        sharded: write DCP checkpoint folders (``make_training_state(..., sharded=True)``). Default False.

    Raises:
        TypeError: on an argument of the wrong type.
        ValueError: on a bad argument value; if ``metrics_file`` cannot be continued (not JSON, another
            metric, direction or kind); or if ``logdir`` holds numbered checkpoints but no history.

    Example:
        >>> manager = CheckpointManager(logdir, metric="accuracy", metric_minimization=False, save_n_best=3)
        >>> manager.process(score={"accuracy": 0.97, "loss": 0.1}, epoch=1, checkpoint=make_checkpoint(...))
    """

    def __init__(
        self,
        logdir: str | os.PathLike,
        checkpoint_names: str = "exp",
        metric: str = "loss",
        metric_minimization: bool = True,
        save_n_best: int = 1,
        save_fn: Callable[[Any, str], Any] = torch.save,
        metrics_file: str = "metrics.json",
        async_save: bool = False,
        sharded: bool = False,
    ) -> None:
        self.save_n_best = check_int(save_n_best, "save_n_best", minimum=1)
        self.metric_minimization = check_bool(metric_minimization, "metric_minimization")
        self.async_save, self.sharded = check_bool(async_save, "async_save"), check_bool(sharded, "sharded")
        if not isinstance(metric, str) or not metric or metric == "epoch":
            raise ValueError(f"metric must be a non-empty str other than 'epoch', got {metric!r}")
        check_file_name(checkpoint_names, "checkpoint_names")
        check_file_name(metrics_file, "metrics_file")
        if not callable(save_fn):
            raise TypeError(f"save_fn must be callable as save_fn(obj, path), got {save_fn!r}")
        self.logdir = Path(logdir)
        store = DcpStore if self.sharded else FileStore
        history = (lambda: (self.values, self.lost_epochs), self._adopt)  # rank 0's, shared in collective saves
        self._store = store(self.logdir, save_fn=save_fn, async_save=self.async_save, history=history)
        self._pattern = re.compile(rf"^{re.escape(checkpoint_names)}_(\d+){re.escape(store.suffix)}$")
        if metrics_file in store.links or self._pattern.match(metrics_file):
            raise ValueError(
                f"metrics_file must not be a name the manager writes checkpoints to "
                f"({', '.join(store.links)}, {checkpoint_names}_<epoch>{store.suffix}), got {metrics_file!r}"
            )
        self.checkpoint_names, self.metric = checkpoint_names, metric
        self.metrics_file = self.logdir / metrics_file
        self.values: list[dict[str, Any]] = []
        self.lost_epochs: list[int] = []
        self._files: dict[int, list[int]] = {}  # epoch -> [inode, size] of its numbered file, as written
        self._recorded_n_best: int | None = None
        self._extra: dict[str, Any] = {}  # other keys of metrics_file, kept as they are
        if distributed.is_main_process():
            self.logdir.mkdir(parents=True, exist_ok=True)
        loaded = self._load_history()
        numbered = sorted(p.name for p in self._numbered_files())
        # the history is written before the first numbered checkpoint: without records, at most one
        # numbered checkpoint (a save interrupted before it was recorded) can be the manager's own
        if (not loaded and numbered) or (loaded and not self.values and len(numbered) > 1):
            raise ValueError(
                f"'{self.logdir}' holds numbered checkpoints ({', '.join(numbered[:5])}"
                f"{', ...' if len(numbered) > 5 else ''}) but '{self.metrics_file.name}' has no history of "
                "them, so the manager cannot tell which are the best. Move them away, or build the manager "
                "with another logdir or checkpoint_names."
            )

    @property
    def save_fn(self) -> Callable[[Any, str], Any]:
        """``save_fn(obj, path)``; may be replaced between saves."""
        return self._store.save_fn

    @save_fn.setter
    def save_fn(self, value: Callable[[Any, str], Any]) -> None:
        self._store.save_fn = value

    # ----------------------------------------------------------------- history
    def _load_history(self) -> bool:
        """Read ``metrics_file`` into ``values`` / ``lost_epochs``; False if there is none."""
        saved = _history.read(self.metrics_file, self.metric, self.metric_minimization, self.sharded)
        if saved is None:
            return False
        self.values, self.lost_epochs, self._files = saved["values"], saved["lost_epochs"], saved["files"]
        self._recorded_n_best, self._extra = saved["save_n_best"], saved["extra"]
        return True

    def _write_metrics(self) -> None:
        extra = {"lost_epochs": self.lost_epochs} if self.lost_epochs else {}
        kept = set(self._kept_epochs())
        extra["files"] = {str(epoch): entry for epoch, entry in sorted(self._files.items()) if epoch in kept}
        atomic_write_json(
            self.metrics_file,
            {
                **self._extra,
                "metric_name": self.metric,
                "metric_minimization": self.metric_minimization,
                **self._store.marks,
                "save_n_best": self.save_n_best,
                "values": self.values,
                **extra,
            },
        )

    def _adopt(self, shared: tuple[list[dict[str, Any]], list[int]]) -> None:
        self.values, self.lost_epochs = (list(part) for part in shared)

    # ----------------------------------------------------------------- ranking
    def _path(self, epoch: int) -> Path:
        return self.logdir / f"{self.checkpoint_names}_{epoch}{self._store.suffix}"

    def _numbered_files(self) -> list[Path]:
        if not self.logdir.is_dir():
            return []
        return [entry for entry in self.logdir.iterdir() if self._pattern.match(entry.name)]

    def _ranked(self) -> list[dict[str, Any]]:
        """Records that can be best (finite score, file not lost), best first; ties to the newer epoch."""
        lost = set(self.lost_epochs)
        sign = 1 if self.metric_minimization else -1
        candidates = [r for r in self.values if r.get(self.metric) is not None and r["epoch"] not in lost]
        return sorted(candidates, key=lambda record: (sign * record[self.metric], -record["epoch"]))

    def _kept_epochs(self) -> list[int]:
        return [record["epoch"] for record in self._ranked()[: self.save_n_best]]

    @property
    def best(self) -> dict[str, Any] | None:
        """The best record so far (``{"epoch": ..., <metric>: ...}``), or None if no finite score yet."""
        ranked = self._ranked()
        return dict(ranked[0]) if ranked else None

    @property
    def best_epoch(self) -> int | None:
        """Epoch of the best record, or None."""
        best = self.best
        return None if best is None else best["epoch"]

    @property
    def best_score(self) -> float | None:
        """The best value of ``metric``, or None."""
        best = self.best
        return None if best is None else best[self.metric]

    # ----------------------------------------------------------------- saving
    def process(self, score: Any, epoch: int, checkpoint: Mapping[str, Any]) -> Path:
        """Save ``checkpoint`` for ``epoch`` and keep the N best (on global rank 0; a no-op elsewhere).

        With ``sharded=True``, a collective: call it on every rank, with this rank's ``checkpoint``.

        Args:
            score: the value of ``metric`` (a number, NumPy scalar, one-element tensor), or a dict of
                numbers holding ``metric``; every key of the dict is recorded.
            epoch: epoch number (int >= 0), above every epoch recorded so far.
            checkpoint: what to save, usually from ``make_checkpoint`` / ``make_training_state``.

        Returns:
            The path of the numbered checkpoint (deleted again if not among the N best).

        Raises:
            ValueError / TypeError / KeyError: on a bad score or epoch, or an epoch not after the
                newest recorded one (call :meth:`rewind` first), before anything is written.
            OSError: if writing fails; the previous files and history stay as they were.
            RuntimeError: with ``sharded=True``, on every rank when any rank failed (naming it).
        """
        epoch = check_int(epoch, "epoch", minimum=0)
        record = _history.make_record(score, epoch, self.metric)
        saved_epoch = checkpoint.get("epoch") if isinstance(checkpoint, Mapping) else None
        if isinstance(saved_epoch, (int, np.integer)) and not isinstance(saved_epoch, bool) and saved_epoch != epoch:
            raise ValueError(
                f"checkpoint['epoch'] is {saved_epoch} but process(epoch={epoch}): they must be the same, because "
                "restore_training_state(..., manager=manager) rewinds the manager to checkpoint['epoch'] (with "
                "another numbering it would delete the checkpoint resumed from)"
            )
        path = self._path(epoch)
        check, commit = (lambda: self._check_next(epoch)), (lambda payload: self._commit(record, payload))
        self._store.save(checkpoint, path.name, check=check, commit=commit, epoch=epoch)
        return path

    def _check_next(self, epoch: int) -> None:
        """Raise (on rank 0) if ``epoch`` cannot be saved next, against the history on disk."""
        if self._store.in_flight is None and self.metrics_file.exists():
            self._load_history()  # the history on disk is the truth (an interrupted call may have committed)
        in_flight = [] if self._store.in_flight is None else [self._store.in_flight]
        newest = max([*(record["epoch"] for record in self.values), *in_flight], default=None)
        _history.check_next(self.metrics_file, epoch, newest, self._recorded_n_best, self.save_n_best)

    def _commit(self, record: dict[str, Any], payload: Any) -> None:
        """Rank 0, once the checkpoint is written (``payload``): publish it, record it (the commit point), tidy."""
        epoch, path = record["epoch"], self._path(record["epoch"])
        self.logdir.mkdir(parents=True, exist_ok=True)
        if not self._load_history():
            self._write_metrics()  # before the first numbered checkpoint (or again, if deleted by hand)
        committed = False
        try:
            if not self._store.overwrites:
                newest = max((old["epoch"] for old in self.values), default=-1)
                self._store.remove([entry for entry in self._numbered_files() if self._epoch_of(entry) > newest])
            identity = self._store.publish(payload, path)
            if identity is not None:
                self._files[epoch] = identity  # to recognise its hard links later
            self.values = [*self.values, record]
            self.lost_epochs = [old for old in self.lost_epochs if old != epoch]
            self._write_metrics()  # the commit point
            committed = True
        finally:
            if not committed:  # whatever was raised, even KeyboardInterrupt: the disk says what is recorded
                self._store.discard(payload)
                if not _history.recorded_on_disk(self.metrics_file, epoch):
                    with contextlib.suppress(OSError):
                        self._store.remove([path])  # not recorded: leave no orphan behind
                with contextlib.suppress(Exception):
                    self._load_history()
        self._tidy()

    def _epoch_of(self, entry: Path) -> int:
        return int(self._pattern.match(entry.name)[1])

    def _restore_or_lose(self, warn: bool) -> None:
        """Make every kept epoch's checkpoint exist again, or mark the epoch lost (with a warning)."""
        newly_lost, expected = [], set(self._kept_epochs())  # the others' went with the N best before
        while missing := [epoch for epoch in self._kept_epochs() if not self._store.exists(self._path(epoch))]:
            for epoch in missing:
                if not self._store.restore(self._path(epoch), self._files.get(epoch)):
                    self.lost_epochs = sorted({*self.lost_epochs, epoch})
                    newly_lost.append(epoch)
        if newly_lost:
            self._write_metrics()
        newly_lost = [epoch for epoch in newly_lost if epoch in expected]
        if newly_lost and warn:
            warnings.warn(
                f"{self._store.missing.format(epochs=newly_lost, logdir=self.logdir)}: they no longer count as best "
                f"(their scores stay in '{self.metrics_file.name}' under 'lost_epochs')",
                stacklevel=4,
            )

    def _tidy(self, warn: bool = True) -> None:
        """Make the folder agree with the committed history: links, the N best, abandoned temporaries."""
        self._restore_or_lose(warn)
        newest = self.values[-1]["epoch"] if self.values else None
        last = self._path(newest) if newest is not None and self._store.exists(self._path(newest)) else None
        best = self.best_epoch
        self._store.point_links(None if best is None else self._path(best), last)
        kept, recorded = set(self._kept_epochs()), {record["epoch"] for record in self.values}
        if self._store.keeps_last and last is not None:
            kept.add(newest)
        newest_recorded = max(recorded, default=-1)
        # recorded epochs out of the N best, and epochs after the history (an interrupted save or
        # rewind); never other unrecorded checkpoints
        epochs = {entry: self._epoch_of(entry) for entry in self._numbered_files()}
        stale = [e for e, n in epochs.items() if n not in kept and (n in recorded or n > newest_recorded)]
        self._store.remove(stale, _abandoned(self.logdir))

    def save(self, checkpoint: Mapping[str, Any], name: str = "step") -> Path:
        """Save a checkpoint outside the history (e.g. a mid-epoch ``step``), replacing the previous one.

        Not numbered, not recorded, never best. With ``sharded=True``, a collective: a new folder
        ``{name}.<n>`` and the symbolic link ``{name}``.

        Args:
            checkpoint: what to save.
            name: a plain name; not ``best`` / ``last`` or a numbered name, not ending in ``.<digits>``.

        Returns:
            The path of the checkpoint: ``{name}.pth``, or the link ``{name}`` with ``sharded=True``.

        Raises:
            TypeError / ValueError: on a bad ``name``, before anything is written.
            OSError / RuntimeError: as :meth:`process`.
        """
        name = check_file_name(name, "name")
        path = self.logdir / f"{name}{self._store.suffix}"
        if (
            path.name in self._store.links
            or path.name == self.metrics_file.name
            or self._pattern.match(path.name)
            or re.search(r"\.\d+$", name)
            or name.startswith(".")
        ):
            raise ValueError(
                f"name must not be a name the manager uses ({', '.join(self._store.links)}, {self.metrics_file.name}, "
                f"{self.checkpoint_names}_<epoch>) nor start with '.' or end in '.<digits>', got {name!r}"
            )
        publish = self._store.publish_named
        self._store.save(checkpoint, path.name, check=lambda: None, commit=lambda payload: publish(payload, path))
        return path

    def wait(self) -> None:
        """Block until the asynchronous save in flight (if any) is written; re-raise its error."""
        self._store.wait()

    close = wait  # the name files and writers use; one method

    def rewind(self, epoch: int) -> None:
        """Forget the records after ``epoch`` (a run resumed from it); on global rank 0 also delete their
        checkpoints and point best / last at the remaining history. A no-op when nothing is newer.

        Raises:
            TypeError / ValueError: if ``epoch`` is not an int >= 0.
        """
        epoch = self._ready_to_rewind(epoch)
        if all(record["epoch"] <= epoch for record in self.values):
            return
        self.values = [record for record in self.values if record["epoch"] <= epoch]
        self.lost_epochs = [old for old in self.lost_epochs if old <= epoch]
        if distributed.is_main_process():
            self._write_metrics()
            self._tidy(warn=False)  # epochs back among the N best had their files deleted as expected

    def _ready_to_rewind(self, epoch: Any) -> int:
        """What :meth:`rewind` checks before it changes anything (``restore_training_state`` calls it first)."""
        epoch = check_int(epoch, "epoch", minimum=0)
        self.wait()
        if distributed.is_main_process() and self.metrics_file.exists():
            self._load_history()
        return epoch

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The manager's settings and history (what ``metrics_file`` holds)."""
        self.wait()
        return {
            "metric_name": self.metric,
            "metric_minimization": self.metric_minimization,
            "save_n_best": self.save_n_best,
            "values": [dict(record) for record in self.values],
            "lost_epochs": list(self.lost_epochs),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the history from :meth:`state_dict` (on global rank 0 also ``metrics_file`` and the folder).

        Raises:
            ValueError: if the state's metric name or direction differs, or its records are not usable.
        """
        self.wait()
        for key, mine in (("metric_name", self.metric), ("metric_minimization", self.metric_minimization)):
            if state.get(key) != mine:
                raise ValueError(f"state has {key}={state.get(key)!r}, but this manager has {mine!r}")
        self.values, self.lost_epochs = _history.checked(
            state.get("values"), state.get("lost_epochs", []), self.metrics_file, self.metric
        )
        if distributed.is_main_process():
            self.logdir.mkdir(parents=True, exist_ok=True)
            self._write_metrics()
            self._tidy()


def _abandoned(logdir: Path) -> list[Path]:
    """The temporary files and folders in ``logdir`` whose writer, on this host, is gone."""
    matches = [(entry, _TMP_WRITER.match(entry.name)) for entry in logdir.iterdir()]
    return [entry for entry, m in matches if m and m[2] in (None, socket.gethostname()) and not pid_alive(int(m[1]))]
