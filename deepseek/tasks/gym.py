"""reasoning-gym's offline generators and graders as tasks (the `eval` extra: pip install -e '.[eval]').

    from deepseek.tasks import get_task
    train = get_task("gsm_symbolic")              # training split: SFT data, GRPO prompts and rewards
    held_out = get_task("gsm_symbolic_heldout")   # evaluation split: never the same question as training
    examples = held_out.generate(100, seed=12345)
    held_out.grade(examples[0], "<think>...</think>\\n\\n42")   # 1.0 iff reasoning-gym scores the answer 1.0

Splits are disjoint by construction, whatever the seeds: a question belongs to the held-out split iff the
SHA-256 of its text falls in the first HELDOUT_PERCENT of the hash range; each split draws reasoning-gym items
(from a per-example seed) until one of its own comes up. So two questions with the same text always land in
the same split, even when different generator seeds produce them.

The reward is exact: 1.0 when reasoning-gym's own `score_answer` gives 1.0 for the answer after `</think>`,
else 0.0 (its partial credit for an answer that merely contains the right one is not a pass). The SFT trace
is the generator's own chain of thought where it has one (gsm_symbolic's `answer_cot`), else one line.
"""

from __future__ import annotations

import hashlib
import random

from .base import Task, clean_answer

GYM_DATASETS = ("gsm_symbolic", "basic_arithmetic", "chain_sum", "leg_counting")
HELDOUT_PERCENT = 20


def in_heldout(question: str) -> bool:
    """The split rule: a question is held out iff its SHA-256 (first 8 bytes) lies in the first 20%."""
    h = int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big")
    return h % 100 < HELDOUT_PERCENT


class GymTask(Task):
    default_difficulty = 1
    max_difficulty = 1

    def __init__(self, dataset: str, split: str = "train"):
        if dataset not in GYM_DATASETS:
            raise ValueError(f"unknown reasoning-gym task {dataset!r}; choose one of: {', '.join(GYM_DATASETS)}")
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        try:
            import reasoning_gym  # noqa: F401
        except ImportError:
            raise RuntimeError(f"{dataset} needs reasoning-gym: pip install -e '.[eval]'") from None
        self.dataset, self.split = dataset, split
        self.name = dataset if split == "train" else f"{dataset}_heldout"
        self._by_question: dict[str, dict] = {}

    def _item(self, seed: int) -> dict:
        import reasoning_gym

        ds = reasoning_gym.create_dataset(self.dataset, size=1, seed=seed)
        entry = ds[0]
        return {"question": entry["question"], "answer": str(entry["answer"]), "metadata": entry["metadata"]}

    def make_example(self, rng: random.Random, difficulty: int) -> dict:
        want_heldout = self.split == "heldout"
        for _ in range(1000):
            entry = self._item(rng.getrandbits(63))
            if in_heldout(entry["question"]) == want_heldout:
                break
        else:  # pragma: no cover - 1000 draws all in the other split: the generator is degenerate
            raise RuntimeError(f"{self.name}: no {self.split} question in 1000 draws")
        cot = entry["metadata"].get("answer_cot")
        reasoning = str(cot).strip() if cot else f"The answer is {entry['answer']}."
        self._by_question[entry["question"]] = entry
        return {"prompt": entry["question"], "answer": entry["answer"], "reasoning": reasoning, "gym": entry,
                "split": self.split}  # fmt: skip

    def parse_prompt(self, prompt: str) -> dict:
        entry = self._by_question.get(prompt)
        if entry is None:
            raise ValueError(f"{self.name}: grading needs the example (this grader never generated that prompt)")
        return {"prompt": prompt, "answer": entry["answer"], "gym": entry}

    def score(self, example: dict, answer: str) -> float:
        import reasoning_gym

        entry = example["gym"]
        ds = reasoning_gym.create_dataset(self.dataset, size=1, seed=0)
        return 1.0 if ds.score_answer(clean_answer(answer), entry) >= 1.0 else 0.0


GYM_TASKS = {name: name for name in GYM_DATASETS} | {f"{name}_heldout": name for name in GYM_DATASETS}


def get_gym_task(name: str, **kwargs) -> GymTask:
    return GymTask(GYM_TASKS[name], split="heldout" if name.endswith("_heldout") else "train", **kwargs)
