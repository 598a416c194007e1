"""reasoning-gym tasks: seeded, graded exactly by reasoning-gym's own scorer, usable as GRPO rewards, and the
held-out split never shares a question with the training split, whatever the seeds."""

from __future__ import annotations

import pytest

from deepseek.tasks import get_task
from deepseek.tasks.gym import GYM_DATASETS, in_heldout

pytest.importorskip("reasoning_gym")


@pytest.mark.parametrize("name", GYM_DATASETS)
def test_gym_task_generates_and_grades(name):
    task = get_task(name)
    examples = task.generate(20, seed=7)
    assert examples == task.generate(20, seed=7)  # seeded
    assert [e["prompt"] for e in task.generate(5, seed=7)] == [e["prompt"] for e in examples[:5]]  # prefix-stable
    for ex in examples:
        assert ex["task"] == name and ex["split"] == "train"
        assert task.grade(ex, ex["completion"]) == 1.0  # the SFT target is right
        assert task.grade(ex, f"<think>\nguess\n</think>\n\n{ex['answer']}0") == 0.0  # partial credit is 0
        assert task.grade(ex, "<think>\nnever closed") == 0.0
        assert task.grade(ex["prompt"], ex["completion"]) == 1.0  # from the prompt alone, once generated


def test_heldout_is_disjoint_from_training_by_construction():
    for name in GYM_DATASETS:
        train = {e["prompt"] for seed in (0, 1, 12345) for e in get_task(name).generate(150, seed=seed)}
        held = {e["prompt"] for seed in (0, 1, 12345) for e in get_task(f"{name}_heldout").generate(60, seed=seed)}
        assert train.isdisjoint(held), name
        assert all(in_heldout(q) for q in held) and not any(in_heldout(q) for q in train)
        assert len(held) > 20  # the held-out split is not degenerate


def test_gym_rewards_feed_grpo_rollouts():
    from deepseek.train.rl.rollout import grade

    ex = get_task("gsm_symbolic").generate(1, seed=3)[0]
    assert grade(ex, ex["completion"], format_weight=0.1) == (1.0, 1.0, 1.1)  # accuracy, format, reward
    assert grade(ex, "<think>\nhm\n</think>\n\n-1", format_weight=0.1) == (0.0, 1.0, 0.1)


def test_unknown_names_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown task 'gsm_nope'"):
        get_task("gsm_nope")
