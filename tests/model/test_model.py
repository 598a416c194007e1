import pytest
import torch
from helpers import random_model, tiny_config

from deepseek.generation.loop import generate
from deepseek.model.cache import LatentCache
from deepseek.model.moe import experts_grouped, experts_reference


def test_grouped_experts_match_reference_loop_values_and_grads():
    torch.manual_seed(0)
    E, D, I, N, K = 8, 32, 16, 40, 3
    x = torch.randn(N, D, requires_grad=True)
    gu = torch.randn(E, 2 * I, D, requires_grad=True)
    down = torch.randn(E, D, I, requires_grad=True)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(N)])
    idx[::4, -1] = -1  # variable k: empty slots are skipped
    w = torch.rand(N, K)
    fast = experts_grouped(x, idx, w, gu, down)
    g = torch.randn_like(fast)
    grads_fast = torch.autograd.grad((fast * g).sum(), (x, gu, down))
    ref = experts_reference(x, idx, w, gu, down)
    grads_ref = torch.autograd.grad((ref * g).sum(), (x, gu, down))
    assert torch.allclose(fast, ref, atol=1e-4)
    for a, b in zip(grads_fast, grads_ref):
        assert torch.allclose(a, b, atol=1e-3)


def reference_mla(attn, x_BTD, cos, sin, mask_BTS):
    """MLA written out once more, independently: per-head K and V from the latent, explicit softmax."""
    from deepseek.model.rope import apply_rope

    B, T, _ = x_BTD.shape
    H, N, R, V = attn.n_heads, attn.nope_dim, attn.rope_dim, attn.v_dim
    q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x_BTD))).view(B, T, H, N + R)
    q_nope, q_pe = q[..., :N], apply_rope(q[..., N:], cos, sin, attn.interleave)
    kv, pe = attn.kv_a_proj_with_mqa(x_BTD).split([attn.kv_lora_rank, R], dim=-1)
    pe = apply_rope(pe, cos, sin, attn.interleave)
    kv = attn.kv_b_proj(attn.kv_a_layernorm(kv)).view(B, T, H, N + V)
    scores = (torch.einsum("bthn,bshn->bhts", q_nope, kv[..., :N]) + torch.einsum("bthr,bsr->bhts", q_pe, pe))
    scores = (scores * attn.scale).masked_fill(~mask_BTS[:, None], float("-inf"))
    out = torch.einsum("bhts,bshv->bthv", scores.softmax(-1), kv[..., N:])
    return attn.o_proj(out.flatten(2))


def test_absorbed_and_expanded_attention_agree_with_a_reference(monkeypatch):
    """Both MLA forms are forced (and seen to run) on a padded causal mask; each equals an independent one."""
    import deepseek.model.attention as attention

    model = random_model(tiny_config())
    attn = model.model.layers[1].self_attn
    x = torch.randn(2, 7, model.config.hidden_size)
    pos = torch.arange(7)[None].expand(2, 7)
    cos, sin = model.model.rotary_emb(pos, x.dtype)
    mask = torch.ones(7, 7).tril().bool()[None].repeat(2, 1, 1)
    mask[1, :, :2] = False  # row 1: two padded keys
    mask[1, :2, :2] = torch.eye(2, dtype=torch.bool)  # a padded query still sees itself
    ran = []
    expanded, latent = attn.expanded, attention.attend_latent
    monkeypatch.setattr(attn, "expanded", lambda *a: ran.append("expanded") or expanded(*a))
    monkeypatch.setattr(attention, "attend_latent", lambda *a: ran.append("absorbed") or latent(*a))
    with torch.no_grad():
        ref = reference_mla(attn, x, cos, sin, mask)
        attn.use_absorbed = lambda T: False
        out_exp = attn(x, cos, sin, mask)
        attn.use_absorbed = lambda T: True
        out_abs = attn(x, cos, sin, mask)
    assert ran == ["expanded", "absorbed"]
    assert ref.abs().max() > 0.1
    assert (out_exp - ref).abs().max() < 1e-4
    assert (out_abs - ref).abs().max() < 1e-4


