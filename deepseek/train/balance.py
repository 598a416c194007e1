"""DeepSeek-V3 load balancing for training: the auxiliary-loss-free bias update and the sequence-wise
auxiliary loss.

Legend: N tokens (B*T flattened), B sequences, T tokens per sequence, E routed experts, K experts per token.

- Bias update (DeepSeek-V3 sec. 2.1.2): after each optimizer step, every router's `e_score_correction_bias`
  moves by `gamma` towards balance: b_i += gamma * sign(mean_load - load_i). The bias only affects which
  experts are *selected*, never the combine weights, so it steers load without a gradient term.
- Sequence-wise auxiliary loss (eq. 17-20): per sequence, f_i = E / (K T) * #tokens routed to i and
  P_i = mean over tokens of the normalised score s_i / sum_j s_j; L = alpha * mean_b sum_i f_i P_i.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist

from ..model.moe import MoE, Routing, moe_layers


def moe_modules(model) -> list[MoE]:
    return [m for _, m in moe_layers(model)]


@contextmanager
def record_routing(model):
    """Within the block, the list holds each MoE forward's Routing, in order (for the sequence-wise loss)."""
    routings: list[Routing] = []
    handles = [m.observe(lambda moe, r: routings.append(r)) for m in moe_modules(model)]
    try:
        yield routings
    finally:
        for h in handles:
            h.remove()


class LoadTracker:
    """Counts tokens per expert for every MoE layer over all forwards since the last `reset` (so every
    micro-batch of an accumulated step counts), as a routing observer: no model change."""

    def __init__(self, model):
        self.layers = moe_modules(model)
        self.counts = [torch.zeros(m.experts.num_experts, dtype=torch.float64) for m in self.layers]
        self.handles = [m.observe(self._observer(i)) for i, m in enumerate(self.layers)]

    def _observer(self, i: int):
        def observe(module, routing: Routing):
            if not module.training:
                return
            flat = routing.idx_NK.reshape(-1)
            flat = flat[flat >= 0]  # -1 = empty slot (adaptive routing)
            counts = torch.bincount(flat, minlength=self.counts[i].numel()).to(torch.float64).cpu()
            self.counts[i] += counts

        return observe

    def reset(self) -> None:
        for c in self.counts:
            c.zero_()

    def global_counts(self) -> list[torch.Tensor]:
        """Per-layer (E,) token counts summed over ranks."""
        if not self.counts:
            return []
        stacked = torch.stack(self.counts)  # (L, E)
        if dist.is_available() and dist.is_initialized():
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            stacked = stacked.to(device)
            dist.all_reduce(stacked)
            stacked = stacked.cpu()
        return list(stacked)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def update_router_bias(layers: list[MoE], counts: list[torch.Tensor], gamma: float) -> dict:
    """b_i += gamma * sign(mean load - load_i) in every layer. Returns balance stats of the loads used:
    `max_violation` = mean over layers of (max load / mean load - 1), DeepSeek's MaxVio."""
    violations = []
    for layer, load_E in zip(layers, counts):
        if load_E.sum() == 0:
            continue
        mean = load_E.mean()
        violations.append(float(load_E.max() / mean - 1))
        bias = layer.gate.e_score_correction_bias  # None: a DeepSeek-V2 router (no bias to balance with)
        if gamma > 0 and bias is not None:
            bias += gamma * torch.sign(mean - load_E).to(bias.device, bias.dtype)
    return {"max_violation": sum(violations) / len(violations) if violations else 0.0}


def sequence_aux_loss(routings: list[Routing], batch: int, mask_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over MoE forwards (record_routing) of the sequence-wise balance loss sum_i f_i P_i (no alpha).

    `mask_BT` (1 = real token) keeps padding out of both f and P. A layer that saw fewer positions per
    sequence (an MTP depth sees T - k) uses the first ones of the mask."""
    losses = []
    for r in routings:
        idx_NK, scores_NE = r.idx_NK, r.scores_NE
        N, E = scores_NE.shape
        K = idx_NK.shape[1]
        T = N // batch
        idx_BTK = idx_NK.view(batch, T, K)
        probs_BTE = (scores_NE / scores_NE.sum(-1, keepdim=True).clamp_min(1e-20)).view(batch, T, E)
        hits_BTE = torch.zeros(batch, T, E + 1, device=scores_NE.device, dtype=scores_NE.dtype)
        hits_BTE.scatter_add_(2, idx_BTK.clamp_min(-1) % (E + 1), torch.ones_like(idx_BTK, dtype=scores_NE.dtype))
        hits_BTE = hits_BTE[..., :E]  # slot -1 maps to column E and is dropped
        mask = torch.ones(batch, T, device=scores_NE.device) if mask_BT is None else mask_BT[:, :T]
        m = mask.to(scores_NE.dtype)[..., None]
        n_tok_B = m.sum(1).clamp_min(1)  # (B, 1)
        f_BE = (hits_BTE * m).sum(1) * E / (K * n_tok_B)
        p_BE = (probs_BTE * m).sum(1) / n_tok_B
        losses.append((f_BE * p_BE).sum(-1).mean())
    if not losses:
        return torch.zeros(())
    return torch.stack(losses).mean()
