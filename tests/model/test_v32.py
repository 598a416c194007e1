"""DeepSeek-V3.2 (DeepSeek Sparse Attention) in our model: config.json as published, parity with transformers'
DeepseekV32ForCausalLM (same weights), round trips both ways, FP8 on load, indexer keys in the decode cache."""

import json

import helpers
import pytest
import torch
from helpers import padded_batch, padded_logits, random_model, tiny_config
from safetensors.torch import load_file, save_file
from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

from deepseek import R1Config, R1ForCausalLM
from deepseek.compat.checkpoint import dequantize_fp8, quantize_fp8
from deepseek.generation.loop import generate
from deepseek.model.cache import LatentCache, bytes_per_token

V32_JSON = helpers.DATA / "deepseek_v32_config.json"
TOPK = 6  # below the 14-token prompt: the indexer's choice matters from the first layer on
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add contention


def tiny_v32(topk: int = TOPK, **overrides) -> R1Config:
    return tiny_config(index_topk=topk, index_n_heads=4, index_head_dim=24, **overrides)


def to_transformers(model, path) -> DeepseekV32ForCausalLM:
    """Our save_pretrained folder, read by transformers as it is (our config.json, no rewritten config)."""
    model.save_pretrained(path)
    hf, info = DeepseekV32ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                                      output_loading_info=True)  # fmt: skip
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return hf.eval()


def test_published_v32_config_loads_as_is_and_saves_as_v32(tmp_path):
    (tmp_path / "config.json").write_text(V32_JSON.read_text())
    config = R1Config.from_pretrained(tmp_path)
    assert (config.indexer.topk, config.indexer.n_heads, config.indexer.head_dim) == (2048, 64, 128)
    assert config.kv_lora_rank == 512 and config.rope_parameters["factor"] == 40
    config.save_pretrained(tmp_path / "again")
    assert R1Config.from_pretrained(tmp_path / "again").indexer == config.indexer
    from deepseek.compat.checkpoint import hf_config_dict

    written = hf_config_dict(config)
    assert written["model_type"] == "deepseek_v32" and written["architectures"] == ["DeepseekV32ForCausalLM"]
    assert (written["index_topk"], written["index_n_heads"], written["index_head_dim"]) == (2048, 64, 128)
    assert "indexer" not in written
    assert DeepseekV32Config(**{k: v for k, v in written.items() if k in DeepseekV32Config.__dataclass_fields__})
    assert "index_topk" not in hf_config_dict(tiny_config())  # a V3 config.json is unchanged
    with pytest.raises(ValueError, match="q_lora_rank"):
        tiny_v32(q_lora=False)
    with pytest.raises(ValueError, match=r"indexer\.topk"):
        tiny_v32(topk=0)


def test_published_v32_on_meta_matches_transformers_count():
    raw = {k: v for k, v in json.loads(V32_JSON.read_text()).items() if k not in ("architectures", "model_type")}
    config = R1Config(**raw)
    config.build_mtp = False  # transformers builds no MTP module
    with torch.device("meta"):
        ours = R1ForCausalLM(config)
        theirs = DeepseekV32ForCausalLM(DeepseekV32Config(**raw))
    total = ours.num_parameters()
    assert total == theirs.num_parameters()  # 671,877,929,216: V3's 671.03B + 61 indexers of 13.96M
    assert 671.5e9 < total < 672.5e9, total
    active = ours.num_parameters(active=True)
    assert 37.5e9 < active < 38.5e9, active  # V3's 37.6B + the indexers, which every token runs
    config.build_mtp = True
    with torch.device("meta"):
        assert 685e9 < R1ForCausalLM(config).num_parameters() < 686e9  # published: 685B with the MTP module


