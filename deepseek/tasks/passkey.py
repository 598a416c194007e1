"""Passkey retrieval at a requested context length (the Landmark-attention template), with an optional
multi-key variant in the RULER style (several named keys, one is asked for).

difficulty = the context length in tokens. Lengths are counted with `tokenizer` when one is given (exact);
otherwise with a word-and-punctuation estimate, which is close to what a BPE tokenizer gives on English.
The key sits at a random depth in the filler; `depth` in the example says where (0 = start, 1 = end).

filler: "repeat" (the Landmark sentence, repeated), "essay" (the project's own prose, cycled), a real-prose
family of deepseek.tasks.corpus (consecutive sentences from a random place in it, e.g. the held-out
"package-readmes"), or "train" (each prompt from one of corpus.TRAIN_FAMILIES, chosen at random).
"""

from __future__ import annotations

import random
import re

from .base import Task, clean_answer
from .filler import PROSE

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")  # fmt: skip
REPEATED = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NAMES = ["apple", "river", "falcon", "copper", "meadow", "lantern", "violet", "harbor", "cedar", "marble",
         "comet", "thistle", "orchid", "granite", "willow", "sparrow"]  # fmt: skip
_KEY_RE = re.compile(r"The pass key(?: for (\w+))? is (\d+)\. Remember it\.")
_QUESTION_RE = re.compile(r"What is the pass key(?: for (\w+))?\?\s*$")
_WORD_RE = re.compile(r"\w+|[^\w\s]")


def estimate_tokens(text: str) -> int:
    """Words plus punctuation marks: a tokenizer-free stand-in for a BPE token count on English text."""
    return len(_WORD_RE.findall(text))


class Passkey(Task):
    name = "passkey"
    default_difficulty = 512
    min_difficulty = 64
    max_difficulty = 1 << 21

    def __init__(self, num_keys: int = 1, filler: str = "repeat", tokenizer=None):
        if num_keys < 1 or num_keys > len(NAMES):
            raise ValueError(f"passkey: num_keys must be in [1, {len(NAMES)}], got {num_keys}")
        from .corpus import FAMILIES, TRAIN_FAMILIES

        if filler not in ("repeat", "essay", "train", *FAMILIES):
            raise ValueError(f"passkey: filler must be 'repeat' (Landmark), 'essay', 'train' or a prose family "
                             f"({', '.join(FAMILIES)}), got {filler!r}")  # fmt: skip
        self.num_keys, self.filler, self.tokenizer = num_keys, filler, tokenizer
        self.families = TRAIN_FAMILIES if filler == "train" else (filler,) if filler in FAMILIES else ()
        self.sentences = re.findall(r"[^.!?]+[.!?]", " ".join(PROSE.split()))
        if num_keys > 1:
            self.name = f"passkey_multi{num_keys}"

    def count(self, text: str) -> int:
        if self.tokenizer is None:
            return estimate_tokens(text)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _units(self, rng: random.Random, n: int) -> list[str]:
        if self.filler == "repeat":
            return [REPEATED] * n
        sentences = self.sentences
        if self.families:
            from .corpus import sentences as family_sentences

            sentences = family_sentences(rng.choice(self.families))
        start = rng.randrange(len(sentences))
        return [sentences[(start + i) % len(sentences)].strip() for i in range(n)]

    def haystack(self, rng: random.Random, needles: list[str], question: str, difficulty: int):
        """INTRO, the filler with the needles (in order) at random depths, then the question, shrunk until it fits
        `difficulty` tokens. Returns (prompt, its length, the needles' depths in [0, 1])."""
        fixed = self.count(" ".join([INTRO, *needles, question]))
        depths = sorted(rng.random() for _ in needles)
        unit_rng_seed = rng.random()
        # bytes per unit, from the units this prompt will use when they come from a real-prose family (whose
        # sentences differ in length from family to family)
        estimate_seed = unit_rng_seed if self.families else 0
        n_est = 64 if self.families else 8
        per_unit = max(1, self.count(" ".join(self._units(random.Random(estimate_seed), n_est))) // n_est)
        n_units = max(len(needles), (difficulty - fixed) // per_unit)
        while True:  # shrink until the measured length fits (the estimate of a unit is not exact)
            units = self._units(random.Random(unit_rng_seed), n_units)
            slots = [min(n_units, round(d * n_units)) for d in depths]
            parts = [INTRO]
            for i in range(n_units + 1):
                parts += [needles[j] for j, s in enumerate(slots) if s == i]
                if i < n_units:
                    parts.append(units[i])
            prompt = " ".join(parts) + "\n" + question
            length = self.count(prompt)
            if length <= difficulty or n_units == 0:
                return prompt, length, depths
            n_units = max(0, n_units - max(1, (length - difficulty) // per_unit))

    def make_example(self, rng: random.Random, difficulty: int) -> dict:
        names = rng.sample(NAMES, self.num_keys) if self.num_keys > 1 else [None]
        keys = [rng.randint(10000, 99999) for _ in names]
        query = rng.randrange(len(names))
        needles = [f"The pass key{f' for {nm}' if nm else ''} is {k}. Remember it. {k} is the pass key"
                   f"{f' for {nm}' if nm else ''}." for nm, k in zip(names, keys)]  # fmt: skip
        question = f"What is the pass key{f' for {names[query]}' if names[query] else ''}?"
        prompt, length, depths = self.haystack(rng, needles, question, difficulty)
        key, name = keys[query], names[query]
        needle = needles[query].split(" Remember it.")[0]
        reasoning = (f"I look through the text for the pass key{f' for {name}' if name else ''}.\n"
                     f"I find the sentence: \"{needle}\"\n"
                     + ("The other pass keys belong to other names.\n" if len(keys) > 1 else "")
                     + f"So the pass key is {key}.")  # fmt: skip
        return {"prompt": prompt, "answer": str(key), "reasoning": reasoning, "key": key, "name": name,
                "depth": depths[query], "context_tokens": length, "num_keys": len(keys)}  # fmt: skip

    def parse_prompt(self, prompt: str) -> dict:
        q = _QUESTION_RE.search(prompt)
        if q is None:
            raise ValueError(f"passkey: prompt does not end with 'What is the pass key?': {prompt[-80:]!r}")
        for name, key in _KEY_RE.findall(prompt):
            if (name or None) == q.group(1):
                return {"key": int(key), "answer": key}
        raise ValueError("passkey: the asked-for pass key is not in the prompt")

    def score(self, example: dict, answer: str) -> float:
        numbers = set(re.findall(r"\d+", clean_answer(answer)))
        return 1.0 if numbers == {str(example["key"])} else 0.0
