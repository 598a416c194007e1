"""Per-request accounting: the request's one usage row from admission to its final status, and metrics.

    writer = UsageWriter(billing, cancel=engine.cancel)   # a final-row writer thread and a checkpoint thread
    record = RequestRecord(rid, "chat", model, key_id, tier, n_sequences, writer, metrics)
    writer.admit(record, prompt_tokens, reserve_tokens)   # the `started` row and the reservation, or AuthError
    ... engine listeners call record.on_final(out) ...    # the last one queues the final row
    await record.wait_written()                          # before the response's last byte: reads are consistent

Every `checkpoint_s` the checkpoint thread writes the tokens generated so far by this process's open requests
(so a crash leaves them with recent counts), cancels those whose key was revoked (read from the database, so
a revocation on any replica reaches every replica), and marks rows that no server has checkpointed for
`reconcile_after_s` as `incomplete` (their server died). A final row that cannot be written is retried with
backoff for `retry_s`, then logged as an error with its content and retried on every later tick; until it
lands, its `started` row keeps the checkpointed counts, so nothing is lost.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .billing import Billing, Tier
from .sequence import Output

log = logging.getLogger("deepseek.serve.metering")
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
        # the engine's running totals (Engine.stats), read at each scrape
        self.engine_stats = {
            "prefill_tokens": Gauge("deepseek_prefill_computed_tokens", "prompt tokens computed by prefill",
                                    registry=r),
            "prefill_forwards": Gauge("deepseek_prefill_forwards", "prefill forward passes", registry=r),
            "prefix_lookups": Gauge("deepseek_prefix_cache_lookups", "prompts that could use the prefix cache",
                                    registry=r),
            "prefix_hits": Gauge("deepseek_prefix_cache_hits", "prompts that started from cached latents",
                                 registry=r),
            "prefix_hit_tokens": Gauge("deepseek_prefix_cache_hit_tokens", "prompt tokens not recomputed",
                                       registry=r),
            "prefix_cached_tokens": Gauge("deepseek_prefix_cache_tokens", "tokens held in the prefix cache",
                                          registry=r),
        }  # fmt: skip


class UsageWriter:
    """The usage rows of one server process: admission, checkpoints, revocations, final rows, reconciliation."""

    def __init__(self, billing: Billing, cancel=None, checkpoint_s: float = 1.0, reconcile_after_s: float = 10.0,
                 retry_s: float = 30.0, confirm_s: float = 10.0, name: str | None = None):  # fmt: skip
        """cancel(seq): stops an engine sequence (revoked key). confirm_s: how long a response waits for its
        final row to commit before its last byte (after that the row is still retried). name: where this
        server listens ("host:port"); open rows of an earlier server with the same name are reconciled at
        start-up without waiting, since that server cannot be alive while this one holds the address."""
        self.billing, self.cancel = billing, cancel
        self.instance = f"{name}/{uuid.uuid4().hex[:12]}" if name else uuid.uuid4().hex[:16]
        self.checkpoint_s, self.reconcile_after_s = checkpoint_s, reconcile_after_s
        self.retry_s, self.confirm_s = retry_s, confirm_s
        self.queue: queue.Queue = queue.Queue()
        self.open: dict[str, RequestRecord] = {}
        self.unwritten: list[tuple[RequestRecord, dict]] = []  # final rows that failed: retried every tick
        self.failures = 0  # final-row writes given up after retry_s (each logged as an error)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        dead = f"{name}/" if name else None
        self.reconciled = self._safely(lambda: self.billing.reconcile(reconcile_after_s, dead), "start-up reconcile")
        self.reconciled = self.reconciled or []
        self.thread = threading.Thread(target=self._write_loop, name="usage-writer", daemon=True)
        self.ticker = threading.Thread(target=self._tick_loop, name="usage-checkpoint", daemon=True)
        self.thread.start()
        self.ticker.start()

    # ------------------------------------------------------------------ request path
    def admit(self, record: RequestRecord, prompt_tokens: int, reserve_tokens: int) -> None:
        """Write the `started` row with the reservation (AuthError / DatabaseUnavailable when refused)."""
        record.reserved_usd = self.billing.admit(record.request_id, record.key_id, record.model, record.tier.name,
                                                 prompt_tokens, reserve_tokens, self.instance)  # fmt: skip
        record.admitted = True
        with self.lock:
            self.open[record.request_id] = record

    def put(self, record: RequestRecord, row: dict) -> None:
        self.queue.put((record, row))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued final row is written (or given up); False on timeout."""
        q = self.queue
        with q.all_tasks_done:
            return q.all_tasks_done.wait_for(lambda: q.unfinished_tasks == 0, timeout)

    def close(self, timeout: float = 30.0) -> bool:
        """Finish what is still open as `cancelled`, write everything, stop the threads. False if rows remain."""
        with self.lock:
            still_open = list(self.open.values())
        for r in still_open:
            r.finish("cancelled")
        deadline = time.monotonic() + timeout
        ok = self.flush(timeout)
        self.stop.set()
        self.queue.put(None)
        self.thread.join(timeout=5)
        self.ticker.join(timeout=5)
        while self.unwritten and time.monotonic() < deadline:  # the database may be back: keep trying till then
            with self.lock:
                retry, self.unwritten = self.unwritten, []
            self._retry_unwritten(retry)
            if self.unwritten:
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        if self.unwritten:
            log.error("%d usage rows could not be written before shutdown (their `started` rows hold the last "
                      "checkpoint and will be reconciled as incomplete): %s", len(self.unwritten),
                      [row for _, row in self.unwritten])  # fmt: skip
        return ok and not self.unwritten

    # ------------------------------------------------------------------ threads
    def _write_loop(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                self._write(*item, retry_s=self.retry_s)
            finally:
                self.queue.task_done()

    def _write(self, record: RequestRecord, row: dict, retry_s: float) -> bool:
        deadline, pause, attempts = time.monotonic() + retry_s, 0.05, 0
        while True:
            attempts += 1
            try:
                self.billing.record_usage(**row)
                break
            except Exception as exc:
                if time.monotonic() + pause > deadline:
                    if retry_s > 0:
                        self.failures += 1
                        log.error("usage row NOT written after %d attempts (%s: %s), retrying every %.1f s: %s",
                                  attempts, type(exc).__name__, exc, self.checkpoint_s, row)  # fmt: skip
                    with self.lock:
                        self.unwritten.append((record, row))
                    record.written.set()  # the response goes out; the row is retried and reconciled
                    return False
                if attempts == 1:
                    log.warning("usage row for %s not written yet (%s); retrying", row["request_id"], exc)
                time.sleep(pause)
                pause = min(pause * 2, 1.0)
        with self.lock:
            self.open.pop(record.request_id, None)
        record.written.set()
        return True

    def _tick_loop(self) -> None:
        while not self.stop.wait(self.checkpoint_s):
            self.tick()

    def tick(self) -> None:
        """One checkpoint: counts of open requests, revoked keys, retries of unwritten rows, reconciliation."""
        with self.lock:
            records = [r for r in self.open.values() if not r.done]
            retry, self.unwritten = self.unwritten, []
        self._safely(lambda: self.billing.checkpoint([(r.request_id, *r.live_counts()) for r in records]),
                     "checkpoint")  # fmt: skip
        revoked = self._safely(lambda: self.billing.revoked_among(r.key_id for r in records), "revocation check")
        for r in records:
            if revoked and r.key_id in revoked:
                r.revoke(self.cancel)
        self._retry_unwritten(retry)
        self._safely(lambda: self.billing.reconcile(self.reconcile_after_s), "reconcile")

    def _retry_unwritten(self, rows: list) -> None:
        """One attempt each, in order; after the first failure the rest wait for the next tick."""
        for i, (record, row) in enumerate(rows):
            if not self._write(record, row, retry_s=0):
                with self.lock:
                    self.unwritten.extend(rows[i + 1 :])
                return

    @staticmethod
    def _safely(fn, what: str):
        try:
            return fn()
        except Exception as exc:  # the database is down: the next tick tries again
            log.warning("usage %s failed (%s: %s); retrying at the next checkpoint", what, type(exc).__name__, exc)
            return None


class RequestRecord:
    """Everything about one HTTP request needed for its usage row and metrics; `finish` runs exactly once."""

    def __init__(self, request_id: str, endpoint: str, model: str, key_id: int | None, tier: Tier,
                 n_sequences: int, writer: UsageWriter | None, metrics: Metrics):  # fmt: skip
        self.request_id, self.endpoint, self.model = request_id, endpoint, model
        self.key_id, self.tier = key_id, tier
        self.pending = n_sequences
        self.writer, self.metrics = writer, metrics
        self.start = time.monotonic()
        self.finals: list[Output] = []
        self.seqs: list = []  # engine sequences, read by checkpoints (token counts) and revocation
        self.prompt_tokens: int | None = None  # each distinct prompt once (n > 1 shares its prompt, as OpenAI)
        self.reserved_usd = 0.0
        self.admitted = False
        self.refused = False  # a sequence was refused before it was queued (queue full, bad token ids)
        self.revoked = False
        self.lock = threading.Lock()
        self.done = False
        self.written = threading.Event()
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
            self.refused = True
            self.pending -= 1
            last = self.pending == 0
        if last:
            self.finish()

    def live_counts(self) -> tuple[int, int]:
        """(completion, reasoning) tokens generated so far, for checkpoints (read from the engine's sequences)."""
        c = r = 0
        for s in list(self.seqs):
            n = len(s.output_ids)
            c += n
            r += s.stream.reasoning_tokens(n)
        return c, r

    def revoke(self, cancel) -> None:
        """The key was revoked while this request ran: stop its sequences; the row says `revoked`."""
        if self.revoked or self.done:
            return
        self.revoked = True
        for s in list(self.seqs):
            if cancel is not None and s.finish_reason is None:
                cancel(s)

    def totals(self, status: str | None = None) -> dict:
        if status == "rejected" or not (self.finals or self.admitted):
            p = c = r = 0  # refused: nothing is billed
        else:
            p = sum(o.prompt_tokens for o in self.finals) if self.prompt_tokens is None else self.prompt_tokens
            if self.finals:
                c, r = sum(o.completion_tokens for o in self.finals), sum(o.reasoning_tokens for o in self.finals)
            else:  # finished while still queued in the engine (shutdown): what the sequences produced
                c, r = self.live_counts()
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c, "reasoning_tokens": r,
                "cost_usd": self.tier.cost(p + c)}  # fmt: skip

    def status(self) -> str:
        if self.revoked:
            return "revoked"
        if self.refused:
            return "rejected"
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
        status = status or self.status()
        t = self.totals(status)
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
        if self.writer is None:
            self.written.set()
            return
        self.writer.put(self, dict(request_id=self.request_id, key_id=self.key_id, model=self.model,
                                   prompt_tokens=t["prompt_tokens"], completion_tokens=t["completion_tokens"],
                                   reasoning_tokens=t["reasoning_tokens"], latency_ms=latency * 1e3,
                                   status=status, tier=self.tier.name))  # fmt: skip

    async def wait_written(self) -> None:
        """Until the final row is committed (or the writer's confirm_s passed): call before the last byte."""
        if self.writer is None or self.written.is_set():
            return
        await asyncio.get_running_loop().run_in_executor(None, self.written.wait, self.writer.confirm_s)
