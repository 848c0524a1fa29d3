"""The examples run as a user runs them: in a subprocess, on CPU, with a temporary logdir."""

import argparse
import contextlib
import json
import math
import os
import random
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from spawn import descendants, free_port, wait_gone

from batteries import load_checkpoint, make_loader

ROOT = Path(__file__).resolve().parents[1]
DEVICE = ROOT / "examples" / "device" / "experiment.py"
FAST = ["--device", "cpu", "--batch-size", "128"]


def run(args, timeout=240):
    """Run ``python args...``; on a timeout kill it and every process below it, then raise."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen(
        [sys.executable, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(process)  # torchrun's workers too, not only the agent
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def epochs_recorded(logdir):
    return [record["epoch"] for record in json.loads((logdir / "checkpoints" / "metrics.json").read_text())["values"]]


def flag_error(capsys, *args):
    """The device example's main(args) in this process, where it must exit at its flags: (status, stderr lines)."""
    main = runpy.run_path(str(DEVICE))["main"]  # not as __main__: nothing runs at import
    with pytest.raises(SystemExit) as exited:
        main(list(map(str, args)))
    return exited.value.code, capsys.readouterr().err.strip().splitlines()


def test_device_example_one_epoch(tmp_path, capsys):
    logdir = tmp_path / "run"
    result = run([DEVICE, *FAST, "--epochs", "1", "--logdir", logdir])
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in logdir.iterdir()) == ["checkpoints", "tensorboard", "train.log"]
    assert sorted(p.name for p in (logdir / "checkpoints").iterdir()) == [
        "best.pth",
        "exp_1.pth",
        "last.pth",
        "metrics.json",
    ]
    assert len(list((logdir / "tensorboard").iterdir())) == 1
    log = (logdir / "train.log").read_text()
    assert "epoch 1/1: train loss" in log and "best valid accuracy" in log
    assert "tensorboard --logdir" in result.stderr and "pip install tensorboard" in result.stderr
    checkpoint = torch.load(logdir / "checkpoints" / "best.pth", weights_only=True)
    assert checkpoint["epoch"] == 1 and {"rng_states", "scaler_state_dict", "steps", "loader_state_dict"} <= set(
        checkpoint
    )

    # the logdir now holds a run: it is neither overwritten nor touched without --resume
    before = {p: p.stat().st_mtime_ns for p in logdir.rglob("*")}
    status, lines = flag_error(capsys, *FAST, "--epochs", "1", "--logdir", logdir)
    assert status == 2 and len(lines) == 1 and "--resume auto" in lines[0] and "delete it to start over" in lines[0]
    assert {p: p.stat().st_mtime_ns for p in logdir.rglob("*")} == before


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--device", "warp9"], "--device"),
        (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device"),
        (["--resume", "/no/such/file.pth"], "--resume"),
        (["--epochs", "-3"], "--epochs"),
        (["--epochs", "many"], "--epochs"),
        (["--seed", "-1"], "--seed"),
        (["--seed", str(2**32)], "--seed"),
        (["--lr", "0"], "--lr"),
        (["--stages", "head", "all", "head"], "--stages"),
    ],
)
def test_bad_flags_one_line_exit_2_nothing_written(tmp_path, capsys, args, flag):
    """In this process (the script's main() with these flags): exit 2 before anything is written."""
    logdir = tmp_path / "run"
    if args[:2] == ["--device", "cuda:99"]:
        pytest.skip("a CUDA machine: cuda:99 may be reported later")
    status, lines = flag_error(capsys, *args, "--logdir", logdir)
    assert status == 2 and len(lines) == 1 and flag in lines[0]
    assert not logdir.exists()


OTHER_STAGES = [("metrics.json", ["head", "all"]), ("head", ["all"]), ("mid", ["head", "all"])]


@pytest.mark.parametrize(("held", "stages"), OTHER_STAGES)
def test_resume_auto_with_other_stages_than_the_run_had_is_a_flag_error(tmp_path, capsys, held, stages):
    """A run of one stage keeps its files in checkpoints/, one of several a folder per stage: --resume auto with
    other --stages would train a new run beside the old one."""
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / held).mkdir() if "." not in held else (checkpoints / held).write_text("{}")
    status, lines = flag_error(capsys, "--stages", *stages, "--resume", "auto", "--logdir", tmp_path / "run")
    assert status == 2 and len(lines) == 1 and "holds a run of other --stages" in lines[0]
    assert [p.name for p in checkpoints.iterdir()] == [held] and not (tmp_path / "run" / "train.log").exists()


