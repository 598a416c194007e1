"""Entropy-adaptive routing vs fixed top-k: same data, same token budget, one run.

    python benchmarks/routing.py --quick        # smoke run: tiny budget (about a minute)
    python benchmarks/routing.py                # the reported run: two models trained for 300 steps (~15 min)
    python benchmarks/routing.py --long         # 4x the budget (two 1200-step models, tens of minutes)

Trains two small DeepSeek-V3-architecture MoE models (MLA, 16 sigmoid-routed experts in 4 groups, a shared
expert) with deepseek.train.trainer on arithmetic reasoning traces (deepseek.tasks addition + subtraction,
character tokens): one with fixed top-4 routing, one with entropy-adaptive routing whose controller holds
the average k at --target-k (k in 1..4). Then evaluates, on held-out data:

  fixed top-4          the fixed top-k checkpoint as trained
  entropy (trained)    the entropy-routed checkpoint, controller threshold frozen
  entropy (free)       the fixed top-4 checkpoint with training-free entropy routing calibrated to --target-k
  top-p (free)         the published top-p rule, same checkpoint and calibration (a peer)

For each: validation loss / perplexity, task accuracy (greedy decode, exact answer), average routed experts
per token, routed-expert FLOPs per token, MoE-layer wall time (all MoE layers on captured prefill-sized and
decode-sized inputs, interleaved repeats, median) and end-to-end decode tokens/s. A Pareto sweep (fixed
top-1..4, entropy and top-p at several targets, on both checkpoints) is plotted as perplexity vs FLOPs.
Prints a table, then one JSON line. fp32, CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from deepseek import R1Config, R1ForCausalLM
from deepseek.generation.loop import generate
from deepseek.model import routing
from deepseek.tasks import get_task
from deepseek.train.config import TrainConfig
from deepseek.train.trainer import TokenBatches, train

BOS, EOS, PAD = 0, 1, 2
TASKS = ("addition", "subtraction")


# ---------------------------------------------------------------------------------------------- data
class CharTokenizer:
    """One token per character (digits must be single tokens for column arithmetic); ids 0-2 are special."""

    def __init__(self, texts: list[str]):
        self.chars = sorted({c for t in texts for c in t})
        self.index = {c: i + 3 for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 3

    def encode(self, text: str) -> list[int]:
        return [self.index[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i - 3] for i in ids if i >= 3)


def examples(n: int, seed: int, difficulty: int) -> list[dict]:
    per = n // len(TASKS)
    out = []
    for name in TASKS:
        for ex in get_task(name).generate(per, seed=seed, difficulty=difficulty):
            ex["text"] = ex["prompt"] + "\n" + ex["completion"]
            out.append(ex)
    return out


def token_stream(exs: list[dict], tok: CharTokenizer) -> torch.Tensor:
    ids = []
    for ex in exs:
        ids += [BOS, *tok.encode(ex["text"]), EOS]
    return torch.tensor(ids)


# ---------------------------------------------------------------------------------------------- models
def model_config(vocab: int, **routing_fields) -> dict:
    return dict(
        vocab_size=vocab, hidden_size=128, intermediate_size=384, moe_intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, kv_lora_rank=64, q_lora_rank=96, qk_rope_head_dim=16, qk_nope_head_dim=32,
        v_head_dim=32, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        first_k_dense_replace=1, routed_scaling_factor=2.5, max_position_embeddings=1024,
        num_nextn_predict_layers=0, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, **routing_fields,
    )  # fmt: skip


def train_model(name: str, cfg: dict, stream: torch.Tensor, val: list[dict], args, out_root: Path):
    saved = Path(args.save) / name if args.save else None
    if saved is not None and args.reuse and (saved / "config.json").is_file():
        model = R1ForCausalLM.from_pretrained(saved)
        routing.apply_thresholds(model)
        print(f"reusing {saved}")
        return model, json.loads((saved / "run.json").read_text())
    torch.manual_seed(0)  # the same initial weights for every run
    model = R1ForCausalLM(R1Config(**cfg))
    tc = TrainConfig(out_dir=str(out_root / name), seq_len=args.seq_len, batch_size=args.batch, micro_batch_size=args.batch,
                     max_steps=args.steps, lr=3e-3, warmup_steps=max(args.steps // 20, 1), eval_every=0,
                     eval_batches=len(val), resume=False, progress=True, bias_update_speed=1e-3)  # fmt: skip
    batches = TokenBatches(stream, args.seq_len, args.batch, seed=0)  # identical batches for every run
    t = time.perf_counter()
    metrics = train(tc, model=model, train_batches=batches, val_batches=val)
    model.eval()
    routing.export_thresholds(model)
    run = {"train_seconds": round(time.perf_counter() - t, 1), "final_train_loss": metrics["final_loss"]}
    if saved is not None:
        model.save_pretrained(saved)
        (saved / "run.json").write_text(json.dumps(run))
    return model, run


# ---------------------------------------------------------------------------------------------- evaluation
@torch.inference_mode()
def evaluate_loss(model, val: list[dict]) -> tuple[float, dict]:
    """Mean next-token loss over the validation blocks, and the routing stats of that pass."""
    stats = routing.track_routing(model)
    total, n = 0.0, 0
    for batch in val:
        logits = model(batch["input_ids"]).logits[:, :-1]
        target = batch["input_ids"][:, 1:]
        total += float(F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum"))
        n += target.numel()
    routing.stop_tracking(model)
    return total / n, routing.summarize(stats)


@torch.inference_mode()
def task_accuracy(model, tok: CharTokenizer, exs: list[dict], max_new: int) -> tuple[float, float]:
    """Exact-answer accuracy of greedy completions, graded by the task's own grader; and decode tokens/s."""
    prompts = [[BOS, *tok.encode(ex["prompt"] + "\n")] for ex in exs]
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), PAD)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :], mask[i, T - len(p) :] = torch.tensor(p), 1
    out = generate(model, ids, attention_mask=mask, max_new_tokens=max_new, eos_token_id=EOS)
    texts = [tok.decode(new) for new in out.new_tokens]
    correct = sum(get_task(ex["task"]).grade(ex, text) for ex, text in zip(exs, texts))
    return correct / len(exs), ids, mask, texts[0]


