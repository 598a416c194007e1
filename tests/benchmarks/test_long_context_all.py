"""benchmarks/long_context_all.py: each type's cache bytes follow its config's formula, random filling gives the
cache prefill gives (same tensors, same bytes), the timing alternates the types, and bad options fail at once."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
_spec = importlib.util.spec_from_file_location("long_context_all", BENCH / "long_context_all.py")
lca = importlib.util.module_from_spec(_spec)
sys.modules["long_context_all"] = lca  # spawned workers unpickle long_context_all._worker by this name
_spec.loader.exec_module(lca)

pytestmark = pytest.mark.usefixtures("one_thread")
T, STEPS = 1037, 2  # not a multiple of any block, window or chunk: partial blocks and pending windows everywhere
FP32 = 4


def shapes(x, path="cache", out=None) -> dict:
    """Every tensor the cache holds, by attribute path, as its shape (non-tensors as their value)."""
    out = {} if out is None else out
    if isinstance(x, torch.Tensor):
        out[path] = tuple(x.shape)
    elif isinstance(x, dict):
        for k, v in x.items():
            shapes(v, f"{path}[{k}]", out)
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            shapes(v, f"{path}[{i}]", out)
    elif hasattr(x, "__dict__") and not isinstance(x, (torch.device, torch.dtype)):
        for k, v in vars(x).items():
            shapes(v, f"{path}.{k}", out)
    else:
        out[path] = x
    return out


@pytest.fixture(scope="module")
def cases():
    """Each type at T tokens, prefilled and filled with random values, then STEPS decode steps."""
    torch.set_num_threads(1)
    out = {}
    for kind in lca.TYPES:
        for how, pmax in (("prefill", 10**9), ("fill", 0)):
            case = lca.Case(kind, T, STEPS, prefill_max=pmax)
            info = case.setup()
            assert info["prefill"] == ("run" if how == "prefill" else "skipped")
            assert len(case.decode(STEPS)) == STEPS
            out[kind, how] = case
    return out


def test_dense_caches_hold_the_latent_and_index_keys_per_token(cases):
    for kind in ("full", "sparse"):
        case = cases[kind, "prefill"]
        cfg = case.config
        L, K = cfg.num_hidden_layers, cfg.kv_lora_rank + cfg.qk_rope_head_dim
        I = cfg.indexer.head_dim if kind == "sparse" else 0
        got = case.finish()
        assert got["positions"] == T + STEPS and got["layers"] == L == 2
        assert got["cache_bytes"] == L * (K + I) * FP32 * (T + STEPS)
        assert got["bytes_per_token_layer"] == (K + I) * FP32 == {"full": 320, "sparse": 448}[kind]


def test_compressed_cache_bytes_follow_the_config(cases):
    case = cases["compressed", "prefill"]
    cfg, c = case.config, case.config.compression
    C, R, b, bits, g = cfg.kv_lora_rank, cfg.qk_rope_head_dim, c.block_size, c.quant_bits, c.quant_group
    blocks = -(-(T + STEPS) // b) - c.sink_blocks  # allocated sealed blocks
    full_precision = (c.window + 2 * b + cfg.prefill_chunk + c.sink_blocks * b) * (C + R) * FP32
    summaries = 2 * blocks * (C + R) * FP32  # mean key and radius per block
    payload = sum(blocks * b * (dim * bits // 8 + 2 * 2 * dim // min(g, dim)) for dim in (C, R))  # + fp16 step/min
    rope = R // 2 * FP32  # the cache's own rotary frequencies
    got = case.finish()
    assert got["cache_bytes"] == cfg.num_hidden_layers * (full_precision + summaries + payload) + rope
    assert got["payload_bytes"] == cfg.num_hidden_layers * payload


def v4_expected(cfg, positions: int) -> tuple[int, int]:
    """(window + compressed entries + indexer keys, bound on the pending / overlap state) in bytes, fp32."""
    E, I, L = cfg.head_dim, cfg.index_head_dim, cfg.num_hidden_layers
    window = L * cfg.sliding_window * E * FP32  # the last window - 1 keys, in the storage of the last step's window
    entries = pending = 0
    for kind in cfg.attention_types:
        m = cfg.compress_rates[kind]
        csa = kind == "compressed_sparse_attention"
        for width in (E, I) if csa else (E,):
            entries += positions // m * width * FP32
            pending += 2 * m * width * (2 if csa else 1) * FP32 + (2 * m * width * FP32 if csa else 0)
    return window + entries, pending


def test_v4_cache_is_a_window_plus_entries_per_m_tokens(cases):
    case = cases["v4", "prefill"]
    cfg = case.config
    assert cfg.attention_types == ["compressed_sparse_attention", "heavily_compressed_attention"]
    got = case.finish()
    expected, pending = v4_expected(cfg, T + STEPS)
    assert 0 <= got["cache_bytes"] - expected <= pending, (got, expected, pending)
    assert got["v4_parts"]["indexer"] == (T + STEPS) // 4 * cfg.index_head_dim * FP32


def test_random_fill_builds_the_cache_prefill_builds(cases):
    for kind in lca.TYPES:
        pre, fill = cases[kind, "prefill"].cache, cases[kind, "fill"].cache
        assert shapes(pre) == shapes(fill), kind
        assert lca.held_bytes(pre) == lca.held_bytes(fill), kind


def test_growth_with_length_compressed_below_full_and_v4_by_rate():
    rows = {}
    for kind in lca.TYPES:
        for n in (4096, 16384):
            case = lca.Case(kind, n, STEPS, prefill_max=0)
            case.setup()
            case.decode(STEPS)
            rows[kind, n] = case.finish()
    for n in (4096, 16384):
        assert rows["compressed", n]["cache_bytes"] < 0.7 * rows["full", n]["cache_bytes"]
        assert rows["v4", n]["cache_bytes"] < rows["compressed", n]["cache_bytes"]
    assert rows["compressed", 16384]["bytes_per_token_layer"] < rows["compressed", 4096]["bytes_per_token_layer"]
    cfg = lca.v4_config(16384)
    E, I = cfg.head_dim, cfg.index_head_dim
    grown = rows["v4", 16384]["cache_bytes"] - rows["v4", 4096]["cache_bytes"]
    per_token = (E + I) * FP32 / 4 + E * FP32 / 128  # CSA entry + indexer key per 4 tokens, HCA entry per 128
    assert abs(grown - (16384 - 4096) * per_token) <= v4_expected(cfg, 0)[1]


def test_one_length_in_process_alternates_types_and_reports_every_key(monkeypatch):
    calls = []
    call = lca.InProcess.call

    def spy(self, cmd, arg=None):
        calls.append((self.case.kind, cmd))
        return call(self, cmd, arg)

    monkeypatch.setattr(lca.InProcess, "call", spy)
    opts = {"rounds": 3, "steps": 2, "warmup": 1, "threads": 1, "progress": False,
            "prefill_max": dict(lca.DEFAULT_PREFILL_MAX)}  # fmt: skip
    log = []
    rows = lca.measure_length(300, list(lca.TYPES), opts, spawn=False, log=log.append)
    decodes = [k for k, cmd in calls if cmd == "decode"]
    A, B, C, D = lca.TYPES
    assert decodes == [A, B, C, D] + [A, B, C, D] + [B, C, D, A] + [C, D, A, B]  # warm-up, then rotated rounds
    assert [k for k, cmd in calls if cmd == "setup"] == list(lca.TYPES)
    keys = {"type", "length", "cache_bytes", "bytes_per_token_layer", "positions", "peak_rss_bytes", "prefill",
            "prefill_s", "decode_ms_median", "decode_ms_min", "decode_ms_max", "decode_steps", "round_medians_ms"}
    for r, kind in zip(rows, lca.TYPES):
        assert keys <= set(r) and r["type"] == kind and r["length"] == 300
        assert r["decode_steps"] == 6 and len(r["round_medians_ms"]) == 3
        assert r["decode_ms_min"] <= r["decode_ms_median"] <= r["decode_ms_max"]
        assert r["prefill"] == "run" and r["prefill_s"] >= 0 and r["positions"] == 300 + 7
    assert "|" in lca.markdown_table(rows)


def test_cli_spawned_case_prints_the_table_and_one_json_line(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    png = tmp_path / "plot.png"
    result = lca.main(["--lengths", "512", "--types", "full", "--plot", str(png), "--no-progress"])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("{") and json.loads(out[-1]) == result
    assert "load average at start" in out[0] and any("load average at end" in line for line in out)
    assert any(line.startswith("| 512 | full | ") for line in out)
    (row,) = result["results"]
    assert row["bytes_per_token_layer"] == 320 and row["decode_steps"] == 24 and row["prefill"] == "run"
    assert png.stat().st_size > 1000


@pytest.mark.parametrize("argv, message", [
    (["--lengths", "4K,abc"], "--lengths"), (["--lengths", "0"], "--lengths"), (["--lengths", "-4096"], "--lengths"),
    (["--types", "full,v5"], "--types"), (["--types", ","], "--types"), (["--prefill-max", "v5=4K"], "--prefill-max"),
    (["--rounds", "2"], "--rounds"), (["--steps", "4"], "--steps"), (["--threads", "0"], "--threads"),
])  # fmt: skip
def test_bad_options_fail_in_one_line_before_any_work(argv, message, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("work started")

    monkeypatch.setattr(lca, "run", no_work)
    monkeypatch.setattr(lca, "measure_length", no_work)
    with pytest.raises(SystemExit) as e:
        lca.main(argv)
    text = str(e.value.code)
    assert message in text and "\n" not in text and text.startswith("long_context_all:")


def test_lengths_accept_suffixes():
    assert [lca.parse_length(x) for x in ("4096", "4k", "16K", "1M")] == [4096, 4096, 16384, 2**20]
    _, lengths, kinds, opts = lca.parse_args(["--lengths", "16K,4K,4096", "--types", "v4,full",
                                              "--prefill-max", "all=0,v4=8K"])  # fmt: skip
    assert lengths == [4096, 16384] and kinds == ["full", "v4"]
    assert opts["prefill_max"] == {"full": 0, "compressed": 0, "sparse": 0, "v4": 8192}
