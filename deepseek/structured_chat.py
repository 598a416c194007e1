"""Structured answers for the SDK's `R1Model.chat`: a pydantic model or JSON schema as `response_format`, and
`tools` whose calls come back parsed.

    person = model.chat(messages, response_format=Person)          # a validated Person
    calls = model.chat(messages, tools=[get_weather_tool])          # [ToolCall(name, arguments, id)]

Both run constrained decoding (deepseek/generation/constrained.py) on the one generation loop; the model's
reasoning, if it writes one, is left free until `</think>`. `tool_choice` is "required" by default here (the
call returns tool calls; "auto" lets the model answer in text, then `chat` returns its Reply), or a tool name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from . import chat_tools
from .generation.constrained import GrammarVocab, closed_objects, json_schema_grammar


@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str = ""


def _vocab(model, tokenizer) -> GrammarVocab:
    cached = getattr(tokenizer, "_deepseek_grammar_vocab", None)
    if cached is None or cached.vocab_size != model.config.vocab_size:
        eos = model.config.eos_token_id
        eos_ids = {eos} if isinstance(eos, int) else set(eos or [tokenizer.eos_token_id])
        cached = GrammarVocab(tokenizer, model.config.vocab_size, eos_ids)
        try:
            tokenizer._deepseek_grammar_vocab = cached
        except AttributeError:
            pass
    return cached


def tool_definition(tool) -> dict:
    """An OpenAI tool dict as is; a pydantic model class as a function named after it, taking its fields."""
    if isinstance(tool, dict):
        return tool
    if hasattr(tool, "model_json_schema"):
        return {"type": "function", "function": {"name": tool.__name__, "description": (tool.__doc__ or "").strip(),
                                                 "parameters": tool.model_json_schema()}}  # fmt: skip
    raise TypeError(f"a tool is an OpenAI tool dict or a pydantic model class, got {type(tool).__name__}")


class Structured:
    """The prompt, grammar state and result parser of one constrained `chat` call."""

    def __init__(self, model, tokenizer, messages, response_format=None, tools=None, tool_choice="required",
                 reasoning_budget: int | None = None):  # fmt: skip
        self.tokenizer = tokenizer
        self.format = response_format
        self.tools = chat_tools.check_tools([tool_definition(t) for t in tools]) if tools else None
        vocab = _vocab(model, tokenizer)
        self.ids = None
        lark = None
        if response_format is not None:
            schema = response_format.model_json_schema() if hasattr(response_format, "model_json_schema") else response_format
            lark = json_schema_grammar(closed_objects(schema))
        if self.tools:
            names = None if tool_choice in ("required", "auto") else [tool_choice]
            known = [t["name"] for t in self.tools]
            if names is not None and tool_choice not in known:
                raise ValueError(f"tool_choice {tool_choice!r} is not one of the tools ({', '.join(known)})")
            if tool_choice != "auto":
                lark = chat_tools.tool_grammar(vocab, self.tools, names, parallel=names is None)
            msgs = [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
            self.ids = chat_tools.prompt_ids(tokenizer, msgs, self.tools)
        self.grammar = vocab.compile(lark, force_close_after=reasoning_budget) if lark is not None else None

    def start(self, prompt_ids: list[int], max_new_tokens: int):
        """The grammar state for this prompt (free until </think> when the prompt opens the reasoning; past
        the reasoning budget, half of max_new_tokens by default, </think> is forced)."""
        if self.grammar is None:
            return None
        if self.grammar.force_close_after is None:
            self.grammar.force_close_after = max_new_tokens // 2
        tail = self.tokenizer.decode(prompt_ids[-4:], skip_special_tokens=False)
        return self.grammar.start(in_reasoning=tail.rstrip().endswith("<think>"))

    def result(self, tokens: list[int], reply):
        """The validated object (response_format), the tool calls (tools), or `reply` when the model answered
        in text with tool_choice "auto"."""
        eos = self.tokenizer.eos_token_id
        text = self.tokenizer.decode([t for t in tokens if t != eos], skip_special_tokens=False)
        if "</think>" in text:
            text = text.split("</think>", 1)[1]
        text = text.strip()
        if self.tools:
            _, calls = chat_tools.parse_tool_calls(text)
            if not calls:
                return reply
            return [ToolCall(c["function"]["name"], json.loads(c["function"]["arguments"] or "{}"), c["id"])
                    for c in calls]  # fmt: skip
        if hasattr(self.format, "model_validate_json"):
            return self.format.model_validate_json(text)
        return json.loads(text)
