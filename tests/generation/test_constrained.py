"""Constrained decoding on the bundled r1-tiny tokenizer and model: grammar states and masks, the reasoning
phase, the tool-call format (render, parse, stream), and the SDK's R1Model.chat(response_format=, tools=)."""

from __future__ import annotations

import json
from typing import Literal

import pytest
import torch
from pydantic import BaseModel, Field

from deepseek import chat_tools as ct
from deepseek.generation.constrained import (
    ConstraintError,
    GrammarVocab,
    choice_grammar,
    closed_objects,
    json_object_grammar,
    json_schema_grammar,
    mask_logits,
    regex_grammar,
)

ADD = {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}}}  # fmt: skip


@pytest.fixture(scope="module")
def model():
    from deepseek import R1Model

    return R1Model.from_pretrained("deepseek/r1-tiny")


@pytest.fixture(scope="module")
def tok(model):
    return model.tokenizer()


@pytest.fixture(scope="module")
def vocab(model, tok):
    return GrammarVocab(tok, model.config.vocab_size, {tok.eos_token_id})


def allowed(state, V) -> set[int]:
    logits = torch.zeros(1, V)
    mask_logits(logits, [state])
    return set(torch.isfinite(logits[0]).nonzero()[:, 0].tolist())


def walk(vocab, tok, grammar, text, in_reasoning=False):
    """Feed the tokens of `text` one by one, checking each is allowed by the mask first."""
    state = vocab.compile(grammar).start(in_reasoning)
    for t in tok.encode(text, add_special_tokens=False):
        assert t in allowed(state, vocab.vocab_size), (t, tok.decode([t]))
        state.accept(t)
    return state


def test_json_schema_accepts_valid_and_masks_the_rest(vocab, tok):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "c": {"enum": ["x", "y"]}}, "required": ["n", "c"],
              "additionalProperties": False}  # fmt: skip
    state = walk(vocab, tok, json_schema_grammar(schema), '{"n": 7, "c": "y"}')
    assert state.complete
    assert allowed(state, vocab.vocab_size) == {tok.eos_token_id}  # complete: only a stop token
    state.accept(tok.eos_token_id)
    assert state.phase == "ended" and allowed(state, vocab.vocab_size) == set(range(vocab.vocab_size))
    bad = vocab.compile(json_schema_grammar(schema)).start()
    for t in tok.encode('{"n": ', add_special_tokens=False):
        bad.accept(t)
    digits = {i for i in allowed(bad, vocab.vocab_size)}
    assert tok.encode("7", add_special_tokens=False)[0] in digits
    assert not any(tok.decode([i]).startswith("1") and len(tok.decode([i])) > 1 for i in digits)  # <= 9
    with pytest.raises(ValueError):
        bad.accept(tok.encode("x", add_special_tokens=False)[0])


def test_json_object_regex_choice(vocab, tok):
    assert walk(vocab, tok, json_object_grammar(), '\n\n{"a": [1, 2, {"b": null}]}').complete
    assert walk(vocab, tok, regex_grammar("[0-9]{3}-[a-z]+"), "123-abc").complete
    assert walk(vocab, tok, choice_grammar(["yes", "no"]), "no").complete
    with pytest.raises(ConstraintError, match="Invalid type"):
        vocab.compile(json_schema_grammar({"type": "foo"}))
    with pytest.raises(ConstraintError, match="Unimplemented keys"):
        vocab.compile(json_schema_grammar({"type": "object", "if": {}}))
    with pytest.raises(ConstraintError):
        choice_grammar([])


def test_reasoning_is_free_until_think_closes(vocab, tok):
    V = vocab.vocab_size
    state = vocab.compile(json_object_grammar()).start(in_reasoning=False)
    first = allowed(state, V)
    assert vocab.think_open in first and len(first) < V  # the first token may open a reasoning, or the JSON
    state.accept(vocab.think_open)
    assert allowed(state, V) == set(range(V)) - {tok.eos_token_id}  # free, but no stop before </think>
    for t in tok.encode("2 + 2 = 4\n", add_special_tokens=False):
        state.accept(t)
    state.accept(vocab.think_close)
    assert state.phase == "grammar" and len(allowed(state, V)) < V
    forced = vocab.compile(json_object_grammar(), force_close_after=3).start(in_reasoning=True)
    for t in tok.encode("abc", add_special_tokens=False)[:3]:
        assert len(allowed(forced, V)) == V - 1
        forced.accept(t)
    if forced.reasoning_tokens >= 3:
        assert allowed(forced, V) == {vocab.think_close}  # the budget is spent: </think> is forced


def test_closed_objects_closes_nested_objects():
    s = closed_objects({"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {}}}},
                        "$defs": {"D": {"type": "object", "properties": {"x": {}}}}})  # fmt: skip
    assert s["additionalProperties"] is False and s["properties"]["a"]["additionalProperties"] is False
    assert s["$defs"]["D"]["additionalProperties"] is False


