"""A tqdm preset that shows on global rank 0 only."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm as _tqdm

from batteries import distributed

__all__ = ["tqdm", "trange"]


class tqdm(_tqdm):  # noqa: N801 - the name users import
    """``tqdm.auto.tqdm`` that is silent on ranks other than 0 and sizes itself to the terminal.

    Takes every argument ``tqdm`` takes. ``disable`` defaults to ``not is_main_process()``,
    ``dynamic_ncols`` to True.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("disable", not distributed.is_main_process())
        kwargs.setdefault("dynamic_ncols", True)
        super().__init__(*args, **kwargs)


def trange(*args: Any, **kwargs: Any) -> tqdm:
    """``tqdm(range(*args), **kwargs)`` with the same preset."""
    return tqdm(range(*args), **kwargs)
