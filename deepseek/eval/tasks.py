"""Task accuracy with the tasks' exact graders: greedy accuracy and pass@k with sampling, generated in batches
on the fast decode path (static latent cache, left padding).

Legend: B prompts per batch, T prompt tokens (left-padded).
"""

from __future__ import annotations

import math

from ..chat import chat_prompt_ids
from ..generation.loop import generate
from ..loading import load_model_and_tokenizer  # noqa: F401  (deepseek.eval's loader)
from ..train.data import left_pad


def generate_completions(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 256,
                         temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 16, seed: int = 0,
                         show_progress: bool = False, finish_reasons: list | None = None) -> list[str]:  # fmt: skip
    """Decoded completions (special tokens dropped, <think> tags kept), one per prompt, in order.

    `finish_reasons`, when given a list, is extended with each completion's "stop" or "length" (cut at the limit)."""
    from tqdm.auto import tqdm

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    out: list[str] = []
    bar = tqdm(total=len(prompts), desc="generate", unit="seq", disable=not show_progress)
    for i in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[i : i + batch_size], pad)
        res = generate(model, ids.to(device), mask.to(device), max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, eos_token_id=tokenizer.eos_token_id, seed=seed + i)  # fmt: skip
        out += [tokenizer.decode(t, skip_special_tokens=True) for t in res.new_tokens]
        if finish_reasons is not None:
            finish_reasons += res.finish_reasons
        bar.update(len(res.new_tokens))
    bar.close()
    return out


def task_max_new_tokens(tokenizer, examples: list[dict]) -> int:
    """The default generation limit for a task: its longest reference completion (the SFT target, in tokens)
    x 1.5, rounded up to a multiple of 64 (multiplication at the default difficulty: ~310 tokens -> 512)."""
    longest = max((len(tokenizer.encode(ex["completion"], add_special_tokens=False)) for ex in examples
                   if ex.get("completion")), default=0)  # fmt: skip
    return 256 if longest == 0 else max(64, -(-int(longest * 1.5) // 64) * 64)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if k < 1 or k > n:
        raise ValueError(f"pass@{k} needs 1 <= k <= samples, got {n} samples")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k: {c} correct out of {n} samples is impossible")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def task_accuracy(model, tokenizer, task: str, n: int = 100, seed: int = 12345, difficulty: int | None = None,
                  k: int = 1, samples: int | None = None, temperature: float | None = None,
                  max_new_tokens: int | None = None, batch_size: int = 16, show_progress: bool = False) -> dict:  # fmt: skip
    """Greedy accuracy (k=1, temperature 0) or pass@k from `samples` (>= k) sampled completions per problem.

    `max_new_tokens` defaults to the task's own (task_max_new_tokens). Returns {"task", "n", "k", "accuracy"
    (greedy or pass@k), "mean_reward", "format_rate", "max_new_tokens", "truncated" (completions cut at the
    limit: they score 0 when the answer never came), "examples"}."""
    from ..tasks import format_reward, get_task

    if n < 1 or k < 1:
        raise ValueError(f"n and k must be >= 1, got n={n}, k={k}")
    samples = samples or k
    if samples < k:
        raise ValueError(f"samples={samples} must be >= k={k}")
    temperature = (0.0 if k == 1 and samples == 1 else 0.8) if temperature is None else temperature
    if samples > 1 and temperature <= 0:
        raise ValueError("pass@k with several samples needs temperature > 0 (greedy samples are identical)")
    grader = get_task(task)
    examples = grader.generate(n, seed=seed, difficulty=difficulty)
    if max_new_tokens is None:
        max_new_tokens = task_max_new_tokens(tokenizer, examples)
    prompts = [chat_prompt_ids(tokenizer, ex) for ex in examples for _ in range(samples)]
    reasons: list[str] = []
    completions = generate_completions(model, tokenizer, prompts, max_new_tokens, temperature, batch_size=batch_size,
                                       seed=seed, show_progress=show_progress, finish_reasons=reasons)  # fmt: skip
    rewards = [grader.grade(examples[i // samples], c) for i, c in enumerate(completions)]
    correct = [sum(r >= 1.0 for r in rewards[j * samples : (j + 1) * samples]) for j in range(n)]
    score = sum(pass_at_k(samples, c, k) for c in correct) / n
    steps = {}
    if task in ("addition", "subtraction", "multiplication"):  # every intermediate line graded (eval/steps.py)
        from .steps import step_accuracy

        steps = step_accuracy(completions, [examples[i // samples] for i in range(len(completions))])
    return {
        "task": task, "n": n, "k": k, "samples": samples, "temperature": temperature,
        "difficulty": examples[0].get("difficulty"), "accuracy": score,
        "mean_reward": sum(rewards) / len(rewards),
        "format_rate": sum(format_reward(c) for c in completions) / len(completions),
        "max_new_tokens": max_new_tokens, "truncated": sum(r == "length" for r in reasons),
        **steps,
        "examples": [{"prompt": examples[0]["prompt"], "completion": completions[0], "reward": rewards[0]}],
    }  # fmt: skip
