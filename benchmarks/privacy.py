"""DP-LoRA vs non-private LoRA on r1-tiny: utility, canary exposure (Carlini et al., "The Secret Sharer") and cost.

    python benchmarks/privacy.py            # ~10 min on the 2-core CPU
    python benchmarks/privacy.py --quick    # a smoke run (~2 min)

Task (the base model cannot do it): template-generated bank records with a question over each ("Which branch
holds account 4821?" / "What is the balance of account 4821?"), answered by copying from the record; utility =
held-out loss on the answer tokens and teacher-forced exact match of whole answers, on unseen records.

Canaries: three secret records "The access code of account <A> is <6 digits>" inserted 1, 4 and 16 times into
the training data. Exposure = log2(R) - log2(rank of the canary's loss among R candidate codes, the true one
included); chance (rank uniform) gives about log2(e) = 1.44 bits on average, a memorised canary log2(R).

Cost: both trainers alternate A B A B (--rounds, at least 3) for a few steps each on the same data and the same
(expected) batch; records per second, medians with min-max. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics

import torch

BRANCHES = ["Lyon", "Oslo", "Porto", "Quito", "Dakar", "Hanoi", "Perth", "Bern", "Lima", "Accra", "Riga", "Cork"]
NAMES = ["Ana", "Bo", "Chen", "Dara", "Eli", "Femi", "Gus", "Hana", "Ivo", "Jo", "Kai", "Lea", "Mo", "Nia"]
CANARY_REPEATS = (1, 4, 16)


def bank_record(rng: random.Random) -> dict:
    acct, branch, bal, name = rng.randint(1000, 9999), rng.choice(BRANCHES), rng.randint(10, 999), rng.choice(NAMES)
    record = f"{name} holds account {acct} at the {branch} branch, balance {bal} dollars."
    if rng.random() < 0.5:
        return {"prompt": f"{record} Which branch holds account {acct}?", "completion": f" {branch}"}
    return {"prompt": f"{record} What is the balance of account {acct}?", "completion": f" {bal}"}


def canary(acct: int, code: str) -> dict:
    return {"prompt": f"The access code of account {acct} is", "completion": f" {code}"}


def build_data(n_train: int, n_test: int, seed: int):
    rng = random.Random(seed)
    train = [bank_record(rng) for _ in range(n_train)]
    test = [bank_record(rng) for _ in range(n_test)]
    canaries = [(k, canary(rng.randint(1000, 9999), f"{rng.randint(0, 999999):06d}")) for k in CANARY_REPEATS]
    for k, c in canaries:
        train += [c] * k
    rng.shuffle(train)
    return train, test, canaries


@torch.no_grad()
def exact_match(model, records, pad_id: int, batch: int = 32) -> float:
    """Fraction of records whose every answer token is the argmax under teacher forcing."""
    from deepseek.train.privacy import IGNORE, pad_batch

    model.eval()
    hits = 0
    for s in range(0, len(records), batch):
        idx = list(range(s, min(s + batch, len(records))))
        ids, labels = pad_batch(records, idx, pad_id)
        pred = model(input_ids=ids).logits[:, :-1].argmax(-1)
        target = labels[:, 1:]
        ok = ((pred == target) | (target == IGNORE)).all(1)
        hits += int(ok.sum())
    return hits / len(records)


@torch.no_grad()
def exposure(model, tok, c: dict, n_candidates: int, seed: int, pad_id: int) -> tuple[float, int]:
    """(exposure in bits, rank) of the canary's answer loss among n_candidates random codes + the canary."""
    from deepseek.train.privacy import pad_batch, prepare_records, sequence_losses

    rng = random.Random(seed)
    true_code = c["completion"].strip()
    codes = {true_code}
    while len(codes) < n_candidates + 1:
        codes.add(f"{rng.randint(0, 999999):06d}")
    codes = [true_code] + sorted(codes - {true_code})
    recs, _, _ = prepare_records([{"prompt": c["prompt"], "completion": f" {x}"} for x in codes], tok, 64,
                                 val_fraction=0.0)  # fmt: skip
    model.eval()
    losses = []
    for s in range(0, len(recs), 64):
        idx = list(range(s, min(s + 64, len(recs))))
        ids, labels = pad_batch(recs, idx, pad_id)
        losses += sequence_losses(model, ids, labels).tolist()
    rank = 1 + sum(v < losses[0] for v in losses[1:])
    return math.log2(len(losses)) - math.log2(rank), rank


def fresh(model_name: str):
    from deepseek import R1Model
    from deepseek.train.finetune import add_lora

    base = R1Model.from_pretrained(model_name)
    return base, add_lora(base, True, 8, 16, True)


