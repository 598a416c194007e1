"""Serving throughput: our HTTP server (continuous batching) vs transformers' `generate`, same weights, same run.

    python benchmarks/serve.py                    # 1, 8, 32 concurrent requests (several minutes on 2 cores)
    python benchmarks/serve.py --quick            # fewer, shorter requests
    python benchmarks/serve.py --usd-per-hour 0.05 --plot docs/serving_throughput.png

Ours: `deepseek serve`'s app under uvicorn on loopback, clients stream /v1/completions over HTTP (token-id
prompts, greedy, ignore_eos so every request makes exactly --new tokens). Peer: transformers'
DeepseekV3ForCausalLM with the same weights, (a) one request at a time, (b) one static batch of 32.
Reports aggregate tokens/s and tokens/minute, time to first token, p50/p99 latency, and cost per 1K tokens
from --usd-per-hour. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from tqdm import tqdm
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, PreTrainedTokenizerFast

from deepseek import R1Config, R1ForCausalLM
from deepseek.serve.api import create_app
from deepseek.serve.engine import Engine, EngineConfig


def bench_config(vocab: int) -> R1Config:
    return R1Config(
        vocab_size=vocab, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
        num_hidden_layers=6, num_attention_heads=8, q_lora_rank=256, kv_lora_rank=128,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=16, num_experts_per_tok=2,
        n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1, num_nextn_predict_layers=0,
        max_position_embeddings=4096, bos_token_id=0, eos_token_id=1,
    )  # fmt: skip


def word_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with `vocab` entries (the served folder needs one; prompts are sent as ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<bos>": 0, "<eos>": 1, "<pad>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def load_both(config: R1Config, folder: Path):
    torch.manual_seed(0)
    R1ForCausalLM(config).eval().save_pretrained(folder)
    word_tokenizer(config.vocab_size).save_pretrained(folder)
    d = {k: v for k, v in config.to_dict().items() if k in DeepseekV3Config.__dataclass_fields__}
    d.update(num_key_value_heads=config.num_attention_heads, num_mtp_layers=0)
    DeepseekV3Config(**d).save_pretrained(folder)
    hf = DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return hf


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


# ---------------------------------------------------------------------------- ours, over HTTP
async def one_request(client, url, model, prompt, new):
    body = {"model": model, "prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    ttft, usage = None, None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and ttft is None:
                ttft = time.perf_counter() - t0
            usage = chunk.get("usage") or usage
    return ttft, time.perf_counter() - t0, usage["completion_tokens"]


async def run_load(url, model, prompts, new, concurrency):
    """`concurrency` clients, each sending its share of prompts back to back."""
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        queue = list(prompts)
        results = []

        async def worker():
            while queue:
                results.append(await one_request(client, url, model, queue.pop(), new))

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    return results, wall


# ---------------------------------------------------------------------------- main
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter prompts/outputs, fewer requests")
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--new", type=int, default=None, help="tokens generated per request")
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--usd-per-hour", type=float, default=0.10, help="hardware price for cost per 1K tokens")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--plot", default="docs/serving_throughput.png")
    args = parser.parse_args()
    if args.usd_per_hour <= 0:
        parser.error(f"--usd-per-hour must be > 0, got {args.usd_per_hour}")
    torch.set_num_threads(args.threads)
    prompt_len = args.prompt_len or (16 if args.quick else 32)
    new = args.new or (16 if args.quick else 64)
    levels = (1, 8, 32)
    config = bench_config(args.vocab)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, args.vocab, (prompt_len,), generator=g).tolist() for _ in range(32)]

    with tempfile.TemporaryDirectory() as tmp:
        hf = load_both(config, Path(tmp))
        engine = Engine.from_pretrained(tmp, EngineConfig(max_running=32, max_model_len=prompt_len + new + 8))
    app = create_app(engine, billing=None, auth=False)
    rows, result = [], {"hardware": f"{platform.machine()} CPU, {args.threads} threads, fp32",
                        "prompt_len": prompt_len, "new_tokens": new, "usd_per_hour": args.usd_per_hour}  # fmt: skip

    # transformers, one request at a time and one static batch of 32
    n_single = 2 if args.quick else 4
    ids_all = torch.tensor(prompts)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=2)
    with torch.inference_mode():
        hf.generate(ids_all[:1, :4], attention_mask=torch.ones(1, 4, dtype=torch.long), max_new_tokens=2,
                    do_sample=False, pad_token_id=2)  # warm-up
        lat = []
        hf_first = None
        for i in tqdm(range(n_single), desc="transformers one at a time"):
            t = time.perf_counter()
            out = hf.generate(ids_all[i : i + 1], attention_mask=torch.ones(1, prompt_len, dtype=torch.long), **kw)
            lat.append(time.perf_counter() - t)
            hf_first = out[0, prompt_len:].tolist() if i == 0 else hf_first
        hf1_tps = n_single * new / sum(lat)
        t = time.perf_counter()
        hf.generate(ids_all, attention_mask=torch.ones_like(ids_all), **kw)
        hfb_wall = time.perf_counter() - t
    hfb_tps = 32 * new / hfb_wall
    rows.append(("transformers, one at a time", 1, hf1_tps, None, statistics.median(lat), max(lat)))
    rows.append(("transformers, static batch 32", 32, hfb_tps, None, hfb_wall, hfb_wall))

    # ours over HTTP
    import uvicorn

    with _socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    asyncio.run(run_load(url, engine.model_name, prompts[:2], 4, 2))  # warm-up
    ours_first = engine.generate(prompts[0], _greedy(new)).token_ids
    result["same_tokens_as_transformers"] = ours_first == hf_first
    ours = {}
    for c in tqdm(levels, desc="ours, concurrency levels"):
        n_req = max(c, 2 if args.quick else 4) if c == 1 else c
        res, wall = asyncio.run(run_load(url, engine.model_name, prompts[:n_req], new, c))
        tokens = sum(r[2] for r in res)
        assert tokens == n_req * new, f"expected {n_req * new} tokens, got {tokens}"
        tps = tokens / wall
        ttfts, lats = [r[0] for r in res], [r[1] for r in res]
        ours[c] = tps
        rows.append((f"ours, {c} concurrent", c, tps, statistics.median(ttfts), percentile(lats, 50),
                     percentile(lats, 99)))  # fmt: skip
        result[f"c{c}_tok_s"] = round(tps, 1)
        result[f"c{c}_tok_per_min"] = round(tps * 60)
        result[f"c{c}_ttft_p50_ms"] = round(statistics.median(ttfts) * 1e3, 1)
        result[f"c{c}_latency_p50_s"] = round(percentile(lats, 50), 3)
        result[f"c{c}_latency_p99_s"] = round(percentile(lats, 99), 3)
        result[f"c{c}_usd_per_1k_tokens"] = round(args.usd_per_hour / (tps * 3600 / 1000), 6)
    server.should_exit = True
    th.join(timeout=30)
    engine.close()
    result["hf_one_at_a_time_tok_s"] = round(hf1_tps, 1)
    result["hf_static_batch32_tok_s"] = round(hfb_tps, 1)
    result["c32_vs_hf_one_at_a_time"] = round(ours[32] / hf1_tps, 2)
    result["c32_vs_hf_static_batch"] = round(ours[32] / hfb_tps, 2)
    result["target_10x_one_at_a_time_met"] = ours[32] / hf1_tps >= 10
    result["target_1p5x_static_batch_met"] = ours[32] / hfb_tps >= 1.5

    print(f"{'system':<32}{'conc':>5}{'tok/s':>9}{'tok/min':>10}{'TTFT p50':>10}{'lat p50':>9}{'lat p99':>9}"
          f"{'$/1K tok':>11}")  # fmt: skip
    for name, c, tps, ttft, p50, p99 in rows:
        ttft_s = f"{ttft * 1e3:.0f}ms" if ttft is not None else "-"
        cost = args.usd_per_hour / (tps * 3600 / 1000)
        print(f"{name:<32}{c:>5}{tps:>9.1f}{tps * 60:>10.0f}{ttft_s:>10}{p50:>8.2f}s{p99:>8.2f}s{cost:>11.6f}")
    print(f"ours @32 vs transformers one-at-a-time: {result['c32_vs_hf_one_at_a_time']}x (target 10x); "
          f"vs static batch: {result['c32_vs_hf_static_batch']}x (target 1.5x)")  # fmt: skip
    if args.plot:
        plot(args.plot, ours, hf1_tps, hfb_tps, result["hardware"])
    print(json.dumps(result))


def _greedy(new):
    from deepseek.serve.sequence import SamplingParams

    return SamplingParams(max_tokens=new, ignore_eos=True)


def _socket():
    import socket

    return socket.socket()


def plot(path, ours, hf1, hfb, hardware):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    levels = sorted(ours)
    ax.plot(levels, [ours[c] for c in levels], "o-", label="ours (HTTP, continuous batching)")
    ax.axhline(hf1, color="gray", ls="--", label="transformers generate, one at a time")
    ax.axhline(hfb, color="black", ls=":", label="transformers generate, static batch 32")
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("aggregate tokens / s")
    ax.set_title(f"Serving throughput ({hardware})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
