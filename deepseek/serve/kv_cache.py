"""Per-sequence latent KV cache for the serving engine: a pool of slots, one per running sequence.

Legend: L layers, N slots, M max positions per slot, B rows in a step, S attended positions, T new tokens,
C kv_lora_rank, R qk_rope_head_dim.

The pool holds only the MLA latent (C + R numbers per token per layer). The engine allocates a slot when a
request starts and frees it when the request ends (finished, cancelled, timed out, disconnected). A step over
some running sequences uses a view under the latent-cache protocol (deepseek/model/cache.py; a dense cache:
`update` stores and returns what to attend to, `get_seq_length`):
- `PrefillView`: one sequence, T prompt tokens appended at its current length (the reference prefill path);
- `BatchPrefillView`: B sequences, right-padded to T new tokens; row b appends its n_b tokens at its own
  length start_b (0, or the length of a prefix copied in from the prefix cache). `update` writes only the
  valid (unpadded) tokens into each row's own slot and returns the gathered (B, S, C) latent, S = max(end_b);
  `mask_BTS` lets query t of row b see columns <= its position start_b + min(t, n_b - 1), so a real query
  never sees padding or another row's columns, and a padded query repeats its row's last real one (no
  all-masked row, no NaN); padded outputs are dropped;
- `DecodeView`: B sequences of different lengths, one new token each. `update` writes each row's token at
  that row's own length and returns a gathered (B, S, C) latent in which row b holds its cached positions
  at [0, len_b) and its new token in the last column S - 1 = max(len); `attention_mask` (B, S) marks exactly
  those columns valid. transformers.build_mask also lets every query see column S - 1 (itself), which is why
  the new token sits there for every row. Attention does not depend on key order and RoPE was applied
  before caching, so this is exactly the per-sequence attention.
"""

from __future__ import annotations

import torch

from ..model.cache import DenseCache


class SlotCache:
    def __init__(self, config, num_slots: int, max_len: int, device=None, dtype=torch.float32):
        if num_slots < 1 or max_len < 2:
            raise ValueError(f"SlotCache needs num_slots >= 1 and max_len >= 2, got {num_slots}, {max_len}")
        L = config.num_hidden_layers
        self.max_len = max_len
        self.kv_LNMC = torch.zeros(L, num_slots, max_len, config.kv_lora_rank, device=device, dtype=dtype)
        self.pe_LNMR = torch.zeros(L, num_slots, max_len, config.qk_rope_head_dim, device=device, dtype=dtype)
        self.lengths = [0] * num_slots
        self.free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first

    @property
    def num_slots(self) -> int:
        return len(self.lengths)

    def num_free(self) -> int:
        return len(self.free)

    def allocate(self) -> int:
        if not self.free:
            raise RuntimeError("SlotCache: no free slot (the scheduler admits at most num_slots sequences)")
        slot = self.free.pop()
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        if slot in self.free:
            raise RuntimeError(f"SlotCache: slot {slot} released twice")
        self.lengths[slot] = 0
        self.free.append(slot)

    def nbytes(self) -> int:
        return self.kv_LNMC.nbytes + self.pe_LNMR.nbytes

    def prefill_view(self, slot: int) -> PrefillView:
        return PrefillView(self, slot)

    def decode_view(self, slots: list[int]) -> DecodeView:
        return DecodeView(self, slots)

    def batch_prefill_view(self, slots: list[int], n_new: list[int]) -> BatchPrefillView:
        return BatchPrefillView(self, slots, n_new)

    def write(self, slot: int, kv_LTC: torch.Tensor, pe_LTR: torch.Tensor) -> None:
        """Put T already computed positions at the start of an empty slot (a prefix-cache hit) and commit them."""
        T = kv_LTC.shape[1]
        if self.lengths[slot] != 0 or T > self.max_len:
            raise ValueError(f"SlotCache.write: slot {slot} holds {self.lengths[slot]} positions, or {T} > max_len")
        self.kv_LNMC[:, slot, :T] = kv_LTC
        self.pe_LNMR[:, slot, :T] = pe_LTR
        self.lengths[slot] = T


class PrefillView(DenseCache):
    """One slot as a batch-1 LatentCache: appends T tokens after the slot's current length."""

    def __init__(self, pool: SlotCache, slot: int):
        self.pool, self.slot = pool, slot
        self.start = pool.lengths[slot]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.start

    def update(self, kv_BTC, pe_BTR, layer_idx: int):
        p, s = self.pool, self.slot
        end = self.start + kv_BTC.shape[1]
        if kv_BTC.shape[0] != 1 or end > p.max_len:
            raise ValueError(f"PrefillView: batch {kv_BTC.shape[0]} (want 1), {end} positions > {p.max_len}")
        p.kv_LNMC[layer_idx, s, self.start : end] = kv_BTC[0]
        p.pe_LNMR[layer_idx, s, self.start : end] = pe_BTR[0]
        return p.kv_LNMC[layer_idx, s : s + 1, :end], p.pe_LNMR[layer_idx, s : s + 1, :end]

    def commit(self, n_tokens: int) -> None:
        self.pool.lengths[self.slot] = self.start + n_tokens

    def crop(self, length: int) -> None:
        self.pool.lengths[self.slot] = min(self.pool.lengths[self.slot], length)


