"""Does training the NSA parts (learned block summaries + branch gates) of the compressed cache do anything?

    python benchmarks/nsa_learned.py                  # ~5 min on one CPU thread (2-core machine, shared)
    python benchmarks/nsa_learned.py --quick          # a smoke run (~1 min)

1. A small byte-level model (passkey.small_config, 2 layers, D=128) is pretrained with full attention on rows
   "P P": a 192-byte passage of words drawn at random from the project's prose (deepseek/tasks/filler.py) and
   the same passage again, so the second half is predictable by copying from 192 bytes back, far beyond the
   compressed cache's window (block 16, window 64, 1 sink block, top-2 blocks per 16-query tile, coarse
   means).
2. Only the NSA parameters are then fine-tuned (everything else frozen) through the compressed training path
   (longctx.learned.compressed_attention, which equals a chunked prefill through CompressedLatentCache).
3. Held-out rows: loss (nats/byte) on the copy half and on all bytes for full attention, the compressed path
   before and after, and the compressed path through the inference cache (chunked_prefill, chunk = block,
   4-bit) after, to show the learned parameters carry over. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time

import torch
import torch.nn.functional as F

from deepseek import R1ForCausalLM
from deepseek.eval.passkey import small_config
from deepseek.model.longctx import CompressedLatentCache, enable_learned, nsa_parameters
from deepseek.tasks.filler import PROSE

WORDS = [w for w in PROSE.split() if w.isascii()]
COMPRESSION = dict(kv_block_size=16, kv_window=64, kv_sink_blocks=1, kv_topk_blocks=2, kv_quant_bits=0)


def passage(rng: random.Random, n: int) -> torch.Tensor:
    """n bytes of words drawn at random from the project's prose: spelling is learnable, word order is not."""
    text = ""
    while len(text) < n:
        text += rng.choice(WORDS) + " "
    return torch.tensor(list(text.encode("utf-8")[:n]))


def copy_rows(rng: random.Random, batch: int, half: int) -> torch.Tensor:
    """(B, 2*half) rows: a random passage, then the same passage again (predictable only by copying)."""
    rows = []
    for _ in range(batch):
        p = passage(rng, half)
        rows.append(torch.cat((p, p)))
    return torch.stack(rows)


