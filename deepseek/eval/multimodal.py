"""Held-out evaluation of a multimodal checkpoint: the LM's answers about media, and the binding's zero-shot
accuracy on the same items (the bar the LM's answers are held to).

    from deepseek.eval.multimodal import lm_answer_accuracy, zero_shot_accuracy
    acc = lm_answer_accuracy(model, tok, "audio", items, digits)     # "<audio>\\nWhich digit does this clip say?"

Prompts use the held-out question templates (deepseek/train/multimodal.py QUESTIONS["test"]); the answer is
the first digit of the text after </think>.
"""

from __future__ import annotations

import re

import torch


def parse_digit(answer: str) -> int | None:
    m = re.search(r"\d", answer or "")
    return int(m.group()) if m else None


@torch.inference_mode()
def lm_answer_accuracy(model, tokenizer, modality: str, items: list, digits: list[int], batch_size: int = 32,
                       max_new_tokens: int = 32, questions=None) -> dict:  # fmt: skip
    from ..chat import split_reasoning
    from ..generation.loop import generate
    from ..train.multimodal import QUESTIONS, media_messages

    questions = questions or QUESTIONS["test"][modality]
    processor = model.processor(tokenizer)
    key = {"image": "images", "audio": "audio", "points": "points"}[modality]
    correct, examples = 0, []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        convs = [media_messages(modality, questions[(i + j) % len(questions)], None) for j in range(len(chunk))]
        inputs = processor(messages=convs, **{key: chunk})
        embeds = model.media_embeds(inputs["input_ids"], inputs["media"])
        out = generate(model, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=max_new_tokens,
                       eos_token_id=tokenizer.eos_token_id, inputs_embeds=embeds)  # fmt: skip
        for j, toks in enumerate(out.new_tokens):
            text = tokenizer.decode(toks, skip_special_tokens=True)
            _, answer = split_reasoning(text)
            ok = parse_digit(answer or "") == digits[i + j]
            correct += ok
            if len(examples) < 3:
                examples.append({"question": convs[j][0]["content"], "completion": text, "digit": digits[i + j]})
    return {"modality": modality, "n": len(items), "accuracy": correct / max(1, len(items)), "examples": examples}


@torch.inference_mode()
def zero_shot_accuracy(binding, modality: str, items: list, digits: list[int], batch_size: int = 128) -> float:
    """Nearest text prototype (mean over the held-out templates) in the shared space."""
    from ..multimodal import data
    from ..multimodal.media import decode

    texts = data.texts("test")
    t = binding.encode("text", [s for s, _ in texts]).pooled
    labels = torch.tensor([d for _, d in texts])
    protos = torch.nn.functional.normalize(torch.stack([t[labels == d].mean(0) for d in range(10)]), dim=-1)
    correct = 0
    for i in range(0, len(items), batch_size):
        chunk = [decode(modality, x, binding.cfg) for x in items[i : i + batch_size]]
        pred = (binding.encode(modality, chunk).pooled @ protos.T).argmax(-1)
        correct += int((pred == torch.tensor(digits[i : i + batch_size])).sum())
    return correct / max(1, len(items))
