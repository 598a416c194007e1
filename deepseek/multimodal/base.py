"""Shared pieces of the multimodal encoders: the config, the output type, pooling and a small transformer.

Shapes: B batch, N tokens, D shared width (config.dim).
Every encoder maps its input to EncoderOutput(tokens_BND, pooled_BD, mask_BN): tokens live in the shared
width D (what a LLaVA-style projector will map into the LM), pooled is the L2-normalised shared-space vector
the binding is trained on; mask marks real (True) vs padded tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class MultimodalConfig:
    dim: int = 128  # shared width of tokens and pooled vectors
    heads: int = 4
    layers: int = 1  # transformer layers on top of each modality's stem
    # image: any input is resized to image_grid x image_grid, RGB in [0, 1]; patch tokens on an 8x8 grid
    image_grid: int = 32
    # audio: mono, resampled to sample_rate; log-mel with n_mels bins up to fmax Hz, 25 ms windows, 10 ms hop;
    # front end (audio.frontend): floor at peak - floor_nats, trim frames quieter than loudest - trim_nats,
    # smooth to the first `cepstra` cepstral coefficients (0 = off), per-bin mean normalisation
    sample_rate: int = 16000
    n_mels: int = 64
    fmax: float = 8000.0
    n_fft: int = 400
    hop: int = 160
    floor_nats: float = 11.0
    trim_nats: float = 6.0
    cepstra: int = 14
    min_seconds: float = 0.2
    max_seconds: float = 30.0
    # points: (N, 3) xyz or (N, 6) xyz + colour/normals; N <= max_points; n_groups FPS centres, k neighbours
    max_points: int = 200_000
    n_groups: int = 32
    group_size: int = 16
    sample_points: int = 512  # clouds larger than this are first subsampled (random, seeded) to this size
    # text: UTF-8 bytes, at most max_text_bytes
    max_text_bytes: int = 128

    def __post_init__(self):
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} must be divisible by heads {self.heads}")
        if not 0 < self.min_seconds < self.max_seconds:
            raise ValueError(f"need 0 < min_seconds < max_seconds, got {self.min_seconds}, {self.max_seconds}")
        if self.group_size > self.sample_points or self.n_groups > self.sample_points:
            raise ValueError("n_groups and group_size must not exceed sample_points")
        if not 0 < self.fmax <= self.sample_rate / 2:
            raise ValueError(f"fmax must be in (0, sample_rate / 2], got {self.fmax}")
        if self.floor_nats <= 0 or self.trim_nats <= 0 or not 0 <= self.cepstra <= self.n_mels:
            raise ValueError("need floor_nats > 0, trim_nats > 0 and 0 <= cepstra <= n_mels")
        if self.image_grid % 4:
            raise ValueError(f"image_grid must be a multiple of 4, got {self.image_grid}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EncoderOutput:
    tokens: torch.Tensor  # (B, N, D)
    pooled: torch.Tensor  # (B, D), unit norm
    mask: torch.Tensor  # (B, N) bool, True = real token


class Trunk(nn.Module):
    """A few pre-norm transformer layers, masked mean pooling, a linear head to the shared space."""

    def __init__(self, cfg: MultimodalConfig):
        super().__init__()
        layer = nn.TransformerEncoderLayer(cfg.dim, cfg.heads, 2 * cfg.dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False) if cfg.layers else None
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(2 * cfg.dim, cfg.dim)

    def forward(self, x_BND: torch.Tensor, mask_BN: torch.Tensor | None = None) -> EncoderOutput:
        B, N, D = x_BND.shape
        if mask_BN is None:
            mask_BN = torch.ones(B, N, dtype=torch.bool, device=x_BND.device)
        if self.blocks is not None:
            x_BND = self.blocks(x_BND, src_key_padding_mask=~mask_BN)
        x_BND = self.norm(x_BND)
        m_BN1 = mask_BN.unsqueeze(-1).to(x_BND.dtype)
        mean_BD = (x_BND * m_BN1).sum(1) / m_BN1.sum(1).clamp_min(1.0)
        max_BD = x_BND.masked_fill(~mask_BN.unsqueeze(-1), float("-inf")).amax(1)
        pooled_BD = F.normalize(self.head(torch.cat([mean_BD, max_BD], -1)), dim=-1)
        return EncoderOutput(x_BND, pooled_BD, mask_BN)
