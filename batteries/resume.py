"""Everything a resume needs in one checkpoint: make_training_state / restore_training_state."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from batteries import _dcp, distributed
from batteries._checks import check_bool, check_file_name, check_int, check_number
from batteries._dcp_load import prepare_load
from batteries.checkpoint import load_checkpoint, load_states, make_checkpoint, missing_states_error, state_parts
from batteries.seed import check_rng_state, get_rng_state, set_rng_state

__all__ = ["make_training_state", "restore_training_state", "find_resume_checkpoint"]

# the components make_training_state knows by name (the keys of their states: f"{name}_state_dict")
COMPONENTS = ("model", "optimizer", "scheduler", "scaler", "ema", "early_stop")


def _gather_rng_states(timeout: float) -> list[dict[str, Any] | None]:
    """Every rank's :func:`get_rng_state` on rank 0 (:func:`~batteries.distributed.gather_on_main`).

    Raises:
        RuntimeError: on rank 0, if some ranks' states did not come within ``timeout`` seconds.
    """
    try:
        return distributed.gather_on_main(get_rng_state(), timeout_s=timeout, what="the RNG states")
    except TimeoutError as error:
        raise RuntimeError(
            f"make_training_state {error}. Under torch.distributed it gathers every rank's RNG state: call it on "
            "every rank, as for a collective (only rank 0 writes: save_checkpoint and CheckpointManager.process do "
            "nothing on other ranks). To build the state on rank 0 only, pass rng_states=all_gather(get_rng_state()) "
            "gathered on every rank beforehand (or rng_states=[get_rng_state()] to keep rank 0's only)."
        ) from None


def make_training_state(
    model: nn.Module,
    *,
    epoch: int,
    step: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    ema: nn.Module | None = None,
    early_stop: Any | None = None,
    rng_states: Sequence[dict[str, Any]] | None = None,
    rng_timeout: float = 60.0,
    stage: Any = "train",
    metrics: Mapping[str, Any] | None = None,
    sharded: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """Everything a resume needs, in one checkpoint dict that loads with ``weights_only=True``.

    A :func:`make_checkpoint` dict plus ``step``, ``scaler_state_dict``, ``ema_state_dict``,
    ``early_stop_state_dict`` and ``rng_states`` (every rank's Python, NumPy, torch and CUDA RNG
    states, index = rank). Under ``torch.distributed``, without ``rng_states``, call it on every
    rank like a collective and pass the result to ``save_checkpoint`` / ``manager.process`` on every
    rank: rank 0 waits at most ``rng_timeout`` s for the others' RNG states, no collective runs
    (docs/distributed.md). Code that gathers itself passes ``rng_states=all_gather(get_rng_state())``
    and may call it on rank 0 only; fewer states than ranks is a warning on rank 0.

    Args:
        model: the model, bare or wrapped.
        epoch: the last finished epoch.
        step: optimizer steps taken so far. Default 0.
        optimizer, scheduler, scaler, ema, early_stop: optional components (anything with
            ``state_dict()``); the key of one not given is left out.
        rng_states: one :func:`~batteries.get_rng_state` dict per rank. Default: gathered as above.
        rng_timeout: seconds rank 0 waits for the other ranks' RNG states. Default 60.
        stage: stage name. Default ``"train"``.
        metrics: optional metrics dict; left out when None.
        sharded: for ``CheckpointManager(..., sharded=True)`` (FSDP2): the model and optimizer states
            come from DCP's ``get_state_dict``, keyed by name, this rank's shards only; the dict is
            then for ``torch.distributed.checkpoint``, not ``torch.save``. Default False.
        **extra: more entries (made safe as in :func:`make_checkpoint`).

    Returns:
        The checkpoint dict.

    Raises:
        ValueError / TypeError: as :func:`make_checkpoint`, or for a bad ``step`` / ``rng_timeout``.
        RuntimeError: on rank 0, if the other ranks' RNG states did not come within ``rng_timeout``.
    """
    step = check_int(step, "step", minimum=0)
    rng_timeout = check_number(rng_timeout, "rng_timeout", minimum=0.0)
    sharded = check_bool(sharded, "sharded")
    if sharded and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if rng_states is None:
        rng_states = _gather_rng_states(rng_timeout)
    else:
        rng_states = list(rng_states)
        world_size = distributed.get_world_size()
        if distributed.get_rank() == 0 and len(rng_states) < world_size:
            warnings.warn(
                f"the training state holds the RNG states of {len(rng_states)} rank(s) but {world_size} run: a "
                "resume cannot restore the random streams of the others. Call make_training_state on every rank "
                "without rng_states (it gathers them), or pass rng_states=all_gather(get_rng_state()) gathered "
                "on every rank",
                stacklevel=2,
            )
    parts = {"scaler_state_dict": scaler, "ema_state_dict": ema, "early_stop_state_dict": early_stop}
    checkpoint = make_checkpoint(
        stage,
        epoch,
        nn.Module() if sharded else model,  # sharded: the states come from get_state_dict below
        None if sharded else optimizer,
        scheduler,
        metrics,
        step=step,
        **{key: part.state_dict() for key, part in parts.items() if part is not None},
        rng_states=rng_states,
        **extra,
    )
    if sharded:
        checkpoint.update(_dcp.model_and_optimizer_states(model, optimizer))
    return checkpoint


def restore_training_state(
    checkpoint: Mapping[str, Any] | str | os.PathLike,
    model: nn.Module | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    ema: nn.Module | None = None,
    early_stop: Any | None = None,
    manager: Any | None = None,
    restore_rng: bool = True,
    map_location: Any = "cpu",
    strict: bool = True,
    **others: Any,
) -> dict[str, Any]:
    """Restore what :func:`make_training_state` saved into the components given: all or nothing.

    A component whose state is missing is a ``KeyError`` listing every missing part; a state that
    does not fit (SGD state into Adam, other shapes) a ``RuntimeError``; either way nothing changes.
    This rank's RNG states are restored when as many ranks saved them as run now (else a warning).
    A ``manager`` is rewound to the checkpoint's epoch. A sharded checkpoint folder (written by
    ``CheckpointManager(..., sharded=True)``) loads in place on every rank, each reading its own
    shards (DCP reshards: another number of processes may have written it); its other entries are
    read with ``weights_only=True`` and ``map_location`` does not apply.

    Args:
        checkpoint: the dict :func:`load_checkpoint` returned, a path to load, or a sharded folder.
        model, optimizer, scheduler, scaler, ema, early_stop: components to restore; None skips.
        manager: a ``CheckpointManager`` to rewind; None skips.
        restore_rng: restore the RNG states. Default True.
        map_location: for a path. Default ``"cpu"``.
        strict: passed to ``model.load_state_dict``. Default True.
        **others: more objects with ``load_state_dict``, each restored from ``{name}_state_dict``.

    Returns:
        The checkpoint dict (``epoch``, ``step``, extras); for a sharded checkpoint without
        ``model_state_dict`` / ``optimizer_state_dict`` (they went into place).

    Raises:
        KeyError: naming every part asked for that the checkpoint lacks (nothing is restored).
        RuntimeError: if a state does not fit its component (nothing is restored); for a sharded
            checkpoint also if a file cannot be read or ``.metadata`` holds other objects.
        FileNotFoundError / IsADirectoryError / ValueError / pickle.UnpicklingError: as
            :func:`load_checkpoint`.
    """
    checkpoint, source, sharded = _open_checkpoint(checkpoint, map_location)
    components = {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "scaler": scaler,
        "ema": ema,
        "early_stop": early_stop,
        **others,
    }
    in_place = {}  # sharded: the model and optimizer load in place, not through state_parts
    if sharded is not None:
        in_place = {"model": components.pop("model"), "optimizer": components.pop("optimizer")}
    parts, missing = state_parts(checkpoint, components, source)
    missing = [f"{name}_state_dict" for name, part in in_place.items() if part is not None and
               f"{name}_state_dict" not in checkpoint] + missing  # fmt: skip
    if restore_rng and not checkpoint.get("rng_states"):
        missing.append("rng_states")
    if manager is not None and "epoch" not in checkpoint:
        missing.append("epoch")
    if missing:
        raise missing_states_error(source, missing, checkpoint, "nothing was restored")

    rng_state = _rng_state_of_this_rank(checkpoint, source) if restore_rng else None
    if manager is not None:  # before anything is restored: a rewind that would fail fails now
        manager._ready_to_rewind(checkpoint["epoch"])
    apply_in_place = cancel = None
    if sharded is not None:  # read into copies first: a misfit or unreadable shard changes nothing
        apply_in_place, cancel = prepare_load(*sharded, in_place["model"], in_place["optimizer"], strict, source)
        checkpoint = {key: value for key, value in checkpoint.items() if key not in _dcp.PARTS}
    try:
        load_states(parts, source, strict)
    except BaseException:
        if cancel is not None:
            cancel()  # reading the sharded states may have filled an empty optimizer state: empty it again
        raise
    if apply_in_place is not None:
        apply_in_place()
    if rng_state is not None:
        set_rng_state(rng_state)  # checked above: changes every RNG or none
    if manager is not None:
        manager.rewind(checkpoint["epoch"])
    return dict(checkpoint)


def _open_checkpoint(checkpoint: Any, map_location: Any) -> tuple[Mapping[str, Any], str, tuple[Path, Any] | None]:
    """``(entries, source for messages, (folder, metadata) of a sharded checkpoint or None)``."""
    if isinstance(checkpoint, Mapping):
        return checkpoint, "<checkpoint dict>", None
    source = f"'{checkpoint}'"
    if not _dcp.is_checkpoint(checkpoint):
        return load_checkpoint(checkpoint, map_location=map_location, verbose=False), source, None
    folder = Path(checkpoint)
    metadata = _dcp.read_metadata(folder)
    entries = _dcp.load_entries(folder, metadata)
    present = _dcp.top_level_keys(metadata)
    entries.update({part: {} for part in _dcp.PARTS if part in present})  # loaded in place
    return entries, source, (folder, metadata)


def _rng_state_of_this_rank(checkpoint: Mapping[str, Any], source: str) -> dict[str, Any] | None:
    """This rank's checked RNG state, or None (with a warning) if another number of ranks saved them."""
    rng_states, world_size = checkpoint["rng_states"], distributed.get_world_size()
    if len(rng_states) != world_size:
        warnings.warn(
            f"checkpoint {source} holds RNG states of {len(rng_states)} rank(s) but {world_size} run now: "
            "RNG states not restored, the random streams differ from the saved run's",
            stacklevel=3,
        )
        return None
    rng_state = rng_states[distributed.get_rank()]
    try:
        check_rng_state(rng_state)
    except (TypeError, KeyError, ValueError) as error:
        raise RuntimeError(
            f"the RNG state of rank {distributed.get_rank()} in {source} cannot be restored: {error}. "
            "Nothing was restored."
        ) from error
    return rng_state


