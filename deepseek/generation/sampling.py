"""Sampling one token per row from next-token logits.

Legend: B rows, V vocab.

Numerically safe for any temperature > 0 and top_p in (0, 1]: the work is done in fp32 on max-subtracted logits
(log space), a temperature too small to divide by is greedy (its limit), the nucleus always keeps the most likely
token, and a row whose distribution is degenerate (nothing finite left to sample) falls back to its argmax.
Logits that are NaN or +inf everywhere are not a distribution at all: `sample` raises ValueError for them.
"""

from __future__ import annotations

import torch

# Below this temperature, softmax(logits / T) is the argmax to fp32 precision for any logit gap > ~1e-3,
# and dividing by T can overflow fp32; the limit T -> 0 is greedy, so it is greedy.
MIN_TEMPERATURE = 1e-4


def sample(logits_BV: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
           generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """Greedy when temperature < MIN_TEMPERATURE, else temperature / top-k / nucleus sampling. (B,) token ids."""
    logits = logits_BV.float()
    bad = torch.isnan(logits) | (logits == float("inf"))
    if bad.all(-1).any():
        raise ValueError("the logits of a row are all NaN or +inf; there is no distribution to sample from")
    logits = logits.masked_fill(bad, float("-inf"))  # a stray NaN / +inf entry is never chosen
    greedy = logits.argmax(dim=-1)
    if not temperature >= MIN_TEMPERATURE:  # also catches NaN
        return greedy
    logp = logits - logits.max(dim=-1, keepdim=True).values  # <= 0, the max is exactly 0: no overflow below
    logp = logp / float(temperature)
    if top_k > 0:
        kth = logp.topk(min(top_k, logp.shape[-1]), dim=-1).values[:, -1:]
        logp = logp.masked_fill(logp < kth, float("-inf"))
    if top_p < 1.0:
        sorted_lp, order = logp.sort(dim=-1, descending=True)
        probs = sorted_lp.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix reaching top_p ...
        drop[:, 0] = False  # ... and always the most likely token (top_p may underflow to 0 in fp32)
        sorted_lp = sorted_lp.masked_fill(drop, float("-inf"))
        logp = torch.full_like(logp, float("-inf")).scatter(1, order, sorted_lp)
    probs = logp.softmax(dim=-1)
    ok = torch.isfinite(probs).all(-1) & (probs.sum(-1) > 0)
    if not bool(ok.all()):  # degenerate rows (e.g. every logit -inf): their argmax
        probs = torch.where(ok[:, None], probs, torch.nn.functional.one_hot(greedy, probs.shape[-1]).float())
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
