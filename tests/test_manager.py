"""CheckpointManager's promises: the N best, best / last, metrics.json, rewind, asynchronous saves.

Tests taking ``kind`` run once per store (one file per checkpoint, one DCP folder per checkpoint);
the others concern what only one-file checkpoints do (save_fn, hard links).
"""

import json
import math
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch
from kinds import KINDS, Kind, folder_state
from torch import nn

from batteries import CheckpointManager, load_checkpoint, make_checkpoint

MODEL = nn.Linear(2, 1)


@pytest.fixture(params=KINDS)
def kind(request):
    return Kind(request.param)


def checkpoint(epoch):
    return make_checkpoint("s", epoch, MODEL, metrics={"epoch_marker": epoch})


def numbered(folder, prefix="exp"):
    return sorted(int(p.stem.split("_")[1]) for p in folder.glob(f"{prefix}_*.pth"))


def saved_epoch(path):
    return load_checkpoint(path, verbose=False)["epoch"]


def reference_best(scores, n, minimize):
    """Reference: finite scores sorted best first, ties to the newer epoch."""
    finite = [(s, e) for e, s in scores if math.isfinite(s)]
    finite.sort(key=lambda item: (item[0] if minimize else -item[0], -item[1]))
    return sorted(e for _, e in finite[:n]), (finite[0][1] if finite else None)


@pytest.mark.parametrize("minimize", [True, False])
@pytest.mark.parametrize("n_best", [1, 3])
def test_n_best_matches_reference_sort(tmp_path, kind, minimize, n_best):
    rng = np.random.default_rng(n_best + 10 * minimize)
    # few distinct values so that ties happen; a few NaN / inf
    raw = rng.integers(0, 6, size=25).astype(float)
    raw[[4, 11]] = math.nan
    raw[17] = math.inf if minimize else -math.inf
    manager = kind.manager(tmp_path, metric="loss", metric_minimization=minimize, save_n_best=n_best)
    scores = []
    for epoch, score in enumerate(raw, start=1):
        manager.process(score=float(score), epoch=epoch, checkpoint=kind.checkpoint(epoch))
        scores.append((epoch, float(score)))
        kept, best = reference_best(scores, n_best, minimize)
        assert kind.numbered(tmp_path) == kind.kept(kept, epoch)
        assert kind.epoch_of(tmp_path / kind.best) == best
        assert kind.epoch_of(tmp_path / kind.last) == epoch
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("exp_")) == sorted(
            [kind.best, kind.last, "metrics.json"]
        )
    assert manager.best_epoch == best


def test_metrics_json_records(tmp_path, kind):
    manager = kind.manager(tmp_path, metric="accuracy", metric_minimization=False, save_n_best=2)
    score = {"accuracy": np.float32(0.5), "loss": torch.tensor(1.5)}
    manager.process(score=score, epoch=1, checkpoint=kind.checkpoint(1))
    manager.process(score=math.nan, epoch=2, checkpoint=kind.checkpoint(2))
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data["metric_name"] == "accuracy" and data["metric_minimization"] is False
    assert data.get("sharded", False) is kind.sharded
    assert data["values"] == [{"epoch": 1, "accuracy": 0.5, "loss": 1.5}, {"epoch": 2, "accuracy": None}]
    assert manager.best_epoch == 1


def test_nan_never_best_even_first(tmp_path, kind):
    manager = kind.manager(tmp_path)
    manager.process(score=math.nan, epoch=1, checkpoint=kind.checkpoint(1))
    assert manager.best is None and not (tmp_path / kind.best).exists()
    assert kind.epoch_of(tmp_path / kind.last) == 1  # last still holds it
    manager.process(score=3.0, epoch=2, checkpoint=kind.checkpoint(2))
    assert kind.epoch_of(tmp_path / kind.best) == 2


def test_hard_links_one_write_per_process(tmp_path):
    manager = CheckpointManager(tmp_path, save_n_best=2)
    manager.process(score=1.0, epoch=1, checkpoint=checkpoint(1))
    assert os.path.samefile(tmp_path / "exp_1.pth", tmp_path / "best.pth")
    assert os.path.samefile(tmp_path / "exp_1.pth", tmp_path / "last.pth")


