import numpy as np
import pytest
import torch

from batteries import AverageMeter, AverageMetter, distributed


def test_weighted_average():
    meter = AverageMeter()
    meter.update(1.0, n=2)
    meter.update(4.0, n=1)
    assert meter.average == pytest.approx(2.0)
    assert meter.sum == pytest.approx(6.0) and meter.count == 3 and meter.value == 4.0


def test_zero_before_the_first_update_as_the_original_timm_and_pytorch_examples():
    for meter in (AverageMeter(), AverageMetter()):
        assert (meter.value, meter.average, meter.sum, meter.count, meter.counter) == (0, 0, 0, 0, 0)
        assert f"{meter.average:.4f}" == "0.0000"  # a progress bar's postfix before the first batch
    meter = AverageMeter()
    meter.update(2.0)
    meter.reset()
    assert (meter.value, meter.average, meter.sum, meter.count) == (0, 0, 0, 0)
    meter.load_state_dict({"sum": 0.0, "count": 0})  # a state without "value"
    assert meter.value == 0


def test_n_zero():
    meter = AverageMeter()
    meter.update(5.0, n=0)
    assert meter.count == 0 and meter.average == 0 and meter.value == 5.0
    meter.update(3.0, n=2)
    assert meter.average == 3.0


def test_times_is_the_original_name_of_n():
    meter = AverageMetter()
    meter.update(1.0, times=3)
    meter.update(5.0, n=1)
    meter.update(2.0)
    assert meter.counter == 5 and meter.average == pytest.approx(10.0 / 5)
    with pytest.raises(TypeError, match="not both"):
        meter.update(1.0, n=2, times=2)
    with pytest.raises(ValueError, match="times"):
        meter.update(1.0, times=-1)
    assert meter.count == 5


def test_numpy_integer_weights_count_as_ints_and_bools_are_refused():
    meter = AverageMeter()
    meter.update(1.0, np.int64(3))
    meter.update(1.0, n=np.uint8(2))
    assert meter.count == 5 and type(meter.count) is int
    for weight in (True, np.bool_(True), "2"):
        with pytest.raises(TypeError, match="n must be"):
            meter.update(1.0, weight)
    assert meter.count == 5


def test_all_reduce_asks_distributed_for_the_device(monkeypatch):
    # meter.py has no rank logic of its own: the device collectives use comes from distributed.py
    asked = []

    def collective_device():
        asked.append(True)
        return torch.device("cpu")

    monkeypatch.setattr(distributed, "collective_device", collective_device)
    meter = AverageMeter()
    meter.update(2.0, 3)
    assert meter.all_reduce().average == 2.0 and asked == [True]


def test_tensor_and_numpy_values_match_floats():
    rng = np.random.default_rng(0)
    values = rng.random(20)
    sizes = rng.integers(1, 9, size=20)
    floats, tensors, numpys = AverageMeter(), AverageMeter(), AverageMeter()
    for value, n in zip(values, sizes):
        floats.update(float(value), int(n))
        tensors.update(torch.tensor(value, dtype=torch.float32), int(n))
        numpys.update(np.float32(value), int(n))
    expected = float(np.sum(values * sizes) / np.sum(sizes))
    assert floats.average == pytest.approx(expected)
    assert tensors.average == pytest.approx(expected, rel=1e-6)
    assert numpys.average == pytest.approx(expected, rel=1e-6)


def test_tensor_update_stays_on_device_without_sync():
    meter = AverageMeter()
    meter.update(torch.tensor(2.0, device="meta"))  # .item() on a meta tensor would raise
    assert isinstance(meter._sum, torch.Tensor) and meter._sum.is_meta


def test_reset():
    meter = AverageMeter()
    meter.update(3.0)
    meter.reset()
    assert meter.count == 0 and meter.sum == 0.0


@pytest.mark.parametrize(
    ("value", "n", "error", "match"),
    [
        (1.0, -1, ValueError, "n must be"),
        (1.0, float("inf"), ValueError, "n must be"),
        ("1", 1, TypeError, "value must be"),
        (torch.zeros(2), 1, ValueError, "one element"),
    ],
)
def test_bad_input(value, n, error, match):
    with pytest.raises(error, match=match):
        AverageMeter().update(value, n)


def test_seed_spelling_alias():
    meter = AverageMetter()
    meter.update(2.0, 4)
    assert meter.counter == 4 and meter.average == 2.0


def test_all_reduce_single_process_returns_the_meter_unchanged():
    meter = AverageMeter()
    meter.update(torch.tensor(3.0), 2)
    reduced = meter.all_reduce()
    assert reduced is meter and reduced.average == 3.0 and reduced.count == 2 and type(reduced.count) is int
    assert isinstance(meter._sum, torch.Tensor) and meter._sum.dtype == torch.float64  # stays a tensor


def test_avg_and_val_are_the_names_of_pytorch_examples_and_timm():
    meter = AverageMeter()
    assert (meter.avg, meter.val) == (0, 0)
    meter.update(1.0, n=3)
    meter.update(torch.tensor(5.0), n=1)
    assert meter.avg == meter.average == 2.0 and meter.val == meter.value == 5.0


def test_average_metter_is_average_meter():
    assert AverageMetter is AverageMeter


def examples_style_meters(rank, world_size):
    """pytorch/examples' imagenet: ``top1.all_reduce()``, then ``top1.avg`` is read."""
    import copy

    top1, losses = AverageMeter(), AverageMeter()
    for step in range(rank + 1):  # rank r sees r + 1 batches
        top1.update(torch.tensor(float(rank * 10 + step)), n=2)
        losses.update(float(rank), n=3)
    local = copy.deepcopy(top1).all_reduce()  # a copy reduced: the meter itself keeps this rank's sums
    kept = (top1.count, top1.avg)
    returned = top1.all_reduce()
    losses.all_reduce()
    return {
        "kept": kept,
        "copy": (local.avg, local.count),
        "top1": (top1.avg, top1.count, type(top1.count).__name__, top1.val, returned is top1),
        "losses": (losses.avg, losses.count, losses.sum),
    }


def test_all_reduce_in_place_across_two_gloo_processes():
    from spawn import run_workers

    values = [rank * 10 + step for rank in range(2) for step in range(rank + 1)]
    for rank, result in enumerate(run_workers(examples_style_meters, 2)):
        average, count, count_type, last, returned_self = result["top1"]
        assert average == pytest.approx(sum(values) / len(values)) and count == 2 * len(values)
        assert count_type == "int" and last == rank * 10 + rank and returned_self
        assert result["losses"] == (pytest.approx(6 / 9), 9, pytest.approx(6.0))  # rank 0: 0 x 3, rank 1: 1 x 6
        assert result["copy"] == (pytest.approx(sum(values) / len(values)), 2 * len(values))
        own = [rank * 10 + step for step in range(rank + 1)]
        assert result["kept"] == (2 * len(own), pytest.approx(sum(own) / len(own)))


def test_state_dict_continues_bit_exactly(tmp_path):
    values = torch.rand(10, dtype=torch.float32)
    reference, first = AverageMeter(), AverageMeter()
    for value in values:
        reference.update(value, 3)
    for value in values[:4]:
        first.update(value, 3)
    torch.save(first.state_dict(), tmp_path / "meter.pth")
    resumed = AverageMeter()
    resumed.load_state_dict(torch.load(tmp_path / "meter.pth", weights_only=True))
    for value in values[4:]:
        resumed.update(value, 3)
    assert resumed.average == reference.average and resumed.count == reference.count
    with pytest.raises(KeyError, match="sum"):
        AverageMeter().load_state_dict({"count": 1})
