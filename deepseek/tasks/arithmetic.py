"""Multi-digit addition, subtraction and multiplication, solved digit by digit in the reasoning trace.

difficulty = the number of digits of each operand (both operands have exactly that many digits), so a
held-out set can be harder than training simply by asking for more digits.
"""

from __future__ import annotations

import random
import re

from .base import Task, parse_int

_PROMPT_RE = re.compile(r"What is (\d+) ([-+*]) (\d+)\?")


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


def add_steps(a: int, b: int) -> list[str]:
    """Column addition from the right with carries, one line per column."""
    da, db = str(a)[::-1], str(b)[::-1]
    lines, carry, out = [f"Add {a} and {b} column by column, from the right."], 0, []
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        s = x + y + carry
        lines.append(f"{x} + {y} + carry {carry} = {s}: write {s % 10}, carry {s // 10}")
        out.append(s % 10)
        carry = s // 10
    if carry:
        lines.append(f"The last carry {carry} is the leading digit.")
        out.append(carry)
    result = int("".join(map(str, reversed(out))))
    lines.append(f"Reading the digits from left to right: {a} + {b} = {result}.")
    return lines


def sub_steps(a: int, b: int) -> list[str]:
    """Column subtraction from the right with borrows; a negative result is computed as -(b - a)."""
    if a < b:
        lines = [f"{a} is smaller than {b}, so compute {b} - {a} and make it negative."]
        inner = sub_steps(b, a)
        return lines + inner[:-1] + [f"So {a} - {b} = -{b - a}."]
    da, db = str(a)[::-1], str(b)[::-1]
    lines, borrow, out = [f"Subtract {b} from {a} column by column, from the right."], 0, []
    for i in range(len(da)):
        x, y = int(da[i]), int(db[i]) if i < len(db) else 0
        r = x - y - borrow
        if r >= 0:
            lines.append(f"{x} - {y} - borrow {borrow} = {r}: write {r}, borrow 0")
            borrow = 0
        else:
            lines.append(f"{x} - {y} - borrow {borrow} is negative, so 10 + {x} - {y} - {borrow} = {r + 10}: "
                         f"write {r + 10}, borrow 1")  # fmt: skip
            r, borrow = r + 10, 1
        out.append(r)
    result = int("".join(map(str, reversed(out))))
    lines.append(f"Reading the digits from left to right and dropping leading zeros: {a} - {b} = {result}.")
    return lines


def mul_steps(a: int, b: int) -> list[str]:
    """Long multiplication: one partial product per digit of b (shifted by its place), then a running sum."""
    lines = [f"Multiply {a} by each digit of {b}, from the right, shifted by its place."]
    partials = []
    for place, ch in enumerate(reversed(str(b))):
        factor = int(ch) * 10**place
        partials.append(a * factor)
        lines.append(f"{a} * {factor} = {a * factor}")
    lines.append("Add the partial products.")
    total = partials[0]
    for p in partials[1:]:
        lines.append(f"{total} + {p} = {total + p}")
        total += p
    lines.append(f"So {a} * {b} = {total}.")
    return lines


class _Arithmetic(Task):
    op: str = "+"
    default_difficulty = 3
    max_difficulty = 40

    def make_example(self, rng: random.Random, difficulty: int) -> dict:
        a, b = _operand(rng, difficulty), _operand(rng, difficulty)
        return self._example(a, b)

    def _example(self, a: int, b: int) -> dict:
        value = {"+": a + b, "-": a - b, "*": a * b}[self.op]
        steps = {"+": add_steps, "-": sub_steps, "*": mul_steps}[self.op](a, b)
        return {"prompt": f"What is {a} {self.op} {b}?", "answer": str(value), "reasoning": "\n".join(steps),
                "a": a, "b": b, "op": self.op}  # fmt: skip

    def parse_prompt(self, prompt: str) -> dict:
        m = _PROMPT_RE.search(prompt)
        if m is None or m.group(2) != self.op:
            raise ValueError(f"{self.name}: prompt is not of the form 'What is A {self.op} B?': {prompt[:80]!r}")
        return self._example(int(m.group(1)), int(m.group(3)))

    def score(self, example: dict, answer: str) -> float:
        return 1.0 if parse_int(answer) == int(example["answer"]) else 0.0


class Addition(_Arithmetic):
    name, op = "addition", "+"


class Subtraction(_Arithmetic):
    name, op = "subtraction", "-"


class Multiplication(_Arithmetic):
    name, op = "multiplication", "*"
    default_difficulty = 2
    max_difficulty = 20
