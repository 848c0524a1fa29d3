"""Fault-tolerant restarts: torchrun restarts the ddp example after one worker is killed, and the
job ends exactly where an uninterrupted run ends.

``torchrun --max-restarts=1 --rdzv-backend=c10d ... --resume auto``: one worker gets ``kill -9``;
the agent stops the other and starts both again; the new pair forms its group (which torch 2.13
alone fails to do in most such restarts: see ``init_distributed``) and resumes from the newest
checkpoint. torchrun must exit 0, the log must say where the run resumed, and the final weights and
metrics must equal the uninterrupted run's bit for bit.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from spawn import descendants, free_port
from test_examples import DDP, RESUME_ARGS, TORCHRUN, kill_tree, position, straight_run  # noqa: F401 (a fixture)

STEPS_PER_EPOCH = math.ceil(math.ceil(1437 / 2) / 128)  # of each of the 2 ranks, at RESUME_ARGS' batch size 128
pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find torchrun's workers")


def worker_of_rank(agent_pid, rank):
    """The pid of torchrun's worker with global rank ``rank``: a child of the agent (DataLoader
    workers, which inherit ``RANK``, are the worker's children), or None while it has not started."""
    for pid in descendants(agent_pid):
        try:
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == agent_pid and f"RANK={rank}".encode() in environ:
            return pid
    return None


class Checkpoints:
    """``position()`` of ``last.pth`` and ``step.pth``, each loaded again only once its file changed."""

    def __init__(self, folder):
        self.folder, self.seen = folder, {}

    def __call__(self, name):
        path = self.folder / name
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if self.seen.get(name, (None,))[0] != key:
            self.seen[name] = (key, position(path))
            if self.seen[name][1] is None:  # not loadable (yet): read it again next time
                return self.seen.pop(name)[1]
        return self.seen[name][1]


