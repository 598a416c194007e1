"""Procedurally generated reasoning tasks with exact graders, shared by SFT data, evaluation and RL rewards.

    from deepseek.tasks import get_task, format_reward
    task = get_task("multiplication")
    examples = task.generate(100, seed=0, difficulty=3)      # prompt, answer, reasoning, completion, messages
    reward = task.grade(examples[0], completion)              # 1.0 if the answer after </think> is right
    reward = task.grade(examples[0]["prompt"], completion)    # the prompt text alone is enough too
"""

from __future__ import annotations

from functools import partial

from .arithmetic import Addition, Multiplication, Subtraction
from .base import Task, final_answer, format_reward, parse_int, sft_completion
from .countdown import Countdown, evaluate
from .passkey import Passkey, estimate_tokens
from .sorting import Sorting

# name -> factory; keyword arguments of get_task go to the factory (e.g. passkey tokenizer=..., filler=...)
TASKS = {
    "addition": Addition,
    "subtraction": Subtraction,
    "multiplication": Multiplication,
    "countdown": Countdown,
    "sorting": Sorting,
    "passkey": Passkey,
    "passkey_multi": partial(Passkey, num_keys=4),
}


def get_task(name: str, **kwargs) -> Task:
    """A task by name: TASKS, or a reasoning-gym task (deepseek.tasks.gym.GYM_TASKS: `gsm_symbolic` for
    training, `gsm_symbolic_heldout` for evaluation, ...; kept out of TASKS so the default tokenizer corpus
    and the bundled recipe do not depend on the optional package)."""
    from .gym import GYM_TASKS, get_gym_task

    if name in GYM_TASKS:
        return get_gym_task(name, **kwargs)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join([*TASKS, *GYM_TASKS])}")
    return TASKS[name](**kwargs)


__all__ = ["TASKS", "Addition", "Countdown", "Multiplication", "Passkey", "Sorting", "Subtraction", "Task", "estimate_tokens",
           "evaluate", "final_answer", "format_reward", "get_task", "parse_int", "sft_completion"]  # fmt: skip