def run_one(model_name, train, val, loop, dp, pad_id):
    from deepseek.train.privacy import train_records

    base, peft = fresh(model_name)
    metrics = train_records(peft, train, val, loop, dp, pad_id)
    return base, peft, metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deepseek/r1-tiny")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=2e-3, help="non-private LoRA learning rate")
    ap.add_argument("--dp-lr", type=float, default=5e-3, help="DP learning rate (noisy steps need a larger one)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from deepseek.train.finetune import find_tokenizer
    from deepseek.train.privacy import LoopConfig, PrivacyConfig, heldout_loss, prepare_records

    n_train, n_test = (120, 100) if args.quick else (280, 300)
    batch, epochs, n_cand = (16, 2, 200) if args.quick else (32, 2, 500)
    train_rows, test_rows, canaries = build_data(n_train, n_test, seed=0)
    base, _ = fresh(args.model)
    tok = find_tokenizer(base, None)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    train, _, _ = prepare_records(train_rows, tok, 128, val_fraction=0.0)
    test, _, _ = prepare_records(test_rows, tok, 128, val_fraction=0.0)
    N = len(train)
    steps = epochs * math.ceil(N / batch)
    dp = PrivacyConfig(epsilon=args.epsilon, delta=args.delta, max_grad_norm=args.max_grad_norm)
    dp.check_records(N)
    load = open("/proc/loadavg").read().split()[:3]
    print(f"records: {N} train (canaries x{CANARY_REPEATS}), {len(test)} held-out; batch {batch}, {steps} steps; "
          f"load {' '.join(load)}", flush=True)  # fmt: skip

    results = {}
    base_loss = heldout_loss(base, test, pad_id)
    results["base"] = {"heldout_loss": base_loss, "exact_match": exact_match(base, test, pad_id),
                       "exposure": [exposure(base, tok, c, n_cand, 1, pad_id)[0] for _, c in canaries]}  # fmt: skip
    for name, privacy, lr in (("non-private", None, args.lr), (f"dp eps={args.epsilon:g}", dp, args.dp_lr)):
        loop = LoopConfig(steps=steps, batch_size=batch, lr=lr, warmup_steps=max(1, steps // 20), progress=True)
        _, peft, m = run_one(args.model, train, None, loop, privacy, pad_id)
        exp = [exposure(peft, tok, c, n_cand, 1, pad_id) for _, c in canaries]
        results[name] = {"heldout_loss": heldout_loss(peft, test, pad_id), "exact_match": exact_match(peft, test, pad_id),
                         "exposure": [e for e, _ in exp], "rank": [r for _, r in exp], "seconds": m["seconds"],
                         "final_train_loss": m["final_loss"]}  # fmt: skip
        if privacy is not None:
            results[name].update({k: m[k] for k in ("epsilon", "delta", "noise_multiplier", "sample_rate",
                                                    "max_grad_norm", "accountant", "clipped_fraction")})  # fmt: skip
        print(name, json.dumps(results[name]), flush=True)

    # cost: A B A B on the same records, same (expected) batch, a few steps each
    timing = {"non-private": [], "dp": []}
    t_steps = 2
    for _ in range(max(3, args.rounds)):
        for name, privacy in (("non-private", None), ("dp", dp)):
            loop = LoopConfig(steps=t_steps, batch_size=batch, lr=1e-3, progress=False)
            _, _, m = run_one(args.model, train, None, loop, privacy, pad_id)
            timing[name].append(m["steps"] * m["mean_batch"] / m["seconds"])  # records per second
    med = {k: statistics.median(v) for k, v in timing.items()}
    cost_ratio = med["non-private"] / med["dp"]

    np_, dp_ = results["non-private"], results[f"dp eps={args.epsilon:g}"]
    gap_abs = dp_["heldout_loss"] - np_["heldout_loss"]
    print()
    print(f"| run | held-out loss | exact match | exposure x{CANARY_REPEATS[0]} / x{CANARY_REPEATS[1]} / "
          f"x{CANARY_REPEATS[2]} (bits, max {math.log2(n_cand + 1):.1f}) | epsilon |")  # fmt: skip
    print("|---|---|---|---|---|")
    for name, r in results.items():
        eps = f"{r['epsilon']:.2f} (delta {r['delta']:g}, sigma {r['noise_multiplier']:.3f})" if "epsilon" in r else "-"
        ex = " / ".join(f"{e:.2f}" for e in r["exposure"])
        print(f"| {name} | {r['heldout_loss']:.4f} | {r['exact_match']:.3f} | {ex} | {eps} |")
    print(f"\nrecords/s (median, min-max over {len(timing['dp'])} alternated rounds): non-private "
          f"{med['non-private']:.1f} ({min(timing['non-private']):.1f}-{max(timing['non-private']):.1f}), dp "
          f"{med['dp']:.1f} ({min(timing['dp']):.1f}-{max(timing['dp']):.1f}); dp costs {cost_ratio:.2f}x per record")
    print(f"utility gap (held-out loss): {gap_abs:+.4f} absolute, {gap_abs / np_['heldout_loss']:+.1%} relative; "
          f"exact match {dp_['exact_match'] - np_['exact_match']:+.3f}")  # fmt: skip
    summary = {"benchmark": "privacy", "quick": args.quick, "model": args.model, "train_records": N,
               "heldout_records": len(test), "batch": batch, "steps": steps, "results": results,
               "utility_gap_loss_abs": gap_abs, "utility_gap_loss_rel": gap_abs / np_["heldout_loss"],
               "exact_match_gap": dp_["exact_match"] - np_["exact_match"],
               "records_per_s": timing, "records_per_s_median": med, "cost_ratio": cost_ratio,
               "canary_repeats": list(CANARY_REPEATS), "candidates": n_cand, "loadavg_start": load,
               "loadavg_end": open("/proc/loadavg").read().split()[:3], "threads": args.threads, "lr": args.lr, "dp_lr": args.dp_lr}  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
