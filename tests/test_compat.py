"""Each private internal batteries uses (batteries/_compat.py) still exists and behaves as relied on.

A failure here names the installed torch (or tensorboardX) version: the internal moved in it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import tensorboardX
import torch

TORCH = f"torch {torch.__version__}"


PYTHON = f"Python {sys.version.split()[0]}"
TENSORBOARDX = f"tensorboardX {tensorboardX.__version__}"


def test_atexit_counts_and_runs_the_exit_handlers_once():
    code = textwrap.dedent(
        """
        import atexit
        from batteries import _compat

        before = _compat.atexit_handler_count()
        atexit.register(print, "first")
        atexit.register(print, "second")
        assert _compat.atexit_handler_count() == before + 2, (before, _compat.atexit_handler_count())
        _compat.run_exit_handlers()
        assert _compat.atexit_handler_count() == 0, _compat.atexit_handler_count()
        print("done")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.split() == ["second", "first", "done"], (
        f"{PYTHON}: atexit._ncallbacks / atexit._run_exitfuncs moved or changed: {result.stdout}{result.stderr}"
    )


def test_tensor_version_counts_in_place_changes():
    from batteries._compat import tensor_version

    tensor = torch.zeros(())
    before = tensor_version(tensor)
    tensor += 1
    assert tensor_version(tensor) > before, f"{TORCH}: Tensor._version no longer counts in-place changes"
    assert tensor_version(tensor.detach()) == tensor_version(tensor), f"{TORCH}: Tensor._version not shared by views"


def test_event_file_writer_appends_to_the_summary_writers_file(tmp_path):
    from tb_events import read_events
    from tensorboardX.proto import event_pb2

    from batteries._compat import event_file_writer

    writer = tensorboardX.SummaryWriter(str(tmp_path))
    events = event_file_writer(writer)
    assert events is not None, f"{TENSORBOARDX}: SummaryWriter.file_writer.event_writer._ev_writer moved"
    events.write_event(event_pb2.Event(wall_time=1.0, step=7))
    writer.close()
    assert [event.step for event in read_events(tmp_path)][-1:] == [7], f"{TENSORBOARDX}: _ev_writer writes elsewhere"
    assert event_file_writer(tensorboardX.SummaryWriter(str(tmp_path / "none"), write_to_disk=False)) is None
