"""AverageMeter: a running (weighted) mean."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from batteries import distributed
from batteries._checks import check_int, check_number

__all__ = ["AverageMeter", "AverageMetter"]


def _check(value: Any) -> float | torch.Tensor:
    """A Python float, or the value as a detached 0-d tensor on its own device."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"value must hold one element, got a tensor of shape {tuple(value.shape)}")
        return value.detach().reshape(())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"value must be a number or a one-element tensor, got {value!r} ({type(value).__name__})")
    return float(value)


def _to_float(value: float | torch.Tensor) -> float:
    return value.item() if isinstance(value, torch.Tensor) else float(value)


class AverageMeter:
    """Running weighted mean of a metric, e.g. the loss over an epoch.

    Values may be Python / NumPy numbers or one-element tensors. Tensors are accumulated on their
    own device (in float64, float32 on MPS) with one in-place kernel and no host synchronisation
    per update; the synchronisation happens once, when ``.average`` / ``.sum`` / ``.value`` is read.

    Before the first update ``value``, ``sum``, ``count`` and ``average`` are all 0, as in the
    original batteries, timm and pytorch/examples.

    Attributes:
        value: the last value given to :meth:`update` (float; 0 before the first update); alias ``val``.
        sum: sum of ``value * n`` over all updates (float).
        count: sum of ``n`` over all updates (``counter`` is the original toolkit's name).
        average: ``sum / count`` (float); 0 while ``count`` is 0; alias ``avg``.

    Example:
        >>> meter = AverageMeter()
        >>> meter.update(loss, n=x.size(0))
        >>> meter.average
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every update."""
        self._value: float | torch.Tensor = 0.0
        self._sum: float | torch.Tensor = 0.0
        self.count: int | float = 0

    def update(self, value: Any, n: int | float | None = None, times: int | float | None = None) -> None:
        """Add ``value`` with weight ``n`` (usually the batch size).

        Args:
            value: a number or a one-element tensor (detached; stays on its device).
            n: weight, >= 0 (Python / NumPy number, not a bool). ``n=0`` records ``value`` as the
                last value but leaves the mean unchanged. Default 1.
            times: the original toolkit's name for ``n``; give one of the two.

        Raises:
            TypeError: if ``value`` is not a number or tensor, ``n`` is not a number, or both ``n``
                and ``times`` are given.
            ValueError: if ``n`` is negative or not finite, or a tensor holds more than one element.
        """
        if n is not None and times is not None:
            raise TypeError(f"give the weight as n or as times, not both (got n={n!r}, times={times!r})")
        name = "n" if times is None else "times"
        n = 1 if n is None and times is None else (n if times is None else times)
        if isinstance(n, (int, np.integer)):  # ints stay ints, so count does too
            n = check_int(n, name, minimum=0)
        else:
            n = check_number(n, name, minimum=0)
        value = _check(value)
        self._value = value
        if not n:
            return
        if isinstance(value, torch.Tensor):
            if not isinstance(self._sum, torch.Tensor):  # the first tensor: accumulate on its device
                dtype = torch.float32 if value.device.type == "mps" else torch.float64
                self._sum = torch.tensor(self._sum, dtype=dtype, device=value.device)
            self._sum.add_(value, alpha=n)  # one in-place kernel, no host synchronisation
        elif isinstance(self._sum, torch.Tensor):
            self._sum.add_(value * n)
        else:
            self._sum += value * n
        self.count += n

    @property
    def value(self) -> float:
        return _to_float(self._value)

    @property
    def sum(self) -> float:
        return _to_float(self._sum)

    @property
    def average(self) -> float:
        if not self.count:
            return 0.0
        return _to_float(self._sum) / self.count

    @property
    def counter(self) -> int | float:
        """Alias of ``count`` (the original toolkit's name)."""
        return self.count

    @property
    def avg(self) -> float:
        """Alias of ``average`` (the name of pytorch/examples and timm)."""
        return self.average

    @property
    def val(self) -> float:
        """Alias of ``value`` (the name of pytorch/examples and timm)."""
        return self.value

    def all_reduce(self) -> AverageMeter:
        """Sum ``sum`` and ``count`` over all ranks, in place (one collective; call it on every rank).

        Afterwards ``average`` is the mean over every rank's updates, as after pytorch/examples'
        ``all_reduce()``; ``value`` stays this rank's last value. Without a process group nothing
        changes. Calling it twice counts every rank's updates twice: to keep this rank's sums, reduce
        a copy (``copy.deepcopy(meter).all_reduce()``). On NCCL the sums travel on the current CUDA
        device, on gloo on the CPU.

        Returns:
            This meter, so that ``meter.all_reduce().average`` reads the global mean.

        Example:
            >>> top1.all_reduce()
            >>> print(f"Acc@1 {top1.avg:.3f}")  # the same on every rank
        """
        device = distributed.collective_device()
        totals = distributed.sreduce(torch.tensor([self.sum, float(self.count)], dtype=torch.float64, device=device))
        total_sum, total_count = totals[0], totals[1].item()
        if isinstance(self._sum, torch.Tensor):
            self._sum = total_sum.to(self._sum)  # stays on its device, in its dtype
        else:
            self._sum = total_sum.item()
        is_int = isinstance(self.count, int) and total_count.is_integer()
        self.count = int(total_count) if is_int else total_count
        return self

    def state_dict(self) -> dict[str, Any]:
        """The running sums, as stored (tensors stay tensors, so a restored meter continues bit-exactly)."""
        clone = lambda x: x.clone() if isinstance(x, torch.Tensor) else x  # noqa: E731
        return {"value": clone(self._value), "sum": clone(self._sum), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            KeyError: if ``state`` lacks ``"sum"`` or ``"count"``.
        """
        missing = [key for key in ("sum", "count") if key not in state]
        if missing:
            raise KeyError(f"AverageMeter state is missing {missing}")
        clone = lambda x: x.clone() if isinstance(x, torch.Tensor) else x  # noqa: E731
        self._value = clone(state.get("value", 0.0))
        self._sum = clone(state["sum"])
        self.count = state["count"]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(average={self.average:.6g}, count={self.count})"


AverageMetter = AverageMeter
