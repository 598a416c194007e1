"""Per-request accounting: collects the final Output of each of a request's sequences and writes the request's
one usage row (in a background thread, off the engine's and the event loop's paths) when the last ends."""

from __future__ import annotations

import queue
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .billing import Billing, RateLimiter, Tier
from .sequence import Output

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("deepseek_requests", "HTTP generation requests", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("deepseek_prompt_tokens", "prompt tokens processed", registry=r)
        self.completion_tokens = Counter("deepseek_completion_tokens", "completion tokens generated", registry=r)
        self.reasoning_tokens = Counter("deepseek_reasoning_tokens", "completion tokens inside <think>", registry=r)
        self.latency = Histogram("deepseek_request_latency_seconds", "request latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.ttft = Histogram("deepseek_time_to_first_token_seconds", "time to first token",
                              buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.queue_depth = Gauge("deepseek_queue_depth", "requests waiting for a batch slot", registry=r)
        self.running = Gauge("deepseek_running_batch_size", "sequences in the running batch", registry=r)
        self.free_slots = Gauge("deepseek_free_cache_slots", "free per-sequence KV cache slots", registry=r)


class UsageWriter:
    """One thread that writes usage rows in order; `flush()` waits until all queued rows are written."""

    def __init__(self, billing: Billing):
        self.billing = billing
        self.queue: queue.Queue = queue.Queue()
        self.failures = 0
        self.thread = threading.Thread(target=self._run, name="usage-writer", daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            row = self.queue.get()
            try:
                if row is None:
                    return
                self.billing.record_usage(**row)
            except Exception:
                self.failures += 1
            finally:
                self.queue.task_done()

    def put(self, **row) -> None:
        self.queue.put(row)

    def flush(self) -> None:
        self.queue.join()

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=30)


class RequestRecord:
    """Everything about one HTTP request needed for its usage row and metrics; `finish` runs exactly once."""

    def __init__(self, request_id: str, endpoint: str, model: str, key_id: int | None, tier: Tier,
                 n_sequences: int, writer: UsageWriter | None, metrics: Metrics, limiter: RateLimiter):  # fmt: skip
        self.request_id, self.endpoint, self.model = request_id, endpoint, model
        self.key_id, self.tier = key_id, tier
        self.pending = n_sequences
        self.writer, self.metrics, self.limiter = writer, metrics, limiter
        self.start = time.monotonic()
        self.finals: list[Output] = []
        self.lock = threading.Lock()
        self.done = False
        self.first_token: float | None = None

    def on_final(self, out: Output) -> None:
        """Called with each sequence's last Output (any thread)."""
        with self.lock:
            self.finals.append(out)
            self.pending -= 1
            last = self.pending == 0
        if last:
            self.finish()

    def sequence_never_started(self) -> None:
        """A sequence of this request was refused before it was queued (e.g. QueueFull)."""
        with self.lock:
            self.pending -= 1
            last = self.pending == 0
        if last:
            self.finish()

    def totals(self) -> dict:
        p = sum(o.prompt_tokens for o in self.finals)
        c = sum(o.completion_tokens for o in self.finals)
        r = sum(o.reasoning_tokens for o in self.finals)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c, "reasoning_tokens": r,
                "cost_usd": self.tier.cost(p + c)}  # fmt: skip

    def status(self) -> str:
        reasons = {o.finish_reason for o in self.finals}
        for s in ("error", "timeout", "cancelled"):
            if s in reasons:
                return s
        return "ok"

    def finish(self, status: str | None = None) -> None:
        with self.lock:
            if self.done:
                return
            self.done = True
        t = self.totals()
        status = status or self.status()
        latency = time.monotonic() - self.start
        m = self.metrics
        m.requests.labels(self.endpoint, status).inc()
        m.prompt_tokens.inc(t["prompt_tokens"])
        m.completion_tokens.inc(t["completion_tokens"])
        m.reasoning_tokens.inc(t["reasoning_tokens"])
        m.latency.labels(self.endpoint).observe(latency)
        firsts = [o.first_token_time for o in self.finals if o.first_token_time is not None]
        if firsts:
            m.ttft.observe(max(0.0, min(firsts) - self.start))
        if self.key_id is not None:
            self.limiter.add_tokens(self.key_id, t["total_tokens"])
        if self.writer is not None:
            self.writer.put(request_id=self.request_id, key_id=self.key_id, model=self.model,
                            prompt_tokens=t["prompt_tokens"], completion_tokens=t["completion_tokens"],
                            reasoning_tokens=t["reasoning_tokens"], latency_ms=latency * 1e3, status=status,
                            tier=self.tier.name)  # fmt: skip
