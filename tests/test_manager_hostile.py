"""CheckpointManager under hostile use: other processes and ranks on the folder, faults and kills at
every step of a save, files deleted or edited by hand, epochs that go back, values Python would coerce.

Tests taking ``kind`` run once per store (one file per checkpoint, one DCP folder per checkpoint)."""

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from kinds import KINDS, Kind, folder_state
from spawn import run_workers
from torch import nn

from batteries import CheckpointManager, load_checkpoint, make_checkpoint

MODEL = nn.Linear(2, 1)


@pytest.fixture(params=KINDS)
def kind(request):
    return Kind(request.param)


def checkpoint(epoch):
    return make_checkpoint("s", epoch, MODEL)


def saved_epoch(path):
    return load_checkpoint(path, verbose=False)["epoch"]


def filled(folder, scores, n_best=2, **kwargs):
    manager = CheckpointManager(folder, save_n_best=n_best, **kwargs)
    for epoch, score in enumerate(scores, start=1):
        manager.process(score=score, epoch=epoch, checkpoint=checkpoint(epoch))
    return manager


def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# ------------------------------------------------------------------ 1. only the writer changes a folder
def test_building_a_manager_never_touches_a_writers_files(tmp_path, kind):
    kind.filled(tmp_path, [3.0, 1.0])
    # what a live writer has in flight: a numbered checkpoint written but not yet recorded, and temporary
    # files of its own and of save_checkpoint (this test process stands for the live writer)
    if kind.sharded:
        shutil.copytree(tmp_path / "exp_2", tmp_path / "exp_3")
        (tmp_path / f".exp_4.tmp-{os.getpid()}-0123abcd").mkdir()
        (tmp_path / f".exp_4.tmp-{os.getpid()}-0123abcd" / "__0_0.distcp").write_bytes(b"half")
    else:
        torch.save(checkpoint(3), tmp_path / "exp_3.pth")
        (tmp_path / f".exp_4.pth.tmp-{os.getpid()}-0123abcd").write_bytes(b"half")
    (tmp_path / f".step{kind.suffix}.tmp-{os.getpid()}-4567abcd").write_bytes(b"half")
    before = folder_state(tmp_path)
    for _ in range(2):
        kind.manager(tmp_path, save_n_best=2)
        kind.manager(tmp_path, save_n_best=1)  # another N-best size: still reads only
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"from batteries import CheckpointManager; CheckpointManager({str(tmp_path)!r}, sharded={kind.sharded})",
        ],
        check=True,
        timeout=120,
    )
    assert folder_state(tmp_path) == before


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_monitor_building_managers_and_loading_while_the_writer_saves(tmp_path, kind):
    """A second process builds managers over the folder and loads every visible checkpoint in a loop while
    the writer saves: nothing it sees is partial, the writer never fails and every checkpoint it
    committed is there."""
    payload = torch.arange(200_000, dtype=torch.float32)  # ~1 MB: the writes take a while
    pid = os.fork()
    if pid == 0:  # the writer
        code = 1
        try:
            manager = kind.manager(tmp_path, save_n_best=2)
            for epoch in range(1, 41):
                score = [3.0, 1.0, 2.0, 0.5][epoch % 4] + epoch / 100
                manager.process(score, epoch, kind.checkpoint(epoch, payload=payload))
                manager.save(kind.checkpoint(epoch), "step")
            code = 0
        finally:
            os._exit(code)
    builds, checks, status = 0, 0, None
    while status is None:
        kind.manager(tmp_path, save_n_best=1)
        builds += 1
        for path in tmp_path.iterdir():
            if path.name == "metrics.json" or path.name.startswith("."):
                continue
            try:
                kind.epoch_of(path)
                checks += 1
            except (FileNotFoundError, RuntimeError):
                # deleted (renamed away) or re-pointed between the listing and the read: never partial
                assert not path.exists() or os.path.islink(path), path.name
        done, code = os.waitpid(pid, os.WNOHANG)
        status = code if done else None
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, "the writer failed"
    manager = kind.manager(tmp_path, save_n_best=2)
    assert [record["epoch"] for record in manager.values] == list(range(1, 41)), "the writer failed"
    assert builds > 5 and checks > 5
    assert kind.numbered(tmp_path) == kind.kept(manager._kept_epochs(), 40)
    assert kind.epoch_of(tmp_path / kind.last) == 40
    steps = ["step", "step.40"] if kind.sharded else ["step.pth"]
    names = [kind.best, kind.last, "metrics.json", *steps, *(kind.file(e) for e in kind.numbered(tmp_path))]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


