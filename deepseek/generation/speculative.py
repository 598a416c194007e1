"""MTP speculative decoding: the model's multi-token-prediction module drafts, the main model verifies.

Legend: B batch, T prompt tokens, D hidden, V vocab, p the position of the last accepted token.

    out = generate_speculative(model, ids_BT, max_new_tokens=64, eos_token_id=eos)
    out.sequences, out.new_tokens, out.stats["acceptance"]       # same GenerateOutput as generation.loop

State before a step: token x at position p is accepted but not yet in the main cache (which holds positions < p);
the MTP layer has read (h_{p-1}, x) into its own one-layer cache (also positions < p) and drafted d_1 for p + 1;
with draft_tokens K > 1 (the model's generation config says how many: generation/defaults.py) it is applied
again to its own hidden state for d_2 .. d_K. One step:

1. one main forward over [x, d_1 .. d_K] at positions p .. p + K: its logits l_{p+j} verify d_{j+1}, and the
   logits after the last kept draft are the next step's;
2. greedy: y_j = argmax l_{p+j}; a = the number of leading drafts with d_{j+1} == y_j (in every unfinished row).
   Emit y_0 .. y_a (the kept drafts, then the main model's own next token), roll the main cache back to
   p + a + 1 (the later latents belong to rejected drafts), and let the MTP read (h_{p+j}, y_j) for j <= a and
   draft again (its speculative positions are forgotten the same way).

A step costs one (K + 1)-token main forward plus K MTP-layer calls and emits 1 .. K + 1 tokens; the tokens are
the ones plain decoding (generation.loop) emits. A batch keeps one shared length: a draft is kept only when
every unfinished row accepts it (a row that agreed loses only its bonus token). Rollback is `LatentCache.crop`:
the cache is indexed by position, so forgetting positions is a length reset. Greedy only: sampling is refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..model.cache import LatentCache
from ..model.transformer import build_mask
from .defaults import mtp_draft_tokens
from .loop import GenerateOutput, _stop_ids, check_request
from .sampling import MIN_TEMPERATURE


def check_speculative(model, temperature: float = 0.0) -> None:
    """One-line errors before any work: no MTP layer in the checkpoint, or sampling asked for."""
    if len(model.mtp) == 0:
        raise ValueError("speculative decoding needs the checkpoint's MTP layer (num_nextn_predict_layers >= 1, "
                         "weights model.layers.{num_hidden_layers}.*); this model has none: decode without it")  # fmt: skip
    if temperature >= MIN_TEMPERATURE:  # below it sampling is greedy (sampling.py)
        raise ValueError("speculative decoding is greedy only (temperature 0); decode without it to sample")


def _main_forward(model, ids_BT, position_BT, mask_BS, cache):
    """(logits (B, T, V), pre-norm hidden (B, T, D)) for T new tokens; mask_BS covers cache + new (None: no pad)."""
    B, T = ids_BT.shape
    mask = None if mask_BS is None else build_mask(mask_BS, B, T, cache.get_seq_length(), ids_BT.device)
    out = model.model(input_ids=ids_BT, position_ids=position_BT, cache=cache, mask=mask)
    return model.lm_head(out.last_hidden_state), out.hidden_states[0]


@torch.inference_mode()
def generate_speculative(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    on_token: Callable[[int, torch.Tensor], bool | None] | None = None,
    draft_tokens: int | None = None,
    **unsupported,
) -> GenerateOutput:
    """Greedy generation with MTP drafts; same arguments and output as generation.loop.generate, plus
    out.stats = {"steps", "drafted", "accepted", "acceptance"} (main forwards after prefill, drafts verified,
    drafts kept, their ratio). on_token(step, tokens_B) is called once per emitted token.
    draft_tokens: drafts per step (default: the model's generation config, generation/defaults.py); beyond the
    first the MTP layer is applied again to its own hidden state."""
    check_speculative(model, temperature)
    draft_tokens = mtp_draft_tokens(model) if draft_tokens is None else draft_tokens
    given = sorted(k for k, v in unsupported.items() if v is not None)
    if given:
        raise ValueError(f"speculative decoding does not take {given} (a static cache, unchunked text prompts, no "
                         "grammar); decode without use_mtp")  # fmt: skip
    check_request(model, input_ids, max_new_tokens)
    if draft_tokens < 1:
        raise ValueError(f"draft_tokens must be >= 1, got {draft_tokens}")
    B, T = input_ids.shape
    K = draft_tokens
    device = input_ids.device
    S_max = T + max_new_tokens + K  # the verify forward writes the drafts' latents before they are checked
    padded = attention_mask is not None and not bool(attention_mask.all())
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long, device=device)
    position_BT = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    # slot s of either cache: the prompt's mask, then real tokens; mask(L) covers slots < L (None: no padding)
    full_mask_BS = torch.cat(
        (attention_mask.long(), attention_mask.new_ones(B, S_max - T, dtype=torch.long)), 1
    )

    def mask(L: int):
        return full_mask_BS[:, :L] if padded else None

    eos = _stop_ids(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else min(eos, default=0)
    dtype = next(model.parameters()).dtype
    cache = LatentCache(model.config, B, S_max, device=device, dtype=dtype)
    mtp_cache = LatentCache(model.config, B, S_max, device=device, dtype=dtype, layers=1)

    new_tokens: list[list[int]] = [[] for _ in range(B)]
    finish = ["length"] * B
    done = torch.zeros(B, dtype=torch.bool, device=device)
    tokens_out: list[torch.Tensor] = []
    stats = {"steps": 0, "drafted": 0, "accepted": 0}

    def emit(token_B: torch.Tensor) -> bool:
        """Record one token per row; True when generation is over (all stopped, the limit, or cancelled)."""
        nonlocal done, finish
        token_B = token_B.masked_fill(done, pad)
        tokens_out.append(token_B)
        for b, t in enumerate(token_B.tolist()):
            if not done[b]:
                new_tokens[b].append(t)
                if t in eos:
                    finish[b] = "stop"
        if eos:
            done = done | torch.tensor([f == "stop" for f in finish], device=device)
        if on_token is not None and on_token(len(tokens_out) - 1, token_B):
            finish = [f if f == "stop" else "cancelled" for f in finish]
            return True
        return bool(done.all()) or len(tokens_out) == max_new_tokens

    def draft(h_BTD, next_BT, pos_BT) -> torch.Tensor:
        """The MTP reads T real positions (h_i, t_{i+1}), then drafts K tokens (B, K): the first from those,
        each further one from the MTP's own hidden at one more (speculative, later forgotten) position."""
        real = mtp_cache.get_seq_length() + next_BT.shape[1]
        drafts = []
        for _ in range(K):
            L = mtp_cache.get_seq_length() + next_BT.shape[1]
            cos, sin = model.model.rotary_emb(pos_BT, h_BTD.dtype)
            m = None if not padded else build_mask(mask(L), B, next_BT.shape[1], L - next_BT.shape[1], device)
            logits_BTV, g_BTD = model.mtp[0](h_BTD, next_BT, cos, sin, m, mtp_cache)
            drafts.append(logits_BTV[:, -1].argmax(-1))
            h_BTD, next_BT, pos_BT = g_BTD[:, -1:], drafts[-1][:, None], pos_BT[:, -1:] + 1
        mtp_cache.crop(real)
        return torch.stack(drafts, 1)

    t0 = time.perf_counter()
    logits_BTV, h_BTD = _main_forward(model, input_ids, position_BT, mask(T), cache)
    x_B = logits_BTV[:, -1].argmax(-1)
    t1 = time.perf_counter()
    over = max_new_tokens == 0 or emit(x_B)
    if not over:  # the MTP reads the prompt: (h_i, t_{i+1}) for i < T, the last t_{i+1} being x
        d_BK = draft(h_BTD, torch.cat((input_ids[:, 1:], x_B[:, None]), 1), position_BT)
    p_B = position_BT[:, -1] + 1  # position of x
    steps = torch.arange(K + 1, device=device)
    while not over:
        S = cache.get_seq_length()
        pos_BK1 = p_B[:, None] + steps
        logits_BK1V, h_BK1D = _main_forward(
            model, torch.cat((x_B[:, None], d_BK), 1), pos_BK1, mask(S + K + 1), cache
        )
        y_BK1 = logits_BK1V.argmax(-1)
        match_BK = (y_BK1[:, :K] == d_BK) | done[:, None]
        a = int(match_BK.all(0).long().cumprod(0).sum())  # drafts every unfinished row accepts
        stats["steps"] += 1
        stats["drafted"] += K
        stats["accepted"] += a
        for j in range(a + 1):  # the kept drafts (= the main model's tokens), then its token after them
            over = emit(y_BK1[:, j])
            if over:
                break
        if over:
            break
        cache.crop(S + a + 1)
        x_B, p_B = y_BK1[:, a], p_B + a + 1
        d_BK = draft(h_BK1D[:, : a + 1], y_BK1[:, : a + 1], pos_BK1[:, : a + 1])
    cache.crop(T + max(len(tokens_out) - 1, 0))  # as plain decoding leaves it: every token but the last one read
    t2 = time.perf_counter()
    stats["acceptance"] = stats["accepted"] / stats["drafted"] if stats["drafted"] else 0.0
    gen = torch.stack(tokens_out, dim=1) if tokens_out else input_ids.new_zeros(B, 0)
    return GenerateOutput(
        torch.cat((input_ids, gen), dim=1), new_tokens, finish, t1 - t0, t2 - t1, cache, stats
    )
