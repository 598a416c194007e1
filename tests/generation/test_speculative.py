"""MTP speculative decoding (deepseek/generation/speculative.py): the greedy tokens of plain decoding, drafts
counted as an independent replay predicts, the cache left as plain decoding leaves it."""

import pytest
import torch
from helpers import padded_batch, random_model, tiny_config

from deepseek import R1Model
from deepseek.chat import chat_prompt_ids
from deepseek.generation.loop import generate
from deepseek.generation.speculative import generate_speculative
from deepseek.model.transformer import build_mask
from deepseek.tasks import get_task

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    from deepseek.loading import load_model_and_tokenizer

    return load_model_and_tokenizer("deepseek/r1-tiny")


def prompts(tok, n=1):
    exs = get_task("addition").generate(n, seed=12345, difficulty=2) + get_task("countdown").generate(
        n, seed=12345
    )
    exs += get_task("multiplication").generate(n, seed=12345, difficulty=2)
    return [torch.tensor([chat_prompt_ids(tok, ex)]) for ex in exs]


def same(a, b):
    assert a.new_tokens == b.new_tokens and a.finish_reasons == b.finish_reasons
    assert torch.equal(a.sequences, b.sequences)


def test_greedy_tokens_equal_plain_decoding_to_eos(tiny):
    model, tok = tiny
    for ids in prompts(tok)[:2]:  # addition and countdown: both stop at eos
        plain = generate(model, ids, max_new_tokens=200, eos_token_id=tok.eos_token_id)
        for k in (1, 2):
            spec = generate_speculative(
                model, ids, max_new_tokens=200, eos_token_id=tok.eos_token_id, draft_tokens=k
            )
            same(spec, plain)
        assert plain.finish_reasons == ["stop"] and spec.stats["acceptance"] > 0.5


def test_every_length_and_stop_boundary(tiny):
    """max_new_tokens 0..6 and a stop token at each of the first steps: a stop or the limit can fall on a kept
    draft, on the bonus token after it, or on a correction."""
    model, tok = tiny
    ids = prompts(tok)[2]
    plain = generate(model, ids, max_new_tokens=24).new_tokens[0]
    for n in range(7):
        same(generate_speculative(model, ids, max_new_tokens=n), generate(model, ids, max_new_tokens=n))
    for stop in dict.fromkeys(plain[:12]):  # each distinct early token as the stop token
        for k in (1, 3):
            a = generate(model, ids, max_new_tokens=24, eos_token_id=[stop, tok.eos_token_id])
            same(generate_speculative(model, ids, max_new_tokens=24, eos_token_id=[stop, tok.eos_token_id],
                                      draft_tokens=k), a)  # fmt: skip
            assert a.new_tokens[0][-1] == stop


def test_padded_batch_and_random_weights_where_drafts_are_wrong():
    """A random model's MTP drafts are almost all rejected: every rollback path runs, output still exact."""
    cfg = tiny_config(num_nextn_predict_layers=1)
    model = random_model(cfg, cls=R1Model).eval()
    ids, mask = padded_batch(cfg.vocab_size, seed=1)
    plain = generate(model, ids, mask, max_new_tokens=20, eos_token_id=7, pad_token_id=2)
    for k in (1, 2):
        spec = generate_speculative(model, ids, mask, max_new_tokens=20, eos_token_id=7, pad_token_id=2,
                                    draft_tokens=k)  # fmt: skip
        same(spec, plain)
    assert spec.stats["steps"] >= 15  # few drafts kept


def mtp_replay(model, seq_1S, T):
    """The MTP's greedy draft for every position i + 2 from a full teacher-forced forward (no cache)."""
    out = model.model(input_ids=seq_1S)
    S = seq_1S.shape[1]
    cos, sin = model.model.rotary_emb(torch.arange(S - 1)[None], torch.float32)
    logits, _ = model.mtp[0](
        out.hidden_states[0][:, :-1], seq_1S[:, 1:], cos, sin, build_mask(None, 1, S - 1, 0, "cpu")
    )
    return {i + 2: int(t) for i, t in enumerate(logits[0].argmax(-1)) if i + 2 >= T + 1}


def test_acceptance_is_counted_as_an_independent_replay_predicts(tiny):
    """K=1: after prefill the draft is for T+1; a kept draft moves the next one 2 on, a rejected one 1 on."""
    model, tok = tiny
    ids = prompts(tok, 3)[5]  # a countdown prompt: a few drafts are rejected
    T = ids.shape[1]
    spec = generate_speculative(model, ids, max_new_tokens=80, draft_tokens=1)
    with torch.inference_mode():
        draft = mtp_replay(model, spec.sequences, T)
    seq = spec.sequences[0].tolist()
    q, drafted, accepted = T + 1, 0, 0
    while q < len(seq):
        drafted += 1
        ok = draft[q] == seq[q]
        accepted += ok
        q += 2 if ok else 1
    assert (spec.stats["drafted"], spec.stats["accepted"]) == (drafted, accepted)
    assert spec.stats["acceptance"] == pytest.approx(accepted / drafted) and 0 < accepted < drafted