@pytest.mark.parametrize(
    ("victim", "moment"),
    [(1, "mid-epoch"), (0, "epoch-end")],
    ids=["rank1-mid-epoch", "rank0-right-after-epoch-checkpoint"],
)
def test_torchrun_restarts_a_killed_worker_and_ends_bitwise_where_the_uninterrupted_run_ends(
    tmp_path,
    straight_run,  # noqa: F811 (the fixture imported above)
    victim,
    moment,
):
    logdir = tmp_path / "run"
    checkpoints, seen = Checkpoints(logdir / "checkpoints"), {}
    if moment == "mid-epoch":  # right after a checkpoint part way into epoch 2 or 3: resumes from it (or a newer one)

        def ready():
            seen.update(last=checkpoints("last.pth"), step=checkpoints("step.pth"))
            last, step = seen["last"], seen["step"]
            return last is not None and step is not None and last < step < (step[0], STEPS_PER_EPOCH)
    else:  # right after epoch 1's checkpoint: rank 0, the only writer, may still be finishing the epoch's files

        def ready():
            return checkpoints("last.pth") is not None

    rendezvous = [
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        f"--rdzv-id=test-elastic-{os.getpid()}-{time.monotonic_ns()}",
    ]
    command = [sys.executable, *TORCHRUN, "--nproc_per_node=2", "--max-restarts=1", *rendezvous, DDP]
    command += [*RESUME_ARGS, "--logdir", logdir, "--resume", "auto", "--save-every-steps", "2"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    torchrun = subprocess.Popen(
        list(map(str, command)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        deadline = time.monotonic() + 180
        while not ready():
            assert torchrun.poll() is None, f"torchrun ended before the kill:\n{torchrun.communicate()[0][-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint to kill after within 180 s"
            time.sleep(0.01)
        pid = worker_of_rank(torchrun.pid, victim)
        assert pid is not None, f"no worker of rank {victim}"
        os.kill(pid, signal.SIGKILL)
        output = torchrun.communicate(timeout=180)[0]
    finally:
        if torchrun.poll() is None:  # an assert above failed: the agent and its workers must not outlive the test
            kill_tree(torchrun)
    assert torchrun.returncode == 0, output[-4000:]
    assert "failed (exitcode: -9)" in output, output[-4000:]  # the kill reached torchrun, which restarted the group

    log = (logdir / "train.log").read_text()
    assert log.count("World size 2, backend gloo") == 2, log[-3000:]  # the first attempt and the restarted one
    resumed = re.findall(r"Resumed from '.*' \(epoch (\d+) finished\); continuing at epoch (\d+), batch (\d+)", log)
    assert len(resumed) == 1, log[-3000:]
    finished, epoch, batch = resumed[0]
    assert int(epoch) == int(finished) + 1
    if moment == "mid-epoch":  # not behind the checkpoint the kill followed (a newer one may be written as it lands)
        assert (int(finished), int(batch) - 1) >= seen["step"], resumed

    straight = straight_run("ddp")
    a = torch.load(straight / "checkpoints" / "last.pth", weights_only=True)
    b = torch.load(logdir / "checkpoints" / "last.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3 and a["steps"] == b["steps"]
    for key, value in a["model_state_dict"].items():
        assert torch.equal(value, b["model_state_dict"][key]), key
    metrics = json.loads((logdir / "checkpoints" / "metrics.json").read_text())["values"]
    assert metrics == json.loads((straight / "checkpoints" / "metrics.json").read_text())["values"]


# ------------------------------------------------------------------------------ the handshake alone, in one process
KEYS = "batteries/init_distributed"


@pytest.fixture
def agent_store(monkeypatch):
    """A store like torchrun's (a TCPStore server that outlives the workers), in this process."""
    import torch.distributed as dist

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, multi_tenant=True)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    return server


def form(ranks, world_size, timeout_s=10.0, delays=None):
    """``_fresh_group_store`` of each of ``ranks``, each in a thread (started ``delays[rank]`` s late):
    the store or the exception, by rank."""
    import datetime
    import threading

    from batteries.distributed import _fresh_group_store

    results = {}

    def run(rank):
        time.sleep((delays or {}).get(rank, 0))
        try:
            results[rank] = _fresh_group_store(rank, world_size, datetime.timedelta(seconds=timeout_s))
        except Exception as error:  # noqa: BLE001 - returned to the test
            results[rank] = error

    threads = [threading.Thread(target=run, args=(rank,), daemon=True) for rank in ranks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout_s + 10)
    assert not any(thread.is_alive() for thread in threads), "the handshake hung"
    return results


@pytest.mark.parametrize("first", [0, 1, 2], ids=["rank0-first", "rank1-first", "rank2-first"])
def test_each_formation_gets_a_prefix_of_its_own_whatever_a_killed_attempt_left(agent_store, first):
    # what a killed attempt leaves: its ranks' tokens, rank 0's answers, acknowledgements and group keys
    agent_store.set(f"{KEYS}/mailbox/1", "stale-1")
    agent_store.set(f"{KEYS}/mailbox/2", "stale-2")
    agent_store.set(f"{KEYS}/answer/stale-1", f"{KEYS}/old")
    agent_store.set(f"{KEYS}/old/ack/1", "")
    agent_store.set(f"{KEYS}/old/group/x", "old")
    for _ in range(2):  # two formations in a row: the second must not reuse the first's keys either
        delays = {rank: 0.0 if rank == first else 0.2 for rank in range(3)}
        stores = form(range(3), 3, delays=delays)
        assert all(not isinstance(store, Exception) for store in stores.values()), stores
        assert not stores[0].check(["x"])  # nothing of the killed attempt under the new prefix
        stores[first].set("x", f"from rank {first}")
        assert {store.get("x") for store in stores.values()} == {f"from rank {first}".encode()}
        agent_store.set(f"{KEYS}/mailbox/2", "stale-again")  # rank 2 killed between the formations
    assert agent_store.get(f"{KEYS}/old/group/x") == b"old"


def test_a_rank_that_never_comes_is_a_timeout_error_that_names_it(agent_store):
    results = form([0, 1], 3, timeout_s=0.5)  # rank 2 never starts
    assert isinstance(results[0], TimeoutError) and "[2]" in str(results[0]) and "timeout_s" in str(results[0])
    assert not isinstance(results[1], Exception)  # it has its prefix; the group itself would time out later
    results = form([1], 2, timeout_s=0.5)  # no rank 0
    assert isinstance(results[1], TimeoutError) and "no answer from rank 0" in str(results[1])
