"""The README's promises that code can check: every name it maps the original toolkit to exists."""

import importlib
import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()

# the public names of the original toolkit and its later additions (item 21 of issue 8)
ORIGINAL_NAMES = [
    "seed_all", "t2d", "make_checkpoint", "save_checkpoint", "load_checkpoint", "checkpoints_weight_average",
    "average_model_state_dicts", "CheckpointManager", "AverageMetter", "EarlyStopIndicator", "EMA", "get_logger",
    "TensorboardLogger", "batteries.progress.tqdm", "all_gather", "sreduce", "mreduce", "zero_rank_first",
    "zero_grad", "Mixup", "mixup_batch", "classification_accuracy", "binary_precision", "binary_recall",
    "binary_fbeta", "ArcFace", "SubCenterArcFace", "CosFace", "CosFaceLoss", "AdaCos", "ArcMarginProduct",
    "SoftMax", "RMSNorm", "examples/xla",
]  # fmt: skip
LIBRARIES = [
    "torchvision.transforms.v2.MixUp", "torchvision.transforms.v2.CutMix", "torchmetrics", "torch.nn.RMSNorm",
    "pytorch_metric_learning", "optimizer.zero_grad(set_to_none=True)",
]  # fmt: skip


def section(title):
    start = README.index(f"## {title}")
    return README[start : README.index("\n## ", start + 1)]


def test_every_original_name_is_mapped():
    table = section("Coming from the original batteries")
    missing = [name for name in ORIGINAL_NAMES if not re.search(rf"\b{re.escape(name)}\b", table)]
    assert missing == []
    assert [library for library in LIBRARIES if library not in table] == []


def now_column_names():
    rows = [line.split("|") for line in section("Coming from the original batteries").splitlines()]
    return sorted({name for row in rows if len(row) > 3 for name in re.findall(r"`(batteries(?:\.\w+)+)`", row[2])})


@pytest.mark.parametrize("name", now_column_names())
def test_every_batteries_name_it_points_to_exists(name):
    module, _, attribute = name.rpartition(".")
    assert hasattr(importlib.import_module(module), attribute), name


def catches(pid, sig):
    """Whether process ``pid`` has a handler for ``sig`` (Linux: the SigCgt mask of /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return bool(int(re.search(r"SigCgt:\s*([0-9a-f]+)", status).group(1), 16) >> (sig - 1) & 1)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
def test_the_preemption_snippet_runs_as_written_and_stops_on_sigterm(tmp_path):
    """The README's own-loop example: SIGTERM mid-loop saves checkpoints/step.pth and exits 143."""
    import signal
    import subprocess
    import sys
    import time

    import torch

    code = section("Preemption: SIGTERM, Ctrl-C, SIGUSR1").split("```python\n")[1].split("```")[0]
    process = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not catches(process.pid, signal.SIGTERM):  # StopOnSignal() is in place: the loop is running
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 143, stderr
    state = torch.load(tmp_path / "checkpoints" / "step.pth", weights_only=True)
    assert 1 <= state["step"] < 200_000 and "model_state_dict" in state
