"""Trainable NSA-style parts of the compressed latent cache and a differentiable whole-sequence path for them.

Legend: B batch, T tokens (queries and keys of one sequence), H heads, N qk_nope_head_dim, C kv_lora_rank,
R qk_rope_head_dim, K = C + R, V v_head_dim, b block size, n whole blocks in the sequence, X query tiles
(b queries each), k selected blocks.

With `R1Config.compression.learned=True` every MLAttention holds `nsa = NSAParams(config)`:

- learned block compression: `block_logits` (b,), softmax -> weights over the positions inside a block; a
  sealed block's summary key (and coarse value) is the weighted mean of its keys, its radius is taken around
  that mean. Zeros give the plain mean.
- learned branch gates (NSA's gates, in log space for the cache's one joint softmax): per head, a linear map
  q_nope (N,) -> 3 logits added to the scores of [sinks + selected blocks], [coarse block means] (which keep
  their + log(b)), [recent window]. Adding g to a branch's logits multiplies its unnormalised weights by
  exp(g). Zero weights and bias give the training-free cache.

`compressed_attention` is the training path: for a whole sequence it computes, per tile of b queries, what
`chunked_prefill(model, ids, CompressedLatentCache(...), chunk=kv_block_size)` computes with kv_quant_bits=0
(the reference path, CompressedLatentCache.groups; equal within 1e-5, tested): sinks, the blocks
sealed when the tile arrives (whole blocks that have left the window), top-k of them chosen with the tile's
mean query (indices without gradient, scores with), coarse means of the unselected sealed blocks, the causal
recent region.
It is dense and masked: O(T^2) scores per head, fine for training lengths of a few thousand tokens.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..cache import Attended, KeyGroup


class NSAParams(nn.Module):
    """Per-layer learned block compression and branch gates; zeros = the training-free cache."""

    def __init__(self, config):
        super().__init__()
        H, N, b = config.num_attention_heads, config.qk_nope_head_dim, config.compression.block_size
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
    """Give a built model (any checkpoint) zero-initialised NSA parameters and set config.compression.learned: it still
    behaves as the training-free cache until they are trained."""
    model.config.compression.learned = True
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
    b, W = config.compression.block_size, config.compression.window
    start_X = torch.arange(math.ceil(T / b), device=device) * b
    sealed_end_X = (torch.div(start_X - W, b, rounding_mode="floor") * b).clamp(min=0)
    sink_end_X = sealed_end_X.clamp(max=config.compression.sink_blocks * b)
    return sealed_end_X, sink_end_X


def available_blocks(T: int, config, device=None) -> torch.Tensor:
    """(X, n) bool: whole block j is a sealed (non-sink) block when tile x arrives."""
    b = config.compression.block_size
    sealed_end_X, _ = tile_layout(T, config, device)
    j = torch.arange(T // b, device=device)
    return (j[None] >= config.compression.sink_blocks) & ((j[None] + 1) * b <= sealed_end_X[:, None])


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


def score_blocks(q_BXHK, mean_BnK, radius_BnK, scale: float, available_Xn=None) -> torch.Tensor:
    """Importance (B, X, n) of each sealed block for each tile's (mean) query, summed over heads: softmax over
    blocks of a Quest-style upper bound of q . key, q . mean + |q| . radius (catches a single sharp key when
    keys concentrate on few channels), plus softmax of q . mean (NSA's compressed attention; catches a sharp key
    when the bound is loose, as for near-isotropic latents). available_Xn (X, n) bool: blocks a tile may choose
    (None: all); the others get -inf. The one scoring both CompressedLatentCache and the training path use."""
    mean = torch.einsum("bxhk,bnk->bxhn", q_BXHK, mean_BnK)  # q . block mean
    bound = mean + torch.einsum("bxhk,bnk->bxhn", q_BXHK.abs(), radius_BnK)  # >= q . any key of the block
    if available_Xn is None:
        importance = (bound * scale).softmax(-1, dtype=torch.float32)
        return (importance + (mean * scale).softmax(-1, dtype=torch.float32)).sum(2)
    off = ~available_Xn[None, :, None, :]
    importance = (bound * scale).masked_fill(off, float("-inf")).softmax(-1, dtype=torch.float32)
    importance = importance + (mean * scale).masked_fill(off, float("-inf")).softmax(-1, dtype=torch.float32)
    return importance.nan_to_num(0.0).sum(2).masked_fill(~available_Xn[None], float("-inf"))


@torch.no_grad()
def select_blocks(q_BTHK, mean_BnK, radius_BnK, available_Xn, config, scale: float) -> torch.Tensor:
    """Top-k sealed blocks per tile of b queries, chosen with the tile's mean query (score_blocks). Returns
    chosen (B, X, n) bool (no gradient: the indices are a hard choice)."""
    B, T, H, K = q_BTHK.shape
    b = config.compression.block_size
    X, n = available_Xn.shape
    pad = X * b - T
    valid_Xt = (torch.arange(X * b, device=q_BTHK.device) < T).to(q_BTHK.dtype).view(X, b)
    q_BXtHK = torch.cat((q_BTHK, q_BTHK.new_zeros(B, pad, H, K)), 1).view(B, X, b, H, K)
    q_BXHK = (q_BXtHK * valid_Xt[None, :, :, None, None]).sum(2) / valid_Xt.sum(1)[None, :, None, None]
    importance = score_blocks(q_BXHK, mean_BnK, radius_BnK, scale, available_Xn)
    idx_BXk = top_runs(importance, config.compression.topk_blocks, config.compression.select_span)
    chosen_BXn = torch.zeros(B, X, n, dtype=torch.bool, device=q_BTHK.device).scatter_(2, idx_BXk, True)
    return chosen_BXn & available_Xn[None]


# ---------------------------------------------------------------------- the training path
def compressed_pattern(query, kv_BTC, pe_BTR, mask_BTS, nsa) -> Attended:
    """The compressed cache's attention pattern over a whole sequence (module docstring), as key groups for
    MLAttention: sinks + selected blocks (branch 0), the causal recent region (branch 2), coarse means of the
    unselected sealed blocks (branch 1). Differentiable except for the block choice. config = nsa.config."""
    config = nsa.config
    if mask_BTS is not None and not bool(mask_BTS[:, -1].all()):
        raise ValueError("compressed_attention does not take padded batches; run rows of equal length")
    if config.compression.compact_positions:
        raise ValueError("compressed_attention (kv_learned training) models exact positions; set "
                         "kv_compact_positions=False to train, it can be switched on again for inference")  # fmt: skip
    B, T, H, _ = query.nope_BTHN.shape
    C, b, scale = kv_BTC.shape[-1], config.compression.block_size, query.scale
    q_BTHK = torch.cat((query.lat_BTHC, query.pe_BTHR), dim=-1)
    k_BTK = torch.cat((kv_BTC, pe_BTR), dim=-1)
    sealed_end_X, sink_end_X = tile_layout(T, config, q_BTHK.device)
    pos = torch.arange(T, device=q_BTHK.device)
    tile_T = pos // b
    sink_TS = pos[None] < sink_end_X[tile_T][:, None]
    recent_TS = (pos[None] >= sealed_end_X[tile_T][:, None]) & (pos[None] <= pos[:, None])
    n = T // b
    full_BTS = sink_TS[None].expand(B, T, T)
    coarse = None
    if n:
        mean_BnK, radius_BnK = block_summary(k_BTK[:, : n * b].unflatten(1, (n, b)), nsa.block_weights(k_BTK.dtype))
        available_Xn = available_blocks(T, config, q_BTHK.device)
        chosen_BXn = select_blocks(q_BTHK.detach(), mean_BnK.detach(), radius_BnK.detach(), available_Xn,
                                   config, scale)  # fmt: skip
        block_S = (pos // b).clamp(max=n)  # the trailing partial block (index n) is never sealed
        chosen_BXS = torch.cat((chosen_BXn, chosen_BXn.new_zeros(B, chosen_BXn.shape[1], 1)), 2)
        full_BTS = full_BTS | chosen_BXS[:, :, block_S][:, tile_T]
        if config.compression.coarse:
            coarse_BTn = (available_Xn[None] & ~chosen_BXn)[:, tile_T]
            lat, pe = mean_BnK.split([C, mean_BnK.shape[-1] - C], dim=-1)
            coarse = KeyGroup(lat, pe, coarse_BTn[:, None], math.log(b), branch=1)
    groups = [KeyGroup(kv_BTC, pe_BTR, full_BTS[:, None], branch=0),
              KeyGroup(kv_BTC, pe_BTR, (recent_TS[None] & ~full_BTS)[:, None], branch=2)]  # fmt: skip
    return Attended(groups + ([coarse] if coarse is not None else []))
