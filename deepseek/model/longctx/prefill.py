"""Chunked prefill with bounded memory, cache construction from the config, YaRN context extension.

Legend: B batch, T prompt tokens, V vocab.

    cache = make_cache(model.config, batch=1, max_len=T + 64)        # compressed when config.compression.enabled
    logits_BV = chunked_prefill(model, ids_BT, cache)                 # chunks of config.prefill_chunk tokens
    out = generate(model, ids_BT, cache=cache, prefill_chunk=1024)     # both, then decode (deepseek.generation)

Activation memory per chunk is O(chunk * attended) instead of O(T^2): with the compressed cache the attended
set per query tile is bounded (sinks + top-k blocks + block means + window), so peak memory grows only with
the cache itself.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..cache import LatentCache
from ..rope import RotaryEmbedding, softmax_scale
from .cache import CompressedLatentCache


def make_cache(config, batch: int, max_len: int, compressed: bool | None = None, device=None, dtype=torch.float32):
    """The cache the config asks for: CompressedLatentCache when kv_compress (or compressed=True)."""
    use = config.compression.enabled if compressed is None else compressed
    cls = CompressedLatentCache if use else LatentCache
    return cls(config, batch, max_len, device=device, dtype=dtype)


@torch.inference_mode()
def chunked_prefill(model, input_ids, cache, chunk: int | None = None, progress: bool = False,
                    start_position: int = 0, refresh: bool | None = None) -> torch.Tensor:  # fmt: skip
    """Feed input_ids (B, T) through the model `chunk` tokens at a time, filling `cache`. Returns the last
    position's logits (B, V). Positions continue from cache.get_seq_length() + start_position.
    refresh (default config.compression.refresh_recent): with a compressed cache, end with refresh_recent."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, tokens) with at least one token, got {tuple(input_ids.shape)}")
    chunk = chunk or model.config.prefill_chunk
    if chunk <= 0:
        raise ValueError(f"chunk must be a positive number of tokens, got {chunk}")
    B, T = input_ids.shape
    past = cache.get_seq_length()
    if past + T > cache.max_len:
        raise ValueError(f"prompt needs {past + T} cache positions, the cache holds {cache.max_len}")
    bar = tqdm(total=T, unit="tok", desc="prefill", disable=not progress, leave=False)
    h = None
    for s in range(0, T, chunk):
        ids = input_ids[:, s : s + chunk]
        pos = torch.arange(past + s, past + s + ids.shape[1], device=ids.device)[None].expand(B, -1)
        h = model.model(input_ids=ids, position_ids=pos + start_position, cache=cache).last_hidden_state
        bar.update(ids.shape[1])
    bar.close()
    if refresh is None:
        refresh = model.config.compression.refresh_recent
    if refresh and isinstance(cache, CompressedLatentCache):
        fresh = refresh_recent(model, input_ids, cache, past, start_position)
        h = h if fresh is None else fresh
    return model.lm_head(h[:, -1])


def refresh_recent(model, input_ids, cache, past: int = 0, start_position: int = 0) -> torch.Tensor:
    """Re-encode the prompt's tokens still in the recent buffer (at most window + block + chunk) as one call in
    which every tile reads the blocks the last tile selects, per layer. During chunked prefill each earlier
    chunk of that buffer read the blocks its own (filler) queries chose, so at later layers the recent tokens
    carry a history of other blocks than the ones the final query retrieves from; after the refresh the whole
    buffer has attended to the final selection, as in one causal pass over [sinks][selected][recent]. Sealed
    blocks are untouched. Returns the hidden states of the re-encoded tokens (B, T', D), or None if none."""
    B, T = input_ids.shape
    r = max(past, max(st.recent_start for st in cache.store))
    if r >= past + T:  # nothing of this prompt left in the recent buffer (possible with kv_window=0)
        return None
    cache.crop(r)
    ids = input_ids[:, r - past :]
    pos = torch.arange(r, past + T, device=ids.device)[None].expand(B, -1)
    cache.one_selection = True
    try:
        return model.model(input_ids=ids, position_ids=pos + start_position, cache=cache).last_hidden_state
    finally:
        cache.one_selection = False


def extend_context(model, max_len: int, original: int | None = None) -> None:
    """YaRN position scaling so `max_len` positions fit a model trained on `original` (default: the config's
    max_position_embeddings). Rebuilds the rotary table and the softmax scale in place; updates the config."""
    config = model.config
    original = original or config.rope_parameters.get("original_max_position_embeddings") or (
        config.max_position_embeddings
    )
    factor = max_len / original
    if factor <= 1:
        return
    rope = dict(config.rope_parameters)
    rope.update(rope_type="yarn", factor=float(factor), original_max_position_embeddings=original)
    rope.setdefault("beta_fast", 32)
    rope.setdefault("beta_slow", 1)
    config.rope_parameters = rope
    config.max_position_embeddings = max_len
    backbone = model.model
    device = backbone.embed_tokens.weight.device
    backbone.rotary_emb = RotaryEmbedding(rope, config.qk_rope_head_dim, config.rope_interleave).to(device)
    for layer in backbone.layers:
        layer.self_attn.scale = softmax_scale(rope, layer.self_attn.qk_dim)