def test_cache_after_rollbacks_equals_plain_decoding(tiny):
    model, tok = tiny
    ids = prompts(tok)[1]
    for k in (1, 2):
        plain = generate(model, ids, max_new_tokens=40)
        spec = generate_speculative(model, ids, max_new_tokens=40, draft_tokens=k)
        n = plain.cache.get_seq_length()
        assert (
            spec.cache.lengths == plain.cache.lengths == [ids.shape[1] + 39] * model.config.num_hidden_layers
        )
        torch.testing.assert_close(spec.cache.kv[:, :, :n], plain.cache.kv[:, :, :n], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(spec.cache.pe[:, :, :n], plain.cache.pe[:, :, :n], atol=1e-5, rtol=1e-4)


def test_public_calls_and_one_line_errors(tiny):
    model, tok = tiny
    ids = prompts(tok)[0]
    ref = generate(model, ids, max_new_tokens=16).sequences
    assert torch.equal(model.generate(ids, max_new_tokens=16, use_mtp=True, eos_token_id=None), ref)
    assert torch.equal(generate(model, ids, max_new_tokens=16, use_mtp=True).sequences, ref)
    with pytest.raises(ValueError, match="greedy only"):
        model.generate(ids, max_new_tokens=4, use_mtp=True, do_sample=True, temperature=0.7)
    with pytest.raises(ValueError, match="does not take"):
        generate(model, ids, max_new_tokens=4, use_mtp=True, prefill_chunk=8)
    plain = random_model(tiny_config(), cls=R1Model)  # num_nextn_predict_layers=0
    with pytest.raises(ValueError, match="MTP layer"):
        plain.generate(ids % 200, max_new_tokens=4, use_mtp=True)


def test_cli_flag_and_generation_config_share_one_default(tiny):
    import argparse

    from deepseek.cli.sampling import add_sampling_arguments, resolve_use_mtp
    from deepseek.generation.defaults import MTP_DRAFT_TOKENS, mtp_draft_tokens

    model, _ = tiny
    assert mtp_draft_tokens(model) == 3 and MTP_DRAFT_TOKENS == 1  # r1-tiny's MTP layer was trained for 3
    assert mtp_draft_tokens(random_model(tiny_config(num_nextn_predict_layers=1))) == 1
    p = argparse.ArgumentParser()
    add_sampling_arguments(p)
    assert resolve_use_mtp(p.parse_args([]), model) is False  # the bundled generation_config leaves it unset
    assert resolve_use_mtp(p.parse_args(["--mtp"]), model) is True
    model.generation_config.use_mtp = True
    try:
        assert resolve_use_mtp(p.parse_args([]), model) is True
        assert resolve_use_mtp(p.parse_args(["--no-mtp"]), model) is False
    finally:
        model.generation_config.use_mtp = None


def test_benchmark_prompts_are_disjoint_from_everything_the_mtp_trained_on():
    """The MTP layer trained with the pretrain and SFT stages (mtp_loss_weight 0.3; GRPO passes 0), then alone on
    r1-tiny's completions for SFT prompts (train/mtp_distill.py): the prompts benchmarks/speculative.py times are
    held-out evaluation prompts minus every one of those."""
    import importlib.util
    from pathlib import Path

    from deepseek.train.mtp_distill import distill_examples
    from deepseek.train.recipe import recipe, training_prompts

    path = Path(__file__).parents[2] / "benchmarks" / "speculative.py"
    spec = importlib.util.spec_from_file_location("bench_speculative", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    exs = bench.held_out_prompts(3)
    assert len(exs) == 3 * len(bench.WORKLOAD) and all(ex["seed"] == bench.EVAL_SEED for ex in exs)
    seen = training_prompts(recipe("r1-tiny"))
    distilled = {ex["prompt"] for ex in distill_examples(256)}
    assert distilled <= seen and not {ex["prompt"] for ex in exs} & seen


def test_bundled_main_weights_are_the_grpo_stage_s_after_the_mtp_distillation(tiny):
    """train/mtp_distill.py rewrote only model.layers.4.* (the MTP layer): every other tensor is byte-identical to
    the GRPO-stage bundle (hash taken before the rewrite), and the main logits are the ones recorded then."""
    import hashlib

    from safetensors import safe_open

    from deepseek.compat.checkpoint import resolve

    model, _ = tiny
    h = hashlib.sha256()
    with safe_open(str(resolve("deepseek/r1-tiny") / "model.safetensors"), "pt") as f:
        for k in sorted(f.keys()):
            if not k.startswith(f"model.layers.{model.config.num_hidden_layers}."):
                h.update(k.encode())
                h.update(f.get_tensor(k).numpy().tobytes())
    assert h.hexdigest() == "42508f85de7c1a214d5d3ae6bd461088aa22a1597c13e03b591822b3443cd5a5"
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([[0, 5, 77, 300, 12, 900, 41, 8]])).logits
    expected = [-1.0444494485855103, -3.3458564281463623, -1.5373574495315552, -1.268547534942627,
                -1.3431562185287476, -1.4658430814743042]  # fmt: skip
    torch.testing.assert_close(logits[0, -1, :6], torch.tensor(expected), atol=1e-5, rtol=1e-5)
    assert float(logits.sum()) == pytest.approx(-24246.962890625, rel=1e-5)
