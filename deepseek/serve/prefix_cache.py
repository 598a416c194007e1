"""Prefix cache: latents of prompt prefixes already computed (a shared system prompt, earlier chat turns), kept
in a bounded pool and copied into a new sequence's slot so that only the rest of its prompt is prefilled.

Legend: L layers, P pool blocks, b tokens per block, C kv_lora_rank, R qk_rope_head_dim, T tokens.

Block-granular and exact: a prompt is cut into full blocks of b tokens; block i's key is a hash chain,
blake2b(key of block i - 1 + block i's token ids), so a key stands for the whole prefix up to its block, and a
match also compares the stored block's tokens and parent key (a hash collision cannot give wrong latents). A
prompt reuses the longest chain of cached blocks it starts with, but never its last token (the prefill must
compute it to get the next-token logits: a prompt that is all cached blocks recomputes only that token). Because of RoPE, a latent depends on its position as well as on every
earlier token, and block i always holds positions [i*b, (i+1)*b), so same prefix = same latents.

The pool is preallocated (`capacity_tokens // b` blocks) and evicted least recently used first; a hit or a
store touches its chain leaf first, root last, so leaves go before the prefixes they extend. Blocks of media
prompts are never stored (placeholder ids do not identify the image). Not done: a paged cache in which running
sequences share blocks through block tables (here a hit is a copy into the sequence's own slot), and sharing a
prefix between prompts admitted in the same step (each computes it; later prompts hit).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch


class PrefixCache:
    def __init__(self, config, capacity_tokens: int, block_size: int = 16, device=None, dtype=torch.float32):
        if block_size < 1 or capacity_tokens < block_size:
            raise ValueError(f"PrefixCache needs block_size >= 1 and capacity_tokens >= block_size, got "
                             f"{block_size}, {capacity_tokens}")  # fmt: skip
        L, P = config.num_hidden_layers, capacity_tokens // block_size
        self.block_size = block_size
        self.kv_LPbC = torch.zeros(L, P, block_size, config.kv_lora_rank, device=device, dtype=dtype)
        self.pe_LPbR = torch.zeros(L, P, block_size, config.qk_rope_head_dim, device=device, dtype=dtype)
        self.blocks: OrderedDict[bytes, int] = OrderedDict()  # key -> pool block, least recently used first
        self.owner: list[tuple[bytes, bytes, tuple[int, ...]] | None] = [None] * P  # (key, parent key, tokens)
        self.free = list(range(P - 1, -1, -1))

    @property
    def num_blocks(self) -> int:
        return len(self.owner)

    def cached_tokens(self) -> int:
        return len(self.blocks) * self.block_size

    def nbytes(self) -> int:
        return self.kv_LPbC.nbytes + self.pe_LPbR.nbytes

    def keys(self, ids: list[int], n_tokens: int) -> list[tuple[bytes, bytes, tuple[int, ...]]]:
        """(key, parent key, tokens) of each full block of ids[:n_tokens]."""
        out, parent, b = [], b"", self.block_size
        for i in range(n_tokens // b):
            block = tuple(ids[i * b : (i + 1) * b])
            key = hashlib.blake2b(parent + b"".join(t.to_bytes(8, "little") for t in block), digest_size=16).digest()
            out.append((key, parent, block))
            parent = key
        return out

    def match(self, ids: list[int]) -> list[int]:
        """Pool blocks of the longest chain of cached full blocks that ids starts with."""
        found = []
        for key, parent, block in self.keys(ids, len(ids)):
            j = self.blocks.get(key)
            if j is None or self.owner[j] != (key, parent, block):
                break
            found.append(j)
        return found

    def hit_length(self, ids: list[int], found: list[int]) -> int:
        """Positions a match gives: its blocks, less the prompt's last token (computed for its logits)."""
        return min(len(found) * self.block_size, len(ids) - 1)

    def load(self, slots, slot: int, ids: list[int], found: list[int]) -> int:
        """Copy the match's positions into an empty slot; returns how many (see hit_length)."""
        n = self.hit_length(ids, found)
        if n <= 0:
            return 0
        idx = torch.tensor(found, device=self.kv_LPbC.device)
        kv_LTC = self.kv_LPbC[:, idx].flatten(1, 2)[:, :n]  # (L, n, C)
        pe_LTR = self.pe_LPbR[:, idx].flatten(1, 2)[:, :n]
        slots.write(slot, kv_LTC, pe_LTR)
        self._touch([self.owner[j][0] for j in found])
        return n

    def store(self, slots, slot: int, ids: list[int]) -> int:
        """Keep the full blocks of ids (whose latents sit in the slot's first len(ids) positions) that are not
        cached yet, evicting least recently used blocks; at most the pool's size. Returns blocks added."""
        chain = self.keys(ids, min(len(ids), slots.lengths[slot]))[: self.num_blocks]
        self._touch([k for k, _, _ in chain if k in self.blocks])
        added = 0
        for i, entry in enumerate(chain):
            if entry[0] in self.blocks:
                continue
            j = self._take()
            b = self.block_size
            self.kv_LPbC[:, j] = slots.kv_LNMC[:, slot, i * b : (i + 1) * b]
            self.pe_LPbR[:, j] = slots.pe_LNMR[:, slot, i * b : (i + 1) * b]
            self.owner[j] = entry
            self.blocks[entry[0]] = j
            added += 1
        self._touch([k for k, _, _ in chain])
        return added

    def _take(self) -> int:
        if not self.free:
            _, j = self.blocks.popitem(last=False)  # the least recently used block
            self.owner[j] = None
            return j
        return self.free.pop()

    def _touch(self, chain_keys: list[bytes]) -> None:
        """Mark a chain used: leaf first, root last, so the root is the most recently used."""
        for k in reversed(chain_keys):
            if k in self.blocks:
                self.blocks.move_to_end(k)
