"""Long context, four attention types side by side: cache bytes, peak RSS, prefill time and decode latency.

    python benchmarks/long_context_all.py                        # 4K,16K,32K,64K,128K,1M, all four types
    python benchmarks/long_context_all.py --quick                # 4K and 16K only
    python benchmarks/long_context_all.py --lengths 4K,64K --types full,v4 --plot ""

Types (tiny random-weight models, fp32, batch 1, the same machine):

    full        V3 MLA, the full latent cache (deepseek.model.cache.LatentCache): C + R numbers per token and layer
    compressed  V3 MLA, the hierarchical compressed latent cache (longctx: make_cache(compressed=True))
    sparse      V3.2 sparse attention: the same MLA model plus the lightning indexer (R1Config index_*), its keys
                (I numbers per token and layer) in the LatentCache next to the latent
    v4          V4 compressed attention (deepseek/model/v4, V4Cache): a sliding window, one CSA layer (an entry per
                4 tokens, lightning indexer over its own compressed keys) and one HCA layer (an entry per 128)

Configs, chosen to be as alike as the architectures allow. The three V3 types are one model: eval.passkey's
small_config (2 layers, hidden 128, 4 heads, C=64, R=16, nope 32, v 32, dense MLPs) with q_lora_rank=64 (the
indexer reads the q latent, so all three V3 types get it); sparse adds index_n_heads=4, index_head_dim=32,
index_topk=2048 (V3.2's published topk); compressed uses the defaults of long_context.py (block 64, 1 sink block,
window 512, top-16 blocks, 4-bit). V4: 2 layers (CSA m=4, then HCA m=128, the published rates), hidden 128,
4 heads, one shared K = V head of head_dim 64 whose last 16 dims are rotary (V4's 512 vs V3's 512 + 64 shrunk
alike), q_lora_rank 64, sliding_window 128, index 4 heads x 32, index_topk 512 (published; 512 entries cover
2048 tokens, V3.2's budget), hc_mult 4, o_groups 2 x o_lora 32, MoE of 4 routed experts (2 active) + 1 shared,
the first layer hash-routed (V4 has no dense-MLP layers; the FFN is a small part of a long-context step).
Vocabulary 256 everywhere. What one decode step reads at long context: full, every position; sparse, 2048 latents
after its indexer scored every position (I=32 per token); compressed, ~1.6K positions (sinks, 16 blocks, window)
plus one mean per 64-token block; v4, the 128-token window plus 512 selected CSA entries (its indexer scores
every CSA entry, then the step gathers the 512 it chose) and every HCA entry (one per 128 tokens).

Measurements, per (type, length), each in its own fresh process (multiprocessing spawn, so peak RSS is its own):
- cache bytes: the sum of the bytes of every distinct tensor storage the cache object holds (walked, storages
  counted once; a view keeps its whole storage alive, so that is what is counted), read after the decode
  rounds; bytes / token / layer divides it by the positions the cache holds or has allocated (the static caches
  are allocated for exactly length + decode steps) and by the layers.
- peak RSS (ru_maxrss of that process: model, cache, prefill activations and decode).
- prefill: chunked prefill (LatentCache / CompressedLatentCache: longctx.chunked_prefill; V4: the same loop over
  V4Model with its V4Cache, which carries windows and pending compressor state between chunks). Prefill of
  full and sparse is quadratic and that of v4 is (T^2 / 8 CSA entry pairs); above --prefill-max for the type
  the cache is instead filled with random values of the right shapes through the cache's own write path
  (LatentCache: its tensors; CompressedLatentCache: append + seal, which quantises and summarises; V4Cache: the
  layers' own window_keys and Compressor.entries on random hidden states) and prefill is reported "skipped".
  Decode time does not depend on the values. Defaults: full and sparse run prefill up to 32K, v4 up to 64K,
  compressed up to 128K; 1M is filled for every type (the compressed prefill would take ~20 min there).
- decode: per-token latency of one forward + lm_head + argmax at positions length, length + 1, ...

Decode timing honours "warm both up, alternate them at least three times, report medians and min-max": for one
length, the processes of all types are started one after another (each runs its prefill alone while the others,
already set up, sit idle on a pipe), then this parent process drives them: every type runs --warmup untimed
steps, then --rounds rounds (>= 3) in which each type in turn runs --steps timed steps (>= 8), the order rotated
every round (ABCD, BCDA, CDAB, ...). Only one process computes at a time. Reported: the median over all timed
steps, min and max, and each round's median. A case whose estimated memory does not fit in what is available
(all the processes of a length are alive together) is skipped with the reason printed.

Prints the load average at start and end, a markdown table, then ONE JSON line; plots cache bytes and decode
latency vs length (log axes) to --plot.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
import traceback

TYPES = ("full", "compressed", "sparse", "v4")
LABELS = {"full": "V3 MLA, full latent cache", "compressed": "V3 MLA, compressed latent cache",
          "sparse": "V3.2 sparse (lightning indexer)", "v4": "V4 compressed (window + CSA + HCA)"}  # fmt: skip
DEFAULT_LENGTHS = "4K,16K,32K,64K,128K,1M"
QUICK_LENGTHS = (4096, 16384)
# longest prefill run per type (tokens); above it the cache is filled with random values (prefill "skipped")
DEFAULT_PREFILL_MAX = {"full": 32768, "compressed": 131072, "sparse": 32768, "v4": 65536}
DENSE_CHUNK, V4_CHUNK = 512, 512  # prefill chunks of the quadratic types (activations ~ chunk x length)
FILL_CHUNK = 16384  # tokens per write when filling a cache with random values
BASE_PROCESS_BYTES = 700 * 2**20  # torch + the model + allocator slack, per process (measured ~400-600 MiB)


# ---------------------------------------------------------------------------- configs
def v3_config(kind: str, max_len: int):
    from deepseek.eval.passkey import small_config

    kw = dict(q_lora_rank=64, max_position_embeddings=max(max_len, 131072 + 512))
    if kind == "sparse":
        kw.update(index_topk=2048, index_n_heads=4, index_head_dim=32)
    if kind == "compressed":
        kw.update(kv_compress=True)
    return small_config(**kw)


def v4_config(max_len: int):
    from deepseek.model.v4 import V4Config

    return V4Config(vocab_size=256, hidden_size=128, moe_intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=1, head_dim=64, q_lora_rank=64, qk_rope_head_dim=16,
                    num_experts_per_tok=2, n_routed_experts=4, n_shared_experts=1, compress_ratios=[4, 128],
                    hc_mult=4, hc_sinkhorn_iters=20, num_hash_layers=1, sliding_window=128, o_groups=2,
                    o_lora_rank=32, index_n_heads=4, index_head_dim=32, index_topk=512,
                    max_position_embeddings=max(max_len, 131072 + 512), bos_token_id=0, eos_token_id=1,
                    pad_token_id=0)  # fmt: skip


def config_for(kind: str, max_len: int):
    return v4_config(max_len) if kind == "v4" else v3_config(kind, max_len)


def build_model(kind: str, max_len: int):
    import torch

    torch.manual_seed(0)
    config = config_for(kind, max_len)
    if kind != "v4":
        from deepseek import R1ForCausalLM

        return R1ForCausalLM(config).eval()
    from deepseek.model.v4 import V4ForCausalLM

    model = V4ForCausalLM(config).eval()
    with torch.no_grad():  # many V4 parameters start at zero (hyper-connections, experts): random weights instead
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.stack([torch.randperm(config.n_routed_experts)[: config.num_experts_per_tok]
                                     for _ in range(b.shape[0])]))  # fmt: skip
    return model


def estimate_bytes(kind: str, length: int, prefill: bool) -> int:
    """A rough upper estimate of one case's peak memory (process base + cache + prefill or decode work)."""
    cfg = config_for(kind, length)
    L, T = cfg.num_hidden_layers, length
    if kind == "v4":
        E, I, H, G = cfg.head_dim, cfg.index_head_dim, cfg.num_attention_heads, cfg.index_n_heads
        cache = L * cfg.sliding_window * E * 4 + T / 4 * (E + I) * 4 + T / 128 * E * 4
        work = (V4_CHUNK * (T / 4 + 2 * V4_CHUNK) * (H + G) * 4 * 4) if prefill else T / 4 * H * 4 * 6
    else:
        K, H = cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.num_attention_heads
        if kind == "compressed":
            c = cfg.compression
            cache = L * (T * (K * c.quant_bits / 8 + 8 * K / c.quant_group + 8 * K / c.block_size)
                         + (c.window + 2 * c.block_size + cfg.prefill_chunk) * K * 4)  # fmt: skip
            work = 256 * 2**20
        else:
            I = cfg.indexer.head_dim if cfg.indexer is not None else 0
            cache = L * T * (K + I) * 4
            G = cfg.indexer.n_heads if cfg.indexer is not None else 0
            work = (DENSE_CHUNK * T * (H + G) * 4 * 4) if prefill else T * (H + G) * 4 * 6
    return int(BASE_PROCESS_BYTES + cache + work)


