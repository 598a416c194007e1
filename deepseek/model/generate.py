"""Fast batched generation on the static latent cache: prefill, decode_one_token, generate.

Legend: B batch, T prompt tokens, S cached positions, V vocab.

Prompts are left-padded; positions count real tokens only (as transformers' generate does). Decode steps use
the absorbed MLA form, so each step reads the C + R latent per cached position and the active experts only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..generation.sampling import sample
from .cache import LatentCache


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # (B, T + n): prompt (left-padded) followed by the generated tokens
    new_tokens: list[list[int]]  # per row, generated tokens up to and including the stop token
    finish_reasons: list[str]  # "stop" (eos) or "length"
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stats: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_second(self) -> float:
        n = sum(len(t) for t in self.new_tokens)
        return n / self.decode_seconds if self.decode_seconds > 0 else float("inf")


def prefill(model, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
    """Run the prompt through the model, filling the cache. Returns last-position logits (B, V)."""
    out = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache)
    return model.lm_head(out.last_hidden_state[:, -1])


def decode_one_token(model, token_B, attention_mask, position_B, cache) -> torch.Tensor:
    out = model.model(input_ids=token_B[:, None], attention_mask=attention_mask, position_ids=position_B[:, None],
                      cache=cache)  # fmt: skip
    return model.lm_head(out.last_hidden_state[:, -1])


@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | list[int] | None = None,
    seed: int | None = None,
    on_token: Callable[[int, torch.Tensor], bool | None] | None = None,
) -> GenerateOutput:
    """Generate up to max_new_tokens per row. `on_token(step, tokens_B)` is called after every step (for
    streaming); returning True stops generation (e.g. Ctrl-C or a disconnected client)."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, tokens) with at least one token, got {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    B, T = input_ids.shape
    device = input_ids.device
    limit = model.config.max_position_embeddings
    if T + max_new_tokens > limit and model.config.rope_parameters["rope_type"] == "default":
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the context ({limit})")
    padded = attention_mask is not None and not bool(attention_mask.all())
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long, device=device)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    dtype = next(model.parameters()).dtype
    cache = LatentCache(model.config, B, T + max_new_tokens, device=device, dtype=dtype)

    t0 = time.perf_counter()
    logits = prefill(model, input_ids, attention_mask if padded else None, position_ids, cache)
    t1 = time.perf_counter()
    new_tokens: list[list[int]] = [[] for _ in range(B)]
    finish = ["length"] * B
    done = torch.zeros(B, dtype=torch.bool, device=device)
    position = position_ids[:, -1]
    tokens_out = []
    mask = attention_mask
    for step in range(max_new_tokens):
        token = sample(logits, temperature, top_p, top_k, generator)
        tokens_out.append(token)
        token_list = token.tolist()
        for b in range(B):
            if not done[b]:
                new_tokens[b].append(token_list[b])
                if token_list[b] in eos:
                    finish[b] = "stop"
        if eos:
            done |= torch.tensor([t in eos for t in token_list], device=device)
        if on_token is not None and on_token(step, token):
            break
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        position = position + 1
        if padded:
            mask = torch.cat((mask, mask.new_ones(B, 1)), dim=1)
        logits = decode_one_token(model, token, mask if padded else None, position, cache)
    t2 = time.perf_counter()
    gen = torch.stack(tokens_out, dim=1) if tokens_out else input_ids.new_zeros(B, 0)
    return GenerateOutput(torch.cat((input_ids, gen), dim=1), new_tokens, finish, t1 - t0, t2 - t1)


def prepare_for_decode(model) -> None:
    """Store every Linear weight (and each routed expert's matrices) column-major: same values and shapes,
    transposed strides.

    One-token decode is a matrix-vector product; on CPU BLAS it runs ~1.5-3x faster reading W^T row by row
    than W. The parameters stay ordinary nn.Linear weights (training, saving and LoRA are unaffected; saving
    writes them contiguous). Idempotent; costs one copy of each weight, once."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("kv_b_proj") or (tied and name == "lm_head"):
                continue  # kv_b_proj is read by the absorbed einsums; a tied head shares the embedding
            w = getattr(module, "weight", None)
            if isinstance(module, torch.nn.Linear) and w is not None and w.dim() == 2 and w.is_contiguous():
                module.weight = torch.nn.Parameter(w.t().contiguous().t(), requires_grad=w.requires_grad)
            for stack in ("gate_up_proj", "down_proj"):  # routed experts: grouped matmul reads (E, D, F) rows
                p = getattr(module, stack, None)
                if isinstance(p, torch.nn.Parameter) and p.dim() == 3 and p.is_contiguous():
                    setattr(module, stack, torch.nn.Parameter(p.transpose(1, 2).contiguous().transpose(1, 2),
                                                              requires_grad=p.requires_grad))  # fmt: skip