def losses(logits_BTV: torch.Tensor, ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-byte next-token loss (B, T-1) and the mean over all bytes."""
    nll = F.cross_entropy(logits_BTV[:, :-1].transpose(1, 2).float(), ids_BT[:, 1:], reduction="none")
    return nll, nll.mean()


@torch.no_grad()
def evaluate(model, ids_BT: torch.Tensor, mode: str) -> dict:
    """Loss on all bytes and on the copy half. mode: full (plain attention), train (compressed training path),
    cache (chunked prefill through CompressedLatentCache, chunk = block)."""
    half = ids_BT.shape[1] // 2
    if mode == "full":
        model.eval()
        logits = model(ids_BT).logits
    elif mode == "train":
        model.train()
        logits = model(ids_BT).logits
        model.eval()
    else:
        model.eval()
        cache = CompressedLatentCache(model.config, ids_BT.shape[0], ids_BT.shape[1])
        b, outs = model.config.compression.block_size, []
        for s in range(0, ids_BT.shape[1], b):
            pos = torch.arange(s, min(s + b, ids_BT.shape[1]))[None].expand(ids_BT.shape[0], -1)
            outs.append(model(ids_BT[:, s : s + b], position_ids=pos, cache=cache).logits)
        logits = torch.cat(outs, 1)
    nll, mean = losses(logits, ids_BT)
    first, copy = nll[:, : half - 1].mean().item(), nll[:, half:].mean().item()
    return {"all": mean.item(), "copy": copy, "first": first}


def pretrain(model, steps: int, batch: int, half: int, lr: float, rng: random.Random) -> list[float]:
    """All parameters, full attention (kv_learned off while pretraining)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    model.train()
    out = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 20)
        ids = copy_rows(rng, batch, half)
        _, loss = losses(model(ids).logits, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        out.append(loss.item())
    return out


def finetune_nsa(model, steps: int, batch: int, half: int, lr: float, rng: random.Random) -> list[float]:
    """Only the NSA parameters, through the compressed training path."""
    params = nsa_parameters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    out = []
    for _ in range(steps):
        ids = copy_rows(rng, batch, half)
        _, loss = losses(model(ids).logits, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        out.append(loss.item())
    model.eval()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--nsa-steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--half", type=int, default=192, help="passage bytes; rows are 2x this")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--nsa-lr", type=float, default=3e-2)
    parser.add_argument("--eval-rows", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.quick:
        args.pretrain_steps, args.nsa_steps, args.eval_rows = 40, 20, 4
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = random.Random(0)
    config = small_config(max_position_embeddings=4096, **COMPRESSION)
    model = R1ForCausalLM(config)

    t0 = time.perf_counter()
    pre = pretrain(model, args.pretrain_steps, args.batch, args.half, args.lr, rng)
    t1 = time.perf_counter()
    enable_learned(model)  # zero-initialised: the training-free cache until trained
    held_out = copy_rows(random.Random(12345), args.eval_rows, args.half)
    before = {m: evaluate(model, held_out, m) for m in ("full", "train", "cache")}
    tuned = finetune_nsa(model, args.nsa_steps, args.batch, args.half, args.nsa_lr, rng)
    t2 = time.perf_counter()
    after = {m: evaluate(model, held_out, m) for m in ("train", "cache")}
    model.config.compression.quant_bits = 4
    after["cache_4bit"] = evaluate(model, held_out, "cache")
    model.config.compression.quant_bits = 0
    gates = torch.stack([layer.self_attn.nsa.gate_bias.detach() for layer in model.model.layers])  # (L, H, 3)
    sharp = [float(layer.self_attn.nsa.block_weights().detach().max()) for layer in model.model.layers]

    rows = [("full attention", before["full"]), ("compressed, training-free", before["train"]),
            ("  same, through the cache", before["cache"]),
            ("compressed, NSA params trained", after["train"]), ("  same, through the cache", after["cache"]),
            ("  same, cache 4-bit", after["cache_4bit"])]  # fmt: skip
    print(f"pretrain: {args.pretrain_steps} steps, loss {sum(pre[:10]) / 10:.3f} -> "
          f"{sum(pre[-10:]) / 10:.3f} ({t1 - t0:.0f} s); NSA fine-tune: {args.nsa_steps} steps, loss "
          f"{sum(tuned[:10]) / 10:.3f} -> "
          f"{sum(tuned[-10:]) / 10:.3f} ({t2 - t1:.0f} s)")  # fmt: skip
    print(f"\nheld-out: {args.eval_rows} rows of {2 * args.half} bytes; nats/byte (perplexity)")
    print(f"{'path':36s} {'all bytes':>18s} {'copy half':>18s}  (first half, full attention: "
          f"{before['full']['first']:.4f})")
    for name, r in rows:
        all_, copy = r["all"], r["copy"]
        print(f"{name:36s} {all_:8.4f} ({math.exp(all_):6.3f}) {copy:8.4f} ({math.exp(copy):6.3f})")
    print(f"learned gate biases [selected, coarse, recent] per layer, mean over heads: "
          f"{[[round(v, 2) for v in g] for g in gates.mean(1).tolist()]}; largest block weight per layer: "
          f"{[round(s, 3) for s in sharp]} (plain mean: {1 / config.compression.block_size:.3f})")  # fmt: skip
    result = {"hardware": f"{platform.machine()}, {args.threads} thread(s), fp32", "rows": 2 * args.half,
              "compression": COMPRESSION, "pretrain_steps": args.pretrain_steps, "nsa_steps": args.nsa_steps,
              "full_copy": before["full"]["copy"], "free_copy": before["train"]["copy"],
              "free_cache_copy": before["cache"]["copy"], "learned_copy": after["train"]["copy"],
              "learned_cache_copy": after["cache"]["copy"],
              "learned_cache4_copy": after["cache_4bit"]["copy"],
              "full_all": before["full"]["all"], "free_all": before["train"]["all"],
              "learned_all": after["train"]["all"], "learned_cache_all": after["cache"]["all"],
              "gap_closed_copy": (before["train"]["copy"] - after["train"]["copy"])
              / (before["train"]["copy"] - before["full"]["copy"]),
              "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
