"""Compact rope positions in the compressed cache (kv_compact_positions) and the passkey views trained for them."""

from __future__ import annotations

import math
import random

import pytest
import torch
from helpers import tiny_config

from deepseek.eval.passkey import needle_spans, passkey_sample, small_config
from deepseek.model.attention import attend_latent
from deepseek.model.longctx import CompressedLatentCache
from deepseek.model.rope import rope_frequencies, rotate
from deepseek.train.passkey import VIEW_SETTINGS, compact_view, training_batch, view_length

LONG = dict(kv_block_size=8, kv_window=16, kv_sink_blocks=1, max_position_embeddings=4096)


def decode_output(cfg, n_filler: int) -> torch.Tensor:
    """One decode query's attention output over [sink][n_filler filler blocks][needle block][window], with the
    rope keys at their true positions; the needle is built to be the one block selected."""
    C, R, b = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.compression.block_size
    g = torch.Generator().manual_seed(0)
    H = cfg.num_attention_heads
    q_lat = torch.randn(1, 1, H, C, generator=g)
    q_raw = torch.randn(1, 1, H, R, generator=g)
    sink = torch.randn(b, C + R, generator=g)
    needle = torch.randn(b, C + R, generator=g)
    needle[:, :C] += 4 * q_lat[0, 0].mean(0)  # the block the query matches
    window = torch.randn(20, C + R, generator=g)
    filler = torch.randn(1, C + R, generator=g).expand(n_filler * b, -1) * 0.1
    rows = torch.cat((sink, filler, needle, window))  # (L, C + R)
    L = rows.shape[0]
    inv_freq = rope_frequencies(cfg.rope_parameters, R)[0]
    pe = rotate(rows[:, C:], torch.arange(L), inv_freq, cfg.rope_interleave)  # true positions
    cache = CompressedLatentCache(cfg, 1, L + 1, layers=1)
    cache.append(rows[None, :, :C], pe[None], 0)
    cache.seal(0)
    new = torch.randn(1, 1, C + R, generator=g)
    cache.append(new[..., :C], rotate(new[..., C:], torch.tensor([L]), inv_freq, cfg.rope_interleave), 0)
    q_pe = rotate(q_raw, torch.tensor([L])[None, :, None], inv_freq, cfg.rope_interleave)
    return attend_latent(q_lat, q_pe, cache.groups(q_lat, q_pe, 0, 0.2), 0.2)


@torch.no_grad()
def test_compact_positions_make_far_distance_irrelevant():
    """With compact positions, how far back the selected block lies does not change the output at all; with
    exact positions it does (rope sees the distance)."""
    compact = tiny_config(kv_quant_bits=0, kv_topk_blocks=1, kv_coarse=False, kv_compact_positions=True, **LONG)
    near, far = decode_output(compact, 2), decode_output(compact, 300)
    torch.testing.assert_close(near, far, atol=1e-5, rtol=1e-5)
    exact = tiny_config(kv_quant_bits=0, kv_topk_blocks=1, kv_coarse=False, **LONG)
    assert (decode_output(exact, 2) - decode_output(exact, 300)).abs().max() > 1e-2


@torch.no_grad()
def test_compact_reconstruct_returns_true_positions():
    cfg = tiny_config(kv_quant_bits=0, kv_compact_positions=True, **LONG)
    C, R = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    kv, pe = torch.randn(1, 90, C), torch.randn(1, 90, R)
    cache = CompressedLatentCache(cfg, 1, 90, layers=1)
    cache.append(kv, pe, 0)
    cache.seal(0)
    assert cache.store[0].n_blocks > 3
    rkv, rpe = cache.reconstruct(0)
    torch.testing.assert_close(rkv, kv)
    torch.testing.assert_close(rpe, pe, atol=1e-5, rtol=1e-5)


def test_compact_positions_flag_is_validated():
    with pytest.raises(ValueError, match=r"compression\.compact_positions"):
        tiny_config(kv_compact_positions=1)


