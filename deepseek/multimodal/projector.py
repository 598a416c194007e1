"""LLaVA-style projector: an encoder's tokens in the shared space -> a fixed number of LM input embeddings.

Shapes: n media items, N encoder tokens, C shared width (encoder), K LM tokens per item, D LM hidden size.

    tokens (n, N, C), mask (n, N), pooled (n, C)
      -> [pooled ; N valid tokens averaged into K - 1 equal spans]   (n, K, C)   + a learned slot embedding
      -> Linear(C, D) -> GELU -> Linear(D, D)                        (n, K, D)

The first slot carries the pooled shared-space vector (what the binding aligned across modalities, so what
transfers across writers, voices and fonts); the others keep coarse order (left-to-right patches, time).
Spans are fractional: token t of an item with L valid tokens covers [t/L, (t+1)/L) and span j covers
[j/(K-1), (j+1)/(K-1)), weighted by their overlap, so an item shorter than K - 1 tokens still fills every span.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def span_weights(mask_nN: torch.Tensor, spans: int) -> torch.Tensor:
    """(n, spans, N) averaging weights: overlap of each valid token's interval with each span, rows sum to 1."""
    n, N = mask_nN.shape
    L_n1 = mask_nN.sum(1, keepdim=True).clamp_min(1).to(torch.float32)
    t_N = torch.arange(N, device=mask_nN.device, dtype=torch.float32)
    lo_nN, hi_nN = t_N / L_n1, (t_N + 1) / L_n1
    j_S = torch.arange(spans, device=mask_nN.device, dtype=torch.float32)
    a_S, b_S = j_S / spans, (j_S + 1) / spans
    overlap_nSN = (torch.minimum(hi_nN[:, None], b_S[None, :, None]) -
                   torch.maximum(lo_nN[:, None], a_S[None, :, None])).clamp_min(0)  # fmt: skip
    overlap_nSN = overlap_nSN * mask_nN[:, None].to(torch.float32)
    return overlap_nSN / overlap_nSN.sum(-1, keepdim=True).clamp_min(1e-12)


class Projector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_tokens: int):
        super().__init__()
        if num_tokens < 2:
            raise ValueError(f"a projector needs at least 2 tokens per item (pooled + 1 span), got {num_tokens}")
        self.num_tokens = num_tokens
        self.slot = nn.Parameter(torch.zeros(num_tokens, in_dim))
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, tokens_nNC: torch.Tensor, mask_nN: torch.Tensor, pooled_nC: torch.Tensor) -> torch.Tensor:
        w_nSN = span_weights(mask_nN, self.num_tokens - 1).to(tokens_nNC.dtype)
        spans_nSC = w_nSN @ tokens_nNC
        x_nKC = torch.cat((pooled_nC[:, None], spans_nSC), 1) + self.slot
        return self.fc2(self.act(self.fc1(x_nKC)))  # (n, K, D)
