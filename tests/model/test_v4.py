"""DeepSeek-V4 in our model (deepseek/model/v4): the published configs as they are, parity with transformers'
DeepseekV4ForCausalLM (same weights), round trips both ways, FP8 / FP4 on load, the decode cache."""

import json

import helpers
import pytest
import torch
from helpers import padded_batch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

from deepseek.compat.checkpoint import quantize_fp8
from deepseek.compat.v4 import dequantize_fp4, quantize_fp4
from deepseek.generation.loop import generate
from deepseek.model.v4.cache import V4Cache, bytes_per_token_v4
from deepseek.model.v4.config import V4Config
from deepseek.model.v4.model import V4ForCausalLM

FLASH, PRO = helpers.DATA / "deepseek_v4_flash_config.json", helpers.DATA / "deepseek_v4_pro_config.json"
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add contention


def tiny_kwargs(**overrides) -> dict:
    """One layer of each kind (window only, CSA, HCA, CSA), a hash-routed first layer, windows of 4 / 8 tokens,
    a 6-token sliding window and index_topk 2, so every branch matters on 14-24 token inputs."""
    kw = dict(vocab_size=211, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=1, head_dim=32, q_lora_rank=48, qk_rope_head_dim=8, num_experts_per_tok=2,
              n_routed_experts=8, n_shared_experts=1, compress_ratios=[0, 4, 128, 4],
              compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8}, hc_mult=4,
              hc_sinkhorn_iters=20, num_hash_layers=1, swiglu_limit=10.0, sliding_window=6, o_groups=2,
              o_lora_rank=16, index_n_heads=4, index_head_dim=16, index_topk=2, max_position_embeddings=256,
              rope_theta=10000.0, compress_rope_theta=160000.0, bos_token_id=0, eos_token_id=1, pad_token_id=2,
              rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
                            "beta_slow": 1})  # fmt: skip
    kw.update(overrides)
    return kw


def random_transformers(seed: int = 0) -> DeepseekV4ForCausalLM:
    kw = tiny_kwargs()
    kw["partial_rotary_factor"] = kw.pop("qk_rope_head_dim") / kw["head_dim"]
    torch.manual_seed(seed)
    hf = DeepseekV4ForCausalLM(DeepseekV4Config(**kw)).eval()
    with torch.no_grad():  # non-trivial routing, sinks, gates and biases
        for name, p in hf.named_parameters():
            p.normal_(0, 0.02 if "hc" in name else 0.08) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.1)
        for name, b in hf.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.stack([torch.randperm(8)[:2] for _ in range(b.shape[0])]))
            elif name.endswith("e_score_correction_bias"):
                b.uniform_(-0.05, 0.05)
    return hf


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """transformers' random model and ours read from its save_pretrained folder."""
    hf = random_transformers()
    path = tmp_path_factory.mktemp("v4") / "hf"
    hf.save_pretrained(path)
    return hf, V4ForCausalLM.from_pretrained(path)


def raw(path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in ("architectures", "model_type")}


def test_published_v4_configs_load_as_is():
    flash = V4Config(**raw(FLASH))
    assert flash.attention_types[:4] == ["sliding_attention", "sliding_attention", "compressed_sparse_attention",
                                         "heavily_compressed_attention"]  # fmt: skip
    assert len(flash.attention_types) == 43  # the 44th ratio is the MTP module's
    assert flash.moe_types[:4] == ["hash_moe"] * 3 + ["moe"] and flash.qk_rope_head_dim == 64
    assert flash.rope("compress")["factor"] == 16 and flash.rope("compress")["rope_theta"] == 160000
    assert flash.rope("compress")["attention_factor"] == 1.0 and flash.rope("main")["rope_type"] == "default"
    pro = V4Config(**raw(PRO))
    assert pro.attention_types.count("compressed_sparse_attention") == 30 and pro.o_groups == 16
    with pytest.raises(ValueError, match="num_key_value_heads"):
        V4Config(**tiny_kwargs(num_key_value_heads=2))
    from deepseek import R1Config

    with pytest.raises(ValueError, match=r"DeepSeek-V4 config; load it with deepseek\.model\.v4"):
        R1Config(**raw(FLASH))  # the V3 loader refuses it at once, naming the class that reads it


