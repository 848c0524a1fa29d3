"""The FSDP2 example as a user runs it (torchrun, gloo on the CPU): training, sharded checkpoints, a
rank killed during a save, resumes with 1, 2 and 3 processes, and the README's consolidation."""

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from spawn import descendants, free_port

from batteries import _dcp, make_loader

ROOT = Path(__file__).resolve().parents[1]
FSDP = ROOT / "examples" / "fsdp" / "experiment.py"
ARGS = ["--device", "cpu", "--batch-size", "128", "--epochs", "2", "--save-every-steps", "2", "--save-n-best", "1"]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find torchrun's workers")


def command(processes, *args):
    """``python examples/fsdp/experiment.py`` (1 process) or under torchrun."""
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                                          "--master_port", str(free_port())]  # fmt: skip
    return [sys.executable, *launcher, str(FSDP), *ARGS, *map(str, args)]


def kill_tree(process):
    for pid in [process.pid, *descendants(process.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.communicate()


def run(processes, *args, timeout=240):
    process = subprocess.Popen(command(processes, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=ENV)  # fmt: skip
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(process)
        raise
    assert process.returncode == 0, stderr[-3000:]
    return stderr


def epochs_and_weights(logdir):
    """The recorded scores and the full weights of ``last``, read back from every rank's shards."""
    checkpoints = logdir / "checkpoints"
    metadata = _dcp.read_metadata(checkpoints / "last")
    last = _dcp.load_entries(checkpoints / "last", metadata, keys=_dcp.top_level_keys(metadata))
    return json.loads((checkpoints / "metrics.json").read_text())["values"], last["model_state_dict"]


def visible(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


@pytest.fixture
def straight(made_once):
    """The uninterrupted 2-process run, once per session (read it, or copy it)."""
    return made_once("straight-fsdp", lambda logdir: run(2, "--logdir", logdir))


def test_two_processes_train_and_the_consolidated_best_loads_with_weights_only(straight, tmp_path):
    checkpoints = straight / "checkpoints"
    log = (straight / "train.log").read_text()
    assert "World size 2, backend gloo" in log and "best re-evaluated" in log
    names = visible(checkpoints)
    values = json.loads((checkpoints / "metrics.json").read_text())["values"]
    best = max(values, key=lambda record: (record["accuracy"], record["epoch"]))
    assert os.readlink(checkpoints / "best") == f"exp_{best['epoch']}" and os.readlink(checkpoints / "last") == "exp_2"
    assert re.fullmatch(r"step\.\d+", os.readlink(checkpoints / "step"))
    assert names == sorted({"best", "last", "step", "metrics.json", f"exp_{best['epoch']}", "exp_2",
                            os.readlink(checkpoints / "step")})  # fmt: skip
    assert sorted(os.listdir(checkpoints / "last")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]

    # examples/fsdp/README.md: one file for inference, loaded with weights_only=True into a plain model
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoints / "best", tmp_path / "best.pth")
    state = torch.load(tmp_path / "best.pth", weights_only=True)
    spec = importlib.util.spec_from_file_location("example_fsdp", FSDP)
    experiment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiment)
    model = experiment.Net()
    model.load_state_dict(state["model_state_dict"])
    _, valid_dataset = experiment.get_datasets()
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in make_loader(valid_dataset, 128):
            correct += (model(x).argmax(1) == y).sum().item()
    assert correct / len(valid_dataset) == best["accuracy"]  # the recorded, distributed accuracy exactly


def test_a_rank_killed_during_a_sharded_save_leaves_loadable_checkpoints_and_the_resume_is_bitwise(straight, tmp_path):
    logdir, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    process = subprocess.Popen(command(2, "--logdir", logdir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=ENV)  # fmt: skip
    killed = None
    try:
        deadline = time.monotonic() + 180
        while killed is None and time.monotonic() < deadline and process.poll() is None:
            saving = checkpoints.is_dir() and any(".tmp-" in entry.name for entry in os.scandir(checkpoints))
            if saving and (checkpoints / "last").is_symlink():  # a save after epoch 1 is being written
                workers = {int(Path(f"/proc/{pid}/environ").read_bytes().split(b"RANK=")[1].split(b"\0")[0]): pid
                           for pid in descendants(process.pid)}  # fmt: skip
                os.kill(workers[0], signal.SIGKILL)  # rank 0: it also renames, links and records
                killed = workers[0]
            time.sleep(0.002)
        process.wait(timeout=90)  # torchrun stops the other rank
    finally:
        kill_tree(process)
    assert killed is not None, "the run ended before a save could be caught"
    assert process.returncode != 0
    for name in visible(checkpoints):
        if name != "metrics.json":
            metadata = _dcp.read_metadata(checkpoints / name)
            _dcp.load_entries(checkpoints / name, metadata, keys=_dcp.top_level_keys(metadata))  # every shard
    run(2, "--logdir", logdir, "--resume", "auto")
    assert "Resumed from" in (logdir / "train.log").read_text()
    values, weights = epochs_and_weights(logdir)
    straight_values, straight_weights = epochs_and_weights(straight)
    assert values == straight_values
    for key, value in straight_weights.items():
        assert torch.equal(value, weights[key]), key
    assert not [entry for entry in checkpoints.iterdir() if entry.name.startswith(".")]  # the leftovers removed


@pytest.mark.parametrize("processes", [1, 3])
def test_a_resume_with_another_number_of_processes_reshards_and_reseeds(straight, tmp_path, processes):
    logdir = tmp_path / "run"
    shutil.copytree(straight, logdir, symlinks=True)
    run(processes, "--logdir", logdir, "--resume", "auto", "--epochs", "3")
    log = (logdir / "train.log").read_text().split("Arguments:")[-1]
    assert f"Saved by 2 processes, {processes} now: RNG streams reseeded" in log
    assert re.search(r"Resumed from '.*' \(epoch 2 finished\); continuing at epoch 3, batch 1\n", log)
    values, _ = epochs_and_weights(logdir)
    assert [record["epoch"] for record in values] == [1, 2, 3]
    if processes == 3:
        assert sorted(os.listdir(logdir / "checkpoints" / "last")) == [
            ".metadata",
            "__0_0.distcp",
            "__1_0.distcp",
            "__2_0.distcp",
        ]
