"""Reasoning step decomposition accuracy: every line of every reference arithmetic trace is a correct step,
one corrupted digit makes exactly its own step wrong, and `deepseek eval` reports the fraction."""

from __future__ import annotations

import pytest

from deepseek.eval.steps import grade_steps, step_accuracy
from deepseek.tasks import get_task


@pytest.mark.parametrize("name", ["addition", "subtraction", "multiplication"])
def test_reference_traces_are_all_correct_steps(name):
    for d in range(1, 6):
        for ex in get_task(name).generate(40, seed=11, difficulty=d):
            graded = grade_steps(ex["completion"], ex)
            assert graded and all(graded), (ex["prompt"], graded)


def test_a_wrong_digit_is_a_wrong_step():
    ex = get_task("addition").generate(1, seed=0, difficulty=3)[0]  # e.g. What is A + B?
    lines = ex["reasoning"].splitlines()
    assert lines[1].endswith(f"carry {int(lines[1].split('carry ')[-1])}")
    # the first column's sum off by one: that step (and only that one) is wrong
    x, rest = lines[1].split(" + ", 1)
    wrong = f"{(int(x) + 1) % 10} + {rest}"
    graded = grade_steps("<think>\n" + "\n".join([lines[0], wrong, *lines[2:]]) + "\n</think>\n\n1", ex)
    assert graded.count(False) == 1 and graded[0] is False
    # right arithmetic on the wrong digits (column 1's digits in column 0) is wrong too
    m = get_task("multiplication").generate(1, seed=0, difficulty=2)[0]
    trace = m["reasoning"].splitlines()
    swapped = "\n".join([trace[0], trace[1], trace[3], trace[2], *trace[4:]])
    assert not all(grade_steps(f"<think>\n{swapped}\n</think>\n\n1", m))
    # garbled lines count as wrong steps; a completion with no reasoning has none
    assert grade_steps("<think>\nthe answer is big\n</think>\n\n5") == [False]
    assert step_accuracy(["7"]) == {"steps": 0, "correct_steps": 0, "step_accuracy": 0.0}


def test_subtraction_borrow_and_negative_traces():
    ex = get_task("subtraction")._example(1789, 4012)  # negative result, borrows
    trace = f"<think>\n{ex['reasoning']}\n</think>\n\n{ex['answer']}"
    assert "borrow 1" in trace and all(grade_steps(trace, ex))
    bad = trace.replace("borrow 1", "borrow 0", 1)
    assert not all(grade_steps(bad, ex))
