"""Tiny debug configs and the bridge to transformers' DeepseekV3ForCausalLM used by parity tests
(`from helpers import ...`; fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from deepseek import R1Config, R1ForCausalLM

ROOT = Path(__file__).resolve().parents[1]  # the repository
DATA = Path(__file__).resolve().parent / "data"


def tiny_config(q_lora: bool = True, groups: bool = True, yarn: bool = False, **overrides) -> R1Config:
    kw = dict(
        vocab_size=211, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, kv_lora_rank=32, q_lora_rank=48 if q_lora else None, qk_rope_head_dim=16,
        v_head_dim=16, qk_nope_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=4 if groups else 1, topk_group=2 if groups else 1, first_k_dense_replace=1,
        routed_scaling_factor=2.5, max_position_embeddings=256, num_nextn_predict_layers=0,
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )  # fmt: skip
    if yarn:
        kw["rope_scaling"] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                              "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}  # fmt: skip
    kw.update(overrides)
    return R1Config(**kw)


def random_model(config: R1Config, seed: int = 0, cls=R1ForCausalLM) -> R1ForCausalLM:
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # make routing and biases non-trivial
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.uniform_(-0.05, 0.05)
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.1)
    return model


def hf_config(config: R1Config) -> DeepseekV3Config:
    d = config.to_dict()
    for k in ("model_type", "architectures", "transformers_version", "use_mtp", "qk_head_dim", "head_dim"):
        d.pop(k, None)
    allowed = set(DeepseekV3Config.__dataclass_fields__) if hasattr(DeepseekV3Config, "__dataclass_fields__") else None
    d["num_key_value_heads"] = config.num_attention_heads
    d["num_mtp_layers"] = d.pop("num_nextn_predict_layers")
    if allowed:
        d = {k: v for k, v in d.items() if k in allowed}
    return DeepseekV3Config(**d)


def to_transformers(model: R1ForCausalLM, tmp_path) -> DeepseekV3ForCausalLM:
    """Our weights in transformers' implementation, via our save_pretrained (the real file round trip)."""
    model.save_pretrained(tmp_path)
    hf_config(model.config).save_pretrained(tmp_path)
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    return hf.eval()


def padded_batch(vocab: int, seed: int = 0):
    """(ids, mask) of 3 rows x 14 tokens, rows 1 and 2 left-padded with 2 (5 and 9 positions)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 14), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    mask[2, :9] = 0
    ids[mask == 0] = 2
    return ids, mask


@torch.no_grad()
def padded_logits(*models, vocab: int, seed: int = 0):
    """Each model's logits on `padded_batch` (positions counted from each row's first real token), and the mask
    of real positions: ([(B, T, V), ...], (B, T) bool)."""
    ids, mask = padded_batch(vocab, seed)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return [m(ids, attention_mask=mask, position_ids=pos).logits for m in models], mask.bool()



def lora_model(experts: bool, seed: int = 1):
    """A tiny random model (weights scaled to sane losses) with LoRA rank 4 on every nn.Linear target and, if
    `experts`, the routed experts; lora_B drawn non-zero so lora_A gets gradients too. In train mode."""
    from deepseek.train.finetune import add_lora

    model = random_model(tiny_config(num_nextn_predict_layers=1))
    with torch.no_grad():  # undo random_model's x4 so losses stay in a sane range
        for p in model.parameters():
            p.mul_(0.25) if p.dim() > 1 else None
    peft = add_lora(model, True, 4, 8, experts)
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return peft.train()
