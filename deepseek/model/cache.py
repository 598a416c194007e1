"""The latent-cache protocol, and the static decode cache.

Legend: L layers, B batch, T new tokens, S attended positions, H heads, C kv_lora_rank, R qk_rope_head_dim,
X query tiles of t queries each (X * t >= T).

Per token and layer a cache holds only the compressed MLA latent, C + R numbers (576 for DeepSeek-V3), never
re-expanded keys and values. Attention (`MLAttention`, attention.py) owns every piece of MLA math; a cache only
stores latents and says what the queries of one call attend to. That is the whole protocol:

    class CacheProtocol(Protocol):
        def get_seq_length(self, layer_idx: int = 0) -> int
        def attended(self, layer_idx, kv_BTC, pe_BTR, query: LatentQuery, mask_BTS) -> Attended
        def finish(self, layer_idx, block_weights_b=None) -> None

`attended` stores the T new latents and returns `Attended`: groups of latent keys (each key is also its value,
as in absorbed MLA) whose scores share one softmax. A dense cache returns one group, everything so far, with
the caller's mask; the hierarchical cache (longctx/cache.py) returns sinks, selected blocks per query tile,
coarse block means and the recent window. `finish` runs after that layer's attention (the hierarchical cache
seals blocks there, so every query sees its own chunk at full precision).

A DeepSeek-V3.2 model (sparse attention, sparse.py) also stores its indexer's keys, I numbers per token and
layer, through one more method, `index_keys(layer_idx, k_BTI) -> k_BSI` (`sparse.IndexKeyCache`), which
`LatentCache` and `TransformersCache` implement; `bytes_per_token(config)` reports both parts.

Implementations: `LatentCache` (below; one batch, allocated once, indexed by position), the serving
engine's per-sequence slot views (serve/kv_cache.py), `CompressedLatentCache` (longctx/cache.py) and
`TransformersCache` (below; transformers' Cache objects when GenerationMixin drives the model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch


@dataclass
class LatentQuery:
    """One layer's queries, as a cache may use them to choose what they attend to (absorbed form)."""

    nope_BTHN: torch.Tensor
    pe_BTHR: torch.Tensor
    w_uk_HNC: torch.Tensor  # kv_b_proj's key half: q_nope -> latent space
    scale: float
    _lat: torch.Tensor | None = field(default=None, repr=False)

    @property
    def lat_BTHC(self) -> torch.Tensor:  # computed once, only if someone asks (a plain memo: torch.compile traces it)
        if self._lat is None:
            self._lat = torch.einsum("bthn,hnc->bthc", self.nope_BTHN, self.w_uk_HNC)
        return self._lat


@dataclass
class KeyGroup:
    """Latent keys the queries attend to; each key is also its own value.

    kv (B, S, C) / pe (B, S, R) shared by every query, or (B, X, S, C) / (B, X, S, R) one set per query tile.
    mask: True = attend, broadcastable to (B, X, t, S); None = all. bias: added to every score (a coarse block
    mean stands for b keys: + log b). branch: which learned gate applies (NSA: 0 sinks and selected blocks,
    1 coarse means, 2 recent window)."""

    kv: torch.Tensor
    pe: torch.Tensor
    mask: torch.Tensor | None = None
    bias: float = 0.0
    branch: int = 0

    @property
    def tiled(self) -> bool:
        return self.kv.dim() == 4


