"""Long context: full MLA latent cache vs the hierarchical compressed cache, 4K..128K tokens, same model.

    python benchmarks/long_context.py                           # 4K,16K,32K,64K,128K (~10-20 min, 2 cores)
    python benchmarks/long_context.py --quick                   # 4K and 16K only
    python benchmarks/long_context.py --model runs/passkey      # a trained checkpoint: adds passkey accuracy
    python benchmarks/long_context.py --lengths 4096,131072 --passkey-trials 5
    python benchmarks/long_context.py --model runs/passkey --no-timing --jobs 2 --passkey-trials 20 \
        --multikey 4 --ppl-lengths 16384                        # accuracy only, 2 worker processes
    python benchmarks/long_context.py --model deepseek/passkey-128k --no-timing \
        --fillers repeat,package-readmes                        # and on held-out real prose

Every (mode, length) runs in a fresh process so its peak RSS is its own. Per case: cache bytes on the
compute device (compressed: sinks + window + summaries, + 4-bit payload unless offloaded), total cache bytes,
peak RSS, chunked-prefill time, per-token decode latency and, with --model, passkey accuracy. The full cache's
prefill is quadratic; above --full-prefill-max its decode latency is measured on a cache filled with random
latents (decode time does not depend on the values) and its prefill is marked skipped. Prints a table, then
one JSON line with the ratios; plots memory and latency vs length to docs/long_context_*.png.

With --model, accuracy runs as its own phase in --jobs worker processes (1 thread each): greedy passkey
retrieval (Landmark template, 5-digit key at a random depth) at every length with the compressed cache and,
up to --full-prefill-max, with the full cache on the same prompts; optionally the RULER-style multi-key
variant (--multikey N) and teacher-forced perplexity on long prose (--ppl-lengths) for both caches.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import time

import torch

from deepseek import R1ForCausalLM
from deepseek.eval.passkey import small_config
from deepseek.model.cache import LatentCache
from deepseek.model.longctx import CompressedLatentCache, chunked_prefill, extend_context


def load_model(path: str | None, max_len: int):
    if path:
        model = R1ForCausalLM.from_pretrained(path).eval()
        extend_context(model, max_len)
        return model
    torch.manual_seed(0)
    return R1ForCausalLM(small_config()).eval()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@torch.inference_mode()
def run_case(args, mode: str, length: int, queue) -> None:
    torch.set_num_threads(args.threads)
    model = load_model(args.model, length + 64)
    config = model.config
    steps = args.decode_steps
    ids = torch.randint(3, config.vocab_size, (1, length))
    result = {"mode": mode, "length": length}
    if mode == "full":
        cache = LatentCache(config, 1, length + steps + 8)
        result["device_bytes"] = result["total_bytes"] = cache.nbytes()
    else:
        cache = CompressedLatentCache(config, 1, length + steps + 8)
        mem = cache.memory()
        result["device_bytes"], result["total_bytes"] = mem["device"], mem["total"]
        result["device_bytes_offload"] = mem["full_precision"] + mem["summaries"]  # with kv_offload=True
    rss_before = peak_rss_bytes()
    if mode == "full" and length > args.full_prefill_max:
        for i in range(config.num_hidden_layers):
            cache.kv[i, :, :length].normal_()
            cache.pe[i, :, :length].normal_()
            cache.lengths[i] = length
        result["prefill_s"] = None
        logits = model.lm_head(model.model(ids[:, -1:], position_ids=torch.tensor([[length]]), cache=cache)
                               .last_hidden_state[:, -1])  # fmt: skip
        cache.crop(length)
    else:
        t = time.perf_counter()
        chunk = args.full_chunk if mode == "full" else config.prefill_chunk
        logits = chunked_prefill(model, ids, cache, chunk=chunk, progress=args.progress)
        result["prefill_s"] = round(time.perf_counter() - t, 2)
    tok = logits.argmax(-1)
    times = []
    for i in range(steps):
        t = time.perf_counter()
        h = model.model(input_ids=tok[:, None], position_ids=torch.tensor([[length + i]]), cache=cache)
        tok = model.lm_head(h.last_hidden_state[:, -1]).argmax(-1)
        times.append(time.perf_counter() - t)
    times = sorted(times[1:])  # drop the first (allocation), report the median
    result["decode_ms"] = round(times[len(times) // 2] * 1e3, 3)
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["rss_before_prefill"] = rss_before
    queue.put(result)


def run_isolated(args, mode: str, length: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=run_case, args=(args, mode, length, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


# ---------------------------------------------------------------------------- accuracy phase
_MODEL = _TOK = None


def _worker_init(path: str, max_len: int, threads: int) -> None:
    from deepseek.eval.passkey import model_tokenizer

    global _MODEL, _TOK
    torch.set_num_threads(threads)
    _MODEL, _TOK = load_model(path, max_len), model_tokenizer(path)


def _accuracy_job(job: tuple) -> tuple:
    """job = (kind, mode, length, i, keys, filler): one passkey trial or one perplexity measurement."""
    from deepseek.eval.passkey import essay_ids, long_perplexity, passkey_trial

    kind, mode, length, i, keys, filler = job
    t = time.perf_counter()
    if kind in ("variables", "clause"):
        from deepseek.eval.passkey import longdoc_trial

        value = longdoc_trial(_MODEL, kind, length, mode == "compressed", f"{length}-{kind}-{i}", _TOK, filler)
    elif kind == "ppl":
        skip = _MODEL.config.compression.window + 2 * _MODEL.config.compression.block_size  # where the two caches start to differ
        value = long_perplexity(_MODEL, essay_ids(length, tok=_TOK), mode == "compressed", skip=skip)
    else:
        seed = f"{length}-{keys}-{i}" if filler == "repeat" else f"{length}-{keys}-{i}-{filler}"
        value = passkey_trial(_MODEL, length, mode == "compressed", seed, keys, _TOK, filler)
    return job, value, time.perf_counter() - t


def accuracy_phase(args, lengths: list[int]) -> dict:
    """Every trial of every (mode, length) as its own job, longest first, over --jobs processes."""
    jobs = []
    for n in lengths:
        modes = ["compressed"] + (["full"] if n <= args.full_prefill_max else [])
        for mode in modes:
            for filler in args.fillers:
                jobs += [("passkey", mode, n, i, 1, filler) for i in range(args.passkey_trials)]
                if args.multikey:
                    jobs += [("multikey", mode, n, i, args.multikey, filler) for i in range(args.multikey_trials)]
                if filler != "repeat":  # long-document questions live in real prose
                    jobs += [(kind, mode, n, i, 0, filler) for kind in ("variables", "clause")
                             for i in range(args.longdoc_trials)]  # fmt: skip
    for n in args.ppl_lengths:
        jobs += [("ppl", mode, n, 0, 1, "essay") for mode in ("compressed", "full")]
    jobs.sort(key=lambda j: -j[2] * (4 if j[1] == "full" else 1))  # full prefill is quadratic
    ctx = mp.get_context("spawn")
    out: dict = {}
    t0 = time.perf_counter()
    max_len = max(lengths + args.ppl_lengths) + 64
    with ctx.Pool(args.jobs, _worker_init, (args.model, max_len, args.threads)) as pool:
        for done, (job, value, secs) in enumerate(pool.imap_unordered(_accuracy_job, jobs), 1):
            out.setdefault((*job[:3], job[5]), []).append(value)
            elapsed = time.perf_counter() - t0
            eta = elapsed / done * (len(jobs) - done)
            hit = value if job[0] == "ppl" else value["hit"]
            miss = "" if job[0] == "ppl" or hit else f" prompt {job[3]}: {value['answer']!r} for {value['key']!r}"
            print(f"  [{done}/{len(jobs)} {elapsed:.0f}s, ETA {eta:.0f}s] {job[0]} {job[5]} {job[1]} {job[2]}: {hit}{miss} "
                  f"({secs:.0f} s)", flush=True)  # fmt: skip
    return out


def accuracy_report(acc: dict, lengths: list[int], ppl_lengths: list[int], fillers=("repeat",)) -> dict:
    """Accuracy per (filler, length); JSON keys {k}_passkey_comp etc., suffixed _{filler} unless "repeat"."""

    def rate(kind, mode, n, filler):
        v = acc.get((kind, mode, n, filler))
        return None if not v else round(sum(x["hit"] for x in v) / len(v), 4)

    def selected(kind, n, filler):  # how often the lead layer's selection held the asked key (when it was sealed)
        v = [x["selected"] for x in acc.get((kind, "compressed", n, filler), []) if x.get("selected") is not None]
        return None if not v else round(sum(v) / len(v), 4)

    result, gaps = {}, []
    print(f"\n{'filler':<16} {'length':>8} {'passkey comp':>13} {'passkey full':>13} {'multikey comp':>14} {'multikey full':>14}"
          f" {'key selected (1 / multi)':>25}")  # fmt: skip
    for filler in fillers:
        tag = "" if filler == "repeat" else f"_{filler}"
        for n in lengths:
            k = f"{n // 1024}k"
            row = [rate("passkey", "compressed", n, filler), rate("passkey", "full", n, filler),
                   rate("multikey", "compressed", n, filler), rate("multikey", "full", n, filler)]  # fmt: skip
            sel = [selected("passkey", n, filler), selected("multikey", n, filler)]
            print(f"{filler:<16} {n:>8} " + " ".join(f"{'-' if v is None else f'{v:.1%}':>13}" for v in row)
                  + f" {' / '.join('-' if v is None else f'{v:.0%}' for v in sel):>25}")  # fmt: skip
            result[f"{k}_passkey_selected{tag}"] = sel[0]
            if row[2] is not None:
                result[f"{k}_multikey_selected{tag}"] = sel[1]
            result[f"{k}_passkey_comp{tag}"], result[f"{k}_passkey_full{tag}"] = row[0], row[1]
            if row[2] is not None:
                result[f"{k}_multikey_comp{tag}"], result[f"{k}_multikey_full{tag}"] = row[2], row[3]
            if row[0] is not None and row[1] is not None:
                gaps.append(row[1] - row[0])
    result["passkey_max_drop_vs_full_points"] = round(100 * max(gaps), 1) if gaps else None
    docs = [key for key in acc if key[0] in ("variables", "clause")]
    if docs:
        print(f"\n{'question':<10} {'filler':<16} {'length':>8} {'mode':<11} {'accuracy':>9} {'time to answer s (median)':>26}")
    for kind, mode, n, filler in sorted(docs, key=lambda k: (k[0], k[3], k[2], k[1])):
        v = acc[(kind, mode, n, filler)]
        rate_, secs = sum(x["hit"] for x in v) / len(v), sorted(x["seconds"] for x in v)[len(v) // 2]
        print(f"{kind:<10} {filler:<16} {n:>8} {mode:<11} {rate_:>9.1%} {secs:>26.2f}")
        short = "comp" if mode == "compressed" else "full"
        result[f"{n // 1024}k_{kind}_{short}_{filler}"] = round(rate_, 4)
        result[f"{n // 1024}k_{kind}_{short}_{filler}_seconds"] = round(secs, 3)
    for n in ppl_lengths:
        c, f = acc[("ppl", "compressed", n, "essay")][0], acc[("ppl", "full", n, "essay")][0]
        print(f"perplexity {n}: compressed {c:.4f}, full {f:.4f} ({100 * (c / f - 1):+.2f}%)")
        result[f"{n // 1024}k_ppl_comp"], result[f"{n // 1024}k_ppl_full"] = round(c, 4), round(f, 4)
    return result


def plot(rows: list[dict], path_prefix: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = [r for r in rows if r["mode"] == "full"]
    comp = [r for r in rows if r["mode"] == "compressed"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    ax.plot([r["length"] for r in full], [r["device_bytes"] / 2**20 for r in full], "o-", label="full latent cache")
    ax.plot([r["length"] for r in comp], [r["device_bytes"] / 2**20 for r in comp], "o-", label="compressed")
    ax.plot([r["length"] for r in comp], [r["device_bytes_offload"] / 2**20 for r in comp], "o--",
            label="compressed, payload offloaded")  # fmt: skip
    ax.set(xscale="log", yscale="log", xlabel="context tokens", ylabel="cache MiB on device", title="KV memory")
    ax.legend()
    ax = axes[1]
    ax.plot([r["length"] for r in full], [r["decode_ms"] for r in full], "o-", label="full latent cache")
    ax.plot([r["length"] for r in comp], [r["decode_ms"] for r in comp], "o-", label="compressed")
    ax.set(xscale="log", xlabel="context tokens", ylabel="ms / token", title="decode latency (2-core CPU, fp32)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"{path_prefix}_memory_latency.png", dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,16384,32768,65536,131072")
    parser.add_argument("--quick", action="store_true", help="4K and 16K only")
    parser.add_argument("--model", default=None, help="trained checkpoint dir (adds passkey accuracy)")
    parser.add_argument("--passkey-trials", type=int, default=10)
    parser.add_argument("--multikey", type=int, default=0, help="also the multi-key variant with N keys")
    parser.add_argument("--multikey-trials", type=int, default=10)
    parser.add_argument("--longdoc-trials", type=int, default=0,
                        help="with a real-prose filler: also this many variable-tracking and clause questions per cell")
    parser.add_argument("--fillers", default="repeat",
                        help='haystacks, comma-separated: "repeat" (Landmark), "essay", or a real-prose family of '
                             'deepseek.tasks.corpus (held out from training: package-readmes)')  # fmt: skip
    parser.add_argument("--ppl-lengths", default="", help="also perplexity of both caches on prose of these lengths")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes for the accuracy phase")
    parser.add_argument("--no-timing", action="store_true", help="accuracy phase only (needs --model)")
    parser.add_argument("--no-accuracy", action="store_true", help="with --model: timing and memory only, with its config")
    parser.add_argument("--decode-steps", type=int, default=12)
    parser.add_argument("--full-prefill-max", type=int, default=32768, help="longest full-cache prefill to run")
    parser.add_argument("--full-chunk", type=int, default=256, help="full-cache prefill chunk (T x S scores)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plot", default="docs/long_context")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    lengths = [4096, 16384] if args.quick else [int(x) for x in args.lengths.split(",")]
    if any(n <= 0 for n in lengths):
        raise SystemExit(f"--lengths must be positive integers, got {args.lengths}")
    args.ppl_lengths = [int(x) for x in args.ppl_lengths.split(",") if x]
    from deepseek.tasks.corpus import FAMILIES

    args.fillers = [f for f in args.fillers.split(",") if f]
    bad = [f for f in args.fillers if f not in ("repeat", "essay", *FAMILIES)]
    if bad or not args.fillers:
        raise SystemExit(f"--fillers: unknown haystack {bad or args.fillers}; choose from repeat, essay, {', '.join(FAMILIES)}")
    if args.no_timing and not args.model:
        raise SystemExit("--no-timing measures accuracy only, which needs --model")
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {args.jobs}")
    result = {"hardware": f"{platform.machine()}, {args.threads} thread(s) x {args.jobs} job(s), fp32",
              "model": args.model or "random small_config"}  # fmt: skip
    if args.no_timing and args.no_accuracy:
        raise SystemExit("--no-timing and --no-accuracy together leave nothing to measure")
    if args.model and not args.no_accuracy:
        acc = accuracy_phase(args, lengths)
        result.update(accuracy_report(acc, lengths, args.ppl_lengths, args.fillers))
        if args.no_timing:
            print(json.dumps(result))
            return
    rows = []
    for n in lengths:
        for mode in ("full", "compressed"):
            r = run_isolated(args, mode, n)
            rows.append(r)
            print(f"  {mode:<10} {n:>7}: prefill {r['prefill_s']} s, decode {r['decode_ms']} ms", flush=True)
    print(f"\n{'length':>8} {'mode':<11}{'dev MiB':>9}{'ratio':>7}{'offl.':>7}{'RSS MiB':>9}{'prefill s':>10}"
          f"{'ms/tok':>8}{'speedup':>8}{'passkey':>8}")  # fmt: skip
    for n in lengths:
        f = next(r for r in rows if r["mode"] == "full" and r["length"] == n)
        c = next(r for r in rows if r["mode"] == "compressed" and r["length"] == n)
        ratio, ratio_off = c["device_bytes"] / f["device_bytes"], c["device_bytes_offload"] / f["device_bytes"]
        speed = f["decode_ms"] / c["decode_ms"]
        for r in (f, c):
            comp = r is c
            print(f"{n:>8} {r['mode']:<11}{r['device_bytes'] / 2**20:>9.1f}{ratio if comp else 1:>7.3f}"
                  f"{ratio_off if comp else 1:>7.3f}{r['peak_rss_bytes'] / 2**20:>9.0f}"
                  f"{r['prefill_s'] if r['prefill_s'] is not None else 'skip':>10}{r['decode_ms']:>8.2f}"
                  f"{speed if comp else 1:>8.2f}{str(result.get(f'{n // 1024}k_passkey_' + ('comp' if comp else 'full'), '-')):>8}")  # fmt: skip
        k = f"{n // 1024}k"
        result[f"{k}_mem_ratio"] = round(ratio, 4)
        result[f"{k}_mem_ratio_offload"] = round(ratio_off, 4)
        result[f"{k}_decode_speedup"] = round(speed, 2)
        result[f"{k}_full_ms"], result[f"{k}_comp_ms"] = f["decode_ms"], c["decode_ms"]
        result[f"{k}_comp_prefill_s"], result[f"{k}_full_prefill_s"] = c["prefill_s"], f["prefill_s"]
        result[f"{k}_comp_peak_rss_MiB"] = round(c["peak_rss_bytes"] / 2**20)
        result[f"{k}_full_peak_rss_MiB"] = round(f["peak_rss_bytes"] / 2**20)
    if args.plot:
        plot(rows, args.plot)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
