"""Multi-head Latent Attention (DeepSeek-V2/V3).

Legend: B batch, T new tokens, S attended positions (cache + new), H heads, D hidden, C kv_lora_rank,
N qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim.

Two exact forms of the same attention:
- expanded: the latent is projected up to per-head K and V and fed to SDPA (training, long prefill);
- absorbed: kv_b_proj is folded into the query and the output, so scores are taken against the latent itself
  ("bthc,bsc->bhts"), as DeepSeek-V3's reference inference does. Used for decode: per step it reads only
  the (C + R)-wide latent per cached position.
The cheaper one is picked by arithmetic (see `use_absorbed`), never by a magic size.
With config.kv_learned, training without a cache runs `compressed_attention` instead: the compressed cache's
semantics over the whole sequence, so its learned block summaries and gates get gradients (longctx/learned.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cache import cache_update
from .longctx.learned import NSAParams, compressed_attention
from .norm import RMSNorm
from .rope import apply_rope, softmax_scale


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
        if getattr(config, "kv_learned", False):  # learned block summaries + NSA gates (longctx/learned.py)
            self.nsa = NSAParams(config)

    def use_absorbed(self, T: int) -> bool:
        """Absorbed costs ~T*S*H*2(C+R) per layer; expanded costs ~S*H*C*(N+V) to re-expand the cache."""
        if torch.is_grad_enabled() and self.training:
            return False
        return T * 2 * (self.kv_lora_rank + self.rope_dim) < self.kv_lora_rank * (self.nope_dim + self.v_dim)

    def forward(self, x_BTD, cos, sin, mask_BTS=None, cache=None):
        B, T, _ = x_BTD.shape
        H = self.n_heads
        if self.q_lora_rank is None:
            q = self.q_proj(x_BTD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        q_BTHK = q.view(B, T, H, self.qk_dim)
        q_nope, q_pe = q_BTHK.split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin, self.interleave)

        kv_a = self.kv_a_proj_with_mqa(x_BTD)
        kv_BTC, pe_BTR = kv_a.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv_BTC = self.kv_a_layernorm(kv_BTC)
        pe_BTR = apply_rope(pe_BTR, cos, sin, self.interleave)
        if getattr(cache, "is_compressed", False):  # hierarchical compressed cache: deepseek/model/longctx
            return self.o_proj(cache.attend(self, q_nope, q_pe, kv_BTC, pe_BTR, mask_BTS).flatten(2))
        if cache is None and self.training and hasattr(self, "nsa"):  # kv_learned: train as the cache attends
            return self.o_proj(compressed_attention(self, q_nope, q_pe, kv_BTC, pe_BTR, mask_BTS).flatten(2))
        if cache is not None:
            kv_BSC, pe_BSR = cache_update(cache, kv_BTC, pe_BTR, self.layer_idx)
        else:
            kv_BSC, pe_BSR = kv_BTC, pe_BTR

        if self.use_absorbed(T):
            out_BTHV = self.absorbed(q_nope, q_pe, kv_BSC, pe_BSR, mask_BTS)
        else:
            out_BTHV = self.expanded(q_nope, q_pe, kv_BSC, pe_BSR, mask_BTS)
        return self.o_proj(out_BTHV.flatten(2))

    def expanded(self, q_nope, q_pe, kv_BSC, pe_BSR, mask_BTS):
        B, S, _ = kv_BSC.shape
        H = self.n_heads
        kv = self.kv_b_proj(kv_BSC).view(B, S, H, self.nope_dim + self.v_dim)
        k_nope, v_BSHV = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k_BSHK = torch.cat((k_nope, pe_BSR[:, :, None, :].expand(B, S, H, self.rope_dim)), dim=-1)
        q_BTHK = torch.cat((q_nope, q_pe), dim=-1)
        mask = None if mask_BTS is None else mask_BTS[:, None]  # (B, 1, T, S), True = attend
        causal = mask is None and q_BTHK.shape[1] > 1  # no mask and T > 1: a plain causal block (S == T)
        out = F.scaled_dot_product_attention(
            q_BTHK.transpose(1, 2), k_BSHK.transpose(1, 2), v_BSHV.transpose(1, 2), attn_mask=mask,
            is_causal=causal, scale=self.scale,
        )  # (B, H, T, V)
        return out.transpose(1, 2)

    def absorbed(self, q_nope, q_pe, kv_BSC, pe_BSR, mask_BTS):
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk_HNC, w_uv_HVC = w[:, : self.nope_dim], w[:, self.nope_dim :]
        q_lat_BTHC = torch.einsum("bthn,hnc->bthc", q_nope, w_uk_HNC)
        scores_BHTS = torch.einsum("bthc,bsc->bhts", q_lat_BTHC, kv_BSC)
        scores_BHTS = scores_BHTS + torch.einsum("bthr,bsr->bhts", q_pe, pe_BSR)
        scores_BHTS = scores_BHTS * self.scale
        T, S = q_nope.shape[1], kv_BSC.shape[1]
        if mask_BTS is None and T > 1:  # a causal block with no cache before it (S == T)
            mask_BTS = torch.ones(T, S, dtype=torch.bool, device=kv_BSC.device).tril(S - T)[None]
        if mask_BTS is not None:
            scores_BHTS = scores_BHTS.masked_fill(~mask_BTS[:, None], float("-inf"))
        probs = scores_BHTS.softmax(dim=-1, dtype=torch.float32).to(q_nope.dtype)
        out_lat_BTHC = torch.einsum("bhts,bsc->bthc", probs, kv_BSC)
        return torch.einsum("bthc,hvc->bthv", out_lat_BTHC, w_uv_HVC)
