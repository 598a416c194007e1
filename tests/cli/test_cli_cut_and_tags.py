"""`deepseek generate` / `deepseek chat` as a new user sees them: no literal `<|eos|>` or `</think>` (the
reasoning shows as [thinking] / [answer]), and a reply stopped at --max-new-tokens says so."""

from __future__ import annotations

import io

import pytest

from deepseek.chat import ChatSession
from deepseek.cli import main
from deepseek.cli.generate import display_text
from deepseek.loading import load_model_and_tokenizer


@pytest.fixture(scope="module")
def tiny():
    return load_model_and_tokenizer("deepseek/r1-tiny")


def test_special_tokens_and_tags_are_not_printed(tiny):
    _, tok = tiny
    ids = tok.encode("<think>\nx\n</think>\n\n408", add_special_tokens=False) + [tok.eos_token_id]
    assert display_text(tok, ids) == "[thinking]\nx\n[answer]\n\n408"


def test_generate_says_when_it_was_cut(tiny, capsys):
    assert main(["generate", "--model", "deepseek/r1-tiny", "--prompt", "What is 12 * 34?", "--chat", "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("[thinking]") and "<think>" not in out and "<|" not in out
    assert "6 tokens, cut at --max-new-tokens 6 (finish_reason length)" in err
    assert main(["generate", "--model", "deepseek/r1-tiny", "--prompt", "What is 12 * 34?", "--chat", "--max-new-tokens", "6", "--raw"]) == 0
    assert "[thinking]" not in capsys.readouterr().out


def test_chat_reply_cut_at_the_limit_says_so(tiny):
    out = io.StringIO()
    reply = ChatSession(*tiny, out=out, color=False, max_new_tokens=6).send("What is 12 * 34?")
    assert reply.finish_reason == "length" and reply.tokens == 6
    assert out.getvalue().endswith("[cut at the 6-token limit (finish_reason length): raise --max-new-tokens]\n")
