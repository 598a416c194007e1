"""DP-LoRA vs non-private LoRA on r1-tiny: utility at several epsilons over seeds, canary exposure (Carlini et
al., "The Secret Sharer"), loss-threshold membership inference, and cost.

    python benchmarks/privacy.py                          # eps 8, 3, 1 x 3 seeds (~40 min on the 2-core CPU)
    python benchmarks/privacy.py --quick                  # a smoke run (~3 min)
    python benchmarks/privacy.py --plot-dir docs/figures  # also privacy_utility.png, privacy_exposure.png

Task (the base model cannot do it): template bank records with one question over each ("Which branch holds
account 48213?" / "What is the balance of account 48213?"), answered by copying from the record. Held-out
records use accounts that no training record uses (account % 10 == 0 is held out, by construction; checked by
tests/train/test_privacy_benchmark.py). Utility: exact match of the whole answer (every answer token and the
end of turn are the greedy choice given the record: the same as greedy decoding of the answer) on the held-out
records, per run; mean over seeds with a 95% t-interval. Non-private and private runs make the same steps on
the same data at the same (expected) batch.

Canaries: three secret records "The access code of account <A> is <6 digits>" inserted 1, 4 and 16 times.
Exposure = log2(R+1) - log2(rank of the canary's loss among R random codes and itself): a memorised canary
gets log2(R+1), chance about log2(e) = 1.44 bits on average.

Membership inference: the loss-threshold attack (members have lower loss); AUC of -loss separating training
records from held-out records of the same distribution, with a bootstrap 95% interval; 0.5 is chance.

Cost: both trainers alternate A B A B (--rounds) for a few steps each, same data and (expected) batch;
records per second, medians with min-max; peak resident memory of a fresh process training 2 steps each way.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from pathlib import Path

import torch

BRANCHES = ["Lyon", "Oslo", "Porto", "Quito", "Dakar", "Hanoi", "Perth", "Bern", "Lima", "Accra", "Riga", "Cork"]
NAMES = ["Ana", "Bo", "Chen", "Dara", "Eli", "Femi", "Gus", "Hana", "Ivo", "Jo", "Kai", "Lea", "Mo", "Nia"]
CANARY_REPEATS = (1, 4, 16)
ACCOUNTS = range(10000, 100000)


def held_out_account(acct: int) -> bool:
    """Held-out records use these accounts and training records never do (canaries included)."""
    return acct % 10 == 0


def bank_record(rng: random.Random, acct: int) -> dict:
    branch, bal, name = rng.choice(BRANCHES), rng.randint(10, 999), rng.choice(NAMES)
    record = f"{name} holds account {acct} at the {branch} branch, balance {bal} dollars."
    if rng.random() < 0.5:
        return {"prompt": f"{record} Which branch holds account {acct}?", "completion": f" {branch}"}
    return {"prompt": f"{record} What is the balance of account {acct}?", "completion": f" {bal}"}


def canary(acct: int, code: str) -> dict:
    return {"prompt": f"The access code of account {acct} is", "completion": f" {code}"}


def build_data(n_train: int, n_test: int, seed: int = 0):
    """(train rows with the canaries inserted, held-out rows, [(repeats, canary row)]); every account once."""
    rng = random.Random(seed)
    train_accts = rng.sample([a for a in ACCOUNTS if not held_out_account(a)], n_train + len(CANARY_REPEATS))
    test_accts = rng.sample([a for a in ACCOUNTS if held_out_account(a)], n_test)
    train = [bank_record(rng, a) for a in train_accts[:n_train]]
    test = [bank_record(rng, a) for a in test_accts]
    canaries = [(k, canary(a, f"{rng.randint(0, 999999):06d}")) for k, a in zip(CANARY_REPEATS, train_accts[n_train:])]
    members = list(train)  # the membership-inference members: plain records, each once
    for k, c in canaries:
        train += [c] * k
    rng.shuffle(train)
    return train, test, canaries, members


@torch.no_grad()
def exact_match(model, records, pad_id: int, batch: int = 64) -> float:
    """Fraction of records whose every answer token is the argmax under teacher forcing."""
    from deepseek.train.privacy import IGNORE, pad_batch

    model.eval()
    hits = 0
    for s in range(0, len(records), batch):
        idx = list(range(s, min(s + batch, len(records))))
        ids, labels = pad_batch(records, idx, pad_id)
        pred = model(input_ids=ids).logits[:, :-1].argmax(-1)
        target = labels[:, 1:]
        hits += int(((pred == target) | (target == IGNORE)).all(1).sum())
    return hits / len(records)


@torch.no_grad()
def record_losses(model, records, pad_id: int, batch: int = 64) -> list[float]:
    from deepseek.train.privacy import pad_batch, sequence_losses

    model.eval()
    out = []
    for s in range(0, len(records), batch):
        idx = list(range(s, min(s + batch, len(records))))
        out += sequence_losses(model, *pad_batch(records, idx, pad_id)).tolist()
    return out


def exposure(model, tok, c: dict, n_candidates: int, seed: int, pad_id: int) -> tuple[float, int]:
    """(exposure in bits, rank) of the canary's answer loss among n_candidates random codes + the canary."""
    from deepseek.train.privacy import prepare_records

    rng = random.Random(seed)
    true_code = c["completion"].strip()
    codes = {true_code}
    while len(codes) < n_candidates + 1:
        codes.add(f"{rng.randint(0, 999999):06d}")
    codes = [true_code] + sorted(codes - {true_code})
    recs, _, _ = prepare_records([{"prompt": c["prompt"], "completion": f" {x}"} for x in codes], tok, 64,
                                 val_fraction=0.0)  # fmt: skip
    losses = record_losses(model, recs, pad_id)
    rank = 1 + sum(v < losses[0] for v in losses[1:])
    return math.log2(len(losses)) - math.log2(rank), rank


