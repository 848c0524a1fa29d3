"""The only home of private internals of torch, CPython and tensorboardX that batteries uses.

Each name here has no public equivalent that serves (docs/internals.md says why, and the versions
it was tested on), and a test in tests/test_compat.py that fails with a message naming the torch
(or tensorboardX) version when the internal moves. Everything else in batteries uses public APIs.
"""

from __future__ import annotations
