"""A dict of live objects (``{"model": model, "optimizer": optimizer, "loader": loader, ...}``) saved as
one checkpoint and restored in place: what :meth:`CheckpointManager.process`, ``save`` and ``resume``
do when given such a dict (a *state*). See docs/resume.md.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from batteries import _dcp, distributed
from batteries._states import missing_states_error
from batteries.checkpoint import load_checkpoint
from batteries.resume import COMPONENTS, find_resume_checkpoint, make_training_state, restore_training_state

# the keys the manager sets in a checkpoint of a state: a state must not hold them
RESERVED = ("epoch", "step", "stage", "rng_states", "lineage", "metrics", "unit")


def is_state(checkpoint: Any) -> bool:
    """Whether ``checkpoint`` is a state (its ``"model"`` is a module), not a checkpoint dict."""
    return isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("model"), nn.Module)


def _split(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(stateful, plain)``: the objects with ``state_dict`` / ``load_state_dict``, and the other values."""
    clash = sorted(key for key in state if key in RESERVED)
    if clash:
        raise ValueError(
            f"state must not hold the keys {clash}: the manager sets them (the position comes from "
            "process(epoch=/step=) and save(step=)); rename them, e.g. 'iter_num'"
        )
    stateful, plain = {}, {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise TypeError(f"state keys must be str, got {key!r}")
        if key in COMPONENTS or callable(getattr(value, "state_dict", None)):
            stateful[key] = value
        else:
            plain[key] = value
    return stateful, plain


def capture(state: Mapping[str, Any], unit: str, position: int, lineage: str, sharded: bool) -> dict[str, Any]:
    """The checkpoint of ``state`` at ``position`` (an epoch or a step, by ``unit``).

    :func:`make_training_state` of its objects (each one's ``state_dict()`` under ``{key}_state_dict``,
    the model's unwrapped, every rank's RNG states: call it on every rank), plus its plain values and
    ``lineage``, the token of the record it follows.
    """
    stateful, plain = _split(state)
    components = {key: value for key, value in stateful.items() if key in COMPONENTS and value is not None}
    others = {f"{key}_state_dict": value.state_dict() for key, value in stateful.items() if key not in COMPONENTS}
    at = {"epoch": position, "step": 0} if unit == "epoch" else {"epoch": 0, "step": position}
    model = components.pop("model")
    return make_training_state(
        model, **at, sharded=sharded, lineage=lineage, unit=unit, **components, **others, **plain
    )


def prepare(checkpoint: Any, unit: str, position: int, sharded: bool) -> tuple[dict[str, Any], str | None]:
    """What ``process`` saves: ``(checkpoint, token)``; a state is captured with a new token (None otherwise).

    Raises:
        TypeError: if ``checkpoint`` is None.
        ValueError: if a checkpoint dict's ``epoch`` (``step``) is not ``position``.
    """
    if checkpoint is None:
        raise TypeError("process() needs the checkpoint to save: process(score, epoch, checkpoint)")
    if is_state(checkpoint):
        token = uuid.uuid4().hex[:16]
        if sharded:
            token = distributed.all_gather(token)[0]  # rank 0's, on every rank
        return capture(checkpoint, unit, position, token, sharded), token
    saved = checkpoint.get(unit) if isinstance(checkpoint, Mapping) else None
    if isinstance(saved, (int, np.integer)) and not isinstance(saved, bool) and saved != position:
        raise ValueError(
            f"checkpoint[{unit!r}] is {saved} but process({unit}={position}): they must be the same, because "
            f"a resume rewinds the manager to checkpoint[{unit!r}] (with another numbering it would delete "
            "the checkpoint resumed from)"
        )
    return checkpoint, None


def between(manager: Any, state: Mapping[str, Any], step: int | None) -> dict[str, Any]:
    """What ``manager.save(state)`` saves: ``state`` after the newest record (in flight included), with its token."""
    in_flight, resumed = manager._store.in_flight, manager._resumed  # resumed: (position, token) or None
    newest = max(-1 if manager.newest is None else manager.newest, -1 if in_flight is None else in_flight)
    token = manager._lineage.get(str(newest), "")
    if resumed is not None and resumed[0] > newest:  # resumed past this folder's history (a warm start)
        newest, token = resumed[0], resumed[1] or token
    position = newest if step is None and manager.unit == "epoch" else manager._position(None, step)[0]
    return capture(state, manager.unit, max(position, 0), token, manager.sharded)


def restore(state: dict[str, Any], checkpoint: Mapping[str, Any] | Path, **load: Any) -> dict[str, Any]:
    """Restore ``state`` in place from ``checkpoint`` (a loaded dict, or a sharded folder): all or nothing.

    Objects load their states (the RNG states too); plain values are replaced in ``state``.

    Returns:
        The checkpoint dict (for a sharded folder, without the model and optimizer states).

    Raises:
        KeyError: naming every entry of ``state`` the checkpoint lacks (nothing is restored).
        RuntimeError: if a state does not fit its object (nothing is restored).
    """
    stateful, plain = _split(state)
    held = _dcp.top_level_keys(_dcp.read_metadata(checkpoint)) if isinstance(checkpoint, Path) else checkpoint
    missing = [key for key in plain if key not in held]
    if missing:
        source = f"'{checkpoint}'" if isinstance(checkpoint, Path) else "<checkpoint dict>"
        raise missing_states_error(source, missing, {key: None for key in held}, "nothing was restored")
    restored = restore_training_state(checkpoint, **stateful, **load)
    for key in plain:
        state[key] = restored[key]
    return restored


def resume(manager: Any, state: dict[str, Any], source: str | os.PathLike | None, **load: Any) -> int:
    """:meth:`CheckpointManager.resume`: see there."""
    unit, newest = manager.unit, manager.newest
    step_name = f"step{manager._store.suffix}"
    if source is None:
        if newest is not None or (manager.logdir / step_name).exists():
            raise ValueError(
                f"'{manager.logdir}' holds the history of a run "
                f"({f'up to {unit} {newest}' if newest is not None else step_name}). "
                "Continue it (--resume auto, i.e. manager.resume(state, 'auto')), pass another logdir, or delete "
                f"'{manager.logdir}' to start over."
            )
        return 0
    if source == "auto":
        path, loaded = find_resume_checkpoint(manager, world_size=distributed.get_world_size())
        if path is None:
            if newest is None:
                return 0  # nothing to continue: a fresh start
            raise ValueError(
                f"--resume auto: no checkpoint in '{manager.logdir}' continues its history (up to {unit} {newest}); "
                "pass --resume PATH, or delete the folder to start over"
            )
    else:
        path, loaded = Path(source), None
        if not path.exists():
            raise FileNotFoundError(f"resume: checkpoint '{path}' does not exist; pass a checkpoint path or 'auto'")
    if _dcp.is_checkpoint(path):
        checkpoint: Mapping[str, Any] | Path = path  # the shards load in place
        entries = _dcp.load_entries(path, keys={"epoch", "step", "unit", "lineage"})
    else:
        map_location = load.get("map_location", "cpu")
        checkpoint = entries = loaded or load_checkpoint(path, map_location=map_location, verbose=False)
    if manager._unit is None and entries.get("unit") in ("epoch", "step"):
        unit = manager._unit = entries["unit"]  # no history here yet: the checkpoint says what the run counts
    position = entries.get(unit)
    if type(position) is not int or position < 0:
        raise ValueError(f"'{path}' records no {unit} (an int >= 0): it was not saved by a manager counting {unit}s")
    manager._ready_to_rewind(position)  # before anything is restored: a rewind that would fail fails now
    restore(state, checkpoint, **load)
    manager.rewind(position, lineage=entries.get("lineage"))
    manager._resumed = (position, entries.get("lineage") or "")
    stale = manager.logdir / step_name
    if source != "auto" and distributed.is_main_process() and stale.exists() and stale.resolve() != path.resolve():
        manager._store.remove([stale])  # a branch: the mid-run checkpoint of the abandoned run goes, as rewind's files
    return position
