"""`deepseek chat` on the bundled r1-tiny: streaming with reasoning apart and dimmed, multi-turn history without
earlier reasoning, /reset, Ctrl-C stopping one generation (not the program), one-shot --prompt."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys

import helpers
import pytest

from deepseek.chat import ASSISTANT, BOS, DIM, EOS, RESET, USER, ChatSession, chat_prompt_ids, split_reasoning
from deepseek.loading import load_model_and_tokenizer

ROOT = str(helpers.ROOT)


@pytest.fixture(scope="module")
def tiny():
    return load_model_and_tokenizer("deepseek/r1-tiny")


def test_split_reasoning():
    assert split_reasoning("<think>\nadd the columns\n</think>\n\n579") == ("add the columns", "579")
    assert split_reasoning("<think>\nstill thinking") == ("still thinking", None)
    assert split_reasoning("<thi") == ("<thi", None) or split_reasoning("<thi")[1] is None  # a tag being typed
    assert split_reasoning("just an answer") == ("", "just an answer")



def test_chat_prompt_ids_with_the_tokenizer_template(tiny):
    _, tok = tiny
    user = [{"role": "user", "content": "What is 48 + 27?"}]
    rendered = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|bos|><|user|>What is 48 + 27?<|assistant|>"  # r1-tiny's template
    expected = tok(rendered, add_special_tokens=False)["input_ids"]  # render, then tokenize: an independent path
    assert chat_prompt_ids(tok, user) == expected
    assert chat_prompt_ids(tok, "What is 48 + 27?") == expected  # a string is one user turn
    example = {"prompt": "What is 48 + 27?", "answer": "75",
               "messages": user + [{"role": "assistant", "content": "<think>8+7=15</think>75"}]}  # fmt: skip
    assert chat_prompt_ids(tok, example) == expected  # a task example: its answer is left out
    assert chat_prompt_ids(tok, {"prompt": "What is 48 + 27?"}) == expected
    history = user + [{"role": "assistant", "content": "75"}, {"role": "user", "content": "And 75 - 27?"}]
    assert len(chat_prompt_ids(tok, history)) > len(expected)  # a list keeps earlier assistant turns


class CharTokenizer:
    """No chat template; one id per character, so the prompt text can be read back exactly."""

    chat_template = None

    def encode(self, text, add_special_tokens=False):
        assert not add_special_tokens
        return [ord(c) for c in text]


def test_chat_prompt_ids_without_a_template_write_the_r1_format():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"}]  # fmt: skip
    text = "".join(map(chr, chat_prompt_ids(CharTokenizer(), messages)))
    assert text == f"{BOS}Be brief.{USER}hi{ASSISTANT}hello{EOS}{USER}2+2?{ASSISTANT}<think>\n"
    assert "".join(map(chr, chat_prompt_ids(CharTokenizer(), "2+2?"))) == f"{BOS}{USER}2+2?{ASSISTANT}<think>\n"

def test_reply_streams_reasoning_dim_then_answer(tiny):
    model, tok = tiny
    out = io.StringIO()
    session = ChatSession(model, tok, out=out, color=True, max_new_tokens=256)
    reply = session.send("What is 123 + 456?")
    assert not reply.stopped and reply.answer.lstrip("-").isdigit()  # a bare integer (right or not: a 2M model)
    assert "column" in reply.reasoning and "123" in reply.reasoning
    text = out.getvalue()
    assert text.startswith(DIM) and RESET in text
    answer_at = text.rindex(reply.answer)
    assert text.rfind(DIM, 0, answer_at) < text.rfind(RESET, 0, answer_at)  # the answer is not dimmed
    # history: the answer only (R1 drops earlier reasoning), then a second turn and a reset
    assert session.history == [{"role": "user", "content": "What is 123 + 456?"},
                               {"role": "assistant", "content": reply.answer}]  # fmt: skip
    reply2 = session.send("What is 20 + 31?")
    assert reply2.answer.isdigit() and len(session.history) == 4
    session.reset()
    assert session.history == []


def test_ctrl_c_stops_generation_not_the_session(tiny):
    model, tok = tiny
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a job started with `&`
    session = ChatSession(model, tok, out=io.StringIO(), color=False, max_new_tokens=256)
    session.on_step = lambda step: signal.raise_signal(signal.SIGINT) if step == 3 else None
    reply = session.send("What is 123 + 456?")  # a real SIGINT mid-generation: no KeyboardInterrupt escapes
    assert reply.stopped and reply.tokens <= 5 and session.history == []
    session.on_step = None
    assert session.send("What is 123 + 456?").answer == reply_again_expected(model, tok)  # the next turn works
    assert signal.getsignal(signal.SIGINT) is before  # the handler was restored


def reply_again_expected(model, tok) -> str:
    return ChatSession(model, tok, out=io.StringIO(), color=False, max_new_tokens=256).send("What is 123 + 456?").answer


def _cli(*args, stdin=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "deepseek.cli", "chat", *args], input=stdin, capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=120)  # fmt: skip


def test_cli_one_shot_and_interactive():
    r = _cli("--prompt", "What is 12 + 34?", "--color", "never")
    assert r.returncode == 0, r.stderr
    assert "[thinking]" in r.stdout and "[answer]" in r.stdout and r.stdout.strip().splitlines()[-1].isdigit()
    assert r.stdout.count("[answer]") == 1  # the header once, however many blank tokens precede the answer
    r = _cli("--color", "never", stdin="What is 2 + 3?\n/reset\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "[conversation reset]" in r.stdout and "[answer]" in r.stdout


def test_cli_bad_input_is_one_line():
    r = _cli("--model", "deepseek/nope", "--prompt", "hi")
    assert r.returncode == 2 and "deepseek/r1-tiny" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _cli("--max-new-tokens", "0", "--prompt", "hi")
    assert r.returncode == 2 and "--max-new-tokens" in r.stderr