def _every_rank_processes(rank, world_size, folder):
    import os as os_

    def save_fn(obj, path):
        with open(os_.path.join(folder, "..", f"writes-rank{rank}"), "a") as file:
            file.write(f"{obj['epoch']}\n")
        torch.save(obj, path)

    manager = CheckpointManager(folder, save_n_best=1, save_fn=save_fn)
    paths = [str(manager.process(score=float(e), epoch=e, checkpoint=checkpoint(e))) for e in (1, 2, 3)]
    return paths


def test_only_global_rank_0_writes_and_no_collective_runs(tmp_path):
    folder = tmp_path / "ckpt"
    paths = run_workers(_every_rank_processes, 2, str(folder), timeout_s=60)
    assert paths[0] == paths[1] == [str(folder / f"exp_{e}.pth") for e in (1, 2, 3)]
    assert (tmp_path / "writes-rank0").read_text().split() == ["1", "2", "3"]
    assert not (tmp_path / "writes-rank1").exists()
    assert sorted(p.name for p in folder.iterdir()) == ["best.pth", "exp_1.pth", "last.pth", "metrics.json"]


def test_rank_0_alone_calling_process_does_not_hang(tmp_path):
    run_workers(_rank_0_only, 2, str(tmp_path), timeout_s=30)
    assert saved_epoch(tmp_path / "last.pth") == 2


def _rank_0_only(rank, world_size, folder):
    manager = CheckpointManager(folder)  # the original README: built on every rank
    if rank == 0:
        for epoch in (1, 2):
            manager.process(score=1.0 / epoch, epoch=epoch, checkpoint=checkpoint(epoch))
    torch.distributed.barrier()


def test_repairs_touch_only_what_is_provably_abandoned(tmp_path, kind):
    manager = kind.filled(tmp_path, [3.0, 1.0])
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host, dead = socket.gethostname(), dead_pid()
        alive = tmp_path / f".step{kind.suffix}.tmp-{sleeper.pid}-0123abcd-{host}"
        abandoned = tmp_path / f".exp_3{kind.suffix}.tmp-{dead}-4567abcd-{host}"
        elsewhere = tmp_path / f".exp_3{kind.suffix}.tmp-{dead}-89abcdef-another-node.example.org"  # another host's pid
        for path in (alive, abandoned, elsewhere):
            if kind.sharded:  # a temporary checkpoint folder
                path.mkdir()
                path = path / "__0_0.distcp"
            path.write_bytes(b"half written")
        manager.process(score=2.0, epoch=3, checkpoint=kind.checkpoint(3))
        assert alive.exists() and not abandoned.exists() and elsewhere.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


# ------------------------------------------------------------------ 2. a recorded epoch's checkpoint is never deleted
_CALLS = ("replace", "rename", "link", "symlink", "unlink", "fsync", "open", "rmdir", "mkdir")


def _armed(monkeypatch, at, fault):
    """Make the ``at``-th call of the file-system functions above run ``fault()``."""
    calls = [0]

    def wrap(name):
        real = getattr(os, name)

        def faulty(*args, **kwargs):
            calls[0] += 1
            if calls[0] == at:
                fault()
            return real(*args, **kwargs)

        monkeypatch.setattr(os, name, faulty)

    for name in _CALLS:
        wrap(name)
    return calls


def _three_epochs(tmp_path, kind, at):
    """A folder with epochs 1 to 3 saved (the 2 best: 2 and 3), and its manager. Folders are copied from
    a template (faster); files are saved again (a copy would not keep best.pth / last.pth hard links)."""
    folder, template = tmp_path / f"at{at}", tmp_path / "template"
    if not kind.sharded:
        return folder, kind.filled(folder, [3.0, 1.0, 2.0])
    if not template.exists():
        kind.filled(template, [3.0, 1.0, 2.0])
    shutil.copytree(template, folder, symlinks=True)
    return folder, kind.manager(folder, save_n_best=2)


