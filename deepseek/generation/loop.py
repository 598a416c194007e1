"""The generation loop: prefill, decode_one_token, sampling, stops, streaming, on any latent cache.

Legend: B batch, T prompt tokens, S cached positions, V vocab.

    out = generate(model, ids_BT, mask_BT, max_new_tokens=64, eos_token_id=eos)            # static latent cache
    out = generate(model, ids_1T, cache=CompressedLatentCache(cfg, 1, T + 64), prefill_chunk=1024)   # 128K
    out.sequences, out.new_tokens, out.finish_reasons, out.decode_tokens_per_second

Every caller generates through this loop: `R1Model.generate` (deepseek/sdk.py), chat, evaluation, GRPO
rollouts, long-context evaluation; `use_mtp=True` hands greedy decoding to the MTP speculative loop
(speculative.py: same output, fewer main-model forwards). The serving engine shares its `sample` and schedules its own batches.
Prompts are left-padded; positions count real tokens only (as transformers' generate does). Decode steps use
the absorbed MLA form, so each step reads the C + R latent per cached position and the active experts only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..model.cache import LatentCache
from ..model.longctx.prefill import chunked_prefill
from .compiled import cache_positions, check_compilable, decoder_for, pays_off
from .constrained import mask_logits
from .sampling import sample


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # (B, T + n): prompt (left-padded), generated tokens, pad after a row's stop token
    new_tokens: list[list[int]]  # per row, generated tokens up to and including the stop token
    finish_reasons: list[str]  # "stop" (eos), "length" or "cancelled" (on_token asked to stop)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    cache: object = None
    stats: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_second(self) -> float:
        n = sum(len(t) for t in self.new_tokens)
        return n / self.decode_seconds if self.decode_seconds > 0 else float("inf")

    @property
    def tokens(self) -> torch.Tensor:
        """(B, n): the generated part of `sequences`."""
        n = max(len(t) for t in self.new_tokens)
        return self.sequences[:, self.sequences.shape[1] - n :]

    @property
    def decode_seconds_per_token(self) -> float:
        steps = max(1, max(len(t) for t in self.new_tokens) - 1)
        return self.decode_seconds / steps


def prefill(model, input_ids, attention_mask, position_ids, cache, inputs_embeds=None) -> torch.Tensor:
    """Run the prompt through the model, filling the cache. Returns last-position logits (B, V).
    inputs_embeds (B, T, D): the prompt's embeddings instead of the ids' (media spliced in: deepseek/multimodal)."""
    if inputs_embeds is not None:
        input_ids = None
    out = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                      inputs_embeds=inputs_embeds)  # fmt: skip
    return model.lm_head(out.last_hidden_state[:, -1])


def decode_one_token(model, token_B, attention_mask, position_B, cache) -> torch.Tensor:
    out = model.model(input_ids=token_B[:, None], attention_mask=attention_mask, position_ids=position_B[:, None],
                      cache=cache)  # fmt: skip
    return model.lm_head(out.last_hidden_state[:, -1])


def _stop_ids(eos_token_id) -> set[int]:
    if eos_token_id is None:
        return set()
    return {eos_token_id} if isinstance(eos_token_id, int) else {int(i) for i in eos_token_id}


def check_request(model, input_ids: torch.Tensor, max_new_tokens: int) -> None:
    """One-line errors before any work (shared by plain and speculative decoding)."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, tokens) with at least one token, got {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    T, limit = input_ids.shape[1], model.config.max_position_embeddings
    if T + max_new_tokens > limit and model.config.rope_parameters["rope_type"] == "default":
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the context ({limit})")


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
    cache=None,
    prefill_chunk: int | None = None,
    pad_token_id: int | None = None,
    progress: bool = False,
    inputs_embeds: torch.Tensor | None = None,
    grammars: list | None = None,
    use_mtp: bool = False,
    compile: bool = False,
) -> GenerateOutput:
    """Generate up to max_new_tokens per row. `on_token(step, tokens_B)` is called after every step (for
    streaming); returning True stops generation (e.g. Ctrl-C or a disconnected client).
    cache: the latent cache to fill (default: a static LatentCache for T + max_new_tokens positions).
    prefill_chunk: feed the prompt that many tokens at a time (bounded memory; the compressed cache).
    pad_token_id: what a finished row holds in `sequences` after its stop token (default: the first eos).
    inputs_embeds: (B, T, D) embeddings of `input_ids` to prefill with instead (media spliced at placeholders);
    `input_ids` still gives the returned sequences.
    grammars: per row, a GrammarState (deepseek.generation.constrained) whose mask constrains that row, or None.
    use_mtp: speculative decoding with the model's MTP layer drafting (greedy only; generation/speculative.py).
    compile: decode through the compiled one-token step (generation/compiled.py: 30 s - 2 min to compile once per
    model, batch size and cache bucket, kept out of decode_seconds; same tokens, ~2x faster per step on CPU at
    small batch; where it does not pay (`compiled.pays_off`) decoding stays eager; `out.stats["compiled"]` says
    which ran)."""
    if use_mtp and compile:
        raise ValueError("compile=True and use_mtp=True cannot be combined yet: MTP drafting runs eager")
    if use_mtp:
        from .speculative import generate_speculative

        return generate_speculative(model, input_ids, attention_mask, max_new_tokens, temperature, eos_token_id,
                                    pad_token_id, on_token, cache=cache, prefill_chunk=prefill_chunk,
                                    inputs_embeds=inputs_embeds, grammars=grammars)  # fmt: skip
    check_request(model, input_ids, max_new_tokens)
    B, T = input_ids.shape
    device = input_ids.device
    padded = attention_mask is not None and not bool(attention_mask.all())
    if padded and prefill_chunk is not None:
        raise ValueError("chunked prefill takes rows of equal length (no left padding)")
    if inputs_embeds is not None and (inputs_embeds.shape[:2] != input_ids.shape or prefill_chunk is not None):
        raise ValueError(f"inputs_embeds {tuple(inputs_embeds.shape)} must be (batch, tokens, hidden) for input_ids "
                         f"{tuple(input_ids.shape)}, without prefill_chunk")  # fmt: skip
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long, device=device)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    eos = _stop_ids(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else min(eos, default=0)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    if cache is None:
        dtype = next(model.parameters()).dtype
        n = cache_positions(T + max_new_tokens) if compile else T + max_new_tokens
        cache = LatentCache(model.config, B, n, device=device, dtype=dtype)
    decoder = None
    if compile:
        check_compilable(model, cache)
        decoder = decoder_for(model) if pays_off(model.config, B) else None  # else eager: faster at this batch

    t0 = time.perf_counter()
    if prefill_chunk is not None:
        logits = chunked_prefill(model, input_ids, cache, prefill_chunk, progress)
    else:
        logits = prefill(model, input_ids, attention_mask if padded else None, position_ids, cache, inputs_embeds)
    t1 = time.perf_counter()
    if decoder is not None:  # positions written so far; left padding stays masked
        S = cache.get_seq_length()
        valid_BM = torch.zeros(B, cache.max_len, dtype=torch.bool, device=device)
        valid_BM[:, :S] = True
        valid_BM[:, S - T : S] = attention_mask.bool()
    new_tokens: list[list[int]] = [[] for _ in range(B)]
    finish = ["length"] * B
    done = torch.zeros(B, dtype=torch.bool, device=device)
    position = position_ids[:, -1]
    tokens_out = []
    mask = attention_mask
    compile_seconds = 0.0  # the compiled step's one-time compiling, kept out of decode_seconds
    for step in range(max_new_tokens):
        if grammars is not None:
            logits = mask_logits(logits.float(), [g if not done[b] else None for b, g in enumerate(grammars)])
        token = sample(logits, temperature, top_p, top_k, generator)
        token = token.masked_fill(done, pad)  # a finished row holds pad (transformers' convention)
        tokens_out.append(token)
        token_list = token.tolist()
        for b in range(B):
            if not done[b]:
                if grammars is not None and grammars[b] is not None:
                    grammars[b].accept(token_list[b])
                new_tokens[b].append(token_list[b])
                if token_list[b] in eos:
                    finish[b] = "stop"
        if eos:
            done |= torch.tensor([f == "stop" for f in finish], device=device)
        if on_token is not None and on_token(step, token):
            finish = [f if f == "stop" else "cancelled" for f in finish]
            break
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        position = position + 1
        if padded:
            mask = torch.cat((mask, mask.new_ones(B, 1)), dim=1)
        if decoder is not None:
            logits = decoder.step(token, position, cache, valid_BM)
            compile_seconds += decoder.compile_seconds
        else:
            logits = decode_one_token(model, token, mask if padded else None, position, cache)
    t2 = time.perf_counter()
    gen = torch.stack(tokens_out, dim=1) if tokens_out else input_ids.new_zeros(B, 0)
    stats = {"compiled": decoder is not None, "compile_seconds": compile_seconds}
    return GenerateOutput(torch.cat((input_ids, gen), dim=1), new_tokens, finish, t1 - t0, t2 - t1 - compile_seconds,
                          cache, stats)  # fmt: skip


def generate_long(model, input_ids, max_new_tokens: int = 16, compressed: bool | None = None,
                  chunk: int | None = None, progress: bool = False, stop_ids=()) -> GenerateOutput:  # fmt: skip
    """Greedy generation after a chunked prefill (config.prefill_chunk), on the cache the config asks for
    (compressed when config.compression.enabled, or as `compressed` says)."""
    from ..model.longctx.prefill import make_cache

    B, T = input_ids.shape
    dtype = next(model.parameters()).dtype
    cache = make_cache(model.config, B, T + max_new_tokens, compressed, input_ids.device, dtype)
    return generate(model, input_ids, max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids), cache=cache,
                    prefill_chunk=chunk or model.config.prefill_chunk, progress=progress)  # fmt: skip