def find_resume_checkpoint(
    manager: Any, names: Sequence[str] | None = None, *, world_size: int | None = None
) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint beside ``manager``'s history that continues it, loaded, for ``--resume auto``.

    A checkpoint written from a state (``manager.process`` / ``save`` of ``{"model": ...}``) carries
    the token of the record it follows: it continues the history when that is the newest record's
    token. One from another history (a run branched from an earlier checkpoint since) is skipped,
    with a warning when it is not an older checkpoint of this one. A checkpoint without a token
    continues the history when its ``epoch`` is the newest recorded (0 without history; with a
    history of steps: its ``step`` is at or after the newest). ``step`` before ``last`` wins. For a
    sharded manager only ``epoch``, ``step``, ``lineage`` and ``rng_states`` are read, and the
    checkpoint returned is None: pass the path on.

    Args:
        manager: the run's :class:`~batteries.CheckpointManager` (its ``logdir`` holds the candidates).
        names: names inside ``manager.logdir``. Default ``("step.pth", "last.pth")`` (``("step",
            "last")`` sharded).
        world_size: the number of processes that continue the run, or None. A candidate saved by
            another number (its ``rng_states``) is taken only if it is ``last`` (an epoch's end). Default None.

    Returns:
        ``(path, checkpoint)`` (``(path, None)`` sharded), or ``(None, None)`` when none continues.

    Raises:
        TypeError / ValueError: if ``world_size`` is not an int >= 1.
        RuntimeError / pickle.UnpicklingError: as :func:`load_checkpoint`, for an unreadable candidate.
    """
    sharded = getattr(manager, "sharded", False) is True
    names = names if names is not None else ("step", "last") if sharded else ("step.pth", "last.pth")
    world_size = None if world_size is None else check_int(world_size, "world_size", minimum=1)
    for name in names:
        path = Path(manager.logdir) / check_file_name(name, "names")
        if sharded and _dcp.is_checkpoint(path):
            checkpoint = _dcp.load_entries(path, keys={"epoch", "step", "unit", "lineage", "rng_states"})
        elif not sharded and path.is_file():
            checkpoint = load_checkpoint(path, verbose=False)
        else:
            continue
        if not _continues(manager, checkpoint, path):
            continue
        saved_by = len(checkpoint.get("rng_states") or ())
        if world_size is not None and saved_by != world_size and name != ("last" if sharded else "last.pth"):
            warnings.warn(
                f"'{path}' was saved by {saved_by} process(es) and {world_size} resume: a mid-epoch position "
                "cannot be split over another number of processes, so it is skipped (the epoch's end, last, "
                "can be continued)",
                stacklevel=2,
            )
            continue
        return path, None if sharded else checkpoint
    return None, None


def _continues(manager: Any, checkpoint: Mapping[str, Any], path: Path) -> bool:
    """Whether ``checkpoint`` continues ``manager``'s history (see :func:`find_resume_checkpoint`)."""
    unit = getattr(manager, "unit", "epoch")
    if getattr(manager, "_unit", "epoch") is None and checkpoint.get("unit") in ("epoch", "step"):
        unit = checkpoint["unit"]  # no history yet: the checkpoint says what the run counts
    newest = max((record[unit] for record in manager.values), default=None)
    if newest is None:
        return True  # nothing recorded here: any checkpoint of this folder continues it (a warm start's too)
    tokens = getattr(manager, "_lineage", {})
    expected, token = tokens.get(str(newest)), checkpoint.get("lineage")
    if expected and token:
        if token != expected and token not in tokens.values():
            warnings.warn(
                f"--resume auto skipped '{path}': it continues another history than '{manager.metrics_file.name}' "
                f"(saved at {unit} {checkpoint.get(unit)} of a run branched or restarted since)",
                stacklevel=3,
            )
        return token == expected
    position = checkpoint.get(unit)
    if unit == "epoch" and isinstance(position, int) and position > (newest or 0):
        warnings.warn(
            f"--resume auto skipped '{path}': it records epoch {position}, after the newest recorded epoch "
            f"{newest or 0} (a checkpoint's epoch is the last finished one); pass it as --resume PATH to take it",
            stacklevel=3,
        )
    return position == (newest or 0) if unit == "epoch" else type(position) is int and position >= (newest or 0)
