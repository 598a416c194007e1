"""DeepSeekMoE: fine-grained routed experts plus shared experts.

Legend: N tokens (flattened B*T), D hidden, E routed experts, K experts per token, I moe_intermediate_size,
A expert assignments (N*K minus any empty slots), G expert groups.

Routing (DeepSeek-V3): sigmoid scores; `e_score_correction_bias` is added for *selection only*; experts are
chosen inside the `topk_group` best groups (a group scores the sum of its top-2 biased scores); the chosen
experts' unbiased scores are normalised and scaled by routed_scaling_factor.

Expert execution: assignments are sorted by expert and run as two grouped matmuls (`torch._grouped_mm`),
no Python loop over experts; `experts_reference` is the plain per-expert loop kept as the oracle. A slot whose
expert index is -1 is skipped, so a variable number of experts per token costs only what it uses.

Under torch.compile (the compiled decode step, deepseek/generation/compiled.py, or a user's own
torch.compile of the model): with no more assignments than experts (one-token decode at small batch)
`experts_gathered` indexes the chosen experts' matrices and runs two batched matrix-vector products, which the
compiler fuses (in eager mode the copies cost more than the grouped matmul saves); otherwise the grouped path
runs as the custom op `deepseek::grouped_experts` (torch._grouped_mm has no fp32 CPU meta kernel for the
compiler to trace; the op declares its output shape).

Adaptive routing (R1Config.routing.mode "entropy" / "top_p", deepseek/model/routing.py) replaces `select` by a
variable-k choice when the Router is built with an `adaptive` policy; without one the plain path runs unchanged.

Observers: `moe.observe(fn)` calls fn(moe, Routing) after each forward's routing (training losses, load counts,
statistics read it there); nothing is stored on the module between forwards.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from .norm import MLP


@dataclass
class Routing:
    """One MoE forward's routing, as observers receive it."""

    idx_NK: torch.Tensor  # chosen experts per token, -1 = an empty slot (adaptive routing)
    scores_NE: torch.Tensor  # router scores, fp32, differentiable in training
    entropy_N: torch.Tensor | None = None  # normalised routing entropy (adaptive routing only)


