"""Rollouts and evaluation: sample completions with the fast batched decoder, grade them with the task graders.

Legend: P prompts, G completions per prompt, B = P*G rows, T tokens.

    rolls = rollout(model, tokenizer, examples, group_size=8, max_new_tokens=256, temperature=1.0, seed=0)
    batch = to_batch(rolls, pad_id)                  # right-padded ids, completion mask, labels for the trainer
    res = evaluate(model, tokenizer, examples, samples=8, temperature=1.0)   # greedy + pass@k accuracy

Reward = accuracy (the task's exact grader: 1 if the answer after </think> is right) + format_weight * format
(1 if the completion is `<think>` reasoning `</think>` answer). Prompts use the chat template's generation prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...chat import chat_prompt_ids
from ...eval.tasks import pass_at_k
from ...generation.loop import generate
from ...tasks import format_reward, get_task
from ..data import IGNORE, left_pad


@dataclass
class Rollout:
    example: dict  # the task example (task, prompt, answer, ...)
    prompt_ids: list[int]
    completion_ids: list[int]  # sampled tokens, including <|eos|> when the model stopped
    text: str  # decoded completion (special tokens dropped, <think> tags kept)
    accuracy: float
    format: float
    reward: float
    finished: bool  # stopped with eos (not cut at max_new_tokens)


def grade(example: dict, text: str, format_weight: float) -> tuple[float, float, float]:
    acc = get_task(example["task"]).grade(example, text) if example["task"] != "passkey_multi" else \
        get_task("passkey").grade(example, text)  # fmt: skip
    fmt = format_reward(text)
    return acc, fmt, acc + format_weight * fmt


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float,
                       top_p: float = 1.0, seed: int | None = None, batch_size: int = 64):  # fmt: skip
    """[(prompt_ids, completion_ids, finished)] per prompt, in chunks of batch_size rows."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = [chat_prompt_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
            ids, mask = left_pad(chunk, pad)
            res = generate(model, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           eos_token_id=eos, seed=None if seed is None else seed + start)  # fmt: skip
            out += [(p, t, r == "stop") for p, t, r in zip(chunk, res.new_tokens, res.finish_reasons)]
    finally:
        model.train(was_training)
    return out


def decode(tokenizer, completion_ids: list[int]) -> str:
    return tokenizer.decode(completion_ids, skip_special_tokens=True)


def rollout(model, tokenizer, examples: list[dict], group_size: int, max_new_tokens: int,
            temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None, format_weight: float = 0.1,
            batch_size: int = 64) -> list[Rollout]:  # fmt: skip
    """G completions for each example (rows grouped: example 0's G, then example 1's, ...), graded."""
    prompts = [ex["prompt"] for ex in examples for _ in range(group_size)]
    samples = sample_completions(model, tokenizer, prompts, max_new_tokens, temperature, top_p, seed, batch_size)
    rolls = []
    for i, (p_ids, c_ids, finished) in enumerate(samples):
        ex = examples[i // group_size]
        text = decode(tokenizer, c_ids)
        acc, fmt, reward = grade(ex, text, format_weight)
        rolls.append(Rollout(ex, p_ids, list(c_ids), text, acc, fmt, reward, finished))
    return rolls


def to_batch(rolls: list[Rollout], pad_id: int) -> dict:
    """Right-padded training batch: input_ids (B, T), attention_mask (B, T), completion_mask (B, T) (1 on
    sampled tokens), labels (B, T) (the sampled tokens, IGNORE elsewhere: the trainer counts them)."""
    seqs = [r.prompt_ids + r.completion_ids for r in rolls]
    T = max(len(s) for s in seqs)
    B = len(seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    comp = torch.zeros((B, T), dtype=torch.long)
    for i, (r, s) in enumerate(zip(rolls, seqs)):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attn[i, : len(s)] = 1
        comp[i, len(r.prompt_ids) : len(s)] = 1
    labels = ids.masked_fill(comp == 0, IGNORE)
    return {"input_ids": ids, "attention_mask": attn, "completion_mask": comp, "labels": labels}


# ---------------------------------------------------------------------------- evaluation
def evaluate(model, tokenizer, examples: list[dict], max_new_tokens: int = 256, samples: int = 0,
             temperature: float = 1.0, k: int | None = None, seed: int = 0, batch_size: int = 64) -> dict:  # fmt: skip
    """Greedy accuracy, format rate and mean completion length; with samples > 0 also pass@k (k defaults to
    samples) and mean sampled accuracy. Per-example results under "per_example"."""
    greedy = sample_completions(model, tokenizer, [e["prompt"] for e in examples], max_new_tokens, 0.0,
                                batch_size=batch_size)  # fmt: skip
    per = []
    for ex, (_, c_ids, finished) in zip(examples, greedy):
        text = decode(tokenizer, c_ids)
        acc, fmt, _ = grade(ex, text, 0.0)
        per.append({"prompt": ex["prompt"], "answer": ex["answer"], "greedy": acc, "format": fmt,
                    "length": len(c_ids), "finished": finished, "completion": text})  # fmt: skip
    n = max(1, len(per))
    result = {"n": len(per), "greedy": sum(p["greedy"] for p in per) / n, "format": sum(p["format"] for p in per) / n,
              "length": sum(p["length"] for p in per) / n}  # fmt: skip
    if samples > 0:
        k = k or samples
        prompts = [e["prompt"] for e in examples for _ in range(samples)]
        sampled = sample_completions(model, tokenizer, prompts, max_new_tokens, temperature, seed=seed,
                                     batch_size=batch_size)  # fmt: skip
        for i, p in enumerate(per):
            rows = sampled[i * samples : (i + 1) * samples]
            correct = sum(grade(examples[i], decode(tokenizer, c), 0.0)[0] >= 1.0 for _, c, _ in rows)
            p["correct_of_samples"] = int(correct)
        result[f"pass@{k}"] = sum(pass_at_k(samples, p["correct_of_samples"], k) for p in per) / n
        result["sampled"] = sum(p["correct_of_samples"] for p in per) / (n * samples)
    result["per_example"] = per
    return result
