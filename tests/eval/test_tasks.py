"""Task generators and graders: hand-written right/wrong answers, generated traces grade as correct and are
arithmetically true line by line, difficulty controls size, the countdown parser is safe."""

from __future__ import annotations

import re

import pytest

from deepseek.tasks import TASKS, evaluate, final_answer, format_reward, get_task, parse_int
from deepseek.tasks.countdown import ExpressionError


def think(answer: str, reasoning: str = "work") -> str:
    return f"<think>\n{reasoning}\n</think>\n\n{answer}"


@pytest.mark.parametrize("name", list(TASKS))
def test_generated_traces_grade_correct_and_are_deterministic(name):
    task = get_task(name)
    levels = [128, 600] if name.startswith("passkey") else range(task.min_difficulty, task.min_difficulty + 4)
    for d in levels:
        examples = task.generate(12, seed=3, difficulty=d)
        assert examples == task.generate(12, seed=3, difficulty=d)
        assert examples[:5] == task.generate(5, seed=3, difficulty=d)  # example i does not depend on n
        assert examples != task.generate(12, seed=4, difficulty=d)
        for ex in examples:
            assert task.grade(ex, ex["completion"]) == 1.0
            assert task.grade(ex["prompt"], ex["completion"]) == 1.0  # the prompt alone is enough
            assert format_reward(ex["completion"]) == 1.0
            assert ex["messages"][-1] == {"role": "assistant", "content": ex["completion"]}
            assert task.grade(ex, think("7")) == 0.0 or ex["answer"] == "7"


_ADD = re.compile(r"(\d) \+ (\d) \+ carry (\d) = (\d+): write (\d), carry (\d)")
_SUB = re.compile(r"(\d) - (\d) - borrow (\d) = (\d+): write (\d), borrow 0")
_SUB_NEG = re.compile(r"(\d) - (\d) - borrow (\d) is negative, so 10 \+ (\d) - (\d) - (\d) = (\d+): write (\d), borrow 1")
_MUL = re.compile(r"(\d) \* (\d) = (\d+), \+ (\d) = (\d+): write (\d), carry (\d)")
_EQ = re.compile(r"(?:So |Reading the digits from left to right: )?(\d+) ([-+*/]) (\d+) = (\d+)\.?")
_SHIFT = re.compile(r"Shifted by (\d) places?: (\d+)\.")


def check_line(line: str) -> bool:
    """True if the line is a step this test understands (and then it must be arithmetically right)."""
    if m := _ADD.fullmatch(line):
        x, y, c, s, w, c2 = map(int, m.groups())
        assert s == x + y + c and w == s % 10 and c2 == s // 10, line
    elif m := _SUB.fullmatch(line):
        x, y, b, r, w = map(int, m.groups())
        assert r == x - y - b >= 0 and w == r, line
    elif m := _SUB_NEG.fullmatch(line):
        x, y, b, x2, y2, b2, r, w = map(int, m.groups())
        assert x - y - b < 0 and (x, y, b) == (x2, y2, b2) and r == 10 + x - y - b == w, line
    elif m := _MUL.fullmatch(line):
        x, d, p, c, t, w, c2 = map(int, m.groups())
        assert p == x * d and t == p + c and w == t % 10 and c2 == t // 10, line
    elif m := _SHIFT.fullmatch(line):
        assert int(m.group(2)) % 10 ** int(m.group(1)) == 0, line
    elif m := _EQ.fullmatch(line):
        a, op, b, r = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        assert (a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a / b) == r, line
    else:
        return False
    return True


@pytest.mark.parametrize("name", ["addition", "subtraction", "multiplication", "countdown"])
def test_every_step_in_the_reasoning_is_true(name):
    task = get_task(name)
    for ex in task.generate(40, seed=0, difficulty=4):
        lines = ex["reasoning"].split("\n")
        steps = [line for line in lines if check_line(line)]
        assert len(steps) >= 3, ex["reasoning"]
        other = [line for line in lines if not check_line(line)]
        if name == "multiplication":  # one "a * d:" header per digit of b
            other = [line for line in other if not re.fullmatch(rf"{ex['a']} \* \d:", line)]
        assert len(other) <= 3, other  # the rest: a header, a conclusion
        final = str(ex["target"]) if name == "countdown" else ex["answer"]
        assert lines[-1].rstrip(".").endswith(final)