def test_mask_leaves_free_rows_untouched(vocab):
    logits = torch.randn(3, vocab.vocab_size)
    before = logits.clone()
    state = vocab.compile(choice_grammar(["yes"])).start()
    mask_logits(logits, [None, state, None])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    assert torch.isfinite(logits[1]).sum() < vocab.vocab_size


def test_tool_format_render_parse_and_stream(tok, vocab):
    tools = ct.check_tools([ADD])
    msgs = [{"role": "user", "content": "2+3"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function", "function": {
                "name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
            {"role": "tool", "tool_call_id": "c", "content": "5"}, {"role": "tool", "content": "ok"}]  # fmt: skip
    text = ct.render(tok, msgs, tools)
    assert text.startswith("<|bos|><|system|>## Tools") and text.endswith("<|assistant|>")
    assert (ct.OUTPUTS_BEGIN + ct.OUTPUT_BEGIN + "5" + ct.OUTPUT_END + ct.OUTPUT_BEGIN + "ok" + ct.OUTPUT_END
            + ct.OUTPUTS_END) in text  # fmt: skip
    assert "<|assistant|>" + ct.calls_text(msgs[1]["tool_calls"]) + "<|eos|>" in text
    calls_text = ct.calls_text(msgs[1]["tool_calls"] * 2)  # parallel calls
    content, calls = ct.parse_tool_calls("Sure." + calls_text)
    assert content == "Sure." and [c["function"]["name"] for c in calls] == ["add", "add"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 2, "b": 3}
    v31 = f"{ct.CALLS_BEGIN}{ct.CALL_BEGIN}add{ct.SEP}{{\"a\": 1}}{ct.CALL_END}{ct.CALLS_END}"
    assert ct.parse_tool_calls(v31)[1][0]["function"] == {"name": "add", "arguments": '{"a": 1}'}
    assert ct.parse_tool_calls("no calls") == ("no calls", [])
    stream, content, deltas = ct.ToolCallStream(), "", []
    whole = "Sure." + calls_text
    for i in range(0, len(whole), 3):
        c, d = stream.feed(whole[i : i + 3])
        content, deltas = content + c, deltas + d
    c, d = stream.feed("", final=True)
    content, deltas = content + c, deltas + d
    assert content == "Sure."
    args = {}
    for d in deltas:
        args[d["index"]] = args.get(d["index"], "") + d["function"]["arguments"]
    assert [json.loads(a) for a in args.values()] == [{"a": 2, "b": 3}] * 2
    assert all("id" in d for d in deltas if d["function"].get("name"))
    g = vocab.compile(ct.tool_grammar(vocab, tools, ["add"], parallel=True))
    st = g.start()
    for t in tok.encode("\n\n" + calls_text, add_special_tokens=False):
        st.accept(t)
    assert st.complete
    with pytest.raises(ct.ToolError, match="defined twice"):
        ct.check_tools([ADD, ADD])


class Sum(BaseModel):
    value: int = Field(ge=0, le=200)
    kind: Literal["sum", "difference"]


def test_sdk_chat_returns_a_validated_object_and_tool_calls(model):
    out = model.chat("What is 48 + 27?", response_format=Sum, max_new_tokens=200)
    assert isinstance(out, Sum)
    calls = model.chat("Add 2 and 3", tools=[ADD], tool_choice="add", max_new_tokens=300)
    assert len(calls) == 1 and calls[0].name == "add"
    assert set(calls[0].arguments) == {"a", "b"} and all(0 <= v <= 99 for v in calls[0].arguments.values())


def test_tool_markers_as_special_tokens(tmp_path):
    """A DeepSeek-style tokenizer with each tool marker as one special token: the grammar names the markers
    by id, the model's calls (decoded with special tokens kept) parse back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    markers = [ct.CALLS_BEGIN, ct.CALLS_END, ct.CALL_BEGIN, ct.CALL_END, ct.SEP]
    specials = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<think>", "</think>", *markers]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(['{"a": 1, "b": 2} function add json'] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=specials[0], eos_token=specials[1])
    vocab = GrammarVocab(tok, len(tok), {tok.eos_token_id})
    assert all(vocab.special_id(m) is not None for m in markers)
    text = ct.calls_text([{"function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}])
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[0] == vocab.special_id(ct.CALLS_BEGIN) and ids[-1] == vocab.special_id(ct.CALLS_END)
    state = vocab.compile(ct.tool_grammar(vocab, ct.check_tools([ADD]), ["add"], parallel=False)).start()
    for t in ids:
        assert t in allowed(state, vocab.vocab_size), tok.decode([t])
        state.accept(t)
    assert state.complete
    calls = ct.parse_tool_calls(tok.decode(ids, skip_special_tokens=False))[1]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [("add", {"a": 1, "b": 2})]
