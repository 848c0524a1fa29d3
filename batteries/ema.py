"""EMA: an exponential moving average of a model's weights."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from batteries._checks import check_number
from batteries.model import unwrap_model

__all__ = ["EMA"]


class EMA(nn.Module):
    """Exponential moving average of a model's weights, after timm's ``ModelEmaV2``.

    ``ema = decay * ema + (1 - decay) * weights`` for floating-point parameters and buffers;
    integer buffers (e.g. ``num_batches_tracked``) are copied. A tensor shared under several names
    (tied weights) is updated once per update. The averaged copy lives in ``.module`` (eval mode,
    no gradients); ``ema.module(x)`` evaluates it and ``state_dict()`` / ``load_state_dict()`` save
    and restore it.

    Args:
        model: the model to average (bare or wrapped; it is unwrapped and deep-copied).
        decay: weight of the old average, in ``[0, 1]``. Default 0.9999.
        device: keep the average on this device (e.g. ``"cpu"`` to save GPU memory); None keeps
            the model's device. Default None.

    Raises:
        TypeError: if ``decay`` is not a number.
        ValueError: if ``decay`` is outside ``[0, 1]``.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, device: str | torch.device | None = None) -> None:
        super().__init__()
        decay = check_number(decay, "decay", minimum=0.0)
        if decay > 1.0:
            raise ValueError(f"decay must be a number in [0, 1], got {decay!r}")
        self.decay = decay
        self.device = device
        self.module = copy.deepcopy(unwrap_model(model)).eval()
        self.module.requires_grad_(False)
        if device is not None:
            self.module.to(device)

    @torch.no_grad()
    def _apply_update(self, model: nn.Module, decay: float) -> None:
        source = unwrap_model(model).state_dict()
        target = self.module.state_dict(keep_vars=True)  # the tensors themselves: tied ones are one object
        if source.keys() != target.keys():
            raise ValueError("model has different parameters / buffers than the one the EMA was built from")
        done: set[int] = set()
        for key, ema_value in target.items():
            if id(ema_value) in done:  # a tied tensor under a second name: already averaged once
                continue
            done.add(id(ema_value))
            value = source[key].to(ema_value.device)
            if ema_value.is_floating_point():
                ema_value.lerp_(value.to(ema_value.dtype), 1.0 - decay)
            else:
                ema_value.copy_(value)

    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (call after ``optimizer.step()``).

        Args:
            model: the trained model (bare or wrapped), with the parameters the EMA was built from.

        Raises:
            ValueError: if its parameter / buffer names differ from the averaged copy's.
        """
        self._apply_update(model, self.decay)

    def set(self, model: nn.Module) -> None:
        """Make the average equal to ``model``'s current weights (timm's ``set``).

        Args:
            model: the model to copy (bare or wrapped).

        Raises:
            ValueError: if its parameter / buffer names differ from the averaged copy's.
        """
        self._apply_update(model, 0.0)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)
