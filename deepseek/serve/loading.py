"""Compatibility: the loader and chat prompts live in deepseek.loading and deepseek.chat."""

from __future__ import annotations

import torch

from ..chat import chat_prompt_ids
from ..loading import load_model_and_tokenizer as _load
from ..loading import served_name

__all__ = ["chat_prompt_ids", "load_model_and_tokenizer"]


def load_model_and_tokenizer(name_or_path: str, dtype=torch.float32):
    """(model, tokenizer, served model name)."""
    model, tokenizer = _load(name_or_path, dtype=dtype)
    return model, tokenizer, served_name(name_or_path)
