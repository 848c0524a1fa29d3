"""Everything a resume needs in one checkpoint: make_training_state / restore_training_state."""

from __future__ import annotations

import datetime
import itertools
import os
import pickle
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from batteries import _dcp, distributed
from batteries._checks import check_bool, check_file_name, check_int, check_number
from batteries.checkpoint import load_checkpoint, load_states, make_checkpoint, state_parts
from batteries.seed import check_rng_state, get_rng_state, set_rng_state

__all__ = ["make_training_state", "restore_training_state", "find_resume_checkpoint"]

_gathers = itertools.count()  # calls of _gather_rng_states in this process: the same sequence on every rank


def _gather_rng_states(timeout: float) -> list[dict[str, Any] | None]:
    """Every rank's :func:`get_rng_state` on rank 0, through the process group's key-value store.

    Each rank publishes its state under a key numbered by its count of calls; rank 0 waits at most
    ``timeout`` seconds for the others' keys, reads and deletes them. Other ranks do not wait:
    their list holds their own state only (at their index). No collective runs, so a call on rank
    0 alone cannot hang: it fails after ``timeout`` with the fix in the message.
    """
    own = get_rng_state()
    world_size, rank = distributed.get_world_size(), distributed.get_rank()
    if world_size == 1:
        return [own]
    store = dist.distributed_c10d._get_default_store()
    prefix = f"batteries/rng_states/{next(_gathers)}"
    states: list[dict[str, Any] | None] = [None] * world_size
    states[rank] = own
    if rank != 0:
        store.set(f"{prefix}/{rank}", pickle.dumps(own))
        return states
    keys = {other: f"{prefix}/{other}" for other in range(1, world_size)}
    try:
        store.wait(list(keys.values()), datetime.timedelta(seconds=timeout))
    except RuntimeError:  # DistStoreError: a timeout
        late = [other for other, key in keys.items() if not store.check([key])]
        raise RuntimeError(
            f"make_training_state waited {timeout:g} s on rank 0 for the RNG states of rank(s) {late}. Under "
            "torch.distributed it gathers every rank's RNG state: call it on every rank, as for a collective "
            "(only rank 0 writes: save_checkpoint and CheckpointManager.process do nothing on other ranks). "
            "To build the state on rank 0 only, pass rng_states=all_gather(get_rng_state()) gathered on every "
            "rank beforehand (or rng_states=[get_rng_state()] to keep rank 0's only)."
        ) from None
    for other, key in keys.items():
        states[other] = pickle.loads(store.get(key))  # noqa: S301 - written by this job's own ranks
        store.delete_key(key)
    return states


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

    A :func:`make_checkpoint` dict plus ``step``, ``scaler_state_dict`` (AMP GradScaler),
    ``ema_state_dict``, ``early_stop_state_dict`` and ``rng_states``: the Python, NumPy, torch CPU
    and CUDA RNG states of every rank (index = rank). Give it to :func:`save_checkpoint` or
    ``CheckpointManager.process`` and restore it with :func:`restore_training_state`. (The
    CheckpointManager keeps its own state in its metrics file, written on every ``process``.)

    Under ``torch.distributed``, with ``rng_states`` not given, call it on every rank, like a
    collective, and give the result to ``save_checkpoint`` / ``manager.process`` on every rank
    (they write on rank 0 only). Every rank publishes its RNG state through the process group's
    key-value store and only rank 0, the one that writes, waits for the others' (at most
    ``rng_timeout`` seconds): the other ranks return at once, with their own state only. This
    design was chosen over a real collective (``all_gather``) because no call pattern can hang:
    called on rank 0 alone, the call raises after ``rng_timeout`` seconds with the fix, instead of
    waiting for ranks that never come (while they wait for rank 0 in their next collective).
    Code that gathers itself passes ``rng_states=all_gather(get_rng_state())`` and may call this
    on rank 0 only. A state with fewer RNG states than ranks is reported on rank 0 when it is
    made (a warning with the fix), not only at resume.

    Args:
        model: the model, bare or wrapped.
        epoch: the last finished epoch.
        step: optimizer steps taken so far. Default 0.
        optimizer, scheduler, scaler, ema, early_stop: optional components (anything with
            ``state_dict()``); the key of one not given is left out.
        rng_states: one :func:`~batteries.get_rng_state` dict per rank, index = rank. Default: every
            rank's, gathered as described above (``[get_rng_state()]`` in one process).
        rng_timeout: seconds rank 0 waits for the other ranks' RNG states. Default 60.
        stage: stage name. Default ``"train"``.
        metrics: optional metrics dict; left out when None.
        sharded: for a sharded checkpoint (``CheckpointManager(..., sharded=True)``, FSDP2):
            ``model_state_dict`` and ``optimizer_state_dict`` come from
            ``torch.distributed.checkpoint.state_dict.get_state_dict``, keyed by parameter name
            (not by position), with this rank's DTensor shards under FSDP2 (nothing is gathered),
            so that a resume with another number of processes can reshard them. The dict is then
            for ``torch.distributed.checkpoint``, not ``torch.save``. Default False.
        **extra: more entries (made safe as in :func:`make_checkpoint`).

    Returns:
        The checkpoint dict.

    Raises:
        ValueError / TypeError: as :func:`make_checkpoint`, or if ``step`` is not an int >= 0 or
            ``rng_timeout`` not a number >= 0.
        RuntimeError: on rank 0, if the other ranks' RNG states did not come within ``rng_timeout``
            (the call was made on rank 0 only).
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
) -> dict[str, Any]:
    """Restore what :func:`make_training_state` saved into the components given: all or nothing.

    Every component passed must find its state in the checkpoint; otherwise nothing is loaded and
    a ``KeyError`` lists every missing part. A state that does not fit its component (SGD state
    into Adam, other keys or shapes) raises one ``RuntimeError`` naming the component and the
    mismatch, and every component is left as it was. The RNG states of this rank (``get_rank()``)
    are restored when the checkpoint was saved by as many ranks as run now; with another world
    size they cannot match and a warning says so. A ``manager`` is rewound to the checkpoint's
    epoch (records of later epochs, from the run that is being replaced, are forgotten).

    A sharded checkpoint (a ``torch.distributed.checkpoint`` folder, or a link to one, written by
    ``CheckpointManager(..., sharded=True)``) is loaded in place: each rank reads the shards of its
    own part of the model and optimizer (``set_state_dict``; DCP reshards, so the folder may come
    from another number of processes), with nothing gathered. Call it on every rank then; it runs
    no collective of its own. Its other entries are read with ``weights_only=True``;
    ``map_location`` does not apply (each shard loads onto its parameter's device).

    Args:
        checkpoint: the dict :func:`load_checkpoint` returned, or a path to load (``weights_only=True``),
            or a sharded checkpoint folder.
        model, optimizer, scheduler, scaler, ema, early_stop: components to restore; None skips.
        manager: a ``CheckpointManager`` to rewind; None skips.
        restore_rng: restore the RNG states. Default True.
        map_location: for a path. Default ``"cpu"``.
        strict: passed to ``model.load_state_dict``. Default True.

    Returns:
        The checkpoint dict (``epoch``, ``step`` and extras are read from it); for a sharded
        checkpoint, without ``model_state_dict`` / ``optimizer_state_dict`` (they went into place).

    Raises:
        KeyError: naming every part asked for that the checkpoint lacks (nothing is restored).
        RuntimeError: if a state does not fit its component (nothing is restored); for a sharded
            checkpoint also if a file cannot be read or ``.metadata`` holds other objects.
        FileNotFoundError / IsADirectoryError / ValueError / RuntimeError / pickle.UnpicklingError:
            as :func:`load_checkpoint`.
    """
    source: Any = "<checkpoint dict>"
    sharded = None  # (folder, metadata) of a sharded checkpoint
    if not isinstance(checkpoint, Mapping):
        source = f"'{checkpoint}'"
        if _dcp.is_checkpoint(checkpoint):
            folder = Path(checkpoint)
            metadata = _dcp.read_metadata(folder)
            sharded = (folder, metadata)
            checkpoint = _dcp.load_entries(folder, metadata)
            present = _dcp.top_level_keys(metadata)
            checkpoint.update({part: {} for part in _dcp.PARTS if part in present})  # loaded in place below
        else:
            checkpoint = load_checkpoint(checkpoint, map_location=map_location, verbose=False)
    components = {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "scaler": scaler,
        "ema": ema,
        "early_stop": early_stop,
    }
    if sharded is not None:  # the model and optimizer load in place: not through state_parts
        in_place = {"model": components.pop("model"), "optimizer": components.pop("optimizer")}
    parts, missing = state_parts(checkpoint, components, source)
    if sharded is not None:
        missing = [f"{name}_state_dict" for name, part in in_place.items() if part is not None and
                   f"{name}_state_dict" not in checkpoint] + missing  # fmt: skip
    if restore_rng and not checkpoint.get("rng_states"):
        missing.append("rng_states")
    if manager is not None and "epoch" not in checkpoint:
        missing.append("epoch")
    if missing:
        raise KeyError(f"checkpoint {source} has no state for: {', '.join(missing)} (nothing was restored)")

    rng_state = None
    if restore_rng:
        rng_states, world_size = checkpoint["rng_states"], distributed.get_world_size()
        if len(rng_states) == world_size:
            rng_state = rng_states[distributed.get_rank()]
            try:
                check_rng_state(rng_state)
            except (TypeError, KeyError, ValueError) as error:
                raise RuntimeError(
                    f"the RNG state of rank {distributed.get_rank()} in {source} cannot be restored: {error}. "
                    "Nothing was restored."
                ) from error
        else:
            warnings.warn(
                f"checkpoint {source} holds RNG states of {len(rng_states)} rank(s) but {world_size} run now: "
                "RNG states not restored, the random streams differ from the saved run's",
                stacklevel=2,
            )
    if manager is not None:  # before anything is restored: a rewind that would fail fails now
        manager._ready_to_rewind(checkpoint["epoch"])
    apply_in_place = cancel = None
    if sharded is not None:  # read into copies first: a misfit or unreadable shard changes nothing
        apply_in_place, cancel = _dcp.prepare_load(*sharded, in_place["model"], in_place["optimizer"], strict, source)
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


