"""The Task base class and the answer parsing shared by every grader.

A task generates seeded examples and grades completions with one exact rule, so supervised fine-tuning,
evaluation and RL rewards all use the same grader. An example is a plain dict:

    {"task": "addition", "prompt": "...", "answer": "579", "reasoning": "...",   # step-by-step, correct
     "completion": "<think>\\n...\\n</think>\\n\\n579",                           # the SFT target
     "messages": [{"role": "user", ...}, {"role": "assistant", ...}],             # chat form
     "difficulty": 3, "seed": 0, "index": 7, ...task metadata}

A completion is graded on its final answer: the text after the last `</think>` (or the whole completion when
it has no `<think>` at all; an unclosed `<think>` means the model never answered and scores 0).
"""

from __future__ import annotations

import random
import re

from ..chat import THINK_CLOSE, THINK_OPEN

# `<think>` optional at the start (a chat template may have put it in the prompt), reasoning, `</think>`, answer
_FORMAT_RE = re.compile(r"^\s*(?:<think>)?(?P<reasoning>.*?)</think>(?P<answer>.*)$", re.DOTALL)
_BOXED_RE = re.compile(r"\\boxed\{(.*)\}")
_ANSWER_PREFIX_RE = re.compile(r"^(?:the\s+(?:final\s+)?answer\s+is|final\s+answer|answer)\s*[:=]?\s*", re.I)
_INT_RE = re.compile(r"[+-]?\d+")


def final_answer(completion: str) -> str | None:
    """The answer part of a completion: after the last `</think>`; None if the reasoning never closed."""
    if THINK_CLOSE in completion:
        return completion.rsplit(THINK_CLOSE, 1)[1].strip()
    if THINK_OPEN in completion:
        return None  # reasoning started but never closed: no answer
    return completion.strip()


def clean_answer(text: str) -> str:
    """Strip the wrappers a model may put around a bare answer: `\\boxed{}`, 'Answer:', a final period."""
    text = text.strip()
    boxed = _BOXED_RE.search(text)
    if boxed:
        text = boxed.group(1).strip()
    text = _ANSWER_PREFIX_RE.sub("", text).strip()
    return text.rstrip(".").strip()


def parse_int(text: str | None) -> int | None:
    """An integer answer, exactly: the cleaned answer must be one integer (thousands commas allowed)."""
    if text is None:
        return None
    text = clean_answer(text).replace(",", "").replace(" ", "")
    return int(text) if _INT_RE.fullmatch(text) else None


def format_reward(completion: str) -> float:
    """1.0 if the completion is `<think>` reasoning `</think>` followed by a non-empty answer, else 0.0.

    The opening tag may be absent (when the prompt already ends with it); the reasoning must be non-empty,
    and there must be exactly one `</think>`."""
    m = _FORMAT_RE.match(completion)
    if m is None or completion.count(THINK_CLOSE) != 1 or completion.count(THINK_OPEN) > 1:
        return 0.0
    return 1.0 if m.group("reasoning").strip() and m.group("answer").strip() else 0.0


def sft_completion(reasoning: str, answer: str) -> str:
    """The assistant text a model is fine-tuned on: reasoning inside <think>, then the bare answer."""
    return f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{answer}"


class Task:
    """Base class: subclasses set `name`, `default_difficulty`, `min_difficulty`, and implement
    `make_example(rng, difficulty)` (prompt, answer, reasoning + metadata) and `score(example, answer_text)`.
    """

    name: str = "task"
    default_difficulty: int = 1
    min_difficulty: int = 1
    max_difficulty: int = 1_000_000

    def check_difficulty(self, difficulty: int | None) -> int:
        d = self.default_difficulty if difficulty is None else difficulty
        if not isinstance(d, int) or isinstance(d, bool) or not self.min_difficulty <= d <= self.max_difficulty:
            raise ValueError(
                f"{self.name}: difficulty must be an integer in [{self.min_difficulty}, {self.max_difficulty}], got {d!r}"
            )
        return d

    def generate(self, n: int, seed: int = 0, difficulty: int | None = None) -> list[dict]:
        """`n` examples, identical for the same (n, seed, difficulty); example i does not depend on n."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"{self.name}: n must be a non-negative integer, got {n!r}")
        d = self.check_difficulty(difficulty)
        out = []
        for i in range(n):
            rng = random.Random(f"{self.name}:{seed}:{d}:{i}")  # per-example stream: prefixes are stable
            ex = self.make_example(rng, d)
            ex.update(task=self.name, difficulty=d, seed=seed, index=i)
            ex["completion"] = sft_completion(ex["reasoning"], ex["answer"])
            ex["messages"] = [
                {"role": "user", "content": ex["prompt"]},
                {"role": "assistant", "content": ex["completion"]},
            ]
            out.append(ex)
        return out

    def grade(self, prompt_or_example: str | dict, completion: str) -> float:
        """Reward in [0, 1] for `completion`: 1.0 when its final answer is exactly right, else 0.0."""
        example = prompt_or_example if isinstance(prompt_or_example, dict) else self.parse_prompt(prompt_or_example)
        answer = final_answer(completion)
        if answer is None or not answer:
            return 0.0
        return float(self.score(example, answer))

    # subclasses -------------------------------------------------------------------------------------------
    def make_example(self, rng: random.Random, difficulty: int) -> dict:
        raise NotImplementedError

    def score(self, example: dict, answer: str) -> float:
        raise NotImplementedError

    def parse_prompt(self, prompt: str) -> dict:
        """Recover what grading needs from a prompt alone (so a grader works from the prompt text)."""
        raise NotImplementedError
