"""DeepSeek-V4: shared-KV attention with a sliding window, compressed (CSA) and heavily compressed (HCA) entries,
hyper-connections, hash-routed and sqrtsoftplus-scored MoE. Decodes on a V4Cache (cache.py) with the one generation loop.

Legend: B batch, T tokens, H heads, E head_dim (one K = V head), R rotary dims (the last R of a head), W compressed
entries, m compression rate, G o_groups (output) or indexer heads, I index_head_dim, N hc_mult streams, D hidden.

Module names follow transformers' DeepseekV4ForCausalLM, so its state dict loads as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..norm import RMSNorm
from ..rope import RotaryEmbedding, rope_frequencies, rotate_pairs
from .cache import V4Cache
from .config import V4Config


def unit_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without a weight."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def rope_tail(x, cos, sin):
    """x (B, T, [H,] F): the last R dims rotated in interleaved pairs (fp32), the rest passed; cos/sin (B, T, R/2)."""
    if x.dim() == 4:
        cos, sin = cos[:, :, None], sin[:, :, None]
    R = 2 * cos.shape[-1]
    rot = rotate_pairs(x[..., -R:].float(), cos.float(), sin.float()).to(x.dtype)
    return torch.cat((x[..., :-R], rot), dim=-1)


def pool_windows(kv_BWmF, gate_BWmF, norm: RMSNorm):
    """One entry per window: norm(sum_j softmax_j(gate) * kv)."""
    return norm((kv_BWmF * gate_BWmF.softmax(dim=2, dtype=torch.float32).to(kv_BWmF.dtype)).sum(dim=2))


def overlapped(kv_BWmF2, gate_BWmF2, F_: int, prior=None):
    """CSA's overlapping windows: entry w pools window w's second half-features and window w-1's first ones
    (`prior`: the previous call's last window; none before the first window: weight 0)."""
    B, W, m, _ = kv_BWmF2.shape
    kv = kv_BWmF2.new_zeros(B, W, 2 * m, F_)
    gate = gate_BWmF2.new_full((B, W, 2 * m, F_), float("-inf"))
    kv[:, :, m:], gate[:, :, m:] = kv_BWmF2[..., F_:], gate_BWmF2[..., F_:]
    kv[:, 1:, :m], gate[:, 1:, :m] = kv_BWmF2[:, :-1, :, :F_], gate_BWmF2[:, :-1, :, :F_]
    if prior is not None:
        kv[:, 0, :m], gate[:, 0, :m] = prior[0].to(kv.dtype), prior[1].to(gate.dtype)
    return kv, gate


class Compressor(nn.Module):
    """Pools every m tokens into one entry (HCA: plain windows; CSA: overlapping pairs of windows, 2F features)."""

    def __init__(self, config: V4Config, rate: int, width: int, overlap: bool):
        super().__init__()
        self.rate, self.width, self.overlap = rate, width, overlap
        F2 = 2 * width if overlap else width
        self.kv_proj = nn.Linear(config.hidden_size, F2, bias=False)
        self.gate_proj = nn.Linear(config.hidden_size, F2, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(rate, F2))
        self.kv_norm = RMSNorm(width, config.rms_norm_eps)
        self.indexer: Indexer | None = None  # CSA's lightning indexer (set by Attention), stored under this module

    def entries(self, x_BTD, rotary, cache, layer_idx: int, name: str) -> torch.Tensor:
        """Every entry so far (B, W, F): this call's complete windows pooled, rotated at their first token's
        position, appended to the cache's."""
        B = x_BTD.shape[0]
        m, F2 = self.rate, self.kv_proj.out_features
        kv, gate, first, prior = cache.pending(layer_idx, name, self.kv_proj(x_BTD), self.gate_proj(x_BTD), m)
        W = kv.shape[1] // m
        overlap = None
        if W:
            kv, gate = kv.view(B, W, m, F2), gate.view(B, W, m, F2) + self.position_bias
            if self.overlap:
                overlap = (kv[:, -1, :, : self.width].clone(), gate[:, -1, :, : self.width].clone())
                kv, gate = overlapped(kv, gate, self.width, prior)
            out = pool_windows(kv, gate, self.kv_norm)
            pos = (torch.arange(W, device=x_BTD.device) * m + first)[None].expand(B, W)
            cos, sin = rotary(pos, out.dtype)
            out = rope_tail(out, cos, sin)
        else:
            out = x_BTD.new_zeros(B, 0, self.width)
        return cache.add_entries(layer_idx, name, out, overlap, rate=m)


class Scorer(nn.Module):
    def __init__(self, config: V4Config):
        super().__init__()
        self.weights_proj = nn.Linear(config.hidden_size, config.index_n_heads, bias=False)


class Indexer(Compressor):
    """CSA's lightning indexer over its own compressed keys (width I): top-k entries per query."""

    def __init__(self, config: V4Config, rate: int):
        super().__init__(config, rate, config.index_head_dim, overlap=True)
        self.n_heads, self.topk = config.index_n_heads, config.index_topk
        self.q_b_proj = nn.Linear(config.q_lora_rank, self.n_heads * config.index_head_dim, bias=False)
        self.scorer = Scorer(config)

    def select(self, x_BTD, q_BTQ, cos, sin, visible_BTW, rotary, cache, layer_idx: int) -> torch.Tensor:
        """Boolean (B, T, W): the chosen entries among the visible ones."""
        B, T, _ = x_BTD.shape
        k_BWI = self.entries(x_BTD, rotary, cache, layer_idx, "indexer")
        W = k_BWI.shape[1]
        q_BTGI = rope_tail(self.q_b_proj(q_BTQ).view(B, T, self.n_heads, -1), cos, sin)
        logits = F.relu(torch.einsum("btgi,bwi->btgw", q_BTGI.float(), k_BWI.float())) * self.width**-0.5
        w_BTG = self.scorer.weights_proj(x_BTD).float() * self.n_heads**-0.5
        score_BTW = torch.einsum("btg,btgw->btw", w_BTG, logits).masked_fill(~visible_BTW, float("-inf"))
        idx = score_BTW.topk(min(self.topk, W), dim=-1).indices
        chosen = torch.zeros(B, T, W, dtype=torch.bool, device=x_BTD.device).scatter_(-1, idx, True)
        return chosen & visible_BTW


def chosen_entries(c_BWE: torch.Tensor, chosen_B1W: torch.Tensor, k: int):
    """One query's k chosen entries gathered (B, k, E) with their mask (B, 1, k): attention over them equals
    attention over all W under the mask (the set is the same; only the summation order differs). The reference
    path is the masked one, taken by prefill and whenever W <= k."""
    idx_Bk = chosen_B1W[:, 0].to(torch.uint8).topk(k, dim=-1).indices  # the chosen first (fewer: masked fill)
    picked_BkE = c_BWE.gather(1, idx_Bk[..., None].expand(-1, -1, c_BWE.shape[-1]))
    return picked_BkE, chosen_B1W.gather(-1, idx_Bk[:, None])


class Attention(nn.Module):
    def __init__(self, config: V4Config, layer_idx: int):
        super().__init__()
        self.kind = config.attention_types[layer_idx]
        self.rope_kind = "main" if self.kind == "sliding_attention" else "compress"
        H, E, D = config.num_attention_heads, config.head_dim, config.hidden_size
        self.n_heads, self.head_dim, self.window, self.eps = H, E, config.sliding_window, config.rms_norm_eps
        self.groups = config.o_groups
        self.q_a_proj = nn.Linear(D, config.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
        self.q_b_proj = nn.Linear(config.q_lora_rank, H * E, bias=False)
        self.kv_proj = nn.Linear(D, E, bias=False)
        self.kv_norm = RMSNorm(E, config.rms_norm_eps)
        self.o_a_proj = nn.Linear(H * E // self.groups, self.groups * config.o_lora_rank, bias=False)  # G blocks
        self.o_b_proj = nn.Linear(self.groups * config.o_lora_rank, D, bias=False)
        self.sinks = nn.Parameter(torch.zeros(H))
        self.compressor: Compressor | None = None
        if self.kind != "sliding_attention":
            rate = config.compress_rates[self.kind]
            csa = self.kind == "compressed_sparse_attention"
            self.compressor = Compressor(config, rate, E, overlap=csa)
            if csa:
                self.compressor.indexer = Indexer(config, rate)

    def forward(self, x_BTD, cos, sin, attention_mask, positions_BT, rotary, cache, layer_idx: int):
        """attention_mask: (B, S) over every position so far (1 = real token) or None."""
        B, T, _ = x_BTD.shape
        H, E = self.n_heads, self.head_dim
        q_BTQ = self.q_a_norm(self.q_a_proj(x_BTD))
        q_BTHE = rope_tail(unit_rms(self.q_b_proj(q_BTQ).view(B, T, H, E), self.eps), cos, sin)
        past = cache.get_seq_length(layer_idx)
        kv_BSE, first = cache.window_keys(layer_idx, rope_tail(self.kv_norm(self.kv_proj(x_BTD)), cos, sin))
        i = past + torch.arange(T, device=x_BTD.device)[:, None]  # absolute indices of queries and keys
        j = first + torch.arange(kv_BSE.shape[1], device=x_BTD.device)[None]
        mask_BTS = ((j <= i) & (i - j < self.window))[None].expand(B, -1, -1)
        if attention_mask is not None:  # padded keys (a padded query sees nothing: its sink takes the softmax)
            mask_BTS = mask_BTS & attention_mask[:, first : past + T, None].transpose(1, 2).bool()
        if self.compressor is not None:
            c_BWE = self.compressor.entries(x_BTD, rotary, cache, layer_idx, "compressor")
            W = c_BWE.shape[1]
            m = self.compressor.rate
            if T == 1 and self.kind == "heavily_compressed_attention":  # one step: every complete window is past
                visible_BTW = torch.ones(B, T, W, dtype=torch.bool, device=x_BTD.device)
            else:  # entry w covers positions [w m, (w + 1) m): visible once complete
                visible_BTW = torch.arange(W, device=x_BTD.device) < ((positions_BT + 1) // m)[..., None]
            if self.compressor.indexer is not None:
                visible_BTW = self.compressor.indexer.select(x_BTD, q_BTQ, cos, sin, visible_BTW, rotary, cache, layer_idx)
                if T == 1 and W > self.compressor.indexer.topk:  # a decode step reads its k entries, not all W
                    c_BWE, visible_BTW = chosen_entries(c_BWE, visible_BTW, self.compressor.indexer.topk)
            kv_BSE = torch.cat((kv_BSE, c_BWE), dim=1)
            mask_BTS = torch.cat((mask_BTS, visible_BTW), dim=-1)
        scores_BHTS = torch.einsum("bthe,bse->bhts", q_BTHE, kv_BSE) * E**-0.5
        scores_BHTS = scores_BHTS.masked_fill(~mask_BTS[:, None], float("-inf"))
        sink_BHT1 = self.sinks.to(scores_BHTS.dtype)[None, :, None, None].expand(B, H, T, 1)
        probs = torch.cat((scores_BHTS, sink_BHT1), dim=-1).softmax(dim=-1)[..., :-1]  # the sink absorbs mass
        out_BTHE = torch.einsum("bhts,bse->bthe", probs.to(kv_BSE.dtype), kv_BSE)
        out_BTHE = rope_tail(out_BTHE, cos, -sin)  # values carried rope: rotate back to the query's position
        grouped_BTGF = out_BTHE.reshape(B, T, self.groups, -1)
        w_GOF = self.o_a_proj.weight.view(self.groups, -1, grouped_BTGF.shape[-1])
        return self.o_b_proj(torch.einsum("btgf,gof->btgo", grouped_BTGF, w_GOF).flatten(2))


class HyperConnection(nn.Module):
    """N residual streams: `pre` collapses them into the block's input, `post` spreads its output back, `comb`
    (Sinkhorn-normalised, doubly stochastic) mixes the streams."""

    def __init__(self, config: V4Config):
        super().__init__()
        N, D = config.hc_mult, config.hidden_size
        self.n, self.iters, self.eps, self.norm_eps = N, config.hc_sinkhorn_iters, config.hc_eps, config.rms_norm_eps
        self.fn = nn.Parameter(torch.zeros((2 + N) * N, N * D))
        self.base = nn.Parameter(torch.zeros((2 + N) * N))
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x_BTND):
        B, T, N, _ = x_BTND.shape
        mix = F.linear(unit_rms(x_BTND.flatten(2).float(), self.norm_eps), self.fn.float())
        pre_w, post_w, comb_w = mix.split([N, N, N * N], dim=-1)
        pre_b, post_b, comb_b = self.base.split([N, N, N * N])
        pre = torch.sigmoid(pre_w * self.scale[0] + pre_b) + self.eps
        post = 2 * torch.sigmoid(post_w * self.scale[1] + post_b)
        comb = torch.softmax(comb_w.view(B, T, N, N) * self.scale[2] + comb_b.view(N, N), dim=-1) + self.eps
        comb = comb / (comb.sum(dim=-2, keepdim=True) + self.eps)
        for _ in range(self.iters - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + self.eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + self.eps)
        collapsed_BTD = (pre[..., None] * x_BTND).sum(dim=2).to(x_BTND.dtype)
        return post, comb, collapsed_BTD

    @staticmethod
    def merge(post, comb, out_BTD, x_BTND):
        """Streams after a block: post_k * out + sum_j comb[j, k] * x_j."""
        dtype = x_BTND.dtype
        return post.to(dtype)[..., None] * out_BTD[:, :, None] + torch.einsum("btjk,btjd->btkd", comb.to(dtype), x_BTND)


class HyperHead(nn.Module):
    def __init__(self, config: V4Config):
        super().__init__()
        N, D = config.hc_mult, config.hidden_size
        self.eps, self.norm_eps = config.hc_eps, config.rms_norm_eps
        self.hc_fn = nn.Parameter(torch.zeros(N, N * D))
        self.hc_base = nn.Parameter(torch.zeros(N))
        self.hc_scale = nn.Parameter(torch.ones(1))

    def forward(self, x_BTND):
        mix = F.linear(unit_rms(x_BTND.flatten(2).float(), self.norm_eps), self.hc_fn.float())
        pre = torch.sigmoid(mix * self.hc_scale.float() + self.hc_base.float()) + self.eps
        return (pre[..., None] * x_BTND).sum(dim=2).to(x_BTND.dtype)


def clamped_swiglu(gate, up, limit: float):
    return F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)


class SharedExpert(nn.Module):
    def __init__(self, config: V4Config):
        super().__init__()
        D, I = config.hidden_size, config.moe_intermediate_size * config.n_shared_experts
        self.limit = config.swiglu_limit
        self.gate_proj = nn.Linear(D, I, bias=False)
        self.up_proj = nn.Linear(D, I, bias=False)
        self.down_proj = nn.Linear(I, D, bias=False)

    def forward(self, x):
        return self.down_proj(clamped_swiglu(self.gate_proj(x), self.up_proj(x), self.limit))


class Gate(nn.Module):
    """Scores sqrtsoftplus(x W^T) (or sigmoid / softmax); experts chosen by score + bias, or by token id (hash)."""

    def __init__(self, config: V4Config, hashed: bool):
        super().__init__()
        E = config.n_routed_experts
        self.k, self.scale, self.func, self.hashed = (config.num_experts_per_tok, config.routed_scaling_factor,
                                                      config.scoring_func, hashed)  # fmt: skip
        self.weight = nn.Parameter(torch.zeros(E, config.hidden_size))
        if hashed:
            self.register_buffer("tid2eid", torch.zeros(config.vocab_size, self.k, dtype=torch.long))
        else:
            self.register_buffer("e_score_correction_bias", torch.zeros(E))

    def forward(self, x_ND, ids_N):
        logits = F.linear(x_ND, self.weight)
        if self.func == "sqrtsoftplus":
            scores = F.softplus(logits).sqrt()
        else:
            scores = logits.sigmoid() if self.func == "sigmoid" else logits.softmax(-1)
        if self.hashed:
            idx_NK = self.tid2eid[ids_N].long()
        else:
            idx_NK = (scores + self.e_score_correction_bias).topk(self.k, dim=-1, sorted=False).indices
        w_NK = scores.gather(1, idx_NK)
        return idx_NK, w_NK / (w_NK.sum(-1, keepdim=True) + 1e-20) * self.scale


class Experts(nn.Module):
    def __init__(self, config: V4Config):
        super().__init__()
        E, D, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.limit = config.swiglu_limit
        self.gate_up_proj = nn.Parameter(torch.zeros(E, 2 * I, D))
        self.down_proj = nn.Parameter(torch.zeros(E, D, I))

    def forward(self, x_ND, idx_NK, w_NK):
        out = torch.zeros_like(x_ND)
        for e in idx_NK.unique().tolist():
            token, slot = torch.where(idx_NK == e)
            gate, up = F.linear(x_ND[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(clamped_swiglu(gate, up, self.limit), self.down_proj[e]) * w_NK[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


class MoE(nn.Module):
    def __init__(self, config: V4Config, layer_idx: int):
        super().__init__()
        self.gate = Gate(config, hashed=config.moe_types[layer_idx] == "hash_moe")
        self.experts = Experts(config)
        self.shared_experts = SharedExpert(config)

    def forward(self, x_BTD, ids_BT):
        x_ND = x_BTD.flatten(0, 1)
        idx, w = self.gate(x_ND, ids_BT.flatten())
        return (self.experts(x_ND, idx, w) + self.shared_experts(x_ND)).view_as(x_BTD)


class DecoderLayer(nn.Module):
    def __init__(self, config: V4Config, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MoE(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn_hc = HyperConnection(config)
        self.ffn_hc = HyperConnection(config)

    def forward(self, x_BTND, ids_BT, ropes, attention_mask, positions_BT, rotaries, cache, layer_idx: int):
        cos, sin = ropes[self.self_attn.rope_kind]
        post, comb, h = self.attn_hc(x_BTND)
        out = self.self_attn(self.input_layernorm(h), cos, sin, attention_mask, positions_BT,
                             rotaries[self.self_attn.rope_kind], cache, layer_idx)  # fmt: skip
        x_BTND = HyperConnection.merge(post, comb, out, x_BTND)
        post, comb, h = self.ffn_hc(x_BTND)
        return HyperConnection.merge(post, comb, self.mlp(self.post_attention_layernorm(h), ids_BT), x_BTND)


class V4Model(nn.Module):
    def __init__(self, config: V4Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.hc_head = HyperHead(config)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        R = config.qk_rope_head_dim
        self.rotary = nn.ModuleDict({k: RotaryEmbedding(config.rope(k), R) for k in ("main", "compress")})

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                **_):  # fmt: skip
        """The generation loop's interface (R1TextModel's): returns an object with `last_hidden_state` (after
        the final norm). cache: a V4Cache (none: a fresh one, dropped after the call)."""
        if input_ids is None:
            raise ValueError("DeepSeek-V4 needs input_ids: its hash-routed MoE layers choose experts by token id")
        B, T = input_ids.shape
        x_BTD = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cache = cache if cache is not None else V4Cache(self.config)
        past = cache.get_seq_length()
        if position_ids is None:
            position_ids = (past + torch.arange(T, device=x_BTD.device))[None].expand(B, T)
        if attention_mask is not None and attention_mask.shape[-1] != past + T:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected {past + T}")
        ropes = {k: rot(position_ids, x_BTD.dtype) for k, rot in self.rotary.items()}
        x_BTND = x_BTD[:, :, None].expand(B, T, self.config.hc_mult, -1).contiguous()
        for i, layer in enumerate(self.layers):
            x_BTND = layer(x_BTND, input_ids, ropes, attention_mask, position_ids, self.rotary, cache, i)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(self.hc_head(x_BTND)))


class V4ForCausalLM(nn.Module):
    def __init__(self, config: V4Config):
        super().__init__()
        self.config = config
        self.model = V4Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        """Logits (B, T, V)."""
        return self.lm_head(self.model(input_ids, attention_mask, position_ids, cache).last_hidden_state)

    def num_parameters(self, active: bool = False) -> int:
        """Total parameters, or with active=True those one token uses (its num_experts_per_tok routed experts)."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        c = self.config
        idle = (c.n_routed_experts - c.num_experts_per_tok) * 3 * c.hidden_size * c.moe_intermediate_size
        return total - c.num_hidden_layers * idle

    def reset_rotary(self) -> None:
        """Recompute the rotary tables (they are not stored; a model built on the meta device needs them)."""
        for kind, rotary in self.model.rotary.items():
            rotary.inv_freq = rope_frequencies(self.config.rope(kind), self.config.qk_rope_head_dim)[0].to(
                self.lm_head.weight.device)  # fmt: skip

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=torch.float32, device="cpu"):
        from ...compat.v4 import load_v4

        return load_v4(cls, name_or_path, dtype=dtype, device=device)

    def save_pretrained(self, save_directory):
        from ...compat.v4 import save_v4

        return save_v4(self, save_directory)
