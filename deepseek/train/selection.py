"""Training the compressed cache's block selection: a loss on the lead layer's choice among the sealed blocks.

Legend: B batch, T tokens, n sealed blocks, b block size, H heads, C kv_lora_rank, R qk_rope_head_dim, K = C + R,
P selecting queries of a row.

View training (train/passkey.py) shows the model what its last query would read if selection had found the
needle; nothing in it trains selection itself, which is the same q . block-summary scoring at inference
(longctx.learned.score_blocks, the lead layer's, kv_lead_layer). On real prose, and with several named keys, that
training-free choice misses. This loss trains it directly, in the role DeepSeek-V3.2's indexer loss plays for its
lightning indexer, but with the needle's blocks as the target instead of the dense attention's distribution
(the small model never attends densely over a long source):

1. keys: the lead layer's keys of every token of the *source* prompt the view was cut from, as a sealed block
   holds them (normalised latent + rope part at block-relative positions 0..b-1, compact positions): the
   layers up to the lead layer are prefilled through the compressed cache without gradient (exact: the later
   layers do not change them), then the lead layer's key projection is applied again with gradient; block
   summaries as the cache makes them (learned.block_summary).
2. queries: the lead layer's queries in the view forward itself (a hook on its attention), as the cache reads
   them to select: rope part moved by -sinks (a block's summary sits in the first slot), the prefill's last
   tile as its mean query, then each decoding position of the answer on its own.
3. loss: for each selecting query, -log of the share of the importance (score_blocks: both softmaxes, summed
   over heads) that falls on the blocks of each span that must be read; mean over queries and spans.

Gradients reach the lead layer's query and key projections, and everything before it on the query side.
`max_rows` bounds the cost: a source prefill of the first layers is ~0.1 s per 1K tokens on one thread.
"""

from __future__ import annotations

import torch

from ..model.longctx.learned import block_summary, score_blocks


class LeadQueries:
    """Forward hook on the lead layer's attention: keeps its input x (B, T, D) of the latest forward."""

    def __init__(self, model):
        layer = model.config.compression.lead_layer
        if layer is None:
            raise ValueError("selection training needs kv_lead_layer (the layer whose selection every layer reads)")
        self.attn = model.model.layers[layer % model.config.num_hidden_layers].self_attn
        self.inputs = None
        self.handle = self.attn.register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        self.inputs = args[0]

    def remove(self):
        self.handle.remove()


def lead_keys(model, src_T: torch.Tensor) -> torch.Tensor:
    """The lead layer's keys (T, K) of a source prompt exactly as its sealed blocks hold them (normalised latent,
    rope part at block-relative positions), with gradient to the lead layer's key projection. The lead layer's
    input comes from a chunked prefill of the layers up to it through a CompressedLatentCache (no gradient):
    the later layers do not change what those layers compute, so this is what the full prefill gives them."""
    from ..model.longctx import CompressedLatentCache

    config = model.config
    lead = config.compression.lead_layer % config.num_hidden_layers
    b, chunk, T = config.compression.block_size, config.prefill_chunk, src_T.numel()
    cache = CompressedLatentCache(config, 1, T, layers=config.num_hidden_layers)
    inputs = []
    with torch.no_grad():
        for s in range(0, T, chunk):
            ids = src_T[None, s : s + chunk]
            x = model.model.embed_tokens(ids)
            cos, sin = model.model.rotary_emb(torch.arange(s, s + ids.shape[1])[None], x.dtype)
            for layer in model.model.layers[:lead]:
                x = layer(x, cos, sin, None, cache)
            inputs.append(x)
            model.model.layers[lead](x, cos, sin, None, cache)  # the lead layer's own selection, for the next chunk
    layer = model.model.layers[lead]
    h_TD = layer.input_layernorm(torch.cat(inputs, 1))
    cos_r, sin_r = model.model.rotary_emb((torch.arange(T) % b)[None], h_TD.dtype)  # sinks are whole blocks
    kv_TC, pe_TR = layer.self_attn.latent_keys(h_TD, cos_r, sin_r)
    return torch.cat((kv_TC, pe_TR), -1)[0]


def selection_loss(model, hook: LeadQueries, rows: list[dict | None], max_rows: int | None = None) -> torch.Tensor | None:
    """Mean -log share of importance on the must-read blocks, over the view rows of the batch that have
    `rows[i]` = {"source": ids (T,), "n_blocks": n, "targets": [block ids per span], "tile": (lo, hi),
    "decode": [view positions]}; None when no row has one. max_rows: at most that many rows' spans (the first)."""
    config = model.config
    b, sink = config.compression.block_size, config.compression.sink_blocks * config.compression.block_size
    x, attn = hook.inputs, hook.attn  # view rows sit at positions 0..T-1 (no PoSE gap)
    shift = torch.arange(x.shape[1])[None] - sink  # the selection query's rope position: p - sinks
    _, q_nope, q_pe_sel = attn.queries(x, *model.model.rotary_emb(shift.clamp(min=0), x.dtype))
    q_lat = torch.einsum("bthn,hnc->bthc", q_nope, attn.absorbed_weights()[0])
    q_BTHK = torch.cat((q_lat, q_pe_sel), -1)
    losses, used = [], 0
    for i, row in enumerate(rows):
        if row is None:
            continue
        if max_rows is not None and used >= max_rows:
            break
        used += 1
        keys_TK = lead_keys(model, row["source"])
        n = row["n_blocks"]
        blocks = keys_TK[sink : sink + n * b].view(1, n, b, -1)
        mean, radius = block_summary(blocks)
        lo, hi = row["tile"]
        q_tile = q_BTHK[i, lo:hi].mean(0, keepdim=True)  # (1, H, K): the last prefill tile's mean query
        q_P = torch.cat((q_tile, q_BTHK[i, row["decode"]]))  # (P, H, K)
        imp = score_blocks(q_P[None], mean, radius, attn.scale)[0]  # (P, n)
        share = imp / imp.sum(-1, keepdim=True)
        for target in row["targets"]:
            losses.append(-(share[:, target].sum(-1).clamp(min=1e-6)).log().mean())
    return torch.stack(losses).mean() if losses else None