def available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


# ---------------------------------------------------------------------------- accounting
def held_bytes(cache) -> int:
    """Bytes of every distinct tensor storage reachable from the cache object (attributes, lists, dicts,
    dataclasses), each storage counted once: what the cache keeps alive."""
    import torch

    storages: set[int] = set()
    visited: set[int] = set()
    total = 0

    def walk(x):
        nonlocal total
        if isinstance(x, torch.Tensor):
            st = x.untyped_storage()
            if st.nbytes() and st.data_ptr() not in storages:
                storages.add(st.data_ptr())
                total += st.nbytes()
            return
        if id(x) in visited or isinstance(x, (str, bytes, int, float, bool, type(None), torch.device, torch.dtype)):
            return
        visited.add(id(x))
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple, set, frozenset)):
            for v in x:
                walk(v)
        elif hasattr(x, "__dict__"):
            for v in vars(x).values():
                walk(v)

    walk(cache)
    return total


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------- one case
class Case:
    """One (type, length): the model and its cache, prefilled (or filled), then decode steps on demand.
    `total_steps` decode positions are reserved after the prompt (warm-up + rounds x steps)."""

    def __init__(self, kind: str, length: int, total_steps: int, prefill_max: int, progress: bool = False):
        import torch

        if kind not in TYPES:
            raise ValueError(f"unknown type {kind!r}; known: {', '.join(TYPES)}")
        self.kind, self.length, self.total_steps = kind, length, total_steps
        self.prefill_max, self.progress = prefill_max, progress
        self.positions = length + total_steps
        self.model = build_model(kind, self.positions)
        self.config = self.model.config
        self.rss_model = peak_rss_bytes()
        self.pos = length
        self.tok = torch.zeros(1, dtype=torch.long)
        self.cache = self.new_cache()

    def new_cache(self):
        if self.kind == "v4":
            from deepseek.model.v4 import V4Cache

            return V4Cache(self.config, max_len=self.positions)
        from deepseek.model.longctx import make_cache

        return make_cache(self.config, 1, self.positions, compressed=self.kind == "compressed")

    # -------------------------------------------------------------- filling the cache
    def setup(self) -> dict:
        import torch

        with torch.inference_mode():
            t = time.perf_counter()
            if self.length <= self.prefill_max:
                g = torch.Generator().manual_seed(1)
                ids = torch.randint(3, self.config.vocab_size, (1, self.length), generator=g)
                logits = self.prefill(ids)
                self.tok = logits.argmax(-1)
                prefill_s, how = time.perf_counter() - t, "run"
            else:
                self.fill_random()
                self.tok = torch.tensor([7])
                prefill_s, how = None, "skipped"
        fill_s = time.perf_counter() - t
        return {"prefill_s": None if prefill_s is None else round(prefill_s, 2), "prefill": how,
                "fill_s": round(fill_s, 2), "rss_after_model_bytes": self.rss_model,
                "rss_after_prefill_bytes": peak_rss_bytes()}  # fmt: skip

    def prefill(self, ids):
        from deepseek.model.longctx import chunked_prefill

        if self.kind == "v4":
            return self.prefill_v4(ids, V4_CHUNK)
        chunk = self.config.prefill_chunk if self.kind == "compressed" else DENSE_CHUNK
        return chunked_prefill(self.model, ids, self.cache, chunk=chunk, progress=self.progress)

    def prefill_v4(self, ids, chunk: int):
        """longctx.chunked_prefill's loop for V4Model: the V4Cache carries windows and pending windows across."""
        import torch
        from tqdm.auto import tqdm

        T = ids.shape[1]
        h = None
        with tqdm(total=T, unit="tok", desc="prefill v4", disable=not self.progress, leave=False) as bar:
            for s in range(0, T, chunk):
                part = ids[:, s : s + chunk]
                pos = torch.arange(s, s + part.shape[1])[None]
                h = self.model.model(input_ids=part, position_ids=pos, cache=self.cache).last_hidden_state
                bar.update(part.shape[1])
        return self.model.lm_head(h[:, -1])

    def fill_random(self) -> None:
        """`length` positions of random values in the cache, through the cache's own write path."""
        import torch
        from tqdm.auto import tqdm

        g = torch.Generator().manual_seed(2)
        T, cfg = self.length, self.config
        L = cfg.num_hidden_layers
        bar = tqdm(total=T * L, unit="tok", desc=f"fill {self.kind}", disable=not self.progress, leave=False)
        if self.kind in ("full", "sparse"):
            c = self.cache
            for i in range(L):
                c.kv[i, :, :T].normal_(generator=g)
                c.pe[i, :, :T].normal_(generator=g)
                bar.update(T)
            if cfg.indexer is not None:  # as LatentCache.index_keys allocates it on first use
                c.index = c.kv.new_zeros(*c.kv.shape[:3], cfg.indexer.head_dim)
                c.index[:, :, :T].normal_(generator=g)
            c.lengths = [T] * L
        elif self.kind == "compressed":
            chunk = cfg.prefill_chunk
            for i in range(L):
                for s in range(0, T, chunk):
                    n = min(chunk, T - s)
                    self.cache.append(torch.randn(1, n, cfg.kv_lora_rank, generator=g),
                                      torch.randn(1, n, cfg.qk_rope_head_dim, generator=g), i)  # fmt: skip
                    self.cache.seal(i)
                    bar.update(n)
        else:
            rotary = self.model.model.rotary
            last = (T - 1) // V4_CHUNK * V4_CHUNK  # the last write is prefill's last chunk, so the views the
            starts = [*range(0, last, FILL_CHUNK), last, T]  # cache keeps (window, pending) hold the same storage
            for i, layer in enumerate(self.model.model.layers):
                attn = layer.self_attn
                for s, e in zip(starts[:-1], starts[1:]):
                    n = e - s
                    self.cache.window_keys(i, torch.randn(1, n, cfg.head_dim, generator=g))
                    if attn.compressor is not None:
                        x = torch.randn(1, n, cfg.hidden_size, generator=g)
                        attn.compressor.entries(x, rotary["compress"], self.cache, i, "compressor")
                        if attn.compressor.indexer is not None:
                            attn.compressor.indexer.entries(x, rotary["compress"], self.cache, i, "indexer")
                    bar.update(n)
        bar.close()

    # -------------------------------------------------------------- decoding
    def decode(self, n: int) -> list[float]:
        """n decode steps; returns each step's seconds."""
        import torch

        if self.pos + n > self.positions:
            raise ValueError(f"{n} more decode steps exceed the {self.total_steps} reserved")
        times = []
        with torch.inference_mode():
            for _ in range(n):
                t = time.perf_counter()
                h = self.model.model(input_ids=self.tok[:, None], position_ids=torch.tensor([[self.pos]]),
                                     cache=self.cache)  # fmt: skip
                self.tok = self.model.lm_head(h.last_hidden_state[:, -1]).argmax(-1)
                times.append(time.perf_counter() - t)
                self.pos += 1
        return times

    def finish(self) -> dict:
        bytes_ = held_bytes(self.cache)
        L = self.config.num_hidden_layers
        out = {"cache_bytes": bytes_, "positions": self.pos if self.kind == "v4" else self.positions,
               "layers": L, "peak_rss_bytes": peak_rss_bytes()}  # fmt: skip
        out["bytes_per_token_layer"] = round(bytes_ / (out["positions"] * L), 2)
        if self.kind == "compressed":
            mem = self.cache.memory()
            out["payload_bytes"] = mem["payload"]  # what kv_offload=True would keep in host memory
        if self.kind == "v4":
            out["v4_parts"] = self.cache.nbytes()
        return out