def _count_calls(tmp_path, kind, monkeypatch):
    _, probe = _three_epochs(tmp_path, kind, "probe")
    with monkeypatch.context() as patch:
        calls = _armed(patch, at=0, fault=None)
        probe.process(score=0.5, epoch=4, checkpoint=kind.checkpoint(4))
    return calls[0]


def _after_the_fault(folder, kind, manager):
    """What must hold after process(epoch 4) was cut short anywhere, then the next process."""
    done = [r["epoch"] for r in json.loads((folder / "metrics.json").read_text())["values"]]
    assert done in ([1, 2, 3], [1, 2, 3, 4])
    kind.every_visible_checkpoint_loads(folder)
    if 4 in done:  # committed: its checkpoint stays (it is the best, among the N kept)
        assert (folder / kind.file(4)).exists() and kind.epoch_of(folder / kind.file(4)) == 4
    for name in (kind.file(2), kind.best, kind.last):  # what was there before is there, whole
        assert kind.epoch_of(folder / name) in (2, 3, 4), name
    # the next save succeeds and leaves the folder clean
    manager.process(score=0.7, epoch=5, checkpoint=kind.checkpoint(5))
    best, other = (4, 5) if 4 in done else (5, 2)
    visible = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    assert visible == sorted([kind.best, kind.last, "metrics.json", kind.file(best), kind.file(other)])
    hidden = [p.name for p in folder.iterdir() if p.name.startswith(".")]
    assert all(f".tmp-{os.getpid()}-" in name for name in hidden), hidden  # only a live process's own leftovers
    assert not hidden or kind.sharded, hidden  # a file's temporary is removed by the save that made it
    assert kind.epoch_of(folder / kind.best) == best and kind.epoch_of(folder / kind.last) == 5


@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError(5, "Input/output error")], ids=["interrupt", "EIO"])
def test_a_fault_at_every_step_of_process_never_loses_a_recorded_epoch(tmp_path, monkeypatch, kind, error):
    total = _count_calls(tmp_path, kind, monkeypatch)  # how many file-system calls one process() makes
    assert total > (15 if kind.sharded else 10)
    for at in range(1, total + 1):

        def fault(error=error):
            raise error

        folder, manager = _three_epochs(tmp_path, kind, at)
        with monkeypatch.context() as patch:
            _armed(patch, at=at, fault=fault)
            try:
                manager.process(score=0.5, epoch=4, checkpoint=kind.checkpoint(4))  # would be the new best
            except (KeyboardInterrupt, OSError, RuntimeError):
                pass
        # files: the same manager goes on; folders: a new one, as after a restart
        _after_the_fault(folder, kind, kind.manager(folder, save_n_best=2) if kind.sharded else manager)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_kill_9_at_every_step_of_process_leaves_every_visible_checkpoint_loadable(tmp_path, monkeypatch):
    """Folders only: a killed file save's unrecorded file is replaced when its epoch is saved again, as
    test_crash_safety's kills at random instants check; a killed folder save's is removed by any next save."""
    kind = Kind("sharded")
    total = _count_calls(tmp_path, kind, monkeypatch)
    for at in range(1, total + 1):
        folder, manager = _three_epochs(tmp_path, kind, at)
        pid = os.fork()
        if pid == 0:
            _armed(monkeypatch, at=at, fault=lambda: os.kill(os.getpid(), signal.SIGKILL))
            try:
                manager.process(score=0.5, epoch=4, checkpoint=kind.checkpoint(4))
            finally:
                os._exit(0)  # the kill came after the last call: nothing more to do
        os.waitpid(pid, 0)
        # the dead child's leftovers go with the next save: its pid is not ours
        _after_the_fault(folder, kind, kind.manager(folder, save_n_best=2))


# ------------------------------------------------------------------ 3. a missing recorded file
def test_a_missing_kept_file_is_restored_from_best_pth(tmp_path):
    manager = filled(tmp_path, [3.0, 1.0, 2.0])  # kept: 2 (best), 3
    (tmp_path / "exp_2.pth").unlink()  # deleted by hand
    for epoch, score in [(4, 5.0), (5, 6.0), (6, 7.0)]:
        manager.process(score=score, epoch=epoch, checkpoint=checkpoint(epoch))
    assert saved_epoch(tmp_path / "exp_2.pth") == 2 and saved_epoch(tmp_path / "best.pth") == 2
    assert sorted(p.name for p in tmp_path.glob("exp_*")) == ["exp_2.pth", "exp_3.pth"]


