import dataclasses
from collections import Counter, OrderedDict, UserDict, defaultdict, namedtuple
from collections.abc import Mapping

import numpy as np
import pytest
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


# ---------------------------------------------------------------- types and attributes are kept
class Tagged(dict):
    """A dict subclass with attributes on the instance."""


class TaggedList(list):
    pass


class AttrDict(dict):
    """The common recipe: missing attributes raise KeyError, not AttributeError."""

    __getattr__ = dict.__getitem__


class TaggedDefaultDict(defaultdict):
    pass


def test_mapping_subclasses_keep_type_items_and_attributes():
    counter = Counter({"cat": 3, "dog": 1})
    counter.source = "labels.txt"
    tagged = Tagged(x=torch.zeros(2))
    tagged.split = "train"
    state = torch.nn.Linear(2, 2).state_dict()  # an OrderedDict with _metadata, which load_state_dict reads
    factory = TaggedDefaultDict(list, x=torch.zeros(1))
    factory.note = "kept"
    config = AttrDict(lr=torch.tensor(0.1))
    out = t2d({"counter": counter, "tagged": tagged, "state": state, "factory": factory, "config": config}, "meta")
    assert type(out["config"]) is AttrDict and out["config"].lr.is_meta
    assert type(out["counter"]) is Counter and out["counter"] == counter and out["counter"].source == "labels.txt"
    assert type(out["tagged"]) is Tagged and out["tagged"].split == "train" and out["tagged"]["x"].is_meta
    assert type(out["state"]) is OrderedDict and out["state"]._metadata == state._metadata
    assert list(out["state"]) == list(state) and out["state"]["weight"].is_meta
    assert type(out["factory"]) is TaggedDefaultDict and out["factory"].default_factory is list
    assert out["factory"].note == "kept" and out["factory"]["x"].is_meta
    # the inputs are left alone
    assert not tagged["x"].is_meta and not state["weight"].is_meta and counter == Counter({"cat": 3, "dog": 1})


def test_list_subclass_keeps_attributes():
    items = TaggedList([torch.zeros(1), "id"])
    items.origin = "shard-3"
    out = t2d(items, "meta")
    assert type(out) is TaggedList and out.origin == "shard-3" and out[0].is_meta and out[1] == "id"


class FakeBatchEncoding(UserDict):
    """Like a tokenizer's ``BatchEncoding``: a UserDict with state of its own and a ``.to`` that moves it."""

    def __init__(self, data, encodings=None):
        super().__init__(data)
        self.encodings = encodings
        self.calls = []

    def to(self, device, *, non_blocking=False):
        self.calls.append((str(device), non_blocking))
        self.data = {key: value.to(device, non_blocking=non_blocking) for key, value in self.data.items()}
        return self


class OldStyleTo(FakeBatchEncoding):
    def to(self, device):  # older tokenizers: no non_blocking
        self.calls.append((str(device),))
        self.data = {key: value.to(device) for key, value in self.data.items()}
        return self


def test_object_with_its_own_to_is_moved_by_it():
    encoding = FakeBatchEncoding({"input_ids": torch.zeros(2, 3, dtype=torch.long)}, encodings=["fast"])
    out = t2d({"text": encoding, "label": torch.ones(2)}, "meta", non_blocking=True)
    assert out["text"] is encoding and encoding.calls == [("meta", True)]
    assert out["text"]["input_ids"].is_meta and out["text"].encodings == ["fast"]
    old = OldStyleTo({"input_ids": torch.zeros(1)})
    assert t2d([old], "meta", non_blocking=True)[0] is old and old.calls == [("meta",)]
    assert old["input_ids"].is_meta


def test_mapping_that_cannot_be_rebuilt_is_an_error_not_a_dict():
    class Registry(Mapping):
        def __init__(self):
            self._items = {"w": torch.zeros(1)}

        def __getitem__(self, key):
            return self._items[key]

        def __iter__(self):
            return iter(self._items)

        def __len__(self):
            return len(self._items)

    with pytest.raises(TypeError, match="Registry"):
        t2d(Registry(), "meta")
