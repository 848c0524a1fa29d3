"""CheckpointManager(sharded=True): what only DCP checkpoint folders do (relative links, the newest folder
kept while last, named saves, restores in place, FSDP2 ranks). The promises both kinds keep (faults and
kills at every step, a monitor process, hand deletions, asynchronous errors) are tested once per kind in
test_manager.py and test_manager_hostile.py. Most tests run in one process (DCP without a process group);
the multi-rank one runs 2 gloo processes with FSDP2."""

import collections
import datetime
import json
import multiprocessing as mp
import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch
from spawn import free_port, run_workers
from torch import nn

from batteries import (
    EMA,
    CheckpointManager,
    _dcp,
    find_resume_checkpoint,
    load_checkpoint,
    make_training_state,
    restore_training_state,
    save_checkpoint,
)


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, optimizer


MODEL, OPTIMIZER = build()


def train_step(model, optimizer):
    model(torch.randn(6, 4)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


train_step(MODEL, OPTIMIZER)


_STATES = {}


def state(epoch, model=MODEL, optimizer=OPTIMIZER, step=None):
    step = epoch if step is None else step
    if model is not MODEL:
        return make_training_state(model, epoch=epoch, step=step, optimizer=optimizer, sharded=True)
    if (epoch, step) not in _STATES:  # MODEL does not change: its states are built once
        _STATES[epoch, step] = make_training_state(model, epoch=epoch, step=step, optimizer=optimizer, sharded=True)
    return _STATES[epoch, step]


def loaded_epoch(path):
    """Read every entry of the checkpoint ``path``, every tensor whole (all shards); its epoch."""
    metadata = _dcp.read_metadata(path)
    return _dcp.load_entries(path, metadata, keys=_dcp.top_level_keys(metadata))["epoch"]


def visible(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def assert_every_visible_checkpoint_loads(folder):
    for name in visible(folder):
        if name != "metrics.json":
            loaded_epoch(folder / name)  # a dangling link or a partial folder raises


def recorded(folder):
    return [record["epoch"] for record in json.loads((folder / "metrics.json").read_text())["values"]]


def filled(folder, scores, n_best=2, **kwargs):
    manager = CheckpointManager(folder, save_n_best=n_best, sharded=True, **kwargs)
    for epoch, score in enumerate(scores, start=1):
        manager.process(score=score, epoch=epoch, checkpoint=state(epoch))
    return manager


# ------------------------------------------------------------------ layout, history, links
def test_folders_links_and_metrics_are_those_of_files(tmp_path):
    scores = [3.0, 1.0, 2.0, 0.5, 4.0]
    sharded = filled(tmp_path / "sharded", scores)
    files = CheckpointManager(tmp_path / "files", save_n_best=2)
    for epoch, score in enumerate(scores, start=1):
        files.process(score, epoch, {"epoch": epoch})
    folder = tmp_path / "sharded"
    # the 2 best (4, 2) and the newest while it is last (5, not among the best)
    assert visible(folder) == ["best", "exp_2", "exp_4", "exp_5", "last", "metrics.json"]
    assert os.readlink(folder / "best") == "exp_4" and os.readlink(folder / "last") == "exp_5"  # relative links
    assert sorted(os.listdir(folder / "exp_4")) == [".metadata", "__0_0.distcp"]
    saved = json.loads((folder / "metrics.json").read_text())
    as_files = json.loads((tmp_path / "files" / "metrics.json").read_text())
    assert saved["values"] == as_files["values"] and saved["sharded"] is True
    assert sharded.best == files.best and sharded.values == files.values
    assert_every_visible_checkpoint_loads(folder)
    # the next epoch: exp_5 goes (not among the best, no longer last)
    sharded.process(score=5.0, epoch=6, checkpoint=state(6))
    assert visible(folder) == ["best", "exp_2", "exp_4", "exp_6", "last", "metrics.json"]


def test_restore_reads_back_every_entry_and_refuses_a_misfit_changing_nothing(tmp_path):
    model, optimizer = build()
    train_step(model, optimizer)
    filled(tmp_path, [1.0])
    restored = restore_training_state(tmp_path / "last", model, optimizer=optimizer)
    assert restored["epoch"] == 1 and restored["step"] == 1 and len(restored["rng_states"]) == 1
    assert "model_state_dict" not in restored  # loaded in place
    for key, value in MODEL.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], OPTIMIZER.state_dict()["state"][0]["exp_avg"])
    wide = nn.Sequential(nn.Linear(4, 9), nn.BatchNorm1d(9), nn.ReLU(), nn.Linear(9, 2))
    before = {key: value.clone() for key, value in wide.state_dict().items()}
    sgd = torch.optim.SGD(wide.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="does not fit"):
        restore_training_state(tmp_path / "last", wide, optimizer=sgd)
    assert all(torch.equal(before[key], value) for key, value in wide.state_dict().items())
    assert not sgd.state  # as it was
    same, _ = build()
    with pytest.raises(RuntimeError, match="optimizer state .* does not fit the SGD given"):
        restore_training_state(tmp_path / "last", same, optimizer=torch.optim.SGD(same.parameters(), momentum=0.9))


