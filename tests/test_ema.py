import pytest
import torch
from torch import nn

from batteries import EMA


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_update_is_exponential_average_and_integer_buffers_copied():
    model = make_model()
    ema = EMA(model, decay=0.9)
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    model.train()(torch.randn(8, 3))  # bumps num_batches_tracked and running stats
    ema.update(model)
    current = model.state_dict()
    for key, value in ema.module.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.9 * start[key] + 0.1 * current[key])
        else:
            assert torch.equal(value, current[key])


def test_set_copies_weights_and_module_is_frozen_copy():
    model = make_model()
    ema = EMA(nn.DataParallel(model), decay=0.5)
    with torch.no_grad():
        model[0].weight.mul_(3)
    ema.set(model)
    assert torch.equal(ema.module[0].weight, model[0].weight)
    assert ema.module[0].weight.data_ptr() != model[0].weight.data_ptr()
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_state_dict_round_trip():
    ema = EMA(make_model(), decay=0.5)
    other = EMA(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    other.load_state_dict(ema.state_dict())
    for a, b in zip(ema.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("decay", [-0.1, 1.5, "0.9"])
def test_bad_decay(decay):
    with pytest.raises(ValueError, match="decay"):
        EMA(make_model(), decay=decay)
