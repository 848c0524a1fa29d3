"""CheckpointManager: keep the N best checkpoints (files, or sharded DCP folders), best / last and a metrics history."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import socket
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batteries import _dcp, distributed
from batteries._async import AsyncWriter
from batteries._checks import check_bool, check_file_name, check_int
from batteries._io import (
    TMP_MARK,
    atomic_link,
    atomic_write,
    atomic_write_json,
    pid_alive,
    remove_durably,
    tmp_path,
)

__all__ = ["CheckpointManager"]

_LINKS = ("best.pth", "last.pth")
_SHARDED_LINKS = ("best", "last")
# the writer's pid and host in a temporary name (_io.tmp_path); names of older versions carry no host
_TMP_WRITER = re.compile(rf"^\..+{re.escape(TMP_MARK)}(\d+)-[0-9a-f]{{8}}(?:-(.+))?$")


def _describe(error: BaseException | None) -> str | None:
    """An error as one picklable line for the other ranks (None stays None)."""
    return None if error is None else f"{type(error).__name__}: {error}"


def _number(value: Any, where: str) -> float | int | None:
    """A JSON-safe number: tensors / NumPy scalars to Python, NaN and inf to None (null)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{where} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where} must be a number, got {value!r} ({type(value).__name__})")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class CheckpointManager:
    """Save a checkpoint per epoch, keep the ``save_n_best`` best, and record every score.

    Each :meth:`process` call writes ``{checkpoint_names}_{epoch}.pth`` crash-safely, records the
    score in ``metrics_file`` (the commit point), points ``last.pth`` (and ``best.pth`` when the
    score is the best so far) at it with hard links, and deletes the numbered files that fell out of
    the N best. A ``kill -9`` at any instant leaves every visible file complete; the next
    :meth:`process` finishes what the killed one left (links, clean-up, temporary files of dead
    processes).

    ``metrics.json`` holds ``{"metric_name", "metric_minimization", "save_n_best", "values": [...]}``,
    one record per epoch: ``{"epoch": e, <metric>: v, ...other score keys}``. NaN / inf are stored
    as ``null`` (strict JSON) and never count as best. Ties go to the newer epoch.

    Who changes the folder: only :meth:`process`, :meth:`rewind` and :meth:`load_state_dict` on
    global rank 0. Building a manager only reads ``metrics_file``, so a manager may be built on
    every rank, or by a monitoring script, over a folder that another process is writing; on
    ranks other than 0 :meth:`process` is a no-op that returns the path (no collective runs), so
    both ``if rank == 0: manager.process(...)`` and calling it on every rank are right.

    History: a manager built over a folder that has ``metrics_file`` continues it (history, N-best
    set, best), also the files the original batteries toolkit wrote. Epochs only go forward: an
    epoch at or below the newest recorded one raises ``ValueError``; :meth:`rewind` is the explicit
    way back (``restore_training_state(..., manager=...)`` calls it). Whether an epoch is recorded
    is read from ``metrics_file`` on disk, never assumed: once it records an epoch, no error path
    deletes that epoch's file.

    A recorded epoch whose numbered file is gone (deleted by hand, a partial copy) is restored from
    ``best.pth`` / ``last.pth`` when one of them holds it (read with ``weights_only=True``);
    otherwise it is marked lost with a warning (its scores stay in the history, listed under
    ``"lost_epochs"``) and no longer counts as best. Later saves go on either way.

    Sharded checkpoints (``sharded=True``, for FSDP2 and other sharded models): each checkpoint is
    a ``torch.distributed.checkpoint`` (DCP) folder ``{checkpoint_names}_{epoch}/`` in which every
    rank writes its own shards, optimizer state included (build it with
    ``make_training_state(..., sharded=True)``); nothing is gathered to rank 0. Then:

    - :meth:`process` (and :meth:`save`) is a collective: call it on every rank, with the same
      arguments. Rank 0 chooses a hidden temporary folder name and sends it to the others; every
      rank writes into it; DCP writes ``.metadata`` once all shards are written (each file
      fsynced); rank 0 fsyncs the folder and renames it to its numbered name, the commit of the
      data, then records the epoch in ``metrics_file``, the commit point. Only global rank 0
      renames, links, writes ``metrics_file`` or deletes. Every rank raises if any rank failed.
    - ``best`` and ``last`` are relative symbolic links to numbered folders, replaced atomically
      (a new link under a temporary name, ``os.replace``d over the old one). A link cannot keep a
      deleted folder's files alive as a file's hard link does, so the newest epoch's folder is
      kept while it is ``last``, even when its score is not among the N best: the folder then
      holds up to ``save_n_best + 1`` numbered checkpoints (the extra one goes at the next save).
    - Deleting a folder renames it to a hidden temporary name first: a ``kill -9`` of any rank at
      any instant leaves every visible folder complete (an unfinished save is a hidden
      temporary folder, removed by a later :meth:`process` once its writer is gone).
    - A recorded epoch whose folder is gone is marked lost (a symbolic link cannot restore it).
    - ``metrics_file`` has the same layout, with ``"sharded": true``; a manager of the other kind
      refuses the folder.

    Args:
        logdir: folder for the checkpoints; created (on rank 0) if missing.
        checkpoint_names: file name prefix. Default ``"exp"``.
        metric: the key of the score that decides the best. Default ``"loss"``.
        metric_minimization: True if lower is better (a bool: ``"False"`` or None raise). Default True.
        save_n_best: number of numbered checkpoints to keep (int >= 1). Default 1.
        save_fn: ``save_fn(obj, path)``. Default ``torch.save``.
        metrics_file: name of the history file inside ``logdir``; not ``best.pth``, ``last.pth`` or a
            numbered name. Default ``"metrics.json"``.
        async_save: write on a background thread: :meth:`process` returns once the checkpoint's
            tensors are copied to CPU memory. At most one save is in flight (the next
            :meth:`process` waits for it); its error is raised by the next :meth:`process`,
            :meth:`wait` or :meth:`close`. ``best`` / ``values`` reflect finished saves: call
            :meth:`wait` before reading them. The crash-safety guarantees are the same. With
            ``sharded=True`` it uses ``dcp.async_save`` on a gloo process group of its own (made by
            the first :meth:`process`, on every rank): ``process`` returns once the shards are
            copied to CPU memory; rank 0 renames and records the folder only after every rank's
            files are written. A failure is raised by the next ``process`` on every rank, or by
            :meth:`wait` / :meth:`close` on the rank where it happened. Default False.
        sharded: write DCP checkpoint folders (see above) instead of files. ``save_fn`` is not used
            then. Default False.

    Raises:
        TypeError: on an argument of the wrong type.
        ValueError: on a bad argument value (``save_fn`` given with ``sharded=True``); if
            ``metrics_file`` was written by a manager of the other kind (files / sharded); if
            ``metrics_file`` cannot be continued (not JSON,
            ``null``, records without an epoch or with non-numeric values, another metric name or
            direction); or if ``logdir`` holds numbered checkpoints but no ``metrics_file``. The
            message names the file and says what to do; nothing is deleted.

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
        self.async_save = check_bool(async_save, "async_save")
        self.sharded = check_bool(sharded, "sharded")
        if not isinstance(metric, str) or not metric or metric == "epoch":
            raise ValueError(f"metric must be a non-empty str other than 'epoch', got {metric!r}")
        check_file_name(checkpoint_names, "checkpoint_names")
        check_file_name(metrics_file, "metrics_file")
        if not callable(save_fn):
            raise TypeError(f"save_fn must be callable as save_fn(obj, path), got {save_fn!r}")
        if self.sharded and save_fn is not torch.save:
            raise ValueError(f"save_fn is not used with sharded=True (DCP writes the shards), got {save_fn!r}")
        suffix = "" if self.sharded else ".pth"
        self._links = _SHARDED_LINKS if self.sharded else _LINKS
        self._pattern = re.compile(rf"^{re.escape(checkpoint_names)}_(\d+){re.escape(suffix)}$")
        if metrics_file in self._links or self._pattern.match(metrics_file):
            raise ValueError(
                f"metrics_file must not be a name the manager writes checkpoints to "
                f"({', '.join(self._links)}, {checkpoint_names}_<epoch>{suffix}), got {metrics_file!r}"
            )
        self.logdir = Path(logdir)
        self.checkpoint_names = checkpoint_names
        self.metric = metric
        self.save_fn = save_fn
        self.metrics_file = self.logdir / metrics_file
        self._writer = AsyncWriter()
        self._submitted: int | None = None  # epoch of the asynchronous save in flight
        self.values: list[dict[str, Any]] = []
        self.lost_epochs: list[int] = []
        self._files: dict[int, list[int]] = {}  # epoch -> [inode, size] of its numbered file, as written
        self._recorded_n_best: int | None = None
        self._extra: dict[str, Any] = {}
        self._async_group: Any = None  # the gloo group of sharded asynchronous saves, made on first use
        if distributed.is_main_process():
            self.logdir.mkdir(parents=True, exist_ok=True)
        loaded = self._load_history()
        numbered = sorted(p.name for p in self._numbered_files())
        # the manager writes its history before its first numbered file: without records, at most one
        # numbered file (a save interrupted before it was recorded) can be its own
        if (not loaded and numbered) or (loaded and not self.values and len(numbered) > 1):
            raise ValueError(
                f"'{self.logdir}' holds numbered checkpoints ({', '.join(numbered[:5])}"
                f"{', ...' if len(numbered) > 5 else ''}) but '{self.metrics_file.name}' has no history of "
                "them, so the manager cannot tell which are the best. Move them away, or build the manager "
                "with another logdir or checkpoint_names."
            )

    # ----------------------------------------------------------------- history
    def _unusable(self, problem: str) -> ValueError:
        return ValueError(
            f"'{self.metrics_file}' {problem}; the manager cannot continue this history. Move the file "
            "(and the checkpoints beside it) away, or build the manager with another logdir."
        )

    def _load_history(self) -> bool:
        """Read ``metrics_file`` into ``values`` / ``lost_epochs``; False if there is none."""
        try:
            raw = self.metrics_file.read_bytes()
        except FileNotFoundError:
            return False
        except IsADirectoryError:
            raise self._unusable("is a folder, not a metrics file") from None
        try:
            saved = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise self._unusable(f"is not a JSON metrics file ({error})") from error
        if isinstance(saved, list):  # the original toolkit's first format: the records alone
            saved = {"metric_name": self.metric, "metric_minimization": self.metric_minimization, "values": saved}
        if not isinstance(saved, dict) or not isinstance(saved.get("values"), list):
            raise self._unusable(f'holds {type(saved).__name__} {str(saved)[:60]}, not {{"values": [...], ...}}')
        for key, mine in (("metric_name", self.metric), ("metric_minimization", self.metric_minimization)):
            if key not in saved or type(saved[key]) is not type(mine):
                raise self._unusable(f"has {key}={saved.get(key)!r}, expected a {type(mine).__name__}")
            if saved[key] != mine:
                raise ValueError(
                    f"'{self.metrics_file}' records {key}={saved[key]!r}, but this manager was built with "
                    f"{'metric' if key == 'metric_name' else key}={mine!r}; build it with the same value, or "
                    "use another logdir"
                )
        if saved.get("sharded", False) is not self.sharded:
            kinds = {True: "sharded checkpoint folders (sharded=True)", False: "checkpoint files (sharded=False)"}
            raise ValueError(
                f"'{self.metrics_file}' is the history of {kinds[saved.get('sharded') is True]}, but this manager "
                f"was built with sharded={self.sharded}; build it with the same kind, or use another logdir"
            )
        recorded_n_best = saved.get("save_n_best")
        self._recorded_n_best = recorded_n_best if type(recorded_n_best) is int else None
        self.values, self.lost_epochs = self._checked_history(saved["values"], saved.get("lost_epochs", []))
        files = saved.get("files", {})
        self._files = {int(k): v for k, v in files.items() if k.isdigit()} if isinstance(files, dict) else {}
        known = {"metric_name", "metric_minimization", "save_n_best", "values", "lost_epochs", "files", "sharded"}
        self._extra = {key: value for key, value in saved.items() if key not in known}
        return True

    def _checked_history(self, records: Any, lost: Any) -> tuple[list[dict[str, Any]], list[int]]:
        if not isinstance(records, list):
            raise self._unusable(f"has values={str(records)[:60]}, expected a list of records")
        values = [self._check_record(record, index) for index, record in enumerate(records)]
        epochs = [record["epoch"] for record in values]
        if any(later <= earlier for earlier, later in zip(epochs, epochs[1:])):
            raise self._unusable(f"records epochs out of order or twice ({epochs})")
        if not isinstance(lost, list) or not all(type(epoch) is int for epoch in lost):
            raise self._unusable(f"has lost_epochs={lost!r}, expected a list of ints")
        return values, sorted(set(lost))

    def _check_record(self, record: Any, index: int) -> dict[str, Any]:
        where = f"record {index} ({record!r})"
        if not isinstance(record, dict):
            raise self._unusable(f"{where} is not a dict")
        epoch = record.get("epoch")
        if type(epoch) is not int or epoch < 0:
            raise self._unusable(f"{where} has no int epoch >= 0")
        if self.metric not in record:
            raise self._unusable(f"{where} has no {self.metric!r} value")
        checked: dict[str, Any] = {"epoch": epoch}
        for key, value in record.items():
            if key == "epoch":
                continue
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise self._unusable(f"{where} has {key}={value!r}, expected a number or null")
            # NaN / Infinity literals (json.dump's default, the original toolkit's) read as null
            checked[key] = None if value is None or not math.isfinite(value) else value
        return checked

    def _path(self, epoch: int) -> Path:
        return self.logdir / f"{self.checkpoint_names}_{epoch}{'' if self.sharded else '.pth'}"

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
                **({"sharded": True} if self.sharded else {}),
                "save_n_best": self.save_n_best,
                "values": self.values,
                **extra,
            },
        )

    def _recorded_on_disk(self, epoch: int) -> bool:
        """Whether ``metrics_file`` on disk records ``epoch``; True when it cannot be read (keep files)."""
        try:
            saved = json.loads(self.metrics_file.read_text(encoding="utf-8"))
            return any(record.get("epoch") == epoch for record in saved["values"])
        except Exception:  # noqa: BLE001 - unreadable: assume recorded, so that nothing is deleted
            return True

    # ----------------------------------------------------------------- saving
    def _record(self, score: Any, epoch: int) -> dict[str, Any]:
        if isinstance(score, Mapping):
            if self.metric not in score:
                raise KeyError(f"score dict has no key {self.metric!r} (the manager's metric); keys: {list(score)}")
            if "epoch" in score:
                raise ValueError("score dict must not hold the key 'epoch'; the epoch argument sets it")
            items = dict(score)
        else:
            items = {self.metric: score}
        record: dict[str, Any] = {"epoch": epoch}
        for key, value in items.items():
            if not isinstance(key, str):
                raise TypeError(f"score keys must be str, got {key!r}")
            record[key] = _number(value, f"score[{key!r}]")
        return record

    def _newest_epoch(self) -> int | None:
        epochs = [record["epoch"] for record in self.values]
        if self._submitted is not None:
            epochs.append(self._submitted)
        return max(epochs, default=None)

    def process(self, score: Any, epoch: int, checkpoint: Mapping[str, Any]) -> Path:
        """Save ``checkpoint`` for ``epoch`` and keep the N best (on global rank 0; a no-op elsewhere).

        With ``sharded=True`` it is a collective instead: call it on every rank with the same
        ``score`` and ``epoch`` and this rank's ``checkpoint``; every rank writes its shards.

        Args:
            score: the value of ``metric`` (a number, NumPy scalar or one-element tensor), or a dict
                of numbers holding ``metric``; every key of the dict is recorded.
            epoch: epoch number (int >= 0, NumPy integers too), above every epoch recorded so far;
                names the file ``{checkpoint_names}_{epoch}.pth`` (the folder
                ``{checkpoint_names}_{epoch}`` with ``sharded=True``).
            checkpoint: what to save, usually from ``make_checkpoint`` (``make_training_state(...,
                sharded=True)`` with ``sharded=True``).

        Returns:
            The path of the numbered checkpoint (it may already be deleted again if its score is not
            among the N best; ``last.pth`` still holds it).

        Raises:
            ValueError / TypeError / KeyError: on a bad score or epoch, or an epoch at or below the
                newest recorded one (call :meth:`rewind` first to go back), before anything is written.
            ValueError: if ``metrics_file`` was made unusable since the manager was built; with
                ``sharded=True``, if the optimizer state is keyed by position (not by parameter name).
            OSError: if writing fails; the previous files and history are left as they were.
            RuntimeError: with ``sharded=True``, on every rank where another rank failed (the message
                names it), or where DCP failed (``CheckpointException``).
        """
        epoch = check_int(epoch, "epoch", minimum=0)
        record = self._record(score, epoch)
        saved_epoch = checkpoint.get("epoch") if isinstance(checkpoint, Mapping) else None
        if isinstance(saved_epoch, (int, np.integer)) and not isinstance(saved_epoch, bool) and saved_epoch != epoch:
            raise ValueError(
                f"checkpoint['epoch'] is {saved_epoch} but process(epoch={epoch}): they must be the same, because "
                "restore_training_state(..., manager=manager) rewinds the manager to checkpoint['epoch'] (with "
                "another numbering it would delete the checkpoint resumed from)"
            )
        if self.sharded:
            return self._process_sharded(record, checkpoint)
        if not distributed.is_main_process():
            return self._path(epoch)
        if not self.async_save:
            self._writer.wait()
        self._check_next(epoch)
        if self.async_save:  # the snapshot is taken here, in the caller: training may change the tensors right after
            self._submitted = epoch  # before the job may start (and end, setting it back to None)
            try:
                self._writer.submit(checkpoint, lambda data: self._commit_async(record, data))
            except BaseException:
                self._submitted = None
                raise
        else:
            self._commit(record, checkpoint)
        return self._path(epoch)

    def _check_next(self, epoch: int) -> None:
        """Raise (on rank 0) if ``epoch`` cannot be saved next, against the history on disk."""
        if self._submitted is None and self.metrics_file.exists():
            self._load_history()  # the history on disk is the truth (an interrupted call may have committed)
        if self._recorded_n_best is not None and self._recorded_n_best > self.save_n_best:
            raise ValueError(
                f"'{self.metrics_file}' records save_n_best={self._recorded_n_best}, but this manager was built "
                f"with save_n_best={self.save_n_best}, which would delete kept checkpoints; build it with "
                f"save_n_best={self._recorded_n_best} (or more) to continue, or use another logdir"
            )
        newest = self._newest_epoch()
        if newest is not None and epoch <= newest:
            raise ValueError(
                f"epoch {epoch} is not after the newest recorded epoch {newest} in '{self.metrics_file}'. "
                f"To go back (a run resumed from an earlier checkpoint), call manager.rewind({epoch - 1}) "
                "first, which forgets the later epochs and deletes their files; restore_training_state("
                "..., manager=manager) does it for you."
            )

    def _commit_async(self, record: dict[str, Any], checkpoint: Mapping[str, Any]) -> None:
        try:
            self._commit(record, checkpoint)
        finally:
            self._submitted = None

    def _commit(self, record: dict[str, Any], checkpoint: Mapping[str, Any]) -> None:
        epoch = record["epoch"]
        path = self._path(epoch)
        self.logdir.mkdir(parents=True, exist_ok=True)
        if not self._load_history():
            # written before the first numbered file, so that a folder with numbered files and no
            # history never comes from a manager (it is refused, not guessed at); and rewritten from
            # memory if it was deleted by hand, so that the N best already saved stay the N best
            self._write_metrics()
        committed = False
        try:
            atomic_write(path, lambda tmp: self.save_fn(checkpoint, str(tmp)))
            written = path.stat()
            self._files[epoch] = [written.st_ino, written.st_size]  # to recognise its hard links later
            self.values = [*self.values, record]
            self.lost_epochs = [old for old in self.lost_epochs if old != epoch]
            self._write_metrics()  # the commit point
            committed = True
        finally:
            if not committed:  # whatever was raised, even KeyboardInterrupt: the disk says what is recorded
                if not self._recorded_on_disk(epoch):
                    with contextlib.suppress(OSError):
                        remove_durably([path])  # not recorded: leave no orphan behind
                with contextlib.suppress(Exception):
                    self._load_history()
        self._tidy()

    def _holds_epoch(self, source: Path, epoch: int) -> bool:
        """Whether ``source`` (best.pth / last.pth) is a hard link to the file written for ``epoch``.

        Decided from the inode and size recorded when that file was written, never from the content
        (another manager's or another numbering's checkpoint may say the same epoch). A copy (on file
        systems without hard links) cannot be recognised: the epoch is then marked lost instead.
        """
        try:
            stat = source.stat()
        except OSError:
            return False
        return self._files.get(epoch) == [stat.st_ino, stat.st_size]

    def _restore_or_lose(self, warn: bool = True) -> None:
        """Make every kept epoch's numbered file exist again, or mark the epoch lost (with a warning)."""
        newly_lost, expected = [], set(self._kept_epochs())  # the others' files went with the N best before
        while True:
            missing = [epoch for epoch in self._kept_epochs() if not self._path(epoch).exists()]
            if not missing:
                break
            for epoch in missing:
                source = next((self.logdir / n for n in _LINKS if self._holds_epoch(self.logdir / n, epoch)), None)
                if source is not None:
                    atomic_link(source, self._path(epoch))
                else:
                    self.lost_epochs = sorted({*self.lost_epochs, epoch})
                    newly_lost.append(epoch)
        if newly_lost:
            self._write_metrics()
        newly_lost = [epoch for epoch in newly_lost if epoch in expected]
        if newly_lost and warn:
            warnings.warn(
                f"checkpoints of recorded epochs {newly_lost} are missing from '{self.logdir}' and neither "
                "best.pth nor last.pth holds them: they no longer count as best (their scores stay in "
                f"'{self.metrics_file.name}' under 'lost_epochs')",
                stacklevel=4,
            )

    def _tidy(self, warn: bool = True) -> None:
        """Make the folder agree with the committed history: links, the N best, abandoned temporaries."""
        if self.sharded:
            self._tidy_sharded(warn)
            return
        self._restore_or_lose(warn)
        if self.values:
            newest = self._path(self.values[-1]["epoch"])
            if newest.exists():
                atomic_link(newest, self.logdir / "last.pth")
        best = self.best_epoch
        if best is not None:
            atomic_link(self._path(best), self.logdir / "best.pth")
        kept, recorded = set(self._kept_epochs()), {record["epoch"] for record in self.values}
        newest = max(recorded, default=-1)
        stale = []  # recorded epochs out of the N best, and files of epochs after the history (an
        for entry in self._numbered_files():  # interrupted save or rewind); never other unrecorded files
            epoch = int(self._pattern.match(entry.name)[1])
            if epoch not in kept and (epoch in recorded or epoch > newest):
                stale.append(entry)
        for entry in self.logdir.iterdir():
            match = _TMP_WRITER.match(entry.name)  # a temporary file whose writer, on this host, is gone
            if match and match[2] in (None, socket.gethostname()) and not pid_alive(int(match[1])):
                stale.append(entry)
        remove_durably(stale)

    # ----------------------------------------------------------------- sharded (DCP) checkpoints
    def _process_sharded(self, record: dict[str, Any], checkpoint: Mapping[str, Any]) -> Path:
        epoch = record["epoch"]
        tmp = self._begin_sharded(checkpoint, self._path(epoch).name, lambda: self._check_next(epoch))
        self._write_sharded(checkpoint, tmp, lambda: self._commit_sharded(record, tmp), epoch=epoch)
        return self._path(epoch)

    def save(self, checkpoint: Mapping[str, Any], name: str = "step") -> Path:
        """Save a checkpoint outside the history, e.g. a mid-epoch ``step`` checkpoint to resume from.

        It is not numbered, not recorded in ``metrics_file`` and never best; each call replaces the
        previous checkpoint of that ``name`` atomically. Without ``sharded`` it writes
        ``{name}.pth`` crash-safely on global rank 0 (a no-op elsewhere), as ``save_checkpoint``
        does. With ``sharded=True`` it is a collective: every rank writes its shards into a new
        folder ``{name}.<n>`` (committed as in :meth:`process`), then rank 0 points the relative
        symbolic link ``{name}`` at it and deletes the older ``{name}.<n>`` folders. With
        ``async_save=True`` it returns once the checkpoint is copied to CPU memory, as
        :meth:`process`.

        Args:
            checkpoint: what to save (``make_training_state(..., sharded=True)`` with ``sharded=True``).
            name: a plain name, not ``best`` / ``last`` or a name the manager numbers, not ending in
                ``.<digits>``. Default ``"step"``.

        Returns:
            The path of the checkpoint: ``{name}.pth``, or the link ``{name}`` with ``sharded=True``.

        Raises:
            TypeError / ValueError: on a bad ``name``, before anything is written.
            OSError / RuntimeError: as :meth:`process`; the previous checkpoint of that name stays.
        """
        name = check_file_name(name, "name")
        file_name = name if self.sharded else f"{name}.pth"
        if (
            file_name in self._links
            or file_name == self.metrics_file.name
            or self._pattern.match(file_name)
            or re.search(r"\.\d+$", name)
            or name.startswith(".")
        ):
            raise ValueError(
                f"name must not be a name the manager uses ({', '.join(self._links)}, {self.metrics_file.name}, "
                f"{self.checkpoint_names}_<epoch>) nor start with '.' or end in '.<digits>', got {name!r}"
            )
        path = self.logdir / file_name
        if not self.sharded:
            if distributed.is_main_process():

                def write(data: Mapping[str, Any]) -> None:
                    self.logdir.mkdir(parents=True, exist_ok=True)
                    atomic_write(path, lambda tmp: self.save_fn(data, str(tmp)))

                if self.async_save:
                    self._writer.submit(checkpoint, write)
                else:
                    self._writer.wait()
                    write(checkpoint)
            return path
        tmp = self._begin_sharded(checkpoint, name, lambda: None)
        self._write_sharded(checkpoint, tmp, lambda: self._commit_named(name, tmp))
        return path

    def _begin_sharded(self, checkpoint: Mapping[str, Any], final_name: str, check: Callable[[], None]) -> Path:
        """Every rank: wait for its own save in flight, check, agree on rank 0's temporary folder name.

        One collective carries every rank's outcome, so that all ranks raise together (a rank that
        raised alone would leave the others waiting in the next collective).
        """
        try:
            self._writer.wait()
            pending = None
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as error:  # noqa: BLE001 - exchanged below, then raised
            pending = _dcp.plain_error(error)
        mine, proposal = None, None
        try:
            _dcp.check_state(checkpoint)
            if pending is None and distributed.is_main_process():
                check()
                self.logdir.mkdir(parents=True, exist_ok=True)
                proposal = tmp_path(self.logdir / final_name).name  # the writer's pid and host: see _tidy
        except Exception as error:  # noqa: BLE001 - exchanged below, then raised
            mine = error
        history = (self.values, self.lost_epochs) if distributed.is_main_process() else None
        outcomes = distributed.all_gather((_describe(pending), _describe(mine), proposal, history))
        if not distributed.is_main_process() and outcomes[0][3] is not None:  # rank 0's, as of its last commit
            self.values, self.lost_epochs = (list(part) for part in outcomes[0][3])
        if pending is not None:
            raise pending
        if mine is not None:
            raise mine
        for rank, (earlier, error, *_) in enumerate(outcomes):
            if earlier or error:
                what = f"a previous asynchronous save failed on rank {rank}" if earlier else f"rank {rank} failed"
                raise RuntimeError(f"CheckpointManager: {what}: {earlier or error}; nothing was saved")
        return self.logdir / outcomes[0][2]

    def _write_sharded(
        self, checkpoint: Mapping[str, Any], tmp: Path, commit: Callable[[], None], epoch: int | None = None
    ) -> None:
        """Every rank writes its share into ``tmp``; once all are written, rank 0 runs ``commit``."""
        main = distributed.is_main_process()
        share = _dcp.rank_share(checkpoint)
        if self.async_save:
            if self._async_group is None and distributed.is_initialized():
                # never the default group: DCP's background collectives would interleave with training's
                self._async_group = torch.distributed.new_group(backend="gloo")
            future = _dcp.save(share, tmp, group=self._async_group, asynchronous=True)
            if main:
                self._submitted = epoch
            try:
                self._writer.submit(None, lambda _: self._finish_sharded(future, tmp, commit if main else None))
            except BaseException:
                self._submitted = None
                raise
            return
        try:
            _dcp.save(share, tmp)  # raises on every rank if any rank failed (DCP gathers the errors)
        except BaseException:
            if main:
                with contextlib.suppress(OSError):
                    _dcp.remove_temporary(tmp)
            raise
        error: BaseException | None = None
        if main:
            try:
                commit()
            except Exception as caught:  # noqa: BLE001 - exchanged below, then raised
                error = caught
        history = (self.values, self.lost_epochs) if main else None
        outcomes = distributed.all_gather((_describe(error), history))
        if error is not None:
            raise error
        if outcomes[0][0]:
            raise RuntimeError(f"CheckpointManager: rank 0 failed to commit the checkpoint: {outcomes[0][0]}")
        if not main and epoch is not None:
            self.values, self.lost_epochs = (list(part) for part in outcomes[0][1])

    def _finish_sharded(self, future: Any, tmp: Path, commit: Callable[[], None] | None) -> None:
        """The background job of an asynchronous sharded save: wait for DCP, then commit (rank 0)."""
        try:
            try:
                future.result()
            except BaseException as error:
                if commit is not None:
                    with contextlib.suppress(OSError):
                        _dcp.remove_temporary(tmp)
                mapped = _dcp.plain_error(error)
                if mapped is error:
                    raise
                raise mapped from error
            if commit is not None:
                commit()
        finally:
            self._submitted = None

    def _commit_sharded(self, record: dict[str, Any], tmp: Path) -> None:
        """Rank 0, once every rank's shards are in ``tmp``: rename it, record the epoch, tidy."""
        epoch = record["epoch"]
        path = self._path(epoch)
        self.logdir.mkdir(parents=True, exist_ok=True)
        if not self._load_history():
            self._write_metrics()  # before the first numbered folder, as for files (see _commit)
        committed = False
        try:
            newest = max((old["epoch"] for old in self.values), default=-1)
            for entry in self._numbered_files():  # folders after the history: interrupted saves' (ours was killed)
                if int(self._pattern.match(entry.name)[1]) > newest:
                    _dcp.remove_tree(entry)
            _dcp.commit_folder(tmp, path)
            self.values = [*self.values, record]
            self.lost_epochs = [old for old in self.lost_epochs if old != epoch]
            self._write_metrics()  # the commit point
            committed = True
        finally:
            if not committed:
                with contextlib.suppress(OSError):
                    _dcp.remove_temporary(tmp)
                if not self._recorded_on_disk(epoch):
                    with contextlib.suppress(OSError):
                        _dcp.remove_tree(path)  # not recorded: leave no orphan behind
                with contextlib.suppress(Exception):
                    self._load_history()
        self._tidy()

    def _commit_named(self, name: str, tmp: Path) -> None:
        """Rank 0: make ``tmp`` the folder ``{name}.<n>``, point the link ``{name}`` at it, delete older ones."""
        pattern = re.compile(rf"^{re.escape(name)}\.(\d+)$")
        numbers = [int(match[1]) for entry in self.logdir.iterdir() if (match := pattern.match(entry.name))]
        final = self.logdir / f"{name}.{max(numbers, default=0) + 1}"
        try:
            _dcp.commit_folder(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                _dcp.remove_temporary(tmp)
            raise
        _dcp.atomic_symlink(final.name, self.logdir / name)
        for entry in self.logdir.iterdir():
            if pattern.match(entry.name) and entry.name != final.name:
                _dcp.remove_tree(entry)

    def _tidy_sharded(self, warn: bool) -> None:
        """``_tidy`` for folders: lost epochs, the links, the N best (+ last's folder), abandoned temporaries."""
        newly_lost, expected = [], set(self._kept_epochs())
        while missing := [epoch for epoch in self._kept_epochs() if not _dcp.is_checkpoint(self._path(epoch))]:
            self.lost_epochs = sorted({*self.lost_epochs, *missing})
            newly_lost.extend(missing)
        if newly_lost:
            self._write_metrics()
            newly_lost = [epoch for epoch in newly_lost if epoch in expected]
            if newly_lost and warn:
                warnings.warn(
                    f"checkpoint folders of recorded epochs {newly_lost} are missing from '{self.logdir}': they no "
                    f"longer count as best (their scores stay in '{self.metrics_file.name}' under 'lost_epochs')",
                    stacklevel=4,
                )
        kept = set(self._kept_epochs())
        newest = self.values[-1]["epoch"] if self.values else None
        if newest is not None and _dcp.is_checkpoint(self._path(newest)):
            kept.add(newest)  # last's folder: a symbolic link cannot keep it alive
        best = self.best_epoch
        for link, epoch in (("best", best), ("last", newest if newest in kept else None)):
            if epoch is not None:
                _dcp.atomic_symlink(self._path(epoch).name, self.logdir / link)
            elif (self.logdir / link).is_symlink():
                _dcp.remove_tree(self.logdir / link)  # it would point at a folder deleted below (or none)
        recorded = {record["epoch"] for record in self.values}
        newest_recorded = max(recorded, default=-1)
        for entry in self._numbered_files():
            epoch = int(self._pattern.match(entry.name)[1])
            if epoch not in kept and (epoch in recorded or epoch > newest_recorded):
                _dcp.remove_tree(entry)
        for entry in self.logdir.iterdir():
            match = _TMP_WRITER.match(entry.name)  # a temporary file or folder whose writer, on this host, is gone
            if match and match[2] in (None, socket.gethostname()) and not pid_alive(int(match[1])):
                _dcp.remove_temporary(entry)

    def wait(self) -> None:
        """Block until the asynchronous save in flight (if any) is written; re-raise its error."""
        self._writer.wait()

    close = wait  # the name files and writers use; one method

    def rewind(self, epoch: int) -> None:
        """Forget the records after ``epoch``: the explicit way back (a run resumed from that epoch).

        On global rank 0 it rewrites the metrics file crash-safely, deletes the numbered files of the
        forgotten epochs and points ``best.pth`` / ``last.pth`` at the remaining history (``last.pth``
        stays as it is when the newest remaining epoch's file was already deleted as not among the N
        best). Elsewhere it only forgets in memory. A no-op when nothing is newer.

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
        """Everything :meth:`rewind` checks before it changes anything (``restore_training_state``
        calls it before it restores any component, so that a restore is all or nothing)."""
        epoch = check_int(epoch, "epoch", minimum=0)
        self.wait()
        if distributed.is_main_process() and self.metrics_file.exists():
            self._load_history()
        return epoch

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The manager's settings and history (what ``metrics.json`` holds)."""
        self.wait()
        return {
            "metric_name": self.metric,
            "metric_minimization": self.metric_minimization,
            "save_n_best": self.save_n_best,
            "values": [dict(record) for record in self.values],
            "lost_epochs": list(self.lost_epochs),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the history from :meth:`state_dict`; on global rank 0 also rewrite the metrics file
        and make the folder agree with it.

        Raises:
            ValueError: if the state's metric name or direction differs from this manager's, or its
                records are not usable (see the class docstring).
        """
        self.wait()
        for key, mine in (("metric_name", self.metric), ("metric_minimization", self.metric_minimization)):
            if state.get(key) != mine:
                raise ValueError(f"state has {key}={state.get(key)!r}, but this manager has {mine!r}")
        self.values, self.lost_epochs = self._checked_history(state.get("values"), state.get("lost_epochs", []))
        if distributed.is_main_process():
            self.logdir.mkdir(parents=True, exist_ok=True)
            self._write_metrics()
            self._tidy()