def test_a_missing_checkpoint_nothing_holds_is_forgotten_with_a_warning_and_the_links_follow(tmp_path, kind):
    manager = kind.filled(tmp_path, [3.0, 1.0, 2.0])  # kept: 2 (best), 3 (last)
    for name in (kind.file(2), *([] if kind.sharded else ["best.pth"])):  # by hand; with it what holds it
        shutil.rmtree(tmp_path / name) if kind.sharded else (tmp_path / name).unlink()
    with pytest.warns(UserWarning, match=r"recorded epochs \[2\] are missing"):
        manager.process(score=2.5, epoch=4, checkpoint=kind.checkpoint(4))
    assert json.loads((tmp_path / "metrics.json").read_text())["lost_epochs"] == [2]
    assert kind.epoch_of(tmp_path / kind.best) == 3 and kind.epoch_of(tmp_path / kind.last) == 4
    if kind.sharded:  # a dangling link was re-pointed
        assert os.readlink(tmp_path / "best") == "exp_3" and os.readlink(tmp_path / "last") == "exp_4"
    visible = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert visible == sorted([kind.best, kind.last, "metrics.json", kind.file(3), kind.file(4)])
    kind.every_visible_checkpoint_loads(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # later saves go on, without a warning each time
        for epoch in (5, 6):
            manager.process(score=float(epoch), epoch=epoch, checkpoint=kind.checkpoint(epoch))
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["epoch"] for r in data["values"]] == [1, 2, 3, 4, 5, 6]  # the scores stay
    assert 2 in data["lost_epochs"]
    assert manager.best_epoch == 3 and kind.epoch_of(tmp_path / kind.best) == 3
    assert kind.numbered(tmp_path) == kind.kept([3, 4], 6)


# ------------------------------------------------------------------ 4. going back is explicit
@pytest.mark.parametrize("async_save", [False, True])
def test_an_epoch_at_or_below_the_newest_raises_before_writing(tmp_path, kind, async_save):
    manager = kind.filled(tmp_path, [3.0, 1.0, 2.0, 4.0, 5.0], async_save=async_save)
    manager.wait()
    before = folder_state(tmp_path)
    for epoch in (5, 3, 1, 0):
        with pytest.raises(ValueError, match=r"rewind\("):
            manager.process(score=0.1, epoch=epoch, checkpoint=kind.checkpoint(epoch))
    # a new process whose loop restarts at epoch 1 (a second stage)
    with pytest.raises(ValueError, match=r"rewind\("):
        kind.manager(tmp_path, save_n_best=2).process(score=0.1, epoch=1, checkpoint=kind.checkpoint(1))
    manager.wait()
    assert folder_state(tmp_path) == before


# ------------------------------------------------------------------ 5. unreadable history
UNUSABLE = {
    "corrupt": b'{"metric_name": "loss", "values": [',
    "binary": b"PK\x03\x04\x80\x81\xfe\x00",
    "null": b"null",
    "a number": b"3",
    "no values": b'{"metric_name": "loss", "metric_minimization": true}',
    "no epoch": b'{"metric_name": "loss", "metric_minimization": true, "values": [{"loss": 1.0}]}',
    "string epoch": b'{"metric_name": "loss", "metric_minimization": true, "values": [{"epoch": "1", "loss": 1.0}]}',
    "string value": b'{"metric_name": "loss", "metric_minimization": true, "values": [{"epoch": 1, "loss": "0.5"}]}',
    "no metric": b'{"metric_name": "loss", "metric_minimization": true, "values": [{"epoch": 1, "acc": 0.5}]}',
    "string flag": b'{"metric_name": "loss", "metric_minimization": "true", "values": []}',
    "epochs twice": b'{"metric_name": "loss", "metric_minimization": true, '
    b'"values": [{"epoch": 2, "loss": 1.0}, {"epoch": 2, "loss": 0.5}]}',
}


@pytest.mark.parametrize("content", UNUSABLE.values(), ids=UNUSABLE.keys())
def test_unusable_history_is_one_clear_error_and_nothing_is_deleted(tmp_path, content):
    filled(tmp_path, [3.0, 1.0, 2.0])
    (tmp_path / "metrics.json").write_bytes(content)
    before = folder_state(tmp_path)
    with pytest.raises(ValueError, match="metrics.json") as error:
        CheckpointManager(tmp_path, save_n_best=2)
    assert str(tmp_path) in str(error.value) and "another logdir" in str(error.value)
    assert folder_state(tmp_path) == before


