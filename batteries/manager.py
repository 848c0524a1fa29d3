"""CheckpointManager: the ledger of the N best checkpoints (history, ranking, metrics.json, rewind).

It decides what to keep, link and delete; a store (``_store_file``: one file per checkpoint,
``_store_dcp``: one DCP folder) writes, links and removes. See docs/checkpoint-manager.md.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from batteries import _history, _stateful, distributed
from batteries._checks import check_bool, check_file_name, check_int
from batteries._io import abandoned_temporaries
from batteries._store_dcp import DcpStore
from batteries._store_file import FileStore

__all__ = ["CheckpointManager"]


class CheckpointManager:
    """Save a checkpoint per epoch, keep the ``save_n_best`` best, and record every score.

    :meth:`process` writes ``{checkpoint_names}_{epoch}.pth``, records the score in ``metrics_file``,
    points ``best.pth`` / ``last.pth`` at it and deletes the files that fell out of the N best, on
    global rank 0. A folder with ``metrics_file`` is continued; epochs only go forward (:meth:`rewind`
    goes back). With ``sharded=True`` each checkpoint is a DCP folder and ``best`` / ``last`` are
    symbolic links; :meth:`process` and :meth:`save` are then collectives. See docs/checkpoint-manager.md.

    Args:
        logdir: folder for the checkpoints; created by the first save (building a manager writes nothing).
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
        store = DcpStore if self.sharded else FileStore
        _history.check_arguments(metric, checkpoint_names, metrics_file, save_fn, store.links, store.suffix)
        self.logdir, self.metrics_file = Path(logdir), Path(logdir) / metrics_file
        history = (lambda: (self.values, self.lost_epochs), self._adopt)  # rank 0's, shared in collective saves
        self.save_fn = save_fn  # may be replaced between saves
        writer = save_fn if self.sharded else lambda obj, path: self.save_fn(obj, path)
        self._store = store(self.logdir, save_fn=writer, async_save=self.async_save, history=history)
        self.checkpoint_names, self.metric, self._unit = checkpoint_names, metric, None
        self.values, self.lost_epochs = [], []  # the records, and recorded epochs whose checkpoint is gone
        self._files: dict[int, list[int]] = {}  # epoch -> [inode, size] of its numbered file, as written
        self._recorded_n_best: int | None = None
        self._extra: dict[str, Any] = {}  # other keys of metrics_file, kept as they are
        self._lineage: dict[str, str] = {}  # position -> token of its record: which history a checkpoint continues
        self._resumed: tuple[int, str] | None = None  # (position, token) of the last resume
        numbered = sorted(p.name for unit in _history.UNITS for p in self._numbered_files(unit))  # then the history,
        _history.check_numbered(self.metrics_file, self._load_history(), self.values, numbered)  # newer than them

    # ----------------------------------------------------------------- history
    def _load_history(self) -> bool:
        """Read ``metrics_file`` into ``values`` / ``lost_epochs``; False if there is none."""
        saved = _history.read(self.metrics_file, self.metric, self.metric_minimization, self.sharded)
        if saved is None:
            return False
        self.values, self.lost_epochs, self._files = saved["values"], saved["lost_epochs"], saved["files"]
        self._recorded_n_best, self._extra = saved["save_n_best"], saved["extra"]
        self._unit, self._lineage = saved["unit"], saved["lineage"]
        return True

    def _write_metrics(self) -> None:
        kept = set(self._kept_epochs())
        files = {str(epoch): entry for epoch, entry in sorted(self._files.items()) if epoch in kept}
        settings = {"metric_name": self.metric, "metric_minimization": self.metric_minimization, **self._store.marks}
        _history.write(self.metrics_file, self._extra, settings, self.unit, self.save_n_best, self.values,
                       self.lost_epochs, files, self._lineage)  # fmt: skip

    def _adopt(self, shared: tuple[list[dict[str, Any]], list[int]]) -> None:
        self.values, self.lost_epochs = (list(part) for part in shared)

    # ----------------------------------------------------------------- ranking
    @property
    def unit(self) -> str:
        """What the history counts: ``"epoch"`` (``process(score, epoch, ...)``) or ``"step"`` (``step=``)."""
        return self._unit or "epoch"

    @property
    def newest(self) -> int | None:
        """The newest recorded epoch (or step), None without history."""
        return self.values[-1][self.unit] if self.values else None

    def _numbered(self, unit: str) -> re.Pattern[str]:
        infix = "step" if unit == "step" else ""
        return re.compile(rf"^{re.escape(self.checkpoint_names)}_{infix}(\d+){re.escape(self._store.suffix)}$")

    @property
    def _pattern(self) -> re.Pattern[str]:
        return self._numbered(self.unit)

    def _path(self, epoch: int) -> Path:
        infix = "step" if self.unit == "step" else ""
        return self.logdir / f"{self.checkpoint_names}_{infix}{epoch}{self._store.suffix}"

    def _numbered_files(self, unit: str | None = None) -> list[Path]:
        pattern = self._numbered(unit or self.unit)
        return [entry for entry in self.logdir.iterdir() if pattern.match(entry.name)] if self.logdir.is_dir() else []

    def _ranked(self) -> list[dict[str, Any]]:
        """Records that can be best (finite score, file not lost), best first; ties to the newer epoch."""
        lost = set(self.lost_epochs)
        sign = 1 if self.metric_minimization else -1
        candidates = [r for r in self.values if r.get(self.metric) is not None and r[self.unit] not in lost]
        return sorted(candidates, key=lambda record: (sign * record[self.metric], -record[self.unit]))

    def _kept_epochs(self) -> list[int]:
        return [record[self.unit] for record in self._ranked()[: self.save_n_best]]

    @property
    def best(self) -> dict[str, Any] | None:
        """The best record so far (``{"epoch": ..., <metric>: ...}``), or None if no finite score yet."""
        ranked = self._ranked()
        return dict(ranked[0]) if ranked else None

    @property
    def best_epoch(self) -> int | None:
        """Epoch (or step) of the best record, or None."""
        return None if self.best is None else self.best[self.unit]

    @property
    def best_score(self) -> float | None:
        """The best value of ``metric``, or None."""
        return None if self.best is None else self.best[self.metric]

    # ----------------------------------------------------------------- saving
    def process(
        self,
        score: Any,
        epoch: int | None = None,
        checkpoint: Mapping[str, Any] | None = None,
        *,
        step: int | None = None,
    ) -> Path:
        """Save ``checkpoint`` for ``epoch`` (or ``step``) and keep the N best (on global rank 0; a no-op elsewhere).

        With ``sharded=True`` or a state, call it on every rank (with this rank's ``checkpoint``).

        Args:
            score: a number (NumPy scalar, one-element tensor) or a dict of numbers holding ``metric``.
            epoch: epoch number (int >= 0), above every epoch recorded so far.
            checkpoint: a state (``{"model": model, "optimizer": ..., "loader": ...}``, see :meth:`resume`)
                or a dict from ``make_training_state``.
            step: instead of ``epoch``, in loops that count iterations: the history then counts steps
                (``"step"`` records, files ``{checkpoint_names}_step{step}.pth``).

        Returns:
            The path of the numbered checkpoint (deleted again if not among the N best).

        Raises:
            ValueError / TypeError / KeyError: on a bad score or position, or one not after the newest
                recorded (call :meth:`rewind` first), before anything is written.
            OSError: if writing fails; the previous files and history stay as they were.
            RuntimeError: with ``sharded=True``, on every rank when any rank failed (naming it).
        """
        epoch, unit = self._position(epoch, step)
        record = _history.make_record(score, epoch, self.metric, unit)
        checkpoint, token = _stateful.prepare(checkpoint, unit, epoch, self.sharded)
        path = self._path(epoch)
        check, commit = (lambda: self._check_next(epoch)), (lambda payload: self._commit(record, payload, token))
        self._store.save(checkpoint, path.name, check=check, commit=commit, epoch=epoch)
        if token is not None and not distributed.is_main_process():
            self._lineage[str(epoch)] = token  # rank 0's is written with the record
        return path

    def _position(self, epoch: Any, step: Any) -> tuple[int, str]:
        """``(position, unit)`` of ``process`` / ``save``: exactly one of ``epoch`` and ``step``."""
        if (epoch is None) == (step is None):
            raise TypeError(f"pass exactly one of epoch and step, got epoch={epoch!r}, step={step!r}")
        unit = "epoch" if step is None else "step"
        if self._unit not in (None, unit) and (self.values or self._unit == "step"):
            raise ValueError(f"'{self.metrics_file}' counts {self._unit}s: pass {self._unit}=, not {unit}=")
        self._unit = unit
        return check_int(epoch if step is None else step, unit, minimum=0), unit

    def _check_next(self, epoch: int) -> None:
        """Raise (on rank 0) if ``epoch`` cannot be saved next, against the history on disk."""
        if self._store.in_flight is None and self.metrics_file.exists():
            self._load_history()  # the history on disk is the truth (an interrupted call may have committed)
        in_flight = [] if self._store.in_flight is None else [self._store.in_flight]
        newest = max([*(record[self.unit] for record in self.values), *in_flight], default=None)
        _history.check_next(self.metrics_file, epoch, newest, self._recorded_n_best, self.save_n_best, self.unit)

    def _commit(self, record: dict[str, Any], payload: Any, token: str | None = None) -> None:
        """Rank 0, once the checkpoint is written (``payload``): publish it, record it (the commit point), tidy."""
        epoch, path = record[self.unit], self._path(record[self.unit])
        self.logdir.mkdir(parents=True, exist_ok=True)
        if not self._load_history():
            self._write_metrics()  # before the first numbered checkpoint (or again, if deleted by hand)
        committed = False
        try:
            if not self._store.overwrites:
                newest = max((old[self.unit] for old in self.values), default=-1)
                self._store.remove([entry for entry in self._numbered_files() if self._epoch_of(entry) > newest])
            identity = self._store.publish(payload, path)
            if identity is not None:
                self._files[epoch] = identity  # to recognise its hard links later
            self.values = [*self.values, record]
            self.lost_epochs = [old for old in self.lost_epochs if old != epoch]
            self._lineage = {**self._lineage, str(epoch): token} if token else self._lineage
            self._write_metrics()  # the commit point
            committed = True
        finally:
            if not committed:  # whatever was raised, even KeyboardInterrupt: the disk says what is recorded
                self._store.discard(payload)
                if not _history.recorded_on_disk(self.metrics_file, epoch, self.unit):
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
        newest = self.newest
        last = self._path(newest) if newest is not None and self._store.exists(self._path(newest)) else None
        best = self.best_epoch
        self._store.point_links(None if best is None else self._path(best), last)
        kept, recorded = set(self._kept_epochs()), {record[self.unit] for record in self.values}
        if self._store.keeps_last and last is not None:
            kept.add(newest)
        newest_recorded = max(recorded, default=-1)
        # recorded epochs out of the N best, and epochs after the history (an interrupted save or
        # rewind); never other unrecorded checkpoints
        epochs = {entry: self._epoch_of(entry) for entry in self._numbered_files()}
        stale = [e for e, n in epochs.items() if n not in kept and (n in recorded or n > newest_recorded)]
        self._store.remove(stale, abandoned_temporaries(self.logdir))

    def save(self, checkpoint: Mapping[str, Any], name: str = "step", *, step: int | None = None) -> Path:
        """Save a checkpoint outside the history (e.g. a mid-epoch ``step``), replacing the previous one.

        Not numbered, not recorded, never best; ``resume(state, "auto")`` takes it when it continues
        the history. With ``sharded=True``, a collective: a new folder ``{name}.<n>`` and the symbolic
        link ``{name}``.

        Args:
            checkpoint: a state (see :meth:`resume`; call it on every rank then), or a checkpoint dict.
            name: a plain name; not ``best`` / ``last`` or a numbered name, not ending in ``.<digits>``.
            step: with a state of a history that counts steps, the step reached (required there).

        Returns:
            The path of the checkpoint: ``{name}.pth``, or the link ``{name}`` with ``sharded=True``.

        Raises:
            TypeError / ValueError: on a bad ``name``, before anything is written.
            OSError / RuntimeError: as :meth:`process`.
        """
        path = self.logdir / f"{check_file_name(name, 'name')}{self._store.suffix}"
        _history.check_named(name, path.name, (*self._store.links, self.metrics_file.name), self._pattern)
        if _stateful.is_state(checkpoint):
            checkpoint = _stateful.between(self, checkpoint, step)
        publish = self._store.publish_named
        self._store.save(checkpoint, path.name, check=lambda: None, commit=lambda payload: publish(payload, path))
        return path

    def resume(
        self, state: dict[str, Any], source: Any = "auto", *, strict: bool = True, map_location: Any = "cpu"
    ) -> int:
        """Restore ``state`` in place from a checkpoint and rewind the history to it (call it on every rank).

        A state is a dict of the run's live objects: ``"model"``, optionally ``"optimizer"``, ``"scheduler"``,
        any object with ``state_dict`` / ``load_state_dict`` (a ``make_loader`` loader: its position), and
        plain values (restored into the dict); :meth:`process` and :meth:`save` take it too. See docs/resume.md.

        Args:
            state: the dict to restore in place.
            source: ``"auto"``: the newest checkpoint of this history (``step.pth`` / ``last.pth``; a fresh
                start without history); a path: that checkpoint; None: a fresh start, refused over a history.
            strict, map_location: as :func:`load_checkpoint`.

        Returns:
            The last finished epoch (or the step) of the checkpoint; 0 for a fresh start.

        Raises:
            ValueError: ``source=None`` over a history, or ``"auto"`` with a history nothing continues.
            KeyError / RuntimeError: as :func:`restore_training_state` (nothing is restored).
        """
        return _stateful.resume(self, state, source, strict=strict, map_location=map_location)

    def wait(self) -> None:
        """Block until the asynchronous save in flight (if any) is written; re-raise its error."""
        self._store.wait()

    close = wait  # the name files and writers use; one method

    def rewind(self, epoch: int, *, lineage: str | None = None) -> None:
        """Forget the records after ``epoch`` (or step; a run resumed from it); on global rank 0 also delete
        their checkpoints and point best / last at the rest. ``lineage``: the resumed checkpoint's token.

        Raises:
            TypeError / ValueError: if ``epoch`` is not an int >= 0.
        """
        epoch = self._ready_to_rewind(epoch)
        kept = {key: value for key, value in self._lineage.items() if int(key) < epoch}
        lineage = lineage or self._lineage.get(str(epoch))
        kept.update({str(epoch): lineage} if lineage and any(r[self.unit] == epoch for r in self.values) else {})
        if all(record[self.unit] <= epoch for record in self.values) and kept == self._lineage:
            return
        self.values = [record for record in self.values if record[self.unit] <= epoch]
        self.lost_epochs, self._lineage = [old for old in self.lost_epochs if old <= epoch], kept
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
        settings = {"metric_name": self.metric, "metric_minimization": self.metric_minimization}
        return {**settings, "save_n_best": self.save_n_best, "values": [dict(r) for r in self.values],
                "lost_epochs": list(self.lost_epochs)}  # fmt: skip

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