def test_bad_arguments_and_the_other_kinds_folder_are_refused(tmp_path):
    with pytest.raises(ValueError, match="save_fn is not used"):
        CheckpointManager(tmp_path, sharded=True, save_fn=lambda obj, path: None)
    with pytest.raises(TypeError, match="sharded must be True or False"):
        CheckpointManager(tmp_path, sharded="yes")
    manager = CheckpointManager(tmp_path / "a", sharded=True)
    with pytest.raises(ValueError, match="keyed by parameter position"):
        manager.process(1.0, 1, {"epoch": 1, "optimizer_state_dict": OPTIMIZER.state_dict()})
    for name in ("best", "last", "exp_3", "step.3", ".hidden", "metrics.json"):
        with pytest.raises(ValueError, match="name must not"):
            manager.save(state(0), name)
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())  # nothing was written
    filled(tmp_path / "sharded", [1.0])
    with pytest.raises(ValueError, match="sharded checkpoint folders"):
        CheckpointManager(tmp_path / "sharded")
    CheckpointManager(tmp_path / "files").process(1.0, 1, {"epoch": 1})
    with pytest.raises(ValueError, match="checkpoint files"):
        CheckpointManager(tmp_path / "files", sharded=True)


def test_a_named_save_replaces_the_previous_one_and_resume_auto_finds_it(tmp_path):
    manager = filled(tmp_path, [2.0, 1.0])
    assert find_resume_checkpoint(manager) == (tmp_path / "last", None)
    for steps in (7, 9):  # mid-epoch 3
        assert manager.save(state(2, step=steps), "step") == tmp_path / "step"
    assert visible(tmp_path) == ["best", "exp_1", "exp_2", "last", "metrics.json", "step", "step.2"]
    assert os.readlink(tmp_path / "step") == "step.2"
    path, checkpoint = find_resume_checkpoint(manager)
    assert path == tmp_path / "step" and checkpoint is None
    assert restore_training_state(path, build()[0], restore_rng=False)["step"] == 9
    # saved by another number of processes: a mid-epoch step is skipped, the epoch's end is taken
    with pytest.warns(UserWarning, match="mid-epoch position"):
        assert find_resume_checkpoint(manager, world_size=2) == (tmp_path / "last", None)


def test_rewind_deletes_the_forgotten_folders_and_never_leaves_a_dangling_link(tmp_path):
    manager = filled(tmp_path, [1.0, 2.0, 3.0, 4.0], n_best=1)
    assert visible(tmp_path) == ["best", "exp_1", "exp_4", "last", "metrics.json"]
    manager.rewind(2)  # epoch 2's folder went with the N best: no `last` to point at
    assert visible(tmp_path) == ["best", "exp_1", "metrics.json"] and recorded(tmp_path) == [1, 2]
    assert_every_visible_checkpoint_loads(tmp_path)
    manager.process(score=0.5, epoch=3, checkpoint=state(3))
    assert visible(tmp_path) == ["best", "exp_3", "last", "metrics.json"]


# ------------------------------------------------------------------ values come back as given
def learning_rates(folder=None, *, sharded=False, save_at=None, resume=None):
    """The learning rates of a MultiStepLR run (milestones: a Counter keyed by int); saved at epoch
    ``save_at`` and stopped there, or resumed from ``resume``."""
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[3, 5], gamma=0.1)
    start, rates = 0, []
    if resume is not None:
        restored = restore_training_state(resume, model, optimizer=optimizer, scheduler=scheduler, restore_rng=False)
        start = restored["epoch"]
    for epoch in range(start + 1, 8):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
        if epoch == save_at:
            checkpoint = make_training_state(model, epoch=epoch, optimizer=optimizer, scheduler=scheduler,
                                             sharded=sharded)  # fmt: skip
            CheckpointManager(folder, sharded=sharded).process(1.0, epoch, checkpoint)
            break
    return rates


