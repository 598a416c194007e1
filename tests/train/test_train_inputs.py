"""`deepseek train` checks its inputs before it writes anything: a missing data file, an unknown task, a bad
count, a missing init_from and a missing tokenizer each fail with one line and leave no run folder."""

from __future__ import annotations

import pytest

from deepseek.cli import main
from deepseek.train.config import apply_overrides, preset
from deepseek.train.trainer import train


@pytest.mark.parametrize("overrides, error", [
    (["data=missing.jsonl"], "data=missing.jsonl: no such file or folder"),
    (["data=task:addition@10", "val_data=nowhere/val.txt"], "val_data=nowhere/val.txt: no such file"),
    (["data=task:nope@10"], "unknown task 'nope'"),
    (["data=task:addition@x"], "the count after @ must be a positive integer"),
    (["data=task:addition@10", "init_from=no/such/model"], "model 'no/such/model' not found"),
    (["data=task:addition@10"], "needs a tokenizer"),
])  # fmt: skip
def test_bad_inputs_fail_before_anything_is_written(tmp_path, overrides, error):
    out = tmp_path / "run"
    config = apply_overrides(preset("debug"), [*overrides, f"out_dir={out}"])
    with pytest.raises((ValueError, FileNotFoundError), match=error.replace("(", r"\(").replace("?", r"\?")):
        train(config)
    assert not out.exists()


def test_cli_missing_data_names_the_file_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", "missing.jsonl"]) == 2
    assert "data=missing.jsonl: no such file or folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
