"""The serving engine: continuous batching over the model's decode path, usable from Python without HTTP.

    from deepseek.serve.engine import Engine
    engine = Engine.from_pretrained("deepseek/r1-tiny")          # or any model folder with a tokenizer
    print(engine.generate_text("Hello", SamplingParams(max_tokens=16)))
    for out in engine.stream(engine.tokenizer.encode("Hi"), SamplingParams()):  # Output deltas
        print(out.text, end="")
    engine.close()

A background thread runs steps, each schedule -> run -> postprocess: the scheduler ends cancelled / timed-out
sequences and admits waiting ones into free cache slots; the runner prefills the admitted prompts (a prefix
already in the prefix cache is copied in, not recomputed; the text prompts of a step go in one right-padded
batch) and decodes all running sequences in one batch; postprocessing samples, turns tokens into text, checks
stops and notifies listeners. `submit` is thread-safe; listeners are called on the engine thread and must not block.

Isolation: whatever goes wrong with one sequence (its prefill, its sampling, its text) ends that sequence with
finish_reason "error"; if a batched prefill or the batched decode itself fails, each sequence is retried alone
and only the ones that fail alone end. The cache commits a step only after its forward pass, so a retry starts
from the same state.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .runner import ModelRunner
from .scheduler import QueueFull, Scheduler
from .sequence import THINK_OPEN, Output, SamplingParams, Sequence, TextStream

__all__ = ["Engine", "EngineConfig", "QueueFull", "SamplingParams", "Output"]

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    max_running: int = 32  # sequences decoded together (= cache slots)
    max_waiting: int = 256  # queued beyond that -> QueueFull (HTTP 503)
    max_model_len: int | None = None  # prompt + completion per sequence; None: the model's context, capped
    default_max_model_len: int = 4096  # the cap when max_model_len is None (each slot reserves this many)
    prefill_token_budget: int = 2048  # prompt tokens prefilled per step (the first admitted always runs)
    default_timeout_s: float | None = 600.0
    idle_wait_s: float = 0.5  # an idle engine thread rechecks for work this often (submit wakes it at once)
    prefix_cache_tokens: int = 8192  # latents of computed prompt prefixes kept for reuse (0: no prefix cache)
    prefix_block_size: int = 16  # prefixes are matched in whole blocks of this many tokens

    def __post_init__(self):
        if self.max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {self.max_running}")
        if self.prefix_block_size < 1 or not (self.prefix_cache_tokens == 0
                                              or self.prefix_cache_tokens >= self.prefix_block_size):  # fmt: skip
            raise ValueError(f"prefix_cache_tokens must be 0 or >= prefix_block_size >= 1, got "
                             f"{self.prefix_cache_tokens}, {self.prefix_block_size}")  # fmt: skip
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")


class Engine:
    def __init__(self, model, tokenizer, config: EngineConfig | None = None, model_name: str = "model"):
        self.config = config or EngineConfig()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = model_name
        ctx = model.config.max_position_embeddings
        self.max_model_len = min(self.config.max_model_len or min(ctx, self.config.default_max_model_len), ctx)
        c = self.config
        self.runner = ModelRunner(model, c.max_running, self.max_model_len, c.prefix_cache_tokens, c.prefix_block_size)
        self.scheduler = Scheduler(c.max_running, c.max_waiting, c.prefill_token_budget, slots=self.runner.cache,
                                   cost=self._prefill_cost)  # fmt: skip
        self.max_token_chars = _max_token_chars(tokenizer)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.skip_ids = self.eos_ids | {i for i in [getattr(tokenizer, "bos_token_id", None)] if i is not None}
        # prefill_tokens: prompt tokens computed (prefix_hit_tokens of the prompts came from the prefix cache);
        # prefill_forwards: prefill forward passes (batched or alone); prefix_lookups: prompts that could use
        # the prefix cache, prefix_hits: those that did; prefix_cached_tokens: tokens held in the prefix cache
        self.stats = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0, "finished": 0, "last_batch": 0,
                      "errors": 0, "prefill_forwards": 0, "prefix_lookups": 0, "prefix_hits": 0,
                      "prefix_hit_tokens": 0, "prefix_cached_tokens": 0}  # fmt: skip
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="deepseek-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(cls, name_or_path: str, config: EngineConfig | None = None, dtype=torch.float32):
        from ..loading import load_model_and_tokenizer, served_name

        model, tokenizer = load_model_and_tokenizer(name_or_path, dtype=dtype)
        return cls(model, tokenizer, config, model_name=served_name(name_or_path))

    # ------------------------------------------------------------------ submitting
    def submit(self, prompt_ids: list[int], params: SamplingParams, listener: Callable[[Output], None],
               request_id: str | None = None, media: dict | None = None) -> Sequence:  # fmt: skip
        """Queue a request; listener(Output) is called for each delta and once with finish_reason set.
        media: decoded items ({"image": [...], ...}, deepseek/multimodal/media.py) for the prompt's placeholders
        (K ids per item); they are projected at prefill and live in the cache like tokens after that.
        Raises ValueError (bad request) or QueueFull (too many waiting) before any work is done."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        media = {m: list(items) for m, items in (media or {}).items() if items}
        adapter = getattr(self.model, "multimodal", None)  # R1Model's multimodal component, if any
        if media and adapter is None:
            raise ValueError(f"model {self.model_name} is a text model: it takes no images, audio or points")
        if adapter is not None:  # placeholder ids must match the media (none without media)
            from ..multimodal.lm import check_placeholders

            check_placeholders(adapter.config, torch.tensor(prompt_ids), media)
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"context length ({self.max_model_len})")  # fmt: skip
        vocab = self.model.config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if params.timeout_s is None:
            params.timeout_s = self.config.default_timeout_s
        tail = self.tokenizer.decode(prompt_ids[-4:], skip_special_tokens=False)
        starts_thinking = tail.rstrip().endswith(THINK_OPEN)  # R1 chat templates open the answer with <think>
        stream = TextStream(self.tokenizer, params.stop, starts_thinking, self.skip_ids, params.parse_reasoning)
        seq = Sequence(prompt_ids, params, stream, request_id)
        seq.media = media or None
        seq.listeners.append(listener)
        self.scheduler.add(seq)  # QueueFull beyond max_waiting
        self._wake.set()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence at the next step (client disconnected); its slot is freed there."""
        seq.cancelled = True
        self._wake.set()

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[Output]:
        q: queue.Queue[Output] = queue.Queue()
        seq = self.submit(prompt_ids, params, q.put)
        try:
            while True:
                out = q.get()
                yield out
                if out.finish_reason is not None:
                    return
        finally:
            if seq.finish_reason is None:
                self.cancel(seq)

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Output:
        """Blocking: the whole completion as one Output (text, reasoning, token_ids, usage)."""
        total = Output(request_id="")
        for out in self.stream(prompt_ids, params):
            total.merge(out)
        return total

    def fewest_tokens(self, n_chars: int) -> int:
        """A lower bound on the tokens a text of n_chars characters encodes to (0: no cheap bound for this
        tokenizer). Lets the API refuse an over-long prompt before tokenizing it (about 2 s of CPU per MB)."""
        return n_chars // self.max_token_chars if self.max_token_chars else 0

    def generate_text(self, prompt: str, params: SamplingParams | None = None) -> str:
        return self.generate(self.tokenizer.encode(prompt), params or SamplingParams()).text

    def load(self) -> dict:
        waiting, running = self.scheduler.counts()
        return {"waiting": waiting, "running": running, "free_slots": self.runner.cache.num_free()}

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while not self._stop:
            if not self.scheduler.has_work():
                self._wake.wait(timeout=self.config.idle_wait_s)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception as exc:  # a bug outside the per-sequence guards: fail what runs, keep the engine
                log.exception("engine step failed")
                for seq in self.scheduler.drop(lambda s: True):
                    self._finish(seq, "error", error=f"{type(exc).__name__}: {exc}")
        for seq in self.scheduler.drop(lambda s: True):
            self._finish(seq, "cancelled")

    def step(self) -> None:
        plan = self.scheduler.schedule(time.monotonic())
        for seq, reason in plan.ended:
            self._finish(seq, reason)
        batch = self._run(plan)
        self.stats["steps"] += 1
        self.stats["last_batch"] = len(batch)
        self._postprocess(batch)

    def _run(self, plan) -> list[Sequence]:
        """Forward passes: prefill the admitted prompts, decode the running sequences in one batch. Returns the
        sequences that now have next-token logits, old running ones first (arrival order)."""
        runner = self.runner
        self._prefill(plan.prefill)
        decode = [s for s in plan.decode if s.finish_reason is None]
        if decode:
            try:
                runner.decode(decode)
            except Exception:  # find the culprit: each sequence alone (nothing was committed to the cache)
                log.warning("batched decode of %d sequences failed; retrying each alone", len(decode))
                for seq in decode:
                    try:
                        runner.decode([seq])
                    except Exception as exc:
                        self._fail(seq, exc)
        return [s for s in decode + plan.prefill if s.finish_reason is None and s.pending_logits is not None]

    def _prefill_cost(self, seq: Sequence) -> int:
        """The scheduler's budget: prompt tokens to compute (an estimate: _prefill matches again, since sequences
        ended before it may store and evict blocks)."""
        blocks = self.runner.prefix_match(seq)
        return len(seq.prompt_ids) - (self.runner.prefix.hit_length(seq.prompt_ids, blocks) if blocks else 0)

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Copy each prompt's cached prefix into its slot, then prefill the rest: text prompts batched (groups
        whose padded size fits the step's token budget), media / prompt_logprobs prompts alone (the reference
        path: they need spliced embeddings or every position's logits). A failed batch is retried alone."""
        runner, alone, text = self.runner, [], []
        for seq in seqs:
            try:
                if runner.prefix is not None and not seq.media and seq.params.prompt_logprobs is None:
                    self.stats["prefix_lookups"] += 1
                    hit = runner.load_prefix(seq, runner.prefix_match(seq))
                    self.stats["prefix_hits"] += hit > 0
                    self.stats["prefix_hit_tokens"] += hit
            except Exception as exc:
                self._fail(seq, exc)
                continue
            (alone if seq.media or seq.params.prompt_logprobs is not None else text).append(seq)
        for group in _pad_groups(text, [len(s.prompt_ids) - runner.cache.lengths[s.slot] for s in text],
                                 self.config.prefill_token_budget):  # fmt: skip
            computed = [len(s.prompt_ids) - runner.cache.lengths[s.slot] for s in group]
            try:
                runner.prefill_batch(group)
            except Exception:  # find the culprit: each sequence alone (nothing was committed to the cache)
                log.warning("batched prefill of %d sequences failed; retrying each alone", len(group))
                alone += group
                continue
            self.stats["prefill_forwards"] += 1
            for seq, n in zip(group, computed):
                self._prefilled(seq, n)
        for seq in alone:
            n = len(seq.prompt_ids) - runner.cache.lengths[seq.slot]
            try:
                runner.prefill(seq)
            except Exception as exc:
                self._fail(seq, exc)
                continue
            self.stats["prefill_forwards"] += 1
            self._prefilled(seq, n)

    def _prefilled(self, seq: Sequence, computed: int) -> None:
        self.stats["prefill_tokens"] += computed
        self._store_prefix(seq, seq.prompt_ids)
        if seq.params.max_tokens == 0:
            self._finish(seq, "length")

    def _store_prefix(self, seq: Sequence, ids: list[int]) -> None:
        """Offer seq's computed tokens to the prefix cache; a failure here never fails the sequence."""
        if self.runner.prefix is None:
            return
        try:
            self.runner.store_prefix(seq, ids)
        except Exception:
            log.exception("prefix cache store failed (sequence %s)", seq.request_id)
        self.stats["prefix_cached_tokens"] = self.runner.prefix.cached_tokens()

    def _postprocess(self, batch: list[Sequence]) -> None:
        """Sample one token per sequence, turn it into text, check stops, notify; a failure ends its sequence."""
        if not batch:
            return
        tokens = self.runner.sample(batch)
        self.stats["decode_tokens"] += len(batch)
        now = time.monotonic()
        for seq, tok in zip(batch, tokens):
            try:
                if isinstance(tok, Exception):
                    raise tok
                self._append(seq, tok, now)
            except Exception as exc:
                self._fail(seq, exc)

    def _append(self, seq: Sequence, tok: int, now: float) -> None:
        seq.output_ids.append(tok)
        if seq.first_token_time is None:
            seq.first_token_time = now
        p = seq.params
        reason = None
        if tok in self.eos_ids and not p.ignore_eos:
            reason = "stop"
        elif len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        d_reason, d_text = seq.stream.update(seq.output_ids, final=reason is not None)
        if seq.stream.stopped:
            reason = "stop"
        out = Output(seq.request_id, d_text, d_reason, [tok], first_token_time=seq.first_token_time)
        lp = seq.new_logprobs
        if lp is not None:
            out.logprobs = [lp]
        if reason is not None:
            self._finish(seq, reason, last=out)
        else:
            self._emit(seq, out)

    def _fail(self, seq: Sequence, exc: Exception) -> None:
        log.warning("sequence %s failed: %s: %s", seq.request_id, type(exc).__name__, exc)
        self.stats["errors"] += 1
        self._finish(seq, "error", error=f"{type(exc).__name__}: {exc}")

    def _finish(self, seq: Sequence, reason: str, error: str | None = None, last: Output | None = None) -> None:
        if reason != "error" and seq.slot is not None and seq.output_ids:  # the next chat turn may start so
            self._store_prefix(seq, seq.prompt_ids + seq.output_ids)  # (the slot holds all but the last token)
        self.scheduler.finish(seq)  # out of the queue / batch, cache slot freed
        seq.pending_logits = None
        if seq.finish_reason is not None:
            return
        seq.finish_reason = reason
        out = last or Output(seq.request_id, first_token_time=seq.first_token_time)
        if last is None and reason in ("length", "stop"):  # flush held-back text
            out.reasoning, out.text = seq.stream.update(seq.output_ids, final=True)
        out.finish_reason, out.error = reason, error
        u = seq.usage()
        out.prompt_tokens, out.completion_tokens, out.reasoning_tokens = (
            u["prompt_tokens"], u["completion_tokens"], u["reasoning_tokens"])  # fmt: skip
        self.stats["finished"] += 1
        self._emit(seq, out)

    def _emit(self, seq: Sequence, out: Output) -> None:
        if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
            out.prompt_logprobs, seq.prompt_logprobs_sent = seq.prompt_logprobs, True
        for fn in seq.listeners:
            try:
                fn(out)
            except Exception:  # a broken listener must not stop the engine
                seq.cancelled = True


def _pad_groups(seqs: list[Sequence], n_new: list[int], budget: int) -> list[list[Sequence]]:
    """Split prompts into batches whose right-padded size (rows x longest) stays within budget (a longer
    prompt goes alone), shortest first so that rows of like length share a batch."""
    groups, group = [], []
    for n, seq in sorted(zip(n_new, seqs), key=lambda p: p[0]):  # stable: arrival order among equals
        if group and (len(group) + 1) * n > budget:
            groups.append(group)
            group = []
        group.append(seq)
    return groups + ([group] if group else [])


def _max_token_chars(tokenizer) -> int:
    """How many characters of text one token can cover at most, with a 2x margin (decoders may drop a lone
    token's leading space); 0 when the tokenizer normalizes text first, which can shrink it."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None:
        return 0
    pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False)
    return 2 * max(len(p) for p in pieces) + 1


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for v in (model.config.eos_token_id, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, list):
            ids.update(v)
    return ids