@pytest.mark.parametrize("sharded", [False, True], ids=["files", "sharded"])
def test_a_resumed_multistep_scheduler_decays_as_the_uninterrupted_run(tmp_path, sharded):
    straight = learning_rates()
    assert straight == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01, 0.01])
    first = learning_rates(tmp_path, sharded=sharded, save_at=2)
    rest = learning_rates(resume=tmp_path / ("last" if sharded else "last.pth"))
    assert first + rest == straight


def assert_same(a, b, where="checkpoint"):
    """Equal values of the same types, dict keys in the same order, the same attributes (an OrderedDict's _metadata)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b) and getattr(a, "__dict__", None) == getattr(b, "__dict__", None), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{index}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


HOSTILE = {
    "labels": {0: "cat", 1: "dog"},
    "class_counts": collections.Counter({3: 5, 1: 2}),
    "nested": {"a": {0: {1: 2.5}}, "b": [{"c": {}}, {True: None, 1.5: "x", None: 3}]},
    "empties": {"dict": {}, "list": [], "ordered": collections.OrderedDict(), "in_list": [{}, torch.ones(1)]},
    "mixed": [torch.zeros(2), {7: torch.ones(1)}, "s", None, (torch.ones(1), {8: 9})],
    "dotted": {"a.b": torch.ones(1), "c": 1, "0": torch.zeros(1), "1": 2},
    "numbers": [2**70, float("nan"), float("-inf"), True, b"bytes", torch.float16],
    "shapes": [torch.zeros(0), torch.ones(2, 0, 3), torch.tensor(3), torch.arange(6).reshape(2, 3).t()],
}


def test_every_entry_reads_back_with_its_types_as_from_a_one_file_checkpoint(tmp_path):
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [2, 4])
    parts = {"optimizer": optimizer, "scheduler": scheduler, "ema": EMA(model)}  # EMA: an OrderedDict with _metadata
    save_checkpoint(make_training_state(model, epoch=1, **parts, **HOSTILE), tmp_path, "one.pth")
    expected = load_checkpoint(tmp_path / "one.pth", verbose=False)
    CheckpointManager(tmp_path / "sharded", sharded=True).process(
        1.0, 1, make_training_state(model, epoch=1, sharded=True, **parts, **HOSTILE)
    )
    metadata = _dcp.read_metadata(tmp_path / "sharded" / "last")
    read = _dcp.load_entries(tmp_path / "sharded" / "last", metadata)
    assert sorted(read) == sorted(key for key in expected if key not in _dcp.PARTS)
    for key in read:
        assert_same(read[key], expected[key], key)
    assert read["ema_state_dict"]._metadata == EMA(model).state_dict()._metadata
    restored = restore_training_state(tmp_path / "sharded" / "last", model, optimizer=optimizer, restore_rng=False)
    assert_same(restored["labels"], {0: "cat", 1: "dog"})


def test_a_value_that_would_not_read_back_as_given_is_refused_naming_it_and_nothing_is_written(tmp_path):
    manager = CheckpointManager(tmp_path, sharded=True)
    model = nn.Linear(2, 1)
    good = make_training_state(model, epoch=1, sharded=True)
    optimizer_state = {"state": {}, "param_groups": [{"params": ["weight"], "table": {1: 2}}]}
    refused = [
        ({"extra": {"a.b": 1, "a": {"b": 2}}}, ValueError, "under one key"),  # DCP's flat key "extra.a.b" twice
        ({"extra": ("batteries: an empty dict",)}, ValueError, r"extra: a tuple that starts with"),
        ({"extra": {"x": [{"batteries: OrderedDict": 1}]}}, ValueError, r"extra\['x'\]\[0\]: the key"),
        ({"extra": {"when": collections.deque([1])}}, TypeError, r"extra\['when'\]: a value of type deque"),
        ({"extra": {1: object()}}, TypeError, r"extra\[1\]: a value of type object"),
        ({"optimizer_state_dict": optimizer_state}, TypeError, r"\['table'\]: dict key 1 of type int"),
        ({3: 1}, TypeError, "checkpoint keys must be str"),
    ]
    for change, kind, message in refused:
        with pytest.raises(kind, match=message):
            manager.process(1.0, 1, {**good, **change})
    assert list(tmp_path.iterdir()) == [] and manager.values == []
    manager.process(1.0, 1, good)  # the manager is still usable
    assert visible(tmp_path) == ["best", "exp_1", "last", "metrics.json"]


# ------------------------------------------------------------------ asynchronous saves
def test_async_snapshot_is_taken_at_the_call_and_committed_after_the_write(tmp_path):
    model, optimizer = build()
    manager = CheckpointManager(tmp_path, sharded=True, async_save=True)
    expected = {key: value.clone() for key, value in model.state_dict().items()}
    manager.process(1.0, 1, state(1, model, optimizer))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)  # training goes on while the files are written
    manager.wait()
    fresh = build()[0]
    restore_training_state(tmp_path / "last", fresh, restore_rng=False)
    assert all(torch.equal(fresh.state_dict()[key], value) for key, value in expected.items())
    assert manager.values == [{"epoch": 1, "loss": 1.0}] and visible(tmp_path) == [
        "best",
        "exp_1",
        "last",
        "metrics.json",
    ]


def test_an_async_error_nobody_waited_for_is_reported_at_exit(tmp_path):
    script = f"""
