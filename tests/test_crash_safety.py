"""Kill, fill and corrupt: the checkpoint files survive every failure.

Kills use ``os.fork`` so that each of the many short processes starts in milliseconds (torch is
already imported); every child is a real process ended with ``SIGKILL`` at a random instant.
"""

import errno
import json
import os
import random
import re
import resource
import signal
import sys
import time

import pytest
import torch
from spawn import run_in_child

from batteries import CheckpointManager, load_checkpoint, make_checkpoint

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

N_BEST = 2


_MODEL = torch.nn.Linear(1, 1)
_PAYLOADS = {}


def big_checkpoint(epoch, size=250_000):
    """About 1 MB, so that kills land inside writes too.

    The tensors are made in the parent: a forked child must not run torch's thread pools, which
    the fork may have left locked.
    """
    if size not in _PAYLOADS:
        _PAYLOADS[size] = torch.arange(size, dtype=torch.float32)
    return make_checkpoint("s", epoch, _MODEL, payload=_PAYLOADS[size], marker=epoch)


def save_loop(folder, done_log):
    """The child: a manager over ``folder`` saving epoch after epoch until it is killed."""
    manager = CheckpointManager(folder, save_n_best=N_BEST)
    epoch = max((record["epoch"] for record in manager.values), default=0) + 1
    while True:
        score = random.Random(epoch).choice([0.5, 1.0, 1.5, 2.0, float("nan")])
        manager.process(score=score, epoch=epoch, checkpoint=big_checkpoint(epoch))
        with open(done_log, "a") as file:  # process() returned: epoch is saved
            file.write(f"{epoch}\n")
        epoch += 1


def visible_state(folder):
    files = sorted(p.name for p in folder.iterdir())
    for name in files:
        if name.endswith(".pth") and not name.startswith("."):
            checkpoint = load_checkpoint(folder / name, verbose=False)  # every visible .pth loads
            assert checkpoint["marker"] == checkpoint["epoch"] and len(checkpoint["payload"]) > 0, name
    metrics = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").exists() else None
    return files, metrics


def test_kill_9_at_random_instants(tmp_path):
    big_checkpoint(0)  # build the payload before forking
    folder, done_log = tmp_path / "ckpt", tmp_path / "done.log"
    folder.mkdir()
    rng = random.Random(0)
    kills, phases = 0, set()
    while kills < 60:
        pid = os.fork()
        if pid == 0:  # child
            try:
                save_loop(folder, done_log)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.0, 0.12))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status), "the child ended before it was killed"
        kills += 1

        files, metrics = visible_state(folder)  # right after the kill, before anyone repairs
        phases.add(tuple(sorted(re.sub(r"\d+", "N", name.split(".tmp-")[0]) for name in files if ".tmp-" in name)))
        if done_log.exists() and done_log.read_text().strip():
            assert "last.pth" in files and metrics is not None
            if any(record["loss"] is not None for record in metrics["values"]):
                assert "best.pth" in files
        numbered = [name for name in files if name.startswith("exp_")]
        assert len(numbered) <= N_BEST + 1  # the new file is in place before the dropped one goes

        manager = CheckpointManager(folder, save_n_best=N_BEST)  # a restart: building it changes nothing
        assert visible_state(folder) == (files, metrics)
        epoch = max((record["epoch"] for record in manager.values), default=0) + 1
        score = random.Random(epoch).choice([0.5, 1.0, 1.5, 2.0, float("nan")])
        manager.process(score=score, epoch=epoch, checkpoint=big_checkpoint(epoch))  # the next save repairs
        files, metrics = visible_state(folder)
        assert not [name for name in files if ".tmp-" in name]
        kept = sorted(int(name[4:-4]) for name in files if name.startswith("exp_"))
        ranked = sorted((r for r in metrics["values"] if r["loss"] is not None), key=lambda r: (r["loss"], -r["epoch"]))
        assert kept == sorted(r["epoch"] for r in ranked[:N_BEST])
        assert load_checkpoint(folder / "last.pth", verbose=False)["epoch"] == metrics["values"][-1]["epoch"] == epoch
        if ranked:
            assert load_checkpoint(folder / "best.pth", verbose=False)["epoch"] == ranked[0]["epoch"]
            assert manager.best_epoch == ranked[0]["epoch"]
    saved = [int(line) for line in done_log.read_text().split()]
    assert len(saved) >= 20, "too few saves completed between kills to exercise the loop"
    assert len(phases) > 1, "no kill landed during a write"
    print(f"{kills} kills, {len(saved)} completed saves, temporary files seen after kills: {sorted(phases)}")


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE semantics are Linux's")
def test_disk_full_leaves_previous_files_untouched(tmp_path):
    manager = CheckpointManager(tmp_path, save_n_best=2)
    manager.process(score=1.0, epoch=1, checkpoint=big_checkpoint(1, size=1000))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    too_big = big_checkpoint(2)  # 1 MB, built before forking

    def fill_the_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        CheckpointManager(tmp_path, save_n_best=2).process(score=0.5, epoch=2, checkpoint=too_big)
        return {"error": None}

    result = run_in_child(fill_the_disk)
    # the write past the limit, as the disk-full error of this simulation (EFBIG), naming the file: no other error
    assert (result["type"], result["errno"]) == ("OSError", errno.EFBIG), result
    assert "exp_2.pth" in result["message"]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # untouched, no temporary files


def test_failing_save_fn_half_way_leaves_previous_files_untouched(tmp_path):
    manager = CheckpointManager(tmp_path, save_n_best=1)
    manager.process(score=1.0, epoch=1, checkpoint=big_checkpoint(1, size=10))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def half_then_fail(obj, path):
        with open(path, "wb") as file:
            file.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    manager.save_fn = half_then_fail
    with pytest.raises(OSError, match="No space"):
        manager.process(score=0.1, epoch=2, checkpoint=big_checkpoint(2, size=10))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert [r["epoch"] for r in manager.values] == [1]


def test_failing_metrics_write_leaves_history_and_links(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, save_n_best=1)
    manager.process(score=1.0, epoch=1, checkpoint=big_checkpoint(1, size=10))
    metrics_before = (tmp_path / "metrics.json").read_bytes()

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", no_space)
    with pytest.raises(OSError, match="No space"):
        manager.process(score=0.1, epoch=2, checkpoint=big_checkpoint(2, size=10))
    assert (tmp_path / "metrics.json").read_bytes() == metrics_before
    assert load_checkpoint(tmp_path / "best.pth", verbose=False)["epoch"] == 1
    assert load_checkpoint(tmp_path / "last.pth", verbose=False)["epoch"] == 1
    assert [r["epoch"] for r in manager.values] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth", "exp_1.pth", "last.pth", "metrics.json"]
