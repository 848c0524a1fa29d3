"""batteries.distributed.DistributedTrainSampler: the same script under plain python and torchrun."""

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from batteries import distributed


@pytest.fixture
def no_group(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def permutation(size, seed):
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()


def test_without_a_group_every_index_once_per_epoch_in_a_seeded_order(no_group):
    sampler = distributed.DistributedTrainSampler(range(10), seed=3)
    assert (sampler.num_replicas, sampler.rank, len(sampler)) == (1, 0, 10)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
        assert orders[-1] == permutation(10, 3 + epoch)
    assert len({tuple(order) for order in orders}) == 3  # a new order every epoch
    again = distributed.DistributedTrainSampler(range(10), seed=3)
    again.set_epoch(2)
    assert list(again) == orders[2]  # reproducible in a new run
    loader = DataLoader(torch.arange(10), batch_size=4, sampler=again)
    assert torch.cat(list(loader)).tolist() == orders[2]


def test_defaults_come_from_torchrun_environment_before_the_group_exists(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    sampler = distributed.DistributedTrainSampler(range(10))
    assert (sampler.num_replicas, sampler.rank) == (3, 2)


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize(("size", "world"), [(10, 2), (7, 2), (10, 3), (2, 4)])
def test_ranks_share_the_dataset_in_torch_distributed_sampler_order(size, world, drop_last):
    parts = []
    for rank in range(world):
        ours = distributed.DistributedTrainSampler(
            range(size), num_replicas=world, rank=rank, seed=5, drop_last=drop_last
        )
        theirs = DistributedSampler(range(size), num_replicas=world, rank=rank, seed=5, drop_last=drop_last)
        ours.set_epoch(4)
        theirs.set_epoch(4)
        parts.append(list(ours))
        assert parts[-1] == list(theirs) and len(ours) == len(theirs)
    assert len({len(part) for part in parts}) == 1  # every rank the same number of steps
    seen = [index for part in parts for index in part]
    if drop_last:  # the tail is dropped: no sample twice
        assert len(seen) == len(set(seen)) == size // world * world
    else:  # padded with the permutation's first samples: every sample at least once
        assert set(seen) == set(range(size)) and len(seen) == -(-size // world) * world


def test_state_dict_resumes_mid_epoch(no_group, tmp_path):
    sampler = distributed.DistributedTrainSampler(range(10), seed=1)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.samples_consumed = 4  # e.g. 2 batches of 2 done before the interruption
    torch.save(sampler.state_dict(), tmp_path / "sampler.pth")
    resumed = distributed.DistributedTrainSampler(range(10))  # seed 0: the saved seed wins
    resumed.load_state_dict(torch.load(tmp_path / "sampler.pth", weights_only=True))
    resumed.set_epoch(3)  # entering the interrupted epoch keeps the position
    assert list(resumed) == full[4:] and len(resumed) == 6
    resumed.set_epoch(4)  # the next epoch starts at its beginning
    assert list(resumed) == permutation(10, 1 + 4) and resumed.samples_consumed == 0


def test_mid_epoch_state_from_another_world_size_is_refused(no_group):
    two = distributed.DistributedTrainSampler(range(10), num_replicas=2, rank=0)
    two.samples_consumed = 2
    one = distributed.DistributedTrainSampler(range(10))
    with pytest.raises(ValueError, match="num_replicas"):
        one.load_state_dict(two.state_dict())
    assert one.state_dict() == {"epoch": 0, "seed": 0, "samples_consumed": 0, "num_replicas": 1, "num_samples": 10}
    for consumed, expected in ((0, 0), (5, 10)):  # at an epoch's start or end the world size may change
        two.samples_consumed = consumed
        one.load_state_dict(two.state_dict())
        assert one.samples_consumed == expected


def test_numpy_integers_accepted_and_look_alikes_refused(no_group):
    sampler = distributed.DistributedTrainSampler(
        range(6), num_replicas=np.int64(2), rank=np.int32(1), seed=np.uint16(9)
    )
    sampler.set_epoch(np.int64(1))
    assert (sampler.num_replicas, sampler.rank, sampler.seed, sampler.epoch) == (2, 1, 9, 1)
    sampler.samples_consumed = np.int64(1)
    assert len(sampler) == 2
    for kwargs, error in [
        ({"rank": 2, "num_replicas": 2}, ValueError),
        ({"num_replicas": 0}, ValueError),
        ({"num_replicas": "2"}, TypeError),
        ({"rank": True}, TypeError),
        ({"seed": 1.0}, TypeError),
        ({"shuffle": "False"}, TypeError),
        ({"drop_last": None}, TypeError),
    ]:
        with pytest.raises(error, match=next(iter(kwargs))):
            distributed.DistributedTrainSampler(range(6), **kwargs)
    with pytest.raises(ValueError, match="samples_consumed"):
        sampler.samples_consumed = 4  # more than this rank's share of 3
    with pytest.raises(TypeError, match="epoch"):
        sampler.set_epoch(True)


def test_shuffle_false_keeps_dataset_order(no_group):
    sampler = distributed.DistributedTrainSampler(range(5), shuffle=False)
    sampler.set_epoch(7)
    assert list(sampler) == [0, 1, 2, 3, 4]


def test_indices_carry_their_epoch_and_pickle(no_group):
    sampler = distributed.DistributedTrainSampler(range(4), seed=2)
    sampler.set_epoch(6)
    indices = list(sampler)
    assert indices == permutation(4, 2 + 6) and {index.epoch for index in indices} == {6}
    again = pickle.loads(pickle.dumps(indices[0]))  # as they travel to DataLoader workers
    assert (again, again.epoch, repr(again)) == (indices[0], 6, repr(int(indices[0])))
