import pytest
import torch

from batteries import distributed


def test_single_process_defaults(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.get_rank() == 0
    assert distributed.get_local_rank() == 0
    assert distributed.get_world_size() == 1
    assert distributed.is_main_process()
    distributed.barrier()
    assert distributed.all_gather({"a": 1}) == [{"a": 1}]
    x = torch.arange(3.0)
    assert torch.equal(distributed.sreduce(x), x) and distributed.sreduce(x) is not x
    assert torch.equal(distributed.mreduce(x, 1), x)
    with distributed.zero_rank_first():
        pass


def test_mreduce_bad_num():
    with pytest.raises(ValueError, match="num must be"):
        distributed.mreduce(torch.ones(1), 0)


def test_zero_rank_first_single_process_propagates():
    with pytest.raises(KeyError), distributed.zero_rank_first():
        raise KeyError("x")


@pytest.mark.parametrize(("size", "world"), [(10, 3), (7, 2), (2, 4)])
def test_eval_sampler_covers_every_sample_once(size, world):
    dataset = list(range(size))
    parts = [list(distributed.DistributedEvalSampler(dataset, world, rank)) for rank in range(world)]
    assert sorted(i for part in parts for i in part) == dataset
    assert [len(distributed.DistributedEvalSampler(dataset, world, rank)) for rank in range(world)] == [
        len(p) for p in parts
    ]


def test_eval_sampler_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        distributed.DistributedEvalSampler([1, 2], num_replicas=2, rank=2)
