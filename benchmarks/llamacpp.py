"""llama.cpp as a peer, from PyPI only: fetch its source, convert our checkpoints to GGUF, optionally build it.

    python benchmarks/llamacpp.py fetch                       # the llama-cpp-python sdist -> ~/.cache/deepseek/llamacpp
    python benchmarks/llamacpp.py convert runs/x/final out.gguf [--outtype f32|bf16|q8_0]
    python benchmarks/llamacpp.py build                       # llama-bench + llama-batched-bench (~15 min, 2 cores)
    python benchmarks/llamacpp.py bench out.gguf [--batch 16]  # decode tok/s, 16-token prompt, 128 new tokens

The llama-cpp-python sdist vendors llama.cpp (its `convert_hf_to_gguf.py`, `gguf-py` and C++ sources); nothing
else is downloaded. Conversion needs no build. Our checkpoints say `DeepseekV3ForCausalLM` (or V2), which the
converter maps to GGUF architecture `deepseek2`. Its one obstacle is the tokenizer check: llama.cpp identifies
a BPE pre-tokenizer by the hash of a test string's token ids, and ours (a 1,024-token BPE) is not in its table.
Ours splits digits one by one, then applies GPT-2's byte-level regex, which is exactly llama.cpp's "starcoder"
pre-tokenizer, so `convert` names that one when, and only when, tokenizer.json says so; any other unknown
tokenizer still fails as llama.cpp intends.

`bench` times a GGUF on the CPU the way benchmarks/decode.py times ours: new tokens per second of wall time
from a PROMPT-token prompt (the prompt's prefill included), with llama-bench `-pg PROMPT,NEW` at batch 1 and
llama-batched-bench `-npp PROMPT -ntg NEW -npl BATCH` above; decode-only figures (llama-bench `-n NEW`,
batched-bench's S_TG) come along. It passes `-ngl 0` and `-lm none` (weights read in, not mmapped, so an
expert first used in a timed step does not page-fault) and keeps llama.cpp's defaults otherwise (f16 KV
cache, flash attention auto, polling threads). A checkpoint with no tokenizer (decode.py's random model)
borrows the bundled r1-tiny one: the converter pads its 1,024 ids to the config's vocab_size as unused
tokens, and the benchmarks feed token ids, so only n_vocab matters.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python on PyPI; its vendor/llama.cpp is the peer
CACHE = Path(os.environ.get("DEEPSEEK_LLAMACPP", Path.home() / ".cache" / "deepseek" / "llamacpp"))


def source_dir(cache: Path = CACHE) -> Path:
    return cache / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"


def fetch(cache: Path = CACHE) -> Path:
    """Download and unpack the sdist once; returns the vendored llama.cpp folder."""
    src = source_dir(cache)
    if (src / "convert_hf_to_gguf.py").is_file():
        return src
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q",
                    f"llama-cpp-python=={VERSION}", "-d", str(cache)], check=True)  # fmt: skip
    with tarfile.open(cache / f"llama_cpp_python-{VERSION}.tar.gz") as tar:
        tar.extractall(cache, filter="data")
    return src


def our_pre_tokenizer(model_dir: Path) -> str | None:
    """'starcoder' when tokenizer.json pre-tokenizes as ours does (individual digits, then GPT-2's byte-level
    regex); None otherwise."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    pre = json.loads(path.read_text()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [(s.get("type"), s.get("individual_digits"), s.get("use_regex")) for s in steps]
    return "starcoder" if kinds == [("Digits", True, None), ("ByteLevel", None, True)] else None


