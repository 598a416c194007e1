"""Batched prefill and the prefix cache: prompts prefilled together (right-padded) and prompts that start from
cached prefix latents get exactly the greedy tokens `deepseek.generation.loop.generate` gives each alone."""

from __future__ import annotations

import pytest
import torch
from helpers import random_model, tiny_config
from serve_support import build_tokenizer

from deepseek.generation.loop import generate
from deepseek.serve.engine import Engine, EngineConfig, SamplingParams
from deepseek.serve.kv_cache import SlotCache
from deepseek.serve.prefix_cache import PrefixCache


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    return random_model(tiny_config(vocab_size=len(tok), eos_token_id=eos, max_position_embeddings=256), seed=5)


def stepped_engine(model, tok, **kw) -> Engine:
    """An engine whose background thread is stopped: the test runs its steps (what shares a step is known)."""
    engine = Engine(model, tok, EngineConfig(**kw), model_name="tiny")
    engine.close()
    return engine


def run_all(engine, prompts, max_tokens, first_step_forwards=None):
    """Submit every prompt, then step until all finish; returns (token_ids, prompt_tokens) per prompt."""
    outs = [[] for _ in prompts]
    seqs = [engine.submit(p, SamplingParams(max_tokens=n, ignore_eos=True), outs[i].append)
            for i, (p, n) in enumerate(zip(prompts, max_tokens))]  # fmt: skip
    before = engine.stats["prefill_forwards"]
    engine.step()
    if first_step_forwards is not None:
        assert engine.stats["prefill_forwards"] - before == first_step_forwards
    for _ in range(500):
        if all(s.finish_reason is not None for s in seqs):
            break
        engine.step()
    assert [s.finish_reason for s in seqs] == ["length"] * len(seqs)
    return [([t for o in out for t in o.token_ids], out[-1].prompt_tokens) for out in outs]


def reference(model, prompt, n):
    return generate(model, torch.tensor([prompt]), max_new_tokens=n).new_tokens[0]


def random_prompts(lengths, seed, vocab):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab, (n,), generator=gen).tolist() for n in lengths]


