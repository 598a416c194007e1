"""Multiple-choice accuracy by log-likelihood, the way lm-evaluation-harness scores `multiple_choice` tasks
(`acc`): each choice's summed log-probability as a continuation of the context, the highest one is the answer.

    deepseek eval --model deepseek/r1-tiny --choices items.jsonl    # {"context", "choices", "label"} per line

Tokenisation follows lm-eval's: the context's trailing whitespace moves to the front of the continuation, and
the continuation's tokens are those of `context + choice` after the tokens of `context` (no special tokens added; put the chat markers in the context text if you want them), so the
numbers match lm-eval's `local-completions` against `deepseek serve` on the same items (docs/evaluation.md).
"""

from __future__ import annotations

import json
from pathlib import Path


def read_items(path: str | Path) -> list[dict]:
    items = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        item = json.loads(line)
        if not isinstance(item.get("context"), str) or not isinstance(item.get("choices"), list) or \
                not item["choices"] or not isinstance(item.get("label"), int) or \
                not 0 <= item["label"] < len(item["choices"]):  # fmt: skip
            raise ValueError(f"{path} line {i + 1}: needs a string 'context', a non-empty list 'choices' and "
                             "an integer 'label' indexing it")  # fmt: skip
        items.append(item)
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def continuation_logprob(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """(sum of log p(continuation tokens | context), whether every one of them is the greedy token)."""
    import torch

    spaces = len(context) - len(context.rstrip())
    if spaces:  # lm-eval's convention: the context's trailing whitespace belongs to the continuation
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx) :]
    if not ctx or not cont:
        raise ValueError(f"context and continuation must both give tokens: {context[:40]!r} / {continuation!r}")
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole], device=device)).logits[0].float()
    logp = torch.log_softmax(logits[len(ctx) - 1 : len(whole) - 1], dim=-1)
    target = torch.tensor(cont, device=device)
    chosen = logp.gather(1, target[:, None])[:, 0]
    return float(chosen.sum()), bool((logp.argmax(-1) == target).all())


def choice_accuracy(model, tokenizer, items: list[dict]) -> dict:
    """{"n", "accuracy", "predictions"}: argmax over each item's choices of the continuation log-likelihood."""
    preds = []
    for item in items:
        scores = [continuation_logprob(model, tokenizer, item["context"], c)[0] for c in item["choices"]]
        preds.append(max(range(len(scores)), key=scores.__getitem__))
    correct = sum(p == item["label"] for p, item in zip(preds, items))
    return {"n": len(items), "accuracy": correct / len(items), "predictions": preds}