def test_compact_view_keeps_sinks_the_needle_and_the_recent_tokens():
    cfg = small_config(**VIEW_SETTINGS)
    rng = random.Random(0)
    for trial in range(20):
        prompt, key = passkey_sample(rng, rng.randint(1024, 8192), keys=1 + trial % 3)
        spans = needle_spans(prompt)
        assert len(spans) == 1 + trial % 3
        copies = needle_spans(prompt, keys=True)
        assert len(copies) == 2 * len(spans) and all(len(bytes(prompt[a:z].tolist()).decode()) == 5 for a, z in copies)
        asked = [sp for sp in copies if bytes(prompt[sp[0] : sp[1]].tolist()).decode() == key][:1]  # as training
        view = compact_view(rng, prompt, cfg, asked, spans)
        text = bytes(view.tolist()).decode()
        assert view.numel() <= view_length(cfg)
        assert text.startswith(bytes(prompt[:64].tolist()).decode())  # the sink block
        assert key in text  # a written copy of the asked key is in a selected block
        assert text.endswith(bytes(prompt[-cfg.compression.window :].tolist()).decode())  # the window
    short, _ = passkey_sample(rng, 400)
    assert torch.equal(compact_view(rng, short, cfg, []), short)  # nothing sealed beyond the top-k: no cut


def test_compact_view_with_runs_keeps_the_needle_whole():
    cfg = small_config(**{**VIEW_SETTINGS, "kv_topk_blocks": 4, "kv_select_span": 2})
    rng = random.Random(3)
    for _ in range(20):
        prompt, key = passkey_sample(rng, rng.randint(1024, 8192))
        (span,) = needle_spans(prompt)
        text = bytes(compact_view(rng, prompt, cfg, [span]).tolist()).decode()
        assert len(text) <= view_length(cfg)
        assert bytes(prompt[span[0] : span[1]].tolist()).decode() in text  # a run covers the whole needle


def test_training_batch_with_views_fits_and_marks_the_answer():
    cfg = small_config(**VIEW_SETTINGS)
    ids, labels, pos, answer = training_batch(random.Random(1), 12, 392, 131072, keys=4, pose=0.0, view=cfg,
                                              view_frac=0.75, min_length=300)  # fmt: skip
    assert ids.shape == (12, 392) and bool((pos == torch.arange(392)).all())
    for row, lab, ans in zip(ids, labels, answer):
        text = bytes(row[lab != -100].tolist()).decode()
        digits = bytes(row[ans].tolist()).decode()
        assert digits[:5].isdigit() and digits[5] == "." and digits[:5] in text[:-7]  # a written copy is in view


def test_blind_recent_mask_hides_the_selected_blocks_from_earlier_recent_tokens_only():
    cfg = small_config(**VIEW_SETTINGS)
    T, sink, sel_end = 392, 64, 64 + 2 * 64
    ids, labels, pos, answer, mask = training_batch(random.Random(4), 6, T, 131072, pose=0.0, view=cfg, view_frac=1.0,
                                                    with_mask=True)  # fmt: skip
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for m, ans in zip(mask, answer):
        hidden = causal & ~m
        assert bool((m <= causal).all())  # never more than causal
        q, k = hidden.nonzero(as_tuple=True)
        assert q.numel() > 0 and bool((k >= sink).all() and (k < sel_end).all() and (q >= sel_end).all())
        first_digit = int(ans.nonzero()[0])
        assert bool(m[first_digit - 1 :, sink:sel_end].all())  # the last prompt token and the answer see them


def test_blind_first_layer_hides_the_selected_blocks_from_every_recent_token():
    cfg = small_config(**VIEW_SETTINGS)
    T, sink, sel_end = 392, 64, 64 + 2 * 64
    *_, answer, mask = training_batch(random.Random(5), 3, T, 131072, pose=0.0, view=cfg, view_frac=1.0,
                                      with_mask=True, blind_first_layer=True)  # fmt: skip
    assert mask.shape == (3, 2, T, T)
    for m, ans in zip(mask, answer):
        first_digit = int(ans.nonzero()[0])
        assert not bool(m[0, sel_end:, sink:sel_end].any())  # first layer: nothing after them sees them
        assert bool(m[1, first_digit - 1 :, sink:sel_end].all())  # later layers: the answer does
        assert torch.equal(m[0, :sel_end], m[1, :sel_end])  # the blocks themselves attend alike in both


