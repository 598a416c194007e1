"""V4Config: DeepSeek-V4 (Flash, Pro) as its config.json states it (model_type "deepseek_v4").

Per-layer attention kinds come from `compress_ratios` (0: sliding window only, 4: compressed sparse attention,
128: heavily compressed attention) or `layer_types`; the first `num_hash_layers` MoE layers route by token id.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from ..config import normalize_rope

KIND_BY_RATIO = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
KINDS = tuple(KIND_BY_RATIO.values())
SCORING = ("sqrtsoftplus", "sigmoid", "softmax")


class V4Config(PretrainedConfig):
    model_type = "deepseek_v4_ours"  # never written: config.json says "deepseek_v4" (compat/v4.hf_config_dict_v4)

    def __init__(self, vocab_size=129280, hidden_size=4096, moe_intermediate_size=2048, num_hidden_layers=43,
                 num_attention_heads=64, num_key_value_heads=1, head_dim=512, q_lora_rank=1024,
                 qk_rope_head_dim=64, num_experts_per_tok=6, n_routed_experts=256, n_shared_experts=1,
                 scoring_func="sqrtsoftplus", norm_topk_prob=True, routed_scaling_factor=1.5,
                 max_position_embeddings=1048576, rope_theta=10000.0, compress_rope_theta=160000.0,
                 rope_scaling=None, layer_types=None, compress_ratios=None, compress_rates=None,
                 hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, mlp_layer_types=None, num_hash_layers=3,
                 swiglu_limit=10.0, sliding_window=128, o_groups=8, o_lora_rank=1024, index_n_heads=64,
                 index_head_dim=128, index_topk=512, num_nextn_predict_layers=1, rms_norm_eps=1e-6,
                 initializer_range=0.02, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
                 pad_token_id=None, **kwargs):  # fmt: skip
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.moe_intermediate_size = moe_intermediate_size
        self.num_attention_heads, self.num_key_value_heads, self.head_dim = num_attention_heads, num_key_value_heads, head_dim
        self.q_lora_rank, self.o_groups, self.o_lora_rank = q_lora_rank, o_groups, o_lora_rank
        partial = kwargs.pop("partial_rotary_factor", None)
        self.qk_rope_head_dim = int(head_dim * partial) if partial else qk_rope_head_dim
        self.num_experts_per_tok, self.n_routed_experts, self.n_shared_experts = (
            num_experts_per_tok, n_routed_experts, n_shared_experts)  # fmt: skip
        self.scoring_func, self.norm_topk_prob = scoring_func, norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta, self.compress_rope_theta = float(rope_theta), float(compress_rope_theta)
        rope = kwargs.pop("rope_parameters", None)
        if isinstance(rope, dict) and isinstance(rope.get("compress"), dict):  # transformers' nested spelling
            rope_scaling = {k: v for k, v in rope["compress"].items() if k not in ("rope_theta", "partial_rotary_factor")}
        self.compress_rope_scaling = dict(rope_scaling) if rope_scaling else None  # YaRN of the compressed layers
        self.compress_rates = dict(compress_rates or {"compressed_sparse_attention": 4,
                                                      "heavily_compressed_attention": 128})  # fmt: skip
        if layer_types is None and compress_ratios is not None:
            layer_types = [KIND_BY_RATIO[r] for r in compress_ratios]
        if layer_types is None:  # V4-Pro's default: two HCA layers, then CSA / HCA alternating
            layer_types = ["heavily_compressed_attention"] * min(num_hidden_layers, 2) + [
                "compressed_sparse_attention" if i % 2 else "heavily_compressed_attention"
                for i in range(max(num_hidden_layers - 2, 0))]  # fmt: skip
        self.attention_types = list(layer_types[:num_hidden_layers])  # not `layer_types`: the base class checks V3 names
        if mlp_layer_types is None:
            mlp_layer_types = ["hash_moe"] * min(num_hidden_layers, num_hash_layers) + ["moe"] * max(
                0, num_hidden_layers - num_hash_layers)  # fmt: skip
        self.moe_types = list(mlp_layer_types[:num_hidden_layers])
        self.hc_mult, self.hc_sinkhorn_iters, self.hc_eps = hc_mult, hc_sinkhorn_iters, hc_eps
        self.swiglu_limit, self.sliding_window = swiglu_limit, sliding_window
        self.index_n_heads, self.index_head_dim, self.index_topk = index_n_heads, index_head_dim, index_topk
        self.num_nextn_predict_layers = num_nextn_predict_layers
        self.rms_norm_eps, self.initializer_range = rms_norm_eps, initializer_range
        for legacy in ("num_hash_layers", "compress_rate_csa", "compress_rate_hca", "expert_dtype"):
            kwargs.pop(legacy, None)
        super().__init__(tie_word_embeddings=tie_word_embeddings, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)  # fmt: skip
        self.validate_v4()

    def validate_v4(self) -> None:
        bad = [t for t in self.attention_types if t not in KINDS]
        if len(self.attention_types) != self.num_hidden_layers or bad:
            raise ValueError(f"V4Config.layer_types needs {self.num_hidden_layers} entries from {', '.join(KINDS)}")
        if self.scoring_func not in SCORING:
            raise ValueError(f"V4Config.scoring_func={self.scoring_func!r}; allowed: {', '.join(SCORING)}")
        if self.num_key_value_heads != 1:
            raise ValueError("V4Config.num_key_value_heads must be 1 (DeepSeek-V4 shares one KV head)")
        if (self.num_attention_heads * self.head_dim) % self.o_groups:
            raise ValueError(f"V4Config.o_groups={self.o_groups} must divide heads x head_dim")

    # the two rotary tables: "main" (sliding-window layers), "compress" (compressed layers, YaRN, factor 1)
    def rope(self, kind: str) -> dict:
        if kind == "main":
            return normalize_rope(None, None, self.rope_theta, self.max_position_embeddings)
        params = normalize_rope(None, self.compress_rope_scaling, self.compress_rope_theta, self.max_position_embeddings)
        if params["rope_type"] == "yarn":
            params.setdefault("attention_factor", 1.0)  # the reference does not scale cos/sin for V4
        return params
