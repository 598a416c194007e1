"""Constrained decoding: a grammar compiled once per request, a token mask per step and per sequence.

Legend: B rows in a step, V vocab (the model's logits width), W = ceil(V / 32) mask words.

    vocab = GrammarVocab(tokenizer, vocab_size=model.config.vocab_size, eos_ids={1})   # once per model
    grammar = vocab.compile(json_schema_grammar(schema))   # once per request: ConstraintError if invalid
    state = grammar.start(in_reasoning=False)               # per sequence
    logits_BV = mask_logits(logits_BV, [state, None, ...])  # per step; None rows are left untouched
    state.accept(token)                                     # after sampling

Grammars are llguidance's (Lark with embedded `%json {schema}`, JSON schema, regex); why llguidance rather
than xgrammar, with the measurements, is in docs/structured.md. The mask is computed lazily by the
matcher at each step (no per-request precomputation over the vocab), so compiling a request's grammar
costs about a millisecond.

Reasoning: a model that reasons writes `<think> ... </think>` before its answer. A sequence that starts
inside the reasoning (the prompt ends with `<think>`), or whose first generated token is `<think>`, is left
unconstrained until `</think>` (except that it cannot stop there); the grammar applies from the next token on. `force_close_after`: a reasoning
that has not closed after that many tokens gets `</think>` forced, so the answer still fits max_tokens.
"""

from __future__ import annotations

import json
import re

import torch

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_SHIFTS = torch.arange(32, dtype=torch.int32)


class ConstraintError(ValueError):
    """The grammar (or schema, regex, choice list) cannot be used; the message says why (an HTTP 400)."""


