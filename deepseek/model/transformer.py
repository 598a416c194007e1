"""The DeepSeek-V3/R1 decoder: R1TextModel (backbone) and R1ForCausalLM (the SDK's R1Model adds fine-tuning
and fast generation on top: deepseek/sdk.py).

Legend: B batch, T new tokens, S attended positions, D hidden, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .attention import MLAttention
from .cache import as_latent_cache
from .config import R1Config
from .moe import Experts, MoE, Router
from .norm import MLP, RMSNorm
from .rope import RotaryEmbedding
from .routing import adaptive_routing
from .sparse import indexer_parameters

IGNORE = -100  # label of a position without loss (transformers' convention); the one home of the value


class DecoderLayer(nn.Module):
    def __init__(self, config: R1Config, layer_idx: int):
        super().__init__()
        self.self_attn = MLAttention(config, layer_idx)
        if config.is_moe_layer(layer_idx):
            self.mlp = MoE(config, adaptive_routing(config))
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x_BTD, cos, sin, mask_BTS=None, cache=None):
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), cos, sin, mask_BTS, cache)
        return x_BTD + self.mlp(self.post_attention_layernorm(x_BTD))


def build_mask(attention_mask, B: int, T: int, past: int, device) -> torch.Tensor | None:
    """Boolean (B, T, S) mask, True = attend: causal from offset `past`, minus padded keys; None without
    padding (attention is then causal from offset S - T by construction, and a cache that bounds what a query
    reads, like the compressed one at 128K, is never handed a T x S mask it would not use).

    A query always sees itself, so a fully padded row never turns into NaN that could leak through
    masked-out values."""
    if attention_mask is None:
        return None
    S = past + T
    if attention_mask.shape[-1] != S:
        raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected {S}")
    q_pos = torch.arange(past, S, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    mask = (k_pos <= q_pos)[None].expand(B, T, S) & attention_mask[:, None, :].bool()
    return mask | (k_pos == q_pos)[None]


class R1PreTrainedModel(PreTrainedModel):
    config_class = R1Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True
    _keep_in_fp32_modules = ["gate"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, Router):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.e_score_correction_bias is not None:
                nn.init.zeros_(module.e_score_correction_bias)
        elif isinstance(module, Experts):
            nn.init.normal_(module.gate_up_proj, mean=0.0, std=std)
            nn.init.normal_(module.down_proj, mean=0.0, std=std)


class R1TextModel(R1PreTrainedModel):
    def __init__(self, config: R1Config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.rope_parameters, config.qk_rope_head_dim, config.rope_interleave)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        use_cache=None,
        mask=None,
        **kwargs,
    ):
        """Returns BaseModelOutputWithPast whose last_hidden_state is *after* the final norm and whose
        hidden_states holds the pre-norm output (what multi-token prediction consumes).
        cache: any cache of the latent-cache protocol (model/cache.py) or a transformers Cache.
        mask: an explicit boolean attention mask instead of attention_mask (True = attend), (B, T, S) for every
        layer or a list of one per layer."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x_BTD = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x_BTD.shape
        cache = as_latent_cache(cache)
        past = 0  # cached positions: asked for only when needed (the compiled decode step passes positions)
        if cache is not None and (position_ids is None or (mask is None and attention_mask is not None)):
            past = cache.get_seq_length()
        if position_ids is None:
            position_ids = (torch.arange(T, device=x_BTD.device) + past)[None].expand(B, T)
        cos, sin = self.rotary_emb(position_ids, x_BTD.dtype)
        if mask is None:
            mask = build_mask(attention_mask, B, T, past, x_BTD.device)
        for i, layer in enumerate(self.layers):
            mask_BTS = mask[i] if isinstance(mask, list | tuple) else mask
            if self.gradient_checkpointing and self.training:
                x_BTD = torch.utils.checkpoint.checkpoint(
                    layer, x_BTD, cos, sin, mask_BTS, cache, use_reentrant=False
                )
            else:
                x_BTD = layer(x_BTD, cos, sin, mask_BTS, cache)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x_BTD), hidden_states=(x_BTD,))


class SharedHead(nn.Module):
    def __init__(self, config: R1Config):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


