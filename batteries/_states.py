"""Loading states into a model, optimizer and scheduler: all of them or none."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from batteries._async import snapshot
from batteries.model import strip_prefixes, unwrap_model

__all__ = ["STATE_KEYS", "find_state", "load_states", "missing_states_error", "state_parts"]

logger = logging.getLogger(__name__)

# Where a component's state may be, in this order: this toolkit's key, then the names of
# pytorch/examples (state_dict, optimizer, scheduler) and nanoGPT (model, optimizer).
STATE_KEYS = {
    "model": ("model_state_dict", "state_dict", "model"),
    "optimizer": ("optimizer_state_dict", "optimizer"),
    "scheduler": ("scheduler_state_dict", "scheduler"),
}


def load_states(parts: list[tuple[str, Any, Any]], source: Any, strict: bool = True) -> None:
    """Load each ``(name, component, state)`` of ``parts``: all of them or none.

    A state that does not fit its component (another optimizer class, other keys or shapes) raises
    one error naming the component and the mismatch, after every component was given back the
    state it had before the call (modules through CPU copies of their tensors).

    Args:
        parts: ``(name, component, state)`` triples, loaded in this order; ``name`` is for messages.
        source: where the states came from, for messages.
        strict: passed to ``load_state_dict`` of the part named ``"model"`` (the others load strictly).
            With False, the model's keys missing from the state and the state's keys the model
            lacks are logged as a warning.

    Raises:
        RuntimeError: if a state does not fit its component; nothing is changed then.
    """
    undo: list[Callable[[], None]] = []
    skipped = None
    try:
        for name, component, state in parts:
            undo.append(_undo_for(component))
            try:
                result = _load_one(component, state, strict if name == "model" else True)
                skipped = result if name == "model" else skipped
            except Exception as error:
                raise RuntimeError(
                    f"the {name} state in {source} does not fit the {type(component).__name__} given: "
                    f"{type(error).__name__}: {str(error).rstrip('.')}. Nothing was restored."
                ) from error
    except BaseException:
        for restore in reversed(undo):
            restore()
        raise
    if skipped is not None and (skipped.missing_keys or skipped.unexpected_keys):
        logger.warning(
            f"the model state in {source} loaded with strict=False: model keys absent from it kept their values: "
            f"{skipped.missing_keys}; its keys the model lacks were ignored: {skipped.unexpected_keys}"
        )


def state_parts(
    checkpoint: Mapping[str, Any], components: Mapping[str, Any], source: Any
) -> tuple[list[tuple[str, Any, Any]], list[str]]:
    """The ``(name, component, state)`` of every component given, and the keys of the states missing.

    Args:
        checkpoint: a checkpoint dict; the state of ``name`` is where :func:`find_state` finds it.
        components: name -> component, or None to skip it.
        source: where the checkpoint came from, for messages.

    Returns:
        The parts for :func:`load_states`, modules last (the cheapest to undo load first), and the
        missing keys, e.g. ``["optimizer_state_dict"]``. A model's state comes without the wrapper
        prefixes (``module.``, ``_orig_mod.``) the model does not use.
    """
    parts, missing = [], []
    for name, component in components.items():
        if component is None:
            continue
        found = find_state(checkpoint, name)
        if found is None:
            missing.append(f"{name}_state_dict")
            continue
        state = found[1]
        if name == "model":
            state = strip_prefixes(state, set(unwrap_model(component).state_dict()))
        parts.append((name, component, state))
    return sorted(parts, key=lambda part: isinstance(part[1], nn.Module)), missing  # cheap to undo first


def find_state(checkpoint: Mapping[str, Any], name: str) -> tuple[str | None, Any] | None:
    """Where the state of component ``name`` is in ``checkpoint``: ``(key, state)``, or None.

    The keys of ``STATE_KEYS[name]`` (``f"{name}_state_dict"`` for other names) are tried in order.
    The first one holds the state if its value is a mapping (for a component other than the model,
    anything but None). The others hold it only if their value looks like that state: a mapping of
    names to tensors for the model (``state_dict``, ``model``), a dict with ``param_groups`` for
    the optimizer, a dict for the scheduler. Failing all, a checkpoint that is itself a mapping of
    tensors (a bare state dict) is the model's state, with key None.

    Args:
        checkpoint: a checkpoint dict.
        name: ``"model"``, ``"optimizer"``, ``"scheduler"``, or another component's name.

    Returns:
        ``(key, state)``; None if the checkpoint holds no state for ``name``.
    """
    first, *others = STATE_KEYS.get(name, (f"{name}_state_dict",))
    value = checkpoint.get(first)
    if value is not None and (name != "model" or isinstance(value, Mapping)):
        return first, value
    looks_right = {
        "model": _maps_to_tensors,
        "optimizer": lambda state: isinstance(state, Mapping) and "param_groups" in state,
    }.get(name, lambda state: isinstance(state, Mapping))
    for key in others:
        if looks_right(checkpoint.get(key)):
            return key, checkpoint[key]
    if name == "model" and _maps_to_tensors(checkpoint):
        return None, checkpoint
    return None


def missing_states_error(source: Any, missing: list[str], checkpoint: Mapping[str, Any], outcome: str) -> KeyError:
    """The error for the states ``missing`` from ``checkpoint``: it names them and the keys the checkpoint holds.

    Args:
        source: where the checkpoint came from, e.g. ``"'last.pth'"``.
        missing: the keys looked for in vain, e.g. ``["model_state_dict"]``.
        checkpoint: the checkpoint dict.
        outcome: what the caller did instead, e.g. ``"nothing was loaded"``.

    Returns:
        A ``KeyError`` to raise.
    """
    keys = [str(key) for key in checkpoint]
    held = ", ".join(keys[:20]) + (f", ... ({len(keys) - 20} more)" if len(keys) > 20 else "")
    return KeyError(
        f"checkpoint {source} has no state for: {', '.join(missing)} ({outcome}); it holds: {held or 'nothing'}"
    )


def _maps_to_tensors(value: Any) -> bool:
    """Whether ``value`` is a model state dict: a mapping whose values are tensors (or a module's extra state)."""
    return isinstance(value, Mapping) and all(
        isinstance(item, torch.Tensor) or (isinstance(key, str) and key.endswith("_extra_state"))
        for key, item in value.items()
    )


def _undo_for(component: Any) -> Callable[[], None]:
    """A function that gives ``component`` back the state it has now (see :func:`load_states`)."""
    if isinstance(component, nn.Module):
        module = unwrap_model(component)
        saved = snapshot(module.state_dict())  # CPU copies: loading copies into the same tensors
        return lambda: module.load_state_dict(saved)
    if isinstance(component, torch.optim.Optimizer):
        saved = component.state_dict()  # a load replaces the state tensors, never writes into them
        return lambda: component.load_state_dict(saved)
    saved = copy.deepcopy(component.state_dict())
    attributes = dict(vars(component)) if hasattr(component, "__dict__") else None

    def undo() -> None:
        if attributes is not None:  # a scheduler's load adds the saved keys as attributes
            vars(component).clear()
            vars(component).update(attributes)
        component.load_state_dict(saved)

    return undo


def _load_one(component: Any, state: Any, strict: bool) -> Any:
    """Load ``state`` into ``component``; ValueError if it visibly belongs to something else.

    Returns:
        For a module, what its ``load_state_dict`` returns (the missing and unexpected keys); else None.
    """
    if isinstance(component, nn.Module):
        return unwrap_model(component).load_state_dict(state, strict=strict)
    elif isinstance(component, torch.optim.Optimizer):
        _check_state_shapes(component, state)
        before = [set(group) for group in component.param_groups]
        component.load_state_dict(state)
        lacking = sorted(set().union(*before) - set().union(*map(set, component.param_groups)))
        if lacking:
            raise ValueError(f"its param_groups lack {lacking} (saved by another optimizer class?)")
    else:
        if isinstance(state, Mapping):  # e.g. StepLR's state into a CosineAnnealingLR
            own = component.state_dict()
            lacking = sorted(k for k in own if isinstance(k, str) and not k.startswith("_") and k not in state)
            if lacking:
                raise ValueError(f"it lacks {lacking} (saved by another class?)")
        component.load_state_dict(state)


def _check_state_shapes(optimizer: torch.optim.Optimizer, state: Any) -> None:
    """Check that the tensors of each parameter's saved state have that parameter's shape.

    A tensor with as many dims as its parameter (``exp_avg``, ``momentum_buffer``) must have its
    shape, dims of size 1 excepted (factored states: Adafactor's ``row_var``), unless it is flat
    with as many elements as the group's parameters together (LBFGS's ``d``); 0-d tensors
    (``step``) and others are not checked. A state of another structure is left to
    ``load_state_dict`` to refuse.

    Raises:
        ValueError: naming the state, the parameter and both shapes, for the first misfit.
    """
    try:
        saved_groups, per_parameter = state["param_groups"], state["state"]
        if len(saved_groups) != len(optimizer.param_groups) or not isinstance(per_parameter, Mapping):
            return  # load_state_dict refuses it
        for index, (saved, group) in enumerate(zip(saved_groups, optimizer.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                return  # load_state_dict refuses it
            flat = sum(param.numel() for param in group["params"])
            for number, (saved_id, param) in enumerate(zip(saved["params"], group["params"])):
                entry = per_parameter.get(saved_id)
                for key, value in entry.items() if isinstance(entry, Mapping) else ():
                    if not isinstance(value, torch.Tensor) or not value.dim() == param.dim() > 0:
                        continue
                    if value.dim() == 1 and value.numel() == flat:
                        continue
                    if any(size not in (expected, 1) for size, expected in zip(value.shape, param.shape)):
                        raise ValueError(
                            f"the saved {key!r} of parameter {number} of param_groups[{index}] has shape "
                            f"{tuple(value.shape)}, the parameter {tuple(param.shape)}"
                        )
    except (TypeError, KeyError):
        return  # a state of another structure: load_state_dict refuses it