# ---------------------------------------------------------------------------- processes
def _worker(kind, length, total_steps, prefill_max, progress, threads, conn) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        case = Case(kind, length, total_steps, prefill_max, progress)
        conn.send(("ok", None))
        while True:
            cmd, arg = conn.recv()
            if cmd == "setup":
                conn.send(("ok", case.setup()))
            elif cmd == "decode":
                conn.send(("ok", case.decode(arg)))
            elif cmd == "finish":
                conn.send(("ok", case.finish()))
                return
    except Exception:  # the parent reports it and goes on with the other types
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class Spawned:
    """A Case in its own spawned process, driven over a pipe."""

    def __init__(self, kind, length, total_steps, prefill_max, progress, threads):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(kind, length, total_steps, prefill_max, progress, threads,
                                                      child), daemon=True)  # fmt: skip
        self.proc.start()
        child.close()
        self._answer()

    def _answer(self):
        try:
            status, value = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"worker died (exit code {self.proc.join(5) or self.proc.exitcode})") from None
        if status == "error":
            raise RuntimeError(value)
        return value

    def call(self, cmd, arg=None):
        self.conn.send((cmd, arg))
        return self._answer()

    def close(self):
        self.conn.close()
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()


class InProcess:
    """The same interface on a Case in this process (tests)."""

    def __init__(self, kind, length, total_steps, prefill_max, progress, threads):
        self.case = Case(kind, length, total_steps, prefill_max, progress)

    def call(self, cmd, arg=None):
        return getattr(self.case, cmd)(*(() if arg is None else (arg,)))

    def close(self):
        self.case = None


