"""MTP speculative decoding vs plain greedy decoding: batch-1 tokens/s on the bundled r1-tiny chat workload.

    python benchmarks/speculative.py                  # 12 held-out chat prompts, 4 rounds (~2-3 minutes on 2 cores)
    python benchmarks/speculative.py --quick          # 4 prompts, 3 rounds
    python benchmarks/speculative.py --draft-tokens 1 # one MTP draft per step (default: the model's config)

The workload: chat prompts from the held-out evaluation sets (deepseek/tasks with the evaluation seed, 12345:
3-digit addition and subtraction, 2-digit multiplication, countdown), minus every prompt the recipe trained
on (`held_out_prompts`; tests/generation/test_speculative.py checks the two sets are disjoint). Each prompt is
answered to its end-of-turn token (or --max-new-tokens). Both paths are warmed up, then alternate per
prompt (A B, then B A in the next round) for --rounds rounds over all prompts; tokens/s = generated tokens /
wall time of the whole calls (prefill included), per round and path; medians and min-max are reported with
the drafts' acceptance rate, whether every round's tokens were identical, and the load average at start and end. Then the fastest cost of the
forwards one step is made of (one-token main forward, two-token main forward, MTP layer), which bound the
speedup: at 100% acceptance one draft gives at most 2 x main_1_token / (main_2_tokens + mtp_2_tokens).
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from deepseek.chat import chat_prompt_ids
from deepseek.generation.defaults import mtp_draft_tokens
from deepseek.generation.loop import generate
from deepseek.generation.speculative import generate_speculative
from deepseek.loading import load_model_and_tokenizer
from deepseek.tasks import get_task
from deepseek.train.recipe import recipe, training_prompts

EVAL_SEED = 12345  # deepseek.eval.tasks.task_accuracy's held-out seed
WORKLOAD = (("addition", 3), ("subtraction", 3), ("multiplication", 2), ("countdown", 3))


def held_out_prompts(per_task: int) -> list[dict]:
    """`per_task` held-out examples of each WORKLOAD task, none of them a prompt the r1-tiny recipe trained on."""
    seen = training_prompts(recipe("r1-tiny"))
    out = []
    for task, difficulty in WORKLOAD:
        exs = [ex for ex in get_task(task).generate(4 * per_task, seed=EVAL_SEED, difficulty=difficulty)
               if ex["prompt"] not in seen]  # fmt: skip
        out += exs[:per_task]
    return out


def one(model, ids, max_new_tokens, eos, use_mtp, draft_tokens):
    """(generated tokens, seconds for the whole call, drafts verified, drafts kept) for one prompt."""
    t = time.perf_counter()
    if use_mtp:
        out = generate_speculative(model, ids, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                   draft_tokens=draft_tokens)  # fmt: skip
    else:
        out = generate(model, ids, max_new_tokens=max_new_tokens, eos_token_id=eos)
    seconds = time.perf_counter() - t
    return out.new_tokens[0], seconds, out.stats.get("drafted", 0), out.stats.get("accepted", 0)


def step_costs(model, ids, reps: int = 300) -> dict[str, float]:
    """Fastest ms (min over interleaved reps: on a loaded machine the median mostly measures preemption) of the
    three forwards a step is made of, after a prompt: plain decoding's one-token main forward, the speculative
    step's two-token main forward (verify + next logits) and its MTP-layer call."""
    from deepseek.generation.loop import decode_one_token
    from deepseek.model.cache import LatentCache

    T = ids.shape[1]
    cache = LatentCache(model.config, 1, T + 2)
    mtp_cache = LatentCache(model.config, 1, T + 2, layers=1)
    with torch.inference_mode():
        out = model.model(input_ids=ids, cache=cache)
        h_1TD = out.hidden_states[0]
        cos, sin = model.model.rotary_emb(torch.arange(T)[None], h_1TD.dtype)
        model.mtp[0](h_1TD, ids, cos, sin, None, mtp_cache)
        mtp_cache.crop(T - 2)
        cos2, sin2 = cos[:, -2:], sin[:, -2:]
        pos = torch.tensor([[T, T + 1]])
        calls = {
            "main_1_token": lambda: decode_one_token(model, ids[:, -1], None, pos[:, 0], cache),
            "main_2_tokens": lambda: model.lm_head(model.model(input_ids=ids[:, -2:], position_ids=pos,
                                                               cache=cache).last_hidden_state),
            "mtp_2_tokens": lambda: model.mtp[0](h_1TD[:, -2:], ids[:, -2:], cos2, sin2, None, mtp_cache),
        }  # fmt: skip
        times = {k: [] for k in calls}
        for _ in range(reps):
            for k, f in calls.items():
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
                cache.crop(T)
                mtp_cache.crop(T - 2)
    return {k: min(v) * 1e3 for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="deepseek/r1-tiny")
    ap.add_argument("--per-task", type=int, default=3, help="held-out prompts per task (4 tasks)")
    ap.add_argument("--rounds", type=int, default=None, help="default 4 (3 with --quick)")
    ap.add_argument("--max-new-tokens", type=int, default=400)
    ap.add_argument("--draft-tokens", type=int, default=None, help="default: the model's generation config")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (tiny model: one is fastest)")
    ap.add_argument("--quick", action="store_true", help="1 prompt per task, 3 rounds")
    args = ap.parse_args()
    if args.quick:
        args.per_task = 1
    args.rounds = args.rounds or (3 if args.quick else 4)
    load_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    model, tok = load_model_and_tokenizer(args.model)
    args.draft_tokens = args.draft_tokens or mtp_draft_tokens(model)
    exs = held_out_prompts(args.per_task)
    prompts = [torch.tensor([chat_prompt_ids(tok, ex)]) for ex in exs]
    eos = tok.eos_token_id
    for ids in prompts[:2]:  # warm-up, both paths
        one(model, ids, 64, eos, False, args.draft_tokens)
        one(model, ids, 64, eos, True, args.draft_tokens)
    rates = {"plain": [], "mtp": []}
    drafted = accepted = 0
    identical = True
    reference = {}
    for r in range(args.rounds):
        tokens, seconds = {"plain": 0, "mtp": 0}, {"plain": 0.0, "mtp": 0.0}
        for i, ids in enumerate(prompts):  # A B per prompt (B A in odd rounds): both see the same load
            for name in ("plain", "mtp") if r % 2 == 0 else ("mtp", "plain"):
                out, s, d, a = one(model, ids, args.max_new_tokens, eos, name == "mtp", args.draft_tokens)
                tokens[name] += len(out)
                seconds[name] += s
                drafted, accepted = drafted + d, accepted + a
                identical &= reference.setdefault(i, out) == out
        for name in rates:
            rates[name].append(tokens[name] / seconds[name])
        print(f"round {r + 1}: plain {rates['plain'][-1]:.1f} tok/s, mtp {rates['mtp'][-1]:.1f} tok/s")
    costs = step_costs(model, prompts[0])
    ceiling = 2 * costs["main_1_token"] / (costs["main_2_tokens"] + costs["mtp_2_tokens"])
    load_end = os.getloadavg()
    tokens = sum(len(o) for o in reference.values())
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratios = [m / p for p, m in zip(rates["plain"], rates["mtp"])]
    acceptance = accepted / drafted if drafted else 0.0
    print(f"\n{len(prompts)} held-out chat prompts ({', '.join(f'{t}:{d}' for t, d in WORKLOAD)}), {tokens} tokens "
          f"per round, batch 1, {args.threads} thread(s), {args.draft_tokens} draft(s) per step, {args.rounds} rounds")  # fmt: skip
    print("| path | tok/s median [min-max] |\n|---|---:|")
    for k, v in rates.items():
        print(f"| {k} | {med[k]:.1f} [{min(v):.1f}-{max(v):.1f}] |")
    print(f"speedup median {statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}], acceptance "
          f"{acceptance:.3f}, identical tokens: {identical}, load {load_start[0]:.2f} -> {load_end[0]:.2f}")  # fmt: skip
    print("step costs, fastest ms: " + ", ".join(f"{k} {v:.2f}" for k, v in costs.items()) +
          f"; ceiling at 100% acceptance, 1 draft: 2 x main_1_token / (main_2_tokens + mtp_2_tokens) = {ceiling:.2f}x")  # fmt: skip
    print(json.dumps({
        "hardware": f"{platform.machine()}, {args.threads} thread(s)", "model": args.model, "prompts": len(prompts),
        "tokens_per_round": tokens, "rounds": args.rounds, "draft_tokens": args.draft_tokens,
        "plain_tok_s": round(med["plain"], 1), "mtp_tok_s": round(med["mtp"], 1),
        "speedup": round(statistics.median(ratios), 3), "speedup_min": round(min(ratios), 3),
        "speedup_max": round(max(ratios), 3), "acceptance": round(acceptance, 4), "identical": identical,
        "step_ms": {k: round(v, 3) for k, v in costs.items()}, "ceiling_1_draft": round(ceiling, 3),
        "load_at_start": [round(x, 2) for x in load_start], "load_at_end": [round(x, 2) for x in load_end],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
