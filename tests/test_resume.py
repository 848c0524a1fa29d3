"""make_training_state / restore_training_state: all or nothing, absent parts, every rank's RNG state."""

import random
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from batteries import (
    EMA,
    EarlyStopIndicator,
    get_rng_state,
    load_checkpoint,
    make_training_state,
    restore_training_state,
    save_checkpoint,
)


def make_model(seed=0, width=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, width), nn.BatchNorm1d(width))


def components(seed, optimizer_class=torch.optim.Adam, **optimizer_kwargs):
    model = make_model(seed)
    optimizer = optimizer_class(model.parameters(), lr=0.1, **optimizer_kwargs)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
    model(torch.randn(6, 4)).square().mean().backward()
    optimizer.step()
    scheduler.step()
    early_stop = EarlyStopIndicator(patience=3)
    early_stop(1.0 + seed)
    return {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "scaler": torch.amp.GradScaler("cpu", init_scale=2.0**seed),
        "ema": EMA(model, decay=0.5),
        "early_stop": early_stop,
    }


def frozen(parts):
    """A deep copy of every component's state, tensors cloned, and of the RNG streams."""

    def copy(value):
        if isinstance(value, torch.Tensor):
            return value.detach().clone()
        if isinstance(value, dict):
            return {key: copy(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [copy(item) for item in value]
        return value

    states = {name: copy(part.state_dict()) for name, part in parts.items()}
    states["attributes"] = sorted(vars(parts["scheduler"]))
    return states, copy(get_rng_state())


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b or (a != a and b != b), (a, b)


def other_rng_streams():
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)


# ---------------------------------------------------------------- all or nothing (item 11)
@pytest.mark.parametrize("misfit", ["sgd-into-adam", "scheduler-class", "ema-shapes"])
def test_a_state_that_does_not_fit_restores_nothing(tmp_path, misfit):
    if misfit == "sgd-into-adam":
        saved = components(1, torch.optim.SGD, momentum=0.9)  # a momentum buffer per parameter, no "step"
    else:
        saved = components(1)
    if misfit == "scheduler-class":
        saved["scheduler"] = torch.optim.lr_scheduler.CosineAnnealingLR(saved["optimizer"], 4)
    if misfit == "ema-shapes":
        saved["ema"] = EMA(make_model(1, width=5))
    save_checkpoint(make_training_state(saved.pop("model"), epoch=2, **saved), tmp_path, "state.pth")

    target = components(2, torch.optim.Adam)
    other_rng_streams()
    before = frozen(target)
    component = {
        "sgd-into-adam": "optimizer state .* Adam given: KeyError",
        "scheduler-class": r"scheduler state .* StepLR given: .*lacks \['gamma', 'step_size'\]",
        "ema-shapes": "ema state .* EMA given: .*size mismatch",
    }
    with pytest.raises(RuntimeError, match=f"(?s){component[misfit]}") as info:
        restore_training_state(tmp_path / "state.pth", **target)
    assert "Nothing was restored" in str(info.value)
    assert_same(frozen(target), before)  # every component, and the RNG streams, as they were


def test_absent_parts_are_left_out_and_a_restore_asking_for_them_loads_nothing(tmp_path):
    saved = components(1)
    state = make_training_state(saved["model"], epoch=1, optimizer=saved["optimizer"])
    assert not {
        "scheduler_state_dict",
        "scaler_state_dict",
        "ema_state_dict",
        "early_stop_state_dict",
        "metrics",
    } & set(state)
    save_checkpoint(state, tmp_path, "state")
    target = components(2)
    other_rng_streams()
    before = frozen(target)
    with pytest.raises(
        KeyError, match="scheduler_state_dict, scaler_state_dict, ema_state_dict, early_stop_state_dict"
    ):
        restore_training_state(tmp_path / "state.pth", **target)
    assert_same(frozen(target), before)
    restore_training_state(tmp_path / "state.pth", target["model"], optimizer=target["optimizer"])  # what it holds
    assert torch.equal(target["model"][0].weight, saved["model"][0].weight)


# ---------------------------------------------------------------- every rank's RNG state (item 18)
from spawn import run_workers  # noqa: E402


def draws():
    return [random.random(), float(np.random.rand()), torch.rand(()).item()]


def resume_on_every_rank(rank, world_size, folder):
    import torch.distributed as dist

    from batteries.distributed import all_gather

    folder = Path(folder)
    random.seed(rank)
    np.random.seed(rank)
    torch.manual_seed(rank)  # every rank has its own streams
    model = make_model()
    results = {}
    # the default: called on every rank like a collective, saved on every rank (rank 0 writes)
    state = make_training_state(model, epoch=1, rng_timeout=30)
    save_checkpoint(state, folder, "state.pth")
    expected = draws()  # each rank's streams go on from the saved point
    dist.barrier()  # the file is complete
    other_rng_streams()
    restore_training_state(folder / "state.pth", model)
    results["restored"] = draws() == expected
    results["saved_ranks"] = len(load_checkpoint(folder / "state.pth", verbose=False)["rng_states"])
    # the examples' pattern: gather explicitly, build and save on rank 0 only
    gathered = all_gather(get_rng_state())
    if rank == 0:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # as many RNG states as ranks: nothing to report
            save_checkpoint(make_training_state(model, epoch=2, rng_states=gathered), folder, "example.pth")
    dist.barrier()
    results["example_ranks"] = len(load_checkpoint(folder / "example.pth", verbose=False)["rng_states"])
    # misuse, on rank 0 only: no hang, a clear error; a short list: a warning with the fix, when made
    if rank == 0:
        started = time.monotonic()
        with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\].*call it on every rank"):
            make_training_state(model, epoch=3, rng_timeout=1.0)
        results["waited"] = time.monotonic() - started
        with pytest.warns(UserWarning, match=r"1 rank\(s\) but 2 run.*every rank"):
            make_training_state(model, epoch=3, rng_states=[get_rng_state()])
    return results


def test_every_ranks_rng_state_reaches_the_training_state_and_rank_0_alone_cannot_hang(tmp_path):
    results = run_workers(resume_on_every_rank, 2, str(tmp_path), timeout_s=60)
    assert [r["restored"] for r in results] == [True, True]
    assert [r["saved_ranks"] for r in results] == [2, 2] and [r["example_ranks"] for r in results] == [2, 2]
    assert results[0]["waited"] < 10
