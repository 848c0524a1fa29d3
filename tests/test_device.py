import dataclasses
from collections import OrderedDict, defaultdict, namedtuple

import numpy as np
import torch
from torch.nn.utils.rnn import pack_sequence

from batteries import t2d

Pair = namedtuple("Pair", ["x", "y"])


@dataclasses.dataclass
class Batch:
    images: torch.Tensor
    names: list
    size: int = 0


@dataclasses.dataclass(frozen=True)
class Frozen:
    x: torch.Tensor


def test_tensor_moves_and_dtype_kept():
    x = torch.arange(3)
    out = t2d(x, torch.device("meta"))
    assert out.device.type == "meta" and out.dtype == x.dtype


def test_nested_containers_keep_their_types():
    data = {
        "pair": Pair(torch.zeros(2), torch.ones(2)),
        "tuple": (torch.zeros(1), "s"),
        "list": [torch.zeros(1), 3, None],
        "ordered": OrderedDict(a=torch.zeros(1)),
        "batch": Batch(torch.zeros(2), ["a"], 2),
        "frozen": Frozen(torch.zeros(1)),
    }
    out = t2d(data, "meta")
    assert isinstance(out["pair"], Pair) and out["pair"].x.is_meta and out["pair"].y.is_meta
    assert isinstance(out["tuple"], tuple) and out["tuple"][0].is_meta and out["tuple"][1] == "s"
    assert isinstance(out["list"], list) and out["list"][1:] == [3, None]
    assert isinstance(out["ordered"], OrderedDict) and out["ordered"]["a"].is_meta
    assert isinstance(out["batch"], Batch) and out["batch"].images.is_meta
    assert out["batch"].names == ["a"] and out["batch"].size == 2
    assert isinstance(out["frozen"], Frozen) and out["frozen"].x.is_meta
    # the input is not modified
    assert not data["batch"].images.is_meta and not data["pair"].x.is_meta


def test_unknown_leaves_returned_unchanged_never_none():
    array = np.zeros(3)
    obj = object()
    for leaf in ("text", 3, 2.5, None, array, obj, b"raw"):
        assert t2d(leaf, "cpu") is leaf
    assert t2d({"a": obj}, "cpu")["a"] is obj


def test_defaultdict_keeps_factory():
    data = defaultdict(list, x=torch.zeros(1))
    out = t2d(data, "meta")
    assert isinstance(out, defaultdict) and out.default_factory is list and out["x"].is_meta


def test_packed_sequence():
    packed = pack_sequence([torch.ones(3), torch.ones(2)])
    out = t2d({"seq": packed}, "cpu")
    assert torch.equal(out["seq"].data, packed.data)
