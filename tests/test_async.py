"""Background saves: what they store, and their errors, which are never lost (not even at exit)."""

import collections
import dataclasses
import os
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import torch
from torch import nn

import batteries
from batteries import save_checkpoint, wait_for_saves


def assert_same(a, b):
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b) and a.requires_grad == b.requires_grad
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
        assert getattr(a, "__dict__", None) == getattr(b, "__dict__", None)  # _metadata and other attributes
        assert getattr(a, "default_factory", None) is getattr(b, "default_factory", None)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
        assert getattr(a, "__dict__", None) == getattr(b, "__dict__", None)
    elif hasattr(a, "__dict__"):  # a module, a dataclass, any object: its attributes
        assert_same(vars(a), vars(b))
    else:
        assert a == b


Point = collections.namedtuple("Point", "x y")


def test_background_save_stores_what_a_blocking_save_stores(tmp_path):
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    state = model.state_dict()
    assert state._metadata  # what load_state_dict reads for versioned modules such as BatchNorm
    counter = collections.Counter({"cat": 2, "dog": 1})
    lookup = collections.defaultdict(list, {"w": [torch.ones(2)]})
    nested = Point(torch.arange(3), Point(torch.zeros(1), (torch.ones(1), [torch.full((2,), 7.0)])))
    obj = {"model": state, "counter": counter, "lookup": lookup, "point": nested, "size": torch.Size([2, 3])}
    save_checkpoint(obj, tmp_path, "sync.pth")
    save_checkpoint(obj, tmp_path, "async.pth", blocking=False)
    wait_for_saves()
    sync = torch.load(tmp_path / "sync.pth", weights_only=False)
    background = torch.load(tmp_path / "async.pth", weights_only=False)
    assert_same(background, sync)
    assert background["model"]._metadata == state._metadata
    assert background["lookup"].default_factory is list and background["counter"]["cat"] == 2
    model.load_state_dict(background["model"])


@dataclasses.dataclass
class State:
    weight: torch.Tensor


class Tagged(list):
    pass


def test_background_save_copies_every_object_at_the_call(tmp_path):
    def slow_save(obj, path):
        time.sleep(0.3)  # training goes on meanwhile
        torch.save(obj, path)

    model = nn.Linear(2, 2)
    state = State(torch.ones(3))
    parameter = nn.Parameter(torch.ones(2))
    leaf = torch.ones(2, requires_grad=True)
    complex_values = torch.tensor([1 + 2j, 3 - 1j])
    real_values = torch.tensor([1.0, 2.0])
    tagged = Tagged([torch.ones(1)])
    tagged.tag = "x"
    obj = {
        "model": model,
        "state": state,
        "namespace": types.SimpleNamespace(t=real_values),
        "parameter": parameter,
        "leaf": leaf,
        "complex": complex_values,
        "conj": complex_values.conj(),  # same memory and strides as its base, other values
        "real": real_values,
        "neg": torch._neg_view(real_values),
        "tagged": tagged,
    }
    save_checkpoint(obj, tmp_path, "sync.pth")
    for name in ("first.pth", "second.pth"):  # the second copies into the first one's buffers
        save_checkpoint(obj, tmp_path, name, save_fn=slow_save, blocking=False)
        with torch.no_grad():  # the next training step, right after the call returned
            for tensor in (model.weight, state.weight, parameter, leaf, complex_values, real_values, tagged[0]):
                tensor.mul_(2)
        tagged.tag = "changed"
        wait_for_saves()
        with torch.no_grad():
            for tensor in (model.weight, state.weight, parameter, leaf, complex_values, real_values, tagged[0]):
                tensor.div_(2)  # exactly back
        tagged.tag = "x"
    sync = torch.load(tmp_path / "sync.pth", weights_only=False)
    assert type(sync["parameter"]) is nn.Parameter and sync["leaf"].requires_grad
    assert torch.equal(sync["conj"], complex_values.conj().resolve_conj())
    for name in ("first.pth", "second.pth"):
        assert_same(torch.load(tmp_path / name, weights_only=False), sync)


