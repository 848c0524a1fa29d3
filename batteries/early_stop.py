"""EarlyStopIndicator: stop when a metric stops improving."""

from __future__ import annotations

import math
from typing import Any

from batteries._checks import check_bool, check_int, check_number

__all__ = ["EarlyStopIndicator"]


class EarlyStopIndicator:
    """Tell when training should stop because a metric stopped improving.

    ``patience`` calls in a row without improvement are tolerated; the next one returns True (the
    original batteries meaning). An improvement beats the best so far by more than
    ``minimum_change``; an equal value is not one, NaN never is.

    Args:
        patience: non-improving calls tolerated (int >= 0, Python or NumPy). Default 5.
        metric_minimization: True if lower is better; a bool only. Default True.
        minimum_change: margin an improvement must exceed (>= 0). Default 0.0.

    Raises:
        TypeError: if ``patience`` is not an int (a bool or ``1.5`` included),
            ``metric_minimization`` is not a bool, or ``minimum_change`` is not a number.
        ValueError: on a negative ``patience`` or ``minimum_change``.

    Example:
        >>> stop = EarlyStopIndicator(patience=2, metric_minimization=False)
        >>> [stop(v) for v in (0.5, 0.6, 0.6, 0.59, 0.58)]
        [False, False, False, False, True]
    """

    def __init__(self, patience: int = 5, metric_minimization: bool = True, minimum_change: float = 0.0) -> None:
        self.patience = check_int(patience, "patience", minimum=0)
        self.metric_minimization = check_bool(metric_minimization, "metric_minimization")
        self.minimum_change = check_number(minimum_change, "minimum_change", minimum=0)
        self.best = math.inf if self.metric_minimization else -math.inf
        self.num_bad_calls = 0

    def is_improvement(self, metric: float) -> bool:
        """True if ``metric`` beats the best by more than ``minimum_change``.

        Args:
            metric: the value to compare (a float; NaN is never an improvement).

        Returns:
            Whether ``metric`` would count as an improvement; nothing is recorded.
        """
        if math.isnan(metric):
            return False
        if self.metric_minimization:
            return metric < self.best - self.minimum_change
        return metric > self.best + self.minimum_change

    def __call__(self, metric: Any) -> bool:
        """Record ``metric``; return True when training should stop.

        Args:
            metric: a Python / NumPy number or a one-element tensor (NaN allowed, never an improvement).

        Returns:
            True once ``patience`` calls in a row have not improved and this one does not either.

        Raises:
            TypeError: if ``metric`` is not a number.
        """
        if hasattr(metric, "item"):
            metric = metric.item()
        metric = check_number(metric, "metric", finite=False)
        if self.is_improvement(metric):
            self.best = metric
            self.num_bad_calls = 0
            return False
        self.num_bad_calls += 1
        return self.num_bad_calls > self.patience

    def state_dict(self) -> dict[str, Any]:
        """The settings and the progress so far (``best``, ``num_bad_calls``).

        Returns:
            A dict of plain Python values.
        """
        return {
            "patience": self.patience,
            "metric_minimization": self.metric_minimization,
            "minimum_change": self.minimum_change,
            "best": self.best,
            "num_bad_calls": self.num_bad_calls,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`; settings it lacks keep their current values.

        Args:
            state: a dict from :meth:`state_dict`.

        Raises:
            KeyError: if ``best`` or ``num_bad_calls`` is missing.
            TypeError: if a value has the wrong type (checked as in the constructor).
            ValueError: if a value is out of range.
        """
        for key in ("best", "num_bad_calls"):
            if key not in state:
                raise KeyError(f"EarlyStopIndicator state is missing {key!r}")
        checked = (  # all checked before any is set: a bad state leaves this indicator as it was
            check_int(state.get("patience", self.patience), "patience", minimum=0),
            check_bool(state.get("metric_minimization", self.metric_minimization), "metric_minimization"),
            check_number(state.get("minimum_change", self.minimum_change), "minimum_change", minimum=0),
            check_number(state["best"], "best", finite=False),
            check_int(state["num_bad_calls"], "num_bad_calls", minimum=0),
        )
        self.patience, self.metric_minimization, self.minimum_change, self.best, self.num_bad_calls = checked