def test_custom_names(tmp_path, kind):
    manager = kind.manager(tmp_path, checkpoint_names="model", metrics_file="scores.json")
    manager.process(score=1.0, epoch=7, checkpoint=kind.checkpoint(7))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [kind.best, kind.last, kind.file(7, "model"), "scores.json"]
    )


REBUILD = textwrap.dedent(
    """
    import sys
    import torch
    from batteries import CheckpointManager, make_checkpoint, make_training_state
    folder, start, scores = sys.argv[1], int(sys.argv[2]), [float(s) for s in sys.argv[3].split(",")]
    sharded = sys.argv[4] == "sharded"
    manager = CheckpointManager(folder, metric="loss", metric_minimization=True, save_n_best=2, sharded=sharded)
    model = torch.nn.Linear(1, 1)
    for epoch, score in enumerate(scores, start=start):
        state = make_training_state(model, epoch=epoch, sharded=True) if sharded else make_checkpoint("s", epoch, model)
        manager.process(score=score, epoch=epoch, checkpoint=state)
    print(manager.best_epoch)
    """
)


def run_manager(folder, start, scores, kind):
    result = subprocess.run(
        [sys.executable, "-c", REBUILD, str(folder), str(start), ",".join(map(str, scores)), kind.name],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


def test_rebuilt_in_new_process_continues_history(tmp_path, kind):
    assert run_manager(tmp_path, 1, [5.0, 1.0, 3.0], kind) == 2
    best = folder_state(tmp_path / kind.best) if kind.sharded else (tmp_path / "best.pth").read_bytes()
    # a new process, only worse scores: best unchanged, exactly 2 numbered checkpoints
    assert run_manager(tmp_path, 4, [4.0, 6.0, 2.0], kind) == 2
    assert (folder_state(tmp_path / kind.best) if kind.sharded else (tmp_path / "best.pth").read_bytes()) == best
    assert kind.numbered(tmp_path) == [2, 6]
    values = json.loads((tmp_path / "metrics.json").read_text())["values"]
    assert [v["epoch"] for v in values] == [1, 2, 3, 4, 5, 6]


def test_rebuild_with_other_metric_or_direction_raises(tmp_path):
    CheckpointManager(tmp_path, metric="loss").process(score=1.0, epoch=1, checkpoint=checkpoint(1))
    with pytest.raises(ValueError, match="metric"):
        CheckpointManager(tmp_path, metric="accuracy")
    with pytest.raises(ValueError, match="metric_minimization"):
        CheckpointManager(tmp_path, metric="loss", metric_minimization=False)


def test_going_back_needs_rewind(tmp_path, kind):
    manager = kind.manager(tmp_path, save_n_best=3)
    for epoch, score in [(1, 3.0), (2, 1.0), (3, 2.0)]:
        manager.process(score=score, epoch=epoch, checkpoint=kind.checkpoint(epoch))
    manager = kind.manager(tmp_path, save_n_best=3)  # a run resumed from epoch 1
    manager.rewind(1)
    manager.process(score=4.0, epoch=2, checkpoint=kind.checkpoint(2))
    assert [v["epoch"] for v in manager.values] == [1, 2]
    assert kind.numbered(tmp_path) == [1, 2] and manager.best_epoch == 1
    assert kind.epoch_of(tmp_path / kind.best) == 1


def test_next_save_repairs_what_a_crash_left(tmp_path):
    manager = CheckpointManager(tmp_path, save_n_best=1)
    manager.process(score=1.0, epoch=1, checkpoint=checkpoint(1))
    # a crash after the numbered file was written but before the history was committed, and a
    # temporary file of a process that no longer exists
    torch.save(checkpoint(2), tmp_path / "exp_2.pth")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".exp_2.pth.tmp-{dead.pid}-deadbeef").write_bytes(b"partial")
    left = sorted(p.name for p in tmp_path.iterdir())
    manager = CheckpointManager(tmp_path, save_n_best=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == left  # building it repairs nothing
    manager.process(score=2.0, epoch=2, checkpoint=checkpoint(2))  # the writer's next save does
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth", "exp_1.pth", "last.pth", "metrics.json"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"save_n_best": 0}, "save_n_best"),
        ({"metric": ""}, "metric"),
        ({"checkpoint_names": "a/b"}, "checkpoint_names"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        CheckpointManager(tmp_path, **kwargs)


def test_bad_scores_raise_before_writing(tmp_path, kind):
    manager = kind.manager(tmp_path, metric="acc")
    with pytest.raises(KeyError, match="acc"):
        manager.process(score={"loss": 1.0}, epoch=1, checkpoint=kind.checkpoint(1))
    with pytest.raises(TypeError, match="number"):
        manager.process(score="0.5", epoch=1, checkpoint=kind.checkpoint(1))
    with pytest.raises(ValueError, match="epoch"):
        manager.process(score=0.5, epoch=-1, checkpoint=kind.checkpoint(1))
    assert list(tmp_path.iterdir()) == []


def test_rewind_forgets_later_epochs(tmp_path, kind):
    manager = kind.filled(tmp_path, [3.0, 1.0, 2.0, 0.5])
    manager.rewind(2)
    assert [v["epoch"] for v in manager.values] == [1, 2]
    assert [v["epoch"] for v in json.loads((tmp_path / "metrics.json").read_text())["values"]] == [1, 2]
    assert kind.numbered(tmp_path) == [2]  # epoch 4's checkpoint goes; epoch 1's was deleted before and stays gone
    assert kind.epoch_of(tmp_path / kind.best) == 2 and kind.epoch_of(tmp_path / kind.last) == 2
    with pytest.raises(ValueError, match="epoch"):
        manager.rewind(-1)


# ---------------------------------------------------------------- asynchronous save
def test_async_manager_matches_sync_manager(tmp_path, kind):
    scores = [3.0, 1.0, math.nan, 2.0, 0.5, 0.5, 4.0]
    sync = kind.manager(tmp_path / "sync", save_n_best=2)
    asyn = kind.manager(tmp_path / "async", save_n_best=2, async_save=True)
    for epoch, score in enumerate(scores, start=1):
        sync.process(score=score, epoch=epoch, checkpoint=kind.checkpoint(epoch))
        asyn.process(score=score, epoch=epoch, checkpoint=kind.checkpoint(epoch))
    asyn.close()
    assert asyn.values == sync.values
    assert sorted(p.name for p in (tmp_path / "async").iterdir()) == sorted(
        p.name for p in (tmp_path / "sync").iterdir()
    )
    assert kind.epoch_of(tmp_path / "async" / kind.best) == kind.epoch_of(tmp_path / "sync" / kind.best)


def test_async_manager_at_most_one_save_in_flight(tmp_path):
    active, peak, lock = [0], [0], threading.Lock()

    def slow_save(obj, path):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        torch.save(obj, path)
        threading.Event().wait(0.05)
        with lock:
            active[0] -= 1

    manager = CheckpointManager(tmp_path, save_n_best=1, save_fn=slow_save, async_save=True)
    for epoch in range(1, 5):
        manager.process(score=float(epoch), epoch=epoch, checkpoint=checkpoint(epoch))
    manager.wait()
    assert peak[0] == 1 and [v["epoch"] for v in manager.values] == [1, 2, 3, 4]


def _failing_writes(kind, manager, monkeypatch):
    """Make every write of ``manager`` fail with a full disk, until the monkeypatch context ends."""

    def broken(*args):
        raise OSError(28, "No space left on device")

    if kind.sharded:
        from torch.distributed.checkpoint import FileSystemWriter

        monkeypatch.setattr(FileSystemWriter, "write_data", broken)
    else:
        monkeypatch.setattr(manager, "save_fn", broken)


def test_async_errors_are_raised_by_wait_by_the_next_process_and_leave_the_folder_as_it_was(
    tmp_path, kind, monkeypatch
):
    manager = kind.filled(tmp_path, [2.0], async_save=True)
    manager.wait()
    before = folder_state(tmp_path)
    with monkeypatch.context() as patch:
        _failing_writes(kind, manager, patch)
        manager.process(1.0, 2, kind.checkpoint(2))  # returns: the write fails in the background
        with pytest.raises(OSError, match="No space left"):
            manager.wait()
        manager.process(0.5, 2, kind.checkpoint(2))
        with pytest.raises(OSError, match="No space left"):
            manager.process(0.4, 3, kind.checkpoint(3))  # the previous failure first; nothing saved
        manager.process(0.3, 4, kind.checkpoint(4))
        with pytest.raises(OSError, match="No space left"):
            manager.close()
    assert folder_state(tmp_path) == before
    assert [record["epoch"] for record in json.loads((tmp_path / "metrics.json").read_text())["values"]] == [1]
    manager.process(0.5, 2, kind.checkpoint(2))
    manager.wait()
    assert [record["epoch"] for record in manager.values] == [1, 2]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_save_writes_a_named_file_that_is_never_numbered_recorded_or_best(tmp_path):
    from batteries import make_training_state

    manager = CheckpointManager(tmp_path, save_n_best=1)
    manager.process(2.0, 1, make_checkpoint("s", 1, nn.Linear(1, 1)))
    metrics = (tmp_path / "metrics.json").read_bytes()
    model = nn.Linear(1, 1)
    for step in (7, 9):  # the second replaces the first
        path = manager.save(make_training_state(model, epoch=1, step=step), "step")
        assert path == tmp_path / "step.pth"
        assert load_checkpoint(path, verbose=False)["step"] == step
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth", "exp_1.pth", "last.pth", "metrics.json",
                                                          "step.pth"]  # fmt: skip
    assert (tmp_path / "metrics.json").read_bytes() == metrics and [r["epoch"] for r in manager.values] == [1]
    assert manager.best_epoch == 1 and load_checkpoint(tmp_path / "best.pth", verbose=False)["epoch"] == 1
    for name in ("best", "last", "exp_3", ".hidden", "step.3", "../step", ""):
        with pytest.raises(ValueError, match="name"):
            manager.save(make_checkpoint("s", 1, model), name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth", "exp_1.pth", "last.pth", "metrics.json",
                                                          "step.pth"]  # fmt: skip


def test_find_resume_checkpoint_with_files_takes_step_then_last_and_skips_another_world_size_mid_epoch(tmp_path):
    from batteries import find_resume_checkpoint, make_training_state

    model = nn.Linear(1, 1)
    manager = CheckpointManager(tmp_path, save_n_best=1)
    assert find_resume_checkpoint(manager) == (None, None)  # a fresh start
    for epoch, score in enumerate([2.0, 1.0], start=1):
        manager.process(score, epoch, make_training_state(model, epoch=epoch, step=10 * epoch))
    path, checkpoint = find_resume_checkpoint(manager)
    assert path == tmp_path / "last.pth" and checkpoint["epoch"] == 2 and checkpoint["step"] == 20
    manager.save(make_training_state(model, epoch=2, step=27), "step")  # mid-epoch 3, by 1 process
    path, checkpoint = find_resume_checkpoint(manager, world_size=1)
    assert path == tmp_path / "step.pth" and checkpoint["step"] == 27
    with pytest.warns(UserWarning, match="mid-epoch position"):  # 2 processes cannot split it: the epoch's end
        path, checkpoint = find_resume_checkpoint(manager, world_size=2)
    assert path == tmp_path / "last.pth" and checkpoint["step"] == 20
    path, checkpoint = find_resume_checkpoint(manager, names=["last.pth"])
    assert path == tmp_path / "last.pth" and checkpoint["step"] == 20
    assert find_resume_checkpoint(manager, names=["other.pth"]) == (None, None)
    manager.process(0.5, 3, make_training_state(model, epoch=3, step=30))  # step.pth (epoch 2) is behind now
    assert find_resume_checkpoint(manager)[0] == tmp_path / "last.pth"
    for bad in (0, True, 1.5):
        with pytest.raises((TypeError, ValueError), match="world_size"):
            find_resume_checkpoint(manager, world_size=bad)
