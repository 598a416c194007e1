"""CompressedLatentCache: a hierarchical MLA latent cache for 128K-token contexts.

Legend: B batch, T new tokens, S attended positions, H heads, C kv_lora_rank, R qk_rope_head_dim,
K = C + R (one cached "key" row), n sealed blocks, k selected blocks, X query tiles, t queries per tile,
b block size (tokens), P packed bytes per token.

Per layer, the positions 0..L-1 live in exactly one of three places:

    [ sinks: first kv_sink_blocks blocks, full precision ]      always attended
    [ sealed blocks: kv_quant_bits-bit latent + summaries ]     top-k per query tile read in full (dequantised),
                                                                the rest through their mean latent (coarse)
    [ recent: the last kv_window..compression.window+b tokens, full ]    always attended, causal

A block is sealed (quantised, summarised) only once it has left the window, and only *after* the attention
of the step that appended it, so every query sees its own chunk and the window at full precision.
Scores are taken in the absorbed MLA form: q_lat . kv + q_pe . pe; the value is the latent kv itself, so a
block's mean latent serves as both its coarse key and its coarse value. Each sealed block keeps two summaries,
its mean key and its per-channel radius max|key - mean|. Selection scores a block by a Quest-style upper bound
of q . key, q . mean + |q| . radius, plus the score against the mean (as NSA's compressed branch); both are
softmaxed over blocks per query and head and summed over the tile's queries and all heads (MLA has one
shared latent "KV head", so selection is shared across heads as NSA does for a GQA group). A prefill tile
selects with its mean query.

With config.compression.compact_positions (training-free length extrapolation, in the spirit of StreamingLLM's
in-cache positions and InfLLM's), each query tile sees its attended set laid out contiguously at rope positions
just below the recent buffer: [block means][sinks][selected blocks, in order][recent, true positions]. Sealed
blocks store their rope keys rotated back to block-relative positions 0..b-1 (so the summaries are position-free
too) and are rotated to their slot when read. Every relative distance a query sees is then below
window + chunk + (k + 2) * b + sinks, at any context length, so a model trained a little beyond that length
is never asked for a distance it has not seen. When every block is selected the slots are the true positions,
so the lossless settings stay exact.

With config.compression.learned, each layer's `attn.nsa` (longctx/learned.py) adds learned log-gates to the three
branches' scores and learned intra-block weights to the summary mean; without it nothing changes.

`reconstruct` (all positions in order) and `update` are the reference path: with kv_quant_bits=0 and
kv_topk_blocks >= the number of blocks, `attend` equals plain attention over `reconstruct` (tested).
"""

from __future__ import annotations

import math

import torch

from ..cache import Attended, KeyGroup, LatentQuery
from ..rope import rope_frequencies, rotate
from .learned import block_summary, score_blocks, top_runs
from .quant import Quantized, dequantize, quantize


