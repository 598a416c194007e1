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


def mul_digit_steps(a: int, d: int) -> tuple[list[str], int]:
    """a times one digit d, digit by digit from the right: the table fact, then the carry, one line each."""
    lines, carry, out = [], 0, []
    for ch in reversed(str(a)):
        x = int(ch)
        p = x * d
        s = p + carry
        lines.append(f"{x} * {d} = {p}, + {carry} = {s}: write {s % 10}, carry {s // 10}")
        out.append(s % 10)
        carry = s // 10
    if carry:
        out.append(carry)
    value = int("".join(map(str, reversed(out))))
    lines.append(f"So {a} * {d} = {value}.")
    return lines, value


def mul_steps(a: int, b: int) -> list[str]:
    """Long multiplication: a times each digit of b (digit by digit, with carries), shifted by the digit's
    place, then the partial products added column by column."""
    if b < 10:
        return mul_digit_steps(a, b)[0] if a >= 10 else [f"{a} * {b} = {a * b}.", f"So {a} * {b} = {a * b}."]
    lines = [f"Multiply {a} by each digit of {b}, from the right, shifted by its place."]
    total = None
    for place, ch in enumerate(reversed(str(b))):
        d = int(ch)
        steps, value = mul_digit_steps(a, d)
        lines += [f"{a} * {d}:"] + steps
        if place:
            lines.append(f"Shifted by {place} place{'s' if place > 1 else ''}: {value * 10**place}.")
        value *= 10**place
        if total is None:
            total = value
        else:
            lines += add_steps(total, value)[1:]  # column addition of the running total and this partial
            total += value
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
