"""Text encoder for the binding anchor: UTF-8 bytes -> a small transformer -> byte tokens + pooled vector.

Shapes: B batch, L bytes (<= config.max_text_bytes, padded), D shared width.
Trained from scratch with the binding (not r1-tiny's embeddings): r1-tiny's vocabulary and embeddings were
learned on arithmetic traces, so English words are split into pieces it never used in context; a byte model
has no out-of-vocabulary words, costs ~0.2M parameters, and keeps the binding independent of any LM
checkpoint (the LM sees the shared space only through projectors).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .audio import sinusoid
from .base import EncoderOutput, MultimodalConfig, Trunk

PAD = 256


def encode_bytes(texts, max_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A string or list of strings -> (ids (B, L), mask (B, L)); lower-cased, stripped."""
    if isinstance(texts, str):
        texts = [texts]
    rows = []
    for t in texts:
        if not isinstance(t, str):
            raise ValueError(f"text must be a string, got {type(t).__name__}")
        b = t.strip().lower().encode("utf-8")
        if not b:
            raise ValueError("text is empty")
        if len(b) > max_bytes:
            raise ValueError(f"text has {len(b)} UTF-8 bytes: the limit is {max_bytes}")
        rows.append(list(b))
    L = max(len(r) for r in rows)
    ids_BL = torch.full((len(rows), L), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        ids_BL[i, : len(r)] = torch.tensor(r)
    return ids_BL, ids_BL != PAD


class TextEncoder(nn.Module):
    def __init__(self, cfg: MultimodalConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(PAD + 1, cfg.dim)
        self.conv = nn.Conv1d(cfg.dim, cfg.dim, 5, padding=2)  # local byte n-grams before attention
        self.register_buffer("pos_LD", sinusoid(cfg.max_text_bytes, cfg.dim), persistent=False)
        self.trunk = Trunk(cfg)

    def forward(self, texts) -> EncoderOutput:
        ids_BL, mask_BL = encode_bytes(texts, self.cfg.max_text_bytes)
        ids_BL, mask_BL = ids_BL.to(self.embed.weight.device), mask_BL.to(self.embed.weight.device)
        x_BLD = self.embed(ids_BL) * mask_BL.unsqueeze(-1)  # padding reads as zeros, as at the edges
        x_BLD = x_BLD + self.conv(x_BLD.transpose(1, 2)).transpose(1, 2) + self.pos_LD[: ids_BL.shape[1]]
        return self.trunk(x_BLD, mask_BL)