class BatchPrefillView(DenseCache):
    """B slots, right-padded prompts: row b appends n_b tokens at its own length (see the module docstring)."""

    def __init__(self, pool: SlotCache, slots: list[int], n_new: list[int]):
        if min(n_new) < 1:
            raise ValueError("BatchPrefillView: every row needs at least one new token")
        self.pool, self.slots, self.n_new = pool, slots, n_new
        self.starts = [pool.lengths[s] for s in slots]
        ends = [a + n for a, n in zip(self.starts, n_new)]
        if max(ends) > pool.max_len:
            raise ValueError(f"BatchPrefillView: a sequence would exceed {pool.max_len} cached positions")
        self.S, self.T = max(ends), max(n_new)
        device = pool.kv_LNMC.device
        self.rows_B = torch.tensor(slots, device=device)
        n_B = torch.tensor(n_new, device=device)
        t_T = torch.arange(self.T, device=device)
        self.valid_BT = t_T[None, :] < n_B[:, None]  # False = padding
        start_B = torch.tensor(self.starts, device=device)
        self.position_ids = start_B[:, None] + torch.minimum(t_T[None, :], n_B[:, None] - 1)  # (B, T)
        cols_S = torch.arange(self.S, device=device)
        self.mask_BTS = cols_S[None, None, :] <= self.position_ids[:, :, None]  # True = attend
        self.rows_N = self.rows_B[:, None].expand(-1, self.T)[self.valid_BT]  # (N,) N = sum(n_b) real tokens
        self.pos_N = self.position_ids[self.valid_BT]  # (N,)
        self.last_B = n_B - 1  # each row's last real token (its next-token logits)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.S - self.T  # unused: the runner passes position_ids and mask_BTS

    def update(self, kv_BTC, pe_BTR, layer_idx: int):
        p = self.pool
        assert kv_BTC.shape[:2] == (len(self.slots), self.T), f"BatchPrefillView: want ({len(self.slots)}, {self.T})"
        p.kv_LNMC[layer_idx, self.rows_N, self.pos_N] = kv_BTC[self.valid_BT]  # (N, C): real tokens only
        p.pe_LNMR[layer_idx, self.rows_N, self.pos_N] = pe_BTR[self.valid_BT]
        return p.kv_LNMC[layer_idx, self.rows_B, : self.S], p.pe_LNMR[layer_idx, self.rows_B, : self.S]

    def commit(self) -> None:
        for s, a, n in zip(self.slots, self.starts, self.n_new):
            self.pool.lengths[s] = a + n

    def crop(self, length: int) -> None:
        raise NotImplementedError("BatchPrefillView does not support crop")


class DecodeView(DenseCache):
    """B slots of different lengths, one new token each (see the module docstring for the layout)."""

    def __init__(self, pool: SlotCache, slots: list[int]):
        self.pool = pool
        self.slots = slots
        self.lens = [pool.lengths[s] for s in slots]
        if max(self.lens) + 1 > pool.max_len:
            raise ValueError(f"DecodeView: a sequence would exceed {pool.max_len} cached positions")
        self.S = max(self.lens) + 1
        device = pool.kv_LNMC.device
        self.rows_B = torch.tensor(slots, device=device)
        self.lens_B = torch.tensor(self.lens, device=device)
        cols_S = torch.arange(self.S, device=device)
        self.attention_mask = (cols_S[None, :] < self.lens_B[:, None]) | (cols_S[None, :] == self.S - 1)  # (B, S)
        self.position_ids = self.lens_B[:, None]  # (B, 1): the new token's position in its own sequence

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.S - 1

    def update(self, kv_BTC, pe_BTR, layer_idx: int):
        p = self.pool
        assert kv_BTC.shape[:2] == (len(self.slots), 1), f"DecodeView: want ({len(self.slots)}, 1, C)"
        p.kv_LNMC[layer_idx, self.rows_B, self.lens_B] = kv_BTC[:, 0]
        p.pe_LNMR[layer_idx, self.rows_B, self.lens_B] = pe_BTR[:, 0]
        kv_BSC = p.kv_LNMC[layer_idx, self.rows_B, : self.S]  # advanced indexing: a gathered copy
        pe_BSR = p.pe_LNMR[layer_idx, self.rows_B, : self.S]
        kv_BSC[:, -1] = kv_BTC[:, 0]
        pe_BSR[:, -1] = pe_BTR[:, 0]
        return kv_BSC, pe_BSR

    def commit(self) -> None:
        for s, n in zip(self.slots, self.lens):
            self.pool.lengths[s] = n + 1

    def crop(self, length: int) -> None:
        raise NotImplementedError("DecodeView does not support crop (no speculative decoding in the engine)")
