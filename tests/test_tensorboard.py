import pytest
import torch
from tb_events import read_scalars

from batteries import TensorboardLogger


def test_add_metric_number_and_dict(tmp_path):
    with TensorboardLogger(tmp_path) as tb:
        tb.add_metric("train/loss", torch.tensor(0.5), global_step=1)
        tb.add_metric("valid", {"loss": 0.25, "accuracy": 0.75}, global_step=1)
        tb.add_scalar("lr", 0.1, 1)  # any SummaryWriter method
    scalars = read_scalars(tmp_path)
    assert scalars == {
        "train/loss": [(1, 0.5)],
        "valid/loss": [(1, 0.25)],
        "valid/accuracy": [(1, 0.75)],
        "lr": [(1, pytest.approx(0.1))],
    }
    assert len(list(tmp_path.iterdir())) == 1  # one run: no sub-runs per dict key


def test_no_files_on_other_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    tb = TensorboardLogger(tmp_path / "tb")
    tb.add_metric("x", 1.0, 0)
    tb.add_histogram("h", torch.zeros(3), 0)
    tb.close()
    assert not (tmp_path / "tb").exists()


def test_bad_value(tmp_path):
    with TensorboardLogger(tmp_path) as tb, pytest.raises(TypeError, match="valid/loss"):
        tb.add_metric("valid", {"loss": "high"}, 1)
