"""EarlyStopIndicator: stop when a metric stops improving."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["EarlyStopIndicator"]


class EarlyStopIndicator:
    """Tell when training should stop because a metric stopped improving.

    ``patience`` calls in a row without improvement are tolerated; the next one returns True (the
    original batteries meaning). An improvement beats the best so far by more than
    ``minimum_change``; an equal value is not one, NaN never is.

    Args:
        patience: non-improving calls tolerated (int >= 0). Default 5.
        metric_minimization: True if lower is better. Default True.
        minimum_change: margin an improvement must exceed (>= 0). Default 0.0.

    Raises:
        ValueError: on a negative ``patience`` or ``minimum_change``.

    Example:
        >>> stop = EarlyStopIndicator(patience=2, metric_minimization=False)
        >>> [stop(v) for v in (0.5, 0.6, 0.6, 0.59, 0.58)]
        [False, False, False, False, True]
    """

    def __init__(self, patience: int = 5, metric_minimization: bool = True, minimum_change: float = 0.0) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"patience must be an int >= 0, got {patience!r}")
        if not isinstance(minimum_change, (int, float)) or not minimum_change >= 0:
            raise ValueError(f"minimum_change must be a number >= 0, got {minimum_change!r}")
        self.patience = patience
        self.metric_minimization = bool(metric_minimization)
        self.minimum_change = float(minimum_change)
        self.best = math.inf if self.metric_minimization else -math.inf
        self.num_bad_calls = 0

    def is_improvement(self, metric: float) -> bool:
        """True if ``metric`` beats the best by more than ``minimum_change``."""
        if math.isnan(metric):
            return False
        if self.metric_minimization:
            return metric < self.best - self.minimum_change
        return metric > self.best + self.minimum_change

    def __call__(self, metric: Any) -> bool:
        """Record ``metric``; return True when training should stop.

        Raises:
            TypeError: if ``metric`` is not a number.
        """
        if hasattr(metric, "item"):
            metric = metric.item()
        if isinstance(metric, bool) or not isinstance(metric, (int, float)):
            raise TypeError(f"metric must be a number, got {metric!r} ({type(metric).__name__})")
        metric = float(metric)
        if self.is_improvement(metric):
            self.best = metric
            self.num_bad_calls = 0
            return False
        self.num_bad_calls += 1
        return self.num_bad_calls > self.patience

    def state_dict(self) -> dict[str, Any]:
        return {
            "patience": self.patience,
            "metric_minimization": self.metric_minimization,
            "minimum_change": self.minimum_change,
            "best": self.best,
            "num_bad_calls": self.num_bad_calls,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("best", "num_bad_calls"):
            if key not in state:
                raise KeyError(f"EarlyStopIndicator state is missing {key!r}")
        self.patience = state.get("patience", self.patience)
        self.metric_minimization = state.get("metric_minimization", self.metric_minimization)
        self.minimum_change = state.get("minimum_change", self.minimum_change)
        self.best = float(state["best"])
        self.num_bad_calls = int(state["num_bad_calls"])
