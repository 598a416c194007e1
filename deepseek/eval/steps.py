"""Reasoning step decomposition accuracy: every intermediate line of an arithmetic trace graded on its own.

The arithmetic tasks (deepseek/tasks/arithmetic.py) reason one column per line. A line is a *step* when it
computes something; each step is checked exactly:

  - column addition   `x + y + carry c = s: write d, carry k`   x + y + c = s, d = s % 10, k = s // 10, and x, y
    are the right digits of the operands for that column (when the block's operands are known);
  - column subtraction `x - y - borrow b = r: write r, borrow 0` (r >= 0) and
    `... is negative, so 10 + x - y - b = r: write r, borrow 1`, with the digits checked the same way;
  - one digit of a multiplication `x * d = p, + c = s: write s % 10, carry s // 10`, x the right digit of A;
  - results `Reading ...: A op B = R.`, `So A op B = R.`: the equation is true;
  - `Shifted by k places: V.`: V is the last partial product times 10^k; `The last carry c ...`: c is the
    carry of the line before.

Lines that only announce a block (`Add A and B column by column ...`, `A * d:`) are not steps, but they set
the operands later digits are checked against. Any other line inside the reasoning (garbled text) is a step
that is wrong. The fraction reported is correct steps / steps over all completions.
"""

from __future__ import annotations

import re

from ..chat import THINK_CLOSE, THINK_OPEN

_ADD = re.compile(r"^(\d) \+ (\d) \+ carry (\d) = (\d+): write (\d), carry (\d)$")
_SUB_OK = re.compile(r"^(\d) - (\d) - borrow (\d) = (-?\d+): write (\d), borrow 0$")
_SUB_NEG = re.compile(r"^(\d) - (\d) - borrow (\d) is negative, so 10 \+ (\d) - (\d) - (\d) = (\d+): write (\d+), borrow 1$")
_MUL = re.compile(r"^(\d) \* (\d) = (\d+), \+ (\d+) = (\d+): write (\d), carry (\d+)$")
_RESULT = re.compile(r"^(?:Reading the digits from left to right(?: and dropping leading zeros)?: |So )"
                     r"(-?\d+) ([-+*]) (-?\d+) = (-?\d+)\.$")  # fmt: skip
_SHIFT = re.compile(r"^Shifted by (\d+) places?: (\d+)\.$")
_FACT = re.compile(r"^(\d+) \* (\d+) = (\d+)\.$")
_LAST_CARRY = re.compile(r"^The last carry (\d+) is the leading digit\.$")
_ADD_HEAD = re.compile(r"^Add (\d+) and (\d+) column by column, from the right\.$")
_SUB_HEAD = re.compile(r"^Subtract (\d+) from (\d+) column by column, from the right\.$")
_MUL_HEAD = re.compile(r"^Multiply (\d+) by each digit of (\d+), from the right, shifted by its place\.$")
_MUL_DIGIT_HEAD = re.compile(r"^(\d+) \* (\d):$")
_NEG_HEAD = re.compile(r"^(\d+) is smaller than (\d+), so compute \2 - \1 and make it negative\.$")


def _digit(n: int, i: int) -> int:
    s = str(n)[::-1]
    return int(s[i]) if i < len(s) else 0


def _reasoning_lines(completion: str) -> list[str]:
    text = completion
    if THINK_OPEN not in text and THINK_CLOSE not in text:
        return []  # a bare answer: no reasoning
    if THINK_OPEN in text:
        text = text.split(THINK_OPEN, 1)[1]
    if THINK_CLOSE in text:
        text = text.split(THINK_CLOSE, 1)[0]
    return [line.strip() for line in text.splitlines() if line.strip()]


def grade_steps(completion: str, example: dict | None = None) -> list[bool]:
    """One bool per step of the completion's reasoning (see the module docstring), in order. With the task
    example, a one-digit multiplier's digits are checked against A too (that trace has no block header)."""
    out: list[bool] = []
    operands: tuple[int, int] | None = None  # the column block's (top, bottom)
    if example is not None and example.get("op") == "*" and int(example["b"]) < 10:
        operands = (int(example["a"]), int(example["b"]))
    col, carry_prev, last_partial, total, mul_a = 0, None, None, None, None
    for line in _reasoning_lines(completion):
        if m := _ADD_HEAD.match(line):
            operands, col = (int(m[1]), int(m[2])), 0
            continue
        if m := _SUB_HEAD.match(line):
            operands, col = (int(m[2]), int(m[1])), 0
            continue
        if m := _MUL_HEAD.match(line):
            mul_a, total, last_partial, operands = int(m[1]), None, None, None
            continue
        if m := _MUL_DIGIT_HEAD.match(line):
            operands, col = (int(m[1]), int(m[2])), 0
            continue
        if _NEG_HEAD.match(line):
            continue
        if m := _ADD.match(line):
            x, y, c, s, d, k = map(int, m.groups())
            ok = x + y + c == s and d == s % 10 and k == s // 10
            if operands is not None:
                ok = ok and (x, y) == (_digit(operands[0], col), _digit(operands[1], col))
            out.append(ok)
            col, carry_prev = col + 1, k
            continue
        if m := _SUB_OK.match(line):
            x, y, b, r, d = map(int, m.groups())
            ok = x - y - b == r and r >= 0 and d == r
            if operands is not None:
                ok = ok and (x, y) == (_digit(operands[0], col), _digit(operands[1], col))
            out.append(ok)
            col += 1
            continue
        if m := _SUB_NEG.match(line):
            x, y, b, x2, y2, b2, r, d = map(int, m.groups())
            ok = x - y - b < 0 and (x, y, b) == (x2, y2, b2) and 10 + x - y - b == r and d == r
            if operands is not None:
                ok = ok and (x, y) == (_digit(operands[0], col), _digit(operands[1], col))
            out.append(ok)
            col += 1
            continue
        if m := _MUL.match(line):
            x, d, p, c, s, w, k = map(int, m.groups())
            ok = x * d == p and p + c == s and w == s % 10 and k == s // 10
            if operands is not None:
                ok = ok and x == _digit(operands[0], col) and d == operands[1]
            out.append(ok)
            col += 1
            continue
        if m := _RESULT.match(line):
            a, op, b, r = int(m[1]), m[2], int(m[3]), int(m[4])
            out.append({"+": a + b, "-": a - b, "*": a * b}[op] == r)
            if op == "*" and mul_a is not None and a == mul_a and b < 10:
                last_partial = r
                total = r if total is None else total
            elif op == "+" and mul_a is not None:
                total = r
            continue
        if m := _FACT.match(line):
            out.append(int(m[1]) * int(m[2]) == int(m[3]))
            continue
        if m := _SHIFT.match(line):
            k, v = int(m[1]), int(m[2])
            out.append(last_partial is not None and v == last_partial * 10**k)
            if total is not None:
                operands, col = (total, v), 0  # the column addition of the running total and this partial
            continue
        if m := _LAST_CARRY.match(line):
            out.append(carry_prev is not None and int(m[1]) == carry_prev)
            continue
        out.append(False)  # a line that is none of the trace's steps
    return out


def step_accuracy(completions: list[str], examples: list[dict] | None = None) -> dict:
    """{"steps", "correct_steps", "step_accuracy"} over all completions' reasoning lines."""
    examples = examples or [None] * len(completions)
    graded = [ok for c, ex in zip(completions, examples) for ok in grade_steps(c, ex)]
    return {"steps": len(graded), "correct_steps": sum(graded),
            "step_accuracy": sum(graded) / len(graded) if graded else 0.0}  # fmt: skip
