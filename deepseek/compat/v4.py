"""Loading and saving DeepSeek-V4 checkpoints (safetensors, key names in keys.py's V4 section).

Reads DeepSeek's release layout (FP8 e4m3 weights with e8m0 `.scale` blocks, FP4 e2m1 routed experts packed two
per byte with one e8m0 scale per 32 inputs, the MTP module `mtp.*` skipped) and what transformers'
DeepseekV4ForCausalLM writes; every module tensor must come from the file. Saves the release layout unquantised,
with a config.json transformers reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..model.v4.config import V4Config
from .checkpoint import (
    FP8_DTYPES,
    _assign,
    _atomic_write,
    _open,
    _read,
    checkpoint_files,
    dequantize_fp8,
    resolve,
)
from .keys import V4_SCALE_SUFFIXES, v4_checkpoint_to_module, v4_module_to_checkpoint

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # e2m1 codes
FP4_GROUP = 32  # inputs sharing one scale


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(out, in/2) bytes, two e2m1 codes each (low nibble first), times one scale per 32 inputs -> (out, in)."""
    u8 = packed.contiguous().view(torch.uint8)
    lut = torch.tensor(FP4_VALUES)
    values = torch.stack((lut[(u8 & 0xF).long()], lut[(u8 >> 4).long()]), dim=-1).flatten(-2)
    return (values * scale.float().repeat_interleave(FP4_GROUP, dim=-1)[:, : values.shape[-1]]).to(dtype)


def quantize_fp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse (nearest e2m1 code, power-of-two scale per 32 inputs), used to write FP4 test checkpoints."""
    out_dim, in_dim = weight.shape
    groups = weight.float().view(out_dim, in_dim // FP4_GROUP, FP4_GROUP)
    scale = torch.exp2(torch.ceil(torch.log2(groups.abs().amax(-1).clamp(min=1e-30) / 6.0)))  # e8m0: powers of 2
    lut = torch.tensor(FP4_VALUES)
    codes = ((groups / scale[..., None]).flatten(1)[..., None] - lut).abs().argmin(-1).to(torch.uint8)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(torch.int8)
    return packed, scale


def _dequantize(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if weight.dtype == torch.int8:
        return dequantize_fp4(weight, scale)
    return dequantize_fp8(weight, scale)


def load_v4(cls, name_or_path, dtype=torch.float32, device="cpu"):
    path = resolve(name_or_path)
    raw = json.loads((path / "config.json").read_text())
    raw = {k: v for k, v in raw.items() if k not in ("architectures", "model_type", "quantization_config",
                                                      "auto_map")}  # fmt: skip
    config = V4Config(**raw)
    with torch.device("meta"):
        model = cls(config)
    model.to_empty(device=device)
    model.to(dtype)
    model.reset_rotary()  # to_empty left the computed rotary tables as garbage
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    handles = {f: _open(f) for f in checkpoint_files(path)}
    key_file = {k: f for f, h in handles.items() for k in h.keys()}
    filled, unexpected = {}, []
    for key, file in key_file.items():
        if key.endswith(V4_SCALE_SUFFIXES) or key.startswith("mtp."):
            continue
        target = v4_checkpoint_to_module(key)
        if target is None or target.name not in params:
            unexpected.append(key)
            continue
        tensor = _read(handles[file], key, file)
        if tensor.dtype in FP8_DTYPES or tensor.dtype == torch.int8:
            scale_key = next((key.removesuffix(".weight") + s for s in (".scale",) if key.endswith(".weight")
                              and key.removesuffix(".weight") + s in key_file), key + "_scale_inv")  # fmt: skip
            if scale_key not in key_file:
                raise ValueError(f"quantised weight {key} in {file.name} has no scale ({scale_key})")
            tensor = _dequantize(tensor, _read(handles[key_file[scale_key]], scale_key, key_file[scale_key]))
        _assign(params[target.name], target, tensor, key, filled)
    if unexpected:
        raise ValueError(f"unexpected keys in {path}: {', '.join(sorted(unexpected)[:8])}")
    persistent = set(model.state_dict())
    missing = [n for n in persistent if n not in filled or not bool(filled[n].all())]
    if missing:
        raise ValueError(f"checkpoint {path} lacks weights for: {', '.join(sorted(missing)[:8])}")
    return model.eval()


def hf_config_dict_v4(config: V4Config) -> dict:
    """config.json in DeepSeek-V4's field names (transformers' DeepseekV4Config reads it)."""
    d = {k: v for k, v in config.to_dict().items()
         if k not in ("attention_types", "moe_types", "compress_rope_scaling", "rope_parameters", "rope_scaling")}  # fmt: skip
    d.update(model_type="deepseek_v4", architectures=["DeepseekV4ForCausalLM"], layer_types=config.attention_types,
             mlp_layer_types=config.moe_types, rope_scaling=config.compress_rope_scaling)  # fmt: skip
    return d


def save_v4(model, save_directory) -> Path:
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in model.state_dict().items():
        for key, v in v4_module_to_checkpoint(name, t):
            tensors[key] = v.detach().contiguous()
    _atomic_write(out / "model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    text = json.dumps(hf_config_dict_v4(model.config), indent=2, sort_keys=True)
    _atomic_write(out / "config.json", lambda p: Path(p).write_text(text))
    return out