@dataclass
class Attended:
    """What the T queries of one call attend to: key groups under one joint softmax, queries in tiles of t."""

    groups: list[KeyGroup] = field(default_factory=list)
    tile: int = 0  # queries per tile; 0 = all T queries in one tile
    causal: bool = False  # one shared group, no mask, T > 1: query i sees keys up to S - T + i

    def dense(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """(kv_BSC, pe_BSR, mask_BTS) when this is one shared group in one tile (either MLA form works)."""
        if len(self.groups) != 1 or self.tile or self.groups[0].tiled or self.groups[0].bias:
            return None
        g = self.groups[0]
        return g.kv, g.pe, None if g.mask is None else g.mask[:, 0]


def dense_attended(kv_BSC, pe_BSR, mask_BTS, T: int) -> Attended:
    """Everything cached so far as one group, with the caller's (B, T, S) mask (None: causal if T > 1)."""
    mask = None if mask_BTS is None else mask_BTS[:, None]  # (B, X=1, t=T, S)
    return Attended([KeyGroup(kv_BSC, pe_BSR, mask)], causal=mask_BTS is None and T > 1)


@runtime_checkable
class CacheProtocol(Protocol):
    def get_seq_length(self, layer_idx: int = 0) -> int: ...

    def attended(self, layer_idx: int, kv_BTC: torch.Tensor, pe_BTR: torch.Tensor, query: LatentQuery,
                 mask_BTS: torch.Tensor | None) -> Attended: ...  # fmt: skip

    def finish(self, layer_idx: int, block_weights_b: torch.Tensor | None = None) -> None: ...


class DenseCache:
    """Base for caches that attend to every stored position: subclasses implement `update`."""

    def update(self, kv_BTC, pe_BTR, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def attended(self, layer_idx, kv_BTC, pe_BTR, query, mask_BTS) -> Attended:
        kv_BSC, pe_BSR = self.update(kv_BTC, pe_BTR, layer_idx)
        return dense_attended(kv_BSC, pe_BSR, mask_BTS, kv_BTC.shape[1])

    def finish(self, layer_idx: int, block_weights_b=None) -> None:
        return None


class LatentCache(DenseCache):
    """One batch's latents, allocated once for `max_len` positions and indexed by position (gpt-fast style)."""

    def __init__(self, config, batch_size: int, max_len: int, device=None, dtype=torch.float32, layers=None):
        n_layers = layers if layers is not None else config.num_hidden_layers
        self.max_len = max_len
        self.kv = torch.zeros(n_layers, batch_size, max_len, config.kv_lora_rank, device=device, dtype=dtype)
        self.pe = torch.zeros(n_layers, batch_size, max_len, config.qk_rope_head_dim, device=device, dtype=dtype)
        self.lengths = [0] * n_layers
        self.index: torch.Tensor | None = None  # (L, B, max_len, I) indexer keys, for a DeepSeek-V3.2 model

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def update(self, kv_BTC: torch.Tensor, pe_BTR: torch.Tensor, layer_idx: int):
        """Append T new positions for one layer; return the whole cached latent (B, S, C), (B, S, R)."""
        start = self.lengths[layer_idx]
        end = start + kv_BTC.shape[1]
        if end > self.max_len:
            raise ValueError(f"the latent cache is full: {end} positions needed, {self.max_len} allocated")
        self.kv[layer_idx, :, start:end] = kv_BTC
        self.pe[layer_idx, :, start:end] = pe_BTR
        self.lengths[layer_idx] = end
        return self.kv[layer_idx, :, :end], self.pe[layer_idx, :, :end]

    def crop(self, length: int) -> None:
        """Forget positions >= length (rejected speculative tokens)."""
        self.lengths = [min(n, length) for n in self.lengths]

    def index_keys(self, layer_idx: int, k_BTI: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3.2's indexer keys (sparse.IndexKeyCache): called after `attended` for the same layer, stored
        at the positions it just stored (so `crop` forgets them too); the store is allocated on first use."""
        if self.index is None:
            L, B, M, _ = self.kv.shape
            self.index = self.kv.new_zeros(L, B, M, k_BTI.shape[-1])
        end = self.lengths[layer_idx]
        self.index[layer_idx, :, end - k_BTI.shape[1] : end] = k_BTI
        return self.index[layer_idx, :, :end]

    def nbytes(self) -> int:
        return self.kv.nbytes + self.pe.nbytes + (0 if self.index is None else self.index.nbytes)


class TransformersCache(DenseCache):
    """A transformers Cache (DynamicCache, ...) under the protocol: the latent is stored as a one-head K/V pair,
    so GenerationMixin, its cache classes and its beam search work unchanged."""

    def __init__(self, hf_cache):
        self.hf_cache = hf_cache

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.hf_cache.get_seq_length(layer_idx)

    def update(self, kv_BTC, pe_BTR, layer_idx: int):
        kv, pe = self.hf_cache.update(kv_BTC[:, None], pe_BTR[:, None], layer_idx)
        return kv[:, 0], pe[:, 0]

    def index_keys(self, layer_idx: int, k_BTI: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3.2's indexer keys, in transformers' indexed cache layers (the config's layer_types)."""
        return self.hf_cache.update_indexer(k_BTI, layer_idx)


def as_latent_cache(cache):
    """The model's boundary: our caches pass through; a transformers Cache is wrapped once per forward."""
    if cache is None or isinstance(cache, CacheProtocol):
        return cache
    return TransformersCache(cache)


def bytes_per_token(config, element_size: int = 2) -> dict[str, int]:
    """Decode-cache bytes per token, summed over layers, by what is stored: MLA's latent (C + R per layer) and,
    for DeepSeek-V3.2, the indexer's key (I per layer); element_size 2 = bf16."""
    L = config.num_hidden_layers
    out = {"mla_latent": L * (config.kv_lora_rank + config.qk_rope_head_dim) * element_size}
    if config.indexer is not None:
        out["indexer_keys"] = L * config.indexer.head_dim * element_size
    out["total"] = sum(out.values())
    return out