def test_stage_flags_refuse_what_is_not_this_runs_and_pass_hidden_files(tmp_path, capsys):
    """checkpoints/ a file; a --resume PATH in a folder named as the last stage but of another run: exit 2, one
    line. A hidden file (a .DS_Store) beside the stage folders is no stage."""
    parse_args, other, run_dir = runpy.run_path(str(DEVICE))["parse_args"], tmp_path / "other", tmp_path / "run"
    (other / "checkpoints" / "all").mkdir(parents=True)
    (other / "checkpoints" / "all" / "exp_1.pth").write_bytes(b"")
    (tmp_path / "file" / "checkpoints").parent.mkdir()
    (tmp_path / "file" / "checkpoints").write_text("")
    for argv, flag in [
        (["--logdir", str(tmp_path / "file"), "--resume", "auto"], "--logdir"),
        (["--logdir", str(run_dir), "--stages", "head", "all", "--resume", str(other / "checkpoints/all/exp_1.pth")],
         "--resume"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as exited:
            parse_args(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert exited.value.code == 2 and len(lines) == 1 and flag in lines[0], lines
    (other / "checkpoints" / ".DS_Store").write_text("")
    args = parse_args(["--logdir", str(other), "--stages", "head", "all", "--resume", "auto"])
    assert args.sources == ["auto", "auto"]


def test_logdir_that_is_a_file_is_a_flag_error(tmp_path, capsys):
    logdir = tmp_path / "run"
    logdir.write_text("not a folder")
    status, lines = flag_error(capsys, "--logdir", logdir)
    assert status == 2 and len(lines) == 1 and "--logdir" in lines[0]
    assert logdir.read_text() == "not a folder"


def test_resume_with_more_epochs_follows_the_longer_schedule(tmp_path, straight_run):
    logdir = tmp_path / "run"
    shutil.copytree(straight_run("device"), logdir)  # 3 epochs
    result = run(launch("device", "--logdir", logdir, "--resume", "auto", "--epochs", "5"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert epochs_recorded(logdir) == [1, 2, 3, 4, 5]
    state = torch.load(logdir / "checkpoints" / "last.pth", weights_only=True)
    # the last of 5 * 12 steps on the cosine of 5 epochs (on the old one of 3 epochs it would be 0)
    total = 5 * 12
    expected = 3e-3 * 0.5 * (1 + math.cos(math.pi * (total - 1) / total))
    assert state["steps"] == total
    assert state["optimizer_state_dict"]["param_groups"][0]["lr"] == pytest.approx(expected, rel=1e-12)


def test_a_copy_with_plain_tensor_datasets_and_another_main_metric_trains(tmp_path):
    """A new user's copy: get_datasets returns plain TensorDatasets, the best is the lowest loss; nothing
    else of the example is edited."""
    source = DEVICE.read_text()
    body = source[source.index("def get_datasets") : source.index("def augment")]
    replacement = """def get_datasets() -> tuple[Dataset, Dataset]:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(300, 1, 8, 8, generator=generator), torch.randint(0, 10, (300,), generator=generator)
    return TensorDataset(x[:240], y[:240]), TensorDataset(x[240:], y[240:])


"""
    copy = source.replace(body, replacement)
    copy = copy.replace('MAIN_METRIC = "accuracy"', 'MAIN_METRIC = "loss"').replace(
        "MINIMIZE_METRIC = False", "MINIMIZE_METRIC = True"
    )
    script = tmp_path / "train.py"
    script.write_text(copy)
    logdir = tmp_path / "run"
    result = run([script, *FAST, "--epochs", "4", "--logdir", logdir])
    assert result.returncode == 0, result.stderr[-2000:]
    values = json.loads((logdir / "checkpoints" / "metrics.json").read_text())["values"]
    lowest = min(values, key=lambda record: (record["loss"], -record["epoch"]))
    assert torch.load(logdir / "checkpoints" / "best.pth", weights_only=True)["epoch"] == lowest["epoch"]
    assert "best valid loss" in (logdir / "train.log").read_text()


# ------------------------------------------------------------------------------ dp and ddp
DP = ROOT / "examples" / "dp" / "experiment.py"
DDP = ROOT / "examples" / "ddp" / "experiment.py"


def load_example(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"example_{path.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_one_run(logdir):
    """Exactly one metrics.json, one log file and one TensorBoard run: only rank 0 wrote."""
    assert sorted(p.name for p in logdir.iterdir()) == ["checkpoints", "tensorboard", "train.log"]
    assert [p.name for p in logdir.rglob("*.json")] == ["metrics.json"]
    assert len(list((logdir / "tensorboard").iterdir())) == 1
    assert len(list(logdir.rglob("*.log"))) == 1


def single_process_accuracy(path):
    """A plain evaluation of ``path`` on the whole validation set, in this process."""
    example = load_example(DDP)
    _, valid_dataset = example.get_datasets()
    model = example.Net()
    load_checkpoint(path, model, verbose=False)
    args = argparse.Namespace(device=torch.device("cpu"), amp_dtype=None)
    return example.valid_fn(model, make_loader(valid_dataset, 128), args, all_ranks=False)


def test_dp_example_one_epoch(tmp_path):
    logdir = tmp_path / "run"
    result = run([DP, *FAST, "--epochs", "1", "--logdir", logdir])
    assert result.returncode == 0, result.stderr
    assert "No GPU: training on the CPU" in result.stderr or torch.cuda.is_available()
    assert_one_run(logdir)


TORCHRUN = ["-m", "torch.distributed.run"]  # `torchrun`; run() puts sys.executable in front
LAUNCH = ["-m", "torch.distributed.launch"]


def test_ddp_example_under_the_original_launcher_reports_exact_accuracy_and_resumes_at_another_batch_size(tmp_path):
    """`python -m torch.distributed.launch --nproc_per_node=2`, as the original README ran it. (torchrun: the
    two-nodes test below; plain python: test_a_resumed_run_that_had_stopped_early_says_so.) Its step.pth,
    3 batches of 128 into epoch 2, resumes at batch size 64 with every rank's samples trained once."""
    logdir = tmp_path / "run"

    def command():  # a port of its own for each run
        return [*LAUNCH, "--nproc_per_node=2", "--master_port", free_port(), DDP, "--device", "cpu", "--epochs", "2"]

    result = run([*command(), "--batch-size", "128", "--save-every-steps", "9", "--logdir", logdir])  # 6 steps/epoch
    assert result.returncode == 0, result.stderr[-3000:]
    assert_exact_single_process_accuracy(logdir, world_size=2)
    assert_resumes_at_batch_size_64(command(), logdir, world_size=2)


def assert_exact_single_process_accuracy(logdir, world_size):
    """One run's files, and the best epoch's recorded accuracy is a plain evaluation's of best.pth."""
    assert f"World size {world_size}" in (logdir / "train.log").read_text()
    assert_one_run(logdir)
    best = max(
        json.loads((logdir / "checkpoints" / "metrics.json").read_text())["values"],
        key=lambda r: (r["accuracy"], r["epoch"]),
    )
    assert single_process_accuracy(logdir / "checkpoints" / "best.pth")["accuracy"] == best["accuracy"]


def test_ddp_example_two_nodes_c10d_rendezvous_with_gradient_accumulation_reports_exact_accuracy(tmp_path):
    logdir = tmp_path / "run"
    endpoint = f"127.0.0.1:{free_port()}"
    command = [
        sys.executable,
        *TORCHRUN,
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        "--rdzv-id=two-nodes",
        DDP,
        *FAST,
        "--epochs",
        "1",
        "--accum-steps",
        "2",
        "--logdir",
        logdir,
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    nodes = [
        subprocess.Popen(list(map(str, command)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for _ in range(2)
    ]
    try:
        outputs = [node.communicate(timeout=240)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert_exact_single_process_accuracy(logdir, world_size=2)


def kill_tree(process):
    """``kill -9`` ``process`` and every process below it, then reap it."""
    for pid in [process.pid, *descendants(process.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.communicate()


def kill_9_when(command, ready, timeout_s=180):
    """Start ``command``; ``kill -9`` it and every process below it as soon as ``ready()`` holds."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen(
        [sys.executable, *map(str, command)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and process.poll() is None and not ready():
            time.sleep(0.01)
    finally:
        kill_tree(process)
    assert process.returncode == -signal.SIGKILL, "the run ended before it was killed"


def position(path):
    """(last finished epoch, batches of the next epoch done) of a checkpoint, or None."""
    try:
        state = torch.load(path, weights_only=True)
    except Exception:  # not there yet (or being replaced right now)
        return None
    return state["epoch"], state["loader_state_dict"]["batches_done"]


RESUME_ARGS = ["--device", "cpu", "--batch-size", "128", "--num-workers", "2", "--epochs", "3", "--save-n-best", "2"]
LAUNCHERS = {"device": [DEVICE], "ddp": [*TORCHRUN, "--nproc_per_node=2", "--master_port", "PORT", DDP]}


def launch(example, *args):
    command = [str(free_port()) if part == "PORT" else part for part in LAUNCHERS[example]]
    return [*command, *RESUME_ARGS, *args]


@pytest.fixture
def straight_run(made_once):
    """The uninterrupted run of an example with these flags, once per session (read it, or copy it). Without
    DataLoader workers: they change nothing, which each bitwise comparison with a run that has them checks too."""

    def get(example, *extra):
        def make(logdir):
            result = run(launch(example, "--logdir", logdir, *extra, "--num-workers", "0"))
            assert result.returncode == 0, result.stderr[-3000:]

        return made_once("straight-" + "-".join([example, *extra]).replace("--", ""), make)

    return get


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the DataLoader workers")
def test_kill_9_and_resume_is_bitwise_the_uninterrupted_run(tmp_path, straight_run):
    """Dropout, shuffling, random augmentation and 2 DataLoader workers; the training process alone gets
    ``kill -9`` (as a scheduler or `kill` sends it) while its workers run, after epoch 1: the workers end with
    it; then --resume auto from last.pth. (Killed after a mid-epoch step.pth: the two-stages test.)"""
    example, logdir = "device", tmp_path / "run"
    checkpoints = logdir / "checkpoints"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, *launch(example, "--logdir", logdir)]
    process = subprocess.Popen(list(map(str, command)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 120
        while position(checkpoints / "last.pth") is None or len(helpers := descendants(process.pid)) < 2:
            assert time.monotonic() < deadline and process.poll() is None, "no DataLoader workers after epoch 1"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        assert wait_gone(helpers, 2.5) == []  # at once (the parent-death signal), not at torch's 5 s watchdog
    finally:
        kill_tree(process)
    result = run(launch(example, "--logdir", logdir, "--resume", "auto"))
    assert result.returncode == 0, result.stderr[-3000:]
    log = (logdir / "train.log").read_text()
    resumed_from = re.search(r"Resumed from '.*' \(epoch (\d+) finished\); continuing at epoch (\d+), batch (\d+)", log)
    assert resumed_from, log[-2000:]
    finished, epoch, batch = resumed_from.groups()
    assert int(epoch) == int(finished) + 1

    straight = straight_run(example)
    a = torch.load(straight / "checkpoints" / "last.pth", weights_only=True)
    b = torch.load(checkpoints / "last.pth", weights_only=True)
    for key, value in a["model_state_dict"].items():
        assert torch.equal(value, b["model_state_dict"][key]), key
    values = json.loads((checkpoints / "metrics.json").read_text())["values"]
    assert values == json.loads((straight / "checkpoints" / "metrics.json").read_text())["values"]
    ranked = sorted(values, key=lambda r: (-r["accuracy"], -r["epoch"]))
    numbered = sorted(int(p.stem.split("_")[1]) for p in checkpoints.glob("exp_*.pth"))
    assert numbered == sorted(r["epoch"] for r in ranked[:2])
    assert torch.load(checkpoints / "best.pth", weights_only=True)["epoch"] == ranked[0]["epoch"]


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the DataLoader workers")
def test_two_stages_killed_in_the_second_resume_bitwise_as_the_uninterrupted_run(tmp_path, straight_run, capsys):
    """--stages head all: a folder per stage, the second from the first's best.pth; kill -9 part way into the
    second stage, then --resume auto skips the finished first stage and continues the second from step.pth."""
    logdir, stages = tmp_path / "run", ["--stages", "head", "all", "--save-every-steps", "2"]
    second = logdir / "checkpoints" / "all"

    def ready():
        return (position(second / "step.pth") or (0, 0))[1] > 0  # a mid-epoch step.pth of the second stage

    kill_9_when(launch("device", "--logdir", logdir, *stages), ready)
    result = run(launch("device", "--logdir", logdir, "--resume", "auto", *stages))
    assert result.returncode == 0, result.stderr[-3000:]
    log = (logdir / "train.log").read_text().split("Arguments:")[-1]
    assert "(epoch 3 finished); its epochs are done\n" in log
    assert re.search(r"Resumed from '.*/all' \(epoch \d finished\); continuing at epoch \d, batch ([2-9]|1\d)\n", log)
    straight = straight_run("device", *stages)
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["all", "head"]
    assert sorted(p.name for p in (straight / "tensorboard").iterdir()) == ["all", "head"]
    for stage in ("head", "all"):
        a, b = (torch.load(logs / "checkpoints" / stage / "last.pth", weights_only=True) for logs in (straight, logdir))
        assert a["steps"] == b["steps"] and a["epoch"] == b["epoch"] == 3
        for key, value in a["model_state_dict"].items():
            assert torch.equal(value, b["model_state_dict"][key]), (stage, key)
        history = [
            json.loads((logs / "checkpoints" / stage / "metrics.json").read_text())["values"]
            for logs in (straight, logdir)
        ]
        assert history[0] == history[1]
    # the first stage trained the head alone (the convolutions kept their initial weights)
    head = {name: torch.load(straight / "checkpoints" / "head" / name, weights_only=True)["model_state_dict"]
            for name in ("best.pth", "last.pth")}  # fmt: skip
    assert torch.equal(head["best.pth"]["features.0.0.weight"], head["last.pth"]["features.0.0.weight"])
    # a path continues the last stage: one of the first stage would leave the second's history behind: refused
    status, lines = flag_error(capsys, "--logdir", logdir, "--resume", logdir / "checkpoints/head/exp_2.pth", *stages)
    assert status == 2 and len(lines) == 1 and "(of the last stage)" in lines[0]
    # more epochs: the first stage, which the second follows, is done; the second trains on from its epoch 3
    result = run(launch("device", "--logdir", logdir, "--resume", "auto", *stages, "--epochs", "4"))
    assert result.returncode == 0, result.stderr[-3000:]
    head, every = (json.loads((logdir / "checkpoints" / s / "metrics.json").read_text()) for s in ("head", "all"))
    assert [r["epoch"] for r in head["values"]] == [1, 2, 3] and [r["epoch"] for r in every["values"]] == [1, 2, 3, 4]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ddp_example_on_gpus_with_nccl(tmp_path):
    world_size = min(torch.cuda.device_count(), 2)
    logdir = tmp_path / "run"
    command = [*TORCHRUN, f"--nproc_per_node={world_size}", "--master_port", str(free_port()), DDP]
    result = run([*command, "--device", "cuda", "--epochs", "2", "--amp", "--logdir", logdir])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"World size {world_size}, backend nccl" in (logdir / "train.log").read_text()
    assert_one_run(logdir)


# ------------------------------------------------------------------------------ bugs found in use
def test_resume_auto_after_a_branch_never_takes_the_abandoned_runs_step_checkpoint(two_epochs):
    logdir, checkpoints = two_epochs, two_epochs / "checkpoints"
    assert position(checkpoints / "step.pth")[0] == 1  # the first run's mid-epoch-2 checkpoint, after epoch 1
    # branch from epoch 1 (stopped right away here: it too has finished epoch 1), then continue it with --resume auto
    branch = run([DEVICE, *FAST, "--epochs", "1", "--resume", checkpoints / "exp_1.pth", "--logdir", logdir])
    assert branch.returncode == 0, branch.stderr[-2000:]
    result = run([DEVICE, *FAST, "--epochs", "2", "--resume", "auto", "--logdir", logdir])
    assert result.returncode == 0, result.stderr[-2000:]
    log = (logdir / "train.log").read_text()
    assert log.count("Resumed from") == 2 and "(epoch 1 finished); continuing at epoch 2, batch 1\n" in log
    assert epochs_recorded(logdir) == [1, 2]


def test_a_resumed_run_that_had_stopped_early_says_so(tmp_path):
    logdir = tmp_path / "run"
    args = [DDP, *FAST, "--epochs", "6", "--patience", "0", "--lr", "1e-9", "--logdir", logdir]
    assert run(args).returncode == 0  # the ddp example under plain python: one process
    stopped_at = epochs_recorded(logdir)[-1]
    assert stopped_at < 6 and "Early stop" in (logdir / "train.log").read_text()
    assert_exact_single_process_accuracy(logdir, world_size=1)
    result = run([*args, "--resume", "auto"])
    assert result.returncode == 0, result.stderr[-2000:]
    resumed = (logdir / "train.log").read_text().split("Resumed from")[1]
    assert "it had stopped early" in resumed and "continuing at" not in resumed
    assert epochs_recorded(logdir)[-1] == stopped_at


@pytest.fixture
def two_epochs(made_once, tmp_path):
    """A copy of the device example's run of 2 epochs at batch size 128 (12 steps each), with a step.pth written
    at step 15, 3 batches into epoch 2; the run is made once per session."""

    def make(logdir):
        result = run([DEVICE, *FAST, "--epochs", "2", "--save-every-steps", "15", "--logdir", logdir])
        assert result.returncode == 0, result.stderr[-2000:]

    return Path(shutil.copytree(made_once("device-2-epochs", make), tmp_path / "run"))


def test_mid_epoch_resume_with_another_batch_size_trains_every_sample_once(two_epochs):
    """Resume positions count samples: a step checkpoint taken at batch size 128 resumes at 64 exactly.
    (The ddp example: the original launcher's test.)"""
    assert_resumes_at_batch_size_64([DEVICE, "--device", "cpu", "--epochs", "2"], two_epochs, world_size=1)


def assert_resumes_at_batch_size_64(command, logdir, world_size):
    """``command``'s run in ``logdir`` left a step.pth 3 batches of 128 into epoch 2: resumed from it at batch
    size 64, each rank trains each of its samples of epoch 2 once."""
    checkpoints = logdir / "checkpoints"
    step = torch.load(checkpoints / "step.pth", weights_only=True)
    assert step["epoch"] == 1 and step["loader_state_dict"]["samples_done"] == 3 * 128
    result = run([*command, "--batch-size", "64", "--resume", checkpoints / "step.pth", "--logdir", logdir])
    assert result.returncode == 0, result.stderr[-2000:]
    last = torch.load(checkpoints / "last.pth", weights_only=True)
    assert last["epoch"] == 2
    assert (last["loader_state_dict"]["epoch"], last["loader_state_dict"]["samples_done"]) == (3, 0)
    meters = last["meters"] if world_size > 1 else [last["meters"]]
    share = math.ceil(1437 / world_size)  # the training samples of each rank per epoch
    assert [rank["loss"]["count"] for rank in meters] == [share] * world_size  # none skipped, none twice
    assert "continuing at epoch 2, batch 7" in (logdir / "train.log").read_text()  # 384 samples = 6 of 64


@pytest.mark.parametrize("example", ["ddp", "fsdp"])
def test_an_empty_rank_variable_is_no_rank(tmp_path, monkeypatch, example):
    """`RANK=` left empty in a shell: one process, rank 0, as the library reads it."""
    monkeypatch.setenv("RANK", "")
    parse_args = load_example(ROOT / "examples" / example / "experiment.py").parse_args
    assert parse_args(["--logdir", str(tmp_path / "run")]).epochs > 0
    with pytest.raises(SystemExit):
        parse_args(["--epochs", "many"])


def test_a_bad_flag_under_torchrun_is_reported_once_also_when_rank_0_comes_last(tmp_path):
    """torchrun stops every worker as soon as one exits: rank 1, faster, must not get rank 0 stopped unheard."""
    source = DDP.read_text()
    start = source.index('"""', 3) + 3  # after the docstring: a copy whose rank 0 starts 2 s later
    script = tmp_path / "experiment.py"
    script.write_text(f'{source[:start]}\nimport os, time\ntime.sleep(2 * (os.environ["RANK"] == "0")){source[start:]}')
    command = [arg.replace("PORT", str(free_port())) for arg in map(str, LAUNCHERS["ddp"][:-1])]
    result = run([*command, script, "--epochs", "many", "--logdir", tmp_path / "run"], timeout=120)
    assert result.returncode != 0  # and rank 1 was stopped in its wait (10 s): had it run out, it too would report
    assert result.stderr.count("error: argument --epochs: invalid int value: 'many'") == 1, result.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def assert_same_training(logdir, straight):
    """The final weights and every recorded score equal the uninterrupted run's, bit for bit."""
    a = torch.load(straight / "checkpoints" / "last.pth", weights_only=True)
    b = torch.load(logdir / "checkpoints" / "last.pth", weights_only=True)
    for key, value in a["model_state_dict"].items():
        assert torch.equal(value, b["model_state_dict"][key]), key
    assert epochs_recorded(logdir) == epochs_recorded(straight)
    values = json.loads((logdir / "checkpoints" / "metrics.json").read_text())["values"]
    assert values == json.loads((straight / "checkpoints" / "metrics.json").read_text())["values"]


STOPPED = re.compile(r"stopped by (SIG\w+) at epoch (\d+), batch (\d+); continue with --resume auto")
# (signal, to the whole process group as a terminal's Ctrl-C does, the status expected after the stop)
STOPS = {
    "device": [(signal.SIGTERM, False, 143), (signal.SIGINT, True, 130), (signal.SIGUSR1, False, 138)],
    # SIGTERM to torchrun's agent: it forwards it to its workers, which stop and exit 143; the agent
    # then re-raises the signal as its own SignalException (a traceback of torchrun's) and exits 1
    # one (each torchrun run costs): stops of resumed runs are the device example's; saves after a mid-epoch
    # resume of the ddp example (every rank's meters gathered again): test_elastic's mid-epoch case
    "ddp": [(signal.SIGTERM, False, 1)],
}  # fmt: skip


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find a launcher's workers")
@pytest.mark.parametrize("example", ["device", "ddp"])
def test_signals_at_random_instants_stop_save_and_resume_bitwise(tmp_path, straight_run, example):
    """Each run gets a signal at a random instant of its training, stops within 30 s at a step, saves
    step.pth and says so; the next run resumes (--resume auto); the last run trains to the end. The
    result equals the uninterrupted run's, bit for bit (dropout, shuffling, augmentation, 2 workers)."""
    logdir, rng = tmp_path / "run", random.Random(f"{example}-instants")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    stops = 0
    for sig, to_group, expected in [*STOPS[example], (None, False, 0)]:
        command = launch(example, "--logdir", logdir, *(["--resume", "auto"] if logdir.exists() else []))
        with open(tmp_path / "output.txt", "w+") as output:
            process = subprocess.Popen(list(map(str, [sys.executable, *command])), stdout=output, stderr=output,
                                       env=env, start_new_session=True)  # fmt: skip
            try:
                log = logdir / "train.log"
                while sig is not None and (log.read_text().count("Data:") if log.exists() else 0) <= stops:
                    assert process.poll() is None, "the run ended before its training started"
                    time.sleep(0.02)
                if sig is not None:  # a random instant of the training (or of loading the checkpoint)
                    time.sleep(rng.uniform(0.0, 0.8))
                    helpers = descendants(process.pid)
                    os.killpg(process.pid, sig) if to_group else process.send_signal(sig)
                    process.wait(timeout=30)
                    # workers, forkserver, resource tracker, torchrun's workers: all gone (they end with the process)
                    assert wait_gone(helpers) == []
                else:
                    process.wait(timeout=180)
            finally:
                kill_tree(process)
            output.seek(0)
            text = output.read()
        if process.returncode == 0:
            break  # the signal came after the last step: the run was over
        assert process.returncode == expected, text[-3000:]
        found = STOPPED.findall(log.read_text())
        assert len(found) == stops + 1 and found[-1][0] == sig.name, text[-3000:]
        assert "Traceback" not in text if example == "device" else "[rank" not in text  # no worker traceback
        _, epoch, batch = found[-1]
        assert position(logdir / "checkpoints" / "step.pth") == (int(epoch) - 1, int(batch))
        stops += 1
    else:
        assert process.returncode == 0, text[-3000:]
    print(f"{example}: {stops} runs stopped by a signal, then one ran to the end")  # shown with pytest -s
    assert stops == len(STOPS[example]), "too few signals landed during training"
    assert_same_training(logdir, straight_run(example))
