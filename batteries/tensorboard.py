"""TensorBoard logging on global rank 0 (tensorboardX, imported on first use)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from batteries import distributed

__all__ = ["TensorboardLogger"]


def _scalar(value: Any, tag: str) -> float:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"add_metric: value for {tag!r} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


class TensorboardLogger:
    """A tensorboardX ``SummaryWriter`` on global rank 0, a silent no-op on other ranks.

    Every ``SummaryWriter`` method (``add_scalar``, ``add_histogram``, ...) is available; on other
    ranks they do nothing and no file is created. tensorboardX is imported when the first writer
    is created, so importing ``batteries`` stays cheap.

    Args:
        logdir: folder of the TensorBoard run.
        **kwargs: passed to ``SummaryWriter`` (e.g. ``purge_step`` when resuming, ``flush_secs``).

    Example:
        >>> tb = TensorboardLogger("logs/run/tensorboard")
        >>> tb.add_metric("valid", {"loss": 0.1, "accuracy": 0.97}, global_step=3)
        >>> tb.close()
    """

    def __init__(self, logdir: str | os.PathLike, **kwargs: Any) -> None:
        self.logdir = Path(logdir)
        self.writer = None
        if distributed.is_main_process():
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(logdir=str(self.logdir), **kwargs)

    def add_metric(self, tag: str, value: Any, global_step: int | None = None) -> None:
        """Write a scalar, or one scalar per key of a dict as ``{tag}/{key}`` (all in this one run).

        Args:
            tag: scalar name, e.g. ``"train/loss"``, or a prefix for a dict.
            value: a number, a one-element tensor, or a dict of them.
            global_step: the x axis (epoch or step). Default None.

        Raises:
            TypeError: if a value is not a number.
        """
        items = {f"{tag}/{key}": item for key, item in value.items()} if isinstance(value, Mapping) else {tag: value}
        scalars = {name: _scalar(item, name) for name, item in items.items()}
        if self.writer is not None:
            for name, item in scalars.items():
                self.writer.add_scalar(name, item, global_step)

    def __getattr__(self, name: str) -> Any:
        writer = self.__dict__.get("writer")
        if writer is not None:
            return getattr(writer, name)
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> TensorboardLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