def summarize(times_s: list[float]) -> dict:
    ms = [t * 1e3 for t in times_s]
    return {"decode_ms_median": round(statistics.median(ms), 3), "decode_ms_min": round(min(ms), 3),
            "decode_ms_max": round(max(ms), 3), "decode_steps": len(ms)}  # fmt: skip


def measure_length(length: int, kinds: list[str], opts: dict, spawn: bool = True, log=print) -> list[dict]:
    """Every type at one length: set up one after another, warm up, then alternating timed rounds."""
    from tqdm.auto import tqdm

    rounds, steps, warmup = opts["rounds"], opts["steps"], opts["warmup"]
    total = warmup + rounds * steps
    cls = Spawned if spawn else InProcess
    handles, rows, budget = {}, {}, available_bytes() * 0.8
    for kind in kinds:
        pmax = opts["prefill_max"][kind]
        need = estimate_bytes(kind, length, length <= pmax)
        if need > budget:
            reason = (f"needs ~{need / 2**30:.1f} GiB, {budget / 2**30:.1f} GiB of the available memory left "
                      f"(80%, with the other types of this length alive)")  # fmt: skip
            log(f"  {kind:<10} {fmt_len(length):>5}: skipped, {reason}")
            rows[kind] = {"type": kind, "length": length, "skipped": reason}
            continue
        budget -= need
        t = time.perf_counter()
        h = None
        try:
            h = cls(kind, length, total, pmax, opts["progress"], opts["threads"])
            info = h.call("setup")
        except Exception as e:  # report it and go on with the other types
            why = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            log(f"  {kind:<10} {fmt_len(length):>5}: FAILED in setup: {why}")
            rows[kind] = {"type": kind, "length": length, "skipped": f"failed: {why}"}
            if h is not None:
                h.close()
            continue
        handles[kind] = h
        rows[kind] = {"type": kind, "length": length, **info, "times": [], "round_medians_ms": []}
        what = (f"prefill {info['prefill_s']} s" if info["prefill"] == "run" else
                f"prefill skipped (> {pmax} tokens: filled with random values in {info['fill_s']} s)")  # fmt: skip
        log(f"  {kind:<10} {fmt_len(length):>5}: {what} ({time.perf_counter() - t:.0f} s with start-up)")
    live = [k for k in kinds if k in handles]
    for kind in live:  # warm up every type before any timing
        handles[kind].call("decode", warmup)
    bar = tqdm(total=rounds * len(live), desc=f"decode rounds {fmt_len(length)}", unit="turn",
               disable=not opts["progress"], leave=False)  # fmt: skip
    for r in range(rounds):
        order = live[r % len(live) :] + live[: r % len(live)] if live else []
        for kind in order:
            times = handles[kind].call("decode", steps)
            rows[kind]["times"] += times
            rows[kind]["round_medians_ms"].append(round(statistics.median(times) * 1e3, 3))
            bar.update(1)
    bar.close()
    for kind in live:
        rows[kind].update(handles[kind].call("finish"))
        handles[kind].close()
        rows[kind].update(summarize(rows[kind].pop("times")))
        r = rows[kind]
        log(f"  {kind:<10} {fmt_len(length):>5}: decode {r['decode_ms_median']} ms "
            f"[{r['decode_ms_min']}-{r['decode_ms_max']}], cache {r['cache_bytes'] / 2**20:.2f} MiB, "
            f"peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB")  # fmt: skip
    return [rows[k] for k in kinds]