import torch
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter
from batteries import CheckpointManager, make_training_state
def write_data(self, plan, planner):
    raise OSError(28, "No space left on device")
FileSystemWriter.write_data = write_data
model = nn.Linear(2, 1)
CheckpointManager({str(tmp_path)!r}, sharded=True, async_save=True).process(
    1.0, 1, make_training_state(model, epoch=1, sharded=True))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "No space left on device" in result.stderr
    assert list(tmp_path.iterdir()) == []  # the temporary folder removed; no history before a first commit


def histories_after_wait(rank, world_size, folder):
    """Asynchronous sharded saves on 2 ranks; rank 0's commit of epoch 3 fails. What each rank holds after wait()."""

    def no_space(tmp, final):
        raise OSError(28, "No space left on device")

    manager = CheckpointManager(folder, save_n_best=2, sharded=True, async_save=True)
    model, seen = nn.Linear(2, 1), []
    for epoch, score in enumerate([2.0, 1.0, 0.5], start=1):
        if epoch == 3 and rank == 0:
            _dcp.commit_folder = no_space  # rank 0 cannot rename the folder into place
        manager.process(score, epoch, make_training_state(model, epoch=epoch, sharded=True))
        try:
            manager.wait()
            error = None
        except (OSError, RuntimeError) as caught:
            error = f"{type(caught).__name__}: {caught}"
        seen.append((list(manager.values), manager.best, manager.best_epoch, error))
    return seen


def test_every_rank_holds_the_same_history_after_wait_with_async_sharded_saves(tmp_path):
    first, second = run_workers(histories_after_wait, 2, str(tmp_path), timeout_s=120)
    for epoch, (mine, theirs) in enumerate(zip(first, second), start=1):
        assert mine[:3] == theirs[:3], (epoch, mine, theirs)
    values, best, best_epoch, error = first[1]
    assert [r["epoch"] for r in values] == [1, 2] and best_epoch == 2 and best == {"epoch": 2, "loss": 1.0}
    assert first[1][3] is None and second[1][3] is None
    # epoch 3's commit failed on rank 0: both ranks raise at wait(), both keep epochs 1 and 2
    assert "No space left" in first[2][3] and "rank 0 failed to commit" in second[2][3]
    assert [r["epoch"] for r in second[2][0]] == [1, 2]


