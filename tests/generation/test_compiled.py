"""The compiled decode step (deepseek/generation/compiled.py): torch.compile of the model's own one-token forward
over a static-shape view of the latent cache gives the eager step's tokens and logits."""

import pytest
import torch
from helpers import padded_batch, random_model, tiny_config

from deepseek import R1Model
from deepseek.generation.compiled import StepCache, cache_positions, decoder_for, pays_off
from deepseek.generation.loop import decode_one_token, generate, prefill
from deepseek.model.cache import LatentCache
from deepseek.model.longctx.cache import CompressedLatentCache
from deepseek.model.moe import experts_gathered, experts_reference, grouped_experts

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(num_nextn_predict_layers=1), cls=R1Model)  # the SDK class: one set of graphs


def test_gathered_experts_equal_the_reference_loop_with_empty_slots():
    torch.manual_seed(0)
    E, D, I = 8, 16, 12
    gu, down = torch.randn(E, 2 * I, D), torch.randn(E, D, I)
    x = torch.randn(3, D)
    idx = torch.tensor([[5, 1], [2, -1], [-1, -1]])  # -1: an empty slot (adaptive routing)
    w = torch.rand(3, 2)
    torch.testing.assert_close(experts_gathered(x, idx, w, gu, down), experts_reference(x, idx, w, gu, down))


def test_grouped_experts_op_has_a_consistent_fake_kernel():
    torch.manual_seed(0)
    x, idx, w = torch.randn(6, 16), torch.randint(0, 8, (6, 2)), torch.rand(6, 2)
    torch.library.opcheck(grouped_experts, (x, idx, w, torch.randn(8, 24, 16), torch.randn(8, 16, 12)),
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip


def test_cache_positions_are_power_of_two_buckets():
    assert [cache_positions(n) for n in (1, 256, 257, 1000, 1024, 1025)] == [256, 256, 512, 1024, 1024, 2048]


@torch.inference_mode()
def test_step_logits_equal_the_eager_step(model):
    ids, mask = padded_batch(model.config.vocab_size)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    caches = [LatentCache(model.config, 3, 256) for _ in range(2)]  # 256: the graph the next test uses too
    for c in caches:
        prefill(model, ids, mask, pos, c)
    valid = torch.zeros(3, 256, dtype=torch.bool)
    valid[:, :14] = mask.bool()
    tok, position, full_mask = ids[:, -1], pos[:, -1], mask
    for _ in range(3):  # a few steps: the cache each path writes must keep agreeing
        position = position + 1
        full_mask = torch.cat((full_mask, full_mask.new_ones(3, 1)), dim=1)
        ref = decode_one_token(model, tok, full_mask, position, caches[0])
        got = decoder_for(model).step(tok, position, caches[1], valid)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        tok = ref.argmax(-1)
    assert caches[1].get_seq_length() == caches[0].get_seq_length() == 17
    torch.testing.assert_close(caches[1].kv[:, :, :17], caches[0].kv[:, :, :17], rtol=1e-4, atol=1e-5)


def test_greedy_tokens_equal_eager_batch_one_and_padded_batch(model):
    ids, mask = padded_batch(model.config.vocab_size)
    for a, m in ((ids[:1], mask[:1]), (ids, mask)):  # batch 1: gathered experts; batch 3: the grouped op
        eager = generate(model, a, m, max_new_tokens=12, eos_token_id=1)
        compiled = generate(model, a, m, max_new_tokens=12, eos_token_id=1, compile=True)
        assert compiled.new_tokens == eager.new_tokens and compiled.finish_reasons == eager.finish_reasons
        assert torch.equal(compiled.sequences, eager.sequences)
        assert compiled.stats["compiled"] and not eager.stats["compiled"]
        assert compiled.stats["compile_seconds"] > 0 or a.shape[0] > 1  # batch 3's graph: the previous test's
        assert compiled.cache.max_len == 256 and compiled.cache.get_seq_length() == a.shape[1] + 11
    # the transformers-style call a user makes takes the same path
    sdk = model.generate(ids[1:2], attention_mask=mask[1:2], max_new_tokens=12, do_sample=False, compile=True)
    assert torch.equal(sdk, generate(model, ids[1:2], mask[1:2], max_new_tokens=12).sequences)


def test_batches_past_the_gathered_experts_decode_eagerly(model):
    E, K = model.config.n_routed_experts, model.config.num_experts_per_tok
    assert pays_off(model.config, E // K) and not pays_off(model.config, E // K + 1)
    ids = torch.randint(3, model.config.vocab_size, (E // K + 1, 5))
    out = generate(model, ids, max_new_tokens=4, compile=True)
    assert not out.stats["compiled"] and out.new_tokens == generate(model, ids, max_new_tokens=4).new_tokens


def test_weights_changed_after_compiling_rebuild_the_decoder(model):
    ids = padded_batch(model.config.vocab_size)[0][:1]
    generate(model, ids, max_new_tokens=2, compile=True)
    first = decoder_for(model)
    assert decoder_for(model) is first  # unchanged weights: the same compiled graph, nothing compiled again
    assert generate(model, ids, max_new_tokens=3, compile=True).stats["compile_seconds"] == 0.0
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # frozen into the graph: must not be served stale
    try:
        assert decoder_for(model) is not first
        eager = generate(model, ids, max_new_tokens=6)
        assert generate(model, ids, max_new_tokens=6, compile=True).new_tokens == eager.new_tokens
    finally:
        with torch.no_grad():
            model.lm_head.weight.mul_(-1.0)


@pytest.mark.slow  # ~30 s of compiling; dynamo's guards already tell two models apart (this held before the fix too)
def test_two_models_of_the_same_shapes_each_decode_their_own_weights(model):
    ids = padded_batch(model.config.vocab_size)[0][:1]
    generate(model, ids, max_new_tokens=2, compile=True)
    other = random_model(tiny_config(num_nextn_predict_layers=1), seed=7, cls=R1Model)  # same shapes, new weights
    eager = generate(other, ids, max_new_tokens=8)
    assert eager.new_tokens != generate(model, ids, max_new_tokens=8).new_tokens
    assert generate(other, ids, max_new_tokens=8, compile=True).new_tokens == eager.new_tokens


def test_clear_errors_before_compiling(model):
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="use_mtp"):
        generate(model, ids, max_new_tokens=2, compile=True, use_mtp=True)
    cache = CompressedLatentCache(model.config, 1, 16)
    with pytest.raises(ValueError, match="static LatentCache"):
        generate(model, ids, max_new_tokens=2, compile=True, cache=cache)
    with pytest.raises(NotImplementedError, match="position_ids"):
        StepCache(None, None, None, None).get_seq_length()
