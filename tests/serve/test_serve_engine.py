"""The engine without HTTP: continuous batching gives each sequence exactly the tokens it would get alone, the
slot cache is allocated and freed, cancellation / timeouts / queue limits work, text streaming is exact."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from helpers import random_model, tiny_config
from serve_support import build_tokenizer

from deepseek.generation.loop import generate
from deepseek.serve.engine import Engine, EngineConfig, QueueFull, SamplingParams
from deepseek.serve.kv_cache import SlotCache
from deepseek.serve.scheduler import Scheduler
from deepseek.serve.sequence import TextStream


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    return random_model(tiny_config(vocab_size=len(tok), eos_token_id=eos, max_position_embeddings=256), seed=3)


def make_engine(model, tok, **kw):
    return Engine(model, tok, EngineConfig(**kw), model_name="tiny")


def test_decode_view_attention_equals_per_sequence_cache(model):
    """Three sequences of different lengths decoded in one batch == each decoded alone (reference cache)."""
    torch.manual_seed(0)
    pool = SlotCache(model.config, num_slots=4, max_len=32)
    prompts = [torch.randint(3, 200, (1, n)) for n in (5, 11, 2)]
    slots, ref_logits = [], []
    with torch.inference_mode():
        for ids in prompts:
            s = pool.allocate()
            view = pool.prefill_view(s)
            model.model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None], cache=view)
            view.commit(ids.shape[1])
            slots.append(s)
            nxt = torch.tensor([[7]])
            ref_logits.append(model(torch.cat((ids, nxt), 1)).logits[0, -1])  # no cache at all
        view = pool.decode_view(slots)
        h = model.model(input_ids=torch.tensor([[7]] * 3), attention_mask=view.attention_mask,
                        position_ids=view.position_ids, cache=view).last_hidden_state  # fmt: skip
        view.commit()
        got = model.lm_head(h[:, -1])
    torch.testing.assert_close(got, torch.stack(ref_logits), atol=1e-4, rtol=1e-4)
    assert [pool.lengths[s] for s in slots] == [6, 12, 3]
    pool.release(slots[1])
    assert pool.num_free() == 2 and pool.allocate() == slots[1]


def test_continuous_batching_matches_one_at_a_time(model, tok):
    """Staggered arrivals, different prompt and output lengths: every sequence gets the greedy tokens that
    deepseek.generation.loop gives it alone."""
    engine = make_engine(model, tok, max_running=3)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, len(tok), (n,), generator=gen).tolist() for n in (4, 9, 1, 17, 6, 3, 12)]
    lengths = [5, 12, 3, 8, 20, 1, 7]
    results = [None] * len(prompts)
    done = threading.Event()

    def listener_for(i):
        acc = []

        def on(out):
            acc.extend(out.token_ids)
            if out.finish_reason:
                results[i] = (list(acc), out.finish_reason)
                if all(r is not None for r in results):
                    done.set()

        return on

    for i, (p, n) in enumerate(zip(prompts, lengths)):
        engine.submit(p, SamplingParams(max_tokens=n, ignore_eos=True), listener_for(i))
        time.sleep(0.003 * i)  # join while others are mid-decode
    assert done.wait(60)
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        ref = generate(model, torch.tensor([p]), max_new_tokens=n)
        assert results[i] == (ref.new_tokens[0], "length"), f"sequence {i} differs"
    assert engine.load() == {"waiting": 0, "running": 0, "free_slots": 3}
    assert engine.stats["prefill_tokens"] == sum(map(len, prompts))
    engine.close()


def test_cancel_and_timeout_free_their_slots(model, tok):
    engine = make_engine(model, tok, max_running=2)
    got = []
    seq = engine.submit([5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True), got.append)
    while not got:
        time.sleep(0.001)
    engine.cancel(seq)
    t0 = time.time()
    while seq.finish_reason is None and time.time() - t0 < 10:
        time.sleep(0.002)
    assert seq.finish_reason == "cancelled" and got[-1].finish_reason == "cancelled"
    assert 1 <= got[-1].completion_tokens < 200
    out = engine.generate([5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True, timeout_s=0.02))
    assert out.finish_reason == "timeout" and out.completion_tokens < 200
    assert engine.load()["free_slots"] == 2
    engine.close()


def test_queue_limit_and_bad_requests(model, tok):
    engine = make_engine(model, tok, max_running=1, max_waiting=0)
    with pytest.raises(QueueFull):
        engine.submit([5], SamplingParams(max_tokens=1), lambda o: None)
    engine.close()
    engine = make_engine(model, tok, max_running=1, max_model_len=64)
    with pytest.raises(ValueError, match="context length"):
        engine.submit([5] * 60, SamplingParams(max_tokens=10), lambda o: None)
    with pytest.raises(ValueError, match="token ids"):
        engine.submit([10**6], SamplingParams(max_tokens=1), lambda o: None)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=-1)
    s = Scheduler(max_running=2, max_waiting=5, prefill_token_budget=10)
    assert s.admit(2) == []
    engine.close()


def test_seeded_sampling_is_reproducible_and_prompt_logprobs_are_exact(model, tok):
    engine = make_engine(model, tok, max_running=4)
    p = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=42, ignore_eos=True)
    a, b = engine.generate([9, 10, 11], p), engine.generate([9, 10, 11], p)
    assert a.token_ids == b.token_ids
    ids = [12, 40, 41, 99, 7]
    out = engine.generate(ids, SamplingParams(max_tokens=0, prompt_logprobs=2))
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    assert out.prompt_logprobs[0] is None
    for t in range(1, len(ids)):
        lp, top = out.prompt_logprobs[t]
        assert lp == pytest.approx(ref[t - 1, ids[t]].item(), abs=1e-5)
        assert list(top) == ref[t - 1].topk(2).indices.tolist()
    assert out.completion_tokens == 0 and out.finish_reason == "length"
    engine.close()


def test_text_stream_splits_reasoning_and_holds_back_partial_tags(tok):
    text = "<think>\nlet me add 1 and 1\n</think>\n\nThe answer is 2. STOP here"
    ids = tok.encode(text)
    stream = TextStream(tok, stop=["STOP"], starts_in_reasoning=False, skip_ids=set())
    reasoning = content = ""
    for n in range(1, len(ids) + 1):
        d_r, d_c = stream.update(ids[:n], final=n == len(ids))
        reasoning, content = reasoning + d_r, content + d_c
        assert "</thi" not in content and "<" not in reasoning  # never a half tag
        if stream.stopped:
            break
    assert reasoning == "\nlet me add 1 and 1\n"
    assert content == "The answer is 2. "
    n_reasoning = len(tok.encode("<think>\nlet me add 1 and 1\n</think>"))
    assert abs(stream.reasoning_tokens(len(ids)) - n_reasoning) <= 1  # BPE may merge across the tag boundary


def test_incomplete_utf8_is_held_back(tok):
    ids = tok.encode("é€")  # multi-byte characters: byte-level tokens may split them
    stream = TextStream(tok, stop=[], starts_in_reasoning=False, skip_ids=set())
    pieces = [stream.update(ids[:n], final=n == len(ids))[1] for n in range(1, len(ids) + 1)]
    assert "".join(pieces) == "é€" and all("\ufffd" not in p for p in pieces)
