import argparse
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from batteries import (
    average_checkpoints,
    average_model_state_dicts,
    load_checkpoint,
    make_checkpoint,
    save_checkpoint,
)


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


def test_average_model_state_dicts_returns_the_first_checkpoint_with_the_average_as_the_original(tmp_path):
    models = [make_model(seed) for seed in range(3)]
    optimizer = torch.optim.SGD(models[0].parameters(), lr=0.1)
    for index, model in enumerate(models):
        checkpoint = make_checkpoint("s", index, model, optimizer if index == 0 else None, metrics={"loss": index})
        save_checkpoint(checkpoint, tmp_path, f"c{index}.pth")
    files = [tmp_path / f"c{index}.pth" for index in range(3)]
    averaged = average_model_state_dicts(*files)
    first = torch.load(files[0], weights_only=True)
    assert averaged.keys() == first.keys() and averaged["epoch"] == 0 and averaged["metrics"] == {"loss": 0}
    assert averaged["optimizer_state_dict"]["param_groups"] == first["optimizer_state_dict"]["param_groups"]
    expected = average_checkpoints(*files)  # the averaged state dict itself
    assert "model_state_dict" not in expected and averaged["model_state_dict"].keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(averaged["model_state_dict"][key], value)
    torch.save(models[0].state_dict(), tmp_path / "bare.pth")  # a bare state dict: nothing else to keep
    bare = average_model_state_dicts([tmp_path / "bare.pth", files[1]])
    assert list(bare) == ["model_state_dict"] and bare["model_state_dict"].keys() == expected.keys()


class TiedDouble(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 3).double()
        self.head = nn.Linear(3, 5, bias=False).double()
        self.head.weight = self.embed.weight


def test_average_checkpoints_of_tied_float64_weights_adds_each_file_once(tmp_path):
    models = []
    for seed in range(2):
        torch.manual_seed(seed)
        models.append(TiedDouble())
        torch.save({"model_state_dict": models[-1].state_dict()}, tmp_path / f"c{seed}.pth")
    averaged = average_checkpoints(tmp_path / "c0.pth", tmp_path / "c1.pth")
    expected = (models[0].embed.weight + models[1].embed.weight) / 2
    torch.testing.assert_close(averaged["embed.weight"], expected)
    torch.testing.assert_close(averaged["head.weight"], expected)


def stepped_setup(seed):
    model = make_model(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


@pytest.mark.parametrize("layout", ["pytorch/examples", "nanoGPT"])
def test_load_checkpoint_reads_the_layouts_of_pytorch_examples_and_nanogpt(tmp_path, layout):
    model, optimizer, scheduler = stepped_setup(1)
    if layout == "pytorch/examples":  # imagenet/main.py's save_checkpoint, the model under DataParallel
        checkpoint = {"epoch": 3, "arch": "resnet18", "state_dict": nn.DataParallel(model).state_dict(),
                      "best_acc1": torch.tensor(71.5), "optimizer": optimizer.state_dict(),
                      "scheduler": scheduler.state_dict()}  # fmt: skip
    else:  # nanoGPT's train.py: the model's keys carry torch.compile's prefix
        state = {f"_orig_mod.{key}": value for key, value in model.state_dict().items()}
        checkpoint = {"model": state, "optimizer": optimizer.state_dict(), "model_args": {"n_layer": 2},
                      "iter_num": 7, "best_val_loss": 1.25, "config": {"lr": 0.1}}  # fmt: skip
    torch.save(checkpoint, tmp_path / "c.pth")
    target, target_optimizer, target_scheduler = stepped_setup(2)
    loaded = load_checkpoint(
        tmp_path / "c.pth", target, target_optimizer, target_scheduler if layout != "nanoGPT" else None, verbose=False
    )
    assert loaded.keys() == checkpoint.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    momentum = target_optimizer.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, optimizer.state_dict()["state"][0]["momentum_buffer"])
    if layout != "nanoGPT":
        assert target_scheduler.state_dict() == scheduler.state_dict()


def test_the_toolkit_key_comes_first_and_a_non_state_is_never_taken_for_one(tmp_path):
    first, second = make_model(1), make_model(2)
    torch.save({"model_state_dict": first.state_dict(), "state_dict": second.state_dict()}, tmp_path / "both.pth")
    target = make_model(3)
    load_checkpoint(tmp_path / "both.pth", target, verbose=False)
    assert torch.equal(target[0].weight, first[0].weight)
    torch.save({"state_dict": {"lr": 0.1}, "model": "resnet18", "optimizer": {"name": "sgd"}}, tmp_path / "no.pth")
    optimizer = torch.optim.SGD(target.parameters(), lr=1.0)
    with pytest.raises(KeyError, match="no state for: model_state_dict, optimizer_state_dict"):
        load_checkpoint(tmp_path / "no.pth", target, optimizer, verbose=False)
    assert torch.equal(target[0].weight, first[0].weight)  # nothing loaded


