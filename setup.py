"""Packaging for batteries. The version lives in batteries/__init__.py only."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "batteries" / "__init__.py").read_text(), re.M).group(1)

EXAMPLES = ["scikit-learn>=1.0", "matplotlib>=3.5"]
TEST = ["pytest>=7.0", "pytest-xdist>=3.2", "scikit-learn>=1.0"]  # xdist: pyproject.toml runs 2 workers
BENCH = ["scikit-learn>=1.0"]
# benchmarks/anchors.py: the same epoch with Lightning Fabric, HF Accelerate and PyTorch-Ignite. Pinned
# so figures compare across runs; install with -c constraints.txt so none of them brings another torch.
BENCH_ANCHORS = BENCH + ["lightning-fabric==2.6.6", "accelerate==1.15.0", "pytorch-ignite==0.5.5"]

setup(
    name="batteries",
    version=VERSION,
    description="Small, independent helpers for plain PyTorch training loops: no Trainer, no callbacks.",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["batteries", "batteries.*"]),
    python_requires=">=3.9",
    # torch: the oldest release the full suite passed on (tools/test-torch VERSION runs it)
    install_requires=["torch>=2.13", "numpy>=1.21", "tqdm>=4.60", "tensorboardX>=2.5"],
    extras_require={
        "examples": EXAMPLES,
        "test": TEST,
        "bench": BENCH,
        "bench-anchors": BENCH_ANCHORS,
        "dev": EXAMPLES + TEST + ["ruff>=0.5"],
    },
    license="MIT",
    classifiers=["Programming Language :: Python :: 3", "Topic :: Scientific/Engineering :: Artificial Intelligence"],
)
