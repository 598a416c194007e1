"""The GRPO objective: group-normalised advantages, the clipped importance ratio, the k3 KL estimator, and
three ways to normalise the per-token terms.

Legend: P prompts, G completions per prompt, B = P*G sequences, T tokens (completion positions masked in).

For completion token t of sequence i with advantage A_i and ratio r = pi(o_t) / pi_old(o_t):

    objective_t = min(r * A_i, clip(r, 1 - eps_low, 1 + eps_high) * A_i) - beta * KL_t
    KL_t (k3)   = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (>= 0, unbiased for KL(pi || ref))

and loss = -normalise(objective) where normalise is
    "sequence": mean over each sequence's tokens, then over sequences        (GRPO, DeepSeekMath)
    "token":    sum over all tokens / number of tokens in the batch          (DAPO)
    "constant": sum over all tokens / (B * max_tokens)                         (Dr. GRPO: no length bias)

Advantages: A_i = (R_i - mean_group(R)) / (std_group(R) + eps), or without the std division (Dr. GRPO).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NORMS = ("sequence", "token", "constant")


def group_advantages(rewards_PG: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """(P, G) rewards -> (P, G) advantages: minus the group mean, divided by the group std (unbiased=False
    would differ; we use the sample std as DeepSeekMath/TRL do) when `scale`. A group whose rewards are all
    equal gets zero advantages (no learning signal)."""
    if rewards_PG.dim() != 2:
        raise ValueError(f"rewards must be (prompts, group) shaped, got {tuple(rewards_PG.shape)}")
    r = rewards_PG.float()
    centred = r - r.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    std = r.std(dim=1, keepdim=True) if r.shape[1] > 1 else torch.zeros_like(r[:, :1])
    return centred / (std + eps)


def k3_kl(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref) from log-probs of the sampled tokens (Schulman's estimator)."""
    log_ratio = ref_logp_BT - logp_BT
    return torch.exp(log_ratio) - log_ratio - 1.0


@dataclass
class GRPOLoss:
    loss: torch.Tensor  # scalar to minimise
    kl: float  # mean k3 KL per completion token (0 when no reference)
    clip_fraction: float  # share of completion tokens whose clipped term was active (no gradient)
    ratio_mean: float
    tokens: int


def grpo_loss(logp_BT: torch.Tensor, advantages_B: torch.Tensor, mask_BT: torch.Tensor,
              old_logp_BT: torch.Tensor | None = None, ref_logp_BT: torch.Tensor | None = None,
              beta: float = 0.0, clip_eps: float = 0.2, clip_eps_high: float | None = None,
              norm: str = "sequence") -> GRPOLoss:  # fmt: skip
    """The GRPO loss over completion tokens (mask_BT = 1). old_logp None = on-policy (ratio 1, gradient of
    logp * A); ref_logp None or beta 0 = no KL term (KL still logged when ref_logp is given)."""
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r}; allowed: {', '.join(NORMS)}")
    if logp_BT.shape != mask_BT.shape or advantages_B.shape != logp_BT.shape[:1]:
        raise ValueError(f"shapes: logp {tuple(logp_BT.shape)}, mask {tuple(mask_BT.shape)}, "
                         f"advantages {tuple(advantages_B.shape)} (want (B, T), (B, T), (B,))")  # fmt: skip
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    mask = mask_BT.to(logp_BT.dtype)
    old = logp_BT.detach() if old_logp_BT is None else old_logp_BT
    ratio_BT = torch.exp(logp_BT - old)
    adv_B1 = advantages_B.to(logp_BT.dtype)[:, None]
    unclipped = ratio_BT * adv_B1
    clipped = torch.clamp(ratio_BT, 1 - clip_eps, 1 + eps_high) * adv_B1
    objective_BT = torch.minimum(unclipped, clipped)
    kl_BT = k3_kl(logp_BT, ref_logp_BT) if ref_logp_BT is not None else torch.zeros_like(logp_BT)
    if beta > 0 and ref_logp_BT is not None:
        objective_BT = objective_BT - beta * kl_BT
    n_tokens = mask.sum()
    if norm == "sequence":
        per_seq = (objective_BT * mask).sum(1) / mask.sum(1).clamp(min=1)
        loss = -per_seq.mean()
    elif norm == "token":
        loss = -(objective_BT * mask).sum() / n_tokens.clamp(min=1)
    else:
        loss = -(objective_BT * mask).sum() / (mask.shape[0] * mask.shape[1])
    with torch.no_grad():
        active = ((ratio_BT < 1 - clip_eps) & (adv_B1 < 0)) | ((ratio_BT > 1 + eps_high) & (adv_B1 > 0))
        denom = float(n_tokens.clamp(min=1))
        stats = dict(kl=float((kl_BT * mask).sum()) / denom, clip_fraction=float((active * mask).sum()) / denom,
                     ratio_mean=float((ratio_BT * mask).sum()) / denom)  # fmt: skip
    return GRPOLoss(loss, tokens=int(n_tokens), **stats)


def token_logprobs(logits_BTV: torch.Tensor, input_ids_BT: torch.Tensor) -> torch.Tensor:
    """log pi(token_t | tokens_<t) for t = 1..T-1, placed at position t; position 0 gets 0. (B, T) fp32."""
    logp = torch.log_softmax(logits_BTV[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, input_ids_BT[:, 1:, None]).squeeze(-1)  # (B, T-1)
    return torch.cat((picked.new_zeros(picked.shape[0], 1), picked), dim=1)