def test_numbered_checkpoints_without_history_are_refused(tmp_path):
    for epoch in (1, 2):
        torch.save(checkpoint(epoch), tmp_path / f"exp_{epoch}.pth")
    before = folder_state(tmp_path)
    with pytest.raises(ValueError, match="exp_1.pth, exp_2.pth.*'metrics.json' has no history"):
        CheckpointManager(tmp_path)
    assert folder_state(tmp_path) == before


ORIGINAL_LATER = b"""{
    "metric_name": "loss",
    "metric_minimization": true,
    "values": [
        {"accuracy": 0.5, "loss": NaN, "epoch": 1},
        {"accuracy": 0.7, "loss": 0.4, "epoch": 2},
        {"accuracy": 0.6, "loss": Infinity, "epoch": 3}
    ]
}"""
ORIGINAL_FIRST = b'[{"epoch": 1, "loss": NaN}, {"epoch": 2, "loss": 0.4}, {"epoch": 3, "loss": 0.9}]'


@pytest.mark.parametrize("content", [ORIGINAL_LATER, ORIGINAL_FIRST], ids=["dict", "list"])
def test_a_folder_of_the_original_toolkit_is_continued(tmp_path, content):
    """The original wrote json.dump's NaN / Infinity literals (and, at first, a bare list)."""
    (tmp_path / "metrics.json").write_bytes(content)
    for name in ("exp_2.pth", "best.pth"):
        torch.save(checkpoint(2), tmp_path / name)
    torch.save(checkpoint(3), tmp_path / "exp_3.pth")
    torch.save(checkpoint(3), tmp_path / "last.pth")
    manager = CheckpointManager(tmp_path)
    assert manager.best_epoch == 2 and manager.values[0]["loss"] is None
    manager.process(score=0.5, epoch=4, checkpoint=checkpoint(4))
    data = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=pytest.fail)  # strict JSON now
    assert [r["epoch"] for r in data["values"]] == [1, 2, 3, 4] and data["values"][0]["loss"] is None
    assert saved_epoch(tmp_path / "best.pth") == 2 and saved_epoch(tmp_path / "last.pth") == 4
    assert sorted(p.name for p in tmp_path.glob("exp_*")) == ["exp_2.pth"]


# ------------------------------------------------------------------ 6. names cannot collide
@pytest.mark.parametrize("name", ["best.pth", "last.pth", "exp_3.pth", ".", "..", "", "a/metrics.json"])
def test_metrics_file_cannot_be_a_name_the_manager_writes(tmp_path, name):
    with pytest.raises(ValueError, match="metrics_file"):
        CheckpointManager(tmp_path, metrics_file=name)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ 7. flags are checked, not coerced
@pytest.mark.parametrize("flag", ["False", "True", None, 0, 1, "no"])
def test_metric_minimization_must_be_a_bool(tmp_path, flag):
    with pytest.raises(TypeError, match="metric_minimization"):
        CheckpointManager(tmp_path, metric_minimization=flag)


def test_numpy_integers_are_ints(tmp_path):
    manager = CheckpointManager(tmp_path, save_n_best=np.int64(2))
    for epoch in np.arange(1, 4, dtype=np.int32):
        manager.process(score=np.float32(4 - epoch), epoch=epoch, checkpoint=checkpoint(int(epoch)))
    assert manager.save_n_best == 2 and type(manager.save_n_best) is int
    assert [type(r["epoch"]) for r in manager.values] == [int] * 3
    assert sorted(p.name for p in tmp_path.glob("exp_*")) == ["exp_2.pth", "exp_3.pth"]
    for bad in (2.0, True, "2"):
        with pytest.raises(TypeError, match="save_n_best"):
            CheckpointManager(tmp_path, save_n_best=bad)
    with pytest.raises(TypeError, match="epoch"):
        manager.process(score=1.0, epoch=4.0, checkpoint=checkpoint(4))
    assert not math.isnan(manager.best_score)


