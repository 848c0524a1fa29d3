import math

import numpy as np
import pytest
import torch

from batteries import EarlyStopIndicator


def test_patience_calls_tolerated_then_stop():
    stop = EarlyStopIndicator(patience=2, metric_minimization=True)
    assert [stop(v) for v in (1.0, 0.9, 0.95, 0.91, 0.92)] == [False, False, False, False, True]


def test_maximisation_and_equal_is_not_improvement():
    stop = EarlyStopIndicator(patience=1, metric_minimization=False)
    assert [stop(v) for v in (0.5, 0.5, 0.5)] == [False, False, True]


def test_patience_zero_stops_on_first_non_improvement():
    stop = EarlyStopIndicator(patience=0)
    assert [stop(v) for v in (1.0, 1.0)] == [False, True]


def test_minimum_change():
    stop = EarlyStopIndicator(patience=0, minimum_change=0.1)
    assert stop(1.0) is False
    assert stop(0.95) is True  # better, but not by more than 0.1


def test_nan_is_never_improvement():
    stop = EarlyStopIndicator(patience=1)
    assert [stop(v) for v in (math.nan, math.nan)] == [False, True]
    stop = EarlyStopIndicator(patience=1)
    assert [stop(v) for v in (1.0, math.nan, 0.5, math.nan, math.nan)] == [False, False, False, False, True]


def test_state_dict_round_trip():
    stop = EarlyStopIndicator(patience=2)
    for value in (1.0, 2.0, 3.0):
        stop(value)
    other = EarlyStopIndicator(patience=2)
    other.load_state_dict(stop.state_dict())
    assert other(4.0) is True and stop(4.0) is True


@pytest.mark.parametrize("kwargs", [{"patience": -1}, {"minimum_change": -0.1}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        EarlyStopIndicator(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"metric_minimization": "False"},  # bool("False") is True: the direction would silently flip
        {"metric_minimization": None},
        {"metric_minimization": 0},
        {"patience": True},
        {"patience": 1.5},
        {"patience": "3"},
        {"minimum_change": "0.1"},
    ],
    ids=lambda kwargs: "{}={!r}".format(*next(iter(kwargs.items()))),
)
def test_look_alike_values_are_refused_not_coerced(kwargs):
    with pytest.raises(TypeError, match=next(iter(kwargs))):
        EarlyStopIndicator(**kwargs)


def test_numpy_numbers_accepted():
    stop = EarlyStopIndicator(patience=np.int64(1), metric_minimization=np.bool_(False), minimum_change=np.float32(0))
    assert stop.patience == 1 and type(stop.patience) is int and stop.metric_minimization is False
    assert [stop(v) for v in (np.float32(0.5), torch.tensor(0.4), np.float64(0.3))] == [False, False, True]


def test_bad_state_is_refused_and_changes_nothing():
    stop = EarlyStopIndicator(patience=2)
    stop(1.0)
    state = dict(stop.state_dict(), metric_minimization="False", num_bad_calls=5)
    with pytest.raises(TypeError, match="metric_minimization"):
        stop.load_state_dict(state)
    assert stop.state_dict() == EarlyStopIndicator(patience=2).state_dict() | {"best": 1.0}


def test_non_number_metric():
    with pytest.raises(TypeError, match="metric must be a number"):
        EarlyStopIndicator()("0.5")