# ---------------------------------------------------------------------------- report
def fmt_len(n: int) -> str:
    if n % 2**20 == 0:
        return f"{n // 2**20}M"
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def markdown_table(rows: list[dict]) -> str:
    head = ("| length | type | cache MiB | bytes/token/layer | peak RSS MiB | prefill s | decode ms median [min-max] |\n"
            "|---|---|---|---|---|---|---|")  # fmt: skip
    lines = [head]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {fmt_len(r['length'])} | {r['type']} | - | - | - | - | skipped: {r['skipped']} |")
            continue
        pre = f"{r['prefill_s']}" if r["prefill"] == "run" else "skipped (random fill)"
        lines.append(f"| {fmt_len(r['length'])} | {r['type']} | {r['cache_bytes'] / 2**20:.2f} | "
                     f"{r['bytes_per_token_layer']:.1f} | {r['peak_rss_bytes'] / 2**20:.0f} | {pre} | "
                     f"{r['decode_ms_median']:.2f} [{r['decode_ms_min']:.2f}-{r['decode_ms_max']:.2f}] |")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind in TYPES:
        rs = [r for r in rows if r["type"] == kind and "skipped" not in r]
        if not rs:
            continue
        x = [r["length"] for r in rs]
        axes[0].plot(x, [r["cache_bytes"] / 2**20 for r in rs], "o-", label=LABELS[kind])
        med = [r["decode_ms_median"] for r in rs]
        err = [[m - r["decode_ms_min"] for m, r in zip(med, rs)], [r["decode_ms_max"] - m for m, r in zip(med, rs)]]
        axes[1].errorbar(x, med, yerr=err, fmt="o-", capsize=3, label=LABELS[kind])
    axes[0].set(xscale="log", yscale="log", xlabel="context tokens", ylabel="cache MiB", title="decode cache size")
    axes[1].set(xscale="log", yscale="log", xlabel="context tokens", ylabel="ms / token (median, min-max)",
                title="decode latency (CPU, fp32)")  # fmt: skip
    lengths = sorted({r["length"] for r in rows})
    for ax in axes:
        ax.set_xticks(lengths, [fmt_len(n) for n in lengths])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- command line
