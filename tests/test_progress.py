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
