"""Seeding and RNG state capture / restore."""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["seed_all", "get_rng_state", "set_rng_state", "check_rng_state"]

_MAX_SEED = 2**32 - 1


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int in [0, {_MAX_SEED}], got {seed!r} ({type(seed).__name__})")
    if not 0 <= int(seed) <= _MAX_SEED:
        raise ValueError(f"seed must be an int in [0, {_MAX_SEED}], got {seed!r}")
    return int(seed)


def seed_all(seed: int = 42, deterministic: bool = False) -> int:
    """Seed ``random``, NumPy and torch (CPU and every CUDA device) with ``seed``.

    ``torch.manual_seed(seed)`` is called with ``seed`` itself, so results match other code seeded
    the same way. Inside a DataLoader worker (``worker_init_fn=seed_all``) the argument, the worker
    id, is ignored: ``random`` and NumPy are seeded from the worker's own torch seed
    (``get_worker_info().seed``), so workers differ from each other and from epoch to epoch.

    Args:
        seed: an int in ``[0, 2**32 - 1]`` (the range NumPy accepts). Default 42.
        deterministic: also turn on deterministic algorithms: ``cudnn.deterministic = True``,
            ``cudnn.benchmark = False``, ``torch.use_deterministic_algorithms(True, warn_only=True)``
            and ``CUBLAS_WORKSPACE_CONFIG=:4096:8``. Default False.

    Returns:
        The seed used (in a DataLoader worker, the worker's torch seed).

    Raises:
        ValueError: if ``seed`` is not an int in the accepted range.

    Example:
        >>> seed_all(42)
        42
    """
    worker = torch.utils.data.get_worker_info()
    if worker is not None:
        worker_seed = int(worker.seed)
        random.seed(worker_seed)
        np.random.seed(worker_seed % (_MAX_SEED + 1))
        return worker_seed

    seed = _check_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    return seed


def get_rng_state() -> dict[str, Any]:
    """Capture the state of every global RNG: Python, NumPy, torch CPU and each CUDA device.

    Returns:
        A dict that ``torch.save`` stores and ``torch.load(weights_only=True)`` reads back
        (NumPy's key array is stored as a tensor). Give it to :func:`set_rng_state`.
    """
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def check_rng_state(state: Any) -> None:
    """Check that :func:`set_rng_state` can restore ``state`` here, changing nothing.

    Args:
        state: a dict from :func:`get_rng_state` (possibly after a save / load round trip).

    Raises:
        TypeError: if ``state`` is not a dict.
        KeyError: if ``state`` lacks one of ``"python"``, ``"numpy"``, ``"torch"``.
        ValueError: if the CUDA states saved do not match the number of visible CUDA devices.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"RNG state must be the dict get_rng_state() returns, got {type(state).__name__}")
    missing = [key for key in ("python", "numpy", "torch") if key not in state]
    if missing:
        raise KeyError(f"RNG state is missing {missing}; expected the dict get_rng_state() returns")
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) != torch.cuda.device_count():
        raise ValueError(
            f"RNG state holds {len(state['cuda'])} CUDA device states, "
            f"but {torch.cuda.device_count()} devices are visible"
        )


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states captured by :func:`get_rng_state`.

    ``state`` is checked first (:func:`check_rng_state`): a bad one changes no RNG.

    Args:
        state: the dict :func:`get_rng_state` returned (possibly after a save / load round trip).

    Raises:
        TypeError: if ``state`` is not a dict.
        KeyError: if ``state`` lacks one of ``"python"``, ``"numpy"``, ``"torch"``.
        ValueError: if the CUDA states saved do not match the number of visible CUDA devices.
    """
    check_rng_state(state)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["bit_generator"],
            np.asarray(np_state["keys"], dtype=np.int64).astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
