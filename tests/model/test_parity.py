"""Our model and transformers' DeepseekV3ForCausalLM hold the same weights and must agree."""

import pytest
import torch
from helpers import padded_batch, padded_logits, random_model, tiny_config, to_transformers
from transformers import DeepseekV3ForCausalLM

from deepseek import R1ForCausalLM
from deepseek.generation.loop import generate

CONFIGS = {
    "q_lora+groups": dict(),
    "no_q_lora": dict(q_lora=False),
    "no_groups": dict(groups=False),
    "yarn": dict(yarn=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_on_padded_batch(name, tmp_path):
    model = random_model(tiny_config(**CONFIGS[name]))
    hf = to_transformers(model, tmp_path)
    (ours, theirs), real = padded_logits(model, hf, vocab=model.config.vocab_size)
    assert ours.abs().max() > 0.5  # logits are not trivially small
    assert (ours[real] - theirs[real]).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", ["q_lora+groups", "yarn"])
def test_greedy_generation_matches_transformers_for_32_steps(name, tmp_path):
    model = random_model(tiny_config(**CONFIGS[name]))
    hf = to_transformers(model, tmp_path)
    ids, mask = padded_batch(model.config.vocab_size, seed=1)
    ours = generate(model, ids, attention_mask=mask, max_new_tokens=32).sequences
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                         pad_token_id=2)  # fmt: skip
    assert ours.shape == theirs.shape
    assert torch.equal(ours, theirs)
    assert len(set(ours[0, 14:].tolist())) > 3  # a real continuation, not one repeated token


def test_transformers_checkpoint_loads_in_ours(tmp_path):
    model = random_model(tiny_config())
    hf = to_transformers(model, tmp_path / "a")
    hf.save_pretrained(tmp_path / "b")  # transformers writes per-expert keys and its own config
    ours = R1ForCausalLM.from_pretrained(tmp_path / "b")
    ids, _ = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, hf(ids).logits, atol=1e-4)
        assert torch.equal(ours(ids).logits, model(ids).logits)


def test_our_checkpoint_loads_in_transformers_without_missing_keys(tmp_path):
    model = random_model(tiny_config())
    to_transformers(model, tmp_path)
    _, info = DeepseekV3ForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
