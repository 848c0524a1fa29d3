"""CheckpointManager: keep the N best checkpoints, best.pth / last.pth and a metrics history."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batteries._async import AsyncWriter
from batteries._io import TMP_MARK, atomic_link, atomic_write, atomic_write_json, remove_durably

__all__ = ["CheckpointManager"]


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
    score in ``metrics_file``, points ``last.pth`` (and ``best.pth`` when the score is the best so
    far) at it with hard links, and deletes the numbered files that fell out of the N best. The
    metrics file is the commit point: a crash at any instant leaves every visible file complete,
    and a manager built over the folder again repairs the links and the N-best set from it.

    ``metrics.json`` holds ``{"metric_name", "metric_minimization", "save_n_best", "values": [...]}``,
    one record per epoch: ``{"epoch": e, <metric>: v, ...other score keys}``. NaN / inf are stored
    as ``null`` (strict JSON) and never count as best. Ties go to the newer epoch. Processing an
    epoch that is already recorded (a run resumed from an earlier checkpoint) replaces its record and
    drops the records of later epochs, which belong to the abandoned run.

    Args:
        logdir: folder for the checkpoints; created if missing.
        checkpoint_names: file name prefix. Default ``"exp"``.
        metric: the key of the score that decides the best. Default ``"loss"``.
        metric_minimization: True if lower is better. Default True.
        save_n_best: number of numbered checkpoints to keep (>= 1). Default 1.
        save_fn: ``save_fn(obj, path)``. Default ``torch.save``.
        metrics_file: name of the history file inside ``logdir``. Default ``"metrics.json"``.
        async_save: write on a background thread: :meth:`process` returns once the checkpoint's
            tensors are copied to CPU memory. At most one save is in flight (the next
            :meth:`process` waits for it); its error is raised by the next :meth:`process`,
            :meth:`wait` or :meth:`close`. ``best`` / ``values`` reflect finished saves: call
            :meth:`wait` before reading them. The crash-safety guarantees are the same. Default False.

    Raises:
        ValueError: on a bad argument, or if ``logdir`` already holds a metrics file with another
            metric name or direction.

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
    ) -> None:
        if isinstance(save_n_best, bool) or not isinstance(save_n_best, int) or save_n_best < 1:
            raise ValueError(f"save_n_best must be an int >= 1, got {save_n_best!r}")
        if not isinstance(metric, str) or not metric or metric == "epoch":
            raise ValueError(f"metric must be a non-empty str other than 'epoch', got {metric!r}")
        if not isinstance(checkpoint_names, str) or not checkpoint_names or os.sep in checkpoint_names:
            raise ValueError(f"checkpoint_names must be a plain file name prefix, got {checkpoint_names!r}")
        if not isinstance(metrics_file, str) or not metrics_file or os.sep in metrics_file:
            raise ValueError(f"metrics_file must be a plain file name, got {metrics_file!r}")
        self.logdir = Path(logdir)
        self.checkpoint_names = checkpoint_names
        self.metric = metric
        self.metric_minimization = bool(metric_minimization)
        self.save_n_best = save_n_best
        self.save_fn = save_fn
        self.metrics_file = self.logdir / metrics_file
        self.async_save = bool(async_save)
        self._writer = AsyncWriter()
        self.values: list[dict[str, Any]] = []
        self._extra: dict[str, Any] = {}
        self._pattern = re.compile(rf"^{re.escape(checkpoint_names)}_(\d+)\.pth$")
        self.logdir.mkdir(parents=True, exist_ok=True)
        if self.metrics_file.exists():
            self._continue()

    # ----------------------------------------------------------------- history
    def _continue(self) -> None:
        """Take over the history of an earlier manager and repair what a crash may have left."""
        try:
            with open(self.metrics_file, encoding="utf-8") as file:
                saved = json.load(file)
        except json.JSONDecodeError as error:
            raise ValueError(f"'{self.metrics_file}' is not valid JSON: {error}") from error
        if saved.get("metric_name") != self.metric:
            raise ValueError(
                f"'{self.metrics_file}' records metric {saved.get('metric_name')!r}, "
                f"but this manager was built with metric={self.metric!r}"
            )
        if saved.get("metric_minimization") != self.metric_minimization:
            raise ValueError(
                f"'{self.metrics_file}' records metric_minimization={saved.get('metric_minimization')!r}, "
                f"but this manager was built with metric_minimization={self.metric_minimization!r}"
            )
        self.values = list(saved.get("values", []))
        known = {"metric_name", "metric_minimization", "save_n_best", "values"}
        self._extra = {key: value for key, value in saved.items() if key not in known}
        self._repair()

    def _path(self, epoch: int) -> Path:
        return self.logdir / f"{self.checkpoint_names}_{epoch}.pth"

    def _rank_key(self, record: Mapping[str, Any]) -> tuple[float, int]:
        """Sort key, smaller is better: the score (negated when maximising), then the newer epoch."""
        score = record[self.metric]
        return (score if self.metric_minimization else -score, -record["epoch"])

    def _ranked(self) -> list[dict[str, Any]]:
        finite = [record for record in self.values if record.get(self.metric) is not None]
        return sorted(finite, key=self._rank_key)

    def _kept_epochs(self) -> set[int]:
        return {record["epoch"] for record in self._ranked()[: self.save_n_best]}

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
        atomic_write_json(
            self.metrics_file,
            {
                **self._extra,
                "metric_name": self.metric,
                "metric_minimization": self.metric_minimization,
                "save_n_best": self.save_n_best,
                "values": self.values,
            },
        )

    def _repair(self) -> None:
        """Make links and numbered files agree with the history (after a crash between steps)."""
        best = self.best
        if best is not None and self._path(best["epoch"]).exists():
            atomic_link(self._path(best["epoch"]), self.logdir / "best.pth")
        if self.values:
            newest = max(self.values, key=lambda record: record["epoch"])
            if self._path(newest["epoch"]).exists():
                atomic_link(self._path(newest["epoch"]), self.logdir / "last.pth")
        kept = self._kept_epochs()
        stale = []
        for entry in self.logdir.iterdir():
            match = self._pattern.match(entry.name)
            if (match and int(match.group(1)) not in kept) or (TMP_MARK in entry.name and entry.name.startswith(".")):
                stale.append(entry)
        remove_durably(stale)

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

    def process(self, score: Any, epoch: int, checkpoint: Mapping[str, Any]) -> Path:
        """Save ``checkpoint`` for ``epoch`` and keep the N best.

        Args:
            score: the value of ``metric`` (a number, NumPy scalar or one-element tensor), or a dict
                of numbers holding ``metric``; every key of the dict is recorded.
            epoch: epoch number (int >= 0); names the file ``{checkpoint_names}_{epoch}.pth``.
            checkpoint: what to save, usually from ``make_checkpoint``.

        Returns:
            The path of the numbered checkpoint written (it may already be deleted again if its
            score is not among the N best; ``last.pth`` still holds it).

        Raises:
            ValueError / TypeError / KeyError: on a bad score or epoch, before anything is written.
            OSError: if writing fails; the previous files and history are left as they were.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        epoch = int(epoch)
        record = self._record(score, epoch)
        if self.async_save:  # the snapshot is taken here, in the caller: training may change the tensors right after
            self._writer.submit(checkpoint, lambda data: self._commit(record, epoch, data))
        else:
            self._writer.wait()
            self._commit(record, epoch, checkpoint)
        return self._path(epoch)

    def _commit(self, record: dict[str, Any], epoch: int, checkpoint: Mapping[str, Any]) -> None:
        path = self._path(epoch)
        atomic_write(path, lambda tmp: self.save_fn(checkpoint, str(tmp)))
        previous = self.values
        # records of this epoch or later belong to a run that was abandoned (resumed from earlier)
        self.values = [old for old in self.values if old["epoch"] < epoch] + [record]
        try:
            self._write_metrics()  # the commit point
        except BaseException:
            self.values = previous
            if all(old["epoch"] != epoch for old in previous):
                remove_durably([path])  # not recorded: leave no orphan behind
            raise
        atomic_link(path, self.logdir / "last.pth")
        best_epoch = self.best_epoch
        if best_epoch is not None:
            atomic_link(self._path(best_epoch), self.logdir / "best.pth")
        kept = self._kept_epochs()
        epochs = {old["epoch"] for old in previous} | {epoch}
        remove_durably([self._path(old) for old in sorted(epochs - kept)])

    def wait(self) -> None:
        """Block until the asynchronous save in flight (if any) is written; re-raise its error."""
        self._writer.wait()

    def close(self) -> None:
        """Same as :meth:`wait`: call it before the program ends or reads ``best``."""
        self._writer.wait()

    def rewind(self, epoch: int) -> None:
        """Forget the records after ``epoch`` (a run resumed from that epoch's checkpoint).

        Rewrites the metrics file crash-safely, points ``best.pth`` / ``last.pth`` at the remaining
        history and deletes the numbered files of the forgotten epochs. A no-op when nothing is newer.

        Raises:
            ValueError: if ``epoch`` is not an int >= 0.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.wait()
        if all(record["epoch"] <= epoch for record in self.values):
            return
        self.values = [record for record in self.values if record["epoch"] <= epoch]
        self._write_metrics()
        self._repair()

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The manager's settings and history (what ``metrics.json`` holds)."""
        self.wait()
        return {
            "metric_name": self.metric,
            "metric_minimization": self.metric_minimization,
            "save_n_best": self.save_n_best,
            "values": [dict(record) for record in self.values],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the history from :meth:`state_dict`, rewrite the metrics file and repair the folder.

        Raises:
            ValueError: if the state's metric name or direction differs from this manager's.
        """
        self.wait()
        for key, mine in (("metric_name", self.metric), ("metric_minimization", self.metric_minimization)):
            if state.get(key) != mine:
                raise ValueError(f"state has {key}={state.get(key)!r}, but this manager has {mine!r}")
        self.values = [dict(record) for record in state["values"]]
        self._write_metrics()
        self._repair()
