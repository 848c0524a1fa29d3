"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP): folders, states, write, read safely.

A sharded checkpoint is a folder: one ``__<rank>_0.distcp`` file per rank and DCP's ``.metadata``.
Reads use an allowlist and ``weights_only=True`` and run no collective (docs/checkpoint-manager.md).
``torch.distributed.checkpoint`` is imported on first use (it costs about a second).
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from batteries import distributed
from batteries._dcp_values import check_flat_keys, check_keys, decode, encode, state_leaves
from batteries._io import fsync_dir, tmp_path

METADATA = ".metadata"
MODEL, OPTIMIZER = "model_state_dict", "optimizer_state_dict"
PARTS = (MODEL, OPTIMIZER)  # the entries every rank writes and loads in place


# ----------------------------------------------------------------------------- folders
def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is (or links to) a complete DCP checkpoint folder."""
    path = Path(path)
    return path.is_dir() and (path / METADATA).is_file()


def remove_tree(path: Path) -> None:
    """Delete the folder, file or link ``path`` (missing is fine); a folder is renamed to a hidden
    temporary name first, so that no half-deleted folder is ever visible."""
    if path.is_symlink() or path.is_file():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        fsync_dir(path.parent)
        return
    if not path.exists():
        return
    away = tmp_path(path)
    os.rename(path, away)
    fsync_dir(path.parent)
    shutil.rmtree(away, ignore_errors=True)
    fsync_dir(path.parent)


def remove_temporary(path: Path) -> None:
    """Delete an abandoned temporary file or folder (already hidden): no rename first."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    fsync_dir(path.parent)


