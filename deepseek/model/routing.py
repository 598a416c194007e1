"""Entropy-adaptive expert routing: each token activates as many routed experts as its uncertainty needs.

Legend: N tokens, E routed experts, K = k_max candidate slots, L MoE layers.

A token's k (R1Config.routing.mode):
  candidates_NK  the plain router's own top-k_max choice (sigmoid/softmax scores, selection-only bias, group
                 limit), ordered by the biased selection score, so keeping the first m candidates is exactly the
                 plain router at top-m.
  q_NK           the candidates' unbiased scores renormalised to sum to 1: the token's routing distribution.
  "entropy"      k = clamp(ceil(threshold * exp(H(q))), k_min, k_max). exp(H) is the effective number of experts
                 (1 for a one-hot q, K for a uniform one); the threshold scales it (default 1.0).
  "top_p"        k = the fewest candidates whose mass reaches threshold (published top-p routing, kept as a peer).
Unused slots get expert id -1 and weight 0; the grouped expert kernel skips them, so compute follows k. With
norm_topk_prob the kept weights are renormalised over the kept experts, as the plain router does for its k.

The threshold is one float per MoE layer: from the config (routing_threshold, or routing_layer_thresholds as
written by `export_thresholds`), held by a controller in training when routing_target_k is set
(log threshold += rate * (target - batch mean k)), or set exactly for a checkpoint by `calibrate`
(training-free mode). In eval mode a token's k depends on that token only (no batch coupling).

Regulariser (routing_entropy_weight): weight * mean normalised H(q), its gradient injected into the backward
pass by `AddAuxiliaryLoss`, so any training loop applies it. It keeps the router from drifting towards
uniform scores, which would hand every token k_max experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields

import torch
from torch import nn

from .config import RoutingConfig
from .moe import MoE, Routing, moe_layers

__all__ = ["AdaptiveRouting", "RoutingStats", "adaptive_routers", "adaptive_routing", "calibrate", "moe_layers",
           "routed_flops_per_token", "set_routing", "stop_tracking", "summarize", "track_routing"]  # fmt: skip

DEFAULT_THRESHOLD = {"entropy": 1.0, "top_p": 0.9}
EPS = 1e-4  # keeps exp(H) of an exactly one-hot q from rounding up to 2


class AddAuxiliaryLoss(torch.autograd.Function):
    """Identity on x; in the backward pass `loss` receives gradient 1, so its gradient joins the model's."""

    @staticmethod
    def forward(ctx, x, loss):
        ctx.loss_shape, ctx.loss_dtype = loss.shape, loss.dtype
        return x.clone()

    @staticmethod
    def backward(ctx, grad_x):
        return grad_x, torch.ones(ctx.loss_shape, dtype=ctx.loss_dtype, device=grad_x.device)


