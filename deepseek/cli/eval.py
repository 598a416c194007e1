"""`deepseek eval`: perplexity and task accuracy (greedy, pass@k) of a checkpoint or bundled model.

    deepseek eval --model deepseek/r1-tiny --task addition multiplication --n 100
    deepseek eval --model runs/x/checkpoints/step_000500 --task countdown --k 8 --samples 16 --temperature 0.8
    deepseek eval --model runs/x/checkpoints/step_000500 --ppl held_out.txt
    deepseek eval --model deepseek/r1-base --task humaneval            # 164 problems, each run in a guarded process
    deepseek eval --task humaneval --oracle [broken]                    # the canonical (or broken) solutions
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="perplexity and task accuracy (greedy / pass@k)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", help="checkpoint folder or bundled model name (not needed with --oracle)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    p.add_argument("--ppl", nargs="*", default=[], help="files, folders or dataset names for perplexity")
    p.add_argument("--choices", nargs="*", default=[],
                   help="JSONL files of {context, choices, label}: multiple-choice accuracy by log-likelihood (as lm-eval's acc)")
    p.add_argument("--seq-len", type=int, default=256, help="perplexity window in tokens (default: %(default)s)")
    p.add_argument("--task", nargs="*", default=[], help="task names: addition, subtraction, multiplication, countdown, sorting, passkey, passkey_multi; reasoning-gym tasks (gsm_symbolic_heldout, basic_arithmetic_heldout, chain_sum_heldout, leg_counting_heldout; without _heldout: the training split) and/or humaneval")
    p.add_argument("--n", type=int, help="problems per task (default 100; humaneval: all 164)")
    p.add_argument("--oracle", nargs="?", const="canonical", choices=["canonical", "broken"],
                   help="humaneval only: score the canonical solutions (must be 164/164) or a broken set (must be 0)")
    p.add_argument("--timeout", type=float, default=10.0, help="humaneval: wall-clock seconds per program (default: %(default)s)")
    p.add_argument("--memory-mb", type=int, default=1024, help="humaneval: address-space limit per program in MiB (default: %(default)s)")
    p.add_argument("--k", type=int, default=1, help="pass@k (default: %(default)s = greedy accuracy)")
    p.add_argument("--samples", type=int, help="samples per problem for pass@k (default k)")
    p.add_argument("--temperature", type=float, help="default 0 for greedy, 0.8 for pass@k")
    p.add_argument("--difficulty", type=int, help="task difficulty (default: the task's own)")
    p.add_argument("--seed", type=int, default=12345, help="problem seed, kept apart from training seeds (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int,
                   help="generation limit (default: from the task, its longest reference trace x 1.5 rounded up to 64: "
                        "multiplication 512, addition 192; humaneval 512); answers cut at it are counted as cut=")
    p.add_argument("--batch-size", type=int, default=16, help="sequences generated together (default: %(default)s)")
    p.set_defaults(func=run)


def run(args) -> int:
    from deepseek.tasks import TASKS
    from deepseek.tasks.gym import GYM_TASKS

    TASKS = {**TASKS, **GYM_TASKS}

    if not args.ppl and not args.task and not args.choices:
        raise ValueError("nothing to evaluate: give --ppl FILE..., --task NAME... and/or --choices FILE...")
    from deepseek.eval.choices import read_items

    choice_sets = {path: read_items(path) for path in args.choices}  # bad files fail before the model loads
    for name in args.task:
        if name not in TASKS and name != "humaneval":
            raise ValueError(f"unknown task {name!r}; choose from: {', '.join([*TASKS, 'humaneval'])}")
    if args.n is not None and args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.oracle:
        if args.task != ["humaneval"] or args.ppl:
            raise ValueError("--oracle scores humaneval's own solutions: use it with --task humaneval alone")
        return _humaneval_oracle(args)
    if not args.model:
        raise ValueError("--model is required (except with --oracle)")
    for source in args.ppl:
        if ("/" in source or "." in source) and not Path(source).exists():
            raise FileNotFoundError(f"--ppl {source}: no such file or folder")
    from deepseek.eval import load_model_and_tokenizer, perplexity, task_accuracy

    model, tokenizer = load_model_and_tokenizer(args.model, tokenizer=args.tokenizer)
    rows = []
    for source in args.ppl:
        r = perplexity(model, tokenizer, source, seq_len=args.seq_len, show_progress=True)
        rows.append({"eval": "perplexity", "data": source, **r})
    for path, items in choice_sets.items():
        from deepseek.eval.choices import choice_accuracy

        r = choice_accuracy(model, tokenizer, items)
        rows.append({"eval": "choice acc", "data": path, "mean_reward": r["accuracy"], "format_rate": 1.0, **r})
    for name in args.task:
        if name == "humaneval":
            from deepseek.eval.humaneval import humaneval_accuracy

            r = humaneval_accuracy(model, tokenizer, n=args.n, samples=args.samples or args.k, k=args.k,
                                   temperature=args.temperature, max_new_tokens=args.max_new_tokens or 512,
                                   batch_size=args.batch_size, seed=args.seed, limits=_limits(args),
                                   show_progress=True)  # fmt: skip
            rows.append({"eval": f"pass@{args.k}", "data": name, **r})
            continue
        r = task_accuracy(model, tokenizer, name, n=args.n or 100, seed=args.seed, difficulty=args.difficulty, k=args.k,
                          samples=args.samples, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                          batch_size=args.batch_size, show_progress=True)  # fmt: skip
        rows.append({"eval": f"pass@{args.k}" if args.k > 1 else "accuracy", "data": name, **r})
    print(f"{'eval':<12}{'data':<28}{'score':>10}{'detail':>52}")
    for r in rows:
        if r["eval"] == "perplexity":
            print(f"{r['eval']:<12}{r['data'][:27]:<28}{r['perplexity']:>10.3f}{r['tokens']:>34} tokens")
        else:
            if r["eval"] == "choice acc":
                detail = f"n={r['n']} by log-likelihood"
            elif r["data"] == "humaneval":
                detail = f"n={r['n']} solved={r['solved']} pass@1={r['pass@1']:.3f}"
            else:
                detail = f"n={r['n']} reward={r['mean_reward']:.3f} format={r['format_rate']:.2f}"
                if "step_accuracy" in r:
                    detail += f" steps={r['step_accuracy']:.3f}"
                if r.get("truncated"):
                    detail += f" cut={r['truncated']}@{r['max_new_tokens']}"
            print(f"{r['eval']:<12}{r['data'][:27]:<28}{r['accuracy']:>10.3f}{detail:>52}")
    print(json.dumps({"model": str(args.model), "results": [{k: v for k, v in r.items() if k not in ("examples", "per_problem", "predictions")}
                                                           for r in rows]}))  # fmt: skip
    return 0


def _limits(args):
    from deepseek.eval.sandbox import Limits

    return Limits(timeout=args.timeout, cpu_seconds=max(1, int(args.timeout)), memory_bytes=args.memory_mb << 20)


def _humaneval_oracle(args) -> int:
    from deepseek.eval.humaneval import oracle

    r = oracle(args.oracle, n=args.n, limits=_limits(args), show_progress=True)
    print(f"{'oracle':<12}{'problems':>10}{'passed':>10}{'pass@1':>10}  statuses")
    print(f"{r['oracle']:<12}{r['n']:>10}{r['solved']:>10}{r['pass@1']:>10.3f}  {r['statuses']}")
    failed = [p for p in r["per_problem"] if (p["passed"] > 0) != (args.oracle == "canonical")]
    for p in failed[:10]:
        print(f"  unexpected: {p['task_id']} {p['status']} {p['detail']}")
    print(json.dumps({"oracle": r["oracle"], **{k: v for k, v in r.items() if k not in ("per_problem", "oracle")}}))
    return 0
