"""Countdown: combine the given numbers with + - * / and parentheses to reach a target.

difficulty = how many numbers are given (3 to 6); every number must be used exactly once (as in TinyZero).
The grader parses the expression with its own small recursive-descent parser over exact fractions: no
eval(), nothing but numbers, the four operators and parentheses is accepted.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from fractions import Fraction

from .base import Task, clean_answer

_PROMPT_RE = re.compile(r"numbers \[([\d,\s]+)\].*?equals (\d+)", re.DOTALL)
_TOKEN_RE = re.compile(r"\s*(?:(\d+)|([-+*/()]))")
_SYMBOLS = str.maketrans({"×": "*", "x": "*", "÷": "/", "−": "-"})
MAX_TARGET = 999


class ExpressionError(ValueError):
    pass


def tokenize(expr: str) -> list[str]:
    tokens, pos = [], 0
    expr = expr.translate(_SYMBOLS).strip()
    while pos < len(expr):
        m = _TOKEN_RE.match(expr, pos)
        if m is None:
            raise ExpressionError(f"unexpected character {expr[pos]!r} at {pos}")
        tokens.append(m.group(1) or m.group(2))
        pos = m.end()
    return tokens


def evaluate(expr: str) -> tuple[Fraction, list[int]]:
    """(exact value, the number literals used) of an arithmetic expression; ExpressionError if malformed.

    Grammar: expr := term (('+'|'-') term)*; term := atom (('*'|'/') atom)*; atom := NUMBER | '(' expr ')'
    """
    tokens, pos, numbers = tokenize(expr), 0, []

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        if pos >= len(tokens):
            raise ExpressionError("expression ends too early")
        pos += 1
        return tokens[pos - 1]

    def atom() -> Fraction:
        tok = take()
        if tok == "(":
            value = expr_()
            if take() != ")":
                raise ExpressionError("missing ')'")
            return value
        if tok.isdigit():
            numbers.append(int(tok))
            return Fraction(int(tok))
        raise ExpressionError(f"unexpected {tok!r}")

    def term() -> Fraction:
        value = atom()
        while peek() in ("*", "/"):
            op, rhs = take(), atom()
            if op == "/" and rhs == 0:
                raise ExpressionError("division by zero")
            value = value * rhs if op == "*" else value / rhs
        return value

    def expr_() -> Fraction:
        value = term()
        while peek() in ("+", "-"):
            op, rhs = take(), term()
            value = value + rhs if op == "+" else value - rhs
        return value

    if not tokens:
        raise ExpressionError("empty expression")
    value = expr_()
    if pos != len(tokens):
        raise ExpressionError(f"unexpected {tokens[pos]!r} after the expression")
    return value, numbers


class Countdown(Task):
    name = "countdown"
    default_difficulty = 4
    min_difficulty = 2
    max_difficulty = 6

    def make_example(self, rng: random.Random, difficulty: int) -> dict:
        while True:  # a random combination order; retry until the target is a positive integer in range
            numbers = [rng.randint(1, 25) if rng.random() < 0.8 else rng.choice([25, 50, 75, 100])
                       for _ in range(difficulty)]  # fmt: skip
            pool = [(n, str(n)) for n in numbers]  # (value, expression)
            steps = []
            while len(pool) > 1:
                (x, ex), (y, ey) = (pool.pop(rng.randrange(len(pool))) for _ in range(2))
                if y > x:
                    (x, ex), (y, ey) = (y, ey), (x, ex)
                ops = ["+", "*"] + (["-"] if x > y else []) + (["/"] if y > 1 and x % y == 0 else [])
                op = rng.choice(ops)
                value = {"+": x + y, "-": x - y, "*": x * y, "/": x // y if y else 0}[op]
                steps.append(f"{x} {op} {y} = {value}")
                pool.append((value, f"({ex} {op} {ey})"))
            target, expression = pool[0]
            if 1 <= target <= MAX_TARGET:
                break
        expression = expression[1:-1] if expression.startswith("(") else expression
        shown = numbers[:]
        rng.shuffle(shown)
        reasoning = "\n".join(
            [f"I need to reach {target} using {', '.join(map(str, shown))}, each number once.", *steps,
             f"That reaches the target: {expression} = {target}."])  # fmt: skip
        return {"prompt": self.prompt(shown, target), "answer": expression, "reasoning": reasoning,
                "numbers": shown, "target": target}  # fmt: skip

    @staticmethod
    def prompt(numbers: list[int], target: int) -> str:
        return (f"Using the numbers [{', '.join(map(str, numbers))}], write an expression that equals {target}. "
                "Use each number exactly once, with + - * / and parentheses.")  # fmt: skip

    def parse_prompt(self, prompt: str) -> dict:
        m = _PROMPT_RE.search(prompt)
        if m is None:
            raise ValueError(f"countdown: prompt does not name 'numbers [..]' and a target: {prompt[:80]!r}")
        return {"numbers": [int(x) for x in m.group(1).split(",")], "target": int(m.group(2))}

    def score(self, example: dict, answer: str) -> float:
        expr = clean_answer(answer).split("=")[0]  # "(25 - 7) * 4 = 72" -> the left side
        try:
            value, used = evaluate(expr)
        except ExpressionError:
            return 0.0
        if Counter(used) != Counter(example["numbers"]):
            return 0.0
        return 1.0 if value == example["target"] else 0.0