RUNNER = """
import sys, runpy
src, pre = sys.argv.pop(1), sys.argv.pop(1)
sys.path[:0] = [src, src + "/gguf-py"]
from conversion import base
original = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return original(self, tokenizer)
    except NotImplementedError:
        if pre == "-":
            raise
        return pre
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv[0] = src + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert(model_dir: str | Path, out: str | Path, outtype: str = "f32", cache: Path = CACHE,
            quiet: bool = False) -> Path:
    """Our HF-layout checkpoint -> one GGUF file, with llama.cpp's own converter (its log kept back if quiet,
    and shown only on failure)."""
    model_dir, out = Path(model_dir), Path(out)
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("architectures") not in (["DeepseekV3ForCausalLM"], ["DeepseekV2ForCausalLM"]):
        raise ValueError(f"{model_dir}/config.json says {config.get('architectures')}: save it with "
                         "save_pretrained first (it writes DeepseekV3ForCausalLM)")  # fmt: skip
    src = fetch(cache)
    pre = our_pre_tokenizer(model_dir) or "-"
    cmd = [sys.executable, "-c", RUNNER, str(src), pre, str(model_dir), "--outfile", str(out),
           "--outtype", outtype]  # fmt: skip
    done = subprocess.run(cmd, capture_output=quiet, text=True)
    if done.returncode:
        if quiet:
            sys.stderr.write(done.stderr[-4000:])
        raise subprocess.CalledProcessError(done.returncode, cmd[:1] + ["convert_hf_to_gguf.py"] + cmd[5:])
    return out


def build(cache: Path = CACHE, jobs: int = 2) -> Path:
    """cmake the benchmark tools (CPU, native); returns the folder holding llama-bench."""
    src = fetch(cache)
    build_dir = cache / "build"
    if not (build_dir / "bin" / "llama-bench").is_file():
        subprocess.run(["cmake", "-S", str(src), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                        "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON"], check=True)  # fmt: skip
        subprocess.run(["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", "llama-bench",
                        "llama-batched-bench"], check=True)  # fmt: skip
    return build_dir / "bin"


BUNDLED_TOKENIZER = Path(__file__).resolve().parents[1] / "deepseek" / "bundled" / "r1-tiny"
BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}  # q8_0: 32 int8 + one fp16 scale


def binaries(cache: Path = CACHE) -> Path | None:
    """The built bin folder, or None when llama-bench or llama-batched-bench is missing (no build attempted)."""
    bindir = cache / "build" / "bin"
    ok = all((bindir / name).is_file() for name in ("llama-bench", "llama-batched-bench"))
    return bindir if ok else None


def add_tokenizer(model_dir: str | Path) -> None:
    """Give a tokenizer-less checkpoint the bundled one; the converter pads its 1,024 ids to vocab_size."""
    model_dir = Path(model_dir)
    if (model_dir / "tokenizer.json").is_file():
        return
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    ids = json.loads((BUNDLED_TOKENIZER / "tokenizer.json").read_text())["model"]["vocab"].values()
    if max(ids) >= vocab:
        raise ValueError(f"the bundled tokenizer has ids up to {max(ids)}, beyond vocab_size {vocab}")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BUNDLED_TOKENIZER / name, model_dir / name)


def prepare(model_dir: str | Path, out_dir: str | Path, outtypes=("f32", "bf16", "q8_0")) -> dict[str, Path]:
    """GGUFs of one checkpoint for the benchmark, {outtype: path}; {} with one line printed saying why when
    llama.cpp is not built or the conversion fails (the caller carries on without the peer)."""
    if binaries() is None:
        print(f"llama.cpp: not built in {CACHE / 'build'} (python benchmarks/llamacpp.py build), no peer")
        return {}
    out = {}
    try:
        add_tokenizer(model_dir)
        for t in outtypes:
            out[t] = convert(model_dir, Path(out_dir) / f"model-{t}.gguf", t, quiet=True)
    except (OSError, ValueError, KeyError, subprocess.CalledProcessError) as e:
        print(f"llama.cpp: conversion to GGUF failed ({e}); {'only ' + ', '.join(out) if out else 'no peer'}")
    return out


def parse_bench(text: str, new: int) -> dict:
    """llama-bench `-o json` holding a `-pg P,NEW` test (and optionally a `-n NEW` one) -> per-repetition new
    tokens per second including the prompt (tok_s), and decode-only (tg_tok_s, from the `-n` test)."""
    out = {}
    for test in json.loads(text):
        if test["n_prompt"] > 0 and test["n_gen"] > 0:
            out["tok_s"] = [new * 1e9 / ns for ns in test["samples_ns"]]
        elif test["n_gen"] > 0:
            out["tg_tok_s"] = [test["n_gen"] * 1e9 / ns for ns in test["samples_ns"]]
    if "tok_s" not in out:
        raise ValueError("no prompt+generation (-pg) test in llama-bench's output")
    return out


def parse_batched(text: str) -> dict:
    """llama-batched-bench `--output-format jsonl` -> new tokens per second including the prompts' prefill
    (tok_s = pl * tg / t, as decode.py counts ours) and its S_TG (tg_tok_s), one entry per result line."""
    rows = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    if not rows:
        raise ValueError("no result line in llama-batched-bench's output")
    return {"tok_s": [r["pl"] * r["tg"] / r["t"] for r in rows], "tg_tok_s": [r["speed_tg"] for r in rows]}


def bench(gguf: str | Path, threads: int, prompt: int = 16, new: int = 128, batch: int = 1, reps: int = 1,
          timeout: float = 900) -> dict | None:
    """Time one GGUF on the CPU: {"tok_s": [...], "tg_tok_s": [...]}, one entry per repetition; None with one
    line printed saying why when the binaries are missing or a run fails."""
    bindir = binaries()
    if bindir is None:
        print(f"llama.cpp: llama-bench / llama-batched-bench not built in {CACHE / 'build' / 'bin'}")
        return None
    if batch == 1:
        cmd = [str(bindir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-ngl", "0", "-lm", "none",
               "-p", "0", "-n", str(new), "-pg", f"{prompt},{new}", "-r", str(reps), "-o", "json"]  # fmt: skip
        calls = [cmd]
    else:
        cmd = [str(bindir / "llama-batched-bench"), "-m", str(gguf), "-t", str(threads), "-tb", str(threads),
               "-ngl", "0", "-lm", "none", "-c", str(batch * (prompt + new)), "-npp", str(prompt),
               "-ntg", str(new), "-npl", str(batch), "--output-format", "jsonl"]  # fmt: skip
        calls = [cmd] * reps
    out: dict[str, list[float]] = {}
    for c in calls:
        try:
            done = subprocess.run(c, capture_output=True, text=True, timeout=timeout)
            if done.returncode:
                last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                raise RuntimeError(f"exit {done.returncode}: {last}")
            got = parse_bench(done.stdout, new) if batch == 1 else parse_batched(done.stdout)
        except (OSError, ValueError, KeyError, RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"llama.cpp: {Path(c[0]).name} on {Path(gguf).name} failed ({e})")
            return None
        for k, v in got.items():
            out.setdefault(k, []).extend(v)
    return out


def summarise(batch: int, runs: dict[str, list[dict]], ours_tok_s: float, active_fp32_bytes: float,
              result: dict) -> dict[str, tuple]:
    """decode.py's llama.cpp entries for one batch size: adds b{batch}_llamacpp_{type}_tok_s (median, the prompt
    included as ours), _decode_tok_s (decode only), b{batch}_ours_vs_llamacpp_{type} and, at batch 1, the
    weight bytes read per second (_GBps: active weights at that type's bytes per weight times tok/s) to result;
    returns {type: (median, min, max, decode median)} for the table."""
    cells = {}
    for t, rs in runs.items():
        tok = [x for r in rs for x in r["tok_s"]]
        if not tok:
            continue
        tg = [x for r in rs for x in r.get("tg_tok_s", [])]
        med = statistics.median(tok)
        key = f"b{batch}_llamacpp_{t}"
        result[f"{key}_tok_s"] = round(med, 1)
        if tg:
            result[f"{key}_decode_tok_s"] = round(statistics.median(tg), 1)
        result[f"b{batch}_ours_vs_llamacpp_{t}"] = round(ours_tok_s / med, 2)
        if batch == 1:
            result[f"{key}_GBps"] = round(active_fp32_bytes / 4 * BYTES_PER_WEIGHT[t] * med / 1e9, 2)
        cells[t] = (med, min(tok), max(tok), statistics.median(tg) if tg else None)
    low = [t for t in cells if t != "f32"]
    if low:
        best = max(low, key=lambda t: cells[t][0])
        result[f"b{batch}_llamacpp_best_16_8bit"] = best
        result[f"b{batch}_ours_vs_llamacpp_best_16_8bit"] = round(ours_tok_s / cells[best][0], 2)
    return cells


def table(rows: list[tuple[int, dict, float]], threads: int, prompt: int, copy_gbps: float, result: dict) -> str:
    """The llama.cpp block of decode.py's table, from (batch, summarise(...), ours tok/s) rows."""
    types = list(dict.fromkeys(t for _, cells, _ in rows for t in cells))
    if not types:
        return ""
    lines = [f"llama.cpp peer, same weights as GGUF, CPU, {threads} threads: new tok/s including the {prompt}-token "
             "prompt (as ours) [min-max], decode-only after 'dec'"]  # fmt: skip
    lines.append(f"{'case':<14}" + "".join(f"{t:>28}" for t in types) + f"{'ours/' + types[0]:>10}")
    for batch, cells, ours in rows:
        line = f"{f'batch {batch} tok/s':<14}"
        for t in types:
            if t in cells:
                med, lo, hi, tg = cells[t]
                line += f"{med:.1f} [{lo:.0f}-{hi:.0f}]{'' if tg is None else f' dec {tg:.0f}'}".rjust(28)
            else:
                line += f"{'-':>28}"
        ratio = f"{ours / cells[types[0]][0]:.2f}x" if types[0] in cells else "-"
        lines.append(line + f"{ratio:>10}")
    gb = [f"{t} {result[f'b1_llamacpp_{t}_GBps']:.1f} ({result[f'b1_llamacpp_{t}_GBps'] / copy_gbps * 100:.0f}%)"
          for t in types if f"b1_llamacpp_{t}_GBps" in result]  # fmt: skip
    if gb:
        lines.append(f"batch-1 weight GB/s read by llama.cpp (% of {copy_gbps:.1f} GB/s copy): " + ", ".join(gb))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("fetch", help="download and unpack the llama-cpp-python sdist")
    c = sub.add_parser("convert", help="convert a checkpoint folder to GGUF")
    c.add_argument("model_dir")
    c.add_argument("out")
    c.add_argument("--outtype", default="f32", choices=["f32", "f16", "bf16", "q8_0"])
    sub.add_parser("build", help="build llama-bench and llama-batched-bench")
    b = sub.add_parser("bench", help="decode tok/s of a GGUF (CPU)")
    b.add_argument("gguf")
    b.add_argument("--threads", type=int, default=os.cpu_count())
    b.add_argument("--prompt", type=int, default=16)
    b.add_argument("--new", type=int, default=128)
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if args.cmd == "fetch":
        print(fetch())
    elif args.cmd == "convert":
        print(convert(args.model_dir, args.out, args.outtype))
    elif args.cmd == "bench":
        print(json.dumps(bench(args.gguf, args.threads, args.prompt, args.new, args.batch, args.reps)))
    else:
        print(build())


if __name__ == "__main__":
    main()
