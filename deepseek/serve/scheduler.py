"""Scheduler: which sequences wait, which run, and which waiting ones join the batch at this step.

Every engine step admits waiting sequences while a cache slot is free and the step's prefill token budget
lasts (the first admitted always fits, so a long prompt cannot starve), then decodes every running sequence.
Sequences therefore join and leave the running batch at every step (continuous batching).
"""

from __future__ import annotations

from collections import deque

from .sequence import Sequence


class QueueFull(Exception):
    """The waiting queue is at its limit; the API answers 503."""


class Scheduler:
    def __init__(self, max_running: int, max_waiting: int, prefill_token_budget: int):
        if max_running < 1 or max_waiting < 0 or prefill_token_budget < 1:
            raise ValueError("max_running >= 1, max_waiting >= 0 and prefill_token_budget >= 1 are required")
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.prefill_token_budget = prefill_token_budget
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise QueueFull(f"the request queue is full ({self.max_waiting} waiting); retry later")
        self.waiting.append(seq)

    def admit(self, free_slots: int) -> list[Sequence]:
        """Waiting sequences that start now, in arrival order."""
        out, budget = [], self.prefill_token_budget
        while self.waiting and free_slots > 0 and len(self.running) + len(out) < self.max_running:
            n = len(self.waiting[0].prompt_ids)
            if out and n > budget:
                break
            out.append(self.waiting.popleft())
            budget -= n
            free_slots -= 1
        return out

    def drop(self, pred) -> list[Sequence]:
        """Remove and return the waiting and running sequences for which pred(seq) is true."""
        gone = [s for s in self.waiting if pred(s)] + [s for s in self.running if pred(s)]
        if gone:
            ids = {id(s) for s in gone}
            self.waiting = deque(s for s in self.waiting if id(s) not in ids)
            self.running = [s for s in self.running if id(s) not in ids]
        return gone

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
