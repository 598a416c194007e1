"""Decode speed: ours vs transformers' DeepseekV3ForCausalLM, same random weights, same run.

    python benchmarks/decode.py                 # full benchmark (a few minutes on 2 cores)
    python benchmarks/decode.py --quick         # smaller, for a smoke run

Prints a table, then one JSON line. Both models are fp32 on CPU; transformers runs its own `generate` with
its DynamicCache and eager attention; ours runs twice: `R1Model.generate(...)` (the transformers-style call a
user makes, deepseek/sdk.py), `deepseek.generation.loop.generate` underneath it, both on the static latent
cache, and `R1Model.generate(..., compile=True)` (the compiled decode step, deepseek/generation/compiled.py;
its one-time compile is timed separately and reported as b{batch}_compile_seconds; at batch 16 it decodes
eagerly, see compiled.pays_off). Each case is warmed up, then they alternate (A B C D A B C D ...) `--rounds`
times; medians and min-max are reported, with the machine's load. "ours" against llama.cpp is our faster path.

llama.cpp is the measured peer when it is built (python benchmarks/llamacpp.py build; --no-llamacpp skips it):
the same checkpoint converted to GGUF f32, bf16 and q8_0, run with the same threads, prompt and new-token
counts (benchmarks/llamacpp.py `bench`), one call per type inside each round. When it is not built the
benchmark says so and prints the transformers ratio as before.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from deepseek import R1Config, R1Model
from deepseek.generation.loop import decode_one_token, generate, prefill
from deepseek.model.cache import LatentCache
from deepseek.model.layout import prepare_for_decode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llamacpp  # noqa: E402  (benchmarks/llamacpp.py)


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


def load_both(config: R1Config, on_saved=None):
    """on_saved(folder) runs on our saved checkpoint before transformers' config replaces its config.json."""
    torch.manual_seed(0)
    ours = R1Model(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        if on_saved is not None:
            on_saved(tmp)
        d = {k: v for k, v in config.to_dict().items() if k in DeepseekV3Config.__dataclass_fields__}
        d.update(num_key_value_heads=config.num_attention_heads, num_mtp_layers=0)
        DeepseekV3Config(**d).save_pretrained(tmp)
        hf = DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        ours = R1Model.from_pretrained(tmp)
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


def time_sdk(model, ids, new, compile=False):
    t = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                         eos_token_id=None, pad_token_id=0, compile=compile)  # fmt: skip
    return out[:, ids.shape[1] :], time.perf_counter() - t


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
    parser.add_argument("--rounds", type=int, default=3, help="alternated timing rounds per case")
    parser.add_argument("--no-llamacpp", action="store_true", help="skip the llama.cpp peer")
    parser.add_argument("--fp16", action="store_true",
                        help="also time batch 1 with fp16 weights through compile=True, alternated with fp32 "
                             "(a 16-bit row beside llama.cpp's bf16; its compile takes ~3 min cold)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = bench_config()
    ggufs, gguf_dir = {}, None if args.no_llamacpp else tempfile.TemporaryDirectory()
    to_gguf = None if gguf_dir is None else lambda d: ggufs.update(llamacpp.prepare(d, gguf_dir.name))
    ours, hf = load_both(config, to_gguf)
    lc_rows = []  # llama.cpp: (batch, cells, our faster path's tok/s)
    new = 32 if args.quick else 128
    ctx = 1024 if args.quick else 4096
    bw = copy_bandwidth()
    rows, result = [], {"hardware": f"{platform.processor() or platform.machine()}, {args.threads} threads",
                        "copy_GBps": round(bw, 1)}  # fmt: skip
    active_bytes = ours.num_parameters(active=True) * 4 - config.vocab_size * config.hidden_size * 4  # no embed read
    cases = {"transformers": lambda ids: time_hf(hf, ids, new), "R1Model.generate": lambda ids: time_sdk(ours, ids, new),
             "loop": lambda ids: time_ours(ours, ids, new),
             "compile=True": lambda ids: time_sdk(ours, ids, new, compile=True)}  # fmt: skip
    load = open("/proc/loadavg").read().split()[0]
    for batch in (1, 16):
        torch.manual_seed(batch)
        ids = torch.randint(3, config.vocab_size, (batch, 16))
        time_ours(ours, ids, 4), time_hf(hf, ids, 4), time_sdk(ours, ids, 4)  # warm up
        t = time.perf_counter()
        time_sdk(ours, ids, 4, compile=True)  # compiles the decode step for this batch (where it pays off)
        result[f"b{batch}_compile_seconds"] = round(time.perf_counter() - t, 1)
        secs, toks = {k: [] for k in cases}, {}
        lc_runs = {t: [] for t in ggufs}
        for _ in range(args.rounds):
            for name, run in cases.items():
                toks[name], t = run(ids)
                secs[name].append(t)
            for t, path in list(ggufs.items()):  # the peer, alternated with ours; dropped on a failed run
                r = llamacpp.bench(path, args.threads, ids.shape[1], new, batch)
                if r is None:
                    del ggufs[t]
                else:
                    lc_runs[t].append(r)
        same = all(torch.equal(toks[k], toks["transformers"]) for k in cases)
        tps = {k: [batch * new / t for t in v] for k, v in secs.items()}
        med = {k: statistics.median(v) for k, v in tps.items()}
        best = max(med["loop"], med["compile=True"])  # our fastest path at this batch
        util = (active_bytes * best / batch) / 1e9 / bw if batch == 1 else None
        rows.append((f"batch {batch}", med, {k: (min(v), max(v)) for k, v in tps.items()}, same))
        result[f"b{batch}_hf_tok_s"] = round(med["transformers"], 1)
        result[f"b{batch}_sdk_tok_s"] = round(med["R1Model.generate"], 1)
        result[f"b{batch}_ours_tok_s"] = round(med["loop"], 1)
        result[f"b{batch}_sdk_speedup"] = round(med["R1Model.generate"] / med["transformers"], 2)
        result[f"b{batch}_speedup"] = round(med["loop"] / med["transformers"], 2)
        result[f"b{batch}_compiled_tok_s"] = round(med["compile=True"], 1)
        result[f"b{batch}_compiled_speedup"] = round(med["compile=True"] / med["transformers"], 2)
        result[f"b{batch}_same_tokens"] = same
        if util is not None:
            result["b1_bandwidth_utilisation"] = round(util, 3)
            result["b1_ours_GBps"] = round(active_bytes * best / 1e9, 2)
        if lc_runs:
            cells = llamacpp.summarise(batch, lc_runs, best, active_bytes, result)
            lc_rows.append((batch, cells, best))
    half_line = None
    if args.fp16:  # 16-bit weights, batch 1, compiled: alternated with the fp32 compiled step
        half = copy.deepcopy(ours).half()
        torch.manual_seed(1)
        ids = torch.randint(3, config.vocab_size, (1, 16))
        t = time.perf_counter()
        time_sdk(half, ids, 4, compile=True)
        result["b1_fp16_compile_seconds"] = round(time.perf_counter() - t, 1)
        runs = {"fp32": [], "fp16": []}
        for _ in range(args.rounds):
            runs["fp32"].append(new / time_sdk(ours, ids, new, compile=True)[1])
            runs["fp16"].append(new / time_sdk(half, ids, new, compile=True)[1])
        med = {k: statistics.median(v) for k, v in runs.items()}
        result["b1_fp16_compiled_tok_s"] = round(med["fp16"], 1)
        for t in ("f32", "bf16"):
            if f"b1_llamacpp_{t}_tok_s" in result:
                result[f"b1_fp16_vs_llamacpp_{t}"] = round(med["fp16"] / result[f"b1_llamacpp_{t}_tok_s"], 2)
        half_line = (f"batch 1, compile=True: fp16 weights {med['fp16']:.1f} [{min(runs['fp16']):.0f}-"
                     f"{max(runs['fp16']):.0f}] tok/s vs fp32 {med['fp32']:.1f} [{min(runs['fp32']):.0f}-"
                     f"{max(runs['fp32']):.0f}] (alternated; fp16 tokens are not fp32's)")  # fmt: skip
    result["rounds"], result["load_at_start"] = args.rounds, float(load)
    lat_o, lat_h = long_context_latency(ours, hf, ctx)
    result[f"ctx{ctx}_hf_ms"] = round(lat_h * 1e3, 2)
    result[f"ctx{ctx}_ours_ms"] = round(lat_o * 1e3, 2)
    result[f"ctx{ctx}_speedup"] = round(lat_h / lat_o, 2)
    print(f"machine load (1-min average) at start: {load} on {os.cpu_count()} cores; medians of {args.rounds} "
          "alternated rounds, min-max in brackets")  # fmt: skip
    print(f"{'case':<14}" + "".join(f"{k:>22}" for k in cases) + f"{'sdk/hf':>8}{'compiled/hf':>12}  same tokens")
    for name, med, span, same in rows:
        cells = "".join(f"{med[k]:>9.1f} [{span[k][0]:.0f}-{span[k][1]:.0f}]".rjust(22) for k in cases)
        print(f"{name + ' tok/s':<14}{cells}{med['R1Model.generate'] / med['transformers']:>7.2f}x"
              f"{med['compile=True'] / med['transformers']:>11.2f}x  {same}")  # fmt: skip
    print(f"{f'decode ms @ {ctx}':<14}{lat_h * 1e3:>22.2f}{'':>22}{lat_o * 1e3:>22.2f}{lat_h / lat_o:>7.2f}x")
    if "b1_bandwidth_utilisation" in result:
        print(f"batch-1 weight bandwidth: {result['b1_bandwidth_utilisation'] * 100:.0f}% of {bw:.1f} GB/s copy "
              f"({result['b1_ours_GBps']:.1f} GB/s)")  # fmt: skip
    if half_line:
        print(half_line)
    if lc_table := llamacpp.table(lc_rows, args.threads, 16, bw, result):
        print(lc_table)
    elif not args.no_llamacpp:
        print("llama.cpp: no figures (see above); transformers ratio only")
    if gguf_dir is not None:
        gguf_dir.cleanup()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