def mia_auc(member_losses: list[float], nonmember_losses: list[float], seed: int = 0) -> tuple[float, float, float]:
    """(AUC, low, high): the loss-threshold attack's AUC with a 95% bootstrap interval (1000 resamples)."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    scores = -np.array(member_losses + nonmember_losses)
    y = np.array([1] * len(member_losses) + [0] * len(nonmember_losses))
    auc = float(roc_auc_score(y, scores))
    rng = np.random.default_rng(seed)
    m, n = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    boots = []
    for _ in range(1000):
        idx = np.concatenate([rng.choice(m, len(m)), rng.choice(n, len(n))])
        boots.append(roc_auc_score(y[idx], scores[idx]))
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return auc, float(lo), float(hi)


def t_interval(xs: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): 95% Student-t interval over runs (seeds)."""
    from scipy import stats

    mean = statistics.mean(xs)
    if len(xs) < 2:
        return mean, mean, mean
    half = stats.t.ppf(0.975, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return mean, mean - half, mean + half


def peak_memory_mib(args, mode: str) -> float:
    """Peak resident memory (MiB) of a fresh process that loads the model and data and, for mode "dp" or
    "non-private", trains 2 steps the benchmark's way (mode "load": nothing more)."""
    import subprocess
    import sys

    argv = ["--model", args.model, "--train-records", str(args.train_records), "--test-records",
            str(args.test_records), "--batch", str(args.batch), "--epsilons", str(args.epsilons[0]), "--delta",
            str(args.delta), "--max-grad-norm", str(args.max_grad_norm), "--lora-rank", str(args.lora_rank),
            "--threads", str(args.threads), *(["--lora-experts"] if args.lora_experts else [])]  # fmt: skip
    out = subprocess.run([sys.executable, __file__, *argv, "--measure-memory", mode], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    return float(out.strip().splitlines()[-1])


def measure_memory(args, mode, train, pad_id) -> None:
    import resource

    from deepseek.train.privacy import LoopConfig, PrivacyConfig, train_records

    if mode != "load":
        _, peft = fresh(args.model, args.lora_rank, args.lora_experts, 0)
        dp = PrivacyConfig(epsilon=args.epsilons[0], delta=args.delta, max_grad_norm=args.max_grad_norm)
        train_records(peft, train, None, LoopConfig(steps=2, batch_size=args.batch, progress=False),
                      dp if mode == "dp" else None, pad_id)  # fmt: skip
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB on Linux


def fresh(model_name: str, rank: int, experts: bool, seed: int):
    from deepseek import R1Model
    from deepseek.train.finetune import add_lora

    torch.manual_seed(seed)  # LoRA's A initialisation
    base = R1Model.from_pretrained(model_name)
    return base, add_lora(base, True, rank, 2 * rank, experts)


def plot(runs: dict, epsilons: list[float], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    from matplotlib.ticker import NullFormatter

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    np_mean, np_lo, np_hi = runs["non-private"]["accuracy"]
    ax.axhspan(np_lo, np_hi, color="tab:gray", alpha=0.25)
    ax.axhline(np_mean, color="tab:gray", label="non-private LoRA")
    ms = [runs[f"dp eps={e:g}"]["accuracy"] for e in epsilons]
    ax.errorbar(epsilons, [m for m, _, _ in ms], yerr=[[m - lo for m, lo, _ in ms], [hi - m for m, _, hi in ms]],
                fmt="o-", color="tab:blue", capsize=3, label="DP-LoRA")  # fmt: skip
    ax.set(xscale="log", xlabel="epsilon (delta 1e-5)", ylabel="held-out exact match",
           title="Utility vs privacy (r1-tiny, mean and 95% CI over seeds)")  # fmt: skip
    ax2.axhline(runs["non-private"]["heldout_loss_mean"], color="tab:gray", label="non-private LoRA")
    ax2.plot(epsilons, [runs[f"dp eps={e:g}"]["heldout_loss_mean"] for e in epsilons], "o-", color="tab:blue",
             label="DP-LoRA")  # fmt: skip
    ax2.set(xscale="log", xlabel="epsilon (delta 1e-5)", ylabel="held-out loss (mean over seeds)",
            title="Held-out loss on the answers")  # fmt: skip
    for a in (ax, ax2):
        a.set_xticks(epsilons, [f"{e:g}" for e in epsilons])
        a.xaxis.set_minor_formatter(NullFormatter())
        a.legend()
    fig.tight_layout()
    paths = [str(out_dir / "privacy_utility.png")]
    fig.savefig(paths[0], dpi=120)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, r in runs.items():
        ax.plot(CANARY_REPEATS, r["exposure_mean"], "o-", label=name)
    ax.set(xscale="log", xlabel="times the canary is in the training data", ylabel="exposure (bits)",
           title="Canary exposure (mean over seeds; chance ~1.44)")  # fmt: skip
    ax.set_xticks(CANARY_REPEATS, [str(k) for k in CANARY_REPEATS])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.legend()
    fig.tight_layout()
    paths.append(str(out_dir / "privacy_exposure.png"))
    fig.savefig(paths[1], dpi=120)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deepseek/r1-tiny")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--train-records", type=int, default=4000)
    ap.add_argument("--test-records", type=int, default=500)
    ap.add_argument("--batch", type=int, default=256, help="(expected, for DP) records per step")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 3.0, 1.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-2, help="non-private LoRA learning rate")
    ap.add_argument("--dp-lr", type=float, default=1e-2, help="DP-LoRA learning rate")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--lora-experts", action="store_true", help="also adapt the routed experts (per-record loop)")
    ap.add_argument("--candidates", type=int, default=500, help="random codes each canary is ranked against")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plot-dir", default=None)
    ap.add_argument("--measure-memory", choices=["load", "dp", "non-private"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.train_records, args.test_records, args.batch, args.epochs = 600, 100, 64, 2
        args.epsilons, args.seeds, args.candidates = [8.0], [0], 100
    torch.set_num_threads(args.threads)
    from deepseek.train.finetune import find_tokenizer
    from deepseek.train.privacy import LoopConfig, PrivacyConfig, heldout_loss, prepare_records, train_records

    train_rows, test_rows, canaries, member_rows = build_data(args.train_records, args.test_records)
    base, _ = fresh(args.model, args.lora_rank, args.lora_experts, 0)
    tok = find_tokenizer(base, None)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prep = lambda rows: prepare_records(rows, tok, 128, val_fraction=0.0)[0]  # noqa: E731
    train, test = prep(train_rows), prep(test_rows)
    members = prep(member_rows[: len(test_rows)])
    if args.measure_memory:
        return measure_memory(args, args.measure_memory, train, pad_id)
    N = len(train)
    steps = args.epochs * math.ceil(N / args.batch)
    configs = [("non-private", None, args.lr)] + [
        (f"dp eps={e:g}", PrivacyConfig(epsilon=e, delta=args.delta, max_grad_norm=args.max_grad_norm), args.dp_lr)
        for e in args.epsilons]  # fmt: skip
    for _, dp, _ in configs[1:]:
        dp.check_records(N)
    load = open("/proc/loadavg").read().split()[:3]
    print(f"records: {N} train (canaries x{CANARY_REPEATS}), {len(test)} held-out; batch {args.batch}, {steps} "
          f"steps, seeds {args.seeds}; load {' '.join(load)}", flush=True)  # fmt: skip

    per_run: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
    base_acc = exact_match(base, test, pad_id)
    for seed in args.seeds:
        for name, dp, lr in configs:  # alternated within each seed
            _, peft = fresh(args.model, args.lora_rank, args.lora_experts, seed)
            loop = LoopConfig(steps=steps, batch_size=args.batch, lr=lr, warmup_steps=max(1, steps // 20), seed=seed,
                              progress=True)  # fmt: skip
            m = train_records(peft, train, None, loop, dp, pad_id)
            exp = [exposure(peft, tok, c, args.candidates, 1, pad_id) for _, c in canaries]
            auc = mia_auc(record_losses(peft, members, pad_id), record_losses(peft, test, pad_id))
            r = {"seed": seed, "accuracy": exact_match(peft, test, pad_id), "heldout_loss": heldout_loss(peft, test, pad_id),
                 "exposure": [e for e, _ in exp], "rank": [k for _, k in exp], "mia_auc": auc,
                 "seconds": m["seconds"], "final_train_loss": m["final_loss"]}  # fmt: skip
            if dp is not None:
                r.update({k: m[k] for k in ("epsilon", "delta", "noise_multiplier", "sample_rate", "max_grad_norm",
                                            "accountant", "clipped_fraction", "per_sample_gradients")})  # fmt: skip
            per_run[name].append(r)
            print(name, json.dumps(r), flush=True)

    # cost: A B A B on the same records, same (expected) batch, a few steps each
    timing = {"non-private": [], "dp": []}
    for _ in range(max(3, args.rounds)):
        for name, dp in (("non-private", None), ("dp", configs[1][1])):
            _, peft = fresh(args.model, args.lora_rank, args.lora_experts, 0)
            loop = LoopConfig(steps=2, batch_size=args.batch, lr=1e-3, progress=False)
            m = train_records(peft, train, None, loop, dp, pad_id)
            timing[name].append(m["steps"] * m["mean_batch"] / m["seconds"])
    med = {k: statistics.median(v) for k, v in timing.items()}
    mem = {k: peak_memory_mib(args, k) for k in ("load", "non-private", "dp")}  # fresh processes

    runs = {}
    for name, rs in per_run.items():
        runs[name] = {"accuracy": t_interval([r["accuracy"] for r in rs]),
                      "heldout_loss_mean": statistics.mean(r["heldout_loss"] for r in rs),
                      "exposure_mean": [statistics.mean(r["exposure"][i] for r in rs) for i in range(len(CANARY_REPEATS))],
                      "mia_auc_mean": statistics.mean(r["mia_auc"][0] for r in rs),
                      "mia_auc_runs": [r["mia_auc"] for r in rs], "epsilon": rs[0].get("epsilon")}  # fmt: skip
    np_acc = runs["non-private"]["accuracy"][0]
    print(f"\nbase r1-tiny exact match: {base_acc:.3f}")
    print(f"| run | held-out exact match (mean, 95% CI over {len(args.seeds)} seeds) | utility loss abs / rel | "
          f"exposure x{' / x'.join(map(str, CANARY_REPEATS))} (bits, max {math.log2(args.candidates + 1):.1f}) | "
          "MIA AUC (mean; per-seed 95% CI) | epsilon (sigma) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name, r in runs.items():
        mean, lo, hi = r["accuracy"]
        loss = "-" if name == "non-private" else f"{np_acc - mean:+.3f} / {(np_acc - mean) / np_acc:+.1%}"
        ex = " / ".join(f"{e:.2f}" for e in r["exposure_mean"])
        cis = ", ".join(f"[{lo_:.3f}, {hi_:.3f}]" for _, lo_, hi_ in r["mia_auc_runs"])
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.2f} ({per_run[name][0]['noise_multiplier']:.3f})"
        print(f"| {name} | {mean:.3f} [{lo:.3f}, {hi:.3f}] | {loss} | {ex} | {r['mia_auc_mean']:.3f}; {cis} | {eps} |")
    print(f"\nrecords/s (median, min-max over {len(timing['dp'])} alternated rounds): non-private "
          f"{med['non-private']:.1f} ({min(timing['non-private']):.1f}-{max(timing['non-private']):.1f}), dp "
          f"{med['dp']:.1f} ({min(timing['dp']):.1f}-{max(timing['dp']):.1f}); dp costs "
          f"{med['non-private'] / med['dp']:.2f}x per record")
    print(f"peak resident memory (fresh process, 2 steps): model and data only {mem['load']:.0f} MiB, non-private "
          f"{mem['non-private']:.0f} MiB, dp {mem['dp']:.0f} MiB ({mem['dp'] / mem['non-private']:.2f}x)")  # fmt: skip
    plots = plot(runs, args.epsilons, Path(args.plot_dir)) if args.plot_dir else []
    summary = {"benchmark": "privacy", "quick": args.quick, "model": args.model, "train_records": N,
               "heldout_records": len(test), "batch": args.batch, "steps": steps, "seeds": args.seeds,
               "base_accuracy": base_acc, "runs": runs, "per_run": per_run,
               "utility_loss_rel": {n: (np_acc - r["accuracy"][0]) / np_acc for n, r in runs.items() if n != "non-private"},
               "records_per_s": timing, "records_per_s_median": med, "cost_ratio": med["non-private"] / med["dp"],
               "peak_mib_median": mem, "canary_repeats": list(CANARY_REPEATS), "candidates": args.candidates,
               "loadavg_start": load, "loadavg_end": open("/proc/loadavg").read().split()[:3], "threads": args.threads,
               "lr": args.lr, "dp_lr": args.dp_lr, "lora_rank": args.lora_rank, "lora_experts": args.lora_experts,
               "plots": plots}  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