# ------------------------------------------------------------------ found by a hostile review
def test_a_missing_file_is_restored_only_from_a_link_to_that_very_file(tmp_path):
    """Two managers share best.pth: one's missing file is never restored from the other's checkpoint."""
    model = CheckpointManager(tmp_path, checkpoint_names="model", metrics_file="model.json")
    ema = CheckpointManager(tmp_path, checkpoint_names="ema", metrics_file="ema.json")
    for epoch in (1, 2):
        model.process(score=1.0 / (3 - epoch) if epoch == 2 else 0.1, epoch=epoch, checkpoint=checkpoint(epoch))
        ema.process(score=0.01 * epoch, epoch=epoch, checkpoint=make_checkpoint("ema", epoch, nn.Linear(2, 1)))
    assert saved_epoch(tmp_path / "best.pth") == 1  # ema's epoch 1, which also says "epoch": 1
    (tmp_path / "model_1.pth").unlink()  # model's best, deleted by hand
    with pytest.warns(UserWarning, match=r"\[1\]"):
        model.process(score=5.0, epoch=3, checkpoint=checkpoint(3))
    assert not (tmp_path / "model_1.pth").exists() and 1 in model.lost_epochs


def test_the_checkpoints_epoch_must_be_the_processed_epoch(tmp_path):
    manager = CheckpointManager(tmp_path)
    with pytest.raises(ValueError, match=r"checkpoint\['epoch'\] is 0 but process\(epoch=1\)"):
        manager.process(score=1.0, epoch=1, checkpoint=make_checkpoint("s", 0, MODEL))
    assert list(tmp_path.iterdir()) == []


def test_a_history_without_records_beside_numbered_files_is_refused(tmp_path):
    filled(tmp_path, [3.0, 1.0, 2.0])
    data = json.loads((tmp_path / "metrics.json").read_text())
    (tmp_path / "metrics.json").write_text(json.dumps({**data, "values": []}))
    before = folder_state(tmp_path)
    with pytest.raises(ValueError, match="no history of them"):
        CheckpointManager(tmp_path, save_n_best=2)
    assert folder_state(tmp_path) == before


def test_a_smaller_save_n_best_than_recorded_is_refused_before_deleting(tmp_path, kind):
    kind.filled(tmp_path, [3.0, 1.0, 2.0], n_best=3)
    before = folder_state(tmp_path)
    manager = kind.manager(tmp_path)  # save_n_best=1: reading the folder is fine
    with pytest.raises(ValueError, match="save_n_best=3"):
        manager.process(score=0.5, epoch=4, checkpoint=kind.checkpoint(4))
    assert folder_state(tmp_path) == before


def test_a_fast_background_save_never_leaves_its_epoch_behind(tmp_path, monkeypatch):
    from batteries import _async

    real = _async.AsyncWriter.submit

    def submit(self, obj, job):  # the background job ends before the caller's next line
        real(self, obj, job)
        self._pending.result()

    monkeypatch.setattr(_async.AsyncWriter, "submit", submit)
    manager = filled(tmp_path, [5.0, 4.0, 3.0, 2.0, 1.0], n_best=3, async_save=True)
    manager.wait()
    manager.rewind(2)
    manager.process(score=0.1, epoch=3, checkpoint=checkpoint(3))
    manager.wait()
    assert [r["epoch"] for r in manager.values] == [1, 2, 3]


def test_load_state_dict_refuses_a_history_the_constructor_would_refuse(tmp_path):
    manager = filled(tmp_path, [3.0, 1.0])
    before = folder_state(tmp_path)
    state = manager.state_dict()
    for bad in ({**state, "values": state["values"][::-1]}, {**state, "lost_epochs": ["1"]}):
        with pytest.raises(ValueError, match="metrics.json"):
            manager.load_state_dict(bad)
    assert folder_state(tmp_path) == before


def test_a_restore_whose_rewind_would_fail_restores_nothing(tmp_path):
    from batteries import make_training_state, restore_training_state

    manager = filled(tmp_path, [3.0, 1.0])
    model = nn.Linear(2, 1)
    state = make_training_state(model, epoch=1)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)  # the model differs from the state now
    changed = {key: value.clone() for key, value in model.state_dict().items()}
    (tmp_path / "metrics.json").write_text("null")  # the history became unusable after the manager was built
    with pytest.raises(ValueError, match="metrics.json"):
        restore_training_state(state, model, manager=manager)
    assert all(torch.equal(value, changed[key]) for key, value in model.state_dict().items())
    assert not all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
