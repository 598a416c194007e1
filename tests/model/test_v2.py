"""The DeepSeek-V2 family (V2, V2-Lite, V2.5, Coder-V2): softmax routing scores, greedy / group-limited greedy
selection, no correction bias. Our model and transformers' DeepseekV2ForCausalLM hold the same weights and must
agree; the checkpoints we write are V2 checkpoints transformers loads unchanged."""

import json

import pytest
import torch
from helpers import DATA, padded_batch, padded_logits, random_model, tiny_config
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

from deepseek import R1Config, R1ForCausalLM
from deepseek.generation.loop import generate

V2_ROUTING = {  # DeepSeek-V2 / V2.5 (group-limited, q-LoRA) and V2-Lite / Coder-V2-Lite (greedy, no q-LoRA)
    "v2:group_limited_greedy": dict(topk_method="group_limited_greedy"),
    "v2-lite:greedy": dict(topk_method="greedy", q_lora=False, groups=False),
}


def v2_model(name: str) -> R1ForCausalLM:
    kw = dict(V2_ROUTING[name])
    return random_model(
        tiny_config(
            q_lora=kw.pop("q_lora", True),
            groups=kw.pop("groups", True),
            scoring_func="softmax",
            norm_topk_prob=False,
            routed_scaling_factor=1.5,
            **kw,
        )
    )


def to_hf_v2(model: R1ForCausalLM, path) -> DeepseekV2ForCausalLM:
    model.save_pretrained(path)  # config.json says deepseek_v2: transformers needs nothing else
    hf, info = DeepseekV2ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                                     output_loading_info=True)  # fmt: skip
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return hf.eval()


@pytest.mark.parametrize("name", list(V2_ROUTING))
def test_v2_logits_match_transformers_on_padded_batch(name, tmp_path):
    model = v2_model(name)
    assert json.loads(model.save_pretrained(tmp_path / "ours").joinpath("config.json").read_text())["model_type"] \
        == "deepseek_v2"  # fmt: skip
    hf = to_hf_v2(model, tmp_path / "ours")
    (ours, theirs), real = padded_logits(model, hf, vocab=model.config.vocab_size)
    assert ours.abs().max() > 0.5
    assert (ours[real] - theirs[real]).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", list(V2_ROUTING))
def test_v2_greedy_generation_matches_transformers_for_32_steps(name, tmp_path):
    model = v2_model(name)
    hf = to_hf_v2(model, tmp_path)
    ids, mask = padded_batch(model.config.vocab_size, seed=1)
    ours = generate(model, ids, attention_mask=mask, max_new_tokens=32).sequences
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                         pad_token_id=2)  # fmt: skip
    assert torch.equal(ours, theirs)
    assert len(set(ours[0, 14:].tolist())) > 3


def test_transformers_v2_checkpoint_loads_in_ours(tmp_path):
    """transformers' own V2 (its config.json has no scoring_func: softmax is implied by the model type)."""
    cfg = DeepseekV2Config(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                           n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16,
                           q_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                           topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5,
                           max_position_embeddings=256, pad_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    hf = DeepseekV2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path)
    assert "scoring_func" not in json.loads((tmp_path / "config.json").read_text())
    ours = R1ForCausalLM.from_pretrained(tmp_path)
    assert ours.config.scoring_func == "softmax" and ours.config.norm_topk_prob is False
    assert ours.model.layers[1].mlp.gate.e_score_correction_bias is None
    ids, _ = padded_batch(128)
    with torch.no_grad():
        a, b = ours(ids).logits, hf(ids).logits
    assert a.abs().max() > 0.5 and (a - b).abs().max().item() < 1e-4


def test_v3_router_keeps_its_bias_and_v2_has_no_bias_key(tmp_path):
    v3 = random_model(tiny_config())
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in v3.state_dict()
    v2 = v2_model("v2-lite:greedy")
    assert not any(k.endswith("e_score_correction_bias") for k in v2.state_dict())


def test_v2_lite_on_meta_reports_published_sizes():
    """DeepSeek-V2-Lite's config.json as published: 15.7B total, 2.4B active per token."""
    raw = json.loads((DATA / "deepseek_v2_lite_config.json").read_text())
    config = R1Config(**{"scoring_func": "softmax", **{k: v for k, v in raw.items()
                                                          if k not in ("architectures", "model_type")}})  # fmt: skip
    config.build_mtp = False
    with torch.device("meta"):
        model = R1ForCausalLM(config)
        hf = DeepseekV2ForCausalLM(DeepseekV2Config(**{k: v for k, v in raw.items() if k != "architectures"}))
    total, active = model.num_parameters(), model.num_parameters(active=True)
    assert total == sum(p.numel() for p in hf.parameters())
    assert 15.6e9 < total < 15.8e9, total
    lookup = config.vocab_size * config.hidden_size  # the input embedding is a lookup, not compute
    assert 2.4e9 < active - lookup < 2.5e9, active  # "2.4B activated" (2.45B; with the lookup 2.66B)
