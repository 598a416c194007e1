"""DeepSeek-V4's decode cache: the window, the compressed entries, the indexer's keys.

Legend: B batch, T new tokens, L window keys held, E head_dim (K = V), F a compressor's width (E, or I for the CSA
indexer), m compression rate, W entries.

The V4 counterpart of model/cache.py's latent protocol (V4 attends to one shared K = V head with per-head sinks,
not to an MLA latent, so the math stays in v4/model.py and the cache only stores):

    class V4CacheProtocol(Protocol):
        def get_seq_length(self, layer_idx: int = 0) -> int
        def window_keys(self, layer_idx, kv_BTE) -> tuple[kv_BLE, first_index]
        def pending(self, layer_idx, name, kv_BTF, gate_BTF, rate) -> (kv, gate, first_position, prior)
        def add_entries(self, layer_idx, name, entries_BWF, overlap=None) -> entries so far (B, W, F)

Per layer it keeps the last `sliding_window - 1` keys (the window; `window_keys` returns them with the T new ones
and the absolute index of the first), and per compressor (`"compressor"`: the layer's CSA or HCA entries,
`"indexer"`: the CSA indexer's keys) the tokens of the window not yet complete, the previous window's first
half-features (CSA's overlap) and every entry so far. A forward without a cache runs on a fresh one, so prefill
and a full forward are the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CompressorState:
    pending_kv: torch.Tensor | None = None  # (B, < m, F2) projections of an unfinished window
    pending_gate: torch.Tensor | None = None
    overlap: tuple[torch.Tensor, torch.Tensor] | None = None  # CSA: last window's first half (kv, gate+bias)
    buffer: torch.Tensor | None = None  # (B, capacity, F): the first `count` rows are the entries
    count: int = 0  # entries emitted


class V4Cache:
    def __init__(self, config, max_len: int | None = None):
        """max_len: positions the cache will hold; each compressor's entries are then allocated once, exactly
        (max_len // m), as LatentCache allocates its latents. Without it they grow by a quarter when full."""
        self.max_len = max_len
        self.window = config.sliding_window
        self.kv: dict[int, torch.Tensor] = {}
        self.seen: dict[int, int] = {}
        self.states: dict[tuple[int, str], CompressorState] = {}

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen.get(layer_idx, 0)

    def window_keys(self, layer_idx: int, kv_BTE: torch.Tensor) -> tuple[torch.Tensor, int]:
        prev = self.kv.get(layer_idx)
        full = kv_BTE if prev is None else torch.cat((prev, kv_BTE), dim=1)
        seen = self.seen.get(layer_idx, 0)
        first = seen - (0 if prev is None else prev.shape[1])
        keep = max(self.window - 1, 0)
        self.kv[layer_idx] = full[:, full.shape[1] - min(keep, full.shape[1]) :]
        self.seen[layer_idx] = seen + kv_BTE.shape[1]
        return full, first

    def pending(self, layer_idx: int, name: str, kv_BTF, gate_BTF, rate: int):
        """The complete windows so far (kv, gate: a multiple of `rate` tokens), the position of their first token,
        and the previous call's overlap half (or None); the rest waits for the next call."""
        s = self.states.setdefault((layer_idx, name), CompressorState())
        if s.pending_kv is not None:
            kv_BTF, gate_BTF = torch.cat((s.pending_kv, kv_BTF), 1), torch.cat((s.pending_gate, gate_BTF), 1)
        usable = kv_BTF.shape[1] // rate * rate
        s.pending_kv, s.pending_gate = kv_BTF[:, usable:], gate_BTF[:, usable:]
        return kv_BTF[:, :usable], gate_BTF[:, :usable], s.count * rate, s.overlap

    def add_entries(self, layer_idx: int, name: str, entries_BWF, overlap=None, rate: int = 1) -> torch.Tensor:
        """Append entries (one per `rate` tokens); returns every entry so far (B, W, F), a view of a buffer
        allocated for max_len // rate entries (or grown by a quarter when full), so a decode step copies nothing
        (it adds one entry every `rate` steps, or none)."""
        s = self.states[(layer_idx, name)]
        B, W, F = entries_BWF.shape
        n = s.count + W
        if s.buffer is None or s.buffer.shape[1] < n:
            planned = self.max_len // rate if self.max_len else 0
            grown = s.buffer.shape[1] * 5 // 4 if s.buffer is not None else 0
            grown = entries_BWF.new_empty(B, max(n, planned, grown), F)
            if s.count:
                grown[:, : s.count] = s.buffer[:, : s.count]
            s.buffer = grown
        s.buffer[:, s.count : n] = entries_BWF
        s.count = n
        if overlap is not None:
            s.overlap = overlap
        return s.buffer[:, :n]

    def nbytes(self) -> dict[str, int]:
        """Bytes held: the windows, the compressed entries, the indexer keys, and the pending / overlap state."""
        out = {"window": sum(t.nbytes for t in self.kv.values()), "compressed": 0, "indexer": 0, "pending": 0}
        for (_, name), s in self.states.items():
            if s.buffer is not None:  # what is allocated (at most 1/4 above the entries held)
                out["indexer" if name == "indexer" else "compressed"] += s.buffer.nbytes
            for t in (s.pending_kv, s.pending_gate, *(s.overlap or ())):
                out["pending"] += 0 if t is None else t.nbytes
        return out


def bytes_per_token_v4(config, element_size: int = 2) -> dict[str, float]:
    """Decode-cache bytes per token at long context, summed over layers: compressed entries (E per m tokens) and
    CSA indexer keys (I per m tokens); plus the fixed window (sliding_window - 1 keys of E per layer)."""
    E, I = config.head_dim, config.index_head_dim
    out = {"compressed_entries": 0.0, "indexer_keys": 0.0}
    for kind in config.attention_types:
        if kind == "sliding_attention":
            continue
        m = config.compress_rates[kind]
        out["compressed_entries"] += E * element_size / m
        if kind == "compressed_sparse_attention":
            out["indexer_keys"] += I * element_size / m
    out["per_token"] = out["compressed_entries"] + out["indexer_keys"]
    out["window_fixed"] = len(config.attention_types) * (config.sliding_window - 1) * E * element_size
    return out