@torch.inference_mode()
def decode_speed(models: dict, ids, mask, new: int, repeats: int) -> dict[str, float]:
    """Decode tokens/s at a fixed length (no early stop), repeats interleaved across models, median."""
    samples = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            out = generate(model, ids, attention_mask=mask, max_new_tokens=new, eos_token_id=None)
            samples[name].append(ids.shape[0] * (new - 1) / out.decode_seconds)
    return {name: statistics.median(s) for name, s in samples.items()}


@torch.inference_mode()
def capture_moe_inputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    inputs, handles = [], []
    for _, moe in routing.moe_layers(model):
        handles.append(moe.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone())))
    model(ids)
    for h in handles:
        h.remove()
    return inputs


@torch.inference_mode()
def time_moe(variants: dict, inputs: dict, repeats: int) -> dict[str, float]:
    """Median seconds of all MoE layers of each variant on its own captured inputs, repeats interleaved."""
    samples = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (model, setup) in variants.items():
            setup()
            layers = [m for _, m in routing.moe_layers(model)]
            t = time.perf_counter()
            for moe, x in zip(layers, inputs[name]):
                moe(x)
            samples[name].append(time.perf_counter() - t)
    return {name: statistics.median(s) for name, s in samples.items()}


@torch.inference_mode()
def kernel_scaling(repeats: int = 5, n_tokens: int = 2048) -> list[dict]:
    """Grouped expert execution alone (16 experts, k_max 4) at the model's size and at a wider one: fixed
    k = 1..4 against a variable k per token (1..4, mean 2.6, the entropy mode's average): time follows the
    number of assignments, with no padding to k_max."""
    from deepseek.model.moe import experts_grouped

    g = torch.Generator().manual_seed(0)
    rows = []
    for D, I in ((128, 64), (1024, 512)):
        gate_up, down = torch.randn(16, 2 * I, D, generator=g) * 0.02, torch.randn(16, D, I, generator=g) * 0.02
        x = torch.randn(n_tokens, D, generator=g)
        full = torch.rand(n_tokens, 16, generator=g).argsort(1)[:, :4]
        w = torch.rand(n_tokens, 4, generator=g)
        k_var = torch.multinomial(torch.tensor([0.0, 0.15, 0.3, 0.3, 0.25]), n_tokens, True, generator=g)  # mean 2.65
        cases = {f"fixed k={k}": torch.where(torch.arange(4) < k, full, -1) for k in (4, 3, 2, 1)}
        cases["variable k"] = torch.where(torch.arange(4) < k_var[:, None], full, -1)
        times = {name: [] for name in cases}
        for _ in range(repeats + 1):
            for name, idx in cases.items():
                t = time.perf_counter()
                experts_grouped(x, idx, w, gate_up, down)
                times[name].append(time.perf_counter() - t)
        base = statistics.median(times["fixed k=4"][1:])
        for name, idx in cases.items():
            t = statistics.median(times[name][1:])
            a = int((idx >= 0).sum())
            rows.append({"D": D, "I": I, "case": name, "avg_k": round(a / n_tokens, 3), "ms": round(t * 1e3, 3),
                         "time_vs_k4": round(t / base, 3), "assign_vs_k4": round(a / (4 * n_tokens), 3)})  # fmt: skip
    return rows


