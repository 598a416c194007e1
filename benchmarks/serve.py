"""Serving throughput: our HTTP server (continuous batching) vs transformers' `generate`, same weights, same run.

    python benchmarks/serve.py                    # 1, 8, 32 concurrent requests (several minutes on 2 cores)
    python benchmarks/serve.py --quick            # fewer, shorter requests
    python benchmarks/serve.py --system-prompt-tokens 500   # a shared system prompt: prefix cache on vs off
    python benchmarks/serve.py --usd-per-hour 0.05 --plot docs/serving_throughput.png

Ours: `deepseek serve`'s app under uvicorn on loopback, clients stream /v1/completions over HTTP (token-id
prompts, greedy, ignore_eos so every request makes exactly --new tokens). Peer: transformers'
DeepseekV3ForCausalLM with the same weights, (a) one request at a time, (b) one static batch of 32.
Both are warmed up at the measured batch size first, then measured in alternating rounds (peer, ours, peer,
ours, ...; --rounds, at least 3), so neither is timed first and cold; each figure is the median over rounds
with its min-max. With --system-prompt-tokens N every prompt starts with the same N tokens, and a second
engine with the prefix cache off (EngineConfig(prefix_cache_tokens=0)) joins each round, so the table shows
TTFT with the prefix cache on vs off. The load average (/proc/loadavg) is printed at the start and the end:
figures from a loaded machine are not comparable. Reports aggregate tokens/s and tokens/minute, time to first
token, p50/p99 latency, and cost per 1K tokens from --usd-per-hour. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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


# ---------------------------------------------------------------------------- measuring
def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


@contextlib.contextmanager
def served(engine):
    """The engine's app under uvicorn on a free loopback port; yields its URL."""
    import uvicorn

    app = create_app(engine, billing=None, auth=False)
    with _socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        th.join(timeout=30)


def peer_round(hf, ids_all, n_single, new):
    """transformers: n_single requests one at a time, then one static batch of 32. Returns
    (tok/s one at a time, per-request latencies, tok/s batch, batch wall)."""
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=2)
    T = ids_all.shape[1]
    lat = []
    with torch.inference_mode():
        for i in range(n_single):
            t = time.perf_counter()
            hf.generate(ids_all[i : i + 1], attention_mask=torch.ones(1, T, dtype=torch.long), **kw)
            lat.append(time.perf_counter() - t)
        t = time.perf_counter()
        hf.generate(ids_all, attention_mask=torch.ones_like(ids_all), **kw)
        wall = time.perf_counter() - t
    return n_single * new / sum(lat), lat, len(ids_all) * new / wall, wall


def ours_round(url, model, prompts, new, c, n_req):
    """c concurrent streaming clients over HTTP. Returns (tok/s, TTFT p50, latency p50, latency p99)."""
    res, wall = asyncio.run(run_load(url, model, prompts[:n_req], new, c))
    tokens = sum(r[2] for r in res)
    assert tokens == n_req * new, f"expected {n_req * new} tokens, got {tokens}"
    ttfts, lats = [r[0] for r in res], [r[1] for r in res]
    return tokens / wall, statistics.median(ttfts), percentile(lats, 50), percentile(lats, 99)


def spread(xs) -> tuple[float, float, float]:
    """(median, min, max) over rounds."""
    return statistics.median(xs), min(xs), max(xs)


