import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from batteries import CheckpointManager, load_checkpoint, make_checkpoint

MODEL = nn.Linear(2, 1)


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
def test_n_best_matches_reference_sort(tmp_path, minimize, n_best):
    rng = np.random.default_rng(n_best + 10 * minimize)
    # few distinct values so that ties happen; a few NaN / inf
    raw = rng.integers(0, 6, size=25).astype(float)
    raw[[4, 11]] = math.nan
    raw[17] = math.inf if minimize else -math.inf
    manager = CheckpointManager(tmp_path, metric="loss", metric_minimization=minimize, save_n_best=n_best)
    scores = []
    for epoch, score in enumerate(raw, start=1):
        manager.process(score=float(score), epoch=epoch, checkpoint=checkpoint(epoch))
        scores.append((epoch, float(score)))
        kept, best = reference_best(scores, n_best, minimize)
        assert numbered(tmp_path) == kept
        assert saved_epoch(tmp_path / "best.pth") == best
        assert saved_epoch(tmp_path / "last.pth") == epoch
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("exp_")) == [
            "best.pth",
            "last.pth",
            "metrics.json",
        ]
    assert manager.best_epoch == best


def test_metrics_json_records(tmp_path):
    manager = CheckpointManager(tmp_path, metric="accuracy", metric_minimization=False, save_n_best=2)
    manager.process(score={"accuracy": np.float32(0.5), "loss": torch.tensor(1.5)}, epoch=1, checkpoint=checkpoint(1))
    manager.process(score=math.nan, epoch=2, checkpoint=checkpoint(2))
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data["metric_name"] == "accuracy" and data["metric_minimization"] is False
    assert data["values"] == [{"epoch": 1, "accuracy": 0.5, "loss": 1.5}, {"epoch": 2, "accuracy": None}]
    assert manager.best_epoch == 1


