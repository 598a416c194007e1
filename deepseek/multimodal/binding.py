"""Binding: four encoders into one shared space, trained with symmetric InfoNCE against an anchor modality.

Shapes: B batch, D shared width. Only (anchor, m) pairs are trained (ImageBind-style); every other pair of
modalities is "emergent": aligned only through the anchor. The temperature is learned (as a log scale,
clamped to at most 100 as in CLIP).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .audio import AudioEncoder
from .base import EncoderOutput, MultimodalConfig
from .image import ImageEncoder
from .points import PointsEncoder
from .text import TextEncoder

MODALITIES = ("text", "image", "audio", "points")
EMBED_KEYS = {"text": "text", "images": "image", "image": "image", "audio": "audio", "points": "points"}  # embed() kwargs


def info_nce(a_BD: torch.Tensor, b_BD: torch.Tensor, logit_scale: torch.Tensor | float,
             labels_B: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE: mean of cross-entropy(a -> b) and (b -> a) with row i's positive at column i.

    a, b are unit vectors; logits = scale * a @ b.T. With labels, off-diagonal pairs of the same label are
    removed from the denominators (they are not negatives: class-level pairs share a concept)."""
    if a_BD.shape != b_BD.shape:
        raise ValueError(f"info_nce needs equal shapes, got {tuple(a_BD.shape)} and {tuple(b_BD.shape)}")
    logits_BB = logit_scale * a_BD @ b_BD.T
    if labels_B is not None:
        same_BB = labels_B[:, None] == labels_B[None, :]
        same_BB.fill_diagonal_(False)
        logits_BB = logits_BB.masked_fill(same_BB, float("-inf"))
    target_B = torch.arange(a_BD.shape[0], device=a_BD.device)
    return 0.5 * (F.cross_entropy(logits_BB, target_B) + F.cross_entropy(logits_BB.T, target_B))


class BindingModel(nn.Module):
    def __init__(self, cfg: MultimodalConfig | None = None, anchor: str = "text"):
        super().__init__()
        if anchor not in MODALITIES:
            raise ValueError(f"anchor must be one of {MODALITIES}, got {anchor!r}")
        self.cfg = cfg or MultimodalConfig()
        self.anchor = anchor
        self.encoders = nn.ModuleDict({"text": TextEncoder(self.cfg), "image": ImageEncoder(self.cfg),
                                       "audio": AudioEncoder(self.cfg), "points": PointsEncoder(self.cfg)})
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @property
    def trained_pairs(self) -> list[tuple[str, str]]:
        return [(self.anchor, m) for m in MODALITIES if m != self.anchor]

    @property
    def emergent_pairs(self) -> list[tuple[str, str]]:
        others = [m for m in MODALITIES if m != self.anchor]
        return [(a, b) for i, a in enumerate(others) for b in others[i + 1:]]

    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=math.log(100.0)).exp()

    def encode(self, modality: str, inputs) -> EncoderOutput:
        if modality not in self.encoders:
            raise ValueError(f"unknown modality {modality!r}: expected one of {MODALITIES}")
        return self.encoders[modality](inputs)

    def embed(self, **inputs) -> dict[str, torch.Tensor]:
        """embed(text=[...], images=[...], audio=[...], points=[...]) -> {modality: (B, D) unit vectors}."""
        return {EMBED_KEYS[k]: self.encode(EMBED_KEYS[k], v).pooled for k, v in inputs.items() if v is not None}

    def save(self, folder: str | Path, dtype: torch.dtype = torch.float16, extra: dict | None = None) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to(dtype).contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"))
        meta = {"config": self.cfg.to_dict(), "anchor": self.anchor, **(extra or {})}
        (folder / "config.json").write_text(json.dumps(meta, indent=1) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> BindingModel:
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = json.loads((folder / "config.json").read_text())
        model = cls(MultimodalConfig(**meta["config"]), anchor=meta["anchor"])
        state = {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}
        model.load_state_dict(state)
        return model.eval()
