import functools
import gc

import torch
from torch.utils.data import DataLoader

from batteries.progress import tqdm, trange


def test_shows_on_rank_0(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with tqdm(range(3)) as bar:
        assert not bar.disable
        assert list(bar) == [0, 1, 2]


def test_silent_on_other_ranks(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert list(tqdm(range(3), desc="hidden")) == [0, 1, 2]
    assert trange(2).disable
    assert "hidden" not in capsys.readouterr().err


def test_explicit_disable_wins(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert not tqdm(range(1), disable=False).disable


# ---------------------------------------------------------------- the bar does not touch the loader early
def note_worker_start(path, worker_id):
    with open(path, "a") as file:
        file.write(f"{worker_id} {torch.initial_seed()}\n")


def one_epoch(folder, with_bar):
    """Batches, worker starts (id, seed) and the global RNG stream after one epoch of a loader with workers."""
    torch.manual_seed(0)
    starts = folder / f"starts_{with_bar}.txt"
    starts.touch()
    loader = DataLoader(
        torch.arange(16),
        batch_size=2,
        shuffle=True,
        num_workers=2,
        worker_init_fn=functools.partial(note_worker_start, str(starts)),
    )
    batches = [batch.tolist() for batch in (tqdm(loader) if with_bar else loader)]
    stream = torch.rand(4).tolist()
    del loader
    gc.collect()  # an iterator the bar may have made early shuts its workers down
    return batches, sorted(starts.read_text().splitlines()), stream


def test_bar_over_a_dataloader_with_workers_changes_nothing(monkeypatch, tmp_path):
    # tqdm.auto's class calls iter() in its constructor: a second set of workers, and a seed drawn
    # from the global RNG, so the shuffle and every random number after the loop changed
    monkeypatch.delenv("RANK", raising=False)
    batches, starts, stream = one_epoch(tmp_path, with_bar=False)
    assert len(starts) == 2 and sorted(sum(batches, [])) == list(range(16))
    assert one_epoch(tmp_path, with_bar=True) == (batches, starts, stream)
