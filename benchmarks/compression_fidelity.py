"""Compression fidelity on a trained checkpoint, where the full cache works: same model, same prompts,
full MLA latent cache vs CompressedLatentCache at several read budgets.

    python benchmarks/compression_fidelity.py                     # bundled r1-tiny, ~10 min on 1 thread
    python benchmarks/compression_fidelity.py --prompts 20 --difficulties 96
    python benchmarks/compression_fidelity.py --difficulties 128 --settings all

The 128K passkey models only retrieve through the compressed cache's compact positions (their full cache
scores 0% beyond the lengths they were trained on), so they cannot show what compression itself loses. This
benchmark asks that question on a model whose full cache does retrieve: the bundled r1-tiny, at prompt lengths
inside its training range (its SFT mixture has passkey prompts of ~100 tokens; it was trained on up to 384
positions). To put most of a short prompt into sealed blocks the cache is scaled down (16-token blocks, a
16-token window and prefill chunk, one sink block), so a 164-token prompt has ~10 sealed blocks by the time the key is written
and a budget of k blocks reads k of them at full resolution (4-bit), the rest through block means. Positions are exact (no
compact positions): only selection, coarse attention and quantisation differ from the full cache.

Per (difficulty, setting): greedy passkey accuracy (the r1-tiny chat template, its own think-then-answer
format, graded by the task) and the share of prompts whose whole generated text equals the full cache's; and
teacher-forced perplexity on held-out conversations of r1-tiny's SFT kinds (170-320 tokens: multiplication
traces, 4-digit addition and subtraction, passkey), over the positions past the sink and window, where the
caches differ. Prints a table, then one JSON line. Settings use kv_* names from R1Config.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch

BASE = dict(kv_block_size=16, kv_window=16, kv_sink_blocks=1, prefill_chunk=16, kv_quant_bits=4, kv_quant_group=64,
            kv_coarse=True, kv_select_span=2, kv_compact_positions=False, kv_refresh_recent=False, kv_lead_layer=None)
SETTINGS = {  # name -> overrides of BASE
    "lossless (all blocks, fp32)": dict(kv_topk_blocks=64, kv_quant_bits=0),
    "all blocks, 4-bit": dict(kv_topk_blocks=64),
    "top-6, 4-bit": dict(kv_topk_blocks=6),
    "top-4, 4-bit": dict(kv_topk_blocks=4),
    "top-2, 4-bit": dict(kv_topk_blocks=2),
    "all blocks, 4-bit, groups of 16": dict(kv_topk_blocks=64, kv_quant_group=16),
    "all blocks, 8-bit": dict(kv_topk_blocks=64, kv_quant_bits=8),
    "top-4, 8-bit": dict(kv_topk_blocks=4, kv_quant_bits=8),
}
DEFAULT = list(SETTINGS)[:5]


def setting_tag(name: str) -> str:
    """JSON key part: lossless, all_4bit, top4_4bit, all_4bit_g16, ..."""
    o = {**BASE, **SETTINGS[name]}
    if o["kv_quant_bits"] == 0:
        return "lossless"
    k = "all" if o["kv_topk_blocks"] >= 64 else f"top{o['kv_topk_blocks']}"
    return f"{k}_{o['kv_quant_bits']}bit" + ("" if o["kv_quant_group"] == 64 else f"_g{o['kv_quant_group']}")


def apply(config, overrides: dict | None) -> bool:
    """Set BASE + overrides on the config; None = the full cache (config untouched). Returns compressed?"""
    if overrides is None:
        return False
    config.set_components(**{**BASE, **overrides})
    return True


def heldout_chats(tokenizer, rows: int, seed: int) -> list[torch.Tensor]:
    """Whole held-out conversations (prompt + worked solution) of r1-tiny's SFT kinds, 170-320 tokens each:
    2-digit multiplication traces, 4-digit addition and subtraction, passkey retrieval at 96 tokens."""
    from deepseek.tasks import get_task

    kinds = [("multiplication", 2), ("addition", 4), ("subtraction", 4), ("passkey", 96)]
    out = []
    for i, (name, difficulty) in enumerate(kinds):
        for ex in get_task(name).generate(max(1, rows // len(kinds)), seed=seed + i, difficulty=difficulty):
            text = tokenizer.apply_chat_template(ex["messages"], tokenize=False)
            out.append(torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


def passkey_run(model, tokenizer, examples, overrides, max_new: int) -> list[tuple[bool, str]]:
    from deepseek.chat import chat_prompt_ids
    from deepseek.generation.loop import generate_long
    from deepseek.tasks import get_task

    grader = get_task("passkey")
    compressed = apply(model.config, overrides)
    out = []
    for ex in examples:
        ids = torch.tensor([chat_prompt_ids(tokenizer, ex)])
        gen = generate_long(model, ids, max_new_tokens=max_new, compressed=compressed,
                            stop_ids=(tokenizer.eos_token_id,))  # fmt: skip
        text = tokenizer.decode(gen.tokens[0], skip_special_tokens=True)
        out.append((grader.grade(ex, text) >= 1.0, text))
    return out


def perplexity_run(model, rows, overrides, skip: int) -> float:
    from deepseek.eval.passkey import long_perplexity

    compressed = apply(model.config, overrides)
    nll = [math.log(long_perplexity(model, ids, compressed, chunk=16, skip=skip)) for ids in rows]
    return math.exp(sum(nll) / len(nll))


def main():
    from deepseek.chat import chat_prompt_ids
    from deepseek.loading import load_model_and_tokenizer
    from deepseek.tasks import get_task

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="r1-tiny", help="bundled name or checkpoint folder with a tokenizer")
    parser.add_argument("--difficulties", default="96,128", help="passkey task difficulties (prompt tokens)")
    parser.add_argument("--prompts", type=int, default=40, help="passkey prompts per difficulty")
    parser.add_argument("--seed", type=int, default=777, help="prompt seed (the recipe trains on seeds < 100)")
    parser.add_argument("--ppl-rows", type=int, default=40, help="held-out conversations for perplexity")
    parser.add_argument("--max-new", type=int, default=80)
    parser.add_argument("--settings", default="", help="';'-separated setting names, or 'all' (default: the first five)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    names = DEFAULT if not args.settings else list(SETTINGS) if args.settings == "all" else args.settings.split(";")
    if any(n not in SETTINGS for n in names):
        parser.error(f"--settings: choose from {list(SETTINGS)} (';'-separated) or 'all'")
    diffs = [int(x) for x in args.difficulties.split(",") if x]
    if args.prompts < 1 or not diffs or not names:
        parser.error("need --prompts >= 1, at least one difficulty and one setting")
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model)
    task = get_task("passkey")
    t0 = time.time()
    rows, result = [], {"hardware": f"{platform.machine()}, {args.threads} thread(s), fp32", "model": args.model}
    for d in diffs:
        examples = task.generate(args.prompts, seed=args.seed, difficulty=d)
        full = passkey_run(model, tokenizer, examples, None, args.max_new)
        acc_full = sum(h for h, _ in full) / len(full)
        tokens = len(chat_prompt_ids(tokenizer, examples[0]))
        rows.append((f"passkey {d} (~{tokens} tok)", "full cache", f"{acc_full:.1%}", "-"))
        result[f"passkey{d}_full"] = round(acc_full, 4)
        for name in names:
            comp = passkey_run(model, tokenizer, examples, SETTINGS[name], args.max_new)
            acc = sum(h for h, _ in comp) / len(comp)
            same = sum(a[1] == b[1] for a, b in zip(full, comp)) / len(comp)
            rows.append(("", name, f"{acc:.1%}", f"{same:.0%}"))
            tag = setting_tag(name)
            result[f"passkey{d}_{tag}"] = round(acc, 4)
            result[f"passkey{d}_{tag}_drop_points"] = round(100 * (acc_full - acc), 1)
            print(f"  passkey {d} {name}: {acc:.1%} (full {acc_full:.1%}), same text {same:.0%}", flush=True)
    ppl_rows = heldout_chats(tokenizer, args.ppl_rows, seed=args.seed)
    skip = BASE["kv_sink_blocks"] * BASE["kv_block_size"] + BASE["kv_window"] + BASE["kv_block_size"]
    ppl_full = perplexity_run(model, ppl_rows, None, skip)
    rows.append((f"perplexity ({len(ppl_rows)} chats)", "full cache", f"{ppl_full:.3f}", "-"))
    result["ppl_full"] = round(ppl_full, 4)
    for name in names:
        ppl = perplexity_run(model, ppl_rows, SETTINGS[name], skip)
        rows.append(("", name, f"{ppl:.3f}", f"{ppl / ppl_full - 1:+.2%}"))
        tag = setting_tag(name)
        result[f"ppl_{tag}"] = round(ppl, 4)
        print(f"  perplexity {name}: {ppl:.3f} (full {ppl_full:.3f})", flush=True)
    result["seconds"] = round(time.time() - t0)
    print(f"\n{'case':<32} {'cache':<28} {'value':>8} {'same text / ppl change':>24}")
    for r in rows:
        print(f"{r[0]:<32} {r[1]:<28} {r[2]:>8} {r[3]:>24}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