def test_a_missing_state_error_lists_the_keys_the_file_holds(tmp_path):
    torch.save({"epoch": 3, "arch": "resnet18", "net": make_model().state_dict()}, tmp_path / "c.pth")
    with pytest.raises(
        KeyError, match=r"has no state for: model_state_dict \(nothing was loaded\); it holds: epoch, arch, net"
    ):
        load_checkpoint(tmp_path / "c.pth", make_model(), verbose=False)
    many = {f"key{index}": index for index in range(25)}
    torch.save(many, tmp_path / "many.pth")
    with pytest.raises(KeyError, match=r"it holds: key0, key1, .*key19, \.\.\. \(5 more\)"):
        load_checkpoint(tmp_path / "many.pth", make_model(), verbose=False)


def test_load_checkpoint_not_strict_loads_what_fits_and_warns_what_it_skipped(tmp_path, caplog):
    source = make_model(1)
    state = source.state_dict()
    state["extra.weight"] = torch.ones(2)  # a key the model lacks
    del state["1.running_var"]  # a key the model has
    torch.save({"model_state_dict": state}, tmp_path / "c.pth")
    target = make_model(2)
    running_var = target[1].running_var.clone()
    with pytest.raises(RuntimeError, match="does not fit"):
        load_checkpoint(tmp_path / "c.pth", target, verbose=False)
    with caplog.at_level("WARNING", logger="batteries"):
        loaded = load_checkpoint(tmp_path / "c.pth", target, strict=False, verbose=False)
    assert "extra.weight" in loaded["model_state_dict"]
    assert torch.equal(target[0].weight, source[0].weight) and torch.equal(target[1].running_var, running_var)
    [record] = [r for r in caplog.records if "strict=False" in r.getMessage()]
    assert "['1.running_var']" in record.getMessage() and "['extra.weight']" in record.getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="batteries"):
        load_checkpoint(tmp_path / "c.pth", make_model(), strict=False, verbose=False)
        torch.save({"model_state_dict": source.state_dict()}, tmp_path / "full.pth")
        load_checkpoint(tmp_path / "full.pth", make_model(), strict=False, verbose=False)
    assert len([r for r in caplog.records if "strict=False" in r.getMessage()]) == 1  # nothing skipped: silent


# ---------------------------------------------------------------- full training state
from batteries import EMA, EarlyStopIndicator, make_training_state, restore_training_state, set_rng_state  # noqa: E402


def training_setup(seed):
    torch.manual_seed(seed)
    model = make_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ema = EMA(model, decay=0.5)
    early_stop = EarlyStopIndicator(patience=3)
    return model, optimizer, scheduler, scaler, ema, early_stop


def step(model, optimizer, scheduler, ema, early_stop):
    model.train()
    loss = model(torch.randn(6, 4)).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()
    ema.update(model)
    early_stop(loss.item())


