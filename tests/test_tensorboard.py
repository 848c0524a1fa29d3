import gc
import json
import math
import os
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tb_events import read_events, read_scalars

import batteries
import batteries.tensorboard as tensorboard_module
from batteries import TensorboardLogger

PACKAGE_ROOT = str(Path(batteries.__file__).resolve().parents[1])


def run_python(code: str, logdir: Path, timeout_s: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": PACKAGE_ROOT}
    command = [sys.executable, "-c", textwrap.dedent(code), str(logdir)]
    try:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the process did not end within {timeout_s} s")


def scalar_events(folder: Path) -> list:
    return [event for event in read_events(folder) if event.summary.value]


def wait_for(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return True
        except (ValueError, struct.error):  # a record still being written
            pass
        time.sleep(0.02)
    return False


def test_add_metric_number_and_dict(tmp_path):
    with TensorboardLogger(tmp_path) as tb:
        tb.add_metric("train/loss", torch.tensor(0.5), global_step=1)
        tb.add_metric("valid", {"loss": 0.25, "accuracy": 0.75}, global_step=1)
        tb.add_scalar("lr", 0.1, 1)
    scalars = read_scalars(tmp_path)
    assert scalars == {
        "train/loss": [(1, 0.5)],
        "valid/loss": [(1, 0.25)],
        "valid/accuracy": [(1, 0.75)],
        "lr": [(1, pytest.approx(0.1))],
    }
    assert len(list(tmp_path.iterdir())) == 1  # one run: no sub-runs per dict key


def test_event_records_are_byte_for_byte_those_of_summary_writer(tmp_path):
    from tensorboardX import SummaryWriter

    calls = [
        ("train/loss", 0.5, 0, 1_700_000_000.25),
        ("train/loss", torch.tensor(0.25), 1, 1_700_000_001.5),
        ("lr", np.float32(0.001), 1, 1_700_000_001.75),
        ("count", 7, -3, 1_700_000_002.0),
        ("no step", torch.tensor([2.5]), None, 1_700_000_003.0),  # illegal character: tensorboardX writes no_step
        ("nan", float("nan"), 2, 1_700_000_004.0),
        ("inf", math.inf, 2**40, 1_700_000_005.0),
    ]
    reference = SummaryWriter(str(tmp_path / "reference"))
    for tag, value, step, wall_time in calls:
        reference.add_scalar(tag, value, step, walltime=wall_time)
    reference.close()
    with TensorboardLogger(tmp_path / "ours") as tb:
        for tag, value, step, wall_time in calls:
            tb.add_scalar(tag, value, step, walltime=wall_time)
    expected = [event.SerializeToString() for event in read_events(tmp_path / "reference")[1:]]
    assert [event.SerializeToString() for event in read_events(tmp_path / "ours")[1:]] == expected
    assert len(expected) == len(calls)


def test_wall_time_is_the_time_of_the_call_not_of_the_write(tmp_path):
    tb = TensorboardLogger(tmp_path)
    before = time.time()
    tb.add_scalar("loss", 1.0, 0)
    tb.add_metric("valid", {"loss": 2.0}, 0)
    after = time.time()
    time.sleep(0.3)
    tb.close()
    times = [event.wall_time for event in scalar_events(tmp_path)]
    assert len(times) == 2
    assert all(before <= wall_time <= after for wall_time in times)


def test_add_scalar_builds_and_writes_no_event_in_the_caller(tmp_path, monkeypatch):
    """The caller only records; events are built and written on the logger's thread (its cost per call
    is measured in benchmarks/helper_costs.py, not here)."""
    import batteries.tensorboard as module

    threads, real = [], module._Writer._write

    def spy(self):
        threads.append(threading.get_ident())
        return real(self)

    monkeypatch.setattr(module._Writer, "_write", spy)
    tb = TensorboardLogger(tmp_path)
    for step in range(100):
        tb.add_scalar("train/loss", torch.tensor(0.5), step)
    assert threads == [] and read_scalars(tmp_path) == {}  # nothing built or written yet
    tb.close()
    assert len(read_scalars(tmp_path)["train/loss"]) == 100


def test_device_tensors_are_read_when_written_in_one_copy_per_flush(tmp_path, monkeypatch):
    monkeypatch.setattr(tensorboard_module, "_READ_CPU_TENSORS_AT_CALL", False)  # CPU stands in for a GPU
    read_at_call = []
    monkeypatch.setattr(torch.Tensor, "item", lambda self: read_at_call.append(self) or 0.0)
    stacks = []
    real_stack = torch.stack
    monkeypatch.setattr(torch, "stack", lambda tensors, *a, **k: stacks.append(len(tensors)) or real_stack(tensors))
    tb = TensorboardLogger(tmp_path)
    losses = [torch.tensor(step / 8, requires_grad=True) * 1 for step in range(8)]
    for step, loss in enumerate(losses):
        tb.add_scalar("train/loss", loss, step)
    tb.add_metric("train", {"accuracy": torch.tensor([0.5]), "lr": 0.1}, 7)
    assert read_at_call == []
    tb.flush()
    assert stacks == [9]  # one batched read for the 9 tensors
    tb.close()
    monkeypatch.undo()
    scalars = read_scalars(tmp_path)
    assert scalars["train/loss"] == [(step, step / 8) for step in range(8)]
    assert scalars["train/accuracy"] == [(7, 0.5)]


def test_inference_mode_tensors_are_deferred_too(tmp_path, monkeypatch):
    monkeypatch.setattr(tensorboard_module, "_READ_CPU_TENSORS_AT_CALL", False)
    with TensorboardLogger(tmp_path) as tb, torch.inference_mode():
        tb.add_scalar("valid/loss", torch.ones(()) * 0.5, 0)
    assert read_scalars(tmp_path) == {"valid/loss": [(0, 0.5)]}


def test_a_forked_child_leaves_the_parents_file_alone(tmp_path):
    code = """
        import os, sys
        from batteries import TensorboardLogger
        tb = TensorboardLogger(sys.argv[1])
        tb.add_scalar("loss", 1.0, 0)
        pid = os.fork()
        if pid == 0:  # the child, e.g. a DataLoader worker started by fork
            try:
                tb.add_scalar("loss", 2.0, 1)
                tb.close()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        tb.close()
    """
    result = run_python(code, tmp_path, timeout_s=60)  # in a process of its own: a hang fails, not blocks
    assert result.returncode == 0, result.stderr
    assert read_scalars(tmp_path) == {"loss": [(0, 1.0)]}


def test_a_pending_tensor_changed_in_place_is_reported(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(tensorboard_module, "_READ_CPU_TENSORS_AT_CALL", False)
    total = torch.zeros(())
    with TensorboardLogger(tmp_path) as tb:
        tb.add_scalar("total", total, 0)
        total += 3
    assert "'total' was changed in place" in caplog.text
    assert read_scalars(tmp_path) == {"total": [(0, 3.0)]}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_logging_a_cuda_loss_every_step_never_synchronises(tmp_path):
    tb = TensorboardLogger(tmp_path)
    losses = [torch.full((), step / 4, device="cuda") for step in range(100)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step, loss in enumerate(losses):
            tb.add_scalar("train/loss", loss, step)
            tb.add_metric("train", {"loss": loss}, step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    tb.close()
    assert read_scalars(tmp_path)["train/loss"][-1] == (99, 99 / 4)


def test_the_background_thread_writes_every_flush_secs(tmp_path):
    tb = TensorboardLogger(tmp_path, flush_secs=0.1)
    tb.add_scalar("loss", 1.0, 0)
    assert wait_for(lambda: len(scalar_events(tmp_path)) == 1)  # no flush() nor close()
    tb.close()


def test_many_pending_records_wake_the_writer_before_flush_secs(tmp_path):
    tb = TensorboardLogger(tmp_path, flush_secs=3600)
    for step in range(tensorboard_module._WAKE_AT):
        tb.add_scalar("loss", 1.0, step)
    assert wait_for(lambda: len(scalar_events(tmp_path)) == tensorboard_module._WAKE_AT)
    tb.close()


def test_interpreter_exit_writes_everything_even_after_an_exception(tmp_path):
    code = """
        import sys
        from batteries import TensorboardLogger
        tb = TensorboardLogger(sys.argv[1])
        for step in range(1000):
            tb.add_scalar("loss", step / 1000, step)
        raise SystemExit("crashed without close()")
    """
    result = run_python(code, tmp_path)
    assert result.returncode == 1, result.stderr
    assert read_scalars(tmp_path)["loss"] == [(step, pytest.approx(step / 1000)) for step in range(1000)]


def test_a_logger_dropped_without_close_writes_everything(tmp_path):
    tb = TensorboardLogger(tmp_path)
    thread = tb._background._thread
    for step in range(10):
        tb.add_scalar("loss", float(step), step)
    del tb
    gc.collect()
    assert read_scalars(tmp_path)["loss"] == [(step, float(step)) for step in range(10)]
    assert not thread.is_alive()


def test_a_killed_process_loses_at_most_the_last_flush_interval(tmp_path):
    code = """
        import json, os, signal, sys, time
        from batteries import TensorboardLogger
        tb = TensorboardLogger(sys.argv[1], flush_secs=0.2)
        logged, start = [], time.time()
        while time.time() - start < 2.0:  # a step every 10 ms
            tb.add_scalar("loss", float(len(logged)), len(logged))
            logged.append(time.time())
            time.sleep(0.01)
        print(json.dumps({"logged": logged, "killed_at": time.time()}), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """
    result = run_python(code, tmp_path)
    assert result.returncode == -9, result.stderr
    run = json.loads(result.stdout)
    kept = read_scalars(tmp_path)["loss"]
    assert kept == [(step, float(step)) for step in range(len(kept))]  # in order, none missing in between
    lost = run["logged"][len(kept) :]
    # what was lost was logged within the last flush interval (0.2 s; 0.5 s more for a loaded machine)
    assert not lost or run["killed_at"] - lost[0] <= 0.2 + 0.5, (len(kept), len(run["logged"]))


def test_purge_step_hides_the_steps_of_the_abandoned_run(tmp_path):
    with TensorboardLogger(tmp_path) as tb:
        for step in range(10):
            tb.add_scalar("loss", float(step), step)
    with TensorboardLogger(tmp_path, purge_step=5, filename_suffix=".resumed") as tb:
        assert tb.writer.purge_step == 5
        for step in range(5, 8):
            tb.add_scalar("loss", 10.0 + step, step)
    assert read_scalars(tmp_path)["loss"] == [(s, float(s)) for s in range(5)] + [(s, 10.0 + s) for s in range(5, 8)]
    resumed = read_events(next(tmp_path.glob("*.resumed")))  # as SummaryWriter(purge_step=5) lays it out:
    kinds = [event.WhichOneof("what") for event in resumed]
    assert kinds == ["file_version", "file_version", "session_log", "summary", "summary", "summary"]
    assert [event.step for event in resumed[1:]] == [5, 5, 5, 6, 7]
    assert resumed[2].session_log.status == resumed[2].session_log.START


def test_this_tensorboardx_gets_the_fast_path(tmp_path):
    # events are written straight into tensorboardX's event file; if a tensorboardX release moves
    # its writer, the logger falls back to SummaryWriter.add_scalar (several times slower to write)
    with TensorboardLogger(tmp_path) as tb:
        assert tb._background._events is not None


def test_the_fallback_through_summary_writer_writes_the_same(tmp_path):
    with TensorboardLogger(tmp_path, purge_step=3) as tb:
        tb._background._events = None
        tb.add_scalar("loss", 0.5, 3, walltime=1_700_000_000.0)
        tb.add_metric("valid", {"loss": torch.tensor(0.25)}, 3)
    assert read_scalars(tmp_path) == {"loss": [(3, 0.5)], "valid/loss": [(3, 0.25)]}
    assert scalar_events(tmp_path)[0].wall_time == 1_700_000_000.0


def test_write_to_disk_false_writes_nothing(tmp_path):
    with TensorboardLogger(tmp_path / "tb", write_to_disk=False) as tb:
        tb.add_scalar("loss", 0.5, 0)
    assert not (tmp_path / "tb").exists()


def test_no_files_on_other_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    tb = TensorboardLogger(tmp_path / "tb")
    assert tb.writer is None
    tb.add_metric("x", 1.0, 0)
    tb.add_metric("valid", {"loss": torch.tensor(0.5)}, 0)
    tb.add_scalar("lr", 0.1, 0)
    tb.flush()
    tb.close()
    assert not (tmp_path / "tb").exists()
    with pytest.raises(AttributeError):
        tb.add_histogram  # noqa: B018 - no silent no-op for every name: SummaryWriter's other methods are tb.writer's


BAD_CALLS = [
    (TypeError, "'valid/loss'", lambda tb: tb.add_metric("valid", {"loss": "high"}, 1)),
    (TypeError, "'loss'", lambda tb: tb.add_scalar("loss", None, 1)),
    (TypeError, "'loss'", lambda tb: tb.add_scalar("loss", True, 1)),
    (TypeError, "complex", lambda tb: tb.add_scalar("loss", torch.tensor(1j), 1)),
    (ValueError, r"shape \(2,\)", lambda tb: tb.add_scalar("loss", torch.zeros(2), 1)),
    (ValueError, r"shape \(2,\)", lambda tb: tb.add_metric("valid", {"loss": np.zeros(2)}, 1)),
    (TypeError, "tag must be a str", lambda tb: tb.add_scalar(3, 1.0, 1)),
    (TypeError, "global_step must be an int", lambda tb: tb.add_scalar("loss", 1.0, 1.5)),
    (TypeError, "global_step must be an int", lambda tb: tb.add_metric("valid", {"loss": 1.0}, True)),
]


@pytest.mark.parametrize("rank", ["0", "1"])
@pytest.mark.parametrize(("error", "match", "call"), BAD_CALLS)
def test_bad_values_raise_at_the_call_on_every_rank(tmp_path, monkeypatch, rank, error, match, call):
    monkeypatch.setenv("RANK", rank)
    with TensorboardLogger(tmp_path) as tb:
        tb.add_metric("valid", {"accuracy": 0.5}, 0)
        with pytest.raises(error, match=match):
            call(tb)
    assert read_scalars(tmp_path) == ({"valid/accuracy": [(0, 0.5)]} if rank == "0" else {})


def test_a_bad_value_in_a_dict_logs_none_of_it(tmp_path):
    with TensorboardLogger(tmp_path) as tb, pytest.raises(TypeError, match="valid/loss"):
        tb.add_metric("valid", {"accuracy": 0.5, "loss": "high"}, 1)
    assert read_scalars(tmp_path) == {}


def test_calls_after_close_raise_on_every_rank(tmp_path, monkeypatch):
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        tb = TensorboardLogger(tmp_path / rank)
        tb.close()
        tb.close()  # idempotent
        with pytest.raises(RuntimeError, match="closed"):
            tb.add_scalar("loss", 1.0, 0)
        with pytest.raises(RuntimeError, match="closed"):
            tb.add_metric("valid", {"loss": 1.0}, 0)


def test_a_failed_write_is_raised_by_flush_and_by_the_next_call(tmp_path, monkeypatch):
    tb = TensorboardLogger(tmp_path, flush_secs=0.05)
    events = tb._background._events

    def disk_full(event):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(events, "write_event", disk_full)
    tb.add_scalar("loss", 1.0, 0)
    with pytest.raises(RuntimeError, match="writing the event file failed") as caught:
        tb.flush()
    assert isinstance(caught.value.__cause__, OSError)
    tb.add_scalar("loss", 1.0, 1)  # now the background thread fails
    assert wait_for(lambda: tb._background.error is not None)
    with pytest.raises(RuntimeError, match="writing the event file failed"):
        tb.add_scalar("loss", 1.0, 2)
    monkeypatch.undo()
    tb.close()
    assert tb.writer.file_writer is None  # closed all the same


def test_bad_flush_secs(tmp_path):
    with pytest.raises(ValueError, match="flush_secs must be > 0, got 0.0"):
        TensorboardLogger(tmp_path, flush_secs=0)
    with pytest.raises(TypeError, match="flush_secs must be a number"):
        TensorboardLogger(tmp_path, flush_secs="60")