def test_difficulty_sets_the_number_of_digits():
    for name in ("addition", "subtraction", "multiplication"):
        task = get_task(name)
        for d in (1, 3, 7):
            for ex in task.generate(20, seed=1, difficulty=d):
                assert len(str(ex["a"])) == d and len(str(ex["b"])) == d
    assert {len(ex["numbers"]) for ex in get_task("countdown").generate(10, difficulty=5)} == {5}
    with pytest.raises(ValueError, match="difficulty"):
        get_task("addition").generate(3, difficulty=0)
    with pytest.raises(ValueError, match="unknown task"):
        get_task("sudoku")


def test_arithmetic_grader_hand_cases():
    add = get_task("addition")
    p = "What is 999 + 1?"
    assert add.grade(p, think("1000")) == 1.0
    assert add.grade(p, think("1,000")) == 1.0
    assert add.grade(p, think("The answer is 1000.")) == 1.0
    assert add.grade(p, think("\\boxed{1000}")) == 1.0
    assert add.grade(p, "1000") == 1.0  # no reasoning at all: the whole text is the answer
    assert add.grade(p, think("100")) == 0.0
    assert add.grade(p, think("1000 or 1001")) == 0.0  # hedging is not an answer
    assert add.grade(p, "<think>\n999 + 1 = 1000") == 0.0  # reasoning never closed
    assert add.grade(p, think("")) == 0.0
    assert add.grade(p, "<think>1000</think>\n1001") == 0.0  # only the text after </think> counts
    sub = get_task("subtraction")
    assert sub.grade("What is 12 - 345?", think("-333")) == 1.0
    assert sub.grade("What is 12 - 345?", think("333")) == 0.0
    mul = get_task("multiplication")
    assert mul.grade("What is 4738 * 592?", think("2804896")) == 1.0
    assert mul.grade("What is 4738 * 592?", think("2804886")) == 0.0
    with pytest.raises(ValueError, match="prompt"):
        mul.grade("What is 1 + 2?", think("3"))


def test_subtraction_negative_trace():
    ex = get_task("subtraction")._example(123, 456)
    assert ex["answer"] == "-333" and "make it negative" in ex["reasoning"] and ex["reasoning"].endswith("-333.")


def test_countdown_grader_hand_cases():
    cd = get_task("countdown")
    ex = {"numbers": [25, 7, 4, 3], "target": 75}
    assert cd.grade(ex, think("(25 - 7 - 3) * 4 + 15")) == 0.0  # 15 is not given
    assert cd.grade(ex, think("25 * 3 + 7 - 4 - 3")) == 0.0  # 3 used twice
    assert cd.grade(ex, think("25 * 3")) == 0.0  # must use every number
    assert cd.grade(ex, think("25 * (7 - 4) * 3 / 3")) == 0.0  # 3 used twice again
    assert cd.grade(ex, think("(7 - 4) * 25 + 3 - 3")) == 0.0
    assert cd.grade(ex, think("25 * 3 * (7 - 4) / 3")) == 0.0
    ex2 = {"numbers": [25, 7, 4, 3], "target": 72}
    assert cd.grade(ex2, think("(25 - 7) * 4 * 3 / 3")) == 0.0  # 3 twice, not given twice
    ex3 = {"numbers": [25, 7, 4, 2], "target": 72}
    assert cd.grade(ex3, think("(25 - 7) * 4 * 2 / 2")) == 0.0
    assert cd.grade(ex3, think("(25 - 7) * (4 / 2) * 2")) == 0.0
    assert cd.grade(ex3, think("(25 - 7) * 4")) == 0.0
    ex4 = {"numbers": [25, 7, 4, 2], "target": 36}
    assert cd.grade(ex4, think("(25 - 7) * 4 / 2")) == 1.0
    assert cd.grade(ex4, think("(25 - 7) × 4 ÷ 2 = 36")) == 1.0
    assert cd.grade(ex4, think("(25 - 7) * 4 / 2 = 36.")) == 1.0
    assert cd.grade(ex4, think("25 - 7 * 4 / 2")) == 0.0  # precedence: 25 - 14 = 11
    assert cd.grade(ex4, think("__import__('os') or 36")) == 0.0  # not an arithmetic expression
    assert cd.grade(ex4, think("(25 - 7) * 4 / (2 - 2)")) == 0.0  # division by zero, not a crash
    prompt = cd.prompt([25, 7, 4, 2], 36)
    assert cd.grade(prompt, think("(25 - 7) * 4 / 2")) == 1.0