def test_grouped_kernel_is_chosen_by_device_and_dtype_and_double_runs_the_loop():
    from deepseek.model.moe import Experts, has_grouped_kernel

    assert has_grouped_kernel("cpu", torch.float32, (64, 32))
    assert not has_grouped_kernel("cpu", torch.float64, (64, 32))
    assert not has_grouped_kernel("cpu", torch.bfloat16, (4, 4))  # rows of 8 bytes: not 16-byte aligned
    model = random_model(tiny_config())
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts, Experts)
    x = torch.randn(10, model.config.hidden_size, dtype=torch.float64)
    idx = torch.randint(0, experts.num_experts, (10, 2))
    w = torch.rand(10, 2, dtype=torch.float64)
    experts64 = experts.double()
    ref = experts_reference(x, idx, w, experts64.gate_up_proj, experts64.down_proj)
    with torch.no_grad():
        assert torch.equal(experts64(x, idx, w), ref)  # float64: no grouped kernel, the loop, no exception


def test_cached_decode_equals_full_forward():
    model = random_model(tiny_config(yarn=True))
    ids = torch.randint(3, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache = LatentCache(model.config, 2, 12)
        step = [model(ids[:, :5], cache=cache).logits]
        for t in range(5, 12):
            step.append(model(ids[:, t : t + 1], cache=cache).logits)
    assert (torch.cat(step, 1) - full).abs().max() < 1e-4
    assert cache.get_seq_length() == 12
    per_token = cache.nbytes() / (model.config.num_hidden_layers * 2 * 12)
    assert per_token == 4 * (model.config.kv_lora_rank + model.config.qk_rope_head_dim)


def test_inputs_embeds_equal_input_ids():
    model = random_model(tiny_config())
    ids = torch.randint(3, model.config.vocab_size, (1, 6))
    with torch.no_grad():
        a = model(ids).logits
        b = model(inputs_embeds=model.model.embed_tokens(ids)).logits
    assert torch.equal(a, b)


def test_mtp_loss_trains_the_mtp_module():
    model = random_model(tiny_config(num_nextn_predict_layers=1)).train()
    ids = torch.randint(3, model.config.vocab_size, (2, 10))
    plain = model(ids, labels=ids, mtp_loss_weight=0.0).loss
    with_mtp = model(ids, labels=ids, mtp_loss_weight=0.3).loss
    assert with_mtp > plain  # the extra term is a positive cross-entropy
    with_mtp.backward()
    assert model.mtp[0].eh_proj.weight.grad.abs().sum() > 0
    assert model.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0  # gradients reach the router


def test_sampling_is_reproducible_with_a_seed_and_streams():
    model = random_model(tiny_config())
    ids = torch.randint(3, model.config.vocab_size, (2, 4))
    seen = []
    a = generate(model, ids, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7,
                 on_token=lambda step, tok: seen.append(tok.tolist()))  # fmt: skip
    b = generate(model, ids, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    assert torch.equal(a.sequences, b.sequences) and len(seen) == 10
    assert [s[0] for s in seen] == a.new_tokens[0]


def test_eos_stops_each_row():
    model = random_model(tiny_config())
    ids = torch.randint(3, model.config.vocab_size, (1, 4))
    first = generate(model, ids, max_new_tokens=3).new_tokens[0][1]
    out = generate(model, ids, max_new_tokens=20, eos_token_id=first)
    assert out.new_tokens[0][-1] == first and out.finish_reasons == ["stop"]


def test_bad_generate_input_is_rejected_before_work():
    model = random_model(tiny_config())
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, torch.ones(1, 3, dtype=torch.long), max_new_tokens=-1)
    with pytest.raises(ValueError, match="exceeds the context"):
        generate(model, torch.ones(1, 3, dtype=torch.long), max_new_tokens=1000)


def test_prepare_for_decode_keeps_outputs_and_saved_weights():
    from deepseek.model.layout import prepare_for_decode

    model = random_model(tiny_config())
    ids = torch.randint(3, model.config.vocab_size, (2, 6))
    with torch.no_grad():
        before = model(ids).logits
        ref_tokens = generate(model, ids, max_new_tokens=8).sequences
        prepare_for_decode(model)
        assert not model.lm_head.weight.is_contiguous()
        assert model.model.layers[1].mlp.experts.gate_up_proj.transpose(1, 2).is_contiguous()
        assert (model(ids).logits - before).abs().max() < 1e-4
    assert torch.equal(generate(model, ids, max_new_tokens=8).sequences, ref_tokens)