# ------------------------------------------------------------------ 2 ranks, FSDP2
def _fsdp_ranks(rank, world_size, port, folder, results):
    """Sync and async managers over FSDP2 shards; a rank that fails makes both raise; then rank 1 is
    killed while it writes its shard, and rank 0 says what it saw."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    try:
        model, optimizer = build()
        fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        train_step(model, optimizer)
        writes, full = [], []
        for async_save in (False, True):
            manager = CheckpointManager(f"{folder}/{async_save}", save_n_best=1, sharded=True, async_save=async_save)
            for epoch, score in enumerate([2.0, 1.0, 3.0], start=1):
                train_step(model, optimizer)
                manager.process(score, epoch, state(epoch, model, optimizer))
            manager.save(state(3, model, optimizer), "step")
            manager.wait()
            writes.append(sorted(os.listdir(f"{folder}/{async_save}/exp_2")))
            full.append({k: v.full_tensor() for k, v in model.state_dict().items() if hasattr(v, "full_tensor")})
        good = state(4, model, optimizer)  # on every rank: it gathers the RNG states
        bad = {"epoch": 4, "optimizer_state_dict": {"state": {0: {}}}}
        try:
            manager.process(0.5, 4, bad if rank == 1 else good)
            failed = None
        except (ValueError, RuntimeError) as error:
            failed = f"{type(error).__name__}: {error}"
        report = {"writes": writes, "values": manager.values, "full": full, "failed": failed}
        if rank == 1:
            results.put(pickle.dumps((rank, report)))
            os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # killed while writing its shard
        try:
            manager.process(0.5, 4, good)  # asynchronous: the shards are written by a background thread
            manager.wait()
            report["killed"] = None
        except Exception as error:  # noqa: BLE001 - reported to the parent
            report["killed"] = f"{type(error).__name__}: {error}"
        results.put(pickle.dumps((rank, report)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        import traceback

        results.put(pickle.dumps((rank, traceback.format_exc())))


def test_two_fsdp_ranks_write_their_own_shards_agree_on_failures_and_survive_a_killed_rank(tmp_path):
    context = mp.get_context("spawn")
    results, port = context.Queue(), free_port()
    processes = [
        context.Process(target=_fsdp_ranks, args=(rank, 2, port, str(tmp_path), results), daemon=True)
        for rank in (0, 1)
    ]
    for process in processes:
        process.start()
    try:
        reports = dict(pickle.loads(results.get(timeout=120)) for _ in range(2))
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    assert all(isinstance(report, dict) for report in reports.values()), reports
    first, second = reports[0], reports[1]
    assert first["writes"] == second["writes"] == [[".metadata", "__0_0.distcp", "__1_0.distcp"]] * 2
    assert first["values"] == second["values"] and [r["epoch"] for r in first["values"]] == [1, 2, 3]
    assert "keyed by parameter position" in second["failed"] and "rank 1 failed" in first["failed"]
    for kind, weights in zip(("False", "True"), first["full"]):
        folder = tmp_path / kind
        assert visible(folder) == ["best", "exp_2", "exp_3", "last", "metrics.json", "step", "step.1"]
        model = build()[0]  # one process reads the 2 ranks' shards back into a whole model
        restore_training_state(folder / "step", model, restore_rng=False)
        for key, value in weights.items():
            assert torch.equal(model.state_dict()[key], value), key
    # rank 1 killed while writing epoch 4: rank 0 learnt of it at once (gloo), nothing partial is visible
    assert first["killed"] is not None and processes[1].exitcode == -signal.SIGKILL
    assert recorded(tmp_path / "True") == [1, 2, 3]
    assert visible(tmp_path / "True") == ["best", "exp_2", "exp_3", "last", "metrics.json", "step", "step.1"]
    assert_every_visible_checkpoint_loads(tmp_path / "True")


def test_a_sharded_restore_that_fails_after_reading_the_shards_leaves_the_optimizer_empty(tmp_path):
    """The scheduler does not fit, after the model and optimizer shards were read: nothing may change,
    not even the zeros that reading an empty optimizer's state puts into it."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    for _ in range(2):
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
    manager = CheckpointManager(tmp_path, sharded=True)
    manager.process(1.0, 1, make_training_state(model, optimizer=optimizer, scheduler=scheduler, epoch=1, step=2,
                                                sharded=True))  # fmt: skip
    fresh = torch.nn.Linear(4, 3)
    before = {key: value.clone() for key, value in fresh.state_dict().items()}
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=0.5)
    other = torch.optim.lr_scheduler.CosineAnnealingLR(fresh_optimizer, 10)
    with pytest.raises(RuntimeError, match="scheduler"):
        restore_training_state(tmp_path / "best", fresh, optimizer=fresh_optimizer, scheduler=other)
    assert fresh_optimizer.state_dict()["state"] == {}
    assert all(torch.equal(value, before[key]) for key, value in fresh.state_dict().items())
