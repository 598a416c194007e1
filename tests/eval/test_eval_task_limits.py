"""`deepseek eval`'s generation limit comes from the task (multiplication traces are ~310 tokens: 512, where a
fixed 256 scored 0%), and answers cut at the limit are counted (`truncated`, `cut=` in the table)."""

from __future__ import annotations

import json

import pytest

from deepseek.cli import main
from deepseek.eval import load_model_and_tokenizer, task_accuracy
from deepseek.eval.tasks import task_max_new_tokens
from deepseek.tasks import get_task


@pytest.fixture(scope="module")
def tiny():
    return load_model_and_tokenizer("deepseek/r1-tiny")


def test_the_limit_comes_from_the_task(tiny):
    _, tok = tiny
    limits = {name: task_max_new_tokens(tok, get_task(name).generate(100, seed=12345))
              for name in ("addition", "multiplication")}  # fmt: skip
    assert limits == {"addition": 192, "multiplication": 512}
    assert task_max_new_tokens(tok, [{"prompt": "no reference"}]) == 256


def test_task_accuracy_uses_the_task_limit(tiny, monkeypatch):
    import deepseek.eval.tasks as tasks

    seen = []

    def fake(model, tok, prompts, max_new_tokens, *a, finish_reasons=None, **kw):
        seen.append(max_new_tokens)
        finish_reasons += ["stop"] * len(prompts)
        return ["<think>\nx\n</think>\n\n0"] * len(prompts)

    monkeypatch.setattr(tasks, "generate_completions", fake)
    r = task_accuracy(*tiny, "multiplication", n=3)
    assert seen == [512] and (r["max_new_tokens"], r["truncated"]) == (512, 0)


def test_cut_answers_are_counted_and_shown(tiny, capsys):
    model, tok = tiny
    r = task_accuracy(model, tok, "multiplication", n=2, max_new_tokens=8, batch_size=2)
    assert (r["max_new_tokens"], r["truncated"], r["accuracy"]) == (8, 2, 0.0)
    assert main(["eval", "--model", "deepseek/r1-tiny", "--task", "multiplication", "--n", "1",
                 "--max-new-tokens", "8"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "cut=1@8" in out
    row = json.loads(out.strip().splitlines()[-1])["results"][0]
    assert (row["truncated"], row["max_new_tokens"]) == (1, 8)
