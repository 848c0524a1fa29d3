import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch
from spawn import alive, descendants, wait_gone
from torch.utils.data import Dataset, SequentialSampler, TensorDataset

from batteries import make_loader
from batteries.distributed import DistributedTrainSampler

LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal and /proc are Linux's")

# a dataset whose samples tell the worker that fetched them; scripts below start with it
PIDS = textwrap.dedent(
    """
    import json, os, signal, subprocess, sys, threading, time
    import torch
    from torch.utils.data import Dataset
    from batteries import StopOnSignal, make_loader

    class Pids(Dataset):
        def __len__(self):
            return 64
        def __getitem__(self, index):
            time.sleep(0.005)
            return torch.tensor(os.getpid())

    def pids(loader):
        return sorted({int(pid) for batch in loader for pid in batch})
    """
)


def script(main):
    """A script with the Pids dataset that runs ``main`` (source text) under ``if __name__ == "__main__":``."""
    return PIDS + 'if __name__ == "__main__":\n' + textwrap.indent(textwrap.dedent(main), "    ")


LOADING = script(
    """
    loader = make_loader(Pids(), 4, num_workers=2)
    while True:
        for index, _ in enumerate(loader):
            if index == 1:
                print("loading", flush=True)
    """
)


def start(tmp_path, source, name="script.py", **kwargs):
    """Run ``source`` as a script; after 90 s it is killed, so a test that waits for its output fails, not hangs."""
    script = tmp_path / name
    script.write_text(source)
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, **kwargs)
    watchdog = threading.Timer(90, process.kill)
    watchdog.daemon = True
    watchdog.start()
    return process


def kill_all(process, pids=()):
    for pid in alive([*pids, *descendants(process.pid)]):
        os.kill(pid, signal.SIGKILL)
    process.kill()
    process.wait()


@LINUX
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killing_the_run_leaves_no_worker_or_server_behind(tmp_path, sig):
    process = start(tmp_path, LOADING)
    try:
        assert process.stdout.readline().strip() == "loading"
        helpers = descendants(process.pid)
        assert len(helpers) == 2  # the two workers: no server, no resource tracker
        process.send_signal(sig)
        process.wait(timeout=30)
        assert wait_gone(helpers) == [], "processes of the killed run are still alive"
    finally:
        kill_all(process)


def test_workers_do_not_import_the_training_script_again(tmp_path):
    """Workers are forked, as DataLoader's: the script's heavy imports are not paid again every epoch."""
    marks = tmp_path / "imports.txt"
    source = f"open({str(marks)!r}, 'a').write(__name__ + '\\n')\n"
    source += script(
        """
        loader = make_loader(Pids(), 4, num_workers=2)
        print(len(pids(loader)), len(pids(loader)), flush=True)  # two epochs
        """
    )
    process = start(tmp_path, source)
    try:
        assert process.stdout.readline().split() == ["2", "2"]
        process.wait(timeout=30)
        assert marks.read_text().split() == ["__main__"]
    finally:
        kill_all(process)


@LINUX
def test_persistent_workers_and_an_uncaught_exception_end_the_run(tmp_path):
    source = script(
        """
        loader = make_loader(Pids(), 4, num_workers=2, persistent_workers=True)
        print(json.dumps(pids(loader)), flush=True)
        raise RuntimeError("a bug in the training script")
        """
    )
    process = start(tmp_path, source, stderr=subprocess.PIPE)
    try:
        workers = json.loads(process.stdout.readline())
        assert len(workers) == 2
        process.wait(timeout=10)  # it hung forever: the workers ignored multiprocessing's SIGTERM at exit
        assert process.returncode == 1 and "a bug in the training script" in process.stderr.read()
        assert wait_gone(workers, 5) == []
    finally:
        kill_all(process)


@LINUX
def test_a_killed_launcher_ends_the_run_and_its_workers(tmp_path):
    """torchrun-like: the launcher dies, StopOnSignal gets SIGTERM (parent death), the run stops and exits."""
    train = script(
        """
        stop = StopOnSignal()
        loader = make_loader(Pids(), 4, num_workers=2, persistent_workers=True)
        print(json.dumps(pids(loader)), flush=True)
        while True:
            for batch in loader:
                if stop():
                    sys.exit(stop.exit_code)
        """
    )
    (tmp_path / "train.py").write_text(train)
    launcher = "import subprocess, sys\n"
    launcher += f"child = subprocess.Popen([sys.executable, {str(tmp_path / 'train.py')!r}])\n"
    launcher += "print(child.pid, flush=True)\nchild.wait()\n"
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "test"}
    process = start(tmp_path, launcher, name="launcher.py", env=env)
    run = []  # the training process and its workers
    try:
        run.append(int(process.stdout.readline()))
        run += json.loads(process.stdout.readline())
        assert len(run) == 3 and alive(run) == run
        process.kill()
        process.wait()
        assert wait_gone(run) == [], "the run outlived its launcher"
    finally:
        kill_all(process, run)


