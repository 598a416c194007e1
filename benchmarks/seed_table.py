"""The document's benchmark table as one command, measured here for a bundled model.

    python benchmarks/seed_table.py                   # r1-tiny, 20 HumanEval problems, 20 math problems (~3 min)
    python benchmarks/seed_table.py --full            # all 164 HumanEval problems, 100 math problems
    python benchmarks/seed_table.py --usd-per-hour 0.20 --model deepseek/r1-base

Rows (the document's figures from ../shared/MISSION.md, item 5, printed beside ours):
  - throughput in tokens per minute: our generation loop vs transformers' DeepseekV3ForCausalLM (the peer) on
    the same saved checkpoint, same prompts, a fixed number of new tokens (no early stop), batch --batch;
  - cost per 1K tokens: --usd-per-hour (a stated machine price; default $0.10/h, about a 2-vCPU cloud VM)
    divided by the measured throughput, for both;
  - code first-pass rate: HumanEval pass@1, greedy (deepseek/eval/humaneval.py, guarded processes);
  - step-by-step math: reasoning step decomposition accuracy on 2-digit multiplication (deepseek/eval/steps.py),
    with the final-answer accuracy beside it;
  - multimodal accuracy: the bundled r1-tiny-mm's held-out LM answer accuracy (mean over image / audio / points)
    as recorded in its training.json (benchmarks/multimodal_lm.py reruns it), next to the binding's zero-shot
    mean recorded in deepseek/bundled/multimodal-bind/training.json (not re-run).
Prints the table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

DOCUMENT = {"tokens_per_minute": "1,200 (peer 980)", "cost_per_1k_usd": "$0.003 (peer $0.012)",
            "code_first_pass": "81%", "math_steps": "94%", "multimodal": "89.7%"}  # fmt: skip
ROOT = Path(__file__).resolve().parents[1]


def throughput(model_name: str, batch: int, new_tokens: int, rounds: int = 3) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from deepseek.chat import chat_prompt_ids
    from deepseek.eval import load_model_and_tokenizer
    from deepseek.generation.loop import generate
    from deepseek.tasks import get_task
    from deepseek.train.data import left_pad

    model, tok = load_model_and_tokenizer(model_name)
    examples = get_task("addition").generate(batch, seed=999, difficulty=3)
    ids, mask = left_pad([chat_prompt_ids(tok, ex) for ex in examples], tok.pad_token_id or 0)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        peer = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    out = {}
    with torch.inference_mode():
        for name, run in (
            ("ours", lambda: generate(model, ids, mask, max_new_tokens=new_tokens, eos_token_id=None)),
            ("transformers", lambda: peer.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                                                   min_new_tokens=new_tokens, do_sample=False,
                                                   pad_token_id=tok.pad_token_id or 0)),
        ):  # fmt: skip
            run()  # warm-up
            times = []
            for _ in range(rounds):
                t = time.perf_counter()
                run()
                times.append(time.perf_counter() - t)
            sec = sorted(times)[len(times) // 2]
            print(f"{name}: {batch} x {new_tokens} tokens in {sec:.2f} s (median of {rounds})", flush=True)
            out[name] = {"seconds": sec, "tokens_per_minute": batch * new_tokens / sec * 60}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deepseek/r1-tiny", help="bundled model name or checkpoint folder")
    ap.add_argument("--full", action="store_true", help="all 164 HumanEval problems and 100 math problems")
    ap.add_argument("--batch", type=int, default=8, help="prompts per batch for the throughput row")
    ap.add_argument("--new-tokens", type=int, default=64, help="new tokens per prompt for the throughput row")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per throughput case (median reported)")
    ap.add_argument("--usd-per-hour", type=float, default=0.10, help="machine price used for cost per 1K tokens")
    args = ap.parse_args()
    if args.batch < 1 or args.new_tokens < 1 or args.rounds < 1 or args.usd_per_hour <= 0:
        ap.error("--batch, --new-tokens and --rounds must be >= 1, --usd-per-hour > 0")

    import torch

    from deepseek.eval import load_model_and_tokenizer, task_accuracy
    from deepseek.eval.humaneval import humaneval_accuracy

    t0 = time.time()
    tp = throughput(args.model, args.batch, args.new_tokens, args.rounds)
    cost = {k: args.usd_per_hour / (v["tokens_per_minute"] * 60) * 1000 for k, v in tp.items()}
    model, tok = load_model_and_tokenizer(args.model)
    code = humaneval_accuracy(model, tok, n=None if args.full else 20, max_new_tokens=512, batch_size=16)
    math = task_accuracy(model, tok, "multiplication", n=100 if args.full else 20, difficulty=2,
                         max_new_tokens=512, batch_size=20)  # fmt: skip
    mm_file = ROOT / "deepseek" / "bundled" / "multimodal-bind" / "training.json"
    zero_shot = json.loads(mm_file.read_text())["zero_shot"] if mm_file.exists() else {}
    # the document's "multimodal understanding accuracy": the LM's held-out answers about image / audio / points
    # (deepseek/bundled/r1-tiny-mm/training.json, from the recipe stage's evaluation; benchmarks/multimodal_lm.py)
    lm_file = ROOT / "deepseek" / "bundled" / "r1-tiny-mm" / "training.json"
    multimodal = json.loads(lm_file.read_text())["eval"]["mean_lm_answer"] if lm_file.exists() else None

    rows = [
        ("throughput (tokens/min)", f"{tp['ours']['tokens_per_minute']:,.0f}",
         f"{tp['transformers']['tokens_per_minute']:,.0f}", DOCUMENT["tokens_per_minute"]),
        (f"cost per 1K tokens (${args.usd_per_hour:g}/h)", f"${cost['ours']:.5f}", f"${cost['transformers']:.5f}",
         DOCUMENT["cost_per_1k_usd"]),
        (f"code first-pass (HumanEval pass@1, n={code['n']})", f"{code['pass@1']:.1%}", "-", DOCUMENT["code_first_pass"]),
        (f"math step accuracy (n={math['n']})", f"{math['step_accuracy']:.1%}", "-", DOCUMENT["math_steps"]),
        ("  final answers, same problems", f"{math['accuracy']:.1%}", "-", ""),
        ("multimodal (r1-tiny-mm LM answers, recorded)", "-" if multimodal is None else f"{multimodal:.1%}", "-",
         DOCUMENT["multimodal"]),
        ("  binding zero-shot mean (recorded)", "-" if not zero_shot else f"{sum(zero_shot.values()) / len(zero_shot):.1%}",
         "-", ""),
    ]  # fmt: skip
    print(f"model {args.model}, batch {args.batch} x {args.new_tokens} new tokens, {torch.get_num_threads()} threads, "
          f"load {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"{'metric':<44}{'ours':>14}{'transformers':>14}  document")
    for name, ours, peer, doc in rows:
        print(f"{name:<44}{ours:>14}{peer:>14}  {doc}")
    print(json.dumps({
        "bench": "seed_table", "model": args.model, "full": args.full, "usd_per_hour": args.usd_per_hour,
        "batch": args.batch, "new_tokens": args.new_tokens, "rounds": args.rounds, "throughput": tp, "cost_per_1k_usd": cost,
        "humaneval": {k: code[k] for k in ("n", "pass@1", "solved", "statuses", "finish_reasons")},
        "math": {k: math[k] for k in ("n", "accuracy", "steps", "correct_steps", "step_accuracy")},
        "multimodal_zero_shot": zero_shot, "multimodal_mean": multimodal, "document": DOCUMENT,
        "seconds": round(time.time() - t0, 1), "loadavg": os.getloadavg()[0],
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