# ---------------------------------------------------------------- errors at interpreter exit
ROOT = Path(batteries.__file__).resolve().parents[1]  # the batteries under test (also an old copy)


def run_script(tmp_path, body):
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            """
            import atexit, gc, sys
            atexit.register(lambda: print("EARLIER EXIT HANDLER RAN", file=sys.stderr))
            import torch
            import batteries
            from batteries import CheckpointManager, make_checkpoint, save_checkpoint, wait_for_saves
            from batteries._async import AsyncWriter

            def broken(obj, path):
                raise OSError(28, "No space left on device")

            """
        )
        + textwrap.dedent(body)
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path / "run")], capture_output=True, text=True, timeout=120, env=env
    )


def test_last_background_save_error_is_reported_at_exit(tmp_path):
    result = run_script(
        tmp_path,
        """
        save_checkpoint({"a": 1}, sys.argv[1], "early.pth", save_fn=broken, blocking=False)
        try:
            wait_for_saves()  # reported here: not again at exit
        except OSError:
            print("REPORTED BY WAIT")
        save_checkpoint({"a": 2}, sys.argv[1], "final.pth", save_fn=broken, blocking=False)
        print("MAIN DONE")  # and no wait_for_saves()
        """,
    )
    assert "MAIN DONE" in result.stdout and "REPORTED BY WAIT" in result.stdout
    assert result.returncode == 1, result.stderr  # the status the docs promise
    assert result.stderr.count("background checkpoint save failed") == 1, result.stderr
    assert "Traceback" in result.stderr and "No space left on device" in result.stderr
    assert "EARLIER EXIT HANDLER RAN" in result.stderr  # the other exit handlers still run


def test_manager_and_dropped_writer_errors_are_reported_at_exit(tmp_path):
    result = run_script(
        tmp_path,
        """
        manager = CheckpointManager(sys.argv[1], async_save=True, save_fn=broken)
        manager.process(1.0, 1, make_checkpoint("s", 1, torch.nn.Linear(1, 1)))  # the manager's own writer
        writer = AsyncWriter()
        writer.submit({"b": 1}, lambda data: broken(data, "dropped.pth"))
        del writer  # its owner is gone: the error must not go with it
        gc.collect()
        print("MAIN DONE")
        """,
    )
    assert "MAIN DONE" in result.stdout
    assert result.returncode == 1, result.stderr  # the status the docs promise
    assert result.stderr.count("background checkpoint save failed") == 2, result.stderr


def test_a_process_forked_during_a_background_save_exits_at_once_with_its_own_status(tmp_path):
    result = run_script(
        tmp_path,
        """
        import os, signal, threading, time

        child_ended = threading.Event()

        def slow(obj, path):  # in flight until the child has ended: a child that waited for it would hang
            child_ended.wait(60)
            torch.save(obj, path)

        failed = AsyncWriter()
        failed.submit({"b": 1}, lambda data: broken(data, "failed.pth"))  # fails; nobody waits for it
        time.sleep(0.3)
        save_checkpoint({"a": 1}, sys.argv[1], "slow.pth", save_fn=slow, blocking=False)  # in flight
        pid = os.fork()
        if pid == 0:
            signal.alarm(20)  # a child that hangs (waits for the parent's save) is ended by SIGALRM
            save_checkpoint({"c": 3}, sys.argv[1], "child.pth", blocking=False)  # the child's own save
            wait_for_saves()
            sys.exit(3)
        _, status = os.waitpid(pid, 0)
        print("CHILD", os.waitstatus_to_exitcode(status), os.path.exists(os.path.join(sys.argv[1], "slow.pth")))
        child_ended.set()
        wait_for_saves()
        print("MAIN DONE")
        """,
    )
    assert "CHILD 3 False" in result.stdout and "MAIN DONE" in result.stdout, result.stderr
    assert (tmp_path / "run" / "child.pth").is_file() and (tmp_path / "run" / "slow.pth").is_file()
    assert result.returncode == 1  # the parent reports its unseen failure, once; the child did not
    assert result.stderr.count("background checkpoint save failed") == 1, result.stderr
