"""Does RL help? Held-out accuracy of the SFT model (r1-base) vs the GRPO model (r1-tiny), greedy and pass@k.

    python benchmarks/reasoning.py                       # bundled deepseek/r1-base vs deepseek/r1-tiny
    python benchmarks/reasoning.py --quick               # fewer problems and samples
    python benchmarks/reasoning.py --sft runs/r1-tiny/sft/checkpoints/step_000200 \\
        --grpo runs/r1-tiny/grpo/checkpoints/step_000060 --examples 100 --samples 8

Problems are generated with a seed no training stage used, and any prompt that the pretraining or SFT data
contained is dropped, so every problem is unseen. Sets: in-distribution (3-digit addition and subtraction,
2-digit multiplication: the digit counts SFT traces covered) and harder (4- and 5-digit addition and
subtraction: more digits than any SFT trace). Prints a table, writes a PNG, then ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deepseek.loading import load_model_and_tokenizer  # noqa: E402
from deepseek.tasks import get_task  # noqa: E402
from deepseek.train.recipe import recipe, training_prompts  # noqa: E402
from deepseek.train.rl.rollout import evaluate  # noqa: E402

IN_DIST = ["addition:2", "subtraction:2", "addition:3", "subtraction:3", "multiplication:2"]
HARDER = ["addition:4", "subtraction:4"]
EVAL_SEED = 424242


def problems(spec: str, n: int, exclude: set[str]) -> list[dict]:
    name, d = spec.split(":")
    pool = get_task(name).generate(10 * n, seed=EVAL_SEED, difficulty=int(d))  # most 2-digit products were trained on
    return [ex for ex in pool if ex["prompt"] not in exclude][:n]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sft", default="deepseek/r1-base")
    p.add_argument("--grpo", default="deepseek/r1-tiny")
    p.add_argument("--examples", type=int, default=40, help="problems per set")
    p.add_argument("--samples", type=int, default=8, help="samples per problem for pass@k (k = samples)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=352)  # a 2-digit multiplication trace is ~310
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="20 problems per set, 4 samples")
    p.add_argument("--png", default="docs/reasoning_eval.png")
    p.add_argument("--out-json", default=None, help="also write the full results here")
    args = p.parse_args(argv)
    if args.quick:
        args.examples, args.samples = 20, 4
    if args.examples <= 0 or args.samples < 0:
        raise SystemExit(f"--examples must be > 0 and --samples >= 0, got {args.examples}, {args.samples}")
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {"sft": load_model_and_tokenizer(args.sft), "grpo": load_model_and_tokenizer(args.grpo)}
    seen = training_prompts(recipe("r1-tiny", sft4_steps=800))  # also unseen by the SFT-only comparison model (sft4)
    sets = {spec: problems(spec, args.examples, seen) for spec in IN_DIST + HARDER}
    k = args.samples
    results: dict = {name: {} for name in models}
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    jobs = [(m, s) for m in models for s in sets]
    for m, spec in tqdm(jobs, desc="eval", unit="set"):
        model, tok = models[m]
        r = evaluate(model, tok, sets[spec], max_new_tokens=args.max_new_tokens, samples=k,
                     temperature=args.temperature, seed=1)  # fmt: skip
        r.pop("per_example")
        results[m][spec] = r
    seconds = time.perf_counter() - t0

    def mean(m, specs, key):
        return sum(results[m][s][key] for s in specs) / len(specs)

    pk = f"pass@{k}" if k else "greedy"
    print(f"\nheld-out accuracy ({args.examples} unseen problems per set; pass@{k} from {k} samples at T={args.temperature})")
    print(f"{'set':<20}{'SFT greedy':>12}{'GRPO greedy':>13}{'SFT ' + pk:>13}{'GRPO ' + pk:>13}{'len SFT':>9}{'len GRPO':>10}")
    for spec in sets:
        s, g = results["sft"][spec], results["grpo"][spec]
        print(f"{spec:<20}{s['greedy']:>12.1%}{g['greedy']:>13.1%}{s.get(pk, 0):>13.1%}{g.get(pk, 0):>13.1%}"
              f"{s['length']:>9.0f}{g['length']:>10.0f}")  # fmt: skip
    summary = {}
    for label, specs in (("in_distribution", IN_DIST), ("harder", HARDER), ("all", IN_DIST + HARDER)):
        summary[label] = {f"{m}_{key}": mean(m, specs, key) for m in models for key in (["greedy", pk] if k else ["greedy"])}
        print(f"{label + ' (mean)':<20}{summary[label]['sft_greedy']:>12.1%}{summary[label]['grpo_greedy']:>13.1%}"
              + (f"{summary[label]['sft_' + pk]:>13.1%}{summary[label]['grpo_' + pk]:>13.1%}" if k else ""))  # fmt: skip
    plot(results, list(sets), pk, args.png)
    out = {"benchmark": "reasoning", "sft": args.sft, "grpo": args.grpo, "examples_per_set": args.examples,
           "k": k, "temperature": args.temperature, "seconds": round(seconds, 1),
           "greedy_gain_all_points": round(100 * (summary["all"]["grpo_greedy"] - summary["all"]["sft_greedy"]), 1),
           "greedy_gain_harder_points": round(100 * (summary["harder"]["grpo_greedy"] - summary["harder"]["sft_greedy"]), 1),
           "grpo_in_distribution_greedy": round(summary["in_distribution"]["grpo_greedy"], 3),
           "summary": {a: {b: round(v, 3) for b, v in d.items()} for a, d in summary.items()},
           "per_set": {m: {s: {kk: round(v, 3) for kk, v in r.items() if isinstance(v, float)} for s, r in rs.items()}
                       for m, rs in results.items()}}  # fmt: skip
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(out, indent=2))
    print(json.dumps(out))
    return 0


def plot(results: dict, specs: list[str], pk: str, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    x = range(len(specs))
    for ax, key in zip(axes, ["greedy", pk]):
        for i, (m, color) in enumerate((("sft", "tab:gray"), ("grpo", "tab:blue"))):
            vals = [results[m][s].get(key, 0) for s in specs]
            ax.bar([j + (i - 0.5) * 0.38 for j in x], vals, 0.38, label="SFT (r1-base)" if m == "sft" else "GRPO (r1-tiny)",
                   color=color)  # fmt: skip
        ax.set_xticks(list(x), specs, rotation=20, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"held-out accuracy, {key}")
        ax.axvline(len(IN_DIST) - 0.5, color="k", lw=0.8, ls="--")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
