"""Rank-aware logging."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from batteries import distributed

__all__ = ["get_logger"]

_MARK = "_batteries_handler"
_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def get_logger(
    name: str,
    log_file: str | os.PathLike | None = None,
    log_level: int = logging.INFO,
    disable: bool = False,
    *,
    disabled: bool | None = None,
) -> logging.Logger:
    """A logger that prints to stderr and, on global rank 0, to ``log_file``.

    Idempotent: calling it again with the same ``name`` replaces the handlers it added before, so
    messages never appear twice. On global rank 0 it logs at ``log_level``; on other ranks only
    warnings and errors are shown (prefixed with the rank) and no file is written. The logger does
    not propagate to the root logger.

    Args:
        name: logger name.
        log_file: file to append to (its folder is created); None for no file. Default None.
        log_level: level on rank 0, e.g. ``logging.DEBUG``. Default ``logging.INFO``.
        disable: silence the logger completely. Default False.
        disabled: alias of ``disable``.

    Returns:
        The configured ``logging.Logger``.

    Raises:
        ValueError: if ``log_level`` is not a valid logging level.
    """
    if disabled is not None:
        disable = disabled
    if isinstance(log_level, str):
        level = logging.getLevelName(log_level.upper())
        if not isinstance(level, int):
            raise ValueError(f"log_level must be a logging level such as logging.INFO, got {log_level!r}")
        log_level = level
    if isinstance(log_level, bool) or not isinstance(log_level, int) or log_level < 0:
        raise ValueError(f"log_level must be a logging level such as logging.INFO, got {log_level!r}")

    logger = logging.getLogger(name)
    for handler in [h for h in logger.handlers if getattr(h, _MARK, False)]:
        logger.removeHandler(handler)
        handler.close()

    rank = distributed.get_rank()
    main = rank == 0
    level = log_level if main else max(log_level, logging.WARNING)
    fmt = logging.Formatter(_FORMAT if main else f"%(asctime)s [rank {rank}] %(levelname)s %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if main and log_file is not None:
        path = Path(log_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(fmt)
        handler.setLevel(level)
        setattr(handler, _MARK, True)
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    logger.disabled = bool(disable)
    return logger