@LINUX
def test_workers_started_from_a_thread_outlive_the_thread_and_die_with_the_process(tmp_path):
    source = script(
        """
        seen = []
        def first_epoch():
            global loader
            loader = make_loader(Pids(), 4, num_workers=2, persistent_workers=True)
            seen.append(pids(loader))
        thread = threading.Thread(target=first_epoch)
        thread.start()
        thread.join()
        time.sleep(0.5)  # the ended thread's parent-death signal has reached the workers
        print(json.dumps([seen[0], pids(loader)]), flush=True)
        time.sleep(60)
        """
    )
    process = start(tmp_path, source)
    try:
        first, second = json.loads(process.stdout.readline())
        assert len(first) == 2 and first == second  # the same workers, still serving
        process.kill()
        process.wait()
        assert wait_gone(first) == []
    finally:
        kill_all(process)


def first(batch):
    return batch[0]


class Starts(Dataset):
    """Each sample starts a program, reads its signal masks, ends it with terminate() and returns its status."""

    def __len__(self):
        return 1

    def __getitem__(self, index):
        program = subprocess.Popen(["sleep", "30"])
        try:
            with open(f"/proc/{program.pid}/status") as file:
                masks = {line[:6]: int(line.split()[1], 16) for line in file if line[:6] in ("SigIgn", "SigBlk")}
            program.terminate()
            return program.wait(timeout=5), masks["SigIgn"], masks["SigBlk"]
        finally:
            program.kill()


@LINUX
def test_programs_started_by_a_worker_have_default_signals(tmp_path):
    status, ignored, blocked = next(iter(make_loader(Starts(), 1, num_workers=1, collate_fn=first)))
    stop_bits = sum(1 << (sig - 1) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1))
    assert (ignored & stop_bits, blocked & stop_bits) == (0, 0)
    assert status == -signal.SIGTERM


class Pids(Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, index):
        return torch.tensor(os.getpid())


@LINUX
def test_workers_outlast_stop_signals_sent_to_them():
    loader = make_loader(Pids(), 2, num_workers=2, persistent_workers=True)
    workers = sorted({int(pid) for batch in loader for pid in batch})
    for pid in workers:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            os.kill(pid, sig)  # as SLURM or a Ctrl-C to the process group does
    time.sleep(0.3)
    assert sorted({int(pid) for batch in loader for pid in batch}) == workers


class Draws(Dataset):
    """Each sample draws from torch, random and NumPy, as augmentations in ``__getitem__`` do."""

    def __len__(self):
        return 22

    def __getitem__(self, index):
        return torch.tensor([index, torch.rand(()).item(), random.random(), np.random.rand()], dtype=torch.float64)


def epochs(loader, count, stop_after=None):
    """``count`` epochs of batches; with ``stop_after``, the state after that many batches of the last one."""
    batches = []
    for epoch in range(count):
        batches.append([])
        for batch in loader:
            batches[-1].append(batch)
            if epoch == count - 1 and len(batches[-1]) == stop_after:
                return batches, loader.state_dict()
    return batches, None