class LayerStore:
    """One layer's compressed cache. Tensors are allocated once for max_len positions (static cache)."""

    def __init__(self, cache: CompressedLatentCache, B: int, device, dtype):
        c = cache
        self.length = 0  # positions written
        self.recent_start = 0  # first position held in the recent buffer
        self.sink_filled = 0  # positions held in the sink buffer
        self.n_blocks = 0  # sealed blocks
        cap = c.window + 2 * c.block + c.chunk
        self.recent_kv = torch.zeros(B, cap, c.C, device=device, dtype=dtype)
        self.recent_pe = torch.zeros(B, cap, c.R, device=device, dtype=dtype)
        self.sink_kv = torch.zeros(B, c.sink_len, c.C, device=device, dtype=dtype)
        self.sink_pe = torch.zeros(B, c.sink_len, c.R, device=device, dtype=dtype)
        n, b, K = c.max_blocks, c.block, c.C + c.R
        self.kmean = torch.zeros(B, n, K, device=device, dtype=dtype)  # per block: mean key (and value)
        self.kradius = torch.zeros(B, n, K, device=device, dtype=dtype)  # max |key - mean| per channel
        host = c.host_device
        if c.bits:
            def payload(dim):
                g = min(c.group, dim)
                return Quantized(
                    torch.zeros(B, n, b, dim * c.bits // 8, device=host, dtype=torch.uint8),
                    torch.zeros(B, n, b, dim // g, device=host, dtype=torch.float16),
                    torch.zeros(B, n, b, dim // g, device=host, dtype=torch.float16),
                    c.bits, g,
                )  # fmt: skip

            self.kv_q, self.pe_q = payload(c.C), payload(c.R)
        else:
            self.kv_full = torch.zeros(B, n, b, c.C, device=host, dtype=dtype)
            self.pe_full = torch.zeros(B, n, b, c.R, device=host, dtype=dtype)


class CompressedLatentCache:
    def __init__(self, config, batch_size: int, max_len: int, device=None, dtype=torch.float32, layers=None,
                 host_device=None):  # fmt: skip
        n_layers = layers if layers is not None else config.num_hidden_layers
        self.C, self.R = config.kv_lora_rank, config.qk_rope_head_dim
        self.block = config.compression.block_size
        self.sink_blocks = config.compression.sink_blocks
        self.sink_len = self.sink_blocks * self.block
        self.window = config.compression.window
        self.topk = config.compression.topk_blocks
        self.span = config.compression.select_span
        self.bits = config.compression.quant_bits
        self.group = config.compression.quant_group
        self.coarse = config.compression.coarse
        self.chunk = config.prefill_chunk
        self.compact = config.compression.compact_positions
        self.inv_freq = rope_frequencies(config.rope_parameters, self.R)[0]
        self.interleave = config.rope_interleave
        self.max_len = max_len
        self.max_blocks = max(0, math.ceil(max_len / self.block) - self.sink_blocks)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.offload = config.compression.offload  # payload designated host memory (the same RAM on a CPU-only machine)
        self.host_device = torch.device(host_device or "cpu") if self.offload else self.device
        self.dtype = dtype
        self.one_selection = False  # set by refresh_recent: every tile of a call reads the last tile's blocks
        lead = config.compression.lead_layer  # the layer whose selection the others read
        self.lead = None if lead is None else lead % n_layers
        self.lead_idx = None  # (B, 1, k): the lead layer's latest selection (its last tile's)
        self.store = [LayerStore(self, batch_size, self.device, dtype) for _ in range(n_layers)]

    # ------------------------------------------------------------------ the cache interface
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.store[layer_idx].length

    def crop(self, length: int) -> None:
        """Forget positions >= length; only positions still in the recent buffer can be forgotten."""
        for st in self.store:
            if length < st.recent_start:
                raise ValueError(f"cannot crop to {length}: positions below {st.recent_start} are already sealed")
            st.length = min(st.length, length)

    def update(self, kv_BTC: torch.Tensor, pe_BTR: torch.Tensor, layer_idx: int):
        """Reference path (any attention): append, then return every position, dequantised, in order."""
        self.append(kv_BTC, pe_BTR, layer_idx)
        out = self.reconstruct(layer_idx)
        self.seal(layer_idx)
        return out

    # ------------------------------------------------------------------ writing
    def append(self, kv_BTC: torch.Tensor, pe_BTR: torch.Tensor, layer_idx: int) -> None:
        st = self.store[layer_idx]
        T = kv_BTC.shape[1]
        if st.length + T > self.max_len:
            raise ValueError(f"CompressedLatentCache is full: {st.length + T} positions needed, {self.max_len} allocated")
        start = st.length - st.recent_start
        if start + T > st.recent_kv.shape[1]:  # a chunk larger than planned: grow the staging buffer
            grow = start + T - st.recent_kv.shape[1]
            st.recent_kv = torch.cat((st.recent_kv, st.recent_kv.new_zeros(st.recent_kv.shape[0], grow, self.C)), 1)
            st.recent_pe = torch.cat((st.recent_pe, st.recent_pe.new_zeros(st.recent_pe.shape[0], grow, self.R)), 1)
        st.recent_kv[:, start : start + T] = kv_BTC
        st.recent_pe[:, start : start + T] = pe_BTR
        st.length += T

    def seal(self, layer_idx: int, weights_b: torch.Tensor | None = None) -> None:
        """Move every whole block that has left the window out of the recent buffer (sinks or sealed).
        weights_b (b,): learned intra-block weights for the summary mean (kv_learned; None = plain mean)."""
        st, b = self.store[layer_idx], self.block
        m = max(0, (st.length - self.window - st.recent_start) // b)
        if m == 0:
            return
        kv_BMC = st.recent_kv[:, : m * b]
        pe_BMR = st.recent_pe[:, : m * b]
        first = st.recent_start // b
        n_sink = max(0, min(m, self.sink_blocks - first))
        if n_sink:
            lo, hi = first * b, (first + n_sink) * b
            st.sink_kv[:, lo:hi] = kv_BMC[:, : n_sink * b]
            st.sink_pe[:, lo:hi] = pe_BMR[:, : n_sink * b]
            st.sink_filled = hi
        if m > n_sink:
            kv = kv_BMC[:, n_sink * b :].unflatten(1, (-1, b))  # (B, m', b, C)
            pe = pe_BMR[:, n_sink * b :].unflatten(1, (-1, b))  # (B, m', b, R)
            lo, hi = st.n_blocks, st.n_blocks + kv.shape[1]
            if self.compact:  # rope keys back to block-relative positions 0..b-1
                pe = rotate(pe, -self.block_starts(lo, hi)[None, :, None], self.inv_freq, self.interleave)
            keys = torch.cat((kv, pe), dim=-1)  # (B, m', b, K)
            st.kmean[:, lo:hi], st.kradius[:, lo:hi] = block_summary(keys, weights_b)
            if self.bits:
                for dst, src in ((st.kv_q, kv), (st.pe_q, pe)):
                    q = quantize(src, self.bits, dst.group)
                    dst.packed[:, lo:hi] = q.packed.to(self.host_device)
                    dst.step[:, lo:hi] = q.step.to(self.host_device)
                    dst.low[:, lo:hi] = q.low.to(self.host_device)
            else:
                st.kv_full[:, lo:hi] = kv.to(self.host_device)
                st.pe_full[:, lo:hi] = pe.to(self.host_device)
            st.n_blocks = hi
        keep = st.length - st.recent_start - m * b
        st.recent_kv[:, :keep] = st.recent_kv[:, m * b : m * b + keep].clone()
        st.recent_pe[:, :keep] = st.recent_pe[:, m * b : m * b + keep].clone()
        st.recent_start += m * b

    def block_starts(self, lo: int, hi: int) -> torch.Tensor:
        """First position of sealed blocks lo..hi-1: (hi - lo,)."""
        return self.sink_len + torch.arange(lo, hi, device=self.device) * self.block

    # ------------------------------------------------------------------ reading
    def fetch(self, layer_idx: int, idx: torch.Tensor):
        """Selected sealed blocks idx (B, X, k) -> full-width latent (B, X, k*b, C), (B, X, k*b, R)."""
        st = self.store[layer_idx]
        B = idx.shape[0]
        rows = torch.arange(B, device=self.host_device)[:, None, None]
        idx = idx.to(self.host_device)
        def gather(x):  # (B, n, b, F) -> (B, X, k, b, F), whole blocks as contiguous rows
            return x.flatten(2)[rows, idx].unflatten(-1, x.shape[2:]).to(self.device)

        if self.bits:
            out = []
            for q in (st.kv_q, st.pe_q):
                part = Quantized(gather(q.packed), gather(q.step), gather(q.low), q.bits, q.group)
                out.append(dequantize(part, self.dtype).flatten(2, 3))  # (B, X, k*b, C|R)
            return out[0], out[1]
        return gather(st.kv_full).flatten(2, 3), gather(st.pe_full).flatten(2, 3)

    def reconstruct(self, layer_idx: int):
        """Every cached position in order, dequantised: (B, L, C), (B, L, R)."""
        st = self.store[layer_idx]
        B = st.recent_kv.shape[0]
        kv = [st.sink_kv[:, : st.sink_filled]]
        pe = [st.sink_pe[:, : st.sink_filled]]
        if st.n_blocks:
            idx = torch.arange(st.n_blocks, device=self.device)[None, None].expand(B, 1, -1)
            bkv, bpe = self.fetch(layer_idx, idx)
            bpe = bpe[:, 0]
            if self.compact:  # block-relative rope keys back to their true positions
                starts = self.block_starts(0, st.n_blocks).repeat_interleave(self.block)
                bpe = rotate(bpe, starts[None], self.inv_freq, self.interleave)
            kv.append(bkv[:, 0])
            pe.append(bpe)
        n = st.length - st.recent_start
        kv.append(st.recent_kv[:, :n])
        pe.append(st.recent_pe[:, :n])
        return torch.cat(kv, 1), torch.cat(pe, 1)

    def select_blocks(self, q_BXtHK: torch.Tensor, layer_idx: int, scale: float, valid_Xt=None):
        """Top-k sealed blocks per query tile (in runs of kv_select_span). q (B, X, t, H, K) -> idx (B, X, k).

        Importance per block = softmax over blocks of a Quest-style upper bound of q . key, q . mean + |q| .
        radius (catches a single sharp key when keys concentrate on few channels) + softmax of q . mean (NSA's
        compressed attention; catches a sharp key when the bound is loose, as for near-isotropic latents).
        Two summaries per block (mean, radius) instead of Quest's three (min, max, and a mean for coarse)."""
        st = self.store[layer_idx]
        n = st.n_blocks
        if q_BXtHK.shape[2] > 1 or valid_Xt is not None:  # a prefill tile selects with its mean query: O(X)
            weight = valid_Xt if valid_Xt is not None else q_BXtHK.new_ones(q_BXtHK.shape[1:3])
            q_BXtHK = (q_BXtHK * weight[None, :, :, None, None]).sum(2, keepdim=True)
            q_BXtHK = q_BXtHK / weight.sum(1)[None, :, None, None, None]
        return top_runs(score_blocks(q_BXtHK[:, :, 0], st.kmean[:, :n], st.kradius[:, :n], scale), self.topk,
                        self.span)  # fmt: skip

    def choose_blocks(self, q_BXtHK, layer_idx: int, scale: float, valid_Xt=None) -> torch.Tensor:
        """The blocks (B, X, k) each query tile reads: normally each layer's own select_blocks per tile.
        one_selection (refresh_recent): every tile reads what the last tile selects.
        kv_lead_layer = j: in decode steps and in the refresh, the other layers read layer j's selection: the
        layers after it its choice in this forward, the layers before it its choice in the previous forward
        (the last prefill chunk, then each step). Layer j should be the one whose query learnt to retrieve; an
        earlier layer's own choice can cut a needle in half."""
        X = q_BXtHK.shape[1]
        follow = self.lead is not None and layer_idx != self.lead and (X == 1 or self.one_selection)
        lead = self.lead_idx if follow else None
        if lead is not None and lead.shape[-1] == min(self.topk, self.store[layer_idx].n_blocks):
            return lead.expand(-1, X, -1)  # (a block sealed since then can make k grow: then select anew)
        if self.one_selection and X > 1:
            last = None if valid_Xt is None else valid_Xt[-1:]
            idx_BXk = self.select_blocks(q_BXtHK[:, -1:], layer_idx, scale, last).expand(-1, X, -1)
        else:
            idx_BXk = self.select_blocks(q_BXtHK, layer_idx, scale, valid_Xt)
        if layer_idx == self.lead:
            self.lead_idx = idx_BXk[:, -1:]
        return idx_BXk

    def attended(self, layer_idx: int, kv_BTC, pe_BTR, query: LatentQuery, mask_BTS=None) -> Attended:
        """Append the new latent, then say what each query tile attends to: sinks + selected blocks (branch 0),
        coarse means of the other sealed blocks (branch 1, + log b), the causal recent window (branch 2)."""
        if mask_BTS is not None and not bool(mask_BTS[:, -1].all()):
            raise ValueError("CompressedLatentCache does not take padded batches; run rows of equal length")
        self.append(kv_BTC, pe_BTR, layer_idx)
        return self.groups(query.lat_BTHC, query.pe_BTHR, layer_idx, query.scale)

    def finish(self, layer_idx: int, block_weights_b: torch.Tensor | None = None) -> None:
        """After the layer's attention: seal the blocks that have left the window."""
        self.seal(layer_idx, block_weights_b)

    def groups(self, q_lat_BTHC, q_pe_BTHR, layer_idx: int, scale: float) -> Attended:
        """The key groups for T queries (tiles of t = min(T, b)) over what layer_idx holds now."""
        st = self.store[layer_idx]
        B, T, H, C = q_lat_BTHC.shape
        t = min(T, self.block)
        X = math.ceil(T / t)
        pad = X * t - T
        def tiles(q_pe):  # (B, T, H, R) -> the (B, X, t, H, K) selection query, zero-padded to whole tiles
            q_BTHK = torch.cat((q_lat_BTHC, q_pe), dim=-1)
            if pad:
                q_BTHK = torch.cat((q_BTHK, q_BTHK.new_zeros(B, pad, H, q_BTHK.shape[-1])), dim=1)
            return q_BTHK.view(B, X, t, H, -1)

        r, b = st.recent_start, self.block
        k = min(self.topk, st.n_blocks)  # blocks each tile reads in full
        sel_start = r - k * b  # compact slots: [means at r-(k+1)b-sinks][sinks at r-kb-sinks][selected at r-kb..r)

        def place(pe, position):  # rope keys at relative positions -> at `position` + their offsets
            return rotate(pe, torch.as_tensor(position, device=pe.device), self.inv_freq, self.interleave)

        out = Attended(tile=t)
        if st.sink_filled:
            kv, pe = st.sink_kv[:, : st.sink_filled], st.sink_pe[:, : st.sink_filled]
            if self.compact:  # stored at true positions 0.. (= block-relative)
                pe = place(pe, sel_start - st.sink_filled)
            out.groups.append(KeyGroup(kv, pe, branch=0))
        if st.n_blocks:
            valid = None
            if pad:
                valid = (torch.arange(X * t, device=q_lat_BTHC.device) < T).to(q_lat_BTHC.dtype).view(X, t)
            q_sel_BXtHK = tiles(place(q_pe_BTHR, -sel_start) if self.compact else q_pe_BTHR)  # summaries: 1st slot
            idx_BXk = self.choose_blocks(q_sel_BXtHK, layer_idx, scale, valid)
            if self.compact:  # in order, each to its slot
                idx_BXk = idx_BXk.sort(-1).values
            kv, pe = self.fetch(layer_idx, idx_BXk)  # (B, X, k*b, C), (B, X, k*b, R)
            if self.compact:
                pe = place(pe, sel_start + b * torch.arange(k, device=pe.device).repeat_interleave(b))
            out.groups.append(KeyGroup(kv, pe, branch=0))
            if self.coarse and st.n_blocks > idx_BXk.shape[-1]:
                lat, pe = st.kmean[:, : st.n_blocks].split([C, self.R], dim=-1)
                if self.compact:
                    pe = place(pe, sel_start - st.sink_filled - b)
                chosen_BXn = torch.zeros(B, X, st.n_blocks, dtype=torch.bool, device=lat.device)
                chosen_BXn.scatter_(2, idx_BXk, True)
                out.groups.append(KeyGroup(lat, pe, ~chosen_BXn[:, :, None, :], math.log(b), branch=1))
        n = st.length - st.recent_start
        kv, pe = st.recent_kv[:, :n], st.recent_pe[:, :n]
        q_pos = torch.arange(st.length - T, st.length - T + X * t, device=kv.device).view(X, t, 1)
        k_pos = torch.arange(st.recent_start, st.length, device=kv.device)
        out.groups.append(KeyGroup(kv, pe, (k_pos <= q_pos)[None], branch=2))
        return out

    # ------------------------------------------------------------------ accounting
    def memory(self) -> dict:
        """Bytes allocated, split by where they live: device (sinks, recent, summaries) and host (payload)."""
        full = summaries = payload = 0
        for st in self.store:
            full += sum(x.nbytes for x in (st.recent_kv, st.recent_pe, st.sink_kv, st.sink_pe))
            summaries += st.kmean.nbytes + st.kradius.nbytes
            if self.bits:
                payload += st.kv_q.nbytes() + st.pe_q.nbytes()
            else:
                payload += st.kv_full.nbytes + st.pe_full.nbytes
        offloaded = self.offload
        device = full + summaries + (0 if offloaded else payload)
        return {"full_precision": full, "summaries": summaries, "payload": payload, "device": device,
                "host": payload if offloaded else 0, "total": full + summaries + payload}  # fmt: skip

    def nbytes(self) -> int:
        return self.memory()["total"]
