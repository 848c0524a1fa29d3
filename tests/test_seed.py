import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from batteries import get_rng_state, seed_all, set_rng_state


def draws():
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_seed_all_matches_plain_seeding():
    assert seed_all(123) == 123
    ours = draws()
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    assert draws() == ours


def test_seed_all_default_and_numpy_int():
    assert seed_all() == 42
    assert seed_all(np.int64(7)) == 7


@pytest.mark.parametrize("bad", [-1, 2**32, 1.5, "42", None, True])
def test_bad_seed_raises(bad):
    with pytest.raises(ValueError, match="seed must be an int"):
        seed_all(bad)


def test_deterministic_flag():
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        seed_all(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.backends.cudnn.deterministic = False


class RandomDataset(Dataset):
    """Each item reports the global random / NumPy / torch draws made in its worker."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return torch.tensor([random.random(), np.random.rand(), torch.rand(()).item()], dtype=torch.float64)


def epoch_draws(loader):
    return [tuple(batch.flatten().tolist()) for batch in loader]


def test_worker_init_fn_workers_differ_across_workers_and_epochs_and_repeat():
    seed_all(42)
    loader = DataLoader(RandomDataset(), batch_size=1, num_workers=2, worker_init_fn=seed_all)
    first, second = epoch_draws(loader), epoch_draws(loader)
    # batch 0 comes from worker 0, batch 1 from worker 1: their draws differ
    assert first[0] != first[1]
    assert first[0][:2] != first[1][:2]  # random and NumPy too, not only torch
    assert first != second  # a new epoch gives new augmentations
    seed_all(42)
    assert epoch_draws(loader) == first  # ...and reseeding repeats them exactly
    assert epoch_draws(loader) == second


def test_worker_init_fn_differs_from_reseeding_with_worker_id():
    """The original toolkit reseeded each worker with its id: the same draws every epoch."""
    seed_all(42)
    loader = DataLoader(RandomDataset(), batch_size=1, num_workers=2, worker_init_fn=seed_all)
    numpy_draws = [draw[1] for draw in epoch_draws(loader) + epoch_draws(loader)]
    assert len(set(numpy_draws)) == len(numpy_draws)


def test_rng_state_round_trip_through_weights_only_load(tmp_path):
    seed_all(5)
    state = get_rng_state()
    expected = draws()
    torch.save(state, tmp_path / "rng.pth")
    loaded = torch.load(tmp_path / "rng.pth", weights_only=True)
    seed_all(99)
    set_rng_state(loaded)
    assert draws() == expected


def test_set_rng_state_missing_part():
    with pytest.raises(KeyError, match="numpy"):
        set_rng_state({"python": random.getstate(), "torch": torch.get_rng_state()})