def test_training_state_round_trip_is_bit_exact(tmp_path):
    import random as pyrandom

    model, optimizer, scheduler, scaler, ema, early_stop = training_setup(0)
    for _ in range(3):
        step(model, optimizer, scheduler, ema, early_stop)
    state = make_training_state(
        model,
        epoch=3,
        step=3,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        ema=ema,
        early_stop=early_stop,
        note=np.float32(1.5),
    )
    save_checkpoint(state, tmp_path, "state.pth")
    expected_draws = (pyrandom.random(), np.random.rand(), torch.rand(()).item())
    set_rng_state(state["rng_states"][0])  # undo the draws: the reference continues from the save
    for _ in range(2):  # the reference continues
        step(model, optimizer, scheduler, ema, early_stop)

    fresh = training_setup(1)
    loaded = restore_training_state(
        tmp_path / "state.pth",
        fresh[0],
        optimizer=fresh[1],
        scheduler=fresh[2],
        scaler=fresh[3],
        ema=fresh[4],
        early_stop=fresh[5],
    )
    assert loaded["epoch"] == 3 and loaded["step"] == 3 and loaded["note"] == 1.5
    assert (pyrandom.random(), np.random.rand(), torch.rand(()).item()) == expected_draws
    set_state = restore_training_state(
        tmp_path / "state.pth", fresh[0], optimizer=fresh[1], scheduler=fresh[2], ema=fresh[4], early_stop=fresh[5]
    )
    assert set_state["epoch"] == 3
    for _ in range(2):
        step(fresh[0], fresh[1], fresh[2], fresh[4], fresh[5])
    for a, b in zip(model.state_dict().values(), fresh[0].state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(ema.state_dict().values(), fresh[4].state_dict().values()):
        assert torch.equal(a, b)
    assert fresh[5].state_dict() == early_stop.state_dict()
    assert fresh[2].state_dict() == scheduler.state_dict()


def test_restore_names_every_missing_part(tmp_path):
    model, optimizer, scheduler, scaler, ema, early_stop = training_setup(0)
    state = make_training_state(model, epoch=1, optimizer=optimizer)
    with pytest.raises(KeyError, match="scheduler_state_dict, ema_state_dict, early_stop_state_dict"):
        restore_training_state(state, model, optimizer=optimizer, scheduler=scheduler, ema=ema, early_stop=early_stop)
    plain = make_checkpoint("s", 1, model)
    with pytest.raises(KeyError, match="rng_states"):
        restore_training_state(plain, model)
    with pytest.raises(KeyError, match=r"nothing was restored\); it holds: stage, epoch, model_state_dict'"):
        restore_training_state(plain, model, restore_rng=False, optimizer=optimizer)


def test_restore_with_other_world_size_warns(tmp_path):
    model = make_model()
    state = make_training_state(model, epoch=1, rng_states=[{}, {}])
    with pytest.warns(UserWarning, match="2 rank"):
        restore_training_state(state, model)


def test_training_state_bad_step():
    with pytest.raises(ValueError, match="step"):
        make_training_state(make_model(), epoch=1, step=-1)


# ---------------------------------------------------------------- asynchronous save
from batteries import wait_for_saves  # noqa: E402


def test_non_blocking_save_snapshots_tensors_in_the_caller(tmp_path):
    model = make_model()
    expected = model[0].weight.detach().clone()
    path = save_checkpoint(make_checkpoint("s", 1, model), tmp_path, "a.pth", is_last=True, blocking=False)
    with torch.no_grad():
        model[0].weight.add_(1.0)  # training goes on while the file is written
    wait_for_saves()
    assert torch.equal(load_checkpoint(path, verbose=False)["model_state_dict"]["0.weight"], expected)
    assert os.path.samefile(path, tmp_path / "last.pth")


def test_non_blocking_save_error_surfaces_at_next_call_or_wait(tmp_path):
    def broken(obj, path):
        raise OSError(28, "No space left on device")

    save_checkpoint({"a": 1}, tmp_path, "a.pth", save_fn=broken, blocking=False)  # returns
    with pytest.raises(OSError, match="No space"):
        save_checkpoint({"a": 2}, tmp_path, "b.pth", blocking=False)
    save_checkpoint({"a": 3}, tmp_path, "c.pth", save_fn=broken, blocking=False)
    with pytest.raises(OSError, match="No space"):
        wait_for_saves()
    wait_for_saves()  # reported once
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_non_blocking_saves_in_a_row_keep_their_own_content(tmp_path):
    weight = torch.zeros(1000)
    for index in range(4):  # the snapshot buffers are reused: each file must still hold its own values
        weight.fill_(float(index))
        save_checkpoint({"w": weight}, tmp_path, f"{index}.pth", blocking=False)
    wait_for_saves()
    for index in range(4):
        assert torch.equal(
            load_checkpoint(tmp_path / f"{index}.pth", verbose=False)["w"], torch.full((1000,), float(index))
        )


def test_non_blocking_save_keeps_tied_weights_tied(tmp_path):
    embedding = torch.nn.Embedding(500, 64)
    head = torch.nn.Linear(64, 500, bias=False)
    head.weight = embedding.weight  # tied, as in language models
    model = torch.nn.ModuleDict({"embedding": embedding, "head": head})
    save_checkpoint(make_checkpoint("s", 1, model), tmp_path, "sync.pth")
    save_checkpoint(make_checkpoint("s", 1, model), tmp_path, "async.pth", blocking=False)
    wait_for_saves()
    weights = load_checkpoint(tmp_path / "async.pth", verbose=False)["model_state_dict"]
    assert torch.equal(weights["head.weight"], embedding.weight.detach())
    assert weights["head.weight"].data_ptr() == weights["embedding.weight"].data_ptr()  # tied after loading
    sizes = [(tmp_path / name).stat().st_size for name in ("sync.pth", "async.pth")]
    assert abs(sizes[1] - sizes[0]) < 1024, sizes  # 128 kB of weights stored once, not twice


def test_copies_where_the_file_system_has_no_hard_links(tmp_path, monkeypatch):
    def no_links(source, target):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    path = save_checkpoint(make_checkpoint("s", 1, make_model()), tmp_path, "exp_1.pth", is_best=True, is_last=True)
    assert not os.path.samefile(path, tmp_path / "best.pth")
    assert (tmp_path / "best.pth").read_bytes() == path.read_bytes() == (tmp_path / "last.pth").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth", "exp_1.pth", "last.pth"]
