"""Load a model and its tokenizer from one folder (or a bundled name) and build chat prompts."""

from __future__ import annotations

from pathlib import Path

import torch

# DeepSeek-R1's own chat format, used when the tokenizer carries no chat template.
BOS, USER, ASSISTANT, EOS = "<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"


def load_model_and_tokenizer(name_or_path: str, dtype=torch.float32):
    """(model, tokenizer, served model name). Errors name the folder and what is missing."""
    from ..cli_generate import load_model_and_tokenizer as load
    from ..compat.checkpoint import resolve

    model, tokenizer = load(name_or_path, dtype=dtype)
    path = resolve(name_or_path)
    name = str(name_or_path) if not Path(str(name_or_path)).is_dir() else path.name
    return model, tokenizer, name


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the conversation followed by the assistant turn (R1 opens it with <think>)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    system = "".join(m["content"] for m in messages if m["role"] in ("system", "developer"))
    text = BOS + system
    for m in messages:
        if m["role"] == "user":
            text += USER + m["content"]
        elif m["role"] == "assistant":
            text += ASSISTANT + m["content"] + EOS
    text += ASSISTANT + "<think>\n"
    return tokenizer.encode(text, add_special_tokens=False)
