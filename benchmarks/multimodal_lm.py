"""The language model's answers about media (issue 17): held-out LM answer accuracy per modality next to the
binding's zero-shot accuracy on the same items, and the arithmetic the multimodal model kept, against r1-tiny.

    python benchmarks/multimodal_lm.py                       # the bundled deepseek/r1-tiny-mm, 300 items each
    python benchmarks/multimodal_lm.py --model runs/r1-tiny-mm/final --items 100 --arith 50

Held-out data (deepseek/multimodal/data.py): scikit-learn's digits (other writers than MNIST), flite voices
(another TTS engine than espeak-ng), Computer Modern glyphs (fonts never trained on), and question templates
never trained on (deepseek/train/multimodal.py QUESTIONS["test"]). Arithmetic: 5 in-distribution sets
(deepseek/eval/tasks.py, seed 12345), disjoint from every recipe prompt by the recipe's own check. Prints a
table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

SEED_MULTIMODAL = 0.897  # the source document's "multimodal understanding accuracy"
ARITH_SETS = [("addition", 2), ("subtraction", 2), ("addition", 3), ("subtraction", 3), ("multiplication", 2)]


def arithmetic(model, tok, n: int) -> dict:
    from deepseek.eval.tasks import task_accuracy

    # 512 new tokens: the bundled models' generation default (2-digit multiplication traces run past 256)
    per = {f"{t}:{d}": task_accuracy(model, tok, t, n=n, difficulty=d, max_new_tokens=512)["accuracy"]
           for t, d in ARITH_SETS}  # fmt: skip
    return {"per_set": per, "mean": sum(per.values()) / len(per)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deepseek/r1-tiny-mm")
    ap.add_argument("--base", default="deepseek/r1-tiny", help="the text model it started from (arithmetic peer)")
    ap.add_argument("--items", type=int, default=300, help="held-out items per modality")
    ap.add_argument("--arith", type=int, default=100, help="problems per arithmetic set (0: skip)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from deepseek.loading import load_model_and_tokenizer
    from deepseek.train.multimodal import MultimodalRecipe, evaluate_answers

    load_start = os.getloadavg()
    t0 = time.perf_counter()
    model, tok = load_model_and_tokenizer(args.model)
    recipe = MultimodalRecipe(eval_items=args.items)
    answers = evaluate_answers(model, tok, recipe)
    t_media = time.perf_counter() - t0
    arith = base_arith = None
    if args.arith:
        arith = arithmetic(model, tok, args.arith)
        base, btok = load_model_and_tokenizer(args.base)
        base_arith = arithmetic(base, btok, args.arith)
    seconds = time.perf_counter() - t0

    print(f"\nheld-out, {args.items} items per modality; model {args.model}")
    print(f"{'modality':<8} {'LM answer':>10} {'zero-shot':>10} {'gap (pts)':>10}")
    for m in recipe.modalities:
        a = answers[m]
        print(f"{m:<8} {a['lm_answer']:>10.1%} {a['zero_shot']:>10.1%} {100 * (a['lm_answer'] - a['zero_shot']):>+10.1f}")
    print(f"{'mean':<8} {answers['mean_lm_answer']:>10.1%}   (the source document's figure: {SEED_MULTIMODAL:.1%})")
    if arith:
        print(f"\narithmetic, {args.arith} problems per set: {args.model} {arith['mean']:.1%} vs "
              f"{args.base} {base_arith['mean']:.1%}")  # fmt: skip
        for k in arith["per_set"]:
            print(f"  {k:<18} {arith['per_set'][k]:>6.1%} {base_arith['per_set'][k]:>6.1%}")
    for m in recipe.modalities:
        ex = answers[m]["examples"][0]
        print(f"example ({m}): {ex['question']!r} -> {ex['completion']!r} (gold {ex['digit']})")
    print(f"load average at start {load_start[0]:.2f}, at end {os.getloadavg()[0]:.2f}; media {t_media:.0f} s, "
          f"total {seconds:.0f} s")  # fmt: skip
    out = {"benchmark": "multimodal_lm", "model": args.model, "items": args.items,
           **{f"{m}_lm_answer": answers[m]["lm_answer"] for m in recipe.modalities},
           **{f"{m}_zero_shot": answers[m]["zero_shot"] for m in recipe.modalities},
           "mean_lm_answer": answers["mean_lm_answer"], "seed_figure": SEED_MULTIMODAL,
           "arithmetic": arith and arith["mean"], "arithmetic_base": base_arith and base_arith["mean"],
           "arithmetic_per_set": arith and arith["per_set"], "load_start": load_start[0],
           "load_end": os.getloadavg()[0], "seconds": round(seconds, 1)}  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()
