"""DeepSeek Sparse Attention (DeepSeek-V3.2): the lightning indexer and top-k token selection.

Legend: B batch, T new tokens, S attended positions, G indexer heads, I index_head_dim, K index_topk,
Q q_lora_rank, D hidden, C kv_lora_rank, R qk_rope_head_dim.

Each layer's indexer scores every visible past token for each query,

    index[b, t, s] = sum_g  w[b, t, g] / sqrt(G) * relu(q[b, t, g] . k[b, s] / sqrt(I))

with its own small projections (queries from MLA's q_lora latent, one key per token from the hidden state,
LayerNorm'd), and MLA then attends only to the K best-scoring tokens. The indexer's rotary part is the first R
dims of each head, rotated half-split (non-interleaved, unlike MLA's pairs), as DeepSeek's reference and
transformers' DeepseekV32 do; the reference's Hadamard rotation and FP8 scoring leave the dot products unchanged
up to rounding and are not reproduced.

The component refines what the cache answered (`Attended`, cache.py): attention asks the cache, then hands the
answer to `LightningIndexer.select`. Its keys live in the decode cache through `IndexKeyCache.index_keys`
(LatentCache and TransformersCache implement it), I numbers per token and layer next to MLA's C + R.
When a query sees at most K tokens the selection is everything, so the answer is returned unchanged (dense
MLA, exactly); otherwise as a mask over the dense group (prefill: either MLA form runs) or, when T * K < S
(decode), as the K selected latents gathered per query (absorbed MLA reads K positions, not S).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from .cache import Attended, KeyGroup
from .rope import apply_rope


@runtime_checkable
class IndexKeyCache(Protocol):
    """A cache that also holds the indexer's keys: called right after `attended` for the same layer, it stores
    the keys of the T positions `attended` just stored and returns every stored one (B, S, I)."""

    def index_keys(self, layer_idx: int, k_BTI: torch.Tensor) -> torch.Tensor: ...


class LightningIndexer(nn.Module):
    """Module names as DeepSeek-V3.2's checkpoints store them: `self_attn.indexer.{wq_b,wk,k_norm,weights_proj}`."""

    def __init__(self, config):
        super().__init__()
        spec = config.indexer
        self.topk, self.n_heads, self.head_dim = spec.topk, spec.n_heads, spec.head_dim
        self.rope_dim = config.qk_rope_head_dim
        D = config.hidden_size
        self.wq_b = nn.Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(D, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(D, self.n_heads, bias=False)

    def rotate(self, x, cos, sin):
        """x (B, T, [G,] I): the first R dims rotated half-split, the rest passed through."""
        pe, rest = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat((apply_rope(pe, cos, sin, interleave=False), rest), dim=-1)

    def keys(self, x_BTD, cos, sin) -> torch.Tensor:
        return self.rotate(self.k_norm(self.wk(x_BTD)), cos, sin)  # (B, T, I)

    def scores(self, x_BTD, q_BTQ, k_BSI, cos, sin) -> torch.Tensor:
        """Index scores (B, T, S) in fp32, before masking."""
        B, T, _ = x_BTD.shape
        q_BTGI = self.rotate(self.wq_b(q_BTQ).view(B, T, self.n_heads, self.head_dim), cos, sin)
        logits_BTGS = torch.einsum("btgi,bsi->btgs", q_BTGI.float(), k_BSI.float()) * self.head_dim**-0.5
        w_BTG = self.weights_proj(x_BTD.to(self.weights_proj.weight.dtype)).float() * self.n_heads**-0.5
        return torch.einsum("btg,btgs->bts", w_BTG, F.relu(logits_BTGS))

    def select(self, x_BTD, q_BTQ, cos, sin, attended: Attended, cache, layer_idx: int) -> Attended:
        """What the T queries attend to after top-K selection over the cache's dense answer."""
        dense = attended.dense()
        if dense is None:
            raise ValueError(f"DeepSeek-V3.2 sparse attention selects from one dense group of latents; "
                             f"{type(cache).__name__} answered otherwise (use LatentCache)")  # fmt: skip
        kv_BSC, pe_BSR, mask_BTS = dense
        with torch.no_grad():  # the indexer only chooses (DeepSeek trains it with its own loss)
            k_BTI = self.keys(x_BTD, cos, sin)
        if cache is None:
            k_BSI = k_BTI
        elif isinstance(cache, IndexKeyCache):
            k_BSI = cache.index_keys(layer_idx, k_BTI)
        else:
            raise ValueError(f"{type(cache).__name__} holds no indexer keys; DeepSeek-V3.2 sparse attention needs a "
                             "cache with index_keys (LatentCache, or transformers' cache via TransformersCache)")  # fmt: skip
        B, S, _ = kv_BSC.shape
        T = x_BTD.shape[1]
        if S <= self.topk:  # every visible token is among the top K
            return attended
        if mask_BTS is None:  # causal from offset S - T
            mask_BTS = torch.ones(T, S, dtype=torch.bool, device=x_BTD.device).tril(S - T)[None].expand(B, T, S)
        with torch.no_grad():
            index_BTS = self.scores(x_BTD, q_BTQ, k_BSI, cos, sin).masked_fill(~mask_BTS, float("-inf"))
            top = index_BTS.topk(self.topk, dim=-1)
        if T * self.topk < S:  # decode: gather the K selected latents per query (query tiles of one)
            rows = torch.arange(B, device=kv_BSC.device)[:, None, None]
            kv_BTKC, pe_BTKR = kv_BSC[rows, top.indices], pe_BSR[rows, top.indices]
            valid_BT1K = (top.values > float("-inf"))[:, :, None, :]  # fewer than K visible: the rest masked
            return Attended([KeyGroup(kv_BTKC, pe_BTKR, valid_BT1K)], tile=1)
        chosen_BTS = torch.zeros(B, T, S, dtype=torch.bool, device=x_BTD.device).scatter_(-1, top.indices, True)
        return Attended([KeyGroup(kv_BSC, pe_BSR, (chosen_BTS & mask_BTS)[:, None])])


def indexer_parameters(config) -> int:
    """Parameters of one layer's indexer (0 without one), from the config (meta-device sizes)."""
    spec = config.indexer
    if spec is None:
        return 0
    D, G, I = config.hidden_size, spec.n_heads, spec.head_dim
    return config.q_lora_rank * G * I + D * I + 2 * I + D * G
