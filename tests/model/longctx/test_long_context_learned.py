"""Trainable NSA parts of the compressed latent cache (deepseek/model/longctx/learned.py): off changes
nothing, zero-initialised they are the training-free cache, the whole-sequence training path equals a chunked prefill
through CompressedLatentCache, gradients reach them, checkpoints carry them."""

from __future__ import annotations

import pytest
import torch
from helpers import random_model, tiny_config

from deepseek import R1Config, R1ForCausalLM
from deepseek.model.longctx import CompressedLatentCache, enable_learned, nsa_parameters

pytestmark = pytest.mark.usefixtures("one_thread")


# several sealed blocks at T=700: sinks 0..15, window 64, top-2 of up to ~38 blocks per tile
LEARNED = dict(kv_block_size=16, kv_window=64, kv_sink_blocks=1, kv_topk_blocks=2, kv_quant_bits=0,
               max_position_embeddings=1024, num_hidden_layers=2)  # fmt: skip


def learned_model(seed=0, randomise=False, **kw):
    model = random_model(tiny_config(kv_learned=True, **{**LEARNED, **kw}), seed)
    with torch.no_grad():
        for p in nsa_parameters(model):  # random_model perturbs 1-D parameters: back to the zero init
            p.zero_()
        if randomise:
            g = torch.Generator().manual_seed(seed + 1)
            for p in nsa_parameters(model):
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() < 3 else 0.05))
    return model


@torch.no_grad()
def cache_logits(model, ids, chunk):
    """Reference: chunked prefill through CompressedLatentCache, logits at every position."""
    model.eval()
    cache = CompressedLatentCache(model.config, ids.shape[0], ids.shape[1])
    outs = []
    for s in range(0, ids.shape[1], chunk):
        pos = torch.arange(s, min(s + chunk, ids.shape[1]))[None].expand(ids.shape[0], -1)
        outs.append(model(ids[:, s : s + chunk], position_ids=pos, cache=cache).logits)
    return torch.cat(outs, 1), cache


@torch.no_grad()
def training_path_logits(model, ids):
    model.train()  # kv_learned + training + no cache: compressed_attention over the whole sequence
    out = model(ids).logits
    model.eval()
    return out


def test_off_adds_no_parameters_and_zero_init_is_the_training_free_cache():
    cfg_off = tiny_config(**LEARNED)
    assert cfg_off.compression.learned is False
    off = random_model(cfg_off)
    assert not any(".nsa." in n for n, _ in off.named_parameters())
    on = learned_model()
    assert {n for n, _ in on.named_parameters() if ".nsa." not in n} == {n for n, _ in off.named_parameters()}
    on.load_state_dict(off.state_dict(), strict=False)
    ids = torch.randint(3, cfg_off.vocab_size, (1, 300))
    with torch.no_grad():
        assert torch.equal(on(ids).logits, off(ids).logits)  # eval without a cache: plain attention
    ref, cache_off = cache_logits(off, ids, 16)
    out, _ = cache_logits(on, ids, 16)
    assert cache_off.store[0].n_blocks > 4
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("randomise", [False, True])
def test_training_path_equals_chunked_prefill_through_the_cache(randomise):
    model = learned_model(randomise=randomise)
    ids = torch.randint(3, model.config.vocab_size, (2, 700))
    ref, cache = cache_logits(model, ids, model.config.compression.block_size)
    st = cache.store[0]
    assert st.n_blocks >= 30 and st.sink_filled == 16  # sinks, many sealed blocks, top-2 + coarse exercised
    out = training_path_logits(model, ids)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_training_path_with_runs_of_blocks_equals_the_cache():
    model = learned_model(randomise=True, kv_topk_blocks=4, kv_select_span=2)
    ids = torch.randint(3, model.config.vocab_size, (1, 500))
    ref, _ = cache_logits(model, ids, model.config.compression.block_size)
    torch.testing.assert_close(training_path_logits(model, ids), ref, atol=1e-5, rtol=1e-5)


def test_training_path_without_coarse_and_short_sequences():
    model = learned_model(randomise=True, kv_coarse=False, kv_sink_blocks=0)
    for T in (10, 100, 333):  # no block / a few / many, last tile partial
        ids = torch.randint(3, model.config.vocab_size, (1, T))
        ref, _ = cache_logits(model, ids, model.config.compression.block_size)
        torch.testing.assert_close(training_path_logits(model, ids), ref, atol=1e-5, rtol=1e-5)


def test_gradients_reach_the_nsa_parameters_and_the_model():
    model = learned_model(randomise=True).train()
    ids = torch.randint(3, model.config.vocab_size, (1, 300))
    loss = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:])
    loss.backward()
    attn = model.model.layers[1].self_attn
    for name in ("block_logits", "gate_weight", "gate_bias"):
        grad = getattr(attn.nsa, name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert attn.kv_b_proj.weight.grad.abs().sum() > 0
    assert attn.kv_a_proj_with_mqa.weight.grad.abs().sum() > 0


def test_checkpoint_round_trip_keeps_the_learned_parameters(tmp_path):
    model = learned_model(randomise=True)
    model.save_pretrained(tmp_path)
    loaded = R1ForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.compression.learned is True
    for (n, p), (m, q) in zip(nsa_parameters_named(model), nsa_parameters_named(loaded), strict=True):
        assert n == m and torch.equal(p, q)
    ids = torch.randint(3, model.config.vocab_size, (1, 200))
    torch.testing.assert_close(cache_logits(loaded, ids, 16)[0], cache_logits(model, ids, 16)[0])


def nsa_parameters_named(model):
    return [(n, p) for n, p in model.named_parameters() if ".nsa." in n]


def test_enable_learned_on_a_built_model_changes_nothing_until_trained():
    model = random_model(tiny_config(**LEARNED))
    ids = torch.randint(3, model.config.vocab_size, (1, 200))
    ref, _ = cache_logits(model, ids, 16)
    enable_learned(model)
    assert model.config.compression.learned and len(nsa_parameters(model)) == 3 * model.config.num_hidden_layers
    torch.testing.assert_close(cache_logits(model, ids, 16)[0], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(training_path_logits(model, ids), ref, atol=1e-5, rtol=1e-5)


def test_bad_settings_and_padded_batches_fail_clearly():
    with pytest.raises(ValueError, match=r"compression\.learned"):
        R1Config(kv_learned="yes")
    model = learned_model().train()
    ids = torch.randint(3, model.config.vocab_size, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[0, :5] = 0
    with pytest.raises(ValueError, match="padded"):
        model(ids, attention_mask=mask)