def print_kernel(rows: list[dict]) -> None:
    print(f"\n{'experts_grouped':<22}{'avg k':>7}{'ms':>10}{'time/k4':>9}{'assign/k4':>11}")
    for r in rows:
        print(f"{f'D={r[chr(68)]} I={r[chr(73)]} ' + r['case']:<22}{r['avg_k']:>7}{r['ms']:>10}"
              f"{r['time_vs_k4']:>9}{r['assign_vs_k4']:>11}")  # fmt: skip


# ---------------------------------------------------------------------------------------------- plot
def plot_pareto(points: list[dict], main: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    styles = {"fixed top-k (top-4 ckpt)": "s-", "entropy (top-4 ckpt, free)": "o-", "top-p (top-4 ckpt, free)": "^--",
              "entropy (entropy-trained ckpt)": "D-", "fixed top-k (entropy-trained ckpt)": "x:"}  # fmt: skip
    for series, style in styles.items():
        pts = sorted((p["mflops"], p["ppl"]) for p in points if p["series"] == series)
        if pts:
            ax.plot(*zip(*pts), style, label=series, ms=5)
    for name, row in main.items():
        ax.annotate(name, (row["mflops"], row["ppl"]), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xlabel("routed-expert MFLOPs per token")
    ax.set_ylabel("validation perplexity (per character)")
    ax.set_title("Perplexity vs routed-expert compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budget smoke run")
    parser.add_argument("--long", action="store_true", help="4x the training budget")
    parser.add_argument("--steps", type=int, default=None, help="training steps per model (overrides presets)")
    parser.add_argument("--target-k", type=float, default=2.6, help="average routed experts per token (of 4)")
    parser.add_argument("--entropy-weight", type=float, default=0.05, help="routing entropy regulariser weight")
    parser.add_argument("--out", default=None, help="folder for the plot and JSON (default docs/figures; "
                        "runs/routing_quick with --quick)")  # fmt: skip
    parser.add_argument("--save", default=None, help="save the trained models here (e.g. runs/routing)")
    parser.add_argument("--reuse", action="store_true", help="load the models from --save instead of training")
    parser.add_argument("--kernel-only", action="store_true", help="only the grouped-expert scaling table")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: other jobs share the CPU)")
    args = parser.parse_args()
    if not 1.0 <= args.target_k <= 4.0:
        parser.error(f"--target-k must be in 1..4 (k_min..k_max), got {args.target_k}")
    torch.set_num_threads(args.threads)
    kernel = kernel_scaling(3 if args.quick else 7)
    print_kernel(kernel)
    if args.kernel_only:
        print(json.dumps({"hardware": f"{platform.machine()} CPU, {args.threads} threads, fp32", "kernel": kernel}))
        return
    args.steps = args.steps or (20 if args.quick else 1200 if args.long else 300)
    args.seq_len, args.batch = 256, 8
    n_val_blocks, n_task = (4, 8) if args.quick else (16, 64)
    out_dir = Path(args.out or ("runs/routing_quick" if args.quick else "docs/figures"))
    out_dir.mkdir(parents=True, exist_ok=True)

    train_ex = examples(4000 if not args.long else 12000, seed=0, difficulty=3)
    val_ex, task_ex = examples(400, seed=1, difficulty=3), examples(n_task, seed=2, difficulty=3)
    tok = CharTokenizer([ex["text"] for ex in train_ex + val_ex + task_ex])
    stream = token_stream(train_ex, tok)
    val_stream = token_stream(val_ex, tok)
    blocks = val_stream[: n_val_blocks * args.seq_len].view(n_val_blocks, args.seq_len)
    val = [{"input_ids": blocks[i : i + 4], "labels": blocks[i : i + 4]} for i in range(0, n_val_blocks, 4)]
    calib_ids = stream[: 8 * args.seq_len].view(8, args.seq_len)  # calibration on training tokens only
    max_new = max(len(tok.encode(ex["completion"])) for ex in task_ex) + 4
    print(f"data: {stream.numel():,} training tokens, vocab {tok.vocab_size}, budget {args.steps} steps x "
          f"{args.batch}x{args.seq_len} = {args.steps * args.batch * args.seq_len:,} tokens per model")  # fmt: skip

    fixed_cfg = model_config(tok.vocab_size)
    ent_cfg = model_config(tok.vocab_size, routing_mode="entropy", routing_k_min=1, routing_k_max=4,
                           routing_target_k=args.target_k, routing_controller_rate=0.05,
                           routing_entropy_weight=args.entropy_weight)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        fixed, fixed_run = train_model("fixed", fixed_cfg, stream, val, args, Path(tmp))
        ent, ent_run = train_model("entropy", ent_cfg, stream, val, args, Path(tmp))
    n_params = sum(p.numel() for p in fixed.parameters())
    trained_thresholds = list(ent.config.routing.layer_thresholds)

    # a second copy of the top-4 checkpoint for the training-free variants
    free = R1ForCausalLM(R1Config(**fixed_cfg)).eval()
    free.load_state_dict(fixed.state_dict())
    peer = R1ForCausalLM(R1Config(**fixed_cfg)).eval()
    peer.load_state_dict(fixed.state_dict())
    routing.set_routing(free, "entropy", k_min=1, k_max=4)
    free_thresholds = routing.calibrate(free, calib_ids, args.target_k)
    routing.set_routing(peer, "top_p", k_min=1, k_max=4)
    routing.calibrate(peer, calib_ids, args.target_k)
    models = {"fixed top-4": fixed, "entropy (trained)": ent, "entropy (free)": free, "top-p (free)": peer}

    rows = {}
    for name, model in models.items():
        loss, summary = evaluate_loss(model, val)
        layer_k = [layer["avg_k"] for layer in summary["layers"].values()]
        rows[name] = {"val_loss": round(loss, 4), "ppl": round(math.exp(loss), 4), "avg_k": summary["avg_k"],
                      "k_hist": summary["k_hist"], "max_vio": summary["max_vio"],
                      "mflops": round(routing.routed_flops_per_token(model.config, layer_k) / 1e6, 4)}  # fmt: skip

    # MoE-layer wall time: prefill-sized (8 x 256 tokens) and decode-sized (32 tokens) inputs
    nothing = lambda: None  # noqa: E731
    variants = {name: (m, nothing) for name, m in models.items()}
    for label, ids, reps in (("prefill", blocks[:8], 7), ("decode", val_stream[:32, None], 31)):
        inputs = {name: capture_moe_inputs(m, ids) for name, m in models.items()}
        time_moe(variants, inputs, 2)  # warm-up
        t = time_moe(variants, inputs, 3 if args.quick else reps)
        for name in models:
            rows[name][f"moe_{label}_ms"] = round(t[name] * 1e3, 3)
    for name, model in models.items():
        acc, ids, mask, sample = task_accuracy(model, tok, task_ex, max_new)
        rows[name]["task_acc"] = round(acc, 4)
        print(f"{name}: sample completion for {task_ex[0]['prompt']!r}: {sample[-80:]!r}")
    decode_speed(models, ids[:16], mask[:16], 8, 1)  # warm-up
    tps = decode_speed(models, ids[:16], mask[:16], 64, 2 if args.quick else 5)
    for name in models:
        rows[name]["decode_tok_s"] = round(tps[name], 1)

    # Pareto sweep
    points = []
    targets = (1.5, 2.0, 2.5, 3.0, 3.5)
    for k in (1, 2, 3, 4):
        routing.set_routing(free, "topk", top_k=k)
        loss, s = evaluate_loss(free, val)
        points.append({"series": "fixed top-k (top-4 ckpt)", "k": k, "avg_k": s["avg_k"], "ppl": math.exp(loss)})
    for mode, series in (("entropy", "entropy (top-4 ckpt, free)"), ("top_p", "top-p (top-4 ckpt, free)")):
        routing.set_routing(free, mode, k_min=1, k_max=4)
        for target in targets:
            routing.calibrate(free, calib_ids, target)
            loss, s = evaluate_loss(free, val)
            points.append({"series": series, "target": target, "avg_k": s["avg_k"], "ppl": math.exp(loss)})
    for target in targets:
        routing.calibrate(ent, calib_ids, target)
        loss, s = evaluate_loss(ent, val)
        points.append({"series": "entropy (entropy-trained ckpt)", "target": target, "avg_k": s["avg_k"],
                       "ppl": math.exp(loss)})  # fmt: skip
    for k in (1, 2, 3, 4):
        routing.set_routing(ent, "topk", top_k=k)
        loss, s = evaluate_loss(ent, val)
        points.append({"series": "fixed top-k (entropy-trained ckpt)", "k": k, "avg_k": s["avg_k"],
                       "ppl": math.exp(loss)})  # fmt: skip
    per_k_flops = routing.routed_flops_per_token(fixed.config, [1.0]) * (fixed.config.num_hidden_layers - 1) / 1e6
    for p in points:
        p["mflops"] = round(p["avg_k"] * per_k_flops, 4)
        p["ppl"] = round(p["ppl"], 4)
    plot_pareto(points, rows, out_dir / "routing_pareto.png")

    # table
    base = rows["fixed top-4"]
    cols = ("val_loss", "ppl", "task_acc", "avg_k", "mflops", "moe_prefill_ms", "moe_decode_ms", "decode_tok_s",
            "max_vio")  # fmt: skip
    print(f"\n{n_params / 1e6:.2f}M params, {args.steps} steps each; fixed top-4 trained in "
          f"{fixed_run['train_seconds']:.0f}s, entropy in {ent_run['train_seconds']:.0f}s")  # fmt: skip
    print(f"{'variant':<20}" + "".join(f"{c:>15}" for c in cols) + f"{'k histogram (0..4)':>24}")
    for name, r in rows.items():
        print(f"{name:<20}" + "".join(f"{r[c]:>15}" for c in cols) + f"{str(r['k_hist']):>24}")
    print(f"\n{'vs fixed top-4':<20}{'FLOPs':>10}{'ppl':>10}{'MoE prefill':>13}{'MoE decode':>12}{'decode tok/s':>14}")
    ratios = {}
    for name, r in rows.items():
        if name == "fixed top-4":
            continue
        ratio = {"flops_reduction": round(1 - r["mflops"] / base["mflops"], 4),
                 "ppl_increase": round(r["ppl"] / base["ppl"] - 1, 4),
                 "moe_prefill_speedup": round(base["moe_prefill_ms"] / r["moe_prefill_ms"], 3),
                 "moe_decode_speedup": round(base["moe_decode_ms"] / r["moe_decode_ms"], 3),
                 "decode_speedup": round(r["decode_tok_s"] / base["decode_tok_s"], 3)}  # fmt: skip
        ratios[name] = ratio
        print(f"{name:<20}{-ratio['flops_reduction'] * 100:>9.1f}%{ratio['ppl_increase'] * 100:>9.2f}%"
              f"{ratio['moe_prefill_speedup']:>12.2f}x{ratio['moe_decode_speedup']:>11.2f}x"
              f"{ratio['decode_speedup']:>13.2f}x")  # fmt: skip
    print(f"plot: {out_dir / 'routing_pareto.png'}")
    best = ratios["entropy (trained)"]
    result = {
        "hardware": f"{platform.machine()} CPU, {args.threads} threads, fp32",
        "params_M": round(n_params / 1e6, 3), "train_seconds": {"fixed": fixed_run["train_seconds"],
                                                             "entropy": ent_run["train_seconds"]}, "steps": args.steps, "tokens_per_model": args.steps * args.batch * args.seq_len,
        "target_k": args.target_k, "entropy_weight": args.entropy_weight,
        "rows": rows, "ratios": ratios, "trained_thresholds": [round(v, 4) for v in trained_thresholds],
        "free_thresholds": [round(v, 4) for v in free_thresholds],
        "targets_met": {"flops_-27%": best["flops_reduction"] >= 0.27, "ppl_<=+1%": best["ppl_increase"] <= 0.01,
                        "moe_+20%": best["moe_prefill_speedup"] >= 1.2, "stretch_flops_-40%": best["flops_reduction"] >= 0.4},
        "pareto": points, "kernel": kernel,
    }  # fmt: skip
    (out_dir / "routing_results.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