def test_batch_prefill_view_equals_full_forward(model):
    """Rows of different lengths, some after positions their slot holds already, in one padded forward: each
    row's logits equal the model run on that row's whole sequence without a cache, and each slot then holds
    exactly the latents a one-sequence prefill writes. Slots start dirty (a long earlier sequence), so a row
    that saw padding or stale columns would differ."""
    torch.manual_seed(0)
    pool, ref_pool = SlotCache(model.config, 4, 64), SlotCache(model.config, 4, 64)
    dirty = torch.randint(3, 200, (1, 60))
    with torch.inference_mode():
        for _ in range(4):  # fill every slot's 60 first positions with another sequence's latents
            view = pool.prefill_view(pool.allocate())
            model.model(input_ids=dirty, cache=view)
        for s in range(4):
            pool.release(s)
        seqs = [torch.randint(3, 200, (1, n)) for n in (5, 23, 1, 40)]
        done = [0, 7, 0, 16]  # positions already in the slot (a prefix-cache hit, or an earlier chunk)
        slots = [pool.allocate() for _ in seqs]
        for s, ids, a in zip(slots, seqs, done):  # ref_pool: the same slot numbers, filled one sequence at a time
            for p in (pool, ref_pool):
                if a:
                    view = p.prefill_view(s)
                    model.model(input_ids=ids[:, :a], cache=view)
                    view.commit(a)
        view = pool.batch_prefill_view(slots, [ids.shape[1] - a for ids, a in zip(seqs, done)])
        ids_BT = torch.zeros(4, view.T, dtype=torch.long)
        for b, (ids, a) in enumerate(zip(seqs, done)):
            ids_BT[b, : ids.shape[1] - a] = ids[0, a:]
        h = model.model(input_ids=ids_BT, position_ids=view.position_ids, mask=view.mask_BTS, cache=view)
        view.commit()
        got = model.lm_head(h.last_hidden_state[torch.arange(4), view.last_B])
        for s, ids, a in zip(slots, seqs, done):
            one = ref_pool.prefill_view(s)
            model.model(input_ids=ids[:, a:], position_ids=torch.arange(a, ids.shape[1])[None], cache=one)
            one.commit(ids.shape[1] - a)
        want = torch.stack([model(ids).logits[0, -1] for ids in seqs])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert [pool.lengths[s] for s in slots] == [ref_pool.lengths[s] for s in slots] == [5, 23, 1, 40]
    for s, ids in zip(slots, seqs):
        n = ids.shape[1]
        torch.testing.assert_close(pool.kv_LNMC[:, s, :n], ref_pool.kv_LNMC[:, s, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pool.pe_LNMR[:, s, :n], ref_pool.pe_LNMR[:, s, :n], atol=1e-5, rtol=1e-5)


def test_concurrent_prompts_prefill_in_one_forward_and_match_generate(model, tok):
    prompts = random_prompts([7, 1, 30, 12, 3, 19], seed=1, vocab=len(tok))
    lengths = [6, 9, 4, 11, 5, 8]
    engine = stepped_engine(model, tok, max_running=8, prefix_cache_tokens=0)
    dirty = run_all(engine, random_prompts([50] * 6, seed=9, vocab=len(tok)), [3] * 6)  # dirty every slot
    assert len(dirty) == 6
    got = run_all(engine, prompts, lengths, first_step_forwards=1)  # all six in one padded forward
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        assert got[i] == (reference(model, p, n), len(p)), f"prompt {i} differs"
    assert engine.stats["prefill_tokens"] == 6 * 50 + sum(map(len, prompts))


def test_prefill_budget_splits_padded_batches(model, tok):
    """Padded size (rows x longest) is bounded by the token budget: a long prompt goes alone."""
    prompts = random_prompts([4, 5, 6, 60], seed=2, vocab=len(tok))
    engine = stepped_engine(model, tok, max_running=8, prefill_token_budget=80, prefix_cache_tokens=0)
    got = run_all(engine, prompts, [5] * 4, first_step_forwards=2)
    for i, p in enumerate(prompts):
        assert got[i][0] == reference(model, p, 5), i


def test_shared_system_prompt_hits_the_prefix_cache_and_stays_exact(model, tok):
    """Rows that start after a cached prefix and a row that starts at 0 share one padded forward (rows at
    different offsets: a mask that ignored them would let the short row see stale columns)."""
    system = random_prompts([40], seed=3, vocab=len(tok))[0]  # 2.5 blocks of 16
    users = random_prompts([3, 9, 1, 14, 30], seed=4, vocab=len(tok))
    prompts = [system + u for u in users[:4]] + [users[4]]  # the last one has no system prompt
    lengths = [7, 5, 9, 6, 8]
    on = stepped_engine(model, tok, max_running=5)
    off = stepped_engine(model, tok, max_running=5, prefix_cache_tokens=0)
    run_all(on, random_prompts([60] * 5, seed=10, vocab=len(tok)), [2] * 5)  # dirty every slot
    base = dict(on.stats)
    first = run_all(on, prompts[:1], lengths[:1])  # computes the system prompt, stores its 2 full blocks
    assert on.stats["prefix_hit_tokens"] == base["prefix_hit_tokens"] == 0
    got = run_all(on, prompts[1:], lengths[1:], first_step_forwards=1)
    assert on.stats["prefix_hits"] == 3 and on.stats["prefix_hit_tokens"] == 3 * 32
    assert on.stats["prefill_tokens"] - base["prefill_tokens"] == sum(map(len, prompts)) - 3 * 32
    want = run_all(off, prompts, lengths)
    assert first + got == want  # same tokens and the same prompt_tokens (usage) as without the cache
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        assert want[i] == (reference(model, p, n), len(p)), i
    assert off.stats["prefix_hit_tokens"] == 0 and off.runner.prefix is None


def test_partial_block_overlap_does_not_match(model, tok):
    """Prompts that share 20 tokens share one block of 16, not two; a difference inside the first block is
    no match at all; an identical block-aligned prompt reuses all but its last token."""
    a = random_prompts([48], seed=6, vocab=len(tok))[0]
    b = a[:20] + random_prompts([28], seed=7, vocab=len(tok))[0]
    c = list(a)
    c[15] = a[15] + 1 if a[15] + 1 < len(tok) else 10
    engine = stepped_engine(model, tok, max_running=2)
    run_all(engine, [a], [4])
    hits = []
    for p in (b, c, a):
        before = engine.stats["prefix_hit_tokens"]
        assert run_all(engine, [p], [6])[0][0] == reference(model, p, 6)
        hits.append(engine.stats["prefix_hit_tokens"] - before)
    assert hits == [16, 0, 47]


def test_a_later_chat_turn_reuses_the_generated_tokens(model, tok):
    """The finished sequence's prompt + completion is offered to the cache: the next turn's prompt, which
    starts with both, computes only what follows."""
    p1 = random_prompts([21], seed=8, vocab=len(tok))[0]
    engine = stepped_engine(model, tok, max_running=2)
    (out1, _), = run_all(engine, [p1], [20])
    p2 = p1 + out1 + [11, 12, 13]
    before = engine.stats["prefix_hit_tokens"]
    (out2, used), = run_all(engine, [p2], [5])
    assert engine.stats["prefix_hit_tokens"] - before == 32  # blocks [0, 32): the slot held 21 + 19 tokens
    assert (out2, used) == (reference(model, p2, 5), len(p2))


def test_prefix_pool_evicts_least_recently_used_leaves_first(model):
    cfg = model.config
    slots = SlotCache(cfg, 1, 64)
    pool = PrefixCache(cfg, capacity_tokens=48, block_size=16)  # 3 blocks
    slot = slots.allocate()
    slots.kv_LNMC[:, slot].normal_()
    slots.lengths[slot] = 64
    x, y = list(range(100, 164)), list(range(200, 216))
    assert pool.store(slots, slot, x) == 3  # at most the pool's size: x's blocks 0, 1, 2
    assert len(pool.match(x)) == 3 and pool.cached_tokens() == 48
    assert pool.store(slots, slot, y) == 1  # evicts x's leaf (block 2), not its root
    assert len(pool.match(x)) == 2 and len(pool.match(y)) == 1
    torch.testing.assert_close(pool.kv_LPbC[:, pool.match(x)[1]], slots.kv_LNMC[:, slot, 16:32])
    assert pool.match(list(range(101, 165))) == []  # same tokens at other positions: no match


def test_a_block_matches_only_after_the_same_prefix(model):
    """Keys are hash chains: block W cached after Z is not reused after X (its latents depend on Z)."""
    cfg = model.config
    slots = SlotCache(cfg, 1, 32)
    pool = PrefixCache(cfg, capacity_tokens=64, block_size=16)
    slot = slots.allocate()
    slots.lengths[slot] = 32
    X, Y, Z, W = ([k] * 16 for k in (10, 11, 12, 13))
    pool.store(slots, slot, X + Y)
    pool.store(slots, slot, Z + W)
    assert len(pool.match(X + Y)) == 2 and len(pool.match(Z + W)) == 2
    assert len(pool.match(X + W + [5])) == 1 and pool.match(W + X) == []
