"""refresh_recent (kv_refresh_recent): the prompt's recent buffer re-encoded with the last tile's selection."""

from __future__ import annotations

import pytest
import torch
from helpers import random_model, tiny_config

from deepseek.model.longctx import CompressedLatentCache, chunked_prefill
from deepseek.model.longctx.prefill import refresh_recent

pytestmark = pytest.mark.usefixtures("one_thread")

LONG = dict(kv_block_size=8, kv_window=16, kv_sink_blocks=1, max_position_embeddings=512, prefill_chunk=8)


def prefill(model, ids, refresh, **cache_kw):
    cache = CompressedLatentCache(model.config, ids.shape[0], ids.shape[1] + 8, **cache_kw)
    return chunked_prefill(model, ids, cache, refresh=refresh), cache


@torch.no_grad()
def test_refresh_is_exact_when_nothing_is_dropped():
    """bits=0 and top-k >= #blocks: every tile already reads everything, so the refresh changes no number, the
    bookkeeping is intact, and decoding continues as with the full model."""
    cfg = tiny_config(kv_quant_bits=0, kv_topk_blocks=1000, **LONG)
    model = random_model(cfg)
    ids = torch.randint(3, cfg.vocab_size, (2, 101))
    full = model(ids).logits[:, -1]
    plain, c0 = prefill(model, ids, refresh=False)
    fresh, c1 = prefill(model, ids, refresh=True)
    torch.testing.assert_close(fresh, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fresh, full, atol=1e-4, rtol=1e-4)
    for a, b in zip(c0.store, c1.store):
        assert (a.length, a.recent_start, a.n_blocks, a.sink_filled) == (b.length, b.recent_start, b.n_blocks, b.sink_filled)
        assert b.length == 101 and b.n_blocks > 0
    nxt = fresh.argmax(-1, keepdim=True)
    pos = torch.full((2, 1), 101)
    step = model(nxt, position_ids=pos, cache=c1).logits[:, -1]
    ref = model(torch.cat((ids, nxt), 1)).logits[:, -1]
    torch.testing.assert_close(step, ref, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_one_layer_refresh_equals_one_masked_pass_over_the_final_selection():
    """One layer, top-1, full precision: after the refresh every recent token has attended to the sinks, the
    block the last tile selected and the recent tokens before it, which is one causal pass with that mask
    (reference path: the plain model on the whole prompt with an explicit mask). The last position's logits
    do not change (its tile, keys and selection are the same as in the chunked prefill)."""
    cfg = tiny_config(kv_quant_bits=0, kv_topk_blocks=1, kv_coarse=False, num_hidden_layers=1, **LONG)
    model = random_model(cfg)
    T = 93
    ids = torch.randint(3, cfg.vocab_size, (1, T))
    plain, cache = prefill(model, ids, refresh=False)
    st, b = cache.store[0], cfg.compression.block_size
    r = st.recent_start
    assert r < T - 2 * cfg.prefill_chunk  # the recent buffer spans several tiles: the refresh has work to do

    chosen = []
    select = cache.select_blocks
    cache.select_blocks = lambda *a, **k: chosen.append(select(*a, **k)) or chosen[-1]  # records, does not replace
    hidden = refresh_recent(model, ids, cache)  # (1, T - r, D)
    assert len(chosen) == 1 and chosen[0].shape == (1, 1, 1)  # one selection, from the last tile
    torch.testing.assert_close(model.lm_head(hidden[:, -1]), plain, atol=1e-5, rtol=1e-5)

    lo = st.sink_filled + int(chosen[0]) * b
    mask = torch.zeros(T, T, dtype=torch.bool)
    mask[:, : st.sink_filled] = True
    mask[:, lo : lo + b] = True
    mask[:, r:] = True
    mask &= torch.ones(T, T, dtype=torch.bool).tril()
    ref = model.model(input_ids=ids, position_ids=torch.arange(T)[None], mask=mask[None]).last_hidden_state[:, r:]
    torch.testing.assert_close(hidden, ref, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_refresh_rewrites_only_the_recent_buffer():
    """Three layers, top-1, 4-bit: the refresh changes the recent latents of the layers after the first (their
    input came through attention) and nothing sealed; positions and regions stay as they were."""
    cfg = tiny_config(kv_quant_bits=4, kv_topk_blocks=1, **LONG)
    model = random_model(cfg)
    ids = torch.randint(3, cfg.vocab_size, (1, 120))
    _, c0 = prefill(model, ids, refresh=False)
    _, c1 = prefill(model, ids, refresh=True)
    changed = []
    for a, b in zip(c0.store, c1.store):
        assert (a.length, a.recent_start, a.n_blocks) == (b.length, b.recent_start, b.n_blocks)
        assert torch.equal(a.kmean, b.kmean) and torch.equal(a.kv_q.packed, b.kv_q.packed)
        n = a.length - a.recent_start
        changed.append(not torch.allclose(a.recent_kv[:, :n], b.recent_kv[:, :n]))
    assert changed[0] is False and any(changed[1:])


def test_refresh_setting_is_validated():
    with pytest.raises(ValueError, match=r"compression\.refresh_recent"):
        tiny_config(kv_refresh_recent="yes")


@pytest.mark.parametrize("lead", [-1, 1])
@torch.no_grad()
def test_lead_layer_the_other_layers_read_its_blocks(lead):
    """kv_lead_layer=j: at each decode step only layer j selects; the layers after it read its choice of this
    step, the layers before it its choice of the previous forward (the refresh, then each step). With every
    block selected and full precision the logits still equal the full model's."""
    cfg = tiny_config(kv_quant_bits=4, kv_topk_blocks=1, kv_lead_layer=lead, kv_refresh_recent=True, **LONG)
    model = random_model(cfg)
    j = lead % cfg.num_hidden_layers
    ids = torch.randint(3, cfg.vocab_size, (1, 120))
    cache = CompressedLatentCache(cfg, 1, 140)
    read, select, fetch = {}, cache.select_blocks, cache.fetch
    cache.fetch = lambda layer, idx: read.__setitem__(layer, idx.clone()) or fetch(layer, idx)  # records
    logits = chunked_prefill(model, ids, cache)
    calls = []
    cache.select_blocks = lambda q, layer, *a: calls.append(layer) or select(q, layer, *a)
    for t in range(8):
        before = cache.lead_idx.clone()
        read.clear(), calls.clear()
        nxt = logits.argmax(-1, keepdim=True)
        logits = model(nxt, position_ids=torch.tensor([[120 + t]]), cache=cache).logits[:, -1]
        assert calls == [j]  # only the lead layer selects
        for layer in range(cfg.num_hidden_layers):
            want = before if layer < j else cache.lead_idx
            assert torch.equal(read[layer], want), (t, layer)

    lossless = tiny_config(kv_quant_bits=0, kv_topk_blocks=1000, kv_lead_layer=lead, kv_refresh_recent=True,
                           **LONG)  # fmt: skip
    model = random_model(lossless)
    full = model(ids).logits[:, -1]
    got, _ = prefill(model, ids, refresh=True)
    torch.testing.assert_close(got, full, atol=1e-4, rtol=1e-4)


def test_lead_layer_is_validated():
    for bad in (3, -4, True, 1.0):
        with pytest.raises(ValueError, match=r"compression\.lead_layer"):
            tiny_config(kv_lead_layer=bad)


@torch.no_grad()
def test_refresh_with_an_empty_recent_buffer_is_a_no_op():
    """kv_window=0 and a prompt of whole blocks: everything is sealed, nothing to re-encode; same logits."""
    cfg = tiny_config(kv_quant_bits=0, kv_topk_blocks=1, **{**LONG, "kv_window": 0})
    model = random_model(cfg)
    ids = torch.randint(3, cfg.vocab_size, (1, 64))
    plain, _ = prefill(model, ids, refresh=False)
    fresh, cache = prefill(model, ids, refresh=True)
    assert cache.store[0].recent_start == 64
    torch.testing.assert_close(fresh, plain, atol=0, rtol=0)
