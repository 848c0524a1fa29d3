"""Samplers that work with and without a process group: one for evaluation, one for training.

Both take their defaults from :func:`batteries.distributed.get_world_size` / ``get_rank`` (1 and 0
without a group; torchrun's environment before the group exists). They are also importable from
``batteries.distributed``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DistributedSampler, Sampler

from batteries import distributed
from batteries._checks import check_bool, check_int

__all__ = ["DistributedEvalSampler", "DistributedTrainSampler", "EpochIndex"]


class EpochIndex(int):
    """A dataset index (an ``int``, equal to it) that also tells its epoch: ``index.epoch``.

    :class:`DistributedTrainSampler` yields these; :func:`batteries.make_loader`'s workers seed the
    random draws of each sample from (seed, ``index.epoch``, ``index``).
    """

    epoch: int

    def __new__(cls, index: int, epoch: int) -> EpochIndex:
        value = super().__new__(cls, index)
        value.epoch = epoch
        return value

    def __reduce__(self) -> tuple[type, tuple[int, int]]:
        return EpochIndex, (int(self), self.epoch)

    def __repr__(self) -> str:
        return int.__repr__(self)


class DistributedEvalSampler(Sampler[int]):
    """Sampler for evaluation that gives every sample to exactly one rank (no padding).

    Rank ``r`` gets the indices ``r, r + world_size, r + 2 * world_size, ...``: ranks may get one
    sample less than others, and gathered metrics equal single-process ones (``DistributedSampler``
    pads with repeated samples). Use it only where no collective runs per batch (evaluation without
    SyncBatchNorm in train mode).

    Args:
        dataset: a sized dataset.
        num_replicas: number of ranks; default ``get_world_size()``.
        rank: this rank; default ``get_rank()``.

    Raises:
        TypeError: if ``num_replicas`` or ``rank`` is not an int.
        ValueError: if ``rank`` is not in ``[0, num_replicas)`` or ``num_replicas < 1``.
    """

    def __init__(self, dataset: Any, num_replicas: int | None = None, rank: int | None = None) -> None:
        self.num_replicas, self.rank = _replicas_and_rank(num_replicas, rank)
        self.dataset_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.dataset_size, self.num_replicas))

    def __len__(self) -> int:
        return max(0, math.ceil((self.dataset_size - self.rank) / self.num_replicas))

    def set_epoch(self, epoch: int) -> None:
        """Accepted for symmetry with ``DistributedSampler``; the order does not depend on it."""


def _replicas_and_rank(num_replicas: Any, rank: Any) -> tuple[int, int]:
    """``num_replicas`` and ``rank``, checked, with defaults from this process (no group needed)."""
    if num_replicas is None:
        num_replicas = distributed.get_world_size()
    else:
        num_replicas = check_int(num_replicas, "num_replicas", minimum=1)
    rank = distributed.get_rank() if rank is None else check_int(rank, "rank")
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, {num_replicas}), got {rank!r}")
    return num_replicas, rank


class DistributedTrainSampler(DistributedSampler):
    """``DistributedSampler`` that also works without a process group, and resumes mid-epoch.

    For the same ``seed`` and epoch it yields the same indices in the same order as torch's
    ``DistributedSampler`` (padding with ``drop_last=False``, dropping the tail with ``True``); with
    one process every index comes exactly once per epoch. Call ``set_epoch(epoch)`` before every epoch.

    Resuming mid-epoch: ``samples_consumed`` counts this rank's indices of the current epoch already
    used, and iteration skips them. Iterating does not advance it: :func:`~batteries.make_loader`'s
    loader keeps it in step; with another loader set it from your own step counter
    (``batches_done * batch_size``) before :meth:`state_dict`. ``set_epoch`` with a new epoch resets
    it to 0; with the epoch it already has (a resumed run entering its interrupted epoch) it keeps it.
    The indices are :class:`EpochIndex` (ints that also carry the epoch).

    Args:
        dataset: a sized dataset.
        num_replicas: number of ranks; default ``get_world_size()``.
        rank: this rank; default ``get_rank()``.
        shuffle: draw a new permutation every epoch; False keeps the dataset order. Default True.
        seed: seed of the permutation, the same on every rank. Default 0.
        drop_last: drop the tail instead of padding. Default False.

    Raises:
        TypeError: if an int or bool argument has another type.
        ValueError: if ``rank`` is not in ``[0, num_replicas)``, ``num_replicas < 1`` or ``seed < 0``.

    Example:
        >>> sampler = DistributedTrainSampler(dataset, seed=42)
        >>> loader = DataLoader(dataset, batch_size=32, sampler=sampler)
        >>> for epoch in range(epochs):
        ...     sampler.set_epoch(epoch)
        ...     for batch in loader: ...
    """

    def __init__(
        self,
        dataset: Any,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        num_replicas, rank = _replicas_and_rank(num_replicas, rank)
        super().__init__(
            dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=check_bool(shuffle, "shuffle"),
            seed=check_int(seed, "seed", minimum=0),
            drop_last=check_bool(drop_last, "drop_last"),
        )
        self._samples_consumed = 0

    @property
    def samples_consumed(self) -> int:
        """This rank's indices of the current epoch already used; ``__iter__`` skips them."""
        return self._samples_consumed

    @samples_consumed.setter
    def samples_consumed(self, value: int) -> None:
        self._samples_consumed = self._check_consumed(value)

    def _check_consumed(self, value: Any) -> int:
        value = check_int(value, "samples_consumed", minimum=0)
        if value > self.num_samples:
            raise ValueError(f"samples_consumed must be <= {self.num_samples} (this rank's share), got {value!r}")
        return value

    def __iter__(self) -> Iterator[EpochIndex]:
        indices, epoch = list(super().__iter__())[self._samples_consumed :], self.epoch
        return (EpochIndex(index, epoch) for index in indices)

    def __len__(self) -> int:
        return self.num_samples - self._samples_consumed

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch``; a new epoch starts at its first sample.

        A dataset with a ``set_epoch(epoch)`` method of its own (epoch-dependent augmentations) is
        told the epoch too, so a loop calls only ``sampler.set_epoch`` and works with any dataset.

        Args:
            epoch: the epoch number (>= 0).

        Raises:
            TypeError: if ``epoch`` is not an int.
            ValueError: if ``epoch`` is negative.
        """
        epoch = check_int(epoch, "epoch", minimum=0)
        if epoch != self.epoch:
            self._samples_consumed = 0
        self.epoch = epoch
        if callable(getattr(self.dataset, "set_epoch", None)):
            self.dataset.set_epoch(epoch)

    def state_dict(self) -> dict[str, int]:
        """Where this sampler stands: ``epoch``, ``seed``, ``samples_consumed``, ``num_replicas``, ``num_samples``.

        Returns:
            A dict of ints (loads with ``torch.load(weights_only=True)``).
        """
        return {
            "epoch": self.epoch,
            "seed": self.seed,
            "samples_consumed": self._samples_consumed,
            "num_replicas": self.num_replicas,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from :meth:`state_dict` (the seed saved wins over the one given to the constructor).

        Args:
            state: a dict from :meth:`state_dict`.

        Raises:
            KeyError: if ``epoch``, ``seed`` or ``samples_consumed`` is missing.
            ValueError: if the state is mid-epoch and was saved with another number of ranks (each
                rank's share, and so ``samples_consumed``, depends on it).
        """
        missing = [key for key in ("epoch", "seed", "samples_consumed") if key not in state]
        if missing:
            raise KeyError(f"DistributedTrainSampler state is missing {missing}")
        saved_replicas = state.get("num_replicas", self.num_replicas)
        consumed = state["samples_consumed"]
        if saved_replicas != self.num_replicas:
            if 0 < consumed < state.get("num_samples", math.inf):
                raise ValueError(
                    f"the sampler state was saved mid-epoch with num_replicas={saved_replicas!r}, this sampler has "
                    f"num_replicas={self.num_replicas}: resume with the same number of ranks, or from an epoch end"
                )
            consumed = self.num_samples if consumed else 0  # an epoch's end (or start) is one for any number of ranks
        checked = (  # all checked before any is set: a bad state leaves this sampler as it was
            check_int(state["epoch"], "epoch", minimum=0),
            check_int(state["seed"], "seed", minimum=0),
            self._check_consumed(consumed),
        )
        self.epoch, self.seed, self._samples_consumed = checked
