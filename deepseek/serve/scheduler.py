"""Scheduler: which sequences wait, which run, and which waiting ones join the batch at this step.

The scheduler alone admits, queues and limits: `add` queues a request (QueueFull beyond `max_waiting`),
`schedule` drops cancelled / timed-out sequences, admits waiting ones while a cache slot is free and the step's
prefill token budget (tokens to compute: a prefix-cache hit is not counted) lasts (the first admitted always fits, so a long prompt cannot starve) and gives them their
slot, and `finish` takes a sequence out and frees its slot. Sequences therefore join and leave the running batch
at every step (continuous batching). `add` and the counts are thread-safe; the rest runs on the engine thread.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from .sequence import Sequence


class QueueFull(Exception):
    """The waiting queue is at its limit; the API answers 503."""


@dataclass
class Step:
    """What one engine step does: sequences to end now, prompts to prefill, running sequences to decode."""

    ended: list[tuple[Sequence, str]] = field(default_factory=list)  # (sequence, "cancelled" | "timeout")
    prefill: list[Sequence] = field(default_factory=list)  # admitted this step; each has its slot
    decode: list[Sequence] = field(default_factory=list)  # running before this step, in arrival order


class Scheduler:
    def __init__(self, max_running: int, max_waiting: int, prefill_token_budget: int, slots=None, cost=None):
        """slots: the cache's slot pool (num_free / allocate / release), needed by `schedule` and `finish`.
        cost(seq): the prompt tokens its prefill computes (default all; less after a prefix-cache hit)."""
        if max_running < 1 or max_waiting < 0 or prefill_token_budget < 1:
            raise ValueError("max_running >= 1, max_waiting >= 0 and prefill_token_budget >= 1 are required")
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.prefill_token_budget = prefill_token_budget
        self.slots = slots
        self.cost = cost or (lambda seq: len(seq.prompt_ids))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._lock = threading.Lock()  # add() comes from request threads, everything else from the engine

    def add(self, seq: Sequence) -> None:
        with self._lock:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"the request queue is full ({self.max_waiting} waiting); retry later")
            self.waiting.append(seq)

    def schedule(self, now: float) -> Step:
        step = Step()
        for seq in self.drop(lambda s: s.cancelled):
            step.ended.append((seq, "cancelled"))
        for seq in self.drop(lambda s: s.deadline is not None and now > s.deadline):
            step.ended.append((seq, "timeout"))
        step.decode = list(self.running)
        with self._lock:
            admitted = self.admit(self.slots.num_free())
        for seq in admitted:
            seq.slot = self.slots.allocate()
            self.running.append(seq)
        step.prefill = admitted
        return step

    def admit(self, free_slots: int) -> list[Sequence]:
        """Take the waiting sequences that start now off the queue, in arrival order."""
        out, budget = [], self.prefill_token_budget
        while self.waiting and free_slots > 0 and len(self.running) + len(out) < self.max_running:
            n = self.cost(self.waiting[0])
            if out and n > budget:
                break
            out.append(self.waiting.popleft())
            budget -= n
            free_slots -= 1
        return out

    def finish(self, seq: Sequence) -> None:
        """Take seq out (wherever it is) and free its cache slot; safe to call twice."""
        self.drop(lambda s: s is seq)
        if seq.slot is not None:
            self.slots.release(seq.slot)
            seq.slot = None

    def drop(self, pred) -> list[Sequence]:
        """Remove and return the waiting and running sequences for which pred(seq) is true."""
        with self._lock:
            gone = [s for s in self.waiting if pred(s)] + [s for s in self.running if pred(s)]
            if gone:
                ids = {id(s) for s in gone}
                self.waiting = deque(s for s in self.waiting if id(s) not in ids)
                self.running = [s for s in self.running if id(s) not in ids]
        return gone

    def counts(self) -> tuple[int, int]:
        """(waiting, running)."""
        with self._lock:
            return len(self.waiting), len(self.running)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self.waiting or self.running)
