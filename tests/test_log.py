import logging

import pytest

from batteries import get_logger


def test_idempotent_and_writes_file_on_rank_0(tmp_path, capsys):
    log_file = tmp_path / "sub" / "train.log"
    logger = get_logger("test-idem", log_file=log_file)
    logger = get_logger("test-idem", log_file=log_file)
    logger.info("hello")
    for handler in logger.handlers:
        handler.flush()
    assert log_file.read_text().count("hello") == 1
    assert capsys.readouterr().err.count("hello") == 1
    assert len(logger.handlers) == 2


def test_other_ranks_warn_only_and_write_no_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    log_file = tmp_path / "train.log"
    logger = get_logger("test-rank1", log_file=log_file)
    logger.info("quiet")
    logger.warning("loud")
    err = capsys.readouterr().err
    assert "quiet" not in err and "loud" in err and "[rank 1]" in err
    assert not log_file.exists()


@pytest.mark.parametrize("kwargs", [{"disable": True}, {"disabled": True}])
def test_disable(kwargs, capsys):
    logger = get_logger("test-disable", **kwargs)
    logger.error("nothing")
    assert "nothing" not in capsys.readouterr().err
    assert not get_logger("test-disable").disabled


def test_levels(capsys):
    logger = get_logger("test-level", log_level=logging.WARNING)
    logger.info("info-line")
    assert "info-line" not in capsys.readouterr().err
    with pytest.raises(ValueError, match="log_level"):
        get_logger("test-level", log_level="LOUD")
