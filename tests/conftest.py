import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def root() -> Path:
    return ROOT


def pytest_configure(config):
    sys.path.insert(0, str(ROOT / "tests"))
    if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one compute thread per process
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # (inherited by the processes the tests start)
