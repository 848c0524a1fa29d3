"""Wrapped models: unwrap DataParallel / DDP / ``torch.compile`` and strip their state-dict prefixes."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from torch import nn

__all__ = ["unwrap_model", "strip_prefixes"]

WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside ``nn.DataParallel``, ``DistributedDataParallel`` and ``torch.compile`` wrappers.

    Args:
        model: a bare or wrapped module (wrappers may be nested).

    Returns:
        The innermost module.
    """
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def strip_prefixes(state_dict: Mapping[str, Any], target_keys: set[str]) -> Mapping[str, Any]:
    """Drop the ``module.`` / ``_orig_mod.`` prefixes a wrapped model's state dict carries.

    Args:
        state_dict: a model state dict, maybe saved from a wrapped model.
        target_keys: keys of the model to load into; a prefix all keys share is dropped
            until some key is one of them.

    Returns:
        ``state_dict`` itself if nothing was dropped, else a new ``OrderedDict``.
    """
    while state_dict and not (set(state_dict) & target_keys):
        for prefix in WRAPPER_PREFIXES:
            if all(key.startswith(prefix) for key in state_dict):
                state_dict = OrderedDict((key[len(prefix) :], value) for key, value in state_dict.items())
                break
        else:
            break
    return state_dict
