"""benchmarks/llamacpp.py: parsing llama-bench / llama-batched-bench output (captured samples; no build needed)."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "llamacpp_bench", Path(__file__).resolve().parents[1] / "benchmarks" / "llamacpp.py"
)
llamacpp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(llamacpp)

# `llama-bench -m model-f32.gguf -t 2 -ngl 0 -p 0 -n 32 -pg 16,32 -r 2 -o json`, fields trimmed
BENCH_JSON = """[
  {
    "build_commit": "0c1e570", "backends": "CPU", "model_type": "deepseek2 ?B all F32",
    "model_size": 353647040, "model_n_params": 88411760, "n_threads": 2, "n_gpu_layers": 0,
    "n_prompt": 0, "n_gen": 32, "n_depth": 0,
    "avg_ns": 311197471, "stddev_ns": 131896553, "avg_ts": 112.721699, "stddev_ts": 47.216064,
    "samples_ns": [ 403390589, 219004354 ],
    "samples_ts": [ 79.3276, 146.116 ]
  },
  {
    "build_commit": "0c1e570", "backends": "CPU", "model_type": "deepseek2 ?B all F32",
    "model_size": 353647040, "model_n_params": 88411760, "n_threads": 2, "n_gpu_layers": 0,
    "n_prompt": 16, "n_gen": 32, "n_depth": 0,
    "avg_ns": 232293752, "stddev_ns": 61551408, "avg_ts": 214.15403, "stddev_ts": 56.761928,
    "samples_ns": [ 275820650, 188766854 ],
    "samples_ts": [ 174.026, 254.282 ]
  }
]
"""

# `llama-batched-bench -m model-f32.gguf -t 2 -tb 2 -ngl 0 -c 768 -npp 16 -ntg 32 -npl 16 --output-format jsonl`
BATCHED_JSONL = """
{"n_kv_max": 4096, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, "n_gpu_layers": 0, \
"n_threads": 2, "n_threads_batch": 2, "pp": 16, "tg": 32, "pl": 16, "n_kv": 768, "t_pp": 0.113163, \
"speed_pp": 2262.223389, "t_tg": 0.694471, "speed_tg": 737.251831, "t": 0.807634, "speed": 950.925781}
"""


def test_parse_bench_counts_new_tokens_over_prompt_plus_generation():
    got = llamacpp.parse_bench(BENCH_JSON, new=32)
    # -pg 16,32: 32 new tokens over the whole prompt + generation time, as decode.py times ours
    assert got["tok_s"] == pytest.approx([32e9 / 275820650, 32e9 / 188766854])
    assert got["tg_tok_s"] == pytest.approx([79.3276, 146.116], rel=1e-4)  # -n 32: decode only


def test_parse_bench_needs_the_prompt_generation_test():
    with pytest.raises(ValueError):
        llamacpp.parse_bench("[]", new=32)


def test_parse_batched():
    got = llamacpp.parse_batched(BATCHED_JSONL)
    assert got["tok_s"] == pytest.approx([16 * 32 / 0.807634])
    assert got["tg_tok_s"] == pytest.approx([737.251831])
    with pytest.raises(ValueError):
        llamacpp.parse_batched("main: n_kv_max = 4096\n")


def test_summarise_and_table():
    result = {}
    runs = {
        "f32": [{"tok_s": [100.0], "tg_tok_s": [120.0]}, {"tok_s": [110.0], "tg_tok_s": [125.0]}],
        "q8_0": [{"tok_s": [300.0], "tg_tok_s": [350.0]}],
    }
    cells = llamacpp.summarise(1, runs, ours_tok_s=52.5, active_fp32_bytes=4e8, result=result)
    assert result["b1_llamacpp_f32_tok_s"] == 105.0
    assert result["b1_llamacpp_f32_decode_tok_s"] == 122.5
    assert result["b1_ours_vs_llamacpp_f32"] == 0.5
    assert result["b1_llamacpp_f32_GBps"] == pytest.approx(42.0)  # 4e8 bytes x 105 tok/s
    assert result["b1_llamacpp_q8_0_GBps"] == pytest.approx(1e8 * 34 / 32 * 300 / 1e9, abs=0.01)
    assert result["b1_llamacpp_best_16_8bit"] == "q8_0"
    text = llamacpp.table([(1, cells, 52.5)], threads=2, prompt=16, copy_gbps=84.0, result=result)
    assert "batch 1 tok/s" in text and "0.50x" in text and "f32 42.0 (50%)" in text
    assert llamacpp.table([], threads=2, prompt=16, copy_gbps=84.0, result={}) == ""