def atomic_symlink(target_name: str, link: Path) -> None:
    """Point the symbolic link ``link`` at ``target_name`` (relative), atomically: a new link under a
    temporary name, ``os.replace``d over the old one."""
    if link.is_symlink() and os.readlink(link) == target_name:
        return
    tmp = tmp_path(link)
    os.symlink(target_name, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(link.parent)


def commit_folder(tmp: Path, final: Path) -> None:
    """Make the complete checkpoint folder ``tmp`` visible as ``final`` (which must not exist)."""
    fsync_dir(tmp)  # the entries of every rank's files (each rank fsynced its own file's data)
    os.rename(tmp, final)
    fsync_dir(final.parent)


# ----------------------------------------------------------------------------- states
def model_and_optimizer_states(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """``{"model_state_dict", "optimizer_state_dict"}`` keyed by parameter names (DCP can reshard them),
    from ``get_state_dict``: this rank's DTensor shards under FSDP2, whole tensors otherwise."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {MODEL: state_leaves(get_model_state_dict(model), MODEL)}
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {MODEL: state_leaves(model_state, MODEL), OPTIMIZER: state_leaves(optimizer_state, OPTIMIZER)}


def check_state(checkpoint: Any) -> None:
    """Raise if ``checkpoint`` cannot be written as a sharded checkpoint (before any rank writes).

    Raises:
        TypeError: if it is not a dict.
        ValueError: if its optimizer state is keyed by position (``optimizer.state_dict()``), which
            DCP cannot reshard.
    """
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a dict, got {type(checkpoint).__name__}")
    optimizer_state = checkpoint.get(OPTIMIZER)
    state = optimizer_state.get("state") if isinstance(optimizer_state, Mapping) else None
    if isinstance(state, Mapping) and any(not isinstance(key, str) for key in state):
        raise ValueError(
            "checkpoint['optimizer_state_dict'] is keyed by parameter position (optimizer.state_dict()), which a "
            "sharded checkpoint cannot reshard; build the checkpoint with make_training_state(..., sharded=True) "
            "(it uses torch.distributed.checkpoint.state_dict.get_state_dict)"
        )


def rank_share(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """What this rank writes, encoded so that it reads back as given (:mod:`batteries._dcp_values`).

    Everything on global rank 0; the model and optimizer states elsewhere (the other entries, e.g.
    RNG states gathered on rank 0, may differ between ranks).

    Raises:
        TypeError / ValueError: as :func:`check_state`, or naming the key of a value that a sharded
            checkpoint would not give back exactly (an int key in an optimizer state, two entries
            under one flat key, a value of a type ``make_safe`` does not give).
    """
    check_state(checkpoint)
    main = distributed.get_rank() == 0
    share = {}
    for key, value in checkpoint.items():
        if type(key) is not str:
            raise TypeError(f"checkpoint keys must be str in a sharded checkpoint, got {key!r}")
        if key in PARTS:
            share[key] = check_keys(value, key)
        elif main:
            share[key] = encode(value, key)
    check_flat_keys(share)
    return share


def save(state: Mapping[str, Any], folder: Path, *, group: Any = None, asynchronous: bool = False) -> Any:
    """Write ``state`` (this rank's share) into ``folder`` with DCP: a collective on every rank.

    Args:
        state: this rank's share (:func:`rank_share`).
        folder: the (temporary) checkpoint folder; created if missing.
        group: process group of DCP's collectives; None for the default one.
        asynchronous: ``dcp.async_save``: the state is copied to CPU memory here, the files are
            written on a background thread; returns its future.

    Returns:
        None, or with ``asynchronous`` a ``concurrent.futures.Future``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter

    no_dist = not distributed.is_initialized()
    writer = FileSystemWriter(str(folder), sync_files=True)
    planner = DefaultSavePlanner(dedup_save_to_lowest_rank=True)  # replicated tensors: rank 0's copy
    if asynchronous and no_dist:  # DCP warns on its own thread, maybe after _quiet ended: a filter that stays
        warnings.filterwarnings("ignore", message=_ONE_PROCESS, module=r"torch\.distributed\.checkpoint")
    with _quiet(), _plain_errors():
        if asynchronous:
            return dcp.async_save(
                dict(state), storage_writer=writer, planner=planner, process_group=group, no_dist=no_dist
            )
        dcp.save(dict(state), storage_writer=writer, planner=planner, process_group=group, no_dist=no_dist)
    return None


def plain_error(error: BaseException) -> BaseException:
    """The error a DCP ``CheckpointException`` wraps: this rank's own, else a ``RuntimeError`` naming the ranks.

    ``CheckpointException`` derives from ``BaseException``, which ``except Exception`` does not
    catch; DCP raises it on every rank when any rank failed. Any other error is returned as is.
    """
    failures = getattr(error, "failures", None)
    if type(error).__name__ != "CheckpointException" or not isinstance(failures, dict) or not failures:
        return error
    own = failures.get(distributed.get_rank())
    if own is not None:
        return own[0] if isinstance(own, tuple) else own
    rank, first = min(failures.items(), key=lambda item: item[0])
    first = first[0] if isinstance(first, tuple) else first
    return RuntimeError(
        f"the sharded checkpoint failed on rank(s) {sorted(failures)}; rank {rank}: {type(first).__name__}: {first}"
    )


@contextlib.contextmanager
def _plain_errors() -> Iterator[None]:
    try:
        yield
    except BaseException as error:
        mapped = plain_error(error)
        if mapped is error:
            raise
        raise mapped from error


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence DCP's warning that it works in one process (asked for: ``no_dist``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_ONE_PROCESS)
        yield


_ONE_PROCESS = "torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to"


# ----------------------------------------------------------------------------- reading
class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` and nothing else: DCP's own classes, torch dtypes / sizes, paths."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem"):
            found = super().find_class(module, name)
            if isinstance(found, type):
                return found
        elif module == "torch.serialization" and name == "_get_layout":
            return super().find_class(module, name)
        elif module == "torch":
            found = getattr(torch, name, None)
            if isinstance(found, (torch.dtype, torch.layout, torch.memory_format)) or found is torch.Size:
                return found
        elif module == "pathlib" and name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"):
            return super().find_class(module, name)
        elif module == "collections" and name == "OrderedDict":
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a DCP metadata file")


def _reader(folder: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = read_metadata(folder)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(folder))


def read_metadata(folder: str | os.PathLike) -> Any:
    """DCP's ``Metadata`` of the checkpoint ``folder``, unpickled with an allowlist.

    Raises:
        FileNotFoundError: if ``folder`` holds no ``.metadata`` (not a complete DCP checkpoint).
        RuntimeError: if ``.metadata`` is truncated, corrupt or holds other objects.
    """
    path = Path(folder) / METADATA
    if not path.is_file():
        raise FileNotFoundError(f"'{folder}' is not a complete sharded (DCP) checkpoint: it has no {METADATA} file")
    try:
        with open(path, "rb") as file:
            metadata = _MetadataUnpickler(file).load()
    except Exception as error:
        raise RuntimeError(
            f"the sharded checkpoint's '{path}' is truncated, corrupt or not DCP metadata: {error}"
        ) from error
    if not hasattr(metadata, "state_dict_metadata"):
        raise RuntimeError(f"'{path}' holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


def _planner(flatten: bool) -> Any:
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        """DCP's planner with non-tensor items read by ``torch.load(weights_only=True)``."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True, map_location="cpu")
            if self.flatten_state_dict:  # at its path in the nested dict given
                put(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:  # into the dict given (self.state_dict may be a copy of it)
                self.original_state_dict[read_item.dest_index.fqn] = obj

    return SafeLoadPlanner(flatten_state_dict=flatten)


def load(folder: Path, state: dict[str, Any], *, flatten: bool) -> None:
    """Read ``state``'s items from ``folder`` on this rank alone: tensors in place, other items replaced.

    ``flatten``: ``state`` is nested as saved (else keyed by DCP's flat keys, as in the metadata).
    """
    import torch.distributed.checkpoint as dcp

    with _quiet(), _plain_errors():
        dcp.load(state, storage_reader=_reader(folder), planner=_planner(flatten), no_dist=True)


def flat_items(state: dict[str, Any], metadata: Any) -> dict[str, Any]:
    """The leaves of the nested ``state`` under the flat keys DCP saves them with (DCP's own flattening)."""
    planner = _planner(flatten=True)
    planner.set_up_planner(state, metadata)
    return planner.state_dict


def put(root: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    """Set ``value`` at ``path`` in ``root``, making the dicts (str keys) and lists (int keys) on the way."""
    container: Any = root
    for key, following in zip(path, path[1:]):
        empty: Any = {} if type(following) is str else []
        if isinstance(container, Mapping):
            container = container.setdefault(key, empty)
            continue
        container.extend([None] * (key + 1 - len(container)))
        if container[key] is None:
            container[key] = empty
        container = container[key]
    if type(path[-1]) is int:
        container.extend([None] * (path[-1] + 1 - len(container)))
    container[path[-1]] = value


def top_level_keys(metadata: Any) -> set[str]:
    """The checkpoint's entries (``epoch``, ``model_state_dict``, ...), from the metadata."""
    planner_data = metadata.planner_data or {}
    return {str(planner_data.get(key, (key,))[0]) for key in metadata.state_dict_metadata}


def load_entries(folder: str | os.PathLike, metadata: Any = None, keys: set[str] | None = None) -> dict[str, Any]:
    """The checkpoint's entries other than the model and optimizer states, on this rank alone.

    Args:
        folder: the checkpoint folder.
        metadata: its :func:`read_metadata`, if already read.
        keys: only these top-level entries (e.g. ``{"epoch", "step"}``); None for all but
            ``model_state_dict`` / ``optimizer_state_dict``.

    Returns:
        The entries, as saved (tensors on the CPU).

    Raises:
        FileNotFoundError / RuntimeError: as :func:`read_metadata`, or for a file that cannot be read.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = Path(folder)
    metadata = read_metadata(folder) if metadata is None else metadata
    planner_data = metadata.planner_data or {}
    flat: dict[str, Any] = {}
    for key, item in metadata.state_dict_metadata.items():
        top = str(planner_data.get(key, (key,))[0])
        if top in PARTS if keys is None else top not in keys:
            continue
        is_tensor = isinstance(item, TensorStorageMetadata)
        flat[key] = torch.empty(item.size, dtype=item.properties.dtype) if is_tensor else None
    if not flat:
        return {}
    try:
        load(folder, flat, flatten=False)
    except Exception as error:
        raise RuntimeError(f"sharded checkpoint '{folder}' cannot be read: {type(error).__name__}: {error}") from error
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        put(nested, planner_data.get(key, (key,)), value)
    return decode(nested)
