"""The serving engine: continuous batching over the model's decode path, usable from Python without HTTP.

    from deepseek.serve.engine import Engine
    engine = Engine.from_pretrained("deepseek/r1-tiny")          # or any model folder with a tokenizer
    print(engine.generate_text("Hello", SamplingParams(max_tokens=16)))
    for out in engine.stream(engine.tokenizer.encode("Hi"), SamplingParams()):  # Output deltas
        print(out.text, end="")
    engine.close()

A background thread runs steps: drop cancelled / timed-out sequences (freeing their cache slots), admit and
prefill waiting sequences, decode all running ones in one batch, sample, turn tokens into text, notify
listeners. `submit` is thread-safe; listeners are called on the engine thread and must not block.
"""

from __future__ import annotations

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


@dataclass
class EngineConfig:
    max_running: int = 32  # sequences decoded together (= cache slots)
    max_waiting: int = 256  # queued beyond that -> QueueFull (HTTP 503)
    max_model_len: int | None = None  # prompt + completion per sequence; None: the model's context, <= 4096
    prefill_token_budget: int = 2048  # prompt tokens prefilled per step (the first admitted always runs)
    default_timeout_s: float | None = 600.0

    def __post_init__(self):
        if self.max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {self.max_running}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")


class Engine:
    def __init__(self, model, tokenizer, config: EngineConfig | None = None, model_name: str = "model"):
        self.config = config or EngineConfig()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = model_name
        ctx = model.config.max_position_embeddings
        self.max_model_len = min(self.config.max_model_len or min(ctx, 4096), ctx)
        self.runner = ModelRunner(model, self.config.max_running, self.max_model_len)
        self.scheduler = Scheduler(self.config.max_running, self.config.max_waiting, self.config.prefill_token_budget)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.skip_ids = self.eos_ids | {i for i in [getattr(tokenizer, "bos_token_id", None)] if i is not None}
        self.stats = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0, "finished": 0, "last_batch": 0}
        self._inbox: list[Sequence] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="deepseek-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(cls, name_or_path: str, config: EngineConfig | None = None, dtype=torch.float32):
        from .loading import load_model_and_tokenizer

        model, tokenizer, name = load_model_and_tokenizer(name_or_path, dtype)
        return cls(model, tokenizer, config, model_name=name)

    # ------------------------------------------------------------------ submitting
    def submit(self, prompt_ids: list[int], params: SamplingParams, listener: Callable[[Output], None],
               request_id: str | None = None) -> Sequence:  # fmt: skip
        """Queue a request; listener(Output) is called for each delta and once with finish_reason set.
        Raises ValueError (bad request) or QueueFull (too many waiting) before any work is done."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
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
        seq.listeners.append(listener)
        with self._lock:
            waiting = len(self.scheduler.waiting) + len(self._inbox)
            if waiting >= self.config.max_waiting:
                raise QueueFull(f"the request queue is full ({self.config.max_waiting} waiting); retry later")
            self._inbox.append(seq)
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
            total.request_id = out.request_id
            total.text += out.text
            total.reasoning += out.reasoning
            total.token_ids += out.token_ids
            total.logprobs += out.logprobs
            total.prompt_logprobs = total.prompt_logprobs or out.prompt_logprobs
            for k in ("finish_reason", "error", "prompt_tokens", "completion_tokens", "reasoning_tokens"):
                setattr(total, k, getattr(out, k))
        return total

    def generate_text(self, prompt: str, params: SamplingParams | None = None) -> str:
        return self.generate(self.tokenizer.encode(prompt), params or SamplingParams()).text

    def load(self) -> dict:
        with self._lock:
            waiting = len(self.scheduler.waiting) + len(self._inbox)
        return {"waiting": waiting, "running": len(self.scheduler.running),
                "free_slots": self.runner.cache.num_free()}  # fmt: skip

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while not self._stop:
            with self._lock:
                inbox, self._inbox = self._inbox, []
            for seq in inbox:
                self.scheduler.waiting.append(seq)
            if not self.scheduler.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception as exc:  # a failed step fails its sequences, never the engine
                for seq in self.scheduler.drop(lambda s: True):
                    self._finish(seq, "error", error=f"{type(exc).__name__}: {exc}")
        for seq in self.scheduler.drop(lambda s: True):
            self._finish(seq, "cancelled")

    def step(self) -> None:
        now = time.monotonic()
        for seq in self.scheduler.drop(lambda s: s.cancelled):
            self._finish(seq, "cancelled")
        for seq in self.scheduler.drop(lambda s: s.deadline is not None and now > s.deadline):
            self._finish(seq, "timeout")
        sched, runner = self.scheduler, self.runner
        for seq in sched.admit(runner.cache.num_free()):
            seq.slot = runner.cache.allocate()
            sched.running.append(seq)
            runner.prefill(seq)
            self.stats["prefill_tokens"] += len(seq.prompt_ids)
            if seq.params.max_tokens == 0:
                sched.drop(lambda s, seq=seq: s is seq)
                self._finish(seq, "length")
        # every running sequence either has logits pending (just prefilled) or needs its last token decoded
        to_decode = [s for s in sched.running if s.pending_logits is None]
        if to_decode:
            runner.decode(to_decode)
        batch = list(sched.running)
        self.stats["steps"] += 1
        self.stats["last_batch"] = len(batch)
        if not batch:
            return
        tokens = runner.sample(batch)
        self.stats["decode_tokens"] += len(batch)
        now = time.monotonic()
        for seq, tok in zip(batch, tokens):
            self._append(seq, tok, now)

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
            self.scheduler.drop(lambda s: s is seq)
            self._finish(seq, reason, last=out)
        else:
            self._emit(seq, out)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None, last: Output | None = None) -> None:
        if seq.finish_reason is not None:
            return
        seq.finish_reason = reason
        if seq.slot is not None:
            self.runner.cache.release(seq.slot)
            seq.slot = None
        seq.pending_logits = None
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


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for v in (getattr(model.config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, list):
            ids.update(v)
    return ids