@pytest.mark.parametrize("path, published, activated", [(FLASH, 284e9, 13e9), (PRO, 1.573e12, 49e9)])
def test_published_v4_sizes_on_meta_match_transformers(path, published, activated):
    with torch.device("meta"):
        model = V4ForCausalLM(V4Config(**raw(path)))
        theirs = DeepseekV4ForCausalLM(DeepseekV4Config(**raw(path))).num_parameters()
    ours = model.num_parameters()
    assert ours == theirs  # Flash 284,332,230,231; Pro 1,572,997,179,491 (both without the MTP module)
    assert abs(ours - published) / published < 0.002
    active = model.num_parameters(active=True)  # Flash 13.8B, Pro 49.8B (published: 13B, 49B activated)
    assert activated < active < activated + 1e9, active


def test_logits_match_transformers_on_padded_batch(pair):
    hf, ours = pair
    ids, mask = padded_batch(211)
    ids = torch.cat((ids, torch.randint(3, 211, (3, 10), generator=torch.Generator().manual_seed(3))), 1)
    mask = torch.cat((mask, torch.ones(3, 10, dtype=mask.dtype)), 1)  # 24 tokens: 6 CSA / 3 HCA windows
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = ours(ids, mask, pos)
        b = hf(ids, attention_mask=mask, position_ids=pos).logits
        no_index = V4ForCausalLM(ours.config)
        no_index.load_state_dict(ours.state_dict())
        for layer in no_index.model.layers:
            compressor = layer.self_attn.compressor
            if compressor is not None and compressor.indexer is not None:
                compressor.indexer.topk = 64
        dense = no_index(ids, mask, pos)
    real = mask.bool()
    assert a.abs().max() > 0.5
    assert (a[real] - b[real]).abs().max().item() < 1e-4  # measured 1.3e-6
    assert (a[real] - dense[real]).abs().max().item() > 1e-2  # the indexer's top-2 changed what was attended


def test_greedy_generation_matches_transformers_for_32_steps(pair):
    hf, ours = pair
    ids, mask = padded_batch(211, seed=1)
    mine = generate(ours, ids, attention_mask=mask, max_new_tokens=32, cache=V4Cache(ours.config)).sequences
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                         pad_token_id=2)  # fmt: skip
    assert torch.equal(mine, theirs)
    assert len(set(mine[0, 14:].tolist())) > 3