def json_schema_grammar(schema: dict | str, lead_newlines: int = 2) -> str:
    """A Lark grammar for one JSON value valid under `schema` (up to `lead_newlines` newlines before it)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise ConstraintError(f"the schema is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise ConstraintError(f"a JSON schema must be an object, got {type(schema).__name__}")
    return _lead(lead_newlines) + f"body: {json_rule(schema)}\n"


def closed_objects(schema):
    """A copy of the schema where every object without `additionalProperties` allows no other keys (what
    OpenAI's strict mode means; pydantic models leave it open, and a small model then invents keys)."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed_objects(v) if k not in ("enum", "const", "default", "examples") else v for k, v in schema.items()}
    if "properties" in out and isinstance(out["properties"], dict):
        out["properties"] = {k: closed_objects(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in out and "patternProperties" not in out:
            out["additionalProperties"] = False
    return out


def json_object_grammar(lead_newlines: int = 2) -> str:
    """Any JSON object (OpenAI's response_format json_object)."""
    return json_schema_grammar({"type": "object"}, lead_newlines)


def regex_grammar(pattern: str, lead_newlines: int = 0) -> str:
    if not isinstance(pattern, str) or not pattern:
        raise ConstraintError("a regex must be a non-empty string")
    return _lead(lead_newlines) + f"body: {lark_regex(pattern)}\n"


def choice_grammar(choices: list[str], lead_newlines: int = 0) -> str:
    """Exactly one of the strings."""
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise ConstraintError("choices must be a non-empty list of non-empty strings")
    return _lead(lead_newlines) + "body: " + " | ".join(lark_string(c) for c in choices) + "\n"


def json_rule(schema: dict) -> str:
    """A Lark rule body matching one JSON value under the schema (llguidance's %json), written compactly
    (`, ` and `: ` separators, no other whitespace: a small model left free to add whitespace may never stop)."""
    options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", **schema.get("x-guidance", {})}
    return "%json " + json.dumps({**schema, "x-guidance": options}, ensure_ascii=False)


def lark_string(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def lark_regex(pattern: str) -> str:
    return "/" + pattern.replace("/", "\\/") + "/"


def _lead(n: int) -> str:
    return f'start: "\\n"{{0,{n}}} body\n' if n else "start: body\n"


class GrammarVocab:
    """The model's tokenizer as llguidance sees it (built once per model: ~5 ms at 1K tokens, ~0.2 s at 32K)."""

    def __init__(self, tokenizer, vocab_size: int | None = None, eos_ids=None):
        import llguidance
        import llguidance.hf

        from .. import chat

        self.vocab_size = vocab_size or len(tokenizer)
        eos = sorted(eos_ids) if eos_ids else [tokenizer.eos_token_id]
        self.eos_ids = eos
        self.tokenizer = tokenizer
        self.ll = llguidance.hf.from_tokenizer(tokenizer, n_vocab=self.vocab_size, eos_token=eos)
        self.think_open = _single_id(tokenizer, chat.THINK_OPEN)
        self.think_close = _single_id(tokenizer, chat.THINK_CLOSE)

    def special_id(self, text: str) -> int | None:
        """The id of `text` when the tokenizer has it as one special token (DeepSeek's tool-call markers)."""
        i = _single_id(self.tokenizer, text)
        return i if i is not None and self.ll.is_special_token(i) else None

    def literal(self, text: str) -> str:
        """A Lark element for `text`: the special token by id when it is one, else the string."""
        i = self.special_id(text)
        return f"<[{i}]>" if i is not None else lark_string(text)

    def compile(self, lark: str, force_close_after: int | None = None) -> Grammar:
        """Compile and check a Lark grammar; ConstraintError (with llguidance's message) when it is unusable."""
        from llguidance import LLMatcher

        grammar = LLMatcher.grammar_from_lark(lark)
        is_err, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.ll)
        if is_err:
            raise ConstraintError(_clean(messages[0]))
        matcher = LLMatcher(self.ll, grammar, log_level=0)
        if matcher.is_error():
            raise ConstraintError(_clean(matcher.get_error()))
        return Grammar(self, matcher, force_close_after)


def _clean(message: str) -> str:
    """llguidance's message on one line, without its source excerpts and carets."""
    lines = [x.strip() for x in message.strip().splitlines()]
    keep = [x for x in lines if x and not re.fullmatch(r"[\^\s]+|\d+ \|.*", x) and x != "^"]
    return " ".join(keep)[:500] or "invalid grammar"


def _single_id(tokenizer, text: str) -> int | None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


class Grammar:
    """A compiled grammar; `start` gives each sequence its own matcher (a copy: compiled once)."""

    def __init__(self, vocab: GrammarVocab, matcher, force_close_after: int | None = None):
        self.vocab, self.matcher, self.force_close_after = vocab, matcher, force_close_after

    def start(self, in_reasoning: bool = False) -> GrammarState:
        return GrammarState(self, self.matcher.deep_copy(), "reasoning" if in_reasoning else "start")


class GrammarState:
    """One sequence's place in its grammar. phase: start (the first token may open a reasoning), reasoning
    (free until </think>), grammar (masked), done (complete: only a stop token is allowed), ended (stopped)."""

    def __init__(self, grammar: Grammar, matcher, phase: str):
        self.grammar, self.matcher, self.phase = grammar, matcher, phase
        self.reasoning_tokens = 0
        self.error: Exception | None = None  # set when computing this state's mask failed

    @property
    def free(self) -> bool:
        """No grammar mask this step (see `no_stop` for reasoning)."""
        if self.phase != "reasoning":
            return self.phase == "ended"
        limit = self.grammar.force_close_after
        return limit is None or self.reasoning_tokens < limit or self.grammar.vocab.think_close is None

    @property
    def no_stop(self) -> bool:
        """A free reasoning step: any token but a stop token (the answer under the grammar must still come)."""
        return self.phase == "reasoning" and self.free

    def fill(self, bitmask_W: torch.Tensor) -> None:
        """Write this step's allowed tokens into one int32 row of the bitmask."""
        vocab = self.grammar.vocab
        if self.phase == "reasoning":  # past its budget: only </think>
            bitmask_W.zero_()
            _set_bit(bitmask_W, vocab.think_close)
            return
        if self.phase == "done":  # the grammar is complete: only a stop token
            bitmask_W.zero_()
            for i in vocab.eos_ids:
                _set_bit(bitmask_W, i)
            return
        from llguidance.torch import fill_next_token_bitmask

        fill_next_token_bitmask(self.matcher, bitmask_W[None], 0)
        if self.phase == "start" and vocab.think_open is not None:
            _set_bit(bitmask_W, vocab.think_open)

    def accept(self, token: int) -> None:
        """Advance past the sampled token; ValueError if the grammar does not allow it."""
        if self.error is not None:
            raise self.error
        vocab = self.grammar.vocab
        if self.phase == "start" and token == vocab.think_open and vocab.think_open is not None:
            self.phase = "reasoning"
            return
        if self.phase == "reasoning":
            self.reasoning_tokens += 1
            if token == vocab.think_close:
                self.phase = "grammar"
            return
        if self.phase == "ended":
            return
        if self.phase == "done":
            if token not in vocab.eos_ids:
                raise ValueError(f"token {token} after the end of the grammar")
            self.phase = "ended"
            return
        self.phase = "grammar"
        if not self.matcher.consume_token(token):
            raise ValueError(f"token {token} is not allowed by the grammar: {self.matcher.get_error()}")
        if token in vocab.eos_ids:
            self.phase = "ended"
        elif self.matcher.is_stopped():
            self.phase = "done"

    @property
    def complete(self) -> bool:
        """The output so far is a whole sentence of the grammar."""
        return self.phase in ("done", "ended") or (self.phase == "grammar" and self.matcher.is_accepting())


def _set_bit(bitmask_W: torch.Tensor, i: int) -> None:
    word, bit = divmod(i, 32)
    bitmask_W[word] |= torch.tensor(1 << bit, dtype=torch.int64).to(torch.int32)


def mask_logits(logits_BV: torch.Tensor, states: list) -> torch.Tensor:
    """Set the logits of tokens the grammar forbids to -inf in the rows whose state constrains this step (in
    place; the rows whose state is None or free are not touched). Returns logits_BV."""
    for b, s in enumerate(states):
        if s is not None and s.no_stop:
            logits_BV[b, s.grammar.vocab.eos_ids] = float("-inf")
    rows = [b for b, s in enumerate(states) if s is not None and not s.free]
    if not rows:
        return logits_BV
    V = logits_BV.shape[-1]
    W = (V + 31) // 32
    bitmask = torch.zeros(len(rows), W, dtype=torch.int32)
    for r, b in enumerate(rows):
        try:
            states[b].fill(bitmask[r])
        except Exception as exc:  # this row alone fails, at its accept
            states[b].error = exc
            bitmask[r] = -1
    allowed = ((bitmask[:, :, None] >> _SHIFTS) & 1).view(len(rows), W * 32)[:, :V].bool()
    index = torch.tensor(rows, device=logits_BV.device)
    sub = logits_BV.index_select(0, index)
    sub.masked_fill_(~allowed.to(logits_BV.device), float("-inf"))
    logits_BV.index_copy_(0, index, sub)
    return logits_BV
