"""Key names: this package's module names <-> the DeepSeek-V3 Hugging Face checkpoint layout.

Our modules keep the routed experts stacked (`mlp.experts.gate_up_proj` (E, 2I, D), `mlp.experts.down_proj`
(E, D, I), as transformers' DeepseekV3 does in memory); checkpoints store one Linear per expert
(`mlp.experts.{e}.{gate,up,down}_proj.weight`), which DeepSeek's release, transformers' save_pretrained,
vLLM and SGLang all use. The MTP module `mtp.{d}.*` is stored as `model.layers.{num_hidden_layers + d}.*`.
FP8 checkpoints add `{weight}_scale_inv` next to each quantised weight.

A multimodal checkpoint keeps its encoders and projectors in their own file, `multimodal.safetensors`, under
the module names unchanged: `multimodal.binding.encoders.{text,image,audio,points}.*`,
`multimodal.binding.log_scale`, `multimodal.projectors.{image,audio,points}.{slot,fc1.*,fc2.*}`. Tools that
know only DeepSeek-V3 read `model.safetensors` and never see them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

EXPERT_KEY = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<part>gate|up|down)_proj\.weight$")
LAYER_KEY = re.compile(r"^model\.layers\.(?P<i>\d+)\.(?P<rest>.*)$")
MTP_OWN = ("embed_tokens.", "enorm.", "hnorm.", "eh_proj.", "shared_head.")
SCALE_SUFFIX = "_scale_inv"
MULTIMODAL_PREFIX = "multimodal."
MULTIMODAL_FILE = "multimodal.safetensors"


def is_multimodal_key(key: str) -> bool:
    return key.startswith(MULTIMODAL_PREFIX)


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes: a module parameter/buffer, or one expert's slice of a stack."""

    name: str
    expert: int | None = None
    part: str | None = None  # "gate" | "up" | "down" for per-expert keys


def checkpoint_to_module(key: str, num_hidden_layers: int) -> Target:
    m = LAYER_KEY.match(key)
    if m and int(m["i"]) >= num_hidden_layers:
        depth, rest = int(m["i"]) - num_hidden_layers, m["rest"]
        key = f"mtp.{depth}.{rest}" if rest.startswith(MTP_OWN) else f"mtp.{depth}.block.{rest}"
    e = EXPERT_KEY.match(key)
    if e:
        stack = "down_proj" if e["part"] == "down" else "gate_up_proj"
        return Target(f"{e['prefix']}.{stack}", int(e["e"]), e["part"])
    return Target(key)


def module_to_checkpoint(name: str, tensor: torch.Tensor, num_hidden_layers: int):
    """Yield (checkpoint key, tensor) pairs for one module tensor."""
    m = re.match(r"^mtp\.(\d+)\.(block\.)?(.*)$", name)
    if m:
        name = f"model.layers.{num_hidden_layers + int(m[1])}.{m[3]}"
    if name.endswith(".mlp.experts.gate_up_proj"):
        prefix = name[: -len(".gate_up_proj")]
        gate, up = tensor.chunk(2, dim=1)
        for e in range(tensor.shape[0]):
            yield f"{prefix}.{e}.gate_proj.weight", gate[e]
            yield f"{prefix}.{e}.up_proj.weight", up[e]
    elif name.endswith(".mlp.experts.down_proj"):
        prefix = name[: -len(".down_proj")]
        for e in range(tensor.shape[0]):
            yield f"{prefix}.{e}.down_proj.weight", tensor[e]
    else:
        yield name, tensor


def is_mtp_key(key: str, num_hidden_layers: int) -> bool:
    m = LAYER_KEY.match(key)
    return bool(m) and int(m["i"]) >= num_hidden_layers