def parse_length(text: str) -> int:
    t = text.strip().upper()
    mult = {"K": 1024, "M": 2**20}.get(t[-1:], 1)
    digits = t[:-1] if mult > 1 else t
    if not digits.isdigit() or int(digits) <= 0:
        raise ValueError(text)
    return int(digits) * mult


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default=DEFAULT_LENGTHS, help="comma list of token counts (4096, 4K, 1M)")
    parser.add_argument("--types", default=",".join(TYPES), help=f"comma list from {', '.join(TYPES)}")
    parser.add_argument("--quick", action="store_true", help="4K and 16K only")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (>= 3)")
    parser.add_argument("--steps", type=int, default=8, help="timed decode steps per type and round (>= 8)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed decode steps per type first")
    parser.add_argument("--prefill-max", default="", help="TYPE=TOKENS,... (or all=TOKENS): longest prefill to run per type "
                        f"(default {','.join(f'{k}={v}' for k, v in DEFAULT_PREFILL_MAX.items())})")  # fmt: skip
    parser.add_argument("--plot", default="docs/long_context_all.png", help='PNG path ("" = no plot)')
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        lengths = list(QUICK_LENGTHS) if args.quick else sorted({parse_length(x) for x in args.lengths.split(",")})
    except ValueError as e:
        raise SystemExit(f"long_context_all: --lengths must be positive token counts like 4096,16K,1M; "
                         f"got {e.args[0]!r} in {args.lengths!r}") from None  # fmt: skip
    kinds = [k.strip() for k in args.types.split(",") if k.strip()]
    bad = [k for k in kinds if k not in TYPES]
    if bad or not kinds:
        raise SystemExit(f"long_context_all: --types must be a comma list from {', '.join(TYPES)}; "
                         f"got {args.types!r}")  # fmt: skip
    kinds = [k for k in TYPES if k in kinds]  # canonical order, no duplicates
    prefill_max = dict(DEFAULT_PREFILL_MAX)
    for item in filter(None, (x.strip() for x in args.prefill_max.split(","))):
        key, _, val = item.partition("=")
        try:
            if key not in (*TYPES, "all"):
                raise ValueError
            n = parse_length(val) if val.strip() != "0" else 0
            prefill_max.update({k: n for k in (TYPES if key == "all" else (key,))})
        except ValueError:
            raise SystemExit(f"long_context_all: --prefill-max takes TYPE=TOKENS items (TYPE: {', '.join(TYPES)}, all); "
                             f"got {item!r}") from None  # fmt: skip
    if args.threads < 1:
        raise SystemExit(f"long_context_all: --threads must be >= 1, got {args.threads}")
    if args.rounds < 3 or args.steps < 8 or args.warmup < 1:
        raise SystemExit(f"long_context_all: the timing needs --rounds >= 3, --steps >= 8, --warmup >= 1; "
                         f"got {args.rounds}, {args.steps}, {args.warmup}")  # fmt: skip
    opts = {"rounds": args.rounds, "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
            "prefill_max": prefill_max, "progress": not args.no_progress}  # fmt: skip
    return args, lengths, kinds, opts


