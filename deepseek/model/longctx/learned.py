"""Trainable NSA-style parts of the compressed latent cache and a differentiable whole-sequence path for them.

Legend: B batch, T tokens (queries and keys of one sequence), H heads, N qk_nope_head_dim, C kv_lora_rank,
R qk_rope_head_dim, K = C + R, V v_head_dim, b block size, n whole blocks in the sequence, X query tiles
(b queries each), k selected blocks.

With `R1Config.kv_learned=True` every MLAttention holds `nsa = NSAParams(config)`:

- learned block compression: `block_logits` (b,), softmax -> weights over the positions inside a block; a
  sealed block's summary key (and coarse value) is the weighted mean of its keys, its radius is taken around
  that mean. Zeros give the plain mean.
- learned branch gates (NSA's gates, in log space for the cache's one joint softmax): per head, a linear map
  q_nope (N,) -> 3 logits added to the scores of [sinks + selected blocks], [coarse block means] (which keep
  their + log(b)), [recent window]. Adding g to a branch's logits multiplies its unnormalised weights by
  exp(g). Zero weights and bias give the training-free cache.

`compressed_attention` is the training path: for a whole sequence it computes, per tile of b queries, what
`chunked_prefill(model, ids, CompressedLatentCache(...), chunk=kv_block_size)` computes with kv_quant_bits=0
(the reference path, CompressedLatentCache.attend_latent; equal within 1e-5, tested): sinks, the blocks
sealed when the tile arrives (whole blocks that have left the window), top-k of them chosen with the tile's
mean query (indices without gradient, scores with), coarse means of the unselected sealed blocks, the causal
recent region.
It is dense and masked: O(T^2) scores per head, fine for training lengths of a few thousand tokens.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class NSAParams(nn.Module):
    """Per-layer learned block compression and branch gates; zeros = the training-free cache."""

    def __init__(self, config):
        super().__init__()
        H, N, b = config.num_attention_heads, config.qk_nope_head_dim, config.kv_block_size
        self.config = config  # geometry (block, window, sinks, top-k) is read from it at call time
        self.block_logits = nn.Parameter(torch.zeros(b))  # (b,) intra-block position logits
        self.gate_weight = nn.Parameter(torch.zeros(H, N, 3))  # (H, N, 3) q_nope -> 3 branch logits
        self.gate_bias = nn.Parameter(torch.zeros(H, 3))  # (H, 3)

    def block_weights(self, dtype=None) -> torch.Tensor:
        """(b,) softmax weights of the positions inside a block."""
        return self.block_logits.float().softmax(-1).to(dtype or self.block_logits.dtype)

    def gates(self, q_nope_BTHN: torch.Tensor) -> torch.Tensor:
        """Log-gates (B, T, H, 3) for the branches [sinks + selected, coarse, recent]."""
        w = self.gate_weight.to(q_nope_BTHN.dtype)
        return torch.einsum("bthn,hnj->bthj", q_nope_BTHN, w) + self.gate_bias.to(q_nope_BTHN.dtype)


def enable_learned(model) -> None:
    """Give a built model (any checkpoint) zero-initialised NSA parameters and set config.kv_learned: it still
    behaves as the training-free cache until they are trained."""
    model.config.kv_learned = True
    for module in model.modules():
        if hasattr(module, "kv_b_proj") and getattr(module, "nsa", None) is None:
            w = module.kv_b_proj.weight
            module.nsa = NSAParams(model.config).to(device=w.device, dtype=w.dtype)


def nsa_parameters(model) -> list[nn.Parameter]:
    """The NSA parameters of every layer (to fine-tune them alone)."""
    return [p for name, p in model.named_parameters() if ".nsa." in name]


# ---------------------------------------------------------------------- summaries and tiles
def block_summary(keys_BnbK: torch.Tensor, weights_b: torch.Tensor | None = None):
    """Blocks of keys (B, n, b, K) -> mean (B, n, K) (weighted when weights_b is given), radius (B, n, K) =
    max |key - mean| per channel. Used by CompressedLatentCache.seal and by the training path."""
    if weights_b is None:
        mean = keys_BnbK.mean(2)
    else:
        mean = torch.einsum("bnik,i->bnk", keys_BnbK, weights_b.to(keys_BnbK.dtype))
    radius = torch.maximum(keys_BnbK.amax(2) - mean, mean - keys_BnbK.amin(2))
    return mean, radius


def tile_layout(T: int, config, device=None):
    """Where each query tile x (queries x*b .. x*b+b-1) stands after a chunked prefill with chunk = b:
    sealed_end (X,) (positions below it have left the window and are sinks or sealed blocks, as
    CompressedLatentCache.seal leaves them) and sink_end (X,) (positions below it are sinks)."""
    b, W = config.kv_block_size, config.kv_window
    start_X = torch.arange(math.ceil(T / b), device=device) * b
    sealed_end_X = (torch.div(start_X - W, b, rounding_mode="floor") * b).clamp(min=0)
    sink_end_X = sealed_end_X.clamp(max=config.kv_sink_blocks * b)
    return sealed_end_X, sink_end_X


def available_blocks(T: int, config, device=None) -> torch.Tensor:
    """(X, n) bool: whole block j is a sealed (non-sink) block when tile x arrives."""
    b = config.kv_block_size
    sealed_end_X, _ = tile_layout(T, config, device)
    j = torch.arange(T // b, device=device)
    return (j[None] >= config.kv_sink_blocks) & ((j[None] + 1) * b <= sealed_end_X[:, None])


def top_runs(importance_BXn: torch.Tensor, k: int, span: int = 1) -> torch.Tensor:
    """The k blocks to read in full per tile, as k // span disjoint runs of `span` consecutive blocks, greedily
    by summed importance (span 1: plain top-k). -inf marks blocks that may not be chosen. Returns idx (B, X, k)
    of distinct blocks. A run keeps a needle cut at a block boundary whole: both halves are read together.
    If too few whole runs fit (short contexts), the rest are filled with the most important other blocks."""
    n = importance_BXn.shape[-1]
    k = min(k, n)
    if span <= 1 or k == n:
        return importance_BXn.topk(k, dim=-1).indices
    window_BXw = importance_BXn.unfold(-1, span, 1).sum(-1)  # (B, X, n - span + 1): a run starting at w
    starts = torch.arange(window_BXw.shape[-1], device=importance_BXn.device)
    offsets = torch.arange(span, device=importance_BXn.device)
    chosen_BXn = torch.zeros_like(importance_BXn, dtype=torch.bool)
    for _ in range(k // span):
        best, w_BX = window_BXw.max(-1)
        ok_BX = best > float("-inf")
        run_BXs = ok_BX[..., None].expand(*ok_BX.shape, span).contiguous()
        chosen_BXn |= torch.zeros_like(chosen_BXn).scatter_(-1, w_BX[..., None] + offsets, run_BXs)
        window_BXw.masked_fill_((starts - w_BX[..., None]).abs() < span, float("-inf"))  # runs stay disjoint
    finite = importance_BXn.nan_to_num(0.0, posinf=0.0, neginf=0.0)
    bonus = finite.abs().sum(-1, keepdim=True) + 1.0  # a chosen block outranks every other
    return (importance_BXn + chosen_BXn * bonus).topk(k, dim=-1).indices


@torch.no_grad()
def select_blocks(q_BTHK, mean_BnK, radius_BnK, available_Xn, config, scale: float) -> torch.Tensor:
    """Top-k sealed blocks per tile, as CompressedLatentCache.select_blocks scores them with the tile's mean
    query: softmax over the available blocks of q . mean + |q| . radius, plus softmax of q . mean, summed over
    heads. Returns chosen (B, X, n) bool (no gradient: the indices are a hard choice)."""
    B, T, H, K = q_BTHK.shape
    b = config.kv_block_size
    X, n = available_Xn.shape
    pad = X * b - T
    valid_Xt = (torch.arange(X * b, device=q_BTHK.device) < T).to(q_BTHK.dtype).view(X, b)
    q_BXtHK = torch.cat((q_BTHK, q_BTHK.new_zeros(B, pad, H, K)), 1).view(B, X, b, H, K)
    q_BXHK = (q_BXtHK * valid_Xt[None, :, :, None, None]).sum(2) / valid_Xt.sum(1)[None, :, None, None]
    mean = torch.einsum("bxhk,bnk->bxhn", q_BXHK, mean_BnK)
    bound = mean + torch.einsum("bxhk,bnk->bxhn", q_BXHK.abs(), radius_BnK)
    off = ~available_Xn[None, :, None, :]
    importance = (bound * scale).masked_fill(off, float("-inf")).softmax(-1, dtype=torch.float32)
    importance = importance + (mean * scale).masked_fill(off, float("-inf")).softmax(-1, dtype=torch.float32)
    importance = importance.nan_to_num(0.0).sum(2).masked_fill(~available_Xn[None], float("-inf"))  # (B, X, n)
    idx_BXk = top_runs(importance, config.kv_topk_blocks, getattr(config, "kv_select_span", 1))
    chosen_BXn = torch.zeros(B, X, n, dtype=torch.bool, device=q_BTHK.device).scatter_(2, idx_BXk, True)
    return chosen_BXn & available_Xn[None]


# ---------------------------------------------------------------------- the training path
def compressed_attention(attn, q_nope_BTHN, q_pe_BTHR, kv_BTC, pe_BTR, mask_BTS=None, config=None):
    """Differentiable whole-sequence attention with the compressed cache's semantics (module docstring).
    Returns (B, T, H, V). Uses attn.nsa (learned summaries and gates) when present; config defaults to
    attn.nsa.config."""
    if mask_BTS is not None and not bool(mask_BTS[:, -1].all()):
        raise ValueError("compressed_attention does not take padded batches; run rows of equal length")
    nsa = getattr(attn, "nsa", None)
    config = config or getattr(nsa, "config", None)
    if config is None:
        raise ValueError("compressed_attention needs config= when the attention has no nsa parameters")
    if getattr(config, "kv_compact_positions", False):
        raise ValueError("compressed_attention (kv_learned training) models exact positions; set "
                         "kv_compact_positions=False to train, it can be switched on again for inference")  # fmt: skip
    B, T, H, N = q_nope_BTHN.shape
    C, b, scale = attn.kv_lora_rank, config.kv_block_size, attn.scale
    w = attn.kv_b_proj.weight.view(H, N + attn.v_dim, C)
    w_uk_HNC, w_uv_HVC = w[:, :N], w[:, N:]
    q_lat_BTHC = torch.einsum("bthn,hnc->bthc", q_nope_BTHN, w_uk_HNC)
    q_BTHK = torch.cat((q_lat_BTHC, q_pe_BTHR), dim=-1)
    k_BTK = torch.cat((kv_BTC, pe_BTR), dim=-1)
    g_BHT3 = None if nsa is None else nsa.gates(q_nope_BTHN).transpose(1, 2)  # (B, H, T, 3)

    # token-level scores: sinks + selected blocks (branch 0) and the causal recent region (branch 2)
    scores_BHTS = torch.einsum("bthk,bsk->bhts", q_BTHK, k_BTK) * scale
    sealed_end_X, sink_end_X = tile_layout(T, config, q_BTHK.device)
    pos = torch.arange(T, device=q_BTHK.device)
    tile_T = pos // b
    sink_TS = pos[None] < sink_end_X[tile_T][:, None]
    recent_TS = (pos[None] >= sealed_end_X[tile_T][:, None]) & (pos[None] <= pos[:, None])
    n = T // b
    full_BTS = sink_TS[None].expand(B, T, T)
    coarse = None
    if n:
        weights = None if nsa is None else nsa.block_weights(k_BTK.dtype)
        mean_BnK, radius_BnK = block_summary(k_BTK[:, : n * b].unflatten(1, (n, b)), weights)
        available_Xn = available_blocks(T, config, q_BTHK.device)
        chosen_BXn = select_blocks(q_BTHK.detach(), mean_BnK.detach(), radius_BnK.detach(), available_Xn,
                                   config, scale)  # fmt: skip
        block_S = (pos // b).clamp(max=n)  # the trailing partial block (index n) is never sealed
        chosen_BXS = torch.cat((chosen_BXn, chosen_BXn.new_zeros(B, chosen_BXn.shape[1], 1)), 2)
        chosen_BXS = chosen_BXS[:, :, block_S]
        full_BTS = full_BTS | chosen_BXS[:, tile_T]
        if config.kv_coarse:
            coarse_BTn = (available_Xn[None] & ~chosen_BXn)[:, tile_T]
            s_BHTn = torch.einsum("bthk,bnk->bhtn", q_BTHK, mean_BnK) * scale + math.log(b)
            if g_BHT3 is not None:
                s_BHTn = s_BHTn + g_BHT3[..., 1:2]
            coarse = (s_BHTn.masked_fill(~coarse_BTn[:, None], float("-inf")), mean_BnK[..., :C])
    selected_BHTS = scores_BHTS if g_BHT3 is None else scores_BHTS + g_BHT3[..., 0:1]
    recent_BHTS = scores_BHTS if g_BHT3 is None else scores_BHTS + g_BHT3[..., 2:3]
    tok_BHTS = torch.where(full_BTS[:, None], selected_BHTS,
                           recent_BHTS.masked_fill(~recent_TS, float("-inf")))  # fmt: skip

    # one joint softmax over tokens and coarse block means; the latent is the value
    parts = [tok_BHTS] if coarse is None else [tok_BHTS, coarse[0]]
    probs = torch.cat(parts, dim=-1).softmax(dim=-1, dtype=torch.float32).to(q_BTHK.dtype)
    out_lat_BTHC = torch.einsum("bhts,bsc->bthc", probs[..., :T], kv_BTC)
    if coarse is not None:
        out_lat_BTHC = out_lat_BTHC + torch.einsum("bhtn,bnc->bthc", probs[..., T:], coarse[1])
    return torch.einsum("bthc,hvc->bthv", out_lat_BTHC, w_uv_HVC)
