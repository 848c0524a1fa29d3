"""The history file of :class:`~batteries.CheckpointManager` (``metrics.json``): read it, check it, make records.

``{"metric_name", "metric_minimization", ["sharded": true,] "save_n_best", "values": [records],
["lost_epochs": [...],] "files": {...}}``, one record per epoch: ``{"epoch": e, <metric>: v, ...}``.
NaN / inf are stored as ``null``. The original toolkit's files (a bare list of records, NaN /
Infinity literals) are read too.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batteries._checks import check_file_name
from batteries._io import atomic_write_json

KNOWN = {
    "metric_name",
    "metric_minimization",
    "save_n_best",
    "values",
    "lost_epochs",
    "files",
    "sharded",
    "unit",
    "lineage",
}
UNITS = ("epoch", "step")


def unusable(path: Path, problem: str) -> ValueError:
    """The error for a history that cannot be continued."""
    return ValueError(
        f"'{path}' {problem}; the manager cannot continue this history. Move the file "
        "(and the checkpoints beside it) away, or build the manager with another logdir."
    )


def read(path: Path, metric: str, minimization: bool, sharded: bool) -> dict[str, Any] | None:
    """The checked content of the history file ``path``, or None if there is none.

    Returns:
        ``{"values", "lost_epochs", "files", "save_n_best", "unit", "lineage", "extra"}``: the records,
        the lost epochs, ``{epoch: [inode, size]}``, the recorded ``save_n_best`` (None if absent), what
        the records count (``"epoch"`` or ``"step"``), ``{position: token}`` and the other keys.

    Raises:
        ValueError: if it cannot be continued (not JSON, bad records), or records another metric,
            direction or kind (``sharded``); the message names the file.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise unusable(path, "is a folder, not a metrics file") from None
    try:
        saved = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise unusable(path, f"is not a JSON metrics file ({error})") from error
    if isinstance(saved, list):  # the original toolkit's first format: the records alone
        saved = {"metric_name": metric, "metric_minimization": minimization, "values": saved}
    if not isinstance(saved, dict) or not isinstance(saved.get("values"), list):
        raise unusable(path, f'holds {type(saved).__name__} {str(saved)[:60]}, not {{"values": [...], ...}}')
    _check_settings(saved, path, metric, minimization, sharded)
    unit = saved.get("unit", "epoch")
    if unit not in UNITS:
        raise unusable(path, f"has unit={unit!r}, expected one of {UNITS}")
    values, lost = checked(saved["values"], saved.get("lost_epochs", []), path, metric, unit)
    files, lineage = saved.get("files", {}), saved.get("lineage", {})
    return {
        "values": values,
        "lost_epochs": lost,
        "files": {int(k): v for k, v in files.items() if k.isdigit()} if isinstance(files, dict) else {},
        "save_n_best": saved.get("save_n_best") if type(saved.get("save_n_best")) is int else None,
        "unit": unit,
        "lineage": {str(k): v for k, v in lineage.items() if isinstance(v, str)} if isinstance(lineage, dict) else {},
        "extra": {key: value for key, value in saved.items() if key not in KNOWN},
    }


def _check_settings(saved: dict[str, Any], path: Path, metric: str, minimization: bool, sharded: bool) -> None:
    for key, mine in (("metric_name", metric), ("metric_minimization", minimization)):
        if key not in saved or type(saved[key]) is not type(mine):
            raise unusable(path, f"has {key}={saved.get(key)!r}, expected a {type(mine).__name__}")
        if saved[key] != mine:
            raise ValueError(
                f"'{path}' records {key}={saved[key]!r}, but this manager was built with "
                f"{'metric' if key == 'metric_name' else key}={mine!r}; build it with the same value, or "
                "use another logdir"
            )
    if saved.get("sharded", False) is not sharded:
        kinds = {True: "sharded checkpoint folders (sharded=True)", False: "checkpoint files (sharded=False)"}
        raise ValueError(
            f"'{path}' is the history of {kinds[saved.get('sharded') is True]}, but this manager "
            f"was built with sharded={sharded}; build it with the same kind, or use another logdir"
        )


def checked(
    records: Any, lost: Any, path: Path, metric: str, unit: str = "epoch"
) -> tuple[list[dict[str, Any]], list[int]]:
    """``(records, lost_epochs)`` checked: dicts with an int ``unit`` (epoch), increasing, numbers or null.

    Raises:
        ValueError: naming ``path`` and the first problem.
    """
    if not isinstance(records, list):
        raise unusable(path, f"has values={str(records)[:60]}, expected a list of records")
    values = [_check_record(record, index, path, metric, unit) for index, record in enumerate(records)]
    epochs = [record[unit] for record in values]
    if any(later <= earlier for earlier, later in zip(epochs, epochs[1:])):
        raise unusable(path, f"records {unit}s out of order or twice ({epochs})")
    if not isinstance(lost, list) or not all(type(epoch) is int for epoch in lost):
        raise unusable(path, f"has lost_epochs={lost!r}, expected a list of ints")
    return values, sorted(set(lost))


def _check_record(record: Any, index: int, path: Path, metric: str, unit: str) -> dict[str, Any]:
    where = f"record {index} ({record!r})"
    if not isinstance(record, dict):
        raise unusable(path, f"{where} is not a dict")
    epoch = record.get(unit)
    if type(epoch) is not int or epoch < 0:
        raise unusable(path, f"{where} has no int {unit} >= 0")
    if metric not in record:
        raise unusable(path, f"{where} has no {metric!r} value")
    result: dict[str, Any] = {unit: epoch}
    for key, value in record.items():
        if key == unit:
            continue
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise unusable(path, f"{where} has {key}={value!r}, expected a number or null")
        # NaN / Infinity literals (json.dump's default, the original toolkit's) read as null
        result[key] = None if value is None or not math.isfinite(value) else value
    return result


