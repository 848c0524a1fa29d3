"""Background saves: what they store, and their errors, which are never lost (not even at exit)."""

import collections
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from torch import nn

import batteries
from batteries import save_checkpoint, wait_for_saves


def assert_same(a, b):
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
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
    assert result.returncode != 0, result.stderr
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
    assert result.returncode != 0, result.stderr
    assert result.stderr.count("background checkpoint save failed") == 2, result.stderr
