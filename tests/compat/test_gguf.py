"""Our checkpoints convert to GGUF with llama.cpp's own converter (the llama-cpp-python sdist from PyPI), and
the GGUF file holds our weights: `deepseek2` architecture, MLA split the way llama.cpp reads it, stacked experts,
the selection bias, the tokenizer's pre-tokenizer named for what it is."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from helpers import ROOT

from deepseek import R1ForCausalLM


def llamacpp():
    spec = importlib.util.spec_from_file_location("bench_llamacpp", ROOT / "benchmarks" / "llamacpp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_our_tokenizer_is_named_starcoder_and_no_other_is(tmp_path):
    lc = llamacpp()
    tok = json.loads((ROOT / "deepseek" / "bundled" / "r1-tiny" / "tokenizer.json").read_text())
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    assert lc.our_pre_tokenizer(tmp_path) == "starcoder"  # individual digits + GPT-2's byte-level regex
    tok["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}  # GPT-2 alone
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    assert lc.our_pre_tokenizer(tmp_path) is None  # an unknown tokenizer still fails llama.cpp's check


def test_convert_refuses_a_folder_that_is_not_a_deepseek_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["R1ForCausalLM"]}))
    with pytest.raises(ValueError, match="save_pretrained"):
        llamacpp().convert(tmp_path, tmp_path / "x.gguf")


@pytest.mark.slow
def test_r1_tiny_converts_to_gguf_holding_our_weights(tmp_path):
    from transformers import AutoTokenizer

    lc = llamacpp()
    model = R1ForCausalLM.from_pretrained("deepseek/r1-tiny")
    model.save_pretrained(tmp_path / "ckpt")
    AutoTokenizer.from_pretrained(str(ROOT / "deepseek" / "bundled" / "r1-tiny")).save_pretrained(
        tmp_path / "ckpt"
    )
    out = lc.convert(tmp_path / "ckpt", tmp_path / "r1-tiny.gguf", "f32")
    sys.path.insert(0, str(lc.source_dir() / "gguf-py"))
    import gguf

    reader = gguf.GGUFReader(str(out))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    c = model.config
    assert meta["general.architecture"] == "deepseek2"
    assert meta["deepseek2.block_count"] == c.num_hidden_layers
    assert meta["deepseek2.expert_count"] == c.n_routed_experts
    assert meta["deepseek2.expert_used_count"] == c.num_experts_per_tok
    assert meta["deepseek2.attention.kv_lora_rank"] == c.kv_lora_rank
    assert meta["deepseek2.expert_gating_func"] == 2  # sigmoid
    assert reader.fields["tokenizer.ggml.pre"].contents() == "starcoder"

    t = {x.name: torch.from_numpy(x.data.copy()) for x in reader.tensors}
    sd = model.state_dict()
    assert torch.equal(t["token_embd.weight"], sd["model.embed_tokens.weight"])
    assert torch.equal(
        t["blk.0.attn_kv_a_mqa.weight"], sd["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    )
    layer = next(i for i in range(c.num_hidden_layers) if i >= c.first_k_dense_replace)
    gate_up = sd[f"model.layers.{layer}.mlp.experts.gate_up_proj"]  # (E, 2I, D)
    I = c.moe_intermediate_size
    assert torch.equal(t[f"blk.{layer}.ffn_gate_exps.weight"], gate_up[:, :I])
    assert torch.equal(t[f"blk.{layer}.ffn_up_exps.weight"], gate_up[:, I:])
    assert torch.equal(
        t[f"blk.{layer}.exp_probs_b.bias"], sd[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"]
    )
    # MLA's kv_b_proj is split per head into k_b (H, C, N: transposed) and v_b (H, V, C) for absorbed attention
    H, N, V = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim
    kv_b = sd["model.layers.0.self_attn.kv_b_proj.weight"].view(H, N + V, c.kv_lora_rank)
    assert torch.equal(t["blk.0.attn_k_b.weight"], kv_b[:, :N].transpose(1, 2))
    assert torch.equal(t["blk.0.attn_v_b.weight"], kv_b[:, N:])