def test_nan_never_best_even_first(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.process(score=math.nan, epoch=1, checkpoint=checkpoint(1))
    assert manager.best is None and not (tmp_path / "best.pth").exists()
    assert saved_epoch(tmp_path / "last.pth") == 1  # last.pth still holds it
    manager.process(score=3.0, epoch=2, checkpoint=checkpoint(2))
    assert saved_epoch(tmp_path / "best.pth") == 2


def test_hard_links_one_write_per_process(tmp_path):
    manager = CheckpointManager(tmp_path, save_n_best=2)
    manager.process(score=1.0, epoch=1, checkpoint=checkpoint(1))
    assert os.path.samefile(tmp_path / "exp_1.pth", tmp_path / "best.pth")
    assert os.path.samefile(tmp_path / "exp_1.pth", tmp_path / "last.pth")


def test_custom_names(tmp_path):
    manager = CheckpointManager(tmp_path, checkpoint_names="model", metrics_file="scores.json")
    manager.process(score=1.0, epoch=7, checkpoint=checkpoint(7))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth", "last.pth", "model_7.pth", "scores.json"]


REBUILD = textwrap.dedent(
    """
    import sys
    import torch
    from batteries import CheckpointManager, make_checkpoint
    folder, start, scores = sys.argv[1], int(sys.argv[2]), [float(s) for s in sys.argv[3].split(",")]
    manager = CheckpointManager(folder, metric="loss", metric_minimization=True, save_n_best=2)
    for epoch, score in enumerate(scores, start=start):
        manager.process(score=score, epoch=epoch, checkpoint=make_checkpoint("s", epoch, torch.nn.Linear(1, 1)))
    print(manager.best_epoch)
    """
)


def run_manager(folder, start, scores):
    result = subprocess.run(
        [sys.executable, "-c", REBUILD, str(folder), str(start), ",".join(map(str, scores))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


def test_rebuilt_in_new_process_continues_history(tmp_path):
    assert run_manager(tmp_path, 1, [5.0, 1.0, 3.0]) == 2
    best_bytes = (tmp_path / "best.pth").read_bytes()
    # a new process, only worse scores: best.pth unchanged, exactly 2 numbered files
    assert run_manager(tmp_path, 4, [4.0, 6.0, 2.0]) == 2
    assert (tmp_path / "best.pth").read_bytes() == best_bytes
    assert numbered(tmp_path) == [2, 6]
    values = json.loads((tmp_path / "metrics.json").read_text())["values"]
    assert [v["epoch"] for v in values] == [1, 2, 3, 4, 5, 6]


def test_rebuild_with_other_metric_or_direction_raises(tmp_path):
    CheckpointManager(tmp_path, metric="loss").process(score=1.0, epoch=1, checkpoint=checkpoint(1))
    with pytest.raises(ValueError, match="metric"):
        CheckpointManager(tmp_path, metric="accuracy")
    with pytest.raises(ValueError, match="metric_minimization"):
        CheckpointManager(tmp_path, metric="loss", metric_minimization=False)


def test_going_back_needs_rewind(tmp_path):
    manager = CheckpointManager(tmp_path, save_n_best=3)
    for epoch, score in [(1, 3.0), (2, 1.0), (3, 2.0)]:
        manager.process(score=score, epoch=epoch, checkpoint=checkpoint(epoch))
    manager = CheckpointManager(tmp_path, save_n_best=3)  # a run resumed from epoch 1
    manager.rewind(1)
    manager.process(score=4.0, epoch=2, checkpoint=checkpoint(2))
    assert [v["epoch"] for v in manager.values] == [1, 2]
    assert numbered(tmp_path) == [1, 2] and manager.best_epoch == 1
    assert saved_epoch(tmp_path / "best.pth") == 1


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


def test_bad_scores_raise_before_writing(tmp_path):
    manager = CheckpointManager(tmp_path, metric="acc")
    with pytest.raises(KeyError, match="acc"):
        manager.process(score={"loss": 1.0}, epoch=1, checkpoint=checkpoint(1))
    with pytest.raises(TypeError, match="number"):
        manager.process(score="0.5", epoch=1, checkpoint=checkpoint(1))
    with pytest.raises(ValueError, match="epoch"):
        manager.process(score=0.5, epoch=-1, checkpoint=checkpoint(1))
    assert list(tmp_path.iterdir()) == []


def test_rewind_forgets_later_epochs(tmp_path):
    manager = CheckpointManager(tmp_path, save_n_best=2)
    for epoch, score in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 0.5)]:
        manager.process(score=score, epoch=epoch, checkpoint=checkpoint(epoch))
    manager.rewind(2)
    assert [v["epoch"] for v in manager.values] == [1, 2]
    assert [v["epoch"] for v in json.loads((tmp_path / "metrics.json").read_text())["values"]] == [1, 2]
    assert numbered(tmp_path) == [2]  # epoch 4's file goes; epoch 1's was deleted before and stays gone
    assert saved_epoch(tmp_path / "best.pth") == 2 and saved_epoch(tmp_path / "last.pth") == 2
    with pytest.raises(ValueError, match="epoch"):
        manager.rewind(-1)


# ---------------------------------------------------------------- asynchronous save
import threading  # noqa: E402


def test_async_manager_matches_sync_manager(tmp_path):
    scores = [3.0, 1.0, math.nan, 2.0, 0.5, 0.5, 4.0]
    sync, asyn = CheckpointManager(tmp_path / "sync", save_n_best=2), None
    asyn = CheckpointManager(tmp_path / "async", save_n_best=2, async_save=True)
    for epoch, score in enumerate(scores, start=1):
        sync.process(score=score, epoch=epoch, checkpoint=checkpoint(epoch))
        asyn.process(score=score, epoch=epoch, checkpoint=checkpoint(epoch))
    asyn.close()
    assert asyn.values == sync.values
    assert sorted(p.name for p in (tmp_path / "async").iterdir()) == sorted(
        p.name for p in (tmp_path / "sync").iterdir()
    )
    assert saved_epoch(tmp_path / "async" / "best.pth") == saved_epoch(tmp_path / "sync" / "best.pth")


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


def test_async_manager_error_surfaces_and_files_stay(tmp_path):
    manager = CheckpointManager(tmp_path, save_n_best=1, async_save=True)
    manager.process(score=1.0, epoch=1, checkpoint=checkpoint(1))
    manager.wait()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken(obj, path):
        raise OSError(28, "No space left on device")

    manager.save_fn = broken
    manager.process(score=0.5, epoch=2, checkpoint=checkpoint(2))  # returns; the write fails behind
    with pytest.raises(OSError, match="No space"):
        manager.process(score=0.4, epoch=3, checkpoint=checkpoint(3))
    manager.process(score=0.3, epoch=4, checkpoint=checkpoint(4))
    with pytest.raises(OSError, match="No space"):
        manager.close()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