def test_sorting_grader_hand_cases():
    task = get_task("sorting")
    p = "Sort these numbers from smallest to largest: 5, 3, 9, 3."
    assert task.grade(p, think("3, 3, 5, 9")) == 1.0
    assert task.grade(p, think("[3,3,5,9]")) == 1.0
    assert task.grade(p, think("3, 5, 9")) == 0.0  # a duplicate dropped
    assert task.grade(p, think("3, 3, 9, 5")) == 0.0
    assert task.grade(p, think("3 3 5 9")) == 0.0
    assert {len(ex["numbers"]) for ex in task.generate(5, difficulty=12)} == {12}


def test_expression_parser():
    from fractions import Fraction

    assert evaluate("1 + 2 * 3") == (7, [1, 2, 3])
    assert evaluate("(1 + 2) * 3") == (9, [1, 2, 3])
    assert evaluate("7 / 2")[0] == Fraction(7, 2)
    assert evaluate("8 - 3 - 2")[0] == 3  # left associative
    assert evaluate("64 / 4 / 2")[0] == 8
    for bad in ("", "1 +", "(1 + 2", "1 2", "2 ** 3", "abs(2)", "1 + -2", "3 / 0"):
        with pytest.raises(ExpressionError):
            evaluate(bad)


def test_passkey_length_depth_and_grader():
    from transformers import AutoTokenizer  # noqa: F401  (tokenizer-exact lengths are tested in test_tokenizer)

    task = get_task("passkey")
    for length in (256, 2048):
        examples = task.generate(6, seed=0, difficulty=length)
        for ex in examples:
            assert 0.9 * length <= ex["context_tokens"] <= length
            assert 0.0 <= ex["depth"] <= 1.0
            assert re.fullmatch(r"\d{5}", ex["answer"])
            assert ex["prompt"].count(ex["answer"]) == 2  # "The pass key is K. Remember it. K is the pass key."
    depths = [ex["depth"] for ex in task.generate(50, seed=1, difficulty=256)]
    assert min(depths) < 0.2 and max(depths) > 0.8
    ex = task.generate(1, seed=2, difficulty=300)[0]
    key = ex["answer"]
    assert task.grade(ex, think(key)) == 1.0
    assert task.grade(ex, think(f"The pass key is {key}.")) == 1.0
    assert task.grade(ex, think(str(int(key) + 1))) == 0.0
    assert task.grade(ex, think(f"{key} or 12345")) == 0.0


def test_passkey_multi_key_asks_for_one_of_several():
    task = get_task("passkey_multi")
    for ex in task.generate(10, seed=0, difficulty=512):
        keys = re.findall(r"The pass key for (\w+) is (\d+)\.", ex["prompt"])
        assert len(keys) == 4 and ex["prompt"].rstrip().endswith(f"What is the pass key for {ex['name']}?")
        others = [k for n, k in keys if n != ex["name"]]
        assert task.grade(ex["prompt"], think(ex["answer"])) == 1.0
        assert task.grade(ex["prompt"], think(others[0])) == 0.0  # a distractor key scores nothing


def test_passkey_essay_filler():
    from deepseek.tasks import Passkey

    ex = Passkey(filler="essay").generate(2, seed=0, difficulty=1024)[0]
    assert "The grass is green" not in ex["prompt"] and 900 <= ex["context_tokens"] <= 1024


def test_format_reward_and_answer_parsing():
    assert format_reward("<think>\nsteps\n</think>\n\n42") == 1.0
    assert format_reward("steps\n</think>\n42") == 1.0  # opening tag already in the prompt
    assert format_reward("<think></think>42") == 0.0  # empty reasoning
    assert format_reward("<think>steps</think>   ") == 0.0  # no answer
    assert format_reward("42") == 0.0
    assert format_reward("<think>a</think>b</think>c") == 0.0
    assert format_reward("<think>a<think>b</think>c") == 0.0
    assert final_answer("<think>x</think> 5 ") == "5"
    assert final_answer("<think>x") is None
    assert parse_int(" -1,234. ") == -1234 and parse_int("12a") is None