def find_resume_checkpoint(
    manager: Any, names: Sequence[str] | None = None, *, world_size: int | None = None
) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint beside ``manager``'s history that continues it, loaded, for ``--resume auto``.

    The history (``manager.values``, read from its metrics file) says which epoch was finished
    last. A candidate continues it when its ``epoch`` (the last finished one, as
    :func:`make_training_state` records it) is that epoch: ``last.pth`` saved at its end, or a
    mid-epoch ``step.pth`` part way into the next one. Any other candidate belongs to another run
    and is skipped: a run branched with ``--resume exp_3.pth`` leaves the abandoned run's newer
    ``step.pth`` behind, and resuming from it would splice the two runs. Among the candidates that
    continue the history, the one with the most optimizer steps (``step``) wins. Without any
    history, only a checkpoint of epoch 0 (saved during the first epoch) continues it.

    For a sharded manager (``CheckpointManager(..., sharded=True)``) the candidates are the
    checkpoint folders ``step`` and ``last``; only their ``epoch``, ``step`` and ``rng_states``
    are read (on this rank, no collective), and the second item returned is None: a sharded
    checkpoint loads in place, with ``restore_training_state(path, model, ...)``.

    Args:
        manager: the run's :class:`~batteries.CheckpointManager` (its ``logdir`` holds the candidates).
        names: names to consider inside ``manager.logdir``. Default ``("step.pth", "last.pth")``, or
            ``("step", "last")`` for a sharded manager.
        world_size: the number of processes that will continue the run, or None. When given, a
            candidate saved by another number of processes (the length of its ``rng_states``) is
            taken only if it is the manager's ``last`` (``last.pth``): an epoch's end, which any
            number of processes can continue, where a mid-epoch position cannot be split over
            another number of ranks. A candidate so skipped is named in a warning. Default None.

    Returns:
        ``(path, checkpoint)`` of the one to resume from (``(path, None)`` for a sharded manager),
        or ``(None, None)`` when none continues the history.

    Raises:
        TypeError / ValueError: if ``world_size`` is not an int >= 1.
        RuntimeError / pickle.UnpicklingError: as :func:`load_checkpoint`, for a candidate that
            cannot be read.
    """
    sharded = getattr(manager, "sharded", False) is True
    if names is None:
        names = ("step", "last") if sharded else ("step.pth", "last.pth")
    if world_size is not None:
        world_size = check_int(world_size, "world_size", minimum=1)
    last = "last" if sharded else "last.pth"
    newest = max((record["epoch"] for record in manager.values), default=0)
    found = []
    for order, name in enumerate(names):
        path = Path(manager.logdir) / check_file_name(name, "names")
        if sharded and _dcp.is_checkpoint(path):
            checkpoint = _dcp.load_entries(path, keys={"epoch", "step", "rng_states"})
        elif not sharded and path.is_file():
            checkpoint = load_checkpoint(path, verbose=False)
        else:
            continue
        if checkpoint.get("epoch") != newest:
            continue
        saved_by = len(checkpoint.get("rng_states") or ())
        if world_size is not None and saved_by != world_size and name != last:
            warnings.warn(
                f"'{path}' was saved by {saved_by} process(es) and {world_size} resume: a mid-epoch position "
                f"cannot be split over another number of processes, so it is skipped (the epoch's end, {last}, "
                "can be continued)",
                stacklevel=2,
            )
            continue
        found.append((checkpoint.get("step", 0), -order, path, None if sharded else checkpoint))
    if not found:
        return None, None
    *_, path, checkpoint = max(found, key=lambda item: item[:2])
    return path, checkpoint