def entropy(q_NK: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each row of a distribution, 0 * log 0 = 0."""
    return -(q_NK * q_NK.clamp_min(1e-20).log()).sum(-1)


def k_from_entropy(h_N: torch.Tensor, threshold: float, k_min: int, k_max: int) -> torch.Tensor:
    return torch.ceil(threshold * h_N.exp() - EPS).long().clamp(k_min, k_max)


def k_from_mass(q_NK: torch.Tensor, threshold: float, k_min: int, k_max: int) -> torch.Tensor:
    before = q_NK.cumsum(-1) - q_NK  # mass of the earlier candidates
    return (before < threshold - 1e-6).sum(-1).clamp(k_min, k_max)


def adaptive_routing(config) -> AdaptiveRouting | None:
    """The routing policy the config asks for: None for plain top-k, else a variable-k AdaptiveRouting."""
    return None if config.routing.mode == "topk" else AdaptiveRouting(config)


class AdaptiveRouting(nn.Module):
    """Variable-k selection for one Router. Holds no tensors: checkpoints are unchanged by the mode."""

    def __init__(self, config):
        super().__init__()
        config.validate_components()
        self.mode = config.routing.mode
        self.k_min, self.k_max = config.routing.k_min, config.routing.k_max
        self.target_k = config.routing.target_k
        self.rate = float(config.routing.controller_rate)
        self.entropy_weight = float(config.routing.entropy_weight)
        t = config.routing.threshold
        self.threshold = float(t if t is not None else DEFAULT_THRESHOLD[self.mode])
        self.calibrating = False
        self.last_k = None  # (N,) experts per token of the last forward
        self.last_entropy = None  # (N,) normalised entropy of the last forward
        self.last_regulariser = None

    def extra_repr(self) -> str:
        return f"mode={self.mode}, k={self.k_min}..{self.k_max}, threshold={self.threshold:.4g}, target={self.target_k}"

    def k_for(self, q_NK, h_N, threshold: float) -> torch.Tensor:
        if self.mode == "entropy":
            return k_from_entropy(h_N, threshold, self.k_min, self.k_max)
        return k_from_mass(q_NK, threshold, self.k_min, self.k_max)

    def solve_threshold(self, q_NK, h_N, target: float) -> float:
        """The largest threshold whose mean k over these tokens is <= target (bisection; k grows with it)."""
        lo, hi = (1e-4, float(self.k_max) + 1.0) if self.mode == "entropy" else (1e-6, 1.0)
        if self.k_for(q_NK, h_N, hi).float().mean() <= target:
            return hi
        for _ in range(50):
            mid = math.sqrt(lo * hi) if self.mode == "entropy" else 0.5 * (lo + hi)
            if self.k_for(q_NK, h_N, mid).float().mean() <= target:
                lo = mid
            else:
                hi = mid
        return lo

    def step_controller(self, mean_k: float) -> None:
        error = self.target_k - mean_k
        if self.mode == "entropy":
            self.threshold = float(min(max(self.threshold * math.exp(self.rate * error), 1e-4), self.k_max + 1.0))
        else:  # move the mass threshold in logit space so it stays inside (0, 1)
            p = min(max(self.threshold, 1e-6), 1 - 1e-6)
            logit = math.log(p / (1 - p)) + self.rate * error
            self.threshold = 1.0 / (1.0 + math.exp(-logit))

    def forward(self, router, scores_NE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        K = self.k_max
        cand_NK, _ = router.select(scores_NE, K)
        choice_NK = scores_NE.gather(1, cand_NK)
        if router.topk_method == "noaux_tc":
            choice_NK = choice_NK + router.e_score_correction_bias[cand_NK]
        order = choice_NK.argsort(dim=-1, descending=True, stable=True)
        cand_NK = cand_NK.gather(1, order)
        s_NK = scores_NE.gather(1, cand_NK)  # differentiable: the router's gradient path
        q_NK = s_NK / s_NK.sum(-1, keepdim=True).clamp_min(1e-20)
        h_N = entropy(q_NK)
        with torch.no_grad():
            qd, hd = q_NK.detach(), h_N.detach()
            if self.calibrating and self.target_k is not None:
                self.threshold = self.solve_threshold(qd, hd, float(self.target_k))
            k_N = self.k_for(qd, hd, self.threshold)
            if self.training and self.target_k is not None and self.rate > 0 and k_N.numel():
                self.step_controller(float(k_N.float().mean()))
        keep_NK = torch.arange(K, device=k_N.device) < k_N[:, None]
        w_NK = s_NK * keep_NK
        if router.norm_topk_prob:
            w_NK = w_NK / (w_NK.sum(dim=-1, keepdim=True) + 1e-20)
        w_NK = w_NK * router.routed_scaling_factor
        h_norm_N = h_N / math.log(K) if K > 1 else h_N * 0
        self.last_k, self.last_entropy = k_N, h_norm_N.detach()
        if self.training and self.entropy_weight > 0 and torch.is_grad_enabled():
            reg = self.entropy_weight * h_norm_N.mean()
            self.last_regulariser = reg.detach()
            w_NK = AddAuxiliaryLoss.apply(w_NK, reg)
        return cand_NK.masked_fill(~keep_NK, -1), w_NK


# ---------------------------------------------------------------------------------------------- statistics
@dataclass
class RoutingStats:
    """Accumulated over forwards: experts-per-token histogram, per-expert load, routing entropy."""

    num_experts: int
    k_max: int
    tokens: int = 0
    k_hist: torch.Tensor = field(default=None)
    load: torch.Tensor = field(default=None)
    entropy_sum: float = 0.0
    entropy_tokens: int = 0

    def __post_init__(self):
        self.k_hist = torch.zeros(self.k_max + 1, dtype=torch.long)
        self.load = torch.zeros(self.num_experts, dtype=torch.long)

    def __call__(self, moe: MoE, routing: Routing) -> None:  # a MoE observer
        self.update(routing.idx_NK, routing.entropy_N)

    def update(self, idx_NK: torch.Tensor, entropy_N: torch.Tensor | None = None) -> None:
        idx = idx_NK.detach().cpu()
        valid = idx >= 0
        self.tokens += idx.shape[0]
        self.k_hist += torch.bincount(valid.sum(1), minlength=self.k_max + 1)[: self.k_max + 1]
        self.load += torch.bincount(idx[valid], minlength=self.num_experts)
        if entropy_N is not None:
            self.entropy_sum += float(entropy_N.sum())
            self.entropy_tokens += entropy_N.numel()

    @property
    def avg_k(self) -> float:
        return float((self.k_hist * torch.arange(self.k_max + 1)).sum()) / max(self.tokens, 1)

    @property
    def max_vio(self) -> float:
        """MaxVio (DeepSeek-V3): (max expert load - mean load) / mean load."""
        mean = self.load.float().mean()
        return float((self.load.max() - mean) / mean) if mean > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "avg_k": round(self.avg_k, 4),
            "k_hist": self.k_hist.tolist(),
            "max_vio": round(self.max_vio, 4),
            "entropy": round(self.entropy_sum / self.entropy_tokens, 4) if self.entropy_tokens else None,
        }


def track_routing(model) -> dict[str, RoutingStats]:
    """Attach fresh statistics to every MoE layer (as observers); they accumulate until `stop_tracking`."""
    stop_tracking(model)
    stats = {}
    for name, moe in moe_layers(model):
        k_max = moe.gate.adaptive.k_max if moe.gate.adaptive is not None else moe.gate.top_k
        stats[name] = RoutingStats(moe.experts.num_experts, k_max)
        moe.observe(stats[name])
    return stats


def stop_tracking(model) -> None:
    for _, moe in moe_layers(model):
        for key, fn in list(moe.observers.items()):
            if isinstance(fn, RoutingStats):
                del moe.observers[key]


def summarize(stats: dict[str, RoutingStats]) -> dict:
    """Mean over layers of avg k and MaxVio, the summed k histogram, and the per-layer dicts."""
    layers = {name: s.as_dict() for name, s in stats.items()}
    n = max(len(stats), 1)
    hist = torch.stack([s.k_hist for s in stats.values()]).sum(0).tolist() if stats else []
    return {
        "avg_k": round(sum(s.avg_k for s in stats.values()) / n, 4),
        "max_vio": round(sum(s.max_vio for s in stats.values()) / n, 4),
        "k_hist": hist,
        "layers": layers,
    }


def routed_flops_per_token(config, avg_k_per_layer: list[float]) -> float:
    """Routed-expert FLOPs per token: each expert is a SwiGLU of three D x I matmuls (2 FLOPs per MAC)."""
    return sum(2 * 3 * config.hidden_size * config.moe_intermediate_size * k for k in avg_k_per_layer)


# ---------------------------------------------------------------------------------------------- switching
def set_routing(model, mode: str, top_k: int | None = None, **fields) -> None:
    """Switch a built model's routing in place (training-free): mode "topk" (optionally with another top_k),
    "entropy" or "top_p" with any routing_* field given without its prefix (k_min=1, threshold=1.0, ...).
    The config is updated and validated first, so a bad value fails before anything changes."""
    config = model.config
    if top_k is not None and mode != "topk":
        raise ValueError("set_routing: top_k applies to mode='topk'; use k_min/k_max for adaptive modes")
    unknown = sorted(set(fields) - {f.name for f in dataclass_fields(RoutingConfig)})
    if unknown:
        raise ValueError(f"set_routing: unknown routing field(s) {', '.join(f'routing_{k}' for k in unknown)}")
    updates = {"routing_mode": mode, **{f"routing_{k}": v for k, v in fields.items()}}
    if top_k is not None:
        updates["num_experts_per_tok"] = top_k
    config.set_components(**updates)
    for _, moe in moe_layers(model):
        moe.gate.top_k = config.num_experts_per_tok
        moe.gate.adaptive = None if mode == "topk" else AdaptiveRouting(config).train(model.training)
    if mode != "topk":
        apply_thresholds(model)


def adaptive_routers(model) -> list[AdaptiveRouting]:
    return [moe.gate.adaptive for _, moe in moe_layers(model) if moe.gate.adaptive is not None]


def export_thresholds(model) -> list[float]:
    """Write every layer's threshold into config.routing.layer_thresholds (saved with the checkpoint)."""
    values = [r.threshold for r in adaptive_routers(model)]
    model.config.routing.layer_thresholds = values
    return values


def apply_thresholds(model) -> None:
    """Load config.routing.layer_thresholds into the layers (call after from_pretrained of a calibrated or
    entropy-trained checkpoint)."""
    values = model.config.routing.layer_thresholds
    routers = adaptive_routers(model)
    if values is None:
        return
    if len(values) != len(routers):
        raise ValueError(f"routing_layer_thresholds has {len(values)} values for {len(routers)} adaptive MoE layers")
    for r, v in zip(routers, values):
        r.threshold = float(v)


@torch.no_grad()
def calibrate(model, input_ids: torch.Tensor, target_k: float, attention_mask=None) -> list[float]:
    """Training-free: set each layer's threshold so that its mean k on these tokens is the largest value
    <= target_k. One forward pass; layer l is solved on the activations produced by the already-calibrated
    layers below it. Returns the thresholds (also written to config.routing.layer_thresholds)."""
    routers = adaptive_routers(model)
    if not routers:
        raise ValueError("calibrate: the model has no adaptive routing; call set_routing(model, 'entropy') first")
    lo, hi = model.config.routing.k_min, model.config.routing.k_max
    if not lo <= target_k <= hi:
        raise ValueError(f"calibrate: target_k={target_k} must be in routing_k_min..routing.k_max ({lo}..{hi})")
    saved = [(r.target_k, r.calibrating) for r in routers]
    for r in routers:
        r.target_k, r.calibrating = float(target_k), True
    try:
        model.model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for r, (t, c) in zip(routers, saved):
            r.target_k, r.calibrating = t, c
    return export_thresholds(model)
