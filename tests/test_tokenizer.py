"""The BPE tokenizer: trains offline, reloads through AutoTokenizer, round-trips bytes, keeps special ids
fixed, renders the chat template exactly, and marks assistant tokens."""

from __future__ import annotations

import argparse
import json

import pytest
from transformers import AutoTokenizer

from deepseek.tasks import get_task
from deepseek.tokenizer import SPECIAL_TOKENS, default_corpus, train_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(default_corpus(n_per_task=120), vocab_size=1024, out_dir=out, show_progress=False)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return AutoTokenizer.from_pretrained(tok_dir)


def test_saved_files_and_special_ids(tok_dir, tok):
    assert (tok_dir / "tokenizer.json").exists() and (tok_dir / "tokenizer_config.json").exists()
    assert 600 < len(tok) <= 1024
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(len(SPECIAL_TOKENS)))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)  # as in tests.helpers.tiny_config
    for t in ("<image>", "<audio>", "<points>", "<think>", "</think>", "<|assistant|>"):
        assert tok(t, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(t)]  # one token


def test_byte_level_round_trip_and_digits(tok):
    for text in ["plain words, with punctuation!", "  leading spaces\n\ttabs", "émoji 🙂 漢字 ∑ x²", "a" * 300,
                 "What is 4738 * 592?"]:  # fmt: skip
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    ids = tok("1234567890", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == list("1234567890")  # one digit per token
    common = tok("The pass key is", add_special_tokens=False)["input_ids"]
    assert len(common) <= 5  # merges learned from the corpus: far fewer tokens than bytes (15)


def test_chat_template_exact_rendering(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "<think>\n2 + 3 = 5\n</think>\n\n5"}]  # fmt: skip
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<|bos|><|system|>Be brief.<|user|>What is 2 + 3?<|assistant|><think>\n2 + 3 = 5\n</think>\n\n5<|eos|>"
    )
    assert tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True).endswith(
        "<|user|>What is 2 + 3?<|assistant|>"
    )
    with_rc = [msgs[1], {"role": "assistant", "content": "5", "reasoning_content": "2 + 3 = 5"}]
    assert tok.apply_chat_template(with_rc, tokenize=False).endswith(
        "<|assistant|><think>\n2 + 3 = 5\n</think>\n\n5<|eos|>"
    )
    out = tok.apply_chat_template(msgs, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    first = mask.index(1)
    assert ids[first - 1] == tok.convert_tokens_to_ids("<|assistant|>") and ids[first] == tok.convert_tokens_to_ids("<think>")
    assert ids[-1] == tok.eos_token_id and mask[-1] == 1 and sum(mask) == len(ids) - first
    # decoding without specials keeps the reasoning markers but drops role markers and eos
    text = tok.decode(ids, skip_special_tokens=True)
    assert "<think>" in text and "</think>" in text and "<|" not in text
    with pytest.raises(Exception, match="role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)


def test_passkey_length_is_exact_with_a_tokenizer(tok):
    task = get_task("passkey", tokenizer=tok)
    for ex in task.generate(3, seed=0, difficulty=1000):
        n = len(tok(ex["prompt"], add_special_tokens=False)["input_ids"])
        assert n == ex["context_tokens"] and 900 <= n <= 1000


def test_inputs_files_folders_and_errors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("alpha beta gamma delta " * 50)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"record number {i} zeta"}) for i in range(20)))
    tok = train_tokenizer([tmp_path / "docs", tmp_path / "b.jsonl"], vocab_size=300, show_progress=False)
    assert len(tok) == 300
    assert len(tok(" gamma", add_special_tokens=False)["input_ids"]) == 1  # learned from the folder
    assert len(tok(" zeta", add_special_tokens=False)["input_ids"]) == 1  # learned from the jsonl
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["x"], vocab_size=100)
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer([""], vocab_size=300)
    with pytest.raises(FileNotFoundError, match="no such file"):
        train_tokenizer([tmp_path / "missing.txt"], vocab_size=300)


def test_cli_train(tmp_path, capsys):
    from deepseek.cli import tokenizer as tokenizer_command

    parser = argparse.ArgumentParser()
    tokenizer_command.add_parser(parser.add_subparsers(dest="command"))
    (tmp_path / "c.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    args = parser.parse_args(["tokenizer", "train", str(tmp_path / "c.txt"), "--out", str(tmp_path / "t"),
                              "--vocab-size", "290"])  # fmt: skip
    assert args.func(args) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["vocab_size"] <= 290 and AutoTokenizer.from_pretrained(tmp_path / "t").eos_token == "<|eos|>"
    bad = parser.parse_args(["tokenizer", "train", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "u")])
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        bad.func(bad)
