"""Rotary position embeddings with YaRN scaling, in DeepSeek's layouts.

Legend: B batch, T tokens, H heads, R rope dims (qk_rope_head_dim).

The reference (interleaved) layout rotates the pairs (x[2i], x[2i+1]) by frequency i and keeps them in place,
as DeepSeek-V3's inference code does with complex numbers. Attention scores are identical to transformers'
de-interleaving variant because q and k are permuted alike; only the cached k_pe layout differs.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(rope: dict, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (dim/2,) and the cos/sin scale ("attention factor") for a rope dict."""
    base = rope["rope_theta"]
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    pos_freqs = base**exponents
    inv_freq = 1.0 / pos_freqs
    kind = rope["rope_type"]
    if kind == "default":
        return inv_freq, 1.0
    factor = rope["factor"]
    if kind == "linear":
        return inv_freq / factor, 1.0
    # YaRN: interpolate low frequencies, keep high ones, blend linearly in between.
    orig = rope["original_max_position_embeddings"]
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep), 0: interpolate (divide by factor)
    inv_freq = (inv_freq / factor) * (1 - keep) + inv_freq * keep
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    return inv_freq, float(attention_factor)


def softmax_scale(rope: dict, qk_head_dim: int) -> float:
    """1/sqrt(d), times mscale_all_dim's YaRN correction squared (DeepSeek-V3's long-context setting)."""
    scale = qk_head_dim**-0.5
    if rope["rope_type"] != "default" and rope.get("mscale_all_dim"):
        m = yarn_mscale(rope["factor"], rope["mscale_all_dim"])
        scale = scale * m * m
    return scale


class RotaryEmbedding(nn.Module):
    def __init__(self, rope: dict, dim: int, interleave: bool = True):
        super().__init__()
        inv_freq, self.attention_factor = rope_frequencies(rope, dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.interleave = interleave

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) -> cos, sin each (B, T, R/2)."""
        freqs = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)
        return (freqs.cos() * self.attention_factor).to(dtype), (freqs.sin() * self.attention_factor).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = True) -> torch.Tensor:
    """x (B, T, H, R) or (B, T, R); cos/sin (B, T, R/2). Returns x rotated, same layout and shape."""
    if x.dim() == 4:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return rotate_pairs(x, cos, sin, interleave)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = True) -> torch.Tensor:
    """x (..., R) rotated pair by pair; cos/sin broadcastable to (..., R/2)."""
    if interleave:
        pairs = x.unflatten(-1, (-1, 2))  # (..., R/2, 2): (x_2i, x_2i+1)
        x1, x2 = pairs[..., 0], pairs[..., 1]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, interleave: bool = True) -> torch.Tensor:
    """x (..., R) rotated by `positions` (broadcastable to x.shape[:-1]; may be negative), no attention factor.
    Rotations compose, so rotate(apply_rope(x, p), d) equals x placed at position p + d (times the factor)."""
    angles = positions[..., None].to(torch.float64) * inv_freq.to(x.device, torch.float64)  # (..., R/2); fp64: 128K
    return rotate_pairs(x, angles.cos().to(x.dtype), angles.sin().to(x.dtype), interleave)
