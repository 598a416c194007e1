"""Multi-head Latent Attention (DeepSeek-V2/V3): the one home of the MLA math.

Legend: B batch, T new tokens, S attended positions (cache + new), H heads, D hidden, C kv_lora_rank,
N qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim, X query tiles of t queries, n blocks.

Two exact forms of the same attention:
- expanded: the latent is projected up to per-head K and V and fed to SDPA (training, long prefill);
- absorbed: kv_b_proj is folded into the query and the output, so scores are taken against the latent itself
  ("bxthc,bsc->bhxts"), as DeepSeek-V3's reference inference does. Used for decode: per step it reads only
  the (C + R)-wide latent per cached position.
The cheaper one is picked by arithmetic (see `use_absorbed`), never by a magic size. A cache (cache.py) says
what the queries attend to; when that is more than one dense group (the hierarchical cache's sinks, selected
blocks, coarse means and window) only the absorbed form applies.

With config.compression.learned each layer holds `nsa` (longctx/learned.py): learned gates per key group, and in
training without a cache the compressed cache's attention pattern over the whole sequence, so the learned
parts get gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cache import Attended, LatentQuery, dense_attended
from .longctx.learned import NSAParams, compressed_pattern
from .norm import RMSNorm
from .rope import apply_rope, softmax_scale
from .sparse import LightningIndexer


class MLAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.qk_dim = self.nope_dim + self.rope_dim
        self.interleave = config.rope_interleave
        D, H = config.hidden_size, self.n_heads
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, self.q_lora_rank, bias=config.attention_bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.kv_lora_rank + self.rope_dim, bias=config.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=config.attention_bias)
        self.scale = softmax_scale(config.rope_parameters, self.qk_dim)
        # learned block summaries + branch gates for the compressed cache (longctx/learned.py), or none
        self.nsa: NSAParams | None = NSAParams(config) if config.compression.learned else None
        # DeepSeek-V3.2's lightning indexer (sparse.py): top-k token selection over what the cache answers, or none
        self.indexer: LightningIndexer | None = LightningIndexer(config) if config.indexer is not None else None

    def use_absorbed(self, T: int) -> bool:
        """Absorbed costs ~T*S*H*2(C+R) per layer; expanded costs ~S*H*C*(N+V) to re-expand the cache."""
        if torch.is_grad_enabled() and self.training:
            return False
        return T * 2 * (self.kv_lora_rank + self.rope_dim) < self.kv_lora_rank * (self.nope_dim + self.v_dim)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split into its key half (H, N, C) and value half (H, V, C)."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    def queries(self, x_BTD, cos, sin):
        """(q latent (B, T, Q) or None, q_nope (B, T, H, N), roped q_pe (B, T, H, R))."""
        B, T, _ = x_BTD.shape
        if self.q_lora_rank is None:
            q_BTQ, q = None, self.q_proj(x_BTD)
        else:
            q_BTQ = self.q_a_layernorm(self.q_a_proj(x_BTD))  # the q latent (also the indexer's input)
            q = self.q_b_proj(q_BTQ)
        q_nope, q_pe = q.view(B, T, self.n_heads, self.qk_dim).split([self.nope_dim, self.rope_dim], dim=-1)
        return q_BTQ, q_nope, apply_rope(q_pe, cos, sin, self.interleave)

    def latent_keys(self, x_BTD, cos, sin):
        """What the cache stores per token: the normalised latent (B, T, C) and the roped key part (B, T, R)."""
        kv_BTC, pe_BTR = self.kv_a_proj_with_mqa(x_BTD).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_a_layernorm(kv_BTC), apply_rope(pe_BTR, cos, sin, self.interleave)

    def forward(self, x_BTD, cos, sin, mask_BTS=None, cache=None):
        T = x_BTD.shape[1]
        q_BTQ, q_nope, q_pe = self.queries(x_BTD, cos, sin)
        kv_BTC, pe_BTR = self.latent_keys(x_BTD, cos, sin)
        w_uk_HNC, w_uv_HVC = self.absorbed_weights()
        query = LatentQuery(q_nope, q_pe, w_uk_HNC, self.scale)
        if cache is not None:
            attended = cache.attended(self.layer_idx, kv_BTC, pe_BTR, query, mask_BTS)
        elif self.nsa is not None and self.training:  # kv_learned: train as the compressed cache attends
            attended = compressed_pattern(query, kv_BTC, pe_BTR, mask_BTS, self.nsa)
        else:
            attended = dense_attended(kv_BTC, pe_BTR, mask_BTS, T)
        if self.indexer is not None:
            attended = self.indexer.select(x_BTD, q_BTQ, cos, sin, attended, cache, self.layer_idx)

        dense = attended.dense()
        if dense is not None and not self.use_absorbed(T):
            out_BTHV = self.expanded(q_nope, q_pe, *dense)
        else:
            gates_BTH3 = None if self.nsa is None else self.nsa.gates(q_nope)
            out_lat_BTHC = attend_latent(query.lat_BTHC, q_pe, attended, self.scale, gates_BTH3)
            out_BTHV = torch.einsum("bthc,hvc->bthv", out_lat_BTHC, w_uv_HVC)
        if cache is not None:
            cache.finish(self.layer_idx, None if self.nsa is None else self.nsa.block_weights(kv_BTC.dtype))
        return self.o_proj(out_BTHV.flatten(2))

    def expanded(self, q_nope, q_pe, kv_BSC, pe_BSR, mask_BTS):
        B, S, _ = kv_BSC.shape
        H = self.n_heads
        kv = self.kv_b_proj(kv_BSC).view(B, S, H, self.nope_dim + self.v_dim)
        k_nope, v_BSHV = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k_BSHK = torch.cat((k_nope, pe_BSR[:, :, None, :].expand(B, S, H, self.rope_dim)), dim=-1)
        q_BTHK = torch.cat((q_nope, q_pe), dim=-1)
        T = q_BTHK.shape[1]
        mask = None if mask_BTS is None else mask_BTS[:, None]  # (B, 1, T, S), True = attend
        causal = mask is None and T > 1 and S == T  # a plain causal block: SDPA's is_causal kernel
        if mask is None and T > 1 and S > T:  # causal from offset S - T (a chunk after cached positions)
            mask = torch.ones(T, S, dtype=torch.bool, device=kv_BSC.device).tril(S - T)[None, None]
        out = F.scaled_dot_product_attention(
            q_BTHK.transpose(1, 2), k_BSHK.transpose(1, 2), v_BSHV.transpose(1, 2), attn_mask=mask,
            is_causal=causal, scale=self.scale,
        )  # (B, H, T, V)
        return out.transpose(1, 2)


def attend_latent(q_lat_BTHC, q_pe_BTHR, attended: Attended, scale: float, gates_BTH3=None) -> torch.Tensor:
    """Absorbed MLA over key groups: scores q_lat . kv + q_pe . pe (+ bias, + the group's learned gate), one
    softmax over every group, values = the latent keys. Returns the latent output (B, T, H, C)."""
    B, T, H, C = q_lat_BTHC.shape
    t = attended.tile or T
    X = -(-T // t)
    pad = X * t - T

    def tiles(x_BTHF):  # (B, T, H, F) -> (B, X, t, H, F), zero-padded to whole tiles
        if pad:
            x_BTHF = torch.cat((x_BTHF, x_BTHF.new_zeros(B, pad, H, x_BTHF.shape[-1])), dim=1)
        return x_BTHF.view(B, X, t, H, -1)

    q_lat, q_pe = tiles(q_lat_BTHC), tiles(q_pe_BTHR)
    g_BHXt3 = None if gates_BTH3 is None else tiles(gates_BTH3).permute(0, 3, 1, 2, 4)
    scores = []  # (B, H, X, t, S_g) per group
    for g in attended.groups:
        if g.tiled:
            s = torch.einsum("bxthc,bxsc->bhxts", q_lat, g.kv) + torch.einsum("bxthr,bxsr->bhxts", q_pe, g.pe)
        else:
            s = torch.einsum("bxthc,bsc->bhxts", q_lat, g.kv) + torch.einsum("bxthr,bsr->bhxts", q_pe, g.pe)
        s = s * scale
        if g.bias:
            s = s + g.bias
        if g_BHXt3 is not None:
            s = s + g_BHXt3[..., g.branch : g.branch + 1]
        mask = g.mask
        if mask is None and attended.causal:  # query i sees keys up to S - T + i
            S = s.shape[-1]
            mask = torch.ones(T, S, dtype=torch.bool, device=s.device).tril(S - T)[None, None]
        if mask is not None:
            s = s.masked_fill(~mask[:, None], float("-inf"))
        scores.append(s)
    probs = torch.cat(scores, dim=-1).softmax(dim=-1, dtype=torch.float32).to(q_lat_BTHC.dtype)
    out_BXtHC = None
    offset = 0
    for g, s in zip(attended.groups, scores):
        p = probs[..., offset : offset + s.shape[-1]]
        offset += s.shape[-1]
        o = torch.einsum("bhxts,bxsc->bxthc" if g.tiled else "bhxts,bsc->bxthc", p, g.kv)
        out_BXtHC = o if out_BXtHC is None else out_BXtHC + o
    return out_BXtHC.flatten(1, 2)[:, :T]
