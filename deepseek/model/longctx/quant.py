"""Low-bit group quantisation of the cached latent (KIVI-style asymmetric min/max, per token per group).

Legend: ... leading dims (batch, blocks, tokens), C channels, G groups (C / group), P packed bytes (C * bits / 8).

Each group of `group` channels of one token gets its own minimum and step (stored in fp16), so one outlier
channel only coarsens its own group. Values are packed 8 / bits per byte, lowest bits first.
Error bound (tested): |x - dequantize(quantize(x))| <= step / 2 per element, step = (max - min) / (2^bits - 1),
up to the fp16 rounding of the stored minimum and step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_DTYPE = torch.float16


@dataclass
class Quantized:
    packed: torch.Tensor  # (..., P) uint8
    step: torch.Tensor  # (..., G) fp16
    low: torch.Tensor  # (..., G) fp16
    bits: int
    group: int

    def nbytes(self) -> int:
        return self.packed.nbytes + self.step.nbytes + self.low.nbytes


def quantize(x: torch.Tensor, bits: int, group: int) -> Quantized:
    """x (..., C) float -> Quantized with C / group groups per token."""
    C = x.shape[-1]
    if bits not in (2, 4, 8):
        raise ValueError(f"quantize: bits must be 2, 4 or 8, got {bits}")
    if C % group:
        raise ValueError(f"quantize: group {group} must divide the channel count {C}")
    levels = 2**bits - 1
    g = x.float().unflatten(-1, (C // group, group))  # (..., G, group)
    low = g.amin(-1).to(SCALE_DTYPE)
    high = g.amax(-1)
    step = ((high - low.float()) / levels).clamp_min(1e-8).to(SCALE_DTYPE)
    q = ((g - low.float()[..., None]) / step.float()[..., None]).round().clamp(0, levels).to(torch.uint8)
    q = q.flatten(-2)  # (..., C)
    per_byte = 8 // bits
    q = q.unflatten(-1, (C // per_byte, per_byte))  # (..., P, per_byte)
    packed = q[..., 0].clone()
    for j in range(1, per_byte):  # scalar shifts on contiguous slices (a broadcast shift is ~2x slower)
        packed |= q[..., j] << (j * bits)
    return Quantized(packed, step, low, bits, group)


def dequantize(q: Quantized, dtype=torch.float32) -> torch.Tensor:
    """Quantized -> (..., C) in `dtype`."""
    per_byte = 8 // q.bits
    mask = 2**q.bits - 1
    if per_byte > 1:
        fields = [q.packed & mask] + [(q.packed >> (j * q.bits)) & mask for j in range(1, per_byte)]
        codes = torch.stack(fields, dim=-1).flatten(-2)  # (..., C)
    else:
        codes = q.packed
    g = codes.unflatten(-1, (-1, q.group)).to(dtype)  # (..., G, group)
    out = g * q.step.to(dtype)[..., None] + q.low.to(dtype)[..., None]
    return out.flatten(-2)


def dequantize_reference(q: Quantized) -> torch.Tensor:
    """Plain per-element loop over bit fields (the oracle for `dequantize`; small inputs only)."""
    flat = q.packed.reshape(-1, q.packed.shape[-1]).tolist()
    steps = q.step.float().reshape(len(flat), -1)
    lows = q.low.float().reshape(len(flat), -1)
    rows = []
    for r, row in enumerate(flat):
        codes = [(byte >> shift) & (2**q.bits - 1) for byte in row for shift in range(0, 8, q.bits)]
        rows.append([c * steps[r, i // q.group].item() + lows[r, i // q.group].item() for i, c in enumerate(codes)])
    return torch.tensor(rows).reshape(*q.packed.shape[:-1], -1)
