"""One request inside the engine: its sampling parameters, its tokens, and turning tokens into text.

Legend: V vocab.

`TextStream` turns the growing list of generated ids into text deltas: it holds back an incomplete UTF-8
character, a possible beginning of a stop string, and a possible beginning of the `</think>` tag, then splits
what it emits into `reasoning` (inside <think> ... </think>, as DeepSeek-R1 writes it) and `content`.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

from ..chat import THINK_CLOSE, THINK_OPEN

_ids = itertools.count()


@dataclass
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k logprobs per generated token (None: none)
    prompt_logprobs: int | None = None  # top-k logprobs per prompt token (echo + logprobs)
    timeout_s: float | None = None
    parse_reasoning: bool = True  # split <think>...</think> out as reasoning (chat); False: raw text (completions)
    grammar: object = None  # a compiled constrained.Grammar: each sequence's tokens follow it (None: free)

    def __post_init__(self):
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:  # also false for NaN
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


@dataclass
class Output:
    """What the engine reports for a sequence after a step (a delta) or at its end (finish_reason set)."""

    request_id: str
    text: str = ""  # content delta
    reasoning: str = ""  # reasoning delta
    token_ids: list[int] = field(default_factory=list)  # tokens added by this step
    logprobs: list[tuple[float, dict[int, float]]] = field(default_factory=list)  # per new token
    prompt_logprobs: list | None = None  # per prompt token (None for the first), set on the first output
    finish_reason: str | None = None  # stop | length | cancelled | timeout | error
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    first_token_time: float | None = None

    def merge(self, delta: Output) -> None:
        """Add a later delta of the same sequence to this running total (the final one brings the counts)."""
        self.request_id = self.request_id or delta.request_id
        self.text += delta.text
        self.reasoning += delta.reasoning
        self.token_ids += delta.token_ids
        self.logprobs += delta.logprobs
        self.prompt_logprobs = self.prompt_logprobs or delta.prompt_logprobs
        self.first_token_time = self.first_token_time or delta.first_token_time
        if delta.finish_reason is not None:
            self.finish_reason, self.error = delta.finish_reason, delta.error
            self.prompt_tokens, self.completion_tokens = delta.prompt_tokens, delta.completion_tokens
            self.reasoning_tokens = delta.reasoning_tokens


class TextStream:
    def __init__(self, tokenizer, stop: list[str], starts_in_reasoning: bool, skip_ids: set[int],
                 parse_reasoning: bool = True):  # fmt: skip
        self.tokenizer = tokenizer
        self.parse_reasoning = parse_reasoning
        self.stop = stop
        self.skip_ids = skip_ids
        self.in_reasoning_at_start = starts_in_reasoning
        self.sent_reasoning = 0
        self.sent_content = 0
        self.stopped = False  # a stop string was found
        self.reasoning_closed_at: int | None = None  # number of tokens when </think> first appeared

    def split(self, text: str) -> tuple[str, str, bool]:
        """(reasoning, content, reasoning_closed) of the visible text."""
        if not self.parse_reasoning:
            return "", text, False
        body = text
        in_reasoning = self.in_reasoning_at_start
        if not in_reasoning and body.lstrip().startswith(THINK_OPEN):
            body, in_reasoning = body.lstrip()[len(THINK_OPEN) :], True
        if not in_reasoning:
            return "", body, False
        end = body.find(THINK_CLOSE)
        if end < 0:
            return body, "", False
        return body[:end], body[end + len(THINK_CLOSE) :].lstrip("\n"), True

    def update(self, ids: list[int], final: bool) -> tuple[str, str]:
        """Given all generated ids so far, return the (reasoning, content) deltas safe to emit now."""
        text = self.tokenizer.decode([i for i in ids if i not in self.skip_ids], skip_special_tokens=False)
        cut = len(text)
        for s in self.stop:
            i = text.find(s)
            if i >= 0 and i < cut:
                cut, self.stopped = i, True
        text = text[:cut]
        if not final and not self.stopped:
            text = text[: len(text) - self._holdback(text)]
        reasoning, content, closed = self.split(text)
        if closed and self.reasoning_closed_at is None:
            self.reasoning_closed_at = len(ids)
        d_r, d_c = reasoning[self.sent_reasoning :], content[self.sent_content :]
        self.sent_reasoning, self.sent_content = len(reasoning), len(content)
        return d_r, d_c

    def _holdback(self, text: str) -> int:
        """Characters at the end that may still change: a partial UTF-8 char or a partial stop / tag."""
        if text.endswith("\ufffd"):
            return len(text) - len(text.rstrip("\ufffd"))
        n = 0
        for s in [*self.stop, *((THINK_CLOSE, THINK_OPEN) if self.parse_reasoning else ())]:
            for k in range(min(len(s) - 1, len(text)), n, -1):
                if text.endswith(s[:k]):
                    n = k
                    break
        return n

    def reasoning_tokens(self, n_generated: int) -> int:
        if self.reasoning_closed_at is not None:
            return self.reasoning_closed_at
        if not self.parse_reasoning:
            return 0
        return n_generated if (self.in_reasoning_at_start or self.sent_reasoning) else 0


class Sequence:
    def __init__(self, prompt_ids: list[int], params: SamplingParams, stream: TextStream, request_id=None):
        self.request_id = request_id or f"req-{next(_ids)}"
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.stream = stream
        self.output_ids: list[int] = []
        self.slot: int | None = None
        self.finish_reason: str | None = None
        self.cancelled = False
        self.arrival = time.monotonic()
        self.deadline = self.arrival + params.timeout_s if params.timeout_s else None
        self.first_token_time: float | None = None
        self.generator = None  # torch.Generator when seeded sampling
        self.pending_logits = None  # (V,) logits for the next token (after prefill / decode)
        self.listeners = []  # callables(Output)
        self.new_logprobs = None  # (logprob, {id: logprob}) of the token just sampled, when asked for
        self.prompt_logprobs = None  # set by prefill when params.prompt_logprobs is not None
        self.prompt_logprobs_sent = False
        # per-sequence grammar state (deepseek.generation.constrained): masks this sequence's logits each step
        self.grammar = params.grammar.start(stream.in_reasoning_at_start) if params.grammar is not None else None
        self.media: dict | None = None  # decoded media for the prompt's placeholders (projected at prefill)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def usage(self) -> dict:
        n = len(self.output_ids)
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": n,
                "reasoning_tokens": self.stream.reasoning_tokens(n)}  # fmt: skip
