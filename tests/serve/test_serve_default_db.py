"""serve, keys and usage share one default database, in the user's data folder (not the working directory), and
print where it is; small budgets show their digits."""

from __future__ import annotations

import pytest

from deepseek.cli import main
from deepseek.cli.serve import _money, default_db


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.delenv("DEEPSEEK_DB", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def test_one_default_database_from_any_directory(home, monkeypatch, capsys):
    where = f"sqlite:///{home / 'home/.local/share/deepseek/serve.db'}"
    assert default_db() == where
    (home / "a").mkdir(), (home / "b").mkdir()
    monkeypatch.chdir(home / "a")
    assert main(["keys", "create", "alice", "--budget", "0.001"]) == 0
    out, err = capsys.readouterr()
    assert f"database: {where}\n" == err and "budget $0.001)" in out
    monkeypatch.chdir(home / "b")  # another directory: the same keys
    assert main(["keys", "list"]) == 0
    out, err = capsys.readouterr()
    assert "alice" in out and "$0.001" in out and err == f"database: {where}\n"
    assert main(["usage", "--json"]) == 0
    assert capsys.readouterr().err == f"database: {where}\n"
    assert not list((home / "a").iterdir()) and not list((home / "b").iterdir())
    # serve checks its model first: a missing one is one line, and no database is named or opened
    assert main(["serve", "--model", str(home / "nope")]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "database:" not in err and len(err.strip().splitlines()) == 1
    assert default_db() == where  # the database serve would open is the same one


def test_env_and_xdg_choose_the_location(home, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(home / "xdg"))
    assert default_db() == f"sqlite:///{home / 'xdg/deepseek/serve.db'}"
    monkeypatch.setenv("DEEPSEEK_DB", "postgresql+psycopg://u@h/db")
    assert default_db() == "postgresql+psycopg://u@h/db"


def test_money_keeps_the_digits_of_small_budgets():
    assert [_money(v) for v in (None, 5, 0.0, 0.015, 0.001, 0.000125)] == \
        ["unlimited", "$5.00", "$0.00", "$0.015", "$0.001", "$0.000125"]  # fmt: skip
