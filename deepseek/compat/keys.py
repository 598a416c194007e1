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


# ---------------------------------------------------------------------------- DeepSeek-V4
# Module names (ours, as transformers' DeepseekV4ForCausalLM names them in memory) <-> DeepSeek-V4's release keys
# (`embed.weight`, `layers.N.attn.wq_a.weight`, `layers.N.ffn.experts.E.w1.weight`, ..., no `model.` prefix).
# Reading also accepts what transformers' save_pretrained writes (the same names under `model.`, its
# `embed_tokens` and `attn.norm`). Quantisation scales sit next to their weight as `.scale` (the release) or
# `.weight_scale_inv`.
V4_TOP = {"model.embed_tokens.weight": "embed.weight", "lm_head.weight": "head.weight",
          "model.norm.weight": "norm.weight", "model.hc_head.hc_fn": "hc_head_fn",
          "model.hc_head.hc_base": "hc_head_base", "model.hc_head.hc_scale": "hc_head_scale"}  # fmt: skip
V4_LAYER = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
            **{f"{b}_hc.{p}": f"hc_{b}_{p}" for b in ("attn", "ffn") for p in ("fn", "base", "scale")}}  # fmt: skip
V4_ATTN = {"q_a_proj.weight": "wq_a.weight", "q_a_norm.weight": "q_norm.weight", "q_b_proj.weight": "wq_b.weight",
           "kv_proj.weight": "wkv.weight", "kv_norm.weight": "kv_norm.weight", "o_a_proj.weight": "wo_a.weight",
           "o_b_proj.weight": "wo_b.weight", "sinks": "attn_sink"}  # fmt: skip
V4_COMPRESSOR = {"kv_proj.weight": "wkv.weight", "gate_proj.weight": "wgate.weight", "position_bias": "ape",
                 "kv_norm.weight": "norm.weight"}  # fmt: skip
V4_INDEXER = {"q_b_proj.weight": "wq_b.weight", "scorer.weights_proj.weight": "weights_proj.weight",
              **{k: f"compressor.{v}" for k, v in V4_COMPRESSOR.items()}}  # fmt: skip
V4_FFN = {"gate.weight": "gate.weight", "gate.e_score_correction_bias": "gate.bias", "gate.tid2eid": "gate.tid2eid",
          "shared_experts.gate_proj.weight": "shared_experts.w1.weight",
          "shared_experts.down_proj.weight": "shared_experts.w2.weight",
          "shared_experts.up_proj.weight": "shared_experts.w3.weight"}  # fmt: skip
V4_EXPERT_KEY = re.compile(r"^layers\.(?P<i>\d+)\.ffn\.experts\.(?P<e>\d+)\.w(?P<w>[123])\.weight$")
V4_EXPERT_PART = {"1": "gate", "3": "up", "2": "down"}
V4_SCALE_SUFFIXES = (".scale", "_scale_inv")


def _v4_attn_to_checkpoint(rest: str) -> str:
    if rest.startswith("compressor.indexer."):
        return "indexer." + V4_INDEXER[rest.removeprefix("compressor.indexer.")]
    if rest.startswith("compressor."):
        return "compressor." + V4_COMPRESSOR[rest.removeprefix("compressor.")]
    return V4_ATTN[rest]


def v4_module_to_checkpoint(name: str, tensor: torch.Tensor):
    """Yield (release key, tensor) pairs for one module tensor of a V4 model."""
    if name in V4_TOP:
        yield V4_TOP[name], tensor
        return
    m = re.match(r"^model\.layers\.(\d+)\.(.*)$", name)
    if m is None:
        raise KeyError(f"no DeepSeek-V4 checkpoint key for module tensor {name}")
    i, rest = m[1], m[2]
    if rest in V4_LAYER:
        yield f"layers.{i}.{V4_LAYER[rest]}", tensor
    elif rest.startswith("self_attn."):
        yield f"layers.{i}.attn.{_v4_attn_to_checkpoint(rest.removeprefix('self_attn.'))}", tensor
    elif rest == "mlp.experts.gate_up_proj":
        gate, up = tensor.chunk(2, dim=1)
        for e in range(tensor.shape[0]):
            yield f"layers.{i}.ffn.experts.{e}.w1.weight", gate[e]
            yield f"layers.{i}.ffn.experts.{e}.w3.weight", up[e]
    elif rest == "mlp.experts.down_proj":
        for e in range(tensor.shape[0]):
            yield f"layers.{i}.ffn.experts.{e}.w2.weight", tensor[e]
    else:
        yield f"layers.{i}.ffn.{V4_FFN[rest.removeprefix('mlp.')]}", tensor


def _inverse(table: dict) -> dict:
    return {v: k for k, v in table.items()}


def v4_checkpoint_to_module(key: str) -> Target | None:
    """Where one V4 checkpoint tensor goes (release layout or transformers' saved one); None for the MTP module
    (`mtp.*`, not built) and for keys this model has no place for."""
    key = key.removeprefix("model.")
    key = {"embed_tokens.weight": "embed.weight", "hc_head.hc_fn": "hc_head_fn", "hc_head.hc_base": "hc_head_base",
           "hc_head.hc_scale": "hc_head_scale"}.get(key, key)  # transformers writes these under their module names
    top = _inverse(V4_TOP)
    if key in top:
        return Target(top[key])
    e = V4_EXPERT_KEY.match(key)
    if e:
        part = V4_EXPERT_PART[e["w"]]
        stack = "down_proj" if part == "down" else "gate_up_proj"
        return Target(f"model.layers.{e['i']}.mlp.experts.{stack}", int(e["e"]), part)
    m = re.match(r"^layers\.(\d+)\.(.*)$", key)
    if m is None:
        return None
    i, rest = m[1], m[2]
    prefix = f"model.layers.{i}."
    layer, ffn = _inverse(V4_LAYER), _inverse(V4_FFN)
    if rest in layer:
        return Target(prefix + layer[rest])
    if rest.startswith("ffn.") and rest.removeprefix("ffn.") in ffn:
        return Target(prefix + "mlp." + ffn[rest.removeprefix("ffn.")])
    if rest.startswith("attn."):
        a = rest.removeprefix("attn.")
        if a == "norm.weight":  # transformers' spelling of the release's kv_norm
            a = "kv_norm.weight"
        for table, from_, to in ((V4_INDEXER, "indexer.", "compressor.indexer."),
                                 (V4_COMPRESSOR, "compressor.", "compressor."), (V4_ATTN, "", "")):  # fmt: skip
            inv = _inverse(table)
            if a.startswith(from_) and a.removeprefix(from_) in inv:
                return Target(prefix + "self_attn." + to + inv[a.removeprefix(from_)])
    return None
