"""R1Config: the DeepSeek-V3/R1 architecture config, plus this project's two components' own settings.

A real DeepSeek-V3 / R1 `config.json` (model_type "deepseek_v3", with `rope_scaling` or `rope_parameters`)
loads as is. Impossible values raise a ValueError naming the field and what is allowed.

    config.routing       RoutingConfig: expert routing (deepseek/model/routing.py); config.json key "routing"
    config.compression   CompressionConfig: the hierarchical latent cache (deepseek/model/longctx); "compression"
    config.indexer       IndexerConfig or None: DeepSeek Sparse Attention's lightning indexer (DeepSeek-V3.2,
                         deepseek/model/sparse.py); config.json keeps V3.2's own flat fields index_topk,
                         index_n_heads, index_head_dim (model_type "deepseek_v32"), absent for V3

Both are validated dataclasses. Checkpoints saved with the earlier flat keys (`routing_mode`, `kv_block_size`,
...) still load: R1Config(routing_mode="entropy") and R1Config(kv_window=64) fill the sub-configs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from transformers import PretrainedConfig

ROPE_TYPES = ("default", "yarn", "linear")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
SCORING_FUNCS = ("sigmoid", "softmax")
ROUTING_MODES = ("topk", "entropy", "top_p")  # see deepseek/model/routing.py
KV_QUANT_BITS = (0, 2, 4, 8)


def _positive_int(owner: str, name: str, value, zero: bool = False) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if zero else 1):
        raise ValueError(f"{owner}.{name} must be a {'non-negative' if zero else 'positive'} integer, got {value!r}")


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class RoutingConfig:
    """How many routed experts a token activates (deepseek/model/routing.py). mode "topk": the plain router."""

    mode: str = "topk"  # "topk", "entropy" (k from the routing entropy) or "top_p" (k from the routing mass)
    k_min: int = 1
    k_max: int | None = None  # None: num_experts_per_tok
    threshold: float | None = None  # None: the mode's default (entropy 1.0, top_p 0.9)
    target_k: float | None = None  # training: a controller holds the batch mean k here
    controller_rate: float = 0.05
    entropy_weight: float = 0.0  # routing-entropy regulariser weight
    layer_thresholds: list[float] | None = None  # per MoE layer, as `export_thresholds` / `calibrate` write them

    def __post_init__(self):
        if self.mode not in ROUTING_MODES:
            raise ValueError(f"R1Config.routing.mode={self.mode!r}; allowed: {', '.join(ROUTING_MODES)}")
        _positive_int("R1Config.routing", "k_min", self.k_min)
        if self.k_max is not None:
            _positive_int("R1Config.routing", "k_max", self.k_max)
        t = self.threshold
        if t is not None and (not _number(t) or t <= 0):
            raise ValueError(f"R1Config.routing.threshold must be a positive number or null, got {t!r}")
        if self.mode == "top_p" and t is not None and t > 1:
            raise ValueError(f"R1Config.routing.threshold={t} is a probability mass for mode 'top_p': "
                             "use 0 < threshold <= 1")  # fmt: skip
        for name in ("controller_rate", "entropy_weight"):
            v = getattr(self, name)
            if not _number(v) or v < 0:
                raise ValueError(f"R1Config.routing.{name} must be a non-negative number, got {v!r}")
        per_layer = self.layer_thresholds
        if per_layer is not None and (
            not isinstance(per_layer, list | tuple) or not all(_number(v) and v > 0 for v in per_layer)
        ):
            raise ValueError(f"R1Config.routing.layer_thresholds must be a list of positive numbers, got {per_layer!r}")

    def validate(self, reach: int) -> None:
        """Checks against the model: reach = experts the router can pick for one token."""
        self.__post_init__()
        lo, hi = self.k_min, self.k_max
        if not lo <= hi <= reach:
            raise ValueError(f"R1Config.routing.k_min={lo}, k_max={hi}: need 1 <= k_min <= k_max <= {reach} "
                             "(the experts reachable by the router)")  # fmt: skip
        tk = self.target_k
        if tk is not None and (not _number(tk) or not lo <= tk <= hi):
            raise ValueError(f"R1Config.routing.target_k={tk!r} must be a number in k_min..k_max ({lo}..{hi})")


@dataclass
class CompressionConfig:
    """The hierarchical compressed latent cache (deepseek/model/longctx/cache.py, docs/long_context.md)."""

    enabled: bool = False  # long prompts use the CompressedLatentCache by default
    block_size: int = 64  # tokens per block (summaries, selection, quantisation unit)
    sink_blocks: int = 1  # first blocks kept at full precision (attention sinks)
    window: int = 512  # most recent tokens kept at full precision
    topk_blocks: int = 16  # older blocks read in full per query tile (Quest/NSA selection)
    select_span: int = 1  # ... chosen as runs of this many consecutive blocks (1 = single blocks)
    quant_bits: int = 4  # bits for older blocks' latent; 0 = keep full precision
    quant_group: int = 64  # channels sharing one scale / zero point
    coarse: bool = True  # unselected blocks still attended through their mean latent
    offload: bool = False  # quantised blocks live in host memory, fetched when selected
    learned: bool = False  # learned block summaries + branch gates (NSA), trained compressed
    compact_positions: bool = False  # attended set at contiguous rope positions (length extrapolation)
    refresh_recent: bool = False  # prefill ends re-encoding the recent buffer (one selection)
    lead_layer: int | None = None  # decode + refresh: the other layers read this layer's selection

    def __post_init__(self):
        for name in ("block_size", "topk_blocks", "quant_group", "select_span"):
            _positive_int("R1Config.compression", name, getattr(self, name))
        for name in ("sink_blocks", "window"):
            _positive_int("R1Config.compression", name, getattr(self, name), zero=True)
        if self.topk_blocks % self.select_span:
            raise ValueError(f"R1Config.compression.select_span={self.select_span} must divide "
                             f"topk_blocks={self.topk_blocks}")  # fmt: skip
        for name in ("enabled", "coarse", "offload", "learned", "compact_positions", "refresh_recent"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"R1Config.compression.{name} must be true or false, got {getattr(self, name)!r}")
        if self.quant_bits not in KV_QUANT_BITS:
            raise ValueError(f"R1Config.compression.quant_bits={self.quant_bits!r}; allowed: 0 (off), 2, 4, 8")
        lead = self.lead_layer
        if lead is not None and (not isinstance(lead, int) or isinstance(lead, bool)):
            raise ValueError(f"R1Config.compression.lead_layer={lead!r} must be None or a layer index")

    def validate(self, n_layers: int, latent_dims: dict[str, int]) -> None:
        """Checks against the model: layer count and the latent widths the quantisation groups must divide."""
        self.__post_init__()
        lead = self.lead_layer
        if lead is not None and not -n_layers <= lead < n_layers:
            raise ValueError(f"R1Config.compression.lead_layer={lead!r} must be None or a layer index "
                             f"(-{n_layers}..{n_layers - 1})")  # fmt: skip
        for name, dim in latent_dims.items():
            if dim % min(self.quant_group, dim):
                raise ValueError(f"R1Config.compression.quant_group={self.quant_group} must divide {name}={dim} "
                                 "(or exceed it)")  # fmt: skip


@dataclass
class IndexerConfig:
    """DeepSeek Sparse Attention (DeepSeek-V3.2): a lightning indexer scores every past token for each query and
    MLA attends to the `topk` best (deepseek/model/sparse.py). config.json: index_topk, index_n_heads,
    index_head_dim, as DeepSeek-V3.2 writes them."""

    topk: int = 2048  # tokens each query attends to
    n_heads: int = 64  # indexer heads
    head_dim: int = 128  # indexer query / key width (its first qk_rope_head_dim dims are rotary)

    def __post_init__(self):
        for name in ("topk", "n_heads", "head_dim"):
            _positive_int("R1Config.indexer", name, getattr(self, name))

    @classmethod
    def from_flat(cls, index_topk, index_n_heads, index_head_dim) -> IndexerConfig | None:
        """From DeepSeek-V3.2's config.json fields; None when none is given (a DeepSeek-V3 config)."""
        given = {"topk": index_topk, "n_heads": index_n_heads, "head_dim": index_head_dim}
        if all(v is None for v in given.values()):
            return None
        return cls(**{k: v for k, v in given.items() if v is not None})

    def flat(self) -> dict:
        return {"index_topk": self.topk, "index_n_heads": self.n_heads, "index_head_dim": self.head_dim}