def test_masked_logits_with_a_causal_mask_equal_the_model():
    from helpers import random_model

    from deepseek.train.passkey import masked_logits

    model = random_model(tiny_config(**LONG)).eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 40))
    pos = torch.arange(40)[None].expand(2, -1)
    with torch.no_grad():
        ref = model(ids, position_ids=pos).logits
        torch.testing.assert_close(masked_logits(model, ids, pos, torch.ones(2, 40, 40, dtype=torch.bool).tril()), ref)


def test_learned_training_path_refuses_compact_positions():
    from helpers import random_model

    from deepseek.model.cache import LatentQuery
    from deepseek.model.longctx.learned import compressed_pattern

    cfg = tiny_config(kv_learned=True, kv_compact_positions=True, **LONG)
    attn = random_model(cfg).model.layers[0].self_attn
    H, N, R, C = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    with pytest.raises(ValueError, match="kv_compact_positions=False"):
        query = LatentQuery(torch.zeros(1, 4, H, N), torch.zeros(1, 4, H, R), torch.zeros(H, N, C), 1.0)
        compressed_pattern(query, torch.zeros(1, 4, C), torch.zeros(1, 4, R), None, attn.nsa)


@torch.no_grad()
def test_deepen_keeps_the_function_and_adds_trainable_layers():
    """deepen(model, 4): after each of the 2 layers a copy whose output projections are zero, so the logits
    are unchanged; the copies are real layers (their input projections equal the original's)."""
    from deepseek import R1ForCausalLM
    from deepseek.train.passkey import deepen

    torch.manual_seed(0)
    model = R1ForCausalLM(small_config(first_k_dense_replace=2)).eval()
    deep = deepen(model, 4).eval()
    assert deep.config.num_hidden_layers == 4 and len(deep.model.layers) == 4
    assert [layer.self_attn.layer_idx for layer in deep.model.layers] == [0, 1, 2, 3]
    assert torch.equal(deep.model.layers[1].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)
    assert not deep.model.layers[3].mlp.down_proj.weight.any()
    ids = torch.randint(0, 256, (2, 50))
    torch.testing.assert_close(deep(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="multiple"):
        deepen(model, 3)


def test_view_training_deepens_and_saves_the_lead_layer(tmp_path):
    """passkey train --init (2 layers) --layers 4 --view --lead-layer 2: two steps run, the saved model has 4
    layers and the VIEW_SETTINGS with refresh and the lead layer in its config, and it loads."""
    from deepseek import R1ForCausalLM
    from deepseek.train.passkey import train

    torch.manual_seed(0)
    R1ForCausalLM(small_config(first_k_dense_replace=2)).save_pretrained(tmp_path / "base")
    losses = train(str(tmp_path / "deep"), steps=2, batch=2, length=392, init=str(tmp_path / "base"), layers=4,
                   view=True, pose=0.0, eval_every=0, lead_layer=2)  # fmt: skip
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    model = R1ForCausalLM.from_pretrained(tmp_path / "deep")
    c = model.config
    assert c.num_hidden_layers == 4 and c.compression.lead_layer == 2 and c.compression.refresh_recent and c.compression.select_span == 2
    assert (tmp_path / "deep" / "loss.png").exists()
    # continuing without --lead-layer keeps the saved lead layer; deepening without it drops it
    train(str(tmp_path / "cont"), steps=1, batch=2, length=392, init=str(tmp_path / "deep"), layers=4, view=True,
          pose=0.0, eval_every=0)  # fmt: skip
    assert R1ForCausalLM.from_pretrained(tmp_path / "cont").config.compression.lead_layer == 2
    train(str(tmp_path / "deeper"), steps=1, batch=2, length=392, init=str(tmp_path / "deep"), layers=8, view=True,
          pose=0.0, eval_every=0)  # fmt: skip
    assert R1ForCausalLM.from_pretrained(tmp_path / "deeper").config.compression.lead_layer is None
