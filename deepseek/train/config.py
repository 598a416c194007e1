"""TrainConfig: every knob of a training run, validated, with Python presets and command-line overrides.

    from deepseek.train.config import TrainConfig, preset
    cfg = preset("debug", out_dir="runs/x", max_steps=50)       # a preset plus keyword overrides
    cfg = apply_overrides(cfg, ["lr=1e-3", "model.hidden_size=128"])  # what `deepseek train --set` does

The resolved config is written to `<out_dir>/train_config.json` by the trainer.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

MODES = ("pretrain", "sft")
DTYPES = ("auto", "float32", "bfloat16")
PARALLEL = ("auto", "none", "ddp", "fsdp")


@dataclass
class TrainConfig:
    # where the run lives and what it starts from
    out_dir: str = "runs/debug"
    init_from: str | None = None  # model folder / bundled name; None = a fresh model from `model`
    model: dict = field(default_factory=dict)  # R1Config fields for a fresh model (merged over a preset)
    mode: str = "pretrain"  # "pretrain": loss on every token; "sft": labels come masked from the data
    # data: a text/jsonl/... path, a task name ("task:addition"), or None when the caller passes batches
    data: str | None = None
    val_data: str | None = None
    tokenizer: str | None = None  # folder with tokenizer.json; defaults to init_from's
    seq_len: int = 128
    batch_size: int = 8  # sequences per optimizer step, summed over ranks and accumulation micro-steps
    micro_batch_size: int = 8  # sequences per forward on one rank
    # optimisation
    max_steps: int = 100
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1  # matrices only; norms, biases and 1-D tensors never decay
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = off
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 autocast on CUDA
    # DeepSeek-V3 load balancing and multi-token prediction
    bias_update_speed: float = 0.001  # gamma of the auxiliary-loss-free bias update; 0 = off
    seq_aux_alpha: float = 0.0  # weight of the sequence-wise balance loss; DeepSeek-V3 uses 1e-4
    mtp_loss_weight: float = 0.0  # lambda of the MTP loss (needs num_nextn_predict_layers > 0)
    # bookkeeping
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # 0 = only at the end (when there is validation data)
    eval_batches: int = 4
    save_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the latest complete checkpoint in out_dir
    parallel: str = "auto"  # auto: ddp under torchrun, none otherwise; "fsdp" = FSDP2 fully_shard
    device: str = "auto"
    compile: bool = False  # torch.compile attention, norms and dense MLPs of every layer (MoE routing stays eager)
    progress: bool = True

    def __post_init__(self):
        positive = ("seq_len", "batch_size", "micro_batch_size", "max_steps", "log_every", "eval_batches",
                    "keep_checkpoints")  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "eval_every", "save_every", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"TrainConfig.{name} must be a non-negative integer, got {value!r}")
        for name in ("lr", "weight_decay", "eps", "grad_clip", "bias_update_speed", "seq_aux_alpha",
                     "mtp_loss_weight"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"TrainConfig.{name} must be a non-negative number, got {value!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.mode not in MODES:
            raise ValueError(f"TrainConfig.mode={self.mode!r}; allowed: {', '.join(MODES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"TrainConfig.dtype={self.dtype!r}; allowed: {', '.join(DTYPES)}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"TrainConfig.parallel={self.parallel!r}; allowed: {', '.join(PARALLEL)}")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"TrainConfig.batch_size={self.batch_size} must be a multiple of "
                             f"micro_batch_size={self.micro_batch_size}")  # fmt: skip
        if not isinstance(self.model, dict):
            raise ValueError(f"TrainConfig.model must be a dict of R1Config fields, got {type(self.model).__name__}")

    def grad_accum(self, world_size: int) -> int:
        """Micro-steps per optimizer step on each rank, so that every world size sees the same global batch."""
        per_rank = self.batch_size // world_size if self.batch_size % world_size == 0 else 0
        if per_rank == 0 or per_rank % self.micro_batch_size:
            raise ValueError(f"TrainConfig.batch_size={self.batch_size} must split evenly into {world_size} "
                             f"ranks x micro_batch_size={self.micro_batch_size}")  # fmt: skip
        return per_rank // self.micro_batch_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, path) -> TrainConfig:
        with open(path) as f:
            return cls(**json.load(f))


# ---------------------------------------------------------------------------- model presets
def model_preset(name: str) -> dict:
    """R1Config fields for the small models this project trains on a CPU. Same architecture as DeepSeek-V3
    (MLA, sigmoid-routed fine-grained MoE with groups, shared expert, YaRN-ready RoPE), only smaller."""
    base = dict(
        vocab_size=512, hidden_size=64, intermediate_size=192, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=16,
        v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        first_k_dense_replace=1, routed_scaling_factor=2.5, max_position_embeddings=1024,
        num_nextn_predict_layers=1, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )  # fmt: skip
    sizes = {
        "debug": {},
        "tiny": dict(hidden_size=256, intermediate_size=768, moe_intermediate_size=128, num_hidden_layers=6,
                     num_attention_heads=8, kv_lora_rank=64, q_lora_rank=128, qk_rope_head_dim=32,
                     qk_nope_head_dim=32, v_head_dim=32, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                     topk_group=2, vocab_size=4096),  # fmt: skip
        "small": dict(hidden_size=512, intermediate_size=1536, moe_intermediate_size=256, num_hidden_layers=8,
                      num_attention_heads=8, kv_lora_rank=128, q_lora_rank=256, qk_rope_head_dim=32,
                      qk_nope_head_dim=64, v_head_dim=64, n_routed_experts=32, num_experts_per_tok=4, n_group=4,
                      topk_group=2, vocab_size=8192),  # fmt: skip
    }
    if name not in sizes:
        raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(sizes)}")
    return {**base, **sizes[name]}


# ---------------------------------------------------------------------------- run presets
def preset(name: str = "debug", **overrides) -> TrainConfig:
    """A named run preset with keyword overrides. `debug`: seconds on a CPU; `tiny`: the r1-tiny pretraining
    shape; `sft`: supervised fine-tuning from a checkpoint (loss on assistant tokens only)."""
    presets: dict[str, dict[str, Any]] = {
        "debug": dict(model=model_preset("debug"), seq_len=64, batch_size=8, micro_batch_size=8, max_steps=20,
                      lr=3e-3, warmup_steps=2),  # fmt: skip
        "tiny": dict(model=model_preset("tiny"), seq_len=256, batch_size=32, micro_batch_size=8, max_steps=2000,
                     lr=2e-3, warmup_steps=100, eval_every=200, save_every=500, mtp_loss_weight=0.3),  # fmt: skip
        "sft": dict(mode="sft", seq_len=512, batch_size=16, micro_batch_size=4, max_steps=500, lr=5e-4,
                    warmup_steps=20, weight_decay=0.0, eval_every=100, save_every=250),  # fmt: skip
    }
    if name not in presets:
        raise ValueError(f"unknown train preset {name!r}; choose one of: {', '.join(presets)}")
    kw = dict(presets[name])
    if "model" in overrides and "model" in kw:
        overrides = dict(overrides)
        kw["model"] = {**kw["model"], **overrides.pop("model")}
    kw.update(overrides)
    return TrainConfig(**kw)


def parse_value(text: str) -> Any:
    """Command-line value: JSON when it parses (numbers, true/false/null, lists), else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(config: TrainConfig, items: list[str]) -> TrainConfig:
    """`key=value` overrides; `model.<field>=value` sets an R1Config field of the fresh model."""
    values = config.to_dict()
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. lr=1e-3 or model.hidden_size=128)")
        key, raw = item.split("=", 1)
        key = key.strip().replace("-", "_")
        value = parse_value(raw)
        if key.startswith("model."):
            values["model"] = {**values["model"], key[len("model."):]: value}
        elif key in names:
            values[key] = value
        else:
            raise ValueError(f"unknown TrainConfig field {key!r}; fields: {', '.join(sorted(names))}")
    return TrainConfig(**values)