def test_logits_match_transformers_on_padded_batch(tmp_path):
    model = random_model(tiny_v32(yarn=True))
    hf = to_transformers(model, tmp_path)
    dense_model = random_model(tiny_v32(topk=64, yarn=True))
    (ours, theirs, dense), real = padded_logits(model, hf, dense_model, vocab=model.config.vocab_size)
    assert ours.abs().max() > 0.5
    assert (ours[real] - theirs[real]).abs().max().item() < 1e-4  # measured 1.5e-6
    assert (ours[real] - dense[real]).abs().max().item() > 0.1  # the selection changed what was attended


def test_greedy_generation_matches_transformers_for_32_steps(tmp_path):
    model = random_model(tiny_v32())
    hf = to_transformers(model, tmp_path)
    ids, mask = padded_batch(model.config.vocab_size, seed=1)
    ours = generate(model, ids, attention_mask=mask, max_new_tokens=32).sequences  # decode: gathered top-K
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                         pad_token_id=2)  # fmt: skip
    assert torch.equal(ours, theirs)
    assert len(set(ours[0, 14:].tolist())) > 3
    # transformers' GenerationMixin driving our model: the indexer keys go to its indexed cache layers
    mixin = R1ForCausalLM.generate(model, ids, attention_mask=mask, max_new_tokens=32, min_new_tokens=32,
                                   do_sample=False, pad_token_id=2)  # fmt: skip
    assert torch.equal(mixin, ours)


def test_transformers_checkpoint_loads_in_ours(tmp_path):
    model = random_model(tiny_v32())
    hf = to_transformers(model, tmp_path / "a")
    hf.save_pretrained(tmp_path / "b")  # transformers' own config.json and key layout
    ours = R1ForCausalLM.from_pretrained(tmp_path / "b")
    assert ours.config.indexer == model.config.indexer
    ids, _ = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max() < 1e-4
        assert torch.equal(ours(ids).logits, model(ids).logits)


def test_cached_decode_equals_full_forward_and_holds_indexer_keys():
    config = tiny_v32()
    model = random_model(config)
    ids = torch.randint(3, config.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(ids).logits  # prefill form: the selection as a mask
        cache = LatentCache(config, 2, 20)
        steps = [model(ids[:, :8], cache=cache).logits]
        for t in range(8, 20):  # decode form: the K selected latents gathered per query
            steps.append(model(ids[:, t : t + 1], cache=cache).logits)
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-4
    C, R, I = config.kv_lora_rank, config.qk_rope_head_dim, config.indexer.head_dim
    assert cache.nbytes() / (config.num_hidden_layers * 2 * 20) == 4 * (C + R + I)  # fp32 here
    assert bytes_per_token(config, 4)["total"] == config.num_hidden_layers * 4 * (C + R + I)
    published = R1Config(**{k: v for k, v in json.loads(V32_JSON.read_text()).items()
                            if k not in ("architectures", "model_type")})  # fmt: skip
    assert bytes_per_token(published) == {"mla_latent": 70272, "indexer_keys": 15616, "total": 85888}  # bf16


def test_fp8_v32_checkpoint_is_dequantised_on_load(tmp_path):
    model = random_model(tiny_v32())
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    quantised = {}
    for key, t in tensors.items():  # the release's FP8 projections, the indexer's wq_b and wk among them
        if t.dim() == 2 and (key.endswith("_proj.weight") or ".indexer.w" in key) and "embed" not in key:
            quantised[key], quantised[key + "_scale_inv"] = quantize_fp8(t, block=16)
        else:
            quantised[key] = t
    save_file(quantised, tmp_path / "model.safetensors")
    loaded = R1ForCausalLM.from_pretrained(tmp_path)
    key = "model.layers.1.self_attn.indexer.wq_b.weight"
    assert torch.equal(loaded.model.layers[1].self_attn.indexer.wq_b.weight,
                       dequantize_fp8(quantised[key], quantised[key + "_scale_inv"]))  # fmt: skip
    assert 0 < (loaded.model.layers[1].self_attn.indexer.wq_b.weight - tensors[key]).norm() / tensors[key].norm() < 0.05
