"""Hierarchical latent-cache compression: exactness when nothing is dropped, bookkeeping across chunked
prefill, block selection, quantisation error bounds, memory ratios, config validation."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import random_model, tiny_config

from deepseek.generation.loop import generate, generate_long
from deepseek.model.attention import attend_latent
from deepseek.model.cache import LatentCache
from deepseek.model.longctx import CompressedLatentCache, chunked_prefill, extend_context, make_cache
from deepseek.model.longctx.quant import dequantize, dequantize_reference, quantize

pytestmark = pytest.mark.usefixtures("one_thread")


LONG = dict(kv_block_size=8, kv_window=16, kv_sink_blocks=1, max_position_embeddings=512)


def chunked_logits(model, ids, cache, chunk):
    outs = []
    for s in range(0, ids.shape[1], chunk):
        pos = torch.arange(s, min(s + chunk, ids.shape[1]))[None].expand(ids.shape[0], -1)
        outs.append(model(ids[:, s : s + chunk], position_ids=pos, cache=cache).logits)
    return torch.cat(outs, 1)


# ---------------------------------------------------------------------- exactness
@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("chunk", [1, 13, 64])
@torch.no_grad()
def test_lossless_settings_equal_full_attention(chunk, compact):
    """bits=0 and top-k >= #blocks: every position attended once at full precision -> same logits. With
    compact positions every block then sits in its own slot, which is its true position."""
    cfg = tiny_config(kv_quant_bits=0, kv_topk_blocks=1000, kv_compact_positions=compact, **LONG)
    model = random_model(cfg)
    ids = torch.randint(3, cfg.vocab_size, (2, 150))
    full = model(ids).logits
    cache = CompressedLatentCache(cfg, 2, 160)
    comp = chunked_logits(model, ids, cache, chunk)
    assert cache.store[0].n_blocks == (150 - 16) // 8 - 1  # sealed blocks exist: the path was exercised
    torch.testing.assert_close(comp, full, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_compression_off_is_the_plain_cache_and_generate():
    cfg = tiny_config(**LONG)
    assert not cfg.compression.enabled
    model = random_model(cfg)
    assert type(make_cache(cfg, 1, 64)) is LatentCache
    ids = torch.randint(3, cfg.vocab_size, (1, 40))
    ref = generate(model, ids, max_new_tokens=6).sequences[:, 40:]
    out = generate_long(model, ids, max_new_tokens=6, chunk=16)
    assert torch.equal(out.tokens, ref)
    cfg_on = tiny_config(kv_compress=True, **LONG)
    assert type(make_cache(cfg_on, 1, 64)) is CompressedLatentCache


def attention_error(cfg, q_lat, q_pe, kv, pe, scale):
    """Relative error of the compressed attention output against exact attention over the same latent."""
    cache = CompressedLatentCache(cfg, 1, kv.shape[1], layers=1)
    cache.append(kv, pe, 0)
    cache.seal(0)
    out = attend_latent(q_lat, q_pe, cache.groups(q_lat, q_pe, 0, scale), scale)
    s = (torch.einsum("bthc,bsc->bhts", q_lat, kv) + torch.einsum("bthr,bsr->bhts", q_pe, pe)) * scale
    ref = torch.einsum("bhts,bsc->bthc", s.softmax(-1), kv)
    return ((out - ref).norm() / ref.norm()).item()


def test_quantised_and_selected_attention_stays_close_to_exact():
    """A query that attends sharply to one old block (a 'passkey') and diffusely elsewhere: 4-bit blocks
    with top-2 selection stay within the 4-bit quantisation error of exact attention."""
    torch.manual_seed(0)
    cfg = tiny_config(kv_quant_bits=4, kv_topk_blocks=2, **LONG)
    C, R, H = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.num_attention_heads
    S = 400
    kv, pe = torch.randn(1, S, C), torch.randn(1, S, R)
    q_lat = torch.randn(1, 1, H, C) * 0.05
    q_lat[:, :, 0] += kv[0, 200] * 2  # head 0 looks for position 200 (sealed block 24)
    q_pe = torch.randn(1, 1, H, R) * 0.05
    scale = C**-0.5
    every_block = tiny_config(kv_quant_bits=4, kv_topk_blocks=1000, **LONG)
    err_4bit_all = attention_error(every_block, q_lat, q_pe, kv, pe, scale)
    err_selected = attention_error(cfg, q_lat, q_pe, kv, pe, scale)
    assert err_4bit_all < 0.12  # 4-bit, groups of 16 on gaussian latents: ~0.07 sigma RMS per element
    assert err_selected < 0.15  # 2 of 46 blocks read in full: the needle's block is among them


# ---------------------------------------------------------------------- bookkeeping
@pytest.mark.parametrize("chunk", [1, 7, 50])
@torch.no_grad()
def test_no_position_lost_or_duplicated_across_chunked_prefill(chunk):
    cfg = tiny_config(kv_quant_bits=0, **LONG)
    model = random_model(cfg)
    ids = torch.randint(3, cfg.vocab_size, (1, 131))
    plain = LatentCache(cfg, 1, 140)
    comp = CompressedLatentCache(cfg, 1, 140)
    chunked_prefill(model, ids, plain, chunk=chunk)
    chunked_prefill(model, ids, comp, chunk=chunk)
    for layer in range(cfg.num_hidden_layers):
        st = comp.store[layer]
        # the three regions partition 0..L-1: sinks, sealed blocks, recent
        assert st.sink_filled + st.n_blocks * cfg.compression.block_size == st.recent_start
        assert st.length == 131
        kv, pe = comp.reconstruct(layer)
        assert kv.shape[1] == 131
        if layer == 0:  # layer 0's latent does not depend on attention: must match position by position
            torch.testing.assert_close(kv, plain.kv[0, :, :131], atol=0, rtol=0)
            torch.testing.assert_close(pe, plain.pe[0, :, :131], atol=0, rtol=0)


@torch.no_grad()
def test_window_and_current_block_always_full_precision_during_decode():
    cfg = tiny_config(kv_topk_blocks=1, **LONG)
    cache = CompressedLatentCache(cfg, 1, 300, layers=1)
    b, w = cfg.compression.block_size, cfg.compression.window
    for L in range(1, 300):
        cache.append(torch.randn(1, 1, cfg.kv_lora_rank), torch.randn(1, 1, cfg.qk_rope_head_dim), 0)
        st = cache.store[0]
        assert st.recent_start <= max(0, L - w)  # the whole window (and the current block) is in recent
        cache.seal(0)
        assert st.length - st.recent_start < w + b  # and nothing older than window + one block stays there
        if L >= cfg.compression.sink_blocks * b + w + b:
            assert st.sink_filled == cfg.compression.sink_blocks * b


def test_selection_finds_the_block_that_matches_the_query():
    cfg = tiny_config(kv_quant_bits=4, kv_topk_blocks=2, **LONG)
    C, R = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    cache = CompressedLatentCache(cfg, 1, 400, layers=1)
    torch.manual_seed(0)
    kv, pe = torch.randn(1, 400, C) * 0.1, torch.randn(1, 400, R) * 0.1
    direction = torch.randn(C)
    needle = 123  # in sealed block (123 - 8) // 8 = 14
    kv[0, needle] = direction * 3
    cache.append(kv, pe, 0)
    cache.seal(0)
    q = torch.cat((direction, torch.zeros(R)))[None, None, None, None].expand(1, 1, 1, cfg.num_attention_heads, -1)
    idx = cache.select_blocks(q, 0, scale=1.0)
    assert (needle - cfg.compression.sink_blocks * cfg.compression.block_size) // cfg.compression.block_size in idx.flatten().tolist()


def test_top_runs_reads_disjoint_runs_of_consecutive_blocks():
    from deepseek.model.longctx.learned import top_runs

    imp = torch.rand(2, 3, 40)
    assert torch.equal(top_runs(imp, 5, 1).sort(-1).values, imp.topk(5).indices.sort(-1).values)  # span 1: top-k
    imp = torch.zeros(1, 1, 12)
    imp[0, 0, [3, 4, 9, 10]] = torch.tensor([5.0, 4.0, 3.0, 0.5])
    assert top_runs(imp, 4, 2).sort(-1).values.tolist() == [[[3, 4, 9, 10]]]
    imp[0, 0, [7, 8]] = torch.tensor([4.5, 0.2])  # runs (3, 4), (7, 8) beat (9, 10); top-4 would take 3, 4, 7, 9
    assert top_runs(imp, 4, 2).sort(-1).values.tolist() == [[[3, 4, 7, 8]]]
    for n in (4, 5, 7):  # few blocks: distinct indices, as many as fit, a whole run around the best block
        imp = torch.rand(2, 1, n)
        idx = top_runs(imp, 4, 2)
        assert all(len(set(row.tolist())) == 4 for row in idx.view(-1, 4))
    masked = torch.tensor([[[1.0, 2.0, 0.5, float("-inf"), float("-inf")]]])
    assert top_runs(masked, 2, 2).sort(-1).values.tolist() == [[[0, 1]]]  # never a run into masked blocks


def test_selection_with_runs_reads_the_needle_block_and_its_neighbour():
    cfg = tiny_config(kv_quant_bits=0, kv_topk_blocks=2, kv_select_span=2, **LONG)
    C, R = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    cache = CompressedLatentCache(cfg, 1, 400, layers=1)
    torch.manual_seed(0)
    kv, pe = torch.randn(1, 400, C) * 0.1, torch.randn(1, 400, R) * 0.1
    direction = torch.randn(C)
    kv[0, 123] = direction * 3  # sealed block 14; one run of two: 13-14 or 14-15
    cache.append(kv, pe, 0)
    cache.seal(0)
    q = torch.cat((direction, torch.zeros(R)))[None, None, None, None].expand(1, 1, 1, cfg.num_attention_heads, -1)
    idx = sorted(cache.select_blocks(q, 0, scale=1.0).flatten().tolist())
    assert 14 in idx and idx[1] - idx[0] == 1
    with pytest.raises(ValueError, match=r"compression\.select_span=3 must divide topk_blocks=2"):
        tiny_config(kv_topk_blocks=2, kv_select_span=3)


# ---------------------------------------------------------------------- quantisation
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantise_error_bound_and_packing(bits):
    torch.manual_seed(bits)
    x = torch.randn(3, 5, 64) * torch.linspace(0.1, 4, 64)  # groups with very different ranges
    q = quantize(x, bits, group=16)
    assert q.packed.dtype == torch.uint8 and q.packed.shape == (3, 5, 64 * bits // 8)
    y = dequantize(q)
    step = q.step.float().repeat_interleave(16, -1)
    slack = 1e-3 * x.abs().amax()  # fp16 rounding of the stored minimum and step
    assert bool(((x - y).abs() <= step / 2 + slack).all())
    torch.testing.assert_close(y, dequantize_reference(q), atol=1e-6, rtol=0)
    # 4 bits on gaussian data: relative RMS error ~ range / 15 / sqrt(12) / std
    rel = ((x - y).pow(2).mean() / x.pow(2).mean()).sqrt().item()
    assert rel < {2: 0.5, 4: 0.12, 8: 0.01}[bits]


def test_quantise_rejects_bad_arguments():
    with pytest.raises(ValueError, match="bits must be"):
        quantize(torch.randn(4, 16), 3, 16)
    with pytest.raises(ValueError, match="must divide"):
        quantize(torch.randn(4, 24), 4, 16)


# ---------------------------------------------------------------------- memory
def test_memory_ratio_against_the_full_latent_cache():
    """DeepSeek-V3 latent widths (C=512, R=64), one layer, 16K positions, fp32."""
    cfg = tiny_config(kv_lora_rank=512, qk_rope_head_dim=64, num_hidden_layers=1, first_k_dense_replace=1)
    S = 16384
    full = LatentCache(cfg, 1, S, layers=1).nbytes()
    mem = CompressedLatentCache(cfg, 1, S, layers=1).memory()
    per_token = (512 + 64) * (4 / 8) + (512 + 64) / 64 * 2 * 2  # packed nibbles + fp16 step/low per group
    assert mem["payload"] == pytest.approx(per_token * (S - cfg.compression.block_size), rel=0.01)
    assert (mem["payload"] + mem["summaries"]) / full < 0.2  # per old token: 4-bit + fp16 scales + summaries
    assert mem["total"] / full < 0.3  # + the fixed full-precision window/staging buffer (1664 of 16K tokens)
    offload = tiny_config(kv_lora_rank=512, qk_rope_head_dim=64, num_hidden_layers=1, kv_offload=True)
    mem = CompressedLatentCache(offload, 1, S, layers=1).memory()
    assert mem["device"] / full < 0.2 and mem["host"] == mem["payload"]


# ---------------------------------------------------------------------- errors and config
def test_bad_settings_and_inputs_fail_clearly():
    with pytest.raises(ValueError, match=r"compression\.quant_bits"):
        tiny_config(kv_quant_bits=3)
    with pytest.raises(ValueError, match=r"compression\.block_size"):
        tiny_config(kv_block_size=0)
    with pytest.raises(ValueError, match=r"compression\.quant_group"):
        tiny_config(kv_quant_group=24)
    cfg = tiny_config(**LONG)
    model = random_model(cfg)
    cache = CompressedLatentCache(cfg, 1, 20)
    with pytest.raises(ValueError, match="cache holds 20"):
        chunked_prefill(model, torch.ones(1, 30, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="padded"):
        model(torch.ones(2, 5, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1, 1, 1]] * 2),
              cache=CompressedLatentCache(cfg, 2, 20))  # fmt: skip


def test_extend_context_sets_yarn():
    cfg = tiny_config(max_position_embeddings=128)
    model = random_model(cfg)
    before = model.model.rotary_emb.inv_freq.clone()
    extend_context(model, 1024)
    rope = model.config.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["factor"] == 8.0 and rope["original_max_position_embeddings"] == 128
    after = model.model.rotary_emb.inv_freq
    assert torch.equal(after[0], before[0])  # highest frequency kept
    assert math.isclose(after[-1].item(), before[-1].item() / 8, rel_tol=1e-5)  # lowest interpolated


# ---------------------------------------------------------------------- passkey data
def test_passkey_prompts_and_pose_batches():
    import random

    from deepseek.eval.passkey import ANSWER_PREFIX, passkey_sample
    from deepseek.train.passkey import training_batch

    rng = random.Random(0)
    for n in (400, 5000):
        ids, key = passkey_sample(rng, n)
        text = bytes(ids.tolist()).decode()
        assert ids.numel() <= n and text.endswith(ANSWER_PREFIX) and f"The pass key is {key}." in text
        assert len(key) == 5 and key.isdigit()
    ids, labels, pos, answer = training_batch(rng, 16, 400, max_position=131072)
    assert ids.shape == labels.shape == pos.shape == answer.shape == (16, 400)
    assert bool((pos[:, 1:] > pos[:, :-1]).all())  # strictly increasing positions, one gap per row
    assert int(pos.max()) < 131072 and int((pos[:, -1] - pos[:, 0]).max()) > 10000  # long distances are seen
    for row, lab in zip(ids, labels):
        text = bytes(row[lab != -100].tolist()).decode()
        assert text.endswith(".") and text.rstrip(".")[-5:].isdigit()  # the answer ends the labelled part
    for row, ans in zip(ids, answer):
        assert int(ans.sum()) == 6 and bytes(row[ans].tolist()).decode()[:5].isdigit()  # 5 key digits + "."
    _, _, pos, _ = training_batch(rng, 8, 400, max_position=131072, pose=0.0)
    assert bool((pos == torch.arange(400)).all())  # pose=0: plain positions
    _, _, pos, _ = training_batch(rng, 16, 400, max_position=131072, pose=1.0, max_gap=100)
    spans = pos[:, -1] - pos[:, 0]
    assert int(spans.max()) <= 399 + 100 and int(spans.max()) > 399  # the curriculum caps the gap


def test_passkey_with_the_bundled_bpe_tokenizer():
    import random

    from deepseek.eval.passkey import ANSWER_PREFIX, load_tokenizer, passkey_sample
    from deepseek.train.passkey import training_batch

    tok = load_tokenizer("deepseek/r1-tiny")
    ids, key = passkey_sample(random.Random(1), 3000, tok=tok)
    text = tok.decode(ids.tolist())
    assert abs(ids.numel() - 3000) <= 8 and text.endswith(ANSWER_PREFIX) and f"The pass key is {key}." in text
    assert len(text) > 2 * ids.numel()  # BPE: several bytes per token
    ids, labels, pos, answer = training_batch(random.Random(2), 4, 384, 131072, tok=tok, min_length=128)
    for row, ans in zip(ids, answer):
        assert len(tok.decode(row[ans].tolist())) == 6  # one token per digit + "."


@torch.no_grad()
def test_long_perplexity_lossless_equal_and_quantised_close():
    from deepseek.eval.passkey import essay_ids, long_perplexity

    lossless = tiny_config(vocab_size=256, kv_quant_bits=0, kv_topk_blocks=1000, **LONG)
    model = random_model(lossless)
    ids = essay_ids(300)
    full = long_perplexity(model, ids, compressed=False, chunk=64, skip=40)
    assert long_perplexity(model, ids, compressed=True, chunk=64, skip=40) == pytest.approx(full, rel=1e-4)
    model.config.compression.quant_bits, model.config.compression.topk_blocks = 4, 4
    comp = long_perplexity(model, ids, compressed=True, chunk=64, skip=40)
    assert comp != full and abs(math.log(comp / full)) < 0.5  # a random model: only a loose sanity bound