class Router(nn.Module):
    def __init__(self, config, adaptive: nn.Module | None = None):
        super().__init__()
        E = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.topk_method = config.topk_method
        self.scoring_func = config.scoring_func
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(E, config.hidden_size, dtype=torch.float32))
        # DeepSeek-V3's selection-only bias (noaux_tc); DeepSeek-V2's greedy methods have none (no checkpoint key)
        bias = torch.zeros(E, dtype=torch.float32) if self.topk_method == "noaux_tc" else None
        self.register_buffer("e_score_correction_bias", bias)
        self.adaptive = adaptive  # routing.AdaptiveRouting (variable k) or None (plain top-k)

    def scores(self, x_ND: torch.Tensor) -> torch.Tensor:
        """Routing scores (N, E) in fp32."""
        logits = F.linear(x_ND.float(), self.weight.float())
        return logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)

    def select(self, scores_NE: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert ids (N, k) and their combine weights (N, k) from routing scores."""
        k = self.top_k if k is None else k
        choice = scores_NE + self.e_score_correction_bias if self.topk_method == "noaux_tc" else scores_NE
        if self.n_group > 1 and self.topk_group < self.n_group:
            N, E = choice.shape
            grouped = choice.view(N, self.n_group, E // self.n_group)
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(min(2, E // self.n_group), dim=-1).values.sum(-1)  # (N, G)
            else:
                group_scores = grouped.amax(dim=-1)
            group_idx = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
            choice = choice.masked_fill(~keep.repeat_interleave(E // self.n_group, dim=1), float("-inf"))
        idx_NK = choice.topk(k, dim=-1, sorted=False).indices
        weights_NK = scores_NE.gather(1, idx_NK)
        if self.norm_topk_prob:
            weights_NK = weights_NK / (weights_NK.sum(dim=-1, keepdim=True) + 1e-20)
        return idx_NK, weights_NK * self.routed_scaling_factor

    def forward(self, x_ND: torch.Tensor):
        scores = self.scores(x_ND)
        if self.adaptive is not None:
            idx, weights = self.adaptive(self, scores)  # variable k: unused slots are expert -1
        else:
            idx, weights = self.select(scores)
        return idx, weights, scores


class Experts(nn.Module):
    """E SwiGLU experts stored stacked: gate_up_proj (E, 2I, D), down_proj (E, D, I)."""

    def __init__(self, config):
        super().__init__()
        E, D, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))

    def forward(self, x_ND: torch.Tensor, idx_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
        E, F2, D = self.gate_up_proj.shape
        if torch.compiler.is_compiling():
            if idx_NK.numel() <= E:
                return experts_gathered(x_ND, idx_NK, weights_NK, self.gate_up_proj, self.down_proj)
            return grouped_experts(x_ND, idx_NK, weights_NK, self.gate_up_proj, self.down_proj)
        if has_grouped_kernel(x_ND.device.type, x_ND.dtype, (D, F2 // 2)):
            return experts_grouped(x_ND, idx_NK, weights_NK, self.gate_up_proj, self.down_proj)
        return experts_reference(x_ND, idx_NK, weights_NK, self.gate_up_proj, self.down_proj)


@cache
def has_grouped_kernel(device_type: str, dtype: torch.dtype, dims: tuple[int, ...]) -> bool:
    """Whether torch._grouped_mm runs for this device and dtype: fp32 on CPU; bf16 / fp16 (CPU, or CUDA from
    compute capability 9.0) when every row is a multiple of 16 bytes. Decided once per combination."""
    size = torch.tensor([], dtype=dtype).element_size()
    aligned = all(d * size % 16 == 0 for d in dims)
    if device_type == "cpu":
        return dtype == torch.float32 or (dtype in (torch.bfloat16, torch.float16) and aligned)
    if device_type == "cuda":
        return dtype == torch.bfloat16 and aligned and torch.cuda.get_device_capability() >= (9, 0)
    return False


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    if t.requires_grad:
        t.register_hook(lambda g: g.contiguous())
    return t


def experts_grouped(x_ND, idx_NK, weights_NK, gate_up_EFD, down_EDI):
    N, K = idx_NK.shape
    E = gate_up_EFD.shape[0]
    flat = idx_NK.reshape(-1)
    valid = flat >= 0
    order_A = torch.argsort(torch.where(valid, flat, E), stable=True)
    n_valid = int(valid.sum())
    order_A = order_A[:n_valid]
    token_A = order_A // K
    counts_E = torch.bincount(flat[order_A], minlength=E)
    offs_E = counts_E.cumsum(0).to(torch.int32)
    x_AD = x_ND[token_A]
    h_AF = _contiguous_grad(torch._grouped_mm(x_AD, gate_up_EFD.transpose(1, 2), offs=offs_E))
    gate, up = h_AF.chunk(2, dim=-1)
    h_AI = F.silu(gate) * up
    y_AD = _contiguous_grad(torch._grouped_mm(h_AI, down_EDI.transpose(1, 2), offs=offs_E))
    y_AD = y_AD * weights_NK.reshape(-1)[order_A, None].to(y_AD.dtype)
    return torch.zeros_like(x_ND).index_add_(0, token_A, y_AD)


def experts_gathered(x_ND, idx_NK, weights_NK, gate_up_EFD, down_EDI):
    """Few assignments: copy the A chosen experts' matrices and run them as batched matrix-vector products."""
    N, K = idx_NK.shape
    flat_A = idx_NK.reshape(-1)
    expert_A = flat_A.clamp(min=0)  # an empty slot (-1) computes expert 0 with weight 0
    x_AD = x_ND.repeat_interleave(K, dim=0)
    h_AF = torch.bmm(gate_up_EFD[expert_A], x_AD[:, :, None])[..., 0]  # (A, 2I)
    gate, up = h_AF.chunk(2, dim=-1)
    y_AD = torch.bmm(down_EDI[expert_A], (F.silu(gate) * up)[:, :, None])[..., 0]
    w_A = torch.where(flat_A >= 0, weights_NK.reshape(-1), 0.0).to(y_AD.dtype)
    return (y_AD * w_A[:, None]).view(N, K, -1).sum(dim=1)


@torch.library.custom_op("deepseek::grouped_experts", mutates_args=())
def grouped_experts(x_ND: torch.Tensor, idx_NK: torch.Tensor, weights_NK: torch.Tensor, gate_up_EFD: torch.Tensor,
                    down_EDI: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """`experts_grouped` as one opaque op for torch.compile (inference only: no autograd formula)."""
    return experts_grouped(x_ND, idx_NK, weights_NK, gate_up_EFD, down_EDI)


@grouped_experts.register_fake
def _(x_ND, idx_NK, weights_NK, gate_up_EFD, down_EDI):
    return torch.empty_like(x_ND)


def experts_reference(x_ND, idx_NK, weights_NK, gate_up_EFD, down_EDI):
    """The plain loop over experts: the oracle for `experts_grouped`."""
    out = torch.zeros_like(x_ND)
    for e in range(gate_up_EFD.shape[0]):
        token, slot = torch.where(idx_NK == e)
        if token.numel() == 0:
            continue
        gate, up = F.linear(x_ND[token], gate_up_EFD[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down_EDI[e]) * weights_NK[token, slot, None].to(x_ND.dtype)
        out.index_add_(0, token, y)
    return out


class MoE(nn.Module):
    def __init__(self, config, adaptive: nn.Module | None = None):
        super().__init__()
        self.gate = Router(config, adaptive)
        self.experts = Experts(config)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )
        self.observers: OrderedDict[int, Callable[[MoE, Routing], None]] = OrderedDict()  # weakref-able

    def observe(self, fn: Callable[[MoE, Routing], None]) -> RemovableHandle:
        """Call fn(self, Routing) after every forward's routing; `.remove()` on the handle stops it."""
        handle = RemovableHandle(self.observers)
        self.observers[handle.id] = fn
        return handle

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        shape = x_BTD.shape
        x_ND = x_BTD.reshape(-1, shape[-1])
        idx, weights, scores = self.gate(x_ND)
        if self.observers:
            adaptive = self.gate.adaptive
            routing = Routing(idx, scores, adaptive.last_entropy if adaptive is not None else None)
            for fn in list(self.observers.values()):
                fn(self, routing)
        out = self.experts(x_ND, idx, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x_ND)
        return out.view(shape)


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """Every MoE layer of a model, with its module name, in order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