# the earlier flat config.json keys of the two sub-configs (still read; never written)
FLAT_ROUTING = {f"routing_{f.name}": f.name for f in fields(RoutingConfig)}
FLAT_COMPRESSION = {"kv_compress": "enabled", **{f"kv_{f.name}": f.name for f in fields(CompressionConfig)
                                                 if f.name != "enabled"}}  # fmt: skip


def _sub_config(cls, given, flat: dict, kwargs: dict):
    """A sub-config from its dict / instance plus any legacy flat keys popped from kwargs (flat keys win)."""
    if isinstance(given, cls):
        values = asdict(given)
    elif isinstance(given, dict):
        unknown = set(given) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"R1Config: unknown {cls.__name__} field(s) {', '.join(sorted(unknown))}")
        values = dict(given)
    elif given is None:
        values = {}
    else:
        raise ValueError(f"R1Config: {cls.__name__} must be a dict, got {type(given).__name__}")
    for old, new in flat.items():
        if old in kwargs:
            values[new] = kwargs.pop(old)
    return cls(**values)


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
        routing: RoutingConfig | dict | None = None,
        compression: CompressionConfig | dict | None = None,
        prefill_chunk: int = 1024,
        multimodal: dict | None = None,
        index_topk: int | None = None,
        index_n_heads: int | None = None,
        index_head_dim: int | None = None,
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
        # the two components' settings (routing.py, longctx/), from their dicts or the earlier flat keys
        self.routing = _sub_config(RoutingConfig, routing, FLAT_ROUTING, kwargs)
        if self.routing.k_max is None:
            self.routing.k_max = num_experts_per_tok
        self.compression = _sub_config(CompressionConfig, compression, FLAT_COMPRESSION, kwargs)
        self.prefill_chunk = prefill_chunk  # tokens per chunk in chunked prefill
        # the multimodal component's settings (deepseek/multimodal/lm.py, built by the SDK's R1Model); None: text only
        self.multimodal = dict(multimodal) if multimodal else None
        v4_only = sorted({"hc_mult", "compress_ratios", "o_groups"} & set(kwargs))
        if v4_only:  # before anything is built: a DeepSeek-V4 config would otherwise become a wrong V3 model
            raise ValueError(f"R1Config: {', '.join(v4_only)} belong to a DeepSeek-V4 config; load it with "
                             "deepseek.model.v4.V4ForCausalLM.from_pretrained")  # fmt: skip
        # DeepSeek Sparse Attention (V3.2) from its flat config.json fields, or None (V3: dense MLA)
        self.indexer = IndexerConfig.from_flat(index_topk, index_n_heads, index_head_dim)
        if self.indexer is not None:  # what transformers' caches read to give each layer an indexer-key store
            kwargs["layer_types"] = ["indexed_attention"] * num_hidden_layers
            for derived in ("mlp_layer_types", "mlp_bias"):  # transformers' V3.2 writes these; derived here
                kwargs.pop(derived, None)
        # build the MTP modules (False: a checkpoint without them); read from the earlier key `use_mtp`, which
        # transformers' GenerationConfig now takes for MTP speculative decoding, so it is never written
        self.build_mtp = kwargs.pop("build_mtp", kwargs.pop("use_mtp", True))
        self.mtp_loss_weight = kwargs.pop("mtp_loss_weight", 0.0)  # default lambda of the MTP loss in forward
        self.weight_quantization = kwargs.pop("weight_quantization", None)  # "int8" after quantize_int8
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
        _positive_int("R1Config", "prefill_chunk", self.prefill_chunk)
        self.validate_components()
        self.validate_indexer()

    def validate_indexer(self) -> None:
        if self.indexer is None:
            return
        self.indexer.__post_init__()
        if self.q_lora_rank is None:
            raise ValueError("R1Config.indexer (DeepSeek-V3.2 sparse attention) reads the q_lora_rank latent: "
                             "set q_lora_rank")  # fmt: skip
        if self.indexer.head_dim < self.qk_rope_head_dim:
            raise ValueError(f"R1Config.index_head_dim={self.indexer.head_dim} must be at least "
                             f"qk_rope_head_dim={self.qk_rope_head_dim} (its rotary part)")  # fmt: skip
        if self.compression.enabled or self.compression.learned:
            raise ValueError("R1Config: the compressed latent cache and DeepSeek-V3.2 sparse attention both choose "
                             "what a query reads; turn compression off for a model with index_topk")  # fmt: skip

    def validate_components(self) -> None:
        """The routing and compression settings, checked against this model (call after changing them)."""
        reach = self.topk_group * (self.n_routed_experts // self.n_group) if self.n_group > 1 else self.n_routed_experts
        self.routing.validate(reach)
        self.compression.validate(self.num_hidden_layers, {"kv_lora_rank": self.kv_lora_rank,
                                                           "qk_rope_head_dim": self.qk_rope_head_dim})  # fmt: skip

    def __setattr__(self, name, value):
        if name in FLAT_ROUTING or name in FLAT_COMPRESSION:  # an earlier flat name: refuse, never ignore
            part, field = ("routing", FLAT_ROUTING[name]) if name in FLAT_ROUTING else ("compression", FLAT_COMPRESSION[name])
            raise AttributeError(f"R1Config.{name} is now config.{part}.{field} "
                                 f"(or config.set_components({name}=...))")  # fmt: skip
        super().__setattr__(name, value)

    def set_components(self, **settings) -> None:
        """Change routing / compression settings by their flat names (routing_mode="entropy", kv_window=64,
        prefill_chunk=..., num_experts_per_tok=...), validated together: on a bad value nothing changes."""
        settings = dict(settings)
        routing = _sub_config(RoutingConfig, self.routing, FLAT_ROUTING, settings)
        compression = _sub_config(CompressionConfig, self.compression, FLAT_COMPRESSION, settings)
        plain = {k: settings.pop(k) for k in ("prefill_chunk", "num_experts_per_tok") if k in settings}
        if settings:
            raise ValueError(f"R1Config.set_components: unknown setting(s) {', '.join(sorted(settings))}")
        old = {"routing": self.routing, "compression": self.compression,
               **{k: getattr(self, k) for k in plain}}  # fmt: skip
        for k, v in {"routing": routing, "compression": compression, **plain}.items():
            setattr(self, k, v)
        try:
            self.validate_r1()
        except ValueError:
            for k, v in old.items():
                setattr(self, k, v)
            raise

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["routing"], d["compression"] = asdict(self.routing), asdict(self.compression)
        indexer = d.pop("indexer", None)
        if indexer is not None:  # written flat, as DeepSeek-V3.2's config.json has them
            d.update(self.indexer.flat())
        return d

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
