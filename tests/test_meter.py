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


def test_all_reduce_single_process_is_a_copy():
    meter = AverageMeter()
    meter.update(torch.tensor(3.0), 2)
    reduced = meter.all_reduce()
    assert reduced is not meter and reduced.average == 3.0 and reduced.count == 2


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
