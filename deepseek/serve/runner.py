"""ModelRunner: the model forward passes the engine schedules, on the slot cache, plus per-row sampling.

Legend: B running sequences in a step, T prompt tokens, S attended positions, V vocab, K top logprobs.

The forward passes and sampling are the generation loop's own (`deepseek.generation.loop.decode_one_token`,
`generation.sampling.sample`), run over the engine's slot-cache views instead of one static batch. Reference
path: `deepseek.generation.loop.generate`; the runner must produce the same greedy tokens for each sequence as
that function does for the sequence alone (tests/test_serve_engine.py).

Two prefill paths: `prefill_batch` (the fast path: the step's text prompts right-padded into one forward,
serve/kv_cache.py's BatchPrefillView) and `prefill` (one sequence; the reference, and the path for media
prompts and prompt_logprobs, which need the spliced embeddings or every position's logits). Both start after
whatever the slot already holds (a prefix copied from the prefix cache, serve/prefix_cache.py).
"""

from __future__ import annotations

import torch

from ..generation.constrained import mask_logits
from ..generation.loop import decode_one_token
from ..generation.sampling import sample
from .kv_cache import SlotCache
from .prefix_cache import PrefixCache
from .sequence import Sequence


class ModelRunner:
    def __init__(self, model, num_slots: int, max_len: int, prefix_cache_tokens: int = 0, prefix_block: int = 16):
        """prefix_cache_tokens: the prefix cache's capacity (0: no prefix cache)."""
        self.model = model
        self.device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        self.cache = SlotCache(model.config, num_slots, max_len, device=self.device, dtype=dtype)
        self.prefix = None
        if prefix_cache_tokens > 0:
            self.prefix = PrefixCache(model.config, prefix_cache_tokens, prefix_block, self.device, dtype)

    def prefix_match(self, seq: Sequence) -> list[int]:
        """Prefix-cache blocks seq's prompt can start from (none for media or prompt_logprobs prompts)."""
        if self.prefix is None or seq.media or seq.params.prompt_logprobs is not None:
            return []
        return self.prefix.match(seq.prompt_ids)

    @torch.inference_mode()
    def load_prefix(self, seq: Sequence, blocks: list[int]) -> int:
        """Copy matched prefix blocks into seq's (empty) slot; returns the positions now cached."""
        return self.prefix.load(self.cache, seq.slot, seq.prompt_ids, blocks) if blocks else 0

    @torch.inference_mode()
    def store_prefix(self, seq: Sequence, ids: list[int]) -> None:
        """Offer the full blocks of ids (seq's tokens whose latents its slot holds) to the prefix cache."""
        if self.prefix is not None and not seq.media and seq.slot is not None:
            self.prefix.store(self.cache, seq.slot, ids)

    @torch.inference_mode()
    def prefill(self, seq: Sequence) -> None:
        """Run the prompt (after what the slot holds already) into seq's slot, alone; leave the next-token
        logits in seq.pending_logits (V,)."""
        view = self.cache.prefill_view(seq.slot)
        start = view.start  # > 0 after a prefix-cache hit (never for media or prompt_logprobs)
        if start and (seq.media or seq.params.prompt_logprobs is not None):
            raise RuntimeError("a media or prompt_logprobs prefill must start at position 0")
        ids_1T = torch.tensor([seq.prompt_ids[start:]], device=self.device)
        pos_1T = torch.arange(start, start + ids_1T.shape[1], device=self.device)[None]
        if seq.media:  # media projected into the placeholder positions; cached like tokens from here on
            adapter = self.model.multimodal  # seq.media is decoded already (Engine.submit's contract)
            embeds = adapter.splice(self.model.model.embed_tokens(ids_1T), ids_1T, seq.media)
            h_1TD = self.model.model(inputs_embeds=embeds, position_ids=pos_1T, cache=view).last_hidden_state
        else:
            h_1TD = self.model.model(input_ids=ids_1T, position_ids=pos_1T, cache=view).last_hidden_state
        k = seq.params.prompt_logprobs
        if k is not None:
            logits_TV = self.model.lm_head(h_1TD[0])
            seq.prompt_logprobs = prompt_logprobs(logits_TV, seq.prompt_ids, k)
            seq.pending_logits = logits_TV[-1]
        else:
            seq.pending_logits = self.model.lm_head(h_1TD[0, -1])
        view.commit(ids_1T.shape[1])

    @torch.inference_mode()
    def prefill_batch(self, seqs: list[Sequence]) -> None:
        """Text prompts (no media, no prompt_logprobs) of different lengths in one right-padded forward, each
        row after what its slot holds already; sets each seq.pending_logits (V,). Commits only on success."""
        n_new = [len(s.prompt_ids) - self.cache.lengths[s.slot] for s in seqs]
        view = self.cache.batch_prefill_view([s.slot for s in seqs], n_new)
        ids_BT = torch.zeros(len(seqs), view.T, dtype=torch.long, device=self.device)  # pad id 0 (never seen)
        for b, (s, n) in enumerate(zip(seqs, n_new)):
            ids_BT[b, :n] = torch.tensor(s.prompt_ids[len(s.prompt_ids) - n :], device=self.device)
        h_BTD = self.model.model(input_ids=ids_BT, position_ids=view.position_ids, mask=view.mask_BTS,
                                 cache=view).last_hidden_state  # fmt: skip
        last_BD = h_BTD[torch.arange(len(seqs), device=self.device), view.last_B]
        logits_BV = self.model.lm_head(last_BD)
        view.commit()
        for s, row in zip(seqs, logits_BV):
            s.pending_logits = row

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> None:
        """Feed each sequence's last token, all in one batch; set each seq.pending_logits (V,)."""
        view = self.cache.decode_view([s.slot for s in seqs])
        tokens_B = torch.tensor([s.output_ids[-1] for s in seqs], device=self.device)
        logits_BV = decode_one_token(self.model, tokens_B, view.attention_mask, view.position_ids[:, 0], view)
        view.commit()
        for s, row in zip(seqs, logits_BV):
            s.pending_logits = row

    @torch.inference_mode()
    def sample(self, seqs: list[Sequence]) -> list[int | Exception]:
        """One token per sequence from its pending logits (greedy rows in one argmax). A row whose sampling
        fails gets the exception in its place, so the engine fails that sequence alone."""
        logits_BV = mask_logits(torch.stack([s.pending_logits for s in seqs]), [s.grammar for s in seqs])
        out: list[int | Exception] = logits_BV.argmax(-1).tolist()
        for b, s in enumerate(seqs):
            try:
                out[b] = self._sample_row(s, logits_BV[b : b + 1], out[b])
            except Exception as exc:
                out[b] = exc
            s.pending_logits = None
        return out

    def _sample_row(self, s: Sequence, logits_1V: torch.Tensor, greedy: int) -> int:
        p = s.params
        tok = greedy
        if p.temperature > 0:
            if p.seed is not None and s.generator is None:
                s.generator = torch.Generator(device=self.device).manual_seed(p.seed)
            tok = int(sample(logits_1V, p.temperature, p.top_p, p.top_k, s.generator)[0])
        if p.logprobs is not None:
            lp_V = logits_1V[0].float().log_softmax(-1)
            top = lp_V.topk(min(p.logprobs, lp_V.shape[0])) if p.logprobs > 0 else None
            s.new_logprobs = (float(lp_V[tok]), _top_dict(top))
        if s.grammar is not None:
            s.grammar.accept(tok)  # ValueError (this sequence fails) if the grammar does not allow it
        return tok


def _top_dict(top) -> dict[int, float]:
    return {} if top is None else dict(zip(top.indices.tolist(), top.values.tolist()))


def prompt_logprobs(logits_TV: torch.Tensor, ids: list[int], k: int) -> list:
    """[None] + for each later prompt token: (its logprob given the prefix, top-k {id: logprob})."""
    lp_TV = logits_TV[:-1].float().log_softmax(-1)
    target = torch.tensor(ids[1:], device=lp_TV.device)
    chosen = lp_TV.gather(1, target[:, None])[:, 0].tolist()
    out = [None]
    top = lp_TV.topk(max(k, 1), dim=-1)
    for t in range(len(ids) - 1):
        d = dict(zip(top.indices[t].tolist(), top.values[t].tolist())) if k > 0 else {}
        out.append((chosen[t], d))
    return out
