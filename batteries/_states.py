"""Loading states into a model, optimizer and scheduler: all of them or none."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from batteries._async import snapshot
from batteries.model import model_state_for, unwrap_model

__all__ = ["load_states", "state_parts"]


def load_states(parts: list[tuple[str, Any, Any]], source: Any, strict: bool = True) -> None:
    """Load each ``(name, component, state)`` of ``parts``: all of them or none.

    A state that does not fit its component (another optimizer class, other keys or shapes) raises
    one error naming the component and the mismatch, after every component was given back the
    state it had before the call (modules through CPU copies of their tensors).

    Args:
        parts: ``(name, component, state)`` triples, loaded in this order; ``name`` is for messages.
        source: where the states came from, for messages.
        strict: passed to ``load_state_dict`` of the part named ``"model"`` (the others load strictly).

    Raises:
        RuntimeError: if a state does not fit its component; nothing is changed then.
    """
    undo: list[Callable[[], None]] = []
    try:
        for name, component, state in parts:
            undo.append(_undo_for(component))
            try:
                _load_one(component, state, strict if name == "model" else True)
            except Exception as error:
                raise RuntimeError(
                    f"the {name} state in {source} does not fit the {type(component).__name__} given: "
                    f"{type(error).__name__}: {str(error).rstrip('.')}. Nothing was restored."
                ) from error
    except BaseException:
        for restore in reversed(undo):
            restore()
        raise


def state_parts(
    checkpoint: Mapping[str, Any], components: Mapping[str, Any], source: Any
) -> tuple[list[tuple[str, Any, Any]], list[str]]:
    """The ``(name, component, state)`` of every component given, and the keys of the states missing.

    Args:
        checkpoint: a checkpoint dict; the state of ``name`` is ``checkpoint[f"{name}_state_dict"]``,
            the model's as :func:`~batteries.model.model_state_for` finds it.
        components: name -> component, or None to skip it.
        source: where the checkpoint came from, for messages.

    Returns:
        The parts for :func:`load_states`, modules last (the cheapest to undo load first), and the
        missing keys, e.g. ``["optimizer_state_dict"]``.
    """
    parts, missing = [], []
    for name, component in components.items():
        if component is None:
            continue
        if name == "model":
            try:
                parts.append((name, component, model_state_for(component, checkpoint, source)))
            except KeyError:
                missing.append("model_state_dict")
        elif checkpoint.get(f"{name}_state_dict") is None:
            missing.append(f"{name}_state_dict")
        else:
            parts.append((name, component, checkpoint[f"{name}_state_dict"]))
    return sorted(parts, key=lambda part: isinstance(part[1], nn.Module)), missing  # cheap to undo first


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


def _load_one(component: Any, state: Any, strict: bool) -> None:
    """Load ``state`` into ``component``; ValueError if it visibly belongs to something else."""
    if isinstance(component, nn.Module):
        unwrap_model(component).load_state_dict(state, strict=strict)
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
