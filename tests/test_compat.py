"""Each private internal batteries uses (batteries/_compat.py) still exists and behaves as relied on.

A failure here names the installed torch (or tensorboardX) version: the internal moved in it.
"""

from __future__ import annotations

import torch

TORCH = f"torch {torch.__version__}"
