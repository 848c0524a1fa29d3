"""The two kinds of CheckpointManager store, for tests that hold for both: one file per checkpoint
(``.pth``, hard links best.pth / last.pth) and one DCP folder per checkpoint (symbolic links best / last).

A test module gets them from a fixture: ``@pytest.fixture(params=KINDS)`` returning ``Kind(request.param)``.
"""

import os
from pathlib import Path

import torch
from torch import nn

from batteries import CheckpointManager, _dcp, load_checkpoint, make_checkpoint, make_training_state

KINDS = ["files", "sharded"]


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(6, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


MODEL, OPTIMIZER = _model()
_STATES = {}


class Kind:
    """What differs between the kinds, as far as the tests need it."""

    def __init__(self, name):
        self.name = name
        self.sharded = name == "sharded"
        self.suffix = "" if self.sharded else ".pth"
        self.best, self.last = ("best", "last") if self.sharded else ("best.pth", "last.pth")
        self.keeps_last = self.sharded  # a symbolic link cannot keep a folder alive: last's folder stays

    def __repr__(self):
        return self.name

    def manager(self, folder, **kwargs):
        return CheckpointManager(folder, sharded=self.sharded, **kwargs)

    def filled(self, folder, scores, n_best=2, **kwargs):
        manager = self.manager(folder, save_n_best=n_best, **kwargs)
        for epoch, score in enumerate(scores, start=1):
            manager.process(score=score, epoch=epoch, checkpoint=self.checkpoint(epoch))
        return manager

    def checkpoint(self, epoch, step=None, **extra):
        """A checkpoint of this kind for ``epoch`` (the same model each time)."""
        step = epoch if step is None else step
        if not self.sharded:
            return make_checkpoint("s", epoch, MODEL, step=step, **extra)
        if extra:
            return make_training_state(MODEL, epoch=epoch, step=step, optimizer=OPTIMIZER, sharded=True, **extra)
        if (epoch, step) not in _STATES:  # MODEL does not change: its states are built once
            _STATES[epoch, step] = make_training_state(MODEL, epoch=epoch, step=step, optimizer=OPTIMIZER, sharded=True)
        return _STATES[epoch, step]

    def file(self, epoch, prefix="exp"):
        return f"{prefix}_{epoch}{self.suffix}"

    def epoch_of(self, path):
        """Read the checkpoint ``path`` whole (every shard); its epoch."""
        if not self.sharded:
            return load_checkpoint(path, verbose=False)["epoch"]
        metadata = _dcp.read_metadata(path)
        return _dcp.load_entries(path, metadata, keys=_dcp.top_level_keys(metadata))["epoch"]

    def numbered(self, folder, prefix="exp"):
        """The epochs of the numbered checkpoints in ``folder``."""
        names = (p.name.removesuffix(self.suffix) for p in Path(folder).glob(f"{prefix}_*{self.suffix}"))
        return sorted(int(name.split("_")[1]) for name in names if name.split("_")[1].isdigit())

    def kept(self, kept, newest):
        """The numbered checkpoints on disk when ``kept`` are the N best and ``newest`` was saved last."""
        return sorted({*kept, newest} if self.keeps_last and newest is not None else set(kept))

    def every_visible_checkpoint_loads(self, folder):
        for path in Path(folder).iterdir():
            if not path.name.startswith(".") and not path.name.endswith(".json"):
                self.epoch_of(path)  # a dangling link or a partial folder raises


def folder_state(folder):
    """Every entry's relative name, content (bytes, link target or folder) and inode: any change shows."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                content = ("link", os.readlink(path))
            elif path.is_dir():
                content = ("folder",)
            else:
                content = path.read_bytes()
            state[str(path.relative_to(folder))] = (content, path.lstat().st_ino)
    return dict(sorted(state.items()))
