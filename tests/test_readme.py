"""The README's promises that code can check: its examples run as written, its links resolve, and every name
docs/migration.md maps the original toolkit to exists."""

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MIGRATION = (ROOT / "docs" / "migration.md").read_text()  # the README's former "Coming from the original batteries"

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


def test_the_readme_links_to_the_migration_table():
    assert "(docs/migration.md)" in README


def test_every_original_name_is_mapped():
    missing = [name for name in ORIGINAL_NAMES if not re.search(rf"\b{re.escape(name)}\b", MIGRATION)]
    assert missing == []
    assert [library for library in LIBRARIES if library not in MIGRATION] == []


def now_column_names():
    rows = [line.split("|") for line in MIGRATION.splitlines()]
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


def python_block(title):
    return section(title).split("```python\n")[1].split("```")[0]


def run_python(args, cwd, timeout=240):
    import subprocess
    import sys

    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def own_loop_blocks():
    """The two loops of the README's "In your own loop": an epoch loop and an iteration loop."""
    blocks = section("Resume").split("### In your own loop")[1].split("```python\n")[1:]
    return [block.split("```")[0] for block in blocks]


def kill_mid_run(script, folder):
    """Start ``script`` in ``folder``; ``kill -9`` it once it saved step.pth after its first record."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    process = subprocess.Popen([sys.executable, script], cwd=folder, stderr=subprocess.PIPE, text=True)
    history, step = folder / "checkpoints" / "metrics.json", folder / "checkpoints" / "step.pth"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            recorded = json.loads(history.read_text())["values"]
            if recorded and step.stat().st_mtime_ns > history.stat().st_mtime_ns:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.002)
    assert process.poll() is None, f"the run ended before it could be killed: {process.communicate()[1][-2000:]}"
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()
    return json.loads(history.read_text())["values"]


@pytest.mark.parametrize("index", [0, 1], ids=["epoch-loop", "iteration-loop"])
def test_the_own_loop_snippets_resume_bit_exactly_after_kill_9(tmp_path, index):
    """Each snippet as written: killed (kill -9) mid-run after a step.pth, resumed with --resume auto, it ends
    with the uninterrupted run's weights, bit for bit; a start without --resume over its history is refused."""
    import json

    import torch

    code = own_loop_blocks()[index]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for folder in (straight, killed):
        folder.mkdir()
        (folder / "train.py").write_text(code)
    result = run_python(["train.py"], straight)
    assert result.returncode == 0, result.stderr[-3000:]
    before = kill_mid_run("train.py", killed)
    resumed = run_python(["train.py", "--resume", "auto"], killed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipped" not in resumed.stderr
    expected = torch.load(straight / "checkpoints" / "last.pth", weights_only=True)["model_state_dict"]
    got = torch.load(killed / "checkpoints" / "last.pth", weights_only=True)["model_state_dict"]
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected), before
    records = [
        json.loads((folder / "checkpoints" / "metrics.json").read_text())["values"] for folder in (straight, killed)
    ]
    assert records[0] == records[1]  # the same scores, recorded once each
    fresh = run_python(["train.py"], killed)
    assert fresh.returncode != 0 and "holds the history of a run" in fresh.stderr


@pytest.mark.parametrize("world_size", [1, 2])
def test_the_distributed_snippet_runs_as_written_under_python_and_torchrun(tmp_path, world_size):
    from spawn import free_port

    (tmp_path / "train.py").write_text(python_block("Distributed training"))
    launcher = ["-m", "torch.distributed.run", "--master_port", str(free_port()), f"--nproc_per_node={world_size}"]
    result = run_python([*(launcher if world_size > 1 else []), "train.py"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.findall(r"INFO epoch (\d): loss", result.stderr) == ["1", "2", "3"]  # rank 0 only
    assert (tmp_path / "checkpoints" / "last.pth").is_file()


DOCUMENTS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "examples").glob("*/README.md"))]  # fmt: skip


def outside_code(text):
    """The lines of a markdown text outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchors(path):
    """GitHub's anchors for the headings of a markdown file."""
    headings = [line.lstrip("#").strip() for line in outside_code(path.read_text()) if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_resolves(document):
    broken = []
    for line in outside_code(document.read_text()):
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            resolved = (document.parent / path).resolve() if path else document
            if not resolved.exists() or (anchor and resolved.suffix == ".md" and anchor not in anchors(resolved)):
                broken.append(target)
    assert broken == []


def test_the_readme_stays_at_most_16_kb():
    assert (ROOT / "README.md").stat().st_size <= 16 * 1024, "move depth to docs/ and link it"