def recorded_on_disk(path: Path, epoch: int, unit: str = "epoch") -> bool:
    """Whether the history file ``path`` records ``epoch``; True when it cannot be read (keep files)."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        return any(record.get(unit) == epoch for record in saved["values"])
    except Exception:  # noqa: BLE001 - unreadable: assume recorded, so that nothing is deleted
        return True


def check_next(
    path: Path, epoch: int, newest: int | None, recorded_n_best: int | None, save_n_best: int, unit: str = "epoch"
) -> None:
    """Raise ``ValueError`` if ``epoch`` cannot follow the history: not after ``newest``, or a
    ``save_n_best`` below the recorded one (it would delete kept checkpoints)."""
    if recorded_n_best is not None and recorded_n_best > save_n_best:
        raise ValueError(
            f"'{path}' records save_n_best={recorded_n_best}, but this manager was built "
            f"with save_n_best={save_n_best}, which would delete kept checkpoints; build it with "
            f"save_n_best={recorded_n_best} (or more) to continue, or use another logdir"
        )
    if newest is not None and epoch <= newest:
        raise ValueError(
            f"{unit} {epoch} is not after the newest recorded {unit} {newest} in '{path}'. "
            f"To go back (a run resumed from an earlier checkpoint), call manager.rewind({epoch - 1}) "
            f"first, which forgets the later {unit}s and deletes their files; manager.resume(state, path) "
            "and restore_training_state(..., manager=manager) do it for you."
        )


def make_record(score: Any, epoch: int, metric: str, unit: str = "epoch") -> dict[str, Any]:
    """The record of ``score`` (a number, or a dict of numbers holding ``metric``) for ``epoch``.

    Raises:
        KeyError: if a dict score lacks ``metric``.
        TypeError / ValueError: on a value that is not a number, a non-str key, or a key ``"epoch"``.
    """
    if isinstance(score, Mapping):
        if metric not in score:
            raise KeyError(f"score dict has no key {metric!r} (the manager's metric); keys: {list(score)}")
        if unit in score:
            raise ValueError(f"score dict must not hold the key {unit!r}; the {unit} argument sets it")
        items = dict(score)
    else:
        items = {metric: score}
    record: dict[str, Any] = {unit: epoch}
    for key, value in items.items():
        if not isinstance(key, str):
            raise TypeError(f"score keys must be str, got {key!r}")
        record[key] = _number(value, f"score[{key!r}]")
    return record


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


def check_arguments(
    metric: Any, names: str, metrics_file: str, save_fn: Any, links: tuple[str, ...], suffix: str
) -> None:
    """Check ``CheckpointManager``'s ``metric``, ``checkpoint_names``, ``metrics_file`` and ``save_fn``.

    Raises:
        TypeError / ValueError: naming the argument and the value.
    """
    if not isinstance(metric, str) or not metric or metric in UNITS:
        raise ValueError(f"metric must be a non-empty str other than 'epoch' and 'step', got {metric!r}")
    check_file_name(names, "checkpoint_names")
    check_file_name(metrics_file, "metrics_file")
    if not callable(save_fn):
        raise TypeError(f"save_fn must be callable as save_fn(obj, path), got {save_fn!r}")
    if metrics_file in links or re.match(rf"^{re.escape(names)}_(step)?\d+{re.escape(suffix)}$", metrics_file):
        raise ValueError(
            f"metrics_file must not be a name the manager writes checkpoints to "
            f"({', '.join(links)}, {names}_<epoch>{suffix}), got {metrics_file!r}"
        )


def check_numbered(path: Path, loaded: bool, values: list[dict[str, Any]], numbered: list[str]) -> None:
    """Refuse a folder with numbered checkpoints that the history file ``path`` does not account for.

    The history is written before the first numbered checkpoint: without records, at most one numbered
    checkpoint (a save interrupted before it was recorded) can be the manager's own.
    """
    if (not loaded and numbered) or (loaded and not values and len(numbered) > 1):
        raise ValueError(
            f"'{path.parent}' holds numbered checkpoints ({', '.join(numbered[:5])}"
            f"{', ...' if len(numbered) > 5 else ''}) but '{path.name}' has no history of "
            "them, so the manager cannot tell which are the best. Move them away, or build the manager "
            "with another logdir or checkpoint_names."
        )


def check_named(name: str, file_name: str, taken: tuple[str, ...], numbered: re.Pattern[str]) -> None:
    """Refuse a ``save(name=)`` that the manager uses itself (links, history, numbered) or could mistake."""
    if file_name in taken or numbered.match(file_name) or re.search(r"\.\d+$", name) or name.startswith("."):
        raise ValueError(
            f"name must not be a name the manager uses ({', '.join(taken)}, "
            f"<checkpoint_names>_<epoch>) nor start with '.' or end in '.<digits>', got {name!r}"
        )


def write(
    path: Path,
    extra: dict[str, Any],
    settings: dict[str, Any],
    unit: str,
    save_n_best: int,
    values: list[dict[str, Any]],
    lost: list[int],
    files: dict[str, Any],
    lineage: dict[str, str],
) -> None:
    """Write the history file ``path`` crash-safely; keys absent when empty (``unit`` when ``"epoch"``)."""
    atomic_write_json(
        path,
        {
            **extra,
            **settings,
            **({"unit": unit} if unit != "epoch" else {}),
            "save_n_best": save_n_best,
            "values": values,
            **({"lost_epochs": lost} if lost else {}),
            "files": files,
            **({"lineage": lineage} if lineage else {}),
        },
    )
