"""R1Config: the DeepSeek-V3/R1 architecture config, plus this project's own fields.

A real DeepSeek-V3 / R1 `config.json` (model_type "deepseek_v3", with `rope_scaling` or `rope_parameters`)
loads as is. Impossible values raise a ValueError naming the field and what is allowed.
"""

from __future__ import annotations

from transformers import PretrainedConfig

ROPE_TYPES = ("default", "yarn", "linear")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
SCORING_FUNCS = ("sigmoid", "softmax")
ROUTING_MODES = ("topk", "entropy", "top_p")  # see deepseek/model/routing.py
KV_QUANT_BITS = (0, 2, 4, 8)


class R1Config(PretrainedConfig):
    model_type = "deepseek_r1"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {"num_local_experts": "n_routed_experts", "num_mtp_layers": "num_nextn_predict_layers"}

    def __init__(
        self,
        vocab_size: int = 129280,
        hidden_size: int = 7168,
        intermediate_size: int = 18432,
        moe_intermediate_size: int = 2048,
        num_hidden_layers: int = 61,
        num_nextn_predict_layers: int = 1,
        num_attention_heads: int = 128,
        num_key_value_heads: int | None = None,
        n_shared_experts: int = 1,
        n_routed_experts: int = 256,
        ep_size: int = 1,
        routed_scaling_factor: float = 2.5,
        kv_lora_rank: int = 512,
        q_lora_rank: int | None = 1536,
        qk_rope_head_dim: int = 64,
        v_head_dim: int = 128,
        qk_nope_head_dim: int = 128,
        topk_method: str = "noaux_tc",
        n_group: int | None = 8,
        topk_group: int | None = 4,
        num_experts_per_tok: int = 8,
        moe_layer_freq: int = 1,
        first_k_dense_replace: int = 3,
        norm_topk_prob: bool = True,
        scoring_func: str = "sigmoid",
        hidden_act: str = "silu",
        max_position_embeddings: int = 4096,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 0,
        eos_token_id: int | list[int] | None = 1,
        tie_word_embeddings: bool = False,
        rope_theta: float | None = None,
        rope_scaling: dict | None = None,
        rope_parameters: dict | None = None,
        rope_interleave: bool = True,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        routing_mode: str = "topk",
        routing_k_min: int = 1,
        routing_k_max: int | None = None,
        routing_threshold: float | None = None,
        routing_target_k: float | None = None,
        routing_controller_rate: float = 0.05,
        routing_entropy_weight: float = 0.0,
        routing_layer_thresholds: list[float] | None = None,
        kv_compress: bool = False,
        kv_block_size: int = 64,
        kv_sink_blocks: int = 1,
        kv_window: int = 512,
        kv_topk_blocks: int = 16,
        kv_select_span: int = 1,
        kv_quant_bits: int = 4,
        kv_quant_group: int = 64,
        kv_coarse: bool = True,
        kv_offload: bool = False,
        kv_learned: bool = False,
        kv_compact_positions: bool = False,
        kv_refresh_recent: bool = False,
        kv_lead_layer: int | None = None,
        prefill_chunk: int = 1024,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_nextn_predict_layers = num_nextn_predict_layers
        self.num_attention_heads = num_attention_heads
        # MLA has no grouped KV heads; the field exists in real configs and is kept for round trips.
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.n_shared_experts = n_shared_experts
        self.n_routed_experts = n_routed_experts
        self.ep_size = ep_size
        self.routed_scaling_factor = routed_scaling_factor
        self.kv_lora_rank = kv_lora_rank
        self.q_lora_rank = q_lora_rank
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.qk_nope_head_dim = qk_nope_head_dim
        self.topk_method = topk_method
        self.n_group = n_group if n_group is not None else 1
        self.topk_group = topk_group if topk_group is not None else self.n_group
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_layer_freq = moe_layer_freq
        self.first_k_dense_replace = first_k_dense_replace
        self.norm_topk_prob = norm_topk_prob
        self.scoring_func = scoring_func
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_interleave = rope_interleave
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        # Adaptive routing (deepseek/model/routing.py); "topk" is the plain DeepSeek-V3 router.
        self.routing_mode = routing_mode
        self.routing_k_min = routing_k_min
        self.routing_k_max = routing_k_max if routing_k_max is not None else num_experts_per_tok
        self.routing_threshold = routing_threshold
        self.routing_target_k = routing_target_k
        self.routing_controller_rate = routing_controller_rate
        self.routing_entropy_weight = routing_entropy_weight
        self.routing_layer_thresholds = routing_layer_thresholds
        # Hierarchical latent-cache compression (deepseek/model/longctx, docs/long_context.md).
        self.kv_compress = kv_compress  # use CompressedLatentCache by default for long prompts
        self.kv_block_size = kv_block_size  # tokens per block (summaries, selection, quantisation unit)
        self.kv_sink_blocks = kv_sink_blocks  # first blocks kept at full precision (attention sinks)
        self.kv_window = kv_window  # most recent tokens kept at full precision
        self.kv_topk_blocks = kv_topk_blocks  # older blocks read in full per query tile (Quest/NSA selection)
        self.kv_select_span = kv_select_span  # ... chosen as runs of this many consecutive blocks (1 = single)
        self.kv_quant_bits = kv_quant_bits  # bits for older blocks' latent; 0 = keep full precision
        self.kv_quant_group = kv_quant_group  # channels sharing one scale/zero
        self.kv_coarse = kv_coarse  # unselected blocks still attended through their mean latent
        self.kv_offload = kv_offload  # quantised blocks live in host memory, fetched when selected
        self.kv_learned = kv_learned  # learned block summaries + branch gates (NSA), trained compressed
        self.kv_compact_positions = kv_compact_positions  # attended set at contiguous rope positions (extrapolation)
        self.kv_refresh_recent = kv_refresh_recent  # prefill ends re-encoding the recent buffer (one selection)
        self.kv_lead_layer = kv_lead_layer  # decode + refresh: other layers read this layer's selection
        self.prefill_chunk = prefill_chunk  # tokens per chunk in chunked prefill
        # Derived sizes other libraries read (transformers' DeepseekV3 uses head_dim = rope dims).
        kwargs.pop("qk_head_dim", None)
        kwargs.pop("head_dim", None)
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.head_dim = qk_rope_head_dim
        rope = normalize_rope(rope_parameters, rope_scaling, rope_theta, max_position_embeddings)
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.rope_parameters = rope  # set after super(): the base class would rewrite it
        self.validate_r1()

    # ---------------------------------------------------------------- validation
    def validate_r1(self) -> None:
        positive = [
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "n_routed_experts", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim",
            "num_experts_per_tok", "n_group", "topk_group", "max_position_embeddings",
        ]  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"R1Config.{name} must be a positive integer, got {value!r}")
        for name in ("qk_nope_head_dim", "n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"R1Config.{name} must be a non-negative integer, got {value!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise ValueError(f"R1Config.q_lora_rank must be a positive integer or null, got {self.q_lora_rank!r}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(
                f"R1Config.num_experts_per_tok={self.num_experts_per_tok} must be in 1..n_routed_experts "
                f"({self.n_routed_experts})"
            )
        if self.n_routed_experts % self.n_group:
            raise ValueError(
                f"R1Config.n_routed_experts={self.n_routed_experts} must be divisible by n_group={self.n_group}"
            )
        if self.topk_group > self.n_group:
            raise ValueError(f"R1Config.topk_group={self.topk_group} must be in 1..n_group ({self.n_group})")
        per_group = self.n_routed_experts // self.n_group
        if self.n_group > 1 and self.num_experts_per_tok > self.topk_group * per_group:
            raise ValueError(
                f"R1Config.num_experts_per_tok={self.num_experts_per_tok} exceeds the experts reachable in "
                f"topk_group={self.topk_group} groups of {per_group}"
            )
        if self.topk_method not in TOPK_METHODS:
            raise ValueError(f"R1Config.topk_method={self.topk_method!r}; allowed: {', '.join(TOPK_METHODS)}")
        if self.scoring_func not in SCORING_FUNCS:
            raise ValueError(f"R1Config.scoring_func={self.scoring_func!r}; allowed: {', '.join(SCORING_FUNCS)}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"R1Config.qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.hidden_act != "silu":
            raise ValueError(f"R1Config.hidden_act={self.hidden_act!r}; allowed: silu")
        self.validate_routing()

    def validate_routing(self) -> None:
        if self.routing_mode not in ROUTING_MODES:
            raise ValueError(f"R1Config.routing_mode={self.routing_mode!r}; allowed: {', '.join(ROUTING_MODES)}")
        lo, hi = self.routing_k_min, self.routing_k_max
        for name, value in (("routing_k_min", lo), ("routing_k_max", hi)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"R1Config.{name} must be a positive integer, got {value!r}")
        reach = self.topk_group * (self.n_routed_experts // self.n_group) if self.n_group > 1 else self.n_routed_experts
        if not lo <= hi <= reach:
            raise ValueError(f"R1Config.routing_k_min={lo}, routing_k_max={hi}: need 1 <= k_min <= k_max <= {reach} "
                             "(the experts reachable by the router)")  # fmt: skip
        t = self.routing_threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, int | float) or t <= 0):
            raise ValueError(f"R1Config.routing_threshold must be a positive number or null, got {t!r}")
        if self.routing_mode == "top_p" and t is not None and t > 1:
            raise ValueError(f"R1Config.routing_threshold={t} is a probability mass for routing_mode='top_p': "
                             "use 0 < threshold <= 1")  # fmt: skip
        tk = self.routing_target_k
        if tk is not None and (isinstance(tk, bool) or not isinstance(tk, int | float) or not lo <= tk <= hi):
            raise ValueError(f"R1Config.routing_target_k={tk!r} must be a number in routing_k_min..routing_k_max "
                             f"({lo}..{hi})")  # fmt: skip
        rate = self.routing_controller_rate
        if isinstance(rate, bool) or not isinstance(rate, int | float) or rate < 0:
            raise ValueError(f"R1Config.routing_controller_rate must be a non-negative number, got {rate!r}")
        w = self.routing_entropy_weight
        if isinstance(w, bool) or not isinstance(w, int | float) or w < 0:
            raise ValueError(f"R1Config.routing_entropy_weight must be a non-negative number, got {w!r}")
        per_layer = self.routing_layer_thresholds
        if per_layer is not None and (
            not isinstance(per_layer, list | tuple) or not all(isinstance(v, int | float) and v > 0 for v in per_layer)
        ):
            raise ValueError(f"R1Config.routing_layer_thresholds must be a list of positive numbers, got {per_layer!r}")
        self.validate_kv_compression()

    def validate_kv_compression(self) -> None:
        for name in ("kv_block_size", "kv_topk_blocks", "kv_quant_group", "prefill_chunk"):
            value = getattr(self, name, 1)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"R1Config.{name} must be a positive integer, got {value!r}")
        span = getattr(self, "kv_select_span", 1)
        if not isinstance(span, int) or isinstance(span, bool) or span <= 0 or self.kv_topk_blocks % span:
            raise ValueError(f"R1Config.kv_select_span={span!r} must be a positive integer dividing "
                             f"kv_topk_blocks={self.kv_topk_blocks}")
        for name in ("kv_sink_blocks", "kv_window"):
            value = getattr(self, name, 0)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"R1Config.{name} must be a non-negative integer, got {value!r}")
        lead = getattr(self, "kv_lead_layer", None)
        if lead is not None and (not isinstance(lead, int) or isinstance(lead, bool)
                                 or not -self.num_hidden_layers <= lead < self.num_hidden_layers):  # fmt: skip
            raise ValueError(f"R1Config.kv_lead_layer={lead!r} must be None or a layer index "
                             f"(-{self.num_hidden_layers}..{self.num_hidden_layers - 1})")
        for name in ("kv_learned", "kv_compact_positions", "kv_refresh_recent"):
            if not isinstance(getattr(self, name, False), bool):
                raise ValueError(f"R1Config.{name} must be true or false, got {getattr(self, name)!r}")
        if getattr(self, "kv_quant_bits", 4) not in KV_QUANT_BITS:
            raise ValueError(f"R1Config.kv_quant_bits={self.kv_quant_bits!r}; allowed: 0 (off), 2, 4, 8")
        group = getattr(self, "kv_quant_group", 64)
        for name in ("kv_lora_rank", "qk_rope_head_dim"):
            dim = getattr(self, name)
            if dim % min(group, dim):
                raise ValueError(f"R1Config.kv_quant_group={group} must divide {name}={dim} (or exceed it)")

    @property
    def num_dense_layers(self) -> int:
        return min(self.first_k_dense_replace, self.num_hidden_layers)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0


def normalize_rope(
    rope_parameters: dict | None, rope_scaling: dict | None, rope_theta: float | None, max_pos: int
) -> dict:
    """One dict for every spelling of the rotary settings: rope_parameters (transformers 5), rope_scaling
    (DeepSeek's config.json, with `type` or `rope_type`), and a top-level rope_theta."""
    params = dict(rope_parameters or {})
    if rope_scaling:
        params.update(rope_scaling)
    if "type" in params:
        params.setdefault("rope_type", params.pop("type"))
    params.setdefault("rope_type", "default")
    theta = params.get("rope_theta", rope_theta if rope_theta is not None else 10000.0)
    params["rope_theta"] = float(theta)
    if params["rope_type"] not in ROPE_TYPES:
        raise ValueError(f"R1Config.rope_scaling.type={params['rope_type']!r}; allowed: {', '.join(ROPE_TYPES)}")
    if params["rope_type"] != "default":
        factor = params.get("factor")
        if factor is None or float(factor) <= 0:
            raise ValueError(f"R1Config.rope_scaling.factor must be a positive number, got {factor!r}")
        params["factor"] = float(factor)
    if params["rope_type"] == "yarn":
        params.setdefault("original_max_position_embeddings", max_pos)
    return params
