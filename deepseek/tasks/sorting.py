"""Sort a list of integers ascending: a short task tiny models learn quickly (a smoke test for the pipeline).

difficulty = how many numbers (2 to 30). The reasoning picks the smallest remaining number each step.
"""

from __future__ import annotations

import random
import re

from .base import Task, clean_answer

_PROMPT_RE = re.compile(r"Sort these numbers from smallest to largest: ([\d,\s]+)\.")


class Sorting(Task):
    name = "sorting"
    default_difficulty = 5
    min_difficulty = 2
    max_difficulty = 30

    def make_example(self, rng: random.Random, difficulty: int) -> dict:
        numbers = [rng.randint(0, 999) for _ in range(difficulty)]
        return self._example(numbers)

    def _example(self, numbers: list[int]) -> dict:
        remaining, done, lines = list(numbers), [], []
        while remaining:
            m = min(remaining)
            remaining.remove(m)
            done.append(m)
            lines.append(f"smallest of the rest is {m}; sorted so far: {', '.join(map(str, done))}")
        answer = ", ".join(map(str, done))
        return {"prompt": f"Sort these numbers from smallest to largest: {', '.join(map(str, numbers))}.",
                "answer": answer, "reasoning": "\n".join(lines), "numbers": numbers}  # fmt: skip

    def parse_prompt(self, prompt: str) -> dict:
        m = _PROMPT_RE.search(prompt)
        if m is None:
            raise ValueError(f"sorting: prompt is not 'Sort these numbers from smallest to largest: ...': {prompt[:80]!r}")
        return self._example([int(x) for x in m.group(1).split(",")])

    def score(self, example: dict, answer: str) -> float:
        text = clean_answer(answer).strip("[]")
        if not re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", text):
            return 0.0
        return 1.0 if [int(x) for x in text.split(",")] == sorted(example["numbers"]) else 0.0
