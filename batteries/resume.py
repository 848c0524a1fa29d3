"""Everything a resume needs in one checkpoint: make_training_state / restore_training_state."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from batteries import distributed
from batteries.checkpoint import load_checkpoint, make_checkpoint
from batteries.model import load_model_state
from batteries.seed import get_rng_state, set_rng_state

__all__ = ["make_training_state", "restore_training_state"]


# Keys of the training state next to the standard ones, and the component each one restores.
_STATE_PARTS = {
    "optimizer": "optimizer_state_dict",
    "scheduler": "scheduler_state_dict",
    "scaler": "scaler_state_dict",
    "ema": "ema_state_dict",
    "early_stop": "early_stop_state_dict",
}


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
    rng_states: list[dict[str, Any]] | None = None,
    stage: Any = "train",
    metrics: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Everything a resume needs, in one checkpoint dict that loads with ``weights_only=True``.

    A :func:`make_checkpoint` dict plus ``step``, ``scaler_state_dict`` (AMP GradScaler),
    ``ema_state_dict``, ``early_stop_state_dict`` and ``rng_states``: the Python, NumPy, torch CPU
    and CUDA RNG states of every rank. Give it to :func:`save_checkpoint` or
    ``CheckpointManager.process`` and restore it with :func:`restore_training_state`. (The
    CheckpointManager keeps its own state in its metrics file, written on every ``process``.)

    Args:
        model: the model, bare or wrapped.
        epoch: the last finished epoch.
        step: optimizer steps taken so far. Default 0.
        optimizer, scheduler, scaler, ema, early_stop: optional components (anything with
            ``state_dict()``); None ones are stored as None.
        rng_states: one :func:`~batteries.get_rng_state` dict per rank, index = rank; under
            ``torch.distributed`` pass ``all_gather(get_rng_state())`` (a collective: call it on every
            rank). Default: ``[get_rng_state()]`` of this process.
        stage: stage name. Default ``"train"``.
        metrics: optional metrics dict.
        **extra: more entries (made safe as in :func:`make_checkpoint`).

    Returns:
        The checkpoint dict.

    Raises:
        ValueError / TypeError: as :func:`make_checkpoint`, or if ``step`` is not an int >= 0.
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    components = {"scaler": scaler, "ema": ema, "early_stop": early_stop}
    return make_checkpoint(
        stage,
        epoch,
        model,
        optimizer,
        scheduler,
        metrics,
        step=int(step),
        **{_STATE_PARTS[name]: None if part is None else part.state_dict() for name, part in components.items()},
        rng_states=[get_rng_state()] if rng_states is None else list(rng_states),
        **extra,
    )


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
    """Restore what :func:`make_training_state` saved into the components given.

    Every component passed must find its state in the checkpoint; otherwise nothing is loaded and
    a ``KeyError`` lists every missing part. The RNG states of this rank (``get_rank()``) are
    restored when the checkpoint was saved by as many ranks as run now; with another world size
    they cannot match and a warning says so. A ``manager`` is rewound to the checkpoint's epoch
    (records of later epochs, from the run that is being replaced, are forgotten).

    Args:
        checkpoint: the dict :func:`load_checkpoint` returned, or a path to load (``weights_only=True``).
        model, optimizer, scheduler, scaler, ema, early_stop: components to restore; None skips.
        manager: a ``CheckpointManager`` to rewind; None skips.
        restore_rng: restore the RNG states. Default True.
        map_location: for a path. Default ``"cpu"``.
        strict: passed to ``model.load_state_dict``. Default True.

    Returns:
        The checkpoint dict (``epoch``, ``step`` and extras are read from it).

    Raises:
        KeyError: naming every part asked for that the checkpoint lacks.
        FileNotFoundError / RuntimeError / pickle.UnpicklingError: as :func:`load_checkpoint`.
    """
    source: Any = "<checkpoint dict>"
    if not isinstance(checkpoint, Mapping):
        source = checkpoint
        checkpoint = load_checkpoint(checkpoint, map_location=map_location, verbose=False)
    components = {
        "optimizer": optimizer,
        "scheduler": scheduler,
        "scaler": scaler,
        "ema": ema,
        "early_stop": early_stop,
    }
    missing = [
        _STATE_PARTS[name]
        for name, part in components.items()
        if part is not None and checkpoint.get(_STATE_PARTS[name]) is None
    ]
    if model is not None and "model_state_dict" not in checkpoint:
        missing.insert(0, "model_state_dict")
    if restore_rng and not checkpoint.get("rng_states"):
        missing.append("rng_states")
    if manager is not None and "epoch" not in checkpoint:
        missing.append("epoch")
    if missing:
        raise KeyError(f"checkpoint {source} has no state for: {', '.join(missing)}")

    if model is not None:
        load_model_state(model, checkpoint, source, strict)
    for name, part in components.items():
        if part is not None:
            part.load_state_dict(checkpoint[_STATE_PARTS[name]])
    if restore_rng:
        rng_states = checkpoint["rng_states"]
        world_size = distributed.get_world_size()
        if len(rng_states) == world_size:
            set_rng_state(rng_states[distributed.get_rank()])
        else:
            warnings.warn(
                f"checkpoint {source} holds RNG states of {len(rng_states)} rank(s) but {world_size} run now: "
                "RNG states not restored, the random streams differ from the saved run's",
                stacklevel=2,
            )
    if manager is not None:
        manager.rewind(checkpoint["epoch"])
    return dict(checkpoint)
