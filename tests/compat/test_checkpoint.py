import json

import pytest
import torch
from helpers import random_model, tiny_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from deepseek import R1ForCausalLM
from deepseek.compat.checkpoint import dequantize_fp8, quantize_fp8


def logits(model, seed=0):
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def test_save_writes_deepseek_layout_and_reloads_exactly(tmp_path):
    model = random_model(tiny_config(num_nextn_predict_layers=1))
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    L = model.config.num_hidden_layers
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in keys
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in keys
    assert f"model.layers.{L}.eh_proj.weight" in keys and f"model.layers.{L}.shared_head.head.weight" in keys
    assert f"model.layers.{L}.mlp.experts.0.down_proj.weight" in keys  # MTP's own MoE block
    assert not any("gate_up_proj" in k for k in keys)
    again = R1ForCausalLM.from_pretrained(tmp_path)
    assert len(again.mtp) == 1
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    assert torch.equal(logits(model), logits(again))


def test_sharded_save_has_index_and_loads(tmp_path):
    model = random_model(tiny_config())
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert torch.equal(logits(model), logits(R1ForCausalLM.from_pretrained(tmp_path)))


def test_fp8_block_quantised_checkpoint_is_dequantised_on_load(tmp_path):
    model = random_model(tiny_config())
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    quantised = {}
    for key, t in tensors.items():  # quantise projections as DeepSeek's release does (128x128 blocks)
        if t.dim() == 2 and key.endswith("_proj.weight") and "embed" not in key:
            q, scale = quantize_fp8(t, block=16)
            quantised[key], quantised[key + "_scale_inv"] = q, scale
        else:
            quantised[key] = t
    save_file(quantised, tmp_path / "model.safetensors")
    loaded = R1ForCausalLM.from_pretrained(tmp_path)
    w = loaded.model.layers[0].self_attn.q_b_proj.weight
    key = "model.layers.0.self_attn.q_b_proj.weight"
    assert torch.equal(w, dequantize_fp8(quantised[key], quantised[key + "_scale_inv"]))
    rel = (w - tensors[key]).norm() / tensors[key].norm()
    assert 0 < rel < 0.05  # e4m3 rounding, not garbage
    stacked = loaded.model.layers[1].mlp.experts.gate_up_proj[3, :32]
    q = "model.layers.1.mlp.experts.3.gate_proj.weight"
    assert torch.equal(stacked, dequantize_fp8(quantised[q], quantised[q + "_scale_inv"]))


def test_missing_key_is_named(tmp_path):
    random_model(tiny_config()).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks weights for: model\.layers\.2\.mlp\.experts\.gate_up_proj"):
        R1ForCausalLM.from_pretrained(tmp_path)


def test_unexpected_key_and_shape_mismatch_are_named(tmp_path):
    random_model(tiny_config()).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    save_file({**tensors, "model.layers.0.self_attn.extra.weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected keys .*self_attn\.extra\.weight"):
        R1ForCausalLM.from_pretrained(tmp_path)
    tensors["model.norm.weight"] = torch.ones(7)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"shape mismatch for model\.norm\.weight: checkpoint \(7,\)"):
        R1ForCausalLM.from_pretrained(tmp_path)


def test_truncated_file_is_a_clear_error(tmp_path):
    random_model(tiny_config()).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        R1ForCausalLM.from_pretrained(tmp_path)


def test_unknown_name_lists_bundled_models(tmp_path):
    with pytest.raises(FileNotFoundError, match="not bundled"):
        R1ForCausalLM.from_pretrained("deepseek/no-such-model")


def test_save_leaves_no_temporary_files(tmp_path):
    random_model(tiny_config()).save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


def test_saved_checkpoint_loads_in_transformers_in_a_process_that_never_imports_us(tmp_path):
    """save_pretrained writes DeepSeek-V3's own config (model_type deepseek_v3): transformers' Auto classes load
    it unchanged, no weight missing (the MTP layer is reported unexpected, as for DeepSeek-V3's own release)."""
    import json
    import subprocess
    import sys

    from deepseek import R1Model

    model = R1Model.from_pretrained("deepseek/r1-tiny")
    model.save_pretrained(tmp_path)
    ids = [[0, 5, 17, 33, 99, 120, 7]]
    with torch.no_grad():
        ours = model(torch.tensor(ids)).logits[0, -1]
    code = f"""
import json, sys, torch
from transformers import AutoModelForCausalLM
m, info = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, output_loading_info=True, dtype=torch.float32)
with torch.no_grad():
    logits = m(torch.tensor({ids})).logits[0, -1].tolist()
print(json.dumps({{"class": type(m).__name__, "missing": sorted(info["missing_keys"]),
                  "unexpected": sorted(info["unexpected_keys"]), "logits": logits,
                  "imported_us": "deepseek" in sys.modules}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["class"] == "DeepseekV3ForCausalLM" and not got["imported_us"]
    assert got["missing"] == []
    mtp = f"model.layers.{model.config.num_hidden_layers}."
    assert got["unexpected"] and all(k.startswith(mtp) for k in got["unexpected"])
    assert (torch.tensor(got["logits"]) - ours).abs().max() < 1e-4
    again = R1Model.from_pretrained(tmp_path)  # and ours reads it back, with its own settings
    assert again.config.routing == model.config.routing and again.config.compression == model.config.compression
