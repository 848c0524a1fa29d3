"""save_checkpoint / make_checkpoint / load_checkpoint under hostile use: names, values, misfits, full disks, ranks."""

import argparse
import collections
import enum
import errno
import json
import pickle
import resource
import signal
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from spawn import run_in_child, run_workers
from torch import nn

from batteries import (
    CheckpointManager,
    load_checkpoint,
    make_checkpoint,
    make_training_state,
    restore_training_state,
    save_checkpoint,
    wait_for_saves,
)


def make_model(seed=0, width=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, width), nn.BatchNorm1d(width))


def stepped(model, optimizer):
    model(torch.randn(6, 4)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    return optimizer


def tensors_of(state):
    """Every tensor of a (nested) state dict as a clone, with its key path."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {key: tensors_of(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return [tensors_of(value) for value in state]
    return state


def assert_same(a, b):
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict)), (a, b)
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
        assert a == b


# ---------------------------------------------------------------- names (items 6, 20)
@pytest.mark.parametrize("name", [".", "..", "x\0.pth"])
def test_save_checkpoint_refuses_names_that_are_not_plain_file_names(tmp_path, name):
    folder = tmp_path / "run"
    folder.mkdir()
    with pytest.raises(ValueError, match="name"):
        save_checkpoint({"a": 1}, folder, name)
    assert list(tmp_path.rglob("*")) == [folder]  # nothing written, in the folder or above it


def test_save_checkpoint_appends_pth_as_the_original_did(tmp_path):
    path = save_checkpoint(make_checkpoint("s", 1, make_model()), tmp_path, "exp_1", is_best=True)
    assert path == tmp_path / "exp_1.pth"
    assert save_checkpoint({"a": 2}, tmp_path, "exp_2.pth") == tmp_path / "exp_2.pth"  # kept as given
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth", "exp_1.pth", "exp_2.pth"]
    assert load_checkpoint(tmp_path / "best.pth", verbose=False)["epoch"] == 1


def test_make_checkpoint_leaves_out_components_not_given():
    checkpoint = make_checkpoint("s", 1, make_model())
    assert set(checkpoint) == {"stage", "epoch", "model_state_dict"}
    assert "scheduler_state_dict" not in checkpoint and "metrics" not in checkpoint


def test_load_checkpoint_asked_for_absent_states_loads_nothing(tmp_path):
    save_checkpoint(make_checkpoint("s", 1, make_model(1)), tmp_path, "c.pth")
    target = make_model(2)
    optimizer = torch.optim.SGD(target.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    before = tensors_of(target.state_dict())
    with pytest.raises(KeyError, match="optimizer_state_dict, scheduler_state_dict"):
        load_checkpoint(tmp_path / "c.pth", target, optimizer, scheduler, verbose=False)
    assert_same(tensors_of(target.state_dict()), before)  # the model is not loaded either


# ---------------------------------------------------------------- values (item 10)
class Color(enum.IntEnum):
    RED = 1


class Tag(str):
    pass


Point = collections.namedtuple("Point", "x y")


def test_numpy_values_inside_state_dicts_load_with_weights_only(tmp_path):
    model = make_model()
    optimizer = stepped(model, torch.optim.Adam(model.parameters(), lr=np.float64(0.01), betas=(np.float64(0.9), 0.99)))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=np.float64(0.5))
    checkpoint = make_checkpoint("s", 1, model, optimizer, scheduler, custom_state_dict={"count": torch.tensor(3)})
    torch.save(checkpoint, tmp_path / "c.pth")
    loaded = torch.load(tmp_path / "c.pth", weights_only=True)
    group = loaded["optimizer_state_dict"]["param_groups"][0]
    assert type(group["lr"]) is float and group["lr"] == 0.01 and type(group["betas"][0]) is float
    assert type(loaded["scheduler_state_dict"]["gamma"]) is float
    # state dicts keep their tensors (0-d ones too) and the _metadata that load_state_dict reads
    assert torch.is_tensor(loaded["optimizer_state_dict"]["state"][0]["step"])
    assert torch.is_tensor(loaded["model_state_dict"]["1.num_batches_tracked"])
    assert torch.is_tensor(loaded["custom_state_dict"]["count"])
    assert loaded["model_state_dict"]._metadata == model.state_dict()._metadata
    fresh = make_model(1)
    fresh_optimizer = torch.optim.Adam(fresh.parameters())
    load_checkpoint(tmp_path / "c.pth", fresh, fresh_optimizer, verbose=False)
    assert fresh_optimizer.param_groups[0]["lr"] == 0.01


def test_everything_accepted_loads_back_with_weights_only(tmp_path):
    checkpoint = make_checkpoint(
        "s",
        np.int64(1),
        make_model(),
        metrics={"loss": np.float32(0.5), "ok": np.bool_(True), "counts": collections.Counter(a=2)},
        color=Color.RED,
        tag=Tag("x"),
        point=Point(np.float64(1.5), torch.tensor(2.0)),
        lookup=collections.defaultdict(list, {np.int64(3): [Path("a")]}),
        ordered=collections.OrderedDict(b=1),
        big_endian=np.arange(3, dtype=">i4"),
        scalar_array=np.array(2.5),
        args=argparse.Namespace(flags={1, 2}, name="n"),
    )
    torch.save(checkpoint, tmp_path / "c.pth")
    loaded = torch.load(tmp_path / "c.pth", weights_only=True)
    assert loaded["color"] == 1 and type(loaded["color"]) is int
    assert loaded["tag"] == "x" and type(loaded["tag"]) is str
    assert loaded["point"] == {"x": 1.5, "y": 2.0}
    assert loaded["lookup"] == {3: ["a"]} and loaded["metrics"]["counts"] == {"a": 2}
    assert loaded["big_endian"].tolist() == [0, 1, 2] and loaded["scalar_array"] == 2.5
    assert loaded["args"] == {"flags": [1, 2], "name": "n"}


@pytest.mark.parametrize(
    "kwargs, where",
    [
        ({"metrics": {"names": np.array(["a", "b"])}}, r"metrics\['names'\]"),
        ({"when": np.array(["2020-01-01"], dtype="datetime64[D]")}, "when"),
        ({"when": np.datetime64("2020-01-01")}, "when"),
        ({"ema_state_dict": {"fn": print}}, r"ema_state_dict\['fn'\]"),
    ],
    ids=["str-array", "datetime-array", "datetime-scalar", "function-in-state-dict"],
)
def test_values_with_no_safe_form_are_refused_when_made(kwargs, where):
    with pytest.raises(TypeError, match=where):
        make_checkpoint("s", 1, make_model(), **kwargs)


class Marked(torch.Tensor):
    pass


@pytest.mark.parametrize("key", ["extra", "ema_state_dict"])
def test_tensor_subclasses_are_refused_when_made(tmp_path, key):
    with pytest.raises(TypeError, match=rf"{key}\['w'\].*Marked"):
        make_checkpoint("s", 1, make_model(), **{key: {"w": torch.ones(2).as_subclass(Marked)}})
    checkpoint = make_checkpoint("s", 1, make_model(), **{key: {"w": nn.Parameter(torch.ones(2))}})
    torch.save(checkpoint, tmp_path / "c.pth")
    assert torch.equal(torch.load(tmp_path / "c.pth", weights_only=True)[key]["w"], torch.ones(2))


def test_unsafe_value_inside_optimizer_state_is_refused_when_made():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.param_groups[0]["names"] = np.array(["w", "b"])
    with pytest.raises(TypeError, match=r"optimizer_state_dict\['param_groups'\]\[0\]\['names'\]"):
        make_checkpoint("s", 1, model, optimizer)


# ---------------------------------------------------------------- all or nothing (item 11)
def test_load_checkpoint_sgd_state_into_adam_changes_nothing(tmp_path):
    source = make_model(1)
    optimizer = stepped(source, torch.optim.SGD(source.parameters(), lr=0.1, momentum=0.9))
    save_checkpoint(make_checkpoint("s", 1, source, optimizer), tmp_path, "c.pth")
    target = make_model(2)
    adam = stepped(target, torch.optim.Adam(target.parameters()))
    before = (tensors_of(target.state_dict()), tensors_of(adam.state_dict()))
    with pytest.raises(RuntimeError, match="optimizer.*Adam") as info:
        load_checkpoint(tmp_path / "c.pth", target, adam, verbose=False)
    assert "Nothing was restored" in str(info.value)
    assert_same((tensors_of(target.state_dict()), tensors_of(adam.state_dict())), before)


def test_load_checkpoint_scheduler_of_another_class_changes_nothing(tmp_path):
    source = make_model(1)
    optimizer = torch.optim.SGD(source.parameters(), lr=0.1)
    step_lr = torch.optim.lr_scheduler.StepLR(optimizer, 2)
    save_checkpoint(make_checkpoint("s", 1, source, optimizer, step_lr), tmp_path, "c.pth")
    target = make_model(2)
    target_optimizer = stepped(target, torch.optim.SGD(target.parameters(), lr=0.5, momentum=0.9))
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(target_optimizer, 5)
    before = [tensors_of(x.state_dict()) for x in (target, target_optimizer, cosine)]
    with pytest.raises(RuntimeError, match=r"scheduler.*CosineAnnealingLR.*T_max"):
        load_checkpoint(tmp_path / "c.pth", target, target_optimizer, cosine, verbose=False)
    assert_same([tensors_of(x.state_dict()) for x in (target, target_optimizer, cosine)], before)
    assert not hasattr(cosine, "step_size")  # no attribute of the StepLR state left behind


@pytest.mark.parametrize("optimizer_class", [torch.optim.Adam, torch.optim.SGD])
@pytest.mark.parametrize("through", ["load_checkpoint", "restore_training_state"])
def test_optimizer_state_of_other_shapes_changes_nothing(tmp_path, optimizer_class, through):
    source = nn.Linear(3, 1)
    optimizer = (
        optimizer_class(source.parameters(), lr=0.1, momentum=0.9) if optimizer_class is torch.optim.SGD else None
    )
    optimizer = optimizer or optimizer_class(source.parameters(), lr=0.1)
    source(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    target = nn.Linear(2, 1)  # as many parameters, other shapes
    target_optimizer = optimizer_class(target.parameters(), lr=0.5)
    before = tensors_of(target_optimizer.state_dict())
    with pytest.raises(RuntimeError, match=r"optimizer.*\(1, 3\).*\(1, 2\).*Nothing was restored"):
        if through == "load_checkpoint":
            save_checkpoint(make_checkpoint("s", 1, source, optimizer), tmp_path, "c.pth")
            load_checkpoint(tmp_path / "c.pth", optimizer=target_optimizer, verbose=False)
        else:
            state = make_training_state(source, epoch=1, optimizer=optimizer)
            restore_training_state(state, optimizer=target_optimizer, restore_rng=False)
    assert_same(tensors_of(target_optimizer.state_dict()), before)


@pytest.mark.parametrize("optimizer_class", [torch.optim.Adafactor, torch.optim.LBFGS])
def test_optimizer_states_not_shaped_as_their_parameters_still_load(optimizer_class):
    model = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 3))  # Adafactor: (3, 1) and (1, 4); LBFGS: one flat (23,)

    def closure():
        loss = model(torch.randn(6, 4)).square().mean()
        loss.backward()
        return loss

    optimizer = optimizer_class(model.parameters())
    optimizer.step(closure)
    target = optimizer_class(nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 3)).parameters())
    state = make_training_state(model, epoch=1, optimizer=optimizer)
    restore_training_state(state, optimizer=target, restore_rng=False)
    torch.testing.assert_close(target.state_dict(), optimizer.state_dict(), rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------- errors that say what is wrong (item 12)
@pytest.mark.parametrize("map_location", ["nonsense", 12])
def test_bad_map_location_is_not_reported_as_a_corrupt_file(tmp_path, map_location):
    path = save_checkpoint(make_checkpoint("s", 1, make_model()), tmp_path, "c.pth")
    with pytest.raises(ValueError, match="map_location") as info:
        load_checkpoint(path, map_location=map_location, verbose=False)
    assert "corrupt" not in str(info.value)


def test_a_directory_is_not_reported_as_a_missing_file(tmp_path):
    (tmp_path / "sharded.pth").mkdir()
    with pytest.raises(IsADirectoryError, match="sharded.pth.*directory"):
        load_checkpoint(tmp_path / "sharded.pth", verbose=False)


@pytest.mark.parametrize(
    "content, what",
    [
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a21\nsize 44061204\n", "git-lfs pointer"),
        (b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body></body></html>\n", "HTML page"),
    ],
    ids=["git-lfs", "html"],
)
def test_a_file_that_is_no_checkpoint_is_reported_as_such(tmp_path, content, what):
    (tmp_path / "model.pth").write_bytes(content)
    with pytest.raises(RuntimeError, match=what) as info:
        load_checkpoint(tmp_path / "model.pth", verbose=False)
    assert "model.pth" in str(info.value) and "weights_only=False" not in str(info.value)


@pytest.mark.parametrize(
    "name, write",
    [
        ("model.pkl", lambda path: path.write_bytes(pickle.dumps({"a": np.zeros(2)}))),
        ("model.npy", lambda path: np.save(path, np.zeros(3))),
        ("metrics.json", lambda path: path.write_text(json.dumps({"values": [1]}))),
    ],
    ids=["pickle", "npy", "json"],
)
def test_a_file_not_written_by_torch_save_is_named_so_with_no_advice(tmp_path, name, write):
    path = tmp_path / name
    write(path)
    with pytest.raises(RuntimeError, match="not a checkpoint written by torch.save") as info:
        load_checkpoint(path, verbose=False)
    assert "weights_only=False" not in str(info.value) and "`weights_only` set to `False`" not in str(info.value)


def test_only_a_refused_class_gets_the_weights_only_advice(tmp_path):
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), tmp_path / "script.pt")  # a zip torch refuses for another reason
    with pytest.raises(RuntimeError, match="TorchScript") as info:
        load_checkpoint(tmp_path / "script.pt", verbose=False)
    assert "weights_only=False" not in str(info.value) and "`weights_only` set to `False`" not in str(info.value)
    torch.save({"w": torch.ones(2).as_subclass(Marked)}, tmp_path / "marked.pth")
    with pytest.raises(pickle.UnpicklingError, match="Marked") as info:
        load_checkpoint(tmp_path / "marked.pth", verbose=False)
    assert str(info.value).count("weights_only=False") == 1  # ours, and not torch's too
    assert "`weights_only` set to `False`" not in str(info.value)
    assert load_checkpoint(tmp_path / "marked.pth", weights_only=False, verbose=False)["w"].sum() == 2


def test_a_zip_whose_pickle_is_malformed_is_corrupt_with_no_advice(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "good.pth")
    good = zipfile.ZipFile(tmp_path / "good.pth")
    with zipfile.ZipFile(tmp_path / "bad.pth", "w") as bad:
        for info in good.infolist():
            malformed = info.filename.endswith("/data.pkl")
            bad.writestr(info, b"\x80\x02}q\x00(X\x01\x00\x00\x00w\xff\xff" if malformed else good.read(info))
    with pytest.raises(RuntimeError, match="bad.pth.*corrupt") as info:
        load_checkpoint(tmp_path / "bad.pth", verbose=False)
    assert "weights_only=False" not in str(info.value) and "`weights_only` set to `False`" not in str(info.value)


def test_a_refused_legacy_format_file_gets_the_advice(tmp_path):
    torch.save({"w": torch.ones(2).as_subclass(Marked)}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(pickle.UnpicklingError, match="old.pth") as info:
        load_checkpoint(tmp_path / "old.pth", verbose=False)
    assert str(info.value).count("weights_only=False") == 1
    assert load_checkpoint(tmp_path / "old.pth", weights_only=False, verbose=False)["w"].sum() == 2


def test_torch_save_disk_full_is_an_oserror_naming_the_file(tmp_path):
    def disk_full(obj, path):
        with open(path, "wb") as file:
            file.write(b"PK half")
        raise RuntimeError(
            "[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file data/0: "
            "file write failed"
        )

    with pytest.raises(OSError) as info:
        save_checkpoint({"a": 1}, tmp_path, "exp_1.pth", save_fn=disk_full)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "exp_1.pth")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE semantics are Linux's")
@pytest.mark.parametrize("writer", ["save_checkpoint", "CheckpointManager"])
def test_file_size_limit_is_an_oserror_naming_the_file(tmp_path, writer):
    big = make_checkpoint("s", 1, make_model(), payload=torch.zeros(250_000))  # 1 MB, made before the fork

    def fill_the_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        if writer == "save_checkpoint":
            save_checkpoint(big, tmp_path, "exp_1.pth")
        else:
            CheckpointManager(tmp_path).process(score=1.0, epoch=1, checkpoint=big)
        return {"type": None}

    result = run_in_child(fill_the_disk)
    assert result["type"] == "OSError" and result["errno"] in (errno.EFBIG, errno.ENOSPC), result
    assert "exp_1.pth" in result["message"], result


# ---------------------------------------------------------------- only rank 0 writes (item 17)


def save_on_every_rank(rank, world_size, folder):
    import torch.distributed as dist

    folder = Path(folder)
    checkpoint = make_checkpoint("s", 1, make_model(rank), rank=rank)
    if rank == 1:
        dist.barrier()  # rank 0 has written: a write of rank 1 would replace its file
    returned = [
        save_checkpoint(checkpoint, folder, "exp_1.pth", is_best=True, is_last=True),
        save_checkpoint(checkpoint, folder, "async", blocking=False),
        save_checkpoint(checkpoint, folder / f"only_rank_{rank}", "exp_1.pth"),
    ]
    wait_for_saves()
    if rank == 0:
        dist.barrier()
    dist.barrier()
    return [str(path) for path in returned]


def test_save_checkpoint_writes_on_global_rank_0_only(tmp_path):
    results = run_workers(save_on_every_rank, 2, str(tmp_path), timeout_s=60)
    assert results[1] == [
        str(tmp_path / "exp_1.pth"),
        str(tmp_path / "async.pth"),
        str(tmp_path / "only_rank_1" / "exp_1.pth"),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "async.pth",
        "best.pth",
        "exp_1.pth",
        "last.pth",
        "only_rank_0",
    ]
    for name in ("exp_1.pth", "best.pth", "last.pth", "async.pth"):
        assert load_checkpoint(tmp_path / name, verbose=False)["rank"] == 0
