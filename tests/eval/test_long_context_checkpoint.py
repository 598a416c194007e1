"""The compressed cache on a trained checkpoint whose full cache retrieves (the bundled r1-tiny, passkey prompts
inside its training range): what compression itself changes, with the cache scaled down so most of a short
prompt sits in sealed blocks (benchmarks/compression_fidelity.py measures the same at more prompts)."""

from __future__ import annotations

import math

import pytest
import torch

from deepseek.chat import chat_prompt_ids
from deepseek.eval.passkey import long_perplexity
from deepseek.generation.loop import generate_long
from deepseek.loading import load_model_and_tokenizer
from deepseek.model.config import FLAT_COMPRESSION
from deepseek.tasks import get_task

SCALED = dict(kv_block_size=16, kv_window=16, kv_sink_blocks=1, prefill_chunk=16, kv_quant_group=64, kv_coarse=True,
              kv_select_span=2, kv_compact_positions=False, kv_refresh_recent=False)  # fmt: skip


@pytest.fixture(scope="module")
def r1_tiny():
    return load_model_and_tokenizer("deepseek/r1-tiny")


def answers(model, tok, examples, settings):
    if settings is not None:
        model.config.set_components(**{**SCALED, **settings})
    out = []
    for ex in examples:
        ids = torch.tensor([chat_prompt_ids(tok, ex)])
        gen = generate_long(model, ids, max_new_tokens=80, compressed=settings is not None, stop_ids=(tok.eos_token_id,))
        out.append(tok.decode(gen.tokens[0], skip_special_tokens=True))
    return out


def test_r1_tiny_retrieves_through_the_compressed_cache_as_through_the_full_one(r1_tiny, one_thread):
    model, tok = r1_tiny
    task = get_task("passkey")
    examples = task.generate(6, seed=777, difficulty=128)  # 164-token prompts: ~7 sealed 16-token blocks
    assert len(chat_prompt_ids(tok, examples[0])) > 150
    full = answers(model, tok, examples, None)
    hits = [task.grade(ex, a) == 1.0 for ex, a in zip(examples, full)]
    assert sum(hits) >= 4  # the full cache retrieves (r1-tiny trained on ~100-token passkeys: 18/20 here)
    examples = [ex for ex, h in zip(examples, hits) if h]
    full = [a for a, h in zip(full, hits) if h]
    assert answers(model, tok, examples, dict(kv_topk_blocks=64, kv_quant_bits=0)) == full  # lossless: same text
    all4 = answers(model, tok, examples, dict(kv_topk_blocks=64, kv_quant_bits=4))  # every block read, 4-bit
    assert all(task.grade(ex, a) == 1.0 for ex, a in zip(examples, all4))
    top6 = answers(model, tok, examples, dict(kv_topk_blocks=6, kv_quant_bits=4))  # 6 of ~7-9 blocks, 4-bit
    assert sum(task.grade(ex, a) == 1.0 for ex, a in zip(examples, top6)) >= len(examples) - 1


def test_r1_tiny_perplexity_compressed_close_to_full(r1_tiny, one_thread):
    model, tok = r1_tiny
    ex = get_task("multiplication").generate(1, seed=777, difficulty=2)[0]
    ids = torch.tensor(tok(tok.apply_chat_template(ex["messages"], tokenize=False), add_special_tokens=False)["input_ids"])
    assert ids.numel() > 250
    full = long_perplexity(model, ids, False, chunk=16, skip=48)
    model.config.set_components(**{**SCALED, "kv_topk_blocks": 64, "kv_quant_bits": 0})
    assert math.isclose(long_perplexity(model, ids, True, chunk=16, skip=48), full, rel_tol=1e-4)
    model.config.compression.topk_blocks, model.config.compression.quant_bits = 6, 4
    top6 = long_perplexity(model, ids, True, chunk=16, skip=48)
    model.config.compression.topk_blocks = 1
    top1 = long_perplexity(model, ids, True, chunk=16, skip=48)
    assert abs(math.log(top6 / full)) < 0.1  # within 10% of the full cache
    assert top1 > top6  # reading fewer blocks at full resolution costs perplexity


def test_bundled_passkey_model_retrieves_at_4k_through_the_compressed_cache(one_thread):
    from deepseek import R1ForCausalLM
    from deepseek.eval.passkey import model_tokenizer, passkey_trial
    from deepseek.train.passkey import VIEW_SETTINGS

    model = R1ForCausalLM.from_pretrained("deepseek/passkey-128k").eval()
    config = model.config
    assert config.prefill_chunk == VIEW_SETTINGS["prefill_chunk"]
    assert all(getattr(config.compression, FLAT_COMPRESSION[k]) == v for k, v in VIEW_SETTINGS.items()
               if k not in ("kv_topk_blocks", "prefill_chunk"))  # fmt: skip
    assert config.compression.lead_layer is not None and config.num_hidden_layers == 4
    tok = model_tokenizer("deepseek/passkey-128k")  # bytes: the model has no tokenizer.json
    trials = [passkey_trial(model, 4096, True, f"test-{i}", tok=tok) for i in range(3)]
    assert all(t["hit"] for t in trials), trials  # 64 sealed blocks, 2 read: the needle's run is found
    assert all(t["selected"] is True for t in trials), trials  # the lead layer read a written copy of the key


def test_selected_key_says_whether_the_lead_layer_read_the_asked_key(one_thread):
    import random

    from deepseek import R1ForCausalLM
    from deepseek.eval.passkey import BYTES, needle_spans, passkey_sample, selected_key
    from deepseek.model.longctx.prefill import chunked_prefill, make_cache

    model = R1ForCausalLM.from_pretrained("deepseek/passkey-128k").eval()
    prompt, key = passkey_sample(random.Random("sel-3"), 3000, 1, BYTES, "licenses")
    cache = make_cache(model.config, 1, prompt.numel() + 8, compressed=True)
    chunked_prefill(model, prompt[None], cache)
    (a, z), _ = needle_spans(prompt, BYTES, keys=True)
    b, sink = cache.block, cache.sink_len
    home = [(p - sink) // b for p in range(a, z)]  # the blocks holding the first written copy
    assert (a - sink) // b < cache.store[cache.lead].n_blocks - 4
    cache.lead_idx = torch.tensor([[sorted(set(home))]])
    assert selected_key(prompt, key, cache, BYTES) is True
    far = [j for j in range(cache.store[cache.lead].n_blocks) if abs(j - home[0]) > 3][:2]
    cache.lead_idx = torch.tensor([[far]])
    assert selected_key(prompt, key, cache, BYTES) is False


def test_bundled_longdoc_model_finds_the_key_in_held_out_prose(one_thread):
    from deepseek import R1ForCausalLM
    from deepseek.compat.checkpoint import resolve
    from deepseek.eval.passkey import BYTES, passkey_trial
    from deepseek.tasks.corpus import HELD_OUT

    model = R1ForCausalLM.from_pretrained("deepseek/longdoc-128k").eval()
    assert model.config.compression.lead_layer == 1 and model.config.compression.topk_blocks == 4
    assert not (resolve("deepseek/longdoc-128k") / "tokenizer.json").exists()  # bytes
    trials = [passkey_trial(model, 6000, True, f"bundled-{i}", 1, BYTES, HELD_OUT) for i in range(4)]
    assert all(t["selected"] is True for t in trials), trials  # selection training: the needle's run is chosen
    assert sum(t["hit"] for t in trials) >= 3, trials