class MTPLayer(nn.Module):
    """Multi-token prediction depth k: h' = eh_proj([enorm(emb(t_{i+k})); hnorm(h_i)]) -> decoder layer -> head.

    Stored in DeepSeek checkpoints as `model.layers.{num_hidden_layers + k - 1}.*` (see compat/keys.py)."""

    def __init__(self, config: R1Config, depth: int):
        super().__init__()
        layer_idx = config.num_hidden_layers + depth
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.block = DecoderLayer(config, layer_idx)
        self.block.self_attn.layer_idx = depth  # its own cache slot in an MTP cache
        self.shared_head = SharedHead(config)

    def forward(self, h_BTD, next_ids_BT, cos, sin, mask_BTS=None, cache=None):
        """h_BTD: previous depth's pre-norm hidden at positions i; next_ids_BT: tokens t_{i+1}.
        Returns (logits for t_{i+2} (B, T, V), this depth's pre-norm hidden)."""
        e = self.enorm(self.embed_tokens(next_ids_BT))
        h = self.eh_proj(torch.cat((e, self.hnorm(h_BTD)), dim=-1))
        h = self.block(h, cos, sin, mask_BTS, cache)
        return self.shared_head.head(self.shared_head.norm(h)), h


class R1ForCausalLM(R1PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: R1Config):
        super().__init__(config)
        self.model = R1TextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        n_mtp = config.num_nextn_predict_layers if config.build_mtp else 0
        self.mtp = nn.ModuleList(MTPLayer(config, d) for d in range(n_mtp))
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep: int = 0,
        past_key_values=None,
        mtp_loss_weight: float | None = None,
        **kwargs,
    ):
        cache = cache if cache is not None else past_key_values
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
        )
        h_BTD = out.last_hidden_state
        if logits_to_keep:
            h_BTD = h_BTD[:, -logits_to_keep:]
        logits = self.lm_head(h_BTD)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)
            weight = mtp_loss_weight if mtp_loss_weight is not None else self.config.mtp_loss_weight
            if weight and len(self.mtp) and input_ids is not None:
                loss = loss + weight * self.mtp_loss(out.hidden_states[0], input_ids, labels, position_ids)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    def mtp_loss(self, h_BTD, input_ids, labels, position_ids=None):
        """Mean over depths of the cross-entropy of depth k predicting token i+k+1 (DeepSeek-V3 MTP)."""
        B, T, _ = h_BTD.shape
        losses = []
        for k, layer in enumerate(self.mtp, start=1):
            n = T - k
            if n < 2:
                break
            pos = position_ids[:, :n] if position_ids is not None else torch.arange(n, device=h_BTD.device)[None]
            cos, sin = self.model.rotary_emb(pos.expand(B, n), h_BTD.dtype)
            mask = build_mask(None, B, n, 0, h_BTD.device)
            logits, h_BTD = layer(h_BTD[:, :n], input_ids[:, k : k + n], cos, sin, mask)
            target = labels[:, k + 1 : k + 1 + n]
            losses.append(F.cross_entropy(logits[:, : target.shape[1]].flatten(0, 1).float(), target.flatten()))
        return torch.stack(losses).mean() if losses else h_BTD.new_zeros(())

    # ------------------------------------------------------------------ sizes
    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False, active: bool = False):
        """Total parameters, or with active=True those one token uses (top-k routed experts, no MTP)."""
        if not active:
            return super().num_parameters(only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
        return active_parameters(self.config, include_embeddings=not exclude_embeddings)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, name_or_path, *args, **kwargs):
        from ..compat.checkpoint import load_pretrained

        return load_pretrained(cls, name_or_path, **kwargs)

    def save_pretrained(self, save_directory, max_shard_size: int | str = "5GB", **kwargs):
        from ..compat.checkpoint import save_pretrained

        return save_pretrained(self, save_directory, max_shard_size=max_shard_size, **kwargs)


def active_parameters(config: R1Config, include_embeddings: bool = True) -> int:
    """Parameters touched per token, computed from the config (works for meta-device models)."""
    D, H = config.hidden_size, config.num_attention_heads
    qk = config.qk_nope_head_dim + config.qk_rope_head_dim
    if config.q_lora_rank is None:
        attn = D * H * qk
    else:
        attn = D * config.q_lora_rank + config.q_lora_rank + config.q_lora_rank * H * qk
    attn += D * (config.kv_lora_rank + config.qk_rope_head_dim) + config.kv_lora_rank
    attn += config.kv_lora_rank * H * (config.qk_nope_head_dim + config.v_head_dim) + H * config.v_head_dim * D
    attn += indexer_parameters(config)  # DeepSeek-V3.2's indexer runs for every token (0 for V3)
    norms = 2 * D
    expert = 3 * D * config.moe_intermediate_size
    total = 0
    for i in range(config.num_hidden_layers):
        if config.is_moe_layer(i):
            mlp = expert * (config.num_experts_per_tok + config.n_shared_experts) + config.n_routed_experts * D
        else:
            mlp = 3 * D * config.intermediate_size
        total += attn + norms + mlp
    total += D  # final norm
    if include_embeddings:
        total += config.vocab_size * D * (1 if config.tie_word_embeddings else 2)
    return total
