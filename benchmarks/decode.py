"""Decode speed: ours vs transformers' DeepseekV3ForCausalLM, same random weights, same run.

    python benchmarks/decode.py                 # full benchmark (a few minutes on 2 cores)
    python benchmarks/decode.py --quick         # smaller, for a smoke run

Prints a table, then one JSON line. Both models are fp32 on CPU; transformers runs its own `generate` with
its DynamicCache and eager attention; ours runs deepseek.generation.loop on the static latent cache.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from deepseek import R1Config, R1ForCausalLM
from deepseek.generation.loop import decode_one_token, generate, prefill
from deepseek.model.cache import LatentCache
from deepseek.model.layout import prepare_for_decode


def bench_config() -> R1Config:
    return R1Config(
        vocab_size=32000, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
        num_hidden_layers=8, num_attention_heads=8, q_lora_rank=256, kv_lora_rank=128,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=16, num_experts_per_tok=2,
        n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1, num_nextn_predict_layers=0,
        max_position_embeddings=8192, bos_token_id=0, eos_token_id=1,
    )  # fmt: skip


def copy_bandwidth() -> float:
    a = torch.randn(32 * 2**20)
    b = torch.empty_like(a)
    b.copy_(a)
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    return 2 * a.nbytes * 10 / (time.perf_counter() - t) / 1e9


def load_both(config: R1Config):
    torch.manual_seed(0)
    ours = R1ForCausalLM(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        d = {k: v for k, v in config.to_dict().items() if k in DeepseekV3Config.__dataclass_fields__}
        d.update(num_key_value_heads=config.num_attention_heads, num_mtp_layers=0)
        DeepseekV3Config(**d).save_pretrained(tmp)
        hf = DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        ours = R1ForCausalLM.from_pretrained(tmp)
    prepare_for_decode(ours)
    return ours, hf


def time_hf(hf, ids, new):
    t = time.perf_counter()
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                      do_sample=False, pad_token_id=0)  # fmt: skip
    return out[:, ids.shape[1] :], time.perf_counter() - t


def time_ours(model, ids, new):
    t = time.perf_counter()
    out = generate(model, ids, max_new_tokens=new)
    return out.sequences[:, ids.shape[1] :], time.perf_counter() - t


@torch.inference_mode()
def long_context_latency(model, hf, ctx: int, steps: int = 8):
    """Per-token decode latency after a ctx-token prompt (prefill excluded)."""
    ids = torch.randint(3, model.config.vocab_size, (1, ctx))
    cache = LatentCache(model.config, 1, ctx + steps + 1)
    pos = torch.arange(ctx)[None]
    logits = prefill(model, ids, None, pos, cache)
    tok = logits.argmax(-1)
    t = time.perf_counter()
    for i in range(steps):
        logits = decode_one_token(model, tok, None, torch.tensor([ctx + i]), cache)
        tok = logits.argmax(-1)
    ours = (time.perf_counter() - t) / steps
    out = hf(ids, use_cache=True)
    past, tok = out.cache, out.logits[:, -1].argmax(-1)
    t = time.perf_counter()
    for _ in range(steps):
        out = hf(tok[:, None], cache=past, use_cache=True)
        past, tok = out.cache, out.logits[:, -1].argmax(-1)
    return ours, (time.perf_counter() - t) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and a 1K context")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = bench_config()
    ours, hf = load_both(config)
    new = 32 if args.quick else 128
    ctx = 1024 if args.quick else 4096
    bw = copy_bandwidth()
    rows, result = [], {"hardware": f"{platform.processor() or platform.machine()}, {args.threads} threads",
                        "copy_GBps": round(bw, 1)}  # fmt: skip
    active_bytes = ours.num_parameters(active=True) * 4 - config.vocab_size * config.hidden_size * 4  # no embed read
    for batch in (1, 16):
        torch.manual_seed(batch)
        ids = torch.randint(3, config.vocab_size, (batch, 16))
        time_ours(ours, ids, 4), time_hf(hf, ids, 4)  # warm up
        tok_o, t_o = time_ours(ours, ids, new)
        tok_h, t_h = time_hf(hf, ids, new)
        same = bool(torch.equal(tok_o, tok_h))
        tps_o, tps_h = batch * new / t_o, batch * new / t_h
        util = (active_bytes * new / t_o) / 1e9 / bw if batch == 1 else None
        rows.append((f"batch {batch}", tps_h, tps_o, tps_o / tps_h, same))
        result[f"b{batch}_hf_tok_s"] = round(tps_h, 1)
        result[f"b{batch}_ours_tok_s"] = round(tps_o, 1)
        result[f"b{batch}_speedup"] = round(tps_o / tps_h, 2)
        result[f"b{batch}_same_tokens"] = same
        if util is not None:
            result["b1_bandwidth_utilisation"] = round(util, 3)
    lat_o, lat_h = long_context_latency(ours, hf, ctx)
    result[f"ctx{ctx}_hf_ms"] = round(lat_h * 1e3, 2)
    result[f"ctx{ctx}_ours_ms"] = round(lat_o * 1e3, 2)
    result[f"ctx{ctx}_speedup"] = round(lat_h / lat_o, 2)
    print(f"{'case':<22}{'transformers':>14}{'ours':>12}{'ratio':>8}  same tokens")
    for name, h, o, r, s in rows:
        print(f"{name + ' tok/s':<22}{h:>14.1f}{o:>12.1f}{r:>7.2f}x  {s}")
    print(f"{f'decode ms @ {ctx} ctx':<22}{lat_h * 1e3:>14.2f}{lat_o * 1e3:>12.2f}{lat_h / lat_o:>7.2f}x")
    if "b1_bandwidth_utilisation" in result:
        print(f"batch-1 weight bandwidth: {result['b1_bandwidth_utilisation'] * 100:.0f}% of {bw:.1f} GB/s copy")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
