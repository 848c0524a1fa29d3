"""A tqdm preset that shows on global rank 0 only."""

from __future__ import annotations

import warnings
from typing import Any

from tqdm.std import TqdmExperimentalWarning

from batteries import distributed

with warnings.catch_warnings():  # tqdm.autonotebook warns when it picks the notebook bar
    warnings.simplefilter("ignore", category=TqdmExperimentalWarning)
    from tqdm.autonotebook import tqdm as _tqdm

__all__ = ["tqdm", "trange"]


class tqdm(_tqdm):  # noqa: N801 - the name users import
    """``tqdm.autonotebook.tqdm`` that is silent on ranks other than 0 and sizes itself to the terminal.

    Takes every argument ``tqdm`` takes. ``disable`` defaults to ``not is_main_process()``,
    ``dynamic_ncols`` to True. The iterable is left alone until the loop iterates it (``len()``
    aside), so adding a bar changes no batch and no random number.

    Args:
        *args: passed to ``tqdm`` (the iterable first).
        **kwargs: passed to ``tqdm``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("disable", not distributed.is_main_process())
        kwargs.setdefault("dynamic_ncols", True)
        super().__init__(*args, **kwargs)


def trange(*args: Any, **kwargs: Any) -> tqdm:
    """``tqdm(range(*args), **kwargs)`` with the same preset.

    Args:
        *args: passed to ``range``.
        **kwargs: passed to :class:`tqdm`.

    Returns:
        The progress bar over the range.
    """
    return tqdm(range(*args), **kwargs)
