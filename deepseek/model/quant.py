"""Int8 weight-only quantisation: per-output-channel symmetric int8 weights, activations stay fp32/bf16.

`quantize_int8(model)` swaps every nn.Linear (attention projections except kv_b_proj, which the absorbed MLA
form folds into its einsums; dense MLPs, shared experts, lm_head) for Int8Linear, and stores the stacked routed experts as int8 with per-row scales, dequantising only the experts a
step uses. Weight memory drops ~4x from fp32. `Int8Linear.reference` is the plain dequantise-then-matmul path
the fused kernel (`torch._weight_int8pack_mm`) is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .moe import Experts, experts_grouped


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., out, in) float -> int8 weights and (..., out) scales with w ~= q * scale."""
    scale = w.abs().amax(dim=-1).clamp(min=1e-12) / 127.0
    q = (w / scale[..., None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale.float()


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, scale = quantize_rows(linear.weight.detach().float())
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.device.type == "cpu" or x2.is_cuda:
            y = torch._weight_int8pack_mm(x2, self.weight_int8, self.scale.to(x2.dtype))
        else:
            y = self.reference(x2)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, (self.weight_int8.float() * self.scale[:, None]).to(x.dtype))


class Int8Experts(nn.Module):
    def __init__(self, experts: Experts):
        super().__init__()
        self.num_experts = experts.num_experts
        gu_q, gu_s = quantize_rows(experts.gate_up_proj.detach().float())
        dn_q, dn_s = quantize_rows(experts.down_proj.detach().float())
        self.register_buffer("gate_up_int8", gu_q)
        self.register_buffer("gate_up_scale", gu_s)
        self.register_buffer("down_int8", dn_q)
        self.register_buffer("down_scale", dn_s)

    def forward(self, x_ND, idx_NK, weights_NK):
        used = torch.unique(idx_NK[idx_NK >= 0])
        remap = torch.full((self.num_experts + 1,), -1, dtype=idx_NK.dtype, device=idx_NK.device)
        remap[used] = torch.arange(used.numel(), device=idx_NK.device, dtype=idx_NK.dtype)
        local = remap[idx_NK]  # -1 stays -1 (it indexes the extra last entry)
        gu = (self.gate_up_int8[used].to(x_ND.dtype) * self.gate_up_scale[used, :, None].to(x_ND.dtype))
        dn = (self.down_int8[used].to(x_ND.dtype) * self.down_scale[used, :, None].to(x_ND.dtype))
        return experts_grouped(x_ND, local, weights_NK, gu, dn)


def quantize_int8(model: nn.Module) -> nn.Module:
    """In place: nn.Linear -> Int8Linear, every Experts -> Int8Experts (routers stay fp32), in the language
    model (backbone, lm_head, MTP); other components (e.g. the SDK's multimodal encoders) stay as they are."""
    model.lm_head = Int8Linear(model.lm_head)
    for module in [m for part in (model.model, model.mtp) for m in part.modules()]:
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name != "kv_b_proj":  # absorbed MLA reads its weight
                setattr(module, child_name, Int8Linear(child))
            elif isinstance(child, Experts):
                setattr(module, child_name, Int8Experts(child))
    model.config.weight_quantization = "int8"
    return model