# ---------------------------------------------------------------------------- main
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter prompts/outputs, fewer requests")
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--new", type=int, default=None, help="tokens generated per request")
    parser.add_argument("--system-prompt-tokens", type=int, default=0,
                        help="the same N-token system prefix before every prompt (prefix cache on vs off)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating peer / ours rounds (at least 3)")
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--usd-per-hour", type=float, default=0.10, help="hardware price for cost per 1K tokens")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--plot", default="docs/serving_throughput.png")
    args = parser.parse_args()
    if args.usd_per_hour <= 0:
        parser.error(f"--usd-per-hour must be > 0, got {args.usd_per_hour}")
    if args.rounds < 3 or args.system_prompt_tokens < 0:
        parser.error("--rounds must be >= 3 and --system-prompt-tokens >= 0")
    torch.set_num_threads(args.threads)
    load_start = loadavg()
    print(f"load average at start: {load_start}", flush=True)
    prompt_len = args.prompt_len or (16 if args.quick else 32)
    new = args.new or (16 if args.quick else 64)
    n_sys = args.system_prompt_tokens
    levels = (1, 8, 32)
    config = bench_config(args.vocab)
    g = torch.Generator().manual_seed(0)
    system = torch.randint(3, args.vocab, (n_sys,), generator=g).tolist()

    def fresh_prompts(n):  # new user parts every time: only the system prompt may hit the prefix cache
        return [system + torch.randint(3, args.vocab, (prompt_len,), generator=g).tolist() for _ in range(n)]

    T = n_sys + prompt_len  # every prompt's length

    engines = {}  # "ours" (prefix cache on, the default) and, with a system prompt, "ours, prefix cache off"
    with tempfile.TemporaryDirectory() as tmp:
        hf = load_both(config, Path(tmp))
        engines["ours"] = Engine.from_pretrained(tmp, EngineConfig(max_running=32, max_model_len=T + new + 8))
        if n_sys:
            off = EngineConfig(max_running=32, max_model_len=T + new + 8, prefix_cache_tokens=0)
            engines["ours, prefix cache off"] = Engine.from_pretrained(tmp, off)
    result = {"hardware": f"{platform.machine()} CPU, {args.threads} threads, fp32", "prompt_len": T,
              "system_prompt_tokens": n_sys, "new_tokens": new, "usd_per_hour": args.usd_per_hour,
              "rounds": args.rounds, "loadavg_start": load_start}  # fmt: skip
    n_single = 2 if args.quick else 4
    prompts = fresh_prompts(32)  # the warm-up's
    ids_all = torch.tensor(prompts)
    with contextlib.ExitStack() as stack:
        urls = {name: stack.enter_context(served(e)) for name, e in engines.items()}
        name0 = engines["ours"].model_name
        # warm-up at the measured batch sizes: the peer's batch of 32 and one request, ours at 32 concurrent
        with torch.inference_mode():
            first = hf.generate(ids_all, attention_mask=torch.ones_like(ids_all), max_new_tokens=new,
                                min_new_tokens=new, do_sample=False, pad_token_id=2)  # fmt: skip
        peer_round(hf, ids_all[:1], 1, 2)
        hf_first = first[0, T:].tolist()
        for url in urls.values():
            asyncio.run(run_load(url, name0, prompts, new, 32))
        ours_first = engines["ours"].generate(prompts[0], _greedy(new)).token_ids
        result["same_tokens_as_transformers"] = ours_first == hf_first
        peer = {"one": [], "lat": [], "batch": [], "wall": []}
        ours = {(name, c): [] for name in engines for c in levels}  # -> [(tok/s, ttft, p50, p99)] per round
        for _ in tqdm(range(args.rounds), desc="rounds (peer, ours, ...)"):
            prompts = fresh_prompts(32 + 8 + max(2, n_single))  # a disjoint slice per concurrency level
            by_level = {32: prompts[:32], 8: prompts[32:40], 1: prompts[40:]}
            one, lat, batch, wall = peer_round(hf, torch.tensor(by_level[32]), n_single, new)
            for key, x in (("one", one), ("lat", statistics.median(lat)), ("batch", batch), ("wall", wall)):
                peer[key].append(x)
            for name, url in urls.items():
                for c in levels:
                    n_req = max(c, n_single) if c == 1 else c
                    ours[(name, c)].append(ours_round(url, name0, by_level[c], new, c, n_req))
    for e in engines.values():
        e.close()
    result["loadavg_end"] = loadavg()

    rows = [("transformers, one at a time", 1, spread(peer["one"]), None, spread(peer["lat"]), None),
            ("transformers, static batch 32", 32, spread(peer["batch"]), None, spread(peer["wall"]), None)]
    for (name, c), rs in ours.items():
        tps, ttft, p50, p99 = (spread([r[k] for r in rs]) for k in range(4))
        rows.append((f"{name}, {c} concurrent", c, tps, ttft, p50, p99))
        key = f"c{c}" if name == "ours" else f"c{c}_noprefix"
        result[f"{key}_tok_s"] = round(tps[0], 1)
        result[f"{key}_tok_s_min_max"] = [round(tps[1], 1), round(tps[2], 1)]
        result[f"{key}_tok_per_min"] = round(tps[0] * 60)
        result[f"{key}_ttft_p50_ms"] = round(ttft[0] * 1e3, 1)
        result[f"{key}_ttft_p50_ms_min_max"] = [round(ttft[1] * 1e3, 1), round(ttft[2] * 1e3, 1)]
        result[f"{key}_latency_p50_s"] = round(p50[0], 3)
        result[f"{key}_latency_p99_s"] = round(p99[0], 3)
        result[f"{key}_usd_per_1k_tokens"] = round(args.usd_per_hour / (tps[0] * 3600 / 1000), 6)
    hf1_tps, hfb_tps = spread(peer["one"])[0], spread(peer["batch"])[0]
    ours32 = result["c32_tok_s"]
    result["hf_one_at_a_time_tok_s"] = round(hf1_tps, 1)
    result["hf_static_batch32_tok_s"] = round(hfb_tps, 1)
    result["c32_vs_hf_one_at_a_time"] = round(ours32 / hf1_tps, 2)
    result["c32_vs_hf_static_batch"] = round(ours32 / hfb_tps, 2)
    result["target_10x_one_at_a_time_met"] = ours32 / hf1_tps >= 10
    result["target_1p5x_static_batch_met"] = ours32 / hfb_tps >= 1.5
    result["target_ttft_c32_1s_met"] = result["c32_ttft_p50_ms"] <= 1000
    if n_sys:
        gain = result["c32_noprefix_ttft_p50_ms"] / result["c32_ttft_p50_ms"]
        result["c32_prefix_cache_ttft_gain"] = round(gain, 2)
        result["target_prefix_cache_3x_met"] = gain >= 3
    result["prefix_hit_tokens_incl_warmup"] = engines["ours"].stats["prefix_hit_tokens"]

    def rng(x, fmt, scale=1.0):
        return "-" if x is None else f"{x[0] * scale:{fmt}} ({x[1] * scale:{fmt}}-{x[2] * scale:{fmt}})"

    print(f"medians over {args.rounds} alternating rounds (min-max); prompt {T} tokens"
          f"{f' ({n_sys} shared system tokens)' if n_sys else ''}, {new} new")
    print(f"{'system':<44}{'conc':>5}{'tok/s':>22}{'TTFT p50 ms':>20}{'lat p50 s':>20}{'lat p99 s':>10}"
          f"{'$/1K tok':>11}")  # fmt: skip
    for name, c, tps, ttft, p50, p99 in rows:
        cost = args.usd_per_hour / (tps[0] * 3600 / 1000)
        p99_s = "-" if p99 is None else f"{p99[0]:.2f}"
        print(f"{name:<44}{c:>5}{rng(tps, '.1f'):>22}{rng(ttft, '.0f', 1e3):>20}{rng(p50, '.2f'):>20}{p99_s:>10}"
              f"{cost:>11.6f}")  # fmt: skip
    print(f"ours @32 vs transformers one-at-a-time: {result['c32_vs_hf_one_at_a_time']}x (target 10x); "
          f"vs static batch: {result['c32_vs_hf_static_batch']}x (target 1.5x); "
          f"TTFT p50 @32: {result['c32_ttft_p50_ms']:.0f} ms (target <= 1000)")  # fmt: skip
    if n_sys:
        print(f"prefix cache @32: TTFT p50 {result['c32_noprefix_ttft_p50_ms']:.0f} ms off -> "
              f"{result['c32_ttft_p50_ms']:.0f} ms on = {result['c32_prefix_cache_ttft_gain']}x (target 3x)")
    print(f"load average at start: {load_start}; at end: {result['loadavg_end']}")
    if args.plot:
        plot(args.plot, {c: result[f"c{c}_tok_s"] for c in levels}, hf1_tps, hfb_tps, result["hardware"])
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
