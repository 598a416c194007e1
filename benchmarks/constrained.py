"""Constrained decoding overhead: decode steps at batch 16 with every row under a JSON-schema grammar vs free.

    python benchmarks/constrained.py              # r1-tiny (bundled), batch 16, 48 steps, 3 ABAB rounds
    python benchmarks/constrained.py --quick      # fewer steps
    python benchmarks/constrained.py --xgrammar   # also time xgrammar's compile and mask (if installed)

Both cases run the one generation loop (deepseek/generation/loop.py) on the same 16 prompts for the same
number of steps (no stop token), so they differ only in the per-row mask (llguidance's bitmask, unpacked and
applied to the logits) and the grammar's per-token advance. The grammar: an array of at least 500 objects
(bounded integers, enums, short strings), so no row finishes it inside the run; the rows start in the
grammar (no reasoning phase). Each case is warmed up, then they alternate A B A B ... `--rounds` times;
medians and min-max are reported with the machine's load (/proc/loadavg). Also: per-request compile times
(JSON schema, json_object, a two-tool call grammar) and the mask's own cost per row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from deepseek import chat_tools
from deepseek.generation import constrained
from deepseek.generation.constrained import GrammarVocab, json_object_grammar, json_schema_grammar
from deepseek.generation.loop import generate

SCHEMA = {"type": "array", "minItems": 500, "items": {
    "type": "object", "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 100000},
        "kind": {"enum": ["add", "sub", "mul"]},
        "note": {"type": "string", "maxLength": 8},
        "ok": {"type": "boolean"}},
    "required": ["id", "kind", "note", "ok"], "additionalProperties": False}}  # fmt: skip
TOOLS = [{"type": "function", "function": {"name": n, "description": "", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}, "required": ["a"]}}}
    for n in ("lookup", "compute")]  # fmt: skip


def loadavg() -> list[float]:
    try:
        return [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return []


def timed(fn, reps: int = 5) -> float:
    best = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best.append(time.perf_counter() - t)
    return statistics.median(best)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="deepseek/r1-tiny")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--xgrammar", action="store_true", help="also time xgrammar (pip install xgrammar)")
    args = ap.parse_args()
    if args.quick:
        args.steps = 24
    torch.manual_seed(0)
    from deepseek.chat import chat_prompt_ids
    from deepseek.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(args.model)
    t0 = time.perf_counter()
    vocab = GrammarVocab(tok, model.config.vocab_size, {tok.eos_token_id})
    vocab_s = time.perf_counter() - t0
    vocab.think_open = None  # rows start in the grammar: the mask runs at every step
    prompts = ["What is 48 + 27?"] * args.batch
    ids = torch.tensor([chat_prompt_ids(tok, p) for p in prompts])
    lark = json_schema_grammar(SCHEMA)
    compile_ms = {
        "json_schema": 1e3 * timed(lambda: vocab.compile(lark)),
        "json_object": 1e3 * timed(lambda: vocab.compile(json_object_grammar())),
        "two_tools": 1e3 * timed(lambda: vocab.compile(chat_tools.tool_grammar(vocab, chat_tools.check_tools(TOOLS)))),
    }
    grammar = vocab.compile(lark)
    mask_s = []
    real_mask = constrained.mask_logits

    def counting_mask(logits, states):
        t = time.perf_counter()
        out = real_mask(logits, states)
        mask_s.append(time.perf_counter() - t)
        return out

    def run(constrained_rows: bool) -> float:
        states = [grammar.start() for _ in range(args.batch)] if constrained_rows else None
        out = generate(model, ids, max_new_tokens=args.steps, eos_token_id=None, grammars=states)
        if constrained_rows:
            text = tok.decode(out.new_tokens[0])
            assert text.lstrip().startswith("[{"), text[:40]
        return out.decode_seconds / (args.steps - 1)

    import deepseek.generation.loop as loop_mod

    loop_mod.mask_logits = counting_mask
    run(False), run(True)  # warm-up
    free, fixed = [], []
    for _ in range(args.rounds):
        free.append(run(False))
        mask_s.clear()
        fixed.append(run(True))
    per_mask = statistics.median(mask_s)
    loop_mod.mask_logits = real_mask
    f, c = statistics.median(free), statistics.median(fixed)
    overhead = 100 * (c - f) / f
    xgr = xgrammar_figures(tok, model.config.vocab_size) if args.xgrammar else None
    rows = [("free decode step (ms)", f * 1e3, min(free) * 1e3, max(free) * 1e3),
            ("constrained decode step (ms)", c * 1e3, min(fixed) * 1e3, max(fixed) * 1e3),
            ("mask + apply per step, batch (ms)", per_mask * 1e3, min(mask_s) * 1e3, max(mask_s) * 1e3)]
    print(f"model {args.model}, batch {args.batch}, {args.steps} steps, {args.rounds} ABAB rounds, "
          f"load {loadavg()}")  # fmt: skip
    print(f"{'':36} {'median':>9} {'min':>9} {'max':>9}")
    for name, med, lo, hi in rows:
        print(f"{name:36} {med:9.3f} {lo:9.3f} {hi:9.3f}")
    print(f"overhead per token: {overhead:+.1f}% of the free step (target <= 10%)")
    print("compile per request (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in compile_ms.items())
          + f"; tokenizer for grammars {vocab_s * 1e3:.0f} ms once per model")  # fmt: skip
    if xgr:
        print("xgrammar: " + ", ".join(f"{k} {v}" for k, v in xgr.items()))
    result = {"hardware": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, fp32",
              "model": args.model, "vocab": model.config.vocab_size, "batch": args.batch, "steps": args.steps,
              "rounds": args.rounds, "free_step_ms": round(f * 1e3, 3),
              "free_step_ms_minmax": [round(min(free) * 1e3, 3), round(max(free) * 1e3, 3)],
              "constrained_step_ms": round(c * 1e3, 3),
              "constrained_step_ms_minmax": [round(min(fixed) * 1e3, 3), round(max(fixed) * 1e3, 3)],
              "mask_ms_per_step": round(per_mask * 1e3, 3), "overhead_pct": round(overhead, 2),
              "target_10pct_met": overhead <= 10,
              "compile_ms": {k: round(v, 3) for k, v in compile_ms.items()},
              "grammar_tokenizer_ms": round(vocab_s * 1e3, 1), "library": "llguidance", "loadavg": loadavg(),
              "xgrammar": xgr, "cpu_count": os.cpu_count()}  # fmt: skip
    print(json.dumps(result))


def xgrammar_figures(tok, vocab_size: int) -> dict | None:
    """xgrammar on the same tokenizer and schema: tokenizer info, compile, median mask per row (us)."""
    try:
        import xgrammar as xgr
    except ImportError:
        return None
    t = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab_size, stop_token_ids=[tok.eos_token_id])
    info_ms = 1e3 * (time.perf_counter() - t)
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    compile_ms = 1e3 * timed(lambda: compiler.compile_json_schema(json.dumps(SCHEMA)))
    matcher = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(SCHEMA)))
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    text = json.dumps([{"id": 7, "kind": "add", "note": "hi", "ok": True}] * 4)
    times = []
    for i in tok.encode(text, add_special_tokens=False):
        t = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask)
        times.append(time.perf_counter() - t)
        matcher.accept_token(i)
    return {"tokenizer_ms": round(info_ms, 1), "compile_ms": round(compile_ms, 3),
            "mask_us_per_row": round(1e6 * statistics.median(times), 1)}  # fmt: skip


if __name__ == "__main__":
    main()
