import argparse
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from batteries import average_checkpoints, load_checkpoint, make_checkpoint, save_checkpoint


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def test_make_checkpoint_keys_and_unwrapping():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    checkpoint = make_checkpoint("stage_0", 3, nn.DataParallel(model), optimizer, scheduler, metrics={"a": 1})
    assert set(checkpoint) == {
        "stage",
        "epoch",
        "model_state_dict",
        "optimizer_state_dict",
        "scheduler_state_dict",
        "metrics",
    }
    assert all(not key.startswith("module.") for key in checkpoint["model_state_dict"])
    assert checkpoint["epoch"] == 3 and checkpoint["metrics"] == {"a": 1}


def test_make_checkpoint_unwraps_compiled_model():
    model = make_model()
    compiled = torch.compile(model)
    assert set(make_checkpoint("s", 1, compiled)["model_state_dict"]) == set(model.state_dict())


def test_numpy_namespace_path_load_with_plain_weights_only(tmp_path):
    args = argparse.Namespace(lr=np.float32(0.5), logdir=Path("/tmp/x"), layers=[1, 2], nested=argparse.Namespace(k=1))
    checkpoint = make_checkpoint(
        "s",
        np.int64(2),
        make_model(),
        metrics={"loss": np.float64(0.25), "acc": torch.tensor(0.5), "hist": np.arange(3)},
        experiment_args=args,
        model_args={"path": Path("a/b")},
    )
    torch.save(checkpoint, tmp_path / "c.pth")
    loaded = torch.load(tmp_path / "c.pth", weights_only=True)
    assert loaded["epoch"] == 2 and type(loaded["epoch"]) is int
    assert loaded["metrics"]["loss"] == 0.25 and type(loaded["metrics"]["loss"]) is float
    assert loaded["metrics"]["acc"] == 0.5 and type(loaded["metrics"]["acc"]) is float
    assert torch.equal(loaded["metrics"]["hist"], torch.arange(3))
    assert loaded["experiment_args"] == {"lr": 0.5, "logdir": "/tmp/x", "layers": [1, 2], "nested": {"k": 1}}
    assert loaded["model_args"] == {"path": "a/b"}


def test_unsafe_value_names_its_key():
    with pytest.raises(TypeError, match=r"experiment_args\['fn'\]"):
        make_checkpoint("s", 1, make_model(), experiment_args={"fn": lambda: None})


def test_extra_key_clash():
    with pytest.raises(ValueError, match="clash"):
        make_checkpoint("s", 1, make_model(), model_state_dict={})


def test_save_writes_one_file_and_hard_links(tmp_path):
    checkpoint = make_checkpoint("s", 1, make_model())
    path = save_checkpoint(checkpoint, tmp_path, "exp_1.pth", is_best=True, is_last=True)
    assert path == tmp_path / "exp_1.pth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth", "exp_1.pth", "last.pth"]
    assert os.path.samefile(path, tmp_path / "best.pth") and os.path.samefile(path, tmp_path / "last.pth")
    assert os.stat(path).st_nlink == 3


def test_failed_save_keeps_previous_files(tmp_path):
    save_checkpoint(make_checkpoint("s", 1, make_model()), tmp_path, "exp.pth", is_best=True, is_last=True)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def failing_save(obj, path):
        with open(path, "wb") as file:
            file.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        save_checkpoint(make_checkpoint("s", 2, make_model(1)), tmp_path, "exp.pth", True, True, save_fn=failing_save)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # untouched, no temporary files


@pytest.mark.parametrize("name", ["", "a/b.pth"])
def test_bad_name(tmp_path, name):
    with pytest.raises(ValueError, match="name"):
        save_checkpoint({}, tmp_path, name)


def test_load_into_wrapped_or_bare_either_way(tmp_path):
    source = make_model(1)
    optimizer = torch.optim.Adam(source.parameters())
    source(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    save_checkpoint(make_checkpoint("s", 1, source, optimizer), tmp_path, "bare.pth")
    torch.save({"model_state_dict": nn.DataParallel(source).state_dict()}, tmp_path / "wrapped.pth")
    for file in ("bare.pth", "wrapped.pth"):
        for wrap in (lambda m: m, nn.DataParallel):
            target = make_model(2)
            load_checkpoint(tmp_path / file, wrap(target), verbose=False)
            for a, b in zip(source.state_dict().values(), target.state_dict().values()):
                assert torch.equal(a, b)
    target_optimizer = torch.optim.Adam(make_model(2).parameters())
    load_checkpoint(tmp_path / "bare.pth", optimizer=target_optimizer, verbose=False)
    assert target_optimizer.state_dict()["state"][0]["step"] == 1


def test_load_bare_state_dict(tmp_path):
    source = make_model(1)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    target = make_model(2)
    load_checkpoint(tmp_path / "weights.pth", target, verbose=False)
    assert torch.equal(target[0].weight, source[0].weight)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(tmp_path / "nope.pth")


def test_load_missing_optimizer_state(tmp_path):
    save_checkpoint(make_checkpoint("s", 1, make_model()), tmp_path, "c.pth")
    with pytest.raises(KeyError, match="optimizer_state_dict"):
        load_checkpoint(tmp_path / "c.pth", optimizer=torch.optim.SGD(make_model().parameters(), lr=1), verbose=False)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file_error_names_the_file(tmp_path, damage):
    path = save_checkpoint(make_checkpoint("s", 1, make_model()), tmp_path, "c.pth")
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": os.urandom(2000), "empty": b""}[damage])
    with pytest.raises(Exception, match="c.pth") as info:
        load_checkpoint(path, make_model(), verbose=False)
    assert isinstance(info.value, (RuntimeError, pickle.UnpicklingError))


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EVIL_MARKER']}",))


def test_malicious_pickle_refused_and_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    torch.save({"model_state_dict": {}, "payload": Evil()}, tmp_path / "evil.pth")
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError, match="weights_only=False"):
        load_checkpoint(tmp_path / "evil.pth", verbose=False)
    assert not marker.exists()


def test_average_checkpoints(tmp_path):
    models = [make_model(seed) for seed in range(3)]
    for index, model in enumerate(models):
        model[1].num_batches_tracked.fill_(index + 10)
        save_checkpoint(make_checkpoint("s", index, model), tmp_path, f"c{index}.pth")
    files = [tmp_path / f"c{index}.pth" for index in range(3)]
    averaged = average_checkpoints(*files)
    expected = (models[0][0].weight + models[1][0].weight + models[2][0].weight) / 3
    torch.testing.assert_close(averaged["0.weight"], expected)
    assert averaged["1.num_batches_tracked"].item() == 12
    assert average_checkpoints(files).keys() == averaged.keys()


def test_average_checkpoints_errors(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        average_checkpoints()
    save_checkpoint(make_checkpoint("s", 0, make_model()), tmp_path, "a.pth")
    save_checkpoint(make_checkpoint("s", 0, nn.Linear(4, 3)), tmp_path, "b.pth")
    with pytest.raises(ValueError, match="different keys"):
        average_checkpoints(tmp_path / "a.pth", tmp_path / "b.pth")
