import fcntl
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the modules that run the examples, in subprocesses: first, so that the two xdist workers (pyproject.toml:
# one test at a time to whichever is free) end the session together, on short tests
RUN_FIRST = ["test_examples.py", "test_elastic.py", "test_fsdp.py", "test_readme.py"]


@pytest.fixture
def root() -> Path:
    return ROOT


def pytest_configure(config):
    sys.path.insert(0, str(ROOT / "tests"))
    if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one compute thread per process
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # (inherited by the processes the tests start)


def pytest_collection_modifyitems(items):
    first = {name: index for index, name in enumerate(RUN_FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def made_once(tmp_path_factory):
    """``made_once(name, make)``: the folder that ``make(folder)`` fills, made once per session, also across
    xdist workers (the first to ask makes it under a lock, the others wait for it). Read it, or copy it."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the session's folder, above each worker's own
    shared = shared / "made-once"
    shared.mkdir(exist_ok=True)

    def get(name: str, make) -> Path:
        folder, done = shared / name, shared / f"{name}.done"
        with open(shared / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if make() fails
            if not done.exists():
                shutil.rmtree(folder, ignore_errors=True)  # what a failed make() left
                make(folder)
                done.touch()
        return folder

    return get
