"""Retrieval over long real prose beyond one passkey: RULER-style variable tracking and a clause question over
a long document (the source document's contract-clause retrieval). The haystack is the same as Passkey's
(deepseek.tasks.passkey: a real-prose family of deepseek.tasks.corpus, the held-out one for evaluation).

variables: a chain `VAR A = 12345.` ... `VAR B = VAR A.` with distractor chains of other names and values
    spread over the text; the question asks for the value of the chain's last name (two needles to read).
clause: numbered clauses (`Clause 14.2: the notice period is 45 days.`), one per topic, other clauses with
    other numbers and topics as distractors; the question names a clause and its topic, the answer is its term.

Each example carries `answer_prefix` (what follows the prompt before the answer, for teacher-forced training and
greedy grading) and `spans`: character offsets [start, end) of the needles that must be read (for a byte-level
tokenizer, token offsets too); `other_spans` those of the distractors."""

from __future__ import annotations

import random
import re
import string

from .base import Task, clean_answer

TOPICS = [("notice period", "days"), ("payment term", "days"), ("liability cap", "thousand euros"),
          ("renewal term", "months"), ("late fee", "percent"), ("warranty period", "months"),
          ("cure period", "days"), ("deposit", "thousand euros")]  # fmt: skip


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))


class LongDocument(Task):
    """kind: "variables" or "clause"; filler: a real-prose family (or "train"), as Passkey's."""

    default_difficulty = 4096
    min_difficulty = 256
    max_difficulty = 1 << 21

    def __init__(self, kind: str = "clause", filler: str = "train", distractors: int = 3, tokenizer=None):
        from .passkey import Passkey

        if kind not in ("variables", "clause"):
            raise ValueError(f"long document task: kind must be 'variables' or 'clause', got {kind!r}")
        if distractors < 0 or distractors > len(TOPICS) - 1:
            raise ValueError(f"long document task: distractors must be in [0, {len(TOPICS) - 1}], got {distractors}")
        self.kind, self.distractors, self.name = kind, distractors, f"longdoc_{kind}"
        self.haystack = Passkey(filler=filler, tokenizer=tokenizer)  # its units and counting

    def _needles(self, rng: random.Random):
        """(needles in text order, question, answer, indices of the needles that must be read)."""
        if self.kind == "variables":
            chains = []
            names = set()
            while len(names) < 2 * (self.distractors + 1):
                names.add(_name(rng))
            names = sorted(names, key=lambda _: rng.random())
            for c in range(self.distractors + 1):
                a, b, v = names[2 * c], names[2 * c + 1], rng.randint(10000, 99999)
                chains.append((f"VAR {a} = {v}.", f"VAR {b} = VAR {a}.", b, v))
            asked = chains[0]
            seq = [c for c in range(len(chains)) for _ in range(2)]
            rng.shuffle(seq)  # chains interleaved; a chain's first place holds its value, the second its alias
            seen: set[int] = set()
            text = []
            for c in seq:
                text.append(chains[c][1] if c in seen else chains[c][0])
                seen.add(c)
            must = [text.index(asked[0]), text.index(asked[1])]
            return text, f"What is the value of VAR {asked[2]}?", str(asked[3]), must
        topics = rng.sample(TOPICS, self.distractors + 1)
        clauses = rng.sample([f"{i}.{j}" for i in range(1, 40) for j in range(1, 10)], len(topics))
        terms = [rng.randint(2, 99) for _ in topics]
        text = [f"Clause {c}: the {t} is {v} {u}." for c, (t, u), v in zip(clauses, topics, terms)]
        order = sorted(range(len(text)), key=lambda _: rng.random())
        (topic, unit), clause, term = topics[0], clauses[0], terms[0]
        return ([text[i] for i in order], f"Under clause {clause}, what is the {topic}?", f"{term} {unit}",
                [order.index(0)])  # fmt: skip

    def make_example(self, rng: random.Random, difficulty: int) -> dict:
        needles, question, answer, must = self._needles(rng)
        prompt, length, _ = self.haystack.haystack(rng, needles, question, difficulty)
        spans, others = [], []
        for j, needle in enumerate(needles):
            start = prompt.index(needle)
            (spans if j in must else others).append((start, start + len(needle)))
        prefix = "\nThe value is " if self.kind == "variables" else "\nThe answer is "
        return {"prompt": prompt, "answer": answer, "answer_prefix": prefix, "spans": spans, "other_spans": others,
                "context_tokens": length, "reasoning": f"The text says: {' '.join(needles[j] for j in must)}"}  # fmt: skip

    def parse_prompt(self, prompt: str) -> dict:
        if self.kind == "variables":
            q = re.search(r"What is the value of VAR (\w+)\?\s*$", prompt)
            if q is None:
                raise ValueError("variables: prompt does not end with 'What is the value of VAR X?'")
            values = dict(re.findall(r"VAR (\w+) = (?:VAR )?(\w+)\.", prompt))
            name = q.group(1)
            for _ in range(len(values) + 1):
                name = values.get(name, name)
                if name.isdigit():
                    return {"answer": name}
            raise ValueError(f"variables: VAR {q.group(1)} has no value in the prompt")
        q = re.search(r"Under clause ([\d.]+), what is the ([a-z ]+)\?\s*$", prompt)
        if q is None:
            raise ValueError("clause: prompt does not end with 'Under clause N, what is the TOPIC?'")
        m = re.search(rf"Clause {re.escape(q.group(1))}: the {q.group(2)} is (\d+ [a-z ]+?)\.", prompt)
        if m is None:
            raise ValueError(f"clause: clause {q.group(1)} on {q.group(2)} is not in the prompt")
        return {"answer": m.group(1)}

    def score(self, example: dict, answer: str) -> float:
        return 1.0 if clean_answer(answer).strip().rstrip(".") == example["answer"] else 0.0
