"""Training throughput: our trainer's step vs transformers' DeepseekV3ForCausalLM, same config, weights and
batches, in one run (CPU, fp32).

    python benchmarks/train_step.py            # the full benchmark (a few minutes on 2 cores)
    python benchmarks/train_step.py --quick    # smaller, for a smoke run

A step is forward + backward + grad clip + AdamW on one batch. Ours is `deepseek.train.trainer.Run.train_step`
(the real trainer step: token-weighted loss, load tracking, router bias update with gamma=0 so both models
follow the same update); transformers runs the plain loop with its defaults (SDPA attention, grouped_mm
experts). The implementations alternate step by step (rotating the order) and the median step time is
reported, so a shared, busy CPU slows all alike. Losses of the first steps must
match (same weights, same batches). MFU = model FLOPs/s over the fp32 matmul FLOPs/s measured in this run.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from deepseek import R1Config, R1ForCausalLM
from deepseek.train.config import TrainConfig
from deepseek.train.trainer import Dist, Run, TokenBatches, causal_lm_loss, compile_blocks, param_groups


def bench_config(quick: bool) -> R1Config:
    kw = dict(
        vocab_size=8192, hidden_size=384, intermediate_size=1024, moe_intermediate_size=192, num_hidden_layers=4,
        num_attention_heads=8, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=32,
        v_head_dim=32, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, n_group=4, topk_group=2,
        first_k_dense_replace=1, num_nextn_predict_layers=0, max_position_embeddings=4096, bos_token_id=0,
        eos_token_id=1,
    )  # fmt: skip
    if quick:
        kw.update(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2,
                  vocab_size=2048, q_lora_rank=64, kv_lora_rank=64)  # fmt: skip
    return R1Config(**kw)


def load_both(config: R1Config):
    torch.manual_seed(0)
    ours = R1ForCausalLM(config)
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        d = {k: v for k, v in config.to_dict().items() if k in DeepseekV3Config.__dataclass_fields__}
        d.update(num_key_value_heads=config.num_attention_heads, num_mtp_layers=0)
        DeepseekV3Config(**d).save_pretrained(tmp)
        hf = DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    return ours.train(), hf.train()


def train_flops_per_token(config: R1Config, seq_len: int) -> float:
    """6 x active matmul parameters (embeddings excluded, lm_head included) + causal attention score/value
    matmuls (forward 2 * T/2 * H * (qk + v) per layer, x3 with backward)."""
    from deepseek.model.transformer import active_parameters

    params = active_parameters(config, include_embeddings=False) + config.vocab_size * config.hidden_size
    qk = config.qk_nope_head_dim + config.qk_rope_head_dim
    attn = 3 * 2 * (seq_len / 2) * config.num_attention_heads * (qk + config.v_head_dim) * config.num_hidden_layers
    return 6 * params + attn


def matmul_flops() -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < 1.0:
        a @ b
        n += 1
    return 2 * 1024**3 * n / (time.perf_counter() - t)


class HFStep:
    def __init__(self, model, cfg: TrainConfig):
        self.model = model
        self.opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                     eps=cfg.eps)  # fmt: skip
        self.clip = cfg.grad_clip

    def __call__(self, batch) -> float:
        loss = self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=8, help="rounds; each runs every implementation in turn")
    p.add_argument("--steps", type=int, default=1, help="timed steps per round per implementation")
    args = p.parse_args()
    if args.quick:
        args.seq, args.rounds, args.steps = 128, 4, 1
    config = bench_config(args.quick)
    ours, hf = load_both(config)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(out_dir=tmp, batch_size=args.batch, micro_batch_size=args.batch, seq_len=args.seq,
                          max_steps=1000, lr=1e-3, warmup_steps=0, min_lr_ratio=1.0, bias_update_speed=0.0,
                          progress=False, resume=False)  # fmt: skip
        stream = torch.randint(3, config.vocab_size, (200_000,), generator=torch.Generator().manual_seed(0))
        steps = {}
        for name, model in (("ours", ours), ("ours+compile", copy.deepcopy(ours)), ("transformers", hf)):
            if name == "transformers":
                steps[name] = HFStep(model, cfg)
                continue
            run = Run(cfg, Dist(), torch.device("cpu"), model, iter(()), None, causal_lm_loss)
            run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda s: 1.0)  # constant, as HF's
            if name == "ours+compile":
                compile_blocks(model)
            steps[name] = lambda b, run=run: run.train_step(b)["loss"]
        data = TokenBatches(stream, args.seq, args.batch, seed=1)
        batches = [next(data) for _ in range(2 + args.rounds * args.steps)]
        losses = {k: [] for k in steps}
        times = {k: [] for k in steps}
        for batch in batches[:2]:  # warm-up (and compilation) and the loss check
            for name, fn in steps.items():
                t = time.perf_counter()
                losses[name].append(fn(batch))
                times[name].append(time.perf_counter() - t)
        names = list(steps)
        for r in range(args.rounds):  # alternate the order so a shared CPU slows all alike
            chunk = batches[2 + r * args.steps : 2 + (r + 1) * args.steps]
            for name in names[r % len(names) :] + names[: r % len(names)]:
                for batch in chunk:
                    t = time.perf_counter()
                    losses[name].append(steps[name](batch))
                    times[name].append(time.perf_counter() - t)
    tokens = args.batch * args.seq
    tps = {k: tokens / statistics.median(v[2:]) for k, v in times.items()}  # median: robust to a busy CPU
    peak = matmul_flops()
    fpt = train_flops_per_token(config, args.seq)
    mfu = {k: v * fpt / peak for k, v in tps.items()}
    ref = losses["transformers"][:2]
    diff = {k: max(abs(a - b) for a, b in zip(v[:2], ref)) for k, v in losses.items()}
    print(f"train step, {platform.machine()} CPU x{torch.get_num_threads()} threads, fp32, batch {args.batch} x "
          f"{args.seq} tokens, {config.num_hidden_layers} layers, D={config.hidden_size}, "
          f"{config.n_routed_experts} experts top-{config.num_experts_per_tok}")  # fmt: skip
    print(f"{'impl':<14}{'tokens/s':>10}{'ms/step':>9}{'MFU':>7}{'vs HF':>7}{'loss@1':>10}{'loss@2':>10}")
    for k in steps:
        print(f"{k:<14}{tps[k]:>10.0f}{1000 * tokens / tps[k]:>9.0f}{mfu[k]:>7.1%}"
              f"{tps[k] / tps['transformers']:>6.2f}x{losses[k][0]:>10.4f}{losses[k][1]:>10.4f}")  # fmt: skip
    print(f"max |loss - transformers| over the first 2 steps: ours {diff['ours']:.1e}, ours+compile "
          f"{diff['ours+compile']:.1e}; matmul peak {peak / 1e9:.1f} GFLOP/s; {fpt / 1e6:.1f} MFLOP/token")  # fmt: skip
    print(json.dumps({
        "benchmark": "train_step", "quick": args.quick, "batch": args.batch, "seq_len": args.seq,
        "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "speedup_vs_transformers": {k: round(v / tps["transformers"], 3) for k, v in tps.items() if k != "transformers"},
        "mfu": {k: round(v, 4) for k, v in mfu.items()},
        "first_losses": {k: [round(x, 5) for x in v[:2]] for k, v in losses.items()},
        "max_first_loss_diff": diff, "matmul_gflops": round(peak / 1e9, 1), "threads": torch.get_num_threads(),
    }))  # fmt: skip

if __name__ == "__main__":
    main()