def run(lengths: list[int], kinds: list[str], opts: dict, spawn: bool = True, log=print) -> list[dict]:
    rows = []
    t0 = time.perf_counter()
    for i, n in enumerate(lengths):
        log(f"[{i + 1}/{len(lengths)}] {fmt_len(n)} tokens ({time.perf_counter() - t0:.0f} s so far, "
            f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())})")  # fmt: skip
        rows += measure_length(n, kinds, opts, spawn=spawn, log=log)
    return rows


def result_json(rows, lengths, kinds, opts, load_start, load_end, wall_s) -> dict:
    return {"benchmark": "long_context_all", "hardware": f"{platform.machine()}, {os.cpu_count()} cores, "
            f"{opts['threads']} thread(s), fp32", "load_start": [round(x, 2) for x in load_start],
            "load_end": [round(x, 2) for x in load_end], "wall_s": round(wall_s, 1), "types": kinds,
            "lengths": lengths, "timing": {k: opts[k] for k in ("warmup", "rounds", "steps")},
            "prefill_max": opts["prefill_max"],
            "results": [{k: v for k, v in r.items()} for r in rows]}  # fmt: skip


def main(argv=None) -> dict:
    args, lengths, kinds, opts = parse_args(argv)
    load_start = os.getloadavg()
    print(f"long_context_all: {', '.join(kinds)} at {', '.join(fmt_len(n) for n in lengths)}; "
          f"{opts['threads']} thread(s); load average at start {' '.join(f'{x:.2f}' for x in load_start)}", flush=True)
    for kind in kinds:
        over = [fmt_len(n) for n in lengths if n > opts["prefill_max"][kind]]
        if over:
            print(f"  {kind}: prefill skipped at {', '.join(over)} (> {opts['prefill_max'][kind]} tokens, "
                  f"{'quadratic' if kind != 'compressed' else 'too slow here'}); the cache is filled with "
                  "random values of the right shapes", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    rows = run(lengths, kinds, opts, log=lambda s: print(s, flush=True))
    wall = time.perf_counter() - t0
    load_end = os.getloadavg()
    print(f"\nload average at end {' '.join(f'{x:.2f}' for x in load_end)}; {wall:.0f} s\n")
    print(markdown_table(rows))
    result = result_json(rows, lengths, kinds, opts, load_start, load_end, wall)
    if args.plot:
        plot(rows, args.plot)
        result["plot"] = args.plot
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