@pytest.mark.parametrize("persistent", [False, True])
def test_resumed_mid_epoch_draws_and_order_equal_the_straight_run(tmp_path, persistent):
    kwargs = {"shuffle": True, "seed": 7, "persistent_workers": persistent}
    straight, _ = epochs(make_loader(Draws(), 4, num_workers=2, **kwargs), 3)
    order = [torch.cat(epoch)[:, 0].tolist() for epoch in straight]
    assert len({tuple(o) for o in order}) == 3 and sorted(order[0]) == list(range(22))  # a new order every epoch
    assert not torch.equal(torch.cat(straight[0])[:, 1], torch.cat(straight[1])[:, 1])  # new draws every epoch
    _, state = epochs(make_loader(Draws(), 4, num_workers=2, **kwargs), 2, stop_after=2)
    assert (state["epoch"], state["batches_done"], state["samples_done"]) == (1, 2, 8)
    torch.save(state, tmp_path / "loader.pth")
    resumed = make_loader(Draws(), 4, num_workers=1, **kwargs)  # another worker count: same draws
    resumed.load_state_dict(torch.load(tmp_path / "loader.pth", weights_only=True))
    assert (resumed.epoch, resumed.batches_done, len(resumed)) == (1, 2, 6)
    rest, _ = epochs(resumed, 2)
    assert all(torch.equal(a, b) for a, b in zip(rest[0], straight[1][2:], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(rest[1], straight[2], strict=True))
    assert resumed.epoch == 3


def test_without_workers_the_main_process_rng_is_left_alone():
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    loaded = torch.cat(list(make_loader(Draws(), 5)))
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    assert torch.equal(loaded, torch.stack([Draws()[index] for index in range(22)]))


def test_the_position_counts_batches_handed_to_the_loop_not_prefetched():
    loader = make_loader(TensorDataset(torch.arange(40)), 4, num_workers=2, prefetch_factor=4)
    assert (loader.epoch, loader.state_dict()) == (0, {"epoch": 0, "batches_done": 0, "samples_done": 0,
                                                       "sampler": loader.sampler.state_dict()})  # fmt: skip
    seen = []
    for (batch,) in loader:
        seen.append(batch)
        time.sleep(0.05)  # the workers prefetch meanwhile
        assert loader.batches_done == len(seen) and loader.epoch == 0
        if len(seen) == 3:
            state = loader.state_dict()
            break
    assert state["batches_done"] == 3 and state["sampler"]["samples_consumed"] == 12
    rest = [batch for (batch,) in loader]  # a new iteration continues the epoch where the loop left it
    assert torch.cat(seen + rest).tolist() == list(range(40)) and loader.epoch == 1


def test_set_epoch_keeps_the_position_in_the_current_epoch_only():
    loader = make_loader(TensorDataset(torch.arange(12)), 3, shuffle=True, seed=1)
    loader.load_state_dict({"epoch": 4, "batches_done": 2})
    loader.set_epoch(4)  # a loop that calls set_epoch(epoch) on resuming keeps its place
    rest = [batch for (batch,) in loader]
    assert len(rest) == 2 and loader.epoch == 5 and loader.batches_done == 0
    loader.set_epoch(5)
    assert len(list(loader)) == 4
    loader.load_state_dict({"epoch": 6, "batches_done": 4})  # saved at an epoch's last batch
    assert list(loader) == [] and loader.epoch == 7  # its rest is empty: the loop goes on to validation
    loader.set_epoch(2)
    order = torch.cat([batch for (batch,) in loader]).tolist()
    sampler = DistributedTrainSampler(range(12), seed=1)
    sampler.set_epoch(2)
    assert order == list(sampler)


def test_a_given_sampler_is_kept_in_step_with_a_loop_that_counts_samples_itself():
    """The examples' loop: it calls sampler.set_epoch and adds len(batch) to samples_consumed."""
    dataset = TensorDataset(torch.arange(10))
    sampler = DistributedTrainSampler(dataset, seed=5)
    loader = make_loader(dataset, 4, sampler=sampler)
    straight, saved = [], None
    for epoch in (1, 2):
        sampler.set_epoch(epoch)
        for (batch,) in loader:
            sampler.samples_consumed += len(batch)
            straight.append(batch.tolist())
            if epoch == 2 and sampler.samples_consumed == 4:
                saved = sampler.state_dict()
        assert sampler.samples_consumed == 10 and loader.epoch == epoch + 1
    resumed_sampler = DistributedTrainSampler(dataset)
    resumed_sampler.load_state_dict(saved)
    resumed_sampler.set_epoch(2)
    resumed = make_loader(dataset, 4, sampler=resumed_sampler)
    assert (resumed.state_dict()["epoch"], resumed.state_dict()["batches_done"]) == (2, 1)
    assert [batch.tolist() for (batch,) in resumed] == straight[4:]


def test_ranks_count_their_own_batches(monkeypatch):
    parts = []
    for rank in range(2):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", str(rank))
        loader = make_loader(TensorDataset(torch.arange(9)), 2, shuffle=True, seed=4)
        parts.append([batch.tolist() for (batch,) in loader])
        assert loader.state_dict()["epoch"] == 1 and len(loader) == 3
    assert [len(part) for part in parts] == [3, 3]
    assert set(sum(parts[0] + parts[1], [])) == set(range(9))


def test_a_mid_epoch_state_needs_a_sampler_that_skips():
    loader = make_loader(TensorDataset(torch.arange(6)), 2, sampler=SequentialSampler(range(6)))
    loader.load_state_dict({"epoch": 3, "batches_done": 0})
    assert loader.epoch == 3 and len(list(loader)) == 3
    with pytest.raises(ValueError, match="cannot skip"):
        loader.load_state_dict({"epoch": 3, "batches_done": 1})
    with pytest.raises(KeyError, match="batches_done"):
        loader.load_state_dict({"epoch": 3})


def test_loader_draws_nothing_from_the_global_rng_and_repeats():
    dataset = TensorDataset(torch.arange(20.0))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    orders = []
    for _ in range(2):
        sampler = DistributedTrainSampler(dataset, seed=3)
        loader = make_loader(dataset, 6, sampler=sampler, seed=3)
        orders.append([batch[0].tolist() for batch in loader])
    assert orders[0] == orders[1] and sorted(sum(orders[0], [])) == list(range(20))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"batch_size": 0}, ValueError),
        ({"num_workers": 1.0}, TypeError),
        ({"shuffle": 1}, TypeError),
        ({"sampler": SequentialSampler(range(2)), "shuffle": True}, ValueError),
    ],
)
def test_bad_arguments(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs)) if "sampler" not in kwargs else "shuffle"):
        make_loader(TensorDataset(torch.zeros(2)), **{"batch_size": 1, **kwargs})