def test_cached_decode_equals_full_forward(pair):
    _, ours = pair
    ids = torch.randint(3, 211, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = ours(ids)
        cache = V4Cache(ours.config)
        steps = [ours(ids[:, :9], cache=cache)] + [ours(ids[:, t : t + 1], cache=cache) for t in range(9, 30)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-4
    held = cache.nbytes()
    cfg = ours.config
    assert held["window"] == 4 * 2 * (cfg.sliding_window - 1) * cfg.head_dim * 4  # 4 layers x 2 rows x 5 keys, fp32
    assert held["compressed"] == 2 * (2 * (30 // 4) + 30 // 8) * cfg.head_dim * 4  # 2 CSA layers, 1 HCA layer
    assert held["indexer"] == 2 * 2 * (30 // 4) * cfg.index_head_dim * 4


def test_decode_cache_allocated_once_or_grown_gives_the_same_steps(pair):
    _, ours = pair
    ids = torch.randint(3, 211, (1, 70), generator=torch.Generator().manual_seed(3))
    out = {}
    with torch.no_grad():
        for max_len in (None, 70):
            cache = V4Cache(ours.config, max_len=max_len)
            steps = [ours(ids[:, :5], cache=cache)] + [ours(ids[:, t : t + 1], cache=cache) for t in range(5, 70)]
            out[max_len] = (torch.cat(steps, 1), cache.nbytes())
    assert torch.equal(out[None][0], out[70][0])
    cfg = ours.config
    assert out[70][1]["compressed"] == (2 * (70 // 4) + 70 // 8) * cfg.head_dim * 4  # exact: allocated once
    assert out[70][1]["compressed"] <= out[None][1]["compressed"] <= 1.25 * out[70][1]["compressed"] + 4 * cfg.head_dim * 4


def test_round_trips_both_ways(pair, tmp_path):
    hf, ours = pair
    ids = torch.randint(3, 211, (2, 24), generator=torch.Generator().manual_seed(1))
    ours.save_pretrained(tmp_path)  # the release layout: embed.weight, layers.N.attn.wq_a.weight, ...
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert {"embed.weight", "head.weight", "layers.1.attn.indexer.compressor.ape", "layers.0.ffn.gate.tid2eid",
            "layers.1.ffn.experts.7.w3.weight", "layers.2.hc_ffn_fn"} <= keys  # fmt: skip
    back, info = DeepseekV4ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        assert (back(ids).logits - ours(ids)).abs().max() < 1e-4
        assert (hf(ids).logits - ours(ids)).abs().max() < 1e-4  # transformers' own save, read by ours (fixture)
        assert torch.equal(V4ForCausalLM.from_pretrained(tmp_path)(ids), ours(ids))


def test_fp4_experts_and_fp8_projections_are_dequantised_on_load(pair, tmp_path):
    _, ours = pair
    ours.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    quantised = {}
    for key, t in tensors.items():  # as the release stores them: FP4 routed experts, FP8 attention projections
        if ".ffn.experts." in key:
            quantised[key], scale = quantize_fp4(t)
            quantised[key.removesuffix(".weight") + ".scale"] = scale.to(torch.float8_e8m0fnu)
        elif key.endswith((".wq_a.weight", ".wq_b.weight", ".wo_b.weight")) and ".indexer." not in key:
            quantised[key], scale = quantize_fp8(t, block=16)
            quantised[key.removesuffix(".weight") + ".scale"] = scale
        else:
            quantised[key] = t
    save_file(quantised, tmp_path / "model.safetensors")
    loaded = V4ForCausalLM.from_pretrained(tmp_path)
    key = "layers.1.ffn.experts.3.w1.weight"
    scale = quantised["layers.1.ffn.experts.3.w1.scale"]
    expected = dequantize_fp4(quantised[key], scale)
    got = loaded.model.layers[1].mlp.experts.gate_up_proj[3, :32]
    assert torch.equal(got, expected)
    codes = set((expected / scale.float().repeat_interleave(32, dim=-1)).flatten().tolist())
    assert codes <= {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0}  # e2m1 codes
    assert 0 < (got - tensors[key]).norm() / tensors[key].norm() < 0.2  # e2m1: 8 magnitudes, not garbage
    wq = loaded.model.layers[0].self_attn.q_a_proj.weight
    assert 0 < (wq - tensors["layers.0.attn.wq_a.weight"]).norm() / wq.norm() < 0.05


def test_bytes_per_token_of_the_published_configs():
    flash = bytes_per_token_v4(V4Config(**raw(FLASH)))
    assert flash["compressed_entries"] == 21 * 512 * 2 / 4 + 20 * 512 * 2 / 128  # 21 CSA + 20 HCA layers
    assert flash["indexer_keys"] == 21 * 128 * 2 / 4
    assert flash["per_token"] == 6880 and flash["window_fixed"] == 43 * 127 * 512 * 2
    assert bytes_per_token_v4(V4Config(**raw(PRO)))["per_token"] == 30 * 320 + 31 * 8
