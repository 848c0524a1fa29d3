"""CheckpointManager with a state (a dict of live objects): resume, save, process, histories of steps,
which checkpoint ``--resume auto`` takes, a fresh start over a history."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from batteries import CheckpointManager


def make_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = nn.Linear(3, 1)
    return {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1), "seen": 0}


def train(state: dict, steps: int = 2) -> None:
    for _ in range(steps):
        loss = state["model"](torch.randn(4, 3)).pow(2).mean()  # draws from torch's RNG: a resume must restore it
        state["optimizer"].zero_grad()
        loss.backward()
        state["optimizer"].step()
        state["seen"] += 4


def weights(state: dict) -> list[torch.Tensor]:
    return [p.detach().clone() for p in state["model"].parameters()]


def test_building_a_manager_writes_nothing(tmp_path):
    CheckpointManager(tmp_path / "run" / "checkpoints")
    assert not (tmp_path / "run").exists()


def test_a_fresh_start_over_a_history_is_refused_at_once_and_auto_starts_fresh_in_an_empty_folder(tmp_path):
    state = make_state()
    manager = CheckpointManager(tmp_path)
    assert manager.resume(state, "auto") == 0 and manager.resume(state, None) == 0
    manager.process(1.0, 1, state)
    manager.process(0.5, 2, state)
    again = CheckpointManager(tmp_path)
    with pytest.raises(ValueError, match=r"history of a run \(up to epoch 2\).*--resume auto.*another logdir"):
        again.resume(make_state(), None)


def test_resume_restores_objects_plain_values_and_rng_and_continues_bitwise(tmp_path):
    straight = make_state()
    for _epoch in (1, 2, 3):
        train(straight)
    expected = weights(straight)

    state = make_state()
    manager = CheckpointManager(tmp_path, save_n_best=2)
    train(state)
    manager.process(1.0, 1, state)
    train(state)
    manager.save(state)  # mid-epoch 2... here at its end: the next record has not come
    del state, manager
    resumed = make_state(seed=123)  # other weights: all must come from the checkpoint
    manager = CheckpointManager(tmp_path, save_n_best=2)
    assert manager.resume(resumed, "auto") == 1  # step.pth follows epoch 1
    assert resumed["seen"] == 16
    manager.process(0.5, 2, resumed)
    train(resumed)
    manager.process(0.2, 3, resumed)
    assert all(torch.equal(a, b) for a, b in zip(expected, weights(resumed)))
    saved = torch.load(tmp_path / "last.pth", weights_only=True)
    assert {"model_state_dict", "optimizer_state_dict", "rng_states", "seen", "lineage"} <= set(saved)


def run_with_a_step_checkpoint_in_epoch_3(tmp_path):
    """Epochs 1-2 recorded and a step.pth in epoch 3 (after epoch 2)."""
    state, manager = make_state(), CheckpointManager(tmp_path, save_n_best=3)
    manager.process(3.0, 1, state)
    train(state)
    manager.process(2.0, 2, state)
    train(state, 1)
    manager.save(state)


@pytest.mark.parametrize("kill_before_a_save", [True, False])
def test_a_branch_from_a_path_never_continues_the_abandoned_run(tmp_path, kill_before_a_save):
    """A branch from exp_1.pth: its own epoch 2 and step.pth are what --resume auto takes, never the abandoned
    run's step.pth, although it too follows "epoch 2" (the branch removes it, as the rewind its later files)."""
    run_with_a_step_checkpoint_in_epoch_3(tmp_path)
    branch, manager = make_state(seed=5), CheckpointManager(tmp_path, save_n_best=3)
    assert manager.resume(branch, tmp_path / "exp_1.pth") == 1
    assert [r["epoch"] for r in manager.values] == [1] and not (tmp_path / "step.pth").exists()
    if kill_before_a_save:  # killed before the branch saved anything: auto continues from exp_1
        expected, position = weights(branch), 1
    else:
        train(branch, 3)
        manager.process(2.5, 2, branch)
        expected, position = weights(branch), 2
    again = make_state(seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert CheckpointManager(tmp_path, save_n_best=3).resume(again, "auto") == position
    assert all(torch.equal(a, b) for a, b in zip(expected, weights(again)))


def test_auto_names_a_step_checkpoint_of_another_history(tmp_path):
    """A history rewound by hand (rewind keeps step.pth) goes on with a new epoch 2: the old step.pth also
    follows "epoch 2", but of another history: skipped, with a warning naming it."""
    run_with_a_step_checkpoint_in_epoch_3(tmp_path)
    manager, state = CheckpointManager(tmp_path, save_n_best=3), make_state(seed=5)
    manager.rewind(1)
    manager.process(2.5, 2, state)
    with pytest.warns(UserWarning, match=r"skipped '.*step.pth': it continues another history"):
        assert CheckpointManager(tmp_path, save_n_best=3).resume(make_state(seed=9), "auto") == 2


def test_a_warm_start_from_another_folder_keeps_its_position_after_a_kill(tmp_path):
    """Resumed from another run's checkpoint into an empty folder, then killed after a step.pth: --resume auto
    continues at the warm start's epoch, not at 0."""
    source = CheckpointManager(tmp_path / "a")
    state = make_state()
    source.process(1.0, 1, state)
    source.process(0.5, 2, state)
    manager = CheckpointManager(tmp_path / "b")
    assert manager.resume(make_state(seed=1), tmp_path / "a" / "last.pth") == 2
    manager.save(state)
    assert CheckpointManager(tmp_path / "b").resume(make_state(seed=2), "auto") == 2


def test_a_step_checkpoint_before_any_record_resumes_at_its_step(tmp_path):
    """The README's preemption loop: save(state, step=N) before any process(): a new process resumes at N."""
    state = make_state()
    CheckpointManager(tmp_path).save(state, step=501)
    with pytest.raises(ValueError, match=r"holds the history of a run \(step.pth\)"):
        CheckpointManager(tmp_path).resume(make_state(), None)
    assert CheckpointManager(tmp_path).resume(make_state(), "auto") == 501


def test_an_older_step_checkpoint_of_this_history_is_passed_over_quietly(tmp_path):
    state, manager = make_state(), CheckpointManager(tmp_path)
    manager.process(1.0, 1, state)
    manager.save(state)
    train(state)
    manager.process(0.5, 2, state)  # step.pth (after epoch 1) is now older than last.pth
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert CheckpointManager(tmp_path).resume(make_state(), "auto") == 2


def test_a_history_of_steps_speaks_of_steps(tmp_path):
    state, manager = make_state(), CheckpointManager(tmp_path, metric="val_loss", save_n_best=1)
    train(state)
    manager.process({"val_loss": 2.0}, step=100, checkpoint=state)
    train(state)
    manager.save(state, step=150)
    manager.process({"val_loss": 1.0}, step=200, checkpoint=state)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["unit"] == "step" and [r["step"] for r in saved["values"]] == [100, 200]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.pth", "exp_step200.pth", "last.pth", "metrics.json", "step.pth"
    ]  # fmt: skip
    again = CheckpointManager(tmp_path, metric="val_loss", save_n_best=1)
    assert again.unit == "step" and again.best_epoch == 200 and again.newest == 200
    assert again.resume(make_state(), "auto") == 200
    with pytest.raises(ValueError, match="counts steps: pass step="):
        again.process({"val_loss": 0.5}, 300, make_state())


