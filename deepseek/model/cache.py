"""The decode cache: only the compressed MLA latent per token per layer.

Legend: L layers, B batch, S cached positions, C kv_lora_rank, R qk_rope_head_dim.

Per token and layer the cache holds C + R numbers (576 for DeepSeek-V3), not 2 * H * head_dim re-expanded
keys and values. `LatentCache` is static (allocated once for `max_len` positions, indexed by position);
transformers' DynamicCache works too, with the latent stored as a one-head key/value pair.
"""

from __future__ import annotations

import torch


class LatentCache:
    def __init__(self, config, batch_size: int, max_len: int, device=None, dtype=torch.float32, layers=None):
        n_layers = layers if layers is not None else config.num_hidden_layers
        self.max_len = max_len
        self.kv = torch.zeros(n_layers, batch_size, max_len, config.kv_lora_rank, device=device, dtype=dtype)
        self.pe = torch.zeros(n_layers, batch_size, max_len, config.qk_rope_head_dim, device=device, dtype=dtype)
        self.lengths = [0] * n_layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def update(self, kv_BTC: torch.Tensor, pe_BTR: torch.Tensor, layer_idx: int):
        """Append T new positions for one layer; return the whole cached latent (B, S, C), (B, S, R)."""
        start = self.lengths[layer_idx]
        end = start + kv_BTC.shape[1]
        if end > self.max_len:
            raise ValueError(f"LatentCache is full: {end} positions needed, {self.max_len} allocated")
        self.kv[layer_idx, :, start:end] = kv_BTC
        self.pe[layer_idx, :, start:end] = pe_BTR
        self.lengths[layer_idx] = end
        return self.kv[layer_idx, :, :end], self.pe[layer_idx, :, :end]

    def crop(self, length: int) -> None:
        """Forget positions >= length (rejected speculative tokens)."""
        self.lengths = [min(n, length) for n in self.lengths]

    def nbytes(self) -> int:
        return self.kv.nbytes + self.pe.nbytes


def cache_update(cache, kv_BTC: torch.Tensor, pe_BTR: torch.Tensor, layer_idx: int):
    """Works for LatentCache and for transformers' Cache classes (latent stored as a one-head K/V pair)."""
    if isinstance(cache, LatentCache) or not hasattr(cache, "layers"):
        return cache.update(kv_BTC, pe_BTR, layer_idx)
    kv, pe = cache.update(kv_BTC[:, None], pe_BTR[:, None], layer_idx)
    return kv[:, 0], pe[:, 0]
