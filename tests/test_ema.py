import numpy as np
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


@pytest.mark.parametrize(
    ("decay", "error"), [(-0.1, ValueError), (1.5, ValueError), ("0.9", TypeError), (True, TypeError)]
)
def test_bad_decay(decay, error):
    with pytest.raises(error, match="decay"):
        EMA(make_model(), decay=decay)


def test_numpy_decay_accepted():
    assert EMA(make_model(), decay=np.float32(0.5)).decay == 0.5


class TiedLanguageModel(nn.Module):
    """The output layer reuses the embedding matrix (weight tying, as in GPT-2 / nanoGPT)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.norm(self.embed(ids)))


def test_tied_weights_move_once_per_update():
    torch.manual_seed(0)
    model = TiedLanguageModel()
    ema = EMA(model, decay=0.9)
    assert ema.module.head.weight is ema.module.embed.weight  # the copy keeps the tie
    old = {name: value.clone() for name, value in ema.module.state_dict().items()}
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param))
    ema.update(model)
    new = model.state_dict()
    for name, value in ema.module.state_dict().items():  # embed.weight and head.weight alike
        torch.testing.assert_close(value, 0.9 * old[name] + 0.1 * new[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", ["meta", torch.device("meta")] + (["cuda"] if torch.cuda.is_available() else []))
def test_device_keeps_the_average_there_and_leaves_the_model_where_it_is(device):
    model = make_model()
    ema = EMA(model, decay=0.5, device=device)
    expected = torch.device(device).type
    assert {value.device.type for value in ema.module.state_dict().values()} == {expected}
    assert {value.device.type for value in model.state_dict().values()} == {"cpu"}
    model.train()(torch.randn(8, 3))
    ema.update(model)  # the model's tensors are moved to the average's device for the update
    ema.set(model)
    assert {value.device.type for value in ema.module.state_dict().values()} == {expected}
    if expected != "meta":
        for key, value in model.state_dict().items():
            torch.testing.assert_close(ema.module.state_dict()[key].cpu(), value)


def test_device_none_keeps_the_model_device_and_values():
    model = make_model()
    ema = EMA(model, decay=0.5)
    assert ema.device is None and all(value.device.type == "cpu" for value in ema.module.state_dict().values())
    for key, value in model.state_dict().items():
        assert torch.equal(ema.module.state_dict()[key], value)
