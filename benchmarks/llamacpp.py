"""llama.cpp as a peer, from PyPI only: fetch its source, convert our checkpoints to GGUF, optionally build it.

    python benchmarks/llamacpp.py fetch                       # the llama-cpp-python sdist -> ~/.cache/deepseek/llamacpp
    python benchmarks/llamacpp.py convert runs/x/final out.gguf [--outtype f32|bf16|q8_0]
    python benchmarks/llamacpp.py build                       # llama-bench + llama-batched-bench (~15 min, 2 cores)

The llama-cpp-python sdist vendors llama.cpp (its `convert_hf_to_gguf.py`, `gguf-py` and C++ sources); nothing
else is downloaded. Conversion needs no build. Our checkpoints say `DeepseekV3ForCausalLM` (or V2), which the
converter maps to GGUF architecture `deepseek2`. Its one obstacle is the tokenizer check: llama.cpp identifies
a BPE pre-tokenizer by the hash of a test string's token ids, and ours (a 1,024-token BPE) is not in its table.
Ours splits digits one by one, then applies GPT-2's byte-level regex, which is exactly llama.cpp's "starcoder"
pre-tokenizer, so `convert` names that one when, and only when, tokenizer.json says so; any other unknown
tokenizer still fails as llama.cpp intends.
"""

from __future__ import annotations

import argparse
import json
import os
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


def convert(model_dir: str | Path, out: str | Path, outtype: str = "f32", cache: Path = CACHE) -> Path:
    """Our HF-layout checkpoint -> one GGUF file, with llama.cpp's own converter."""
    model_dir, out = Path(model_dir), Path(out)
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("architectures") not in (["DeepseekV3ForCausalLM"], ["DeepseekV2ForCausalLM"]):
        raise ValueError(f"{model_dir}/config.json says {config.get('architectures')}: save it with "
                         "save_pretrained first (it writes DeepseekV3ForCausalLM)")  # fmt: skip
    src = fetch(cache)
    pre = our_pre_tokenizer(model_dir) or "-"
    subprocess.run([sys.executable, "-c", RUNNER, str(src), pre, str(model_dir), "--outfile", str(out),
                    "--outtype", outtype], check=True)  # fmt: skip
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("fetch", help="download and unpack the llama-cpp-python sdist")
    c = sub.add_parser("convert", help="convert a checkpoint folder to GGUF")
    c.add_argument("model_dir")
    c.add_argument("out")
    c.add_argument("--outtype", default="f32", choices=["f32", "f16", "bf16", "q8_0"])
    sub.add_parser("build", help="build llama-bench and llama-batched-bench")
    args = ap.parse_args()
    if args.cmd == "fetch":
        print(fetch())
    elif args.cmd == "convert":
        print(convert(args.model_dir, args.out, args.outtype))
    else:
        print(build())


if __name__ == "__main__":
    main()