def test_a_newer_step_checkpoint_of_a_history_of_steps_is_taken(tmp_path):
    state, manager = make_state(), CheckpointManager(tmp_path)
    manager.process(1.0, step=100, checkpoint=state)
    train(state)
    manager.save(state, step=140)
    expected = weights(state)
    resumed = make_state(seed=3)
    assert CheckpointManager(tmp_path).resume(resumed, "auto") == 140
    assert all(torch.equal(a, b) for a, b in zip(expected, weights(resumed)))


def test_bad_positions_and_states_are_refused_before_anything_is_written(tmp_path):
    manager = CheckpointManager(tmp_path)
    with pytest.raises(TypeError, match="exactly one of epoch and step"):
        manager.process(1.0, 1, make_state(), step=5)
    with pytest.raises(ValueError, match=r"must not hold the keys \['epoch'\]"):
        manager.process(1.0, 1, {**make_state(), "epoch": 3})
    with pytest.raises(TypeError, match="needs the checkpoint"):
        manager.process(1.0, 1)
    assert not tmp_path.joinpath("metrics.json").exists()
    manager.process(1.0, 1, make_state())
    with pytest.raises(ValueError, match="counts epochs: pass epoch="):
        manager.process(1.0, step=5, checkpoint=make_state())


def test_a_state_entry_the_checkpoint_lacks_is_named_and_nothing_is_restored(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.process(1.0, 1, make_state())
    state = {**make_state(seed=7), "extra": 1}
    before = weights(state)
    with pytest.raises(KeyError, match=r"no state for: extra.*it holds:.*model_state_dict"):
        CheckpointManager(tmp_path).resume(state, "auto")
    assert all(torch.equal(a, b) for a, b in zip(before, weights(state)))


def test_a_dict_checkpoint_after_the_newest_epoch_is_skipped_with_a_warning(tmp_path):
    """Checkpoint dicts carry no token: their epoch decides; one past the history is named, not passed over."""
    from batteries import find_resume_checkpoint, make_training_state

    state, manager = make_state(), CheckpointManager(tmp_path)
    manager.process(1.0, 1, make_training_state(state["model"], epoch=1))
    manager.save(make_training_state(state["model"], epoch=2))  # the epoch it is in, not the last finished one
    with pytest.warns(UserWarning, match=r"step.pth.: it records epoch 2, after the newest recorded epoch 1"):
        path, _ = find_resume_checkpoint(manager)
    assert path == tmp_path / "last.pth"
