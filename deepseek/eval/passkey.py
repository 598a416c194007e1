"""Passkey retrieval with a small model: prompts, needles, and accuracy at any length (training: train/passkey.py).

Legend: B batch, T tokens.

    deepseek passkey train --out runs/passkey --steps 600   # ~10 min on 2 cores (deepseek/train/passkey.py)
    deepseek passkey eval --model runs/passkey --lengths 4096,131072 --trials 10

Prompts come from deepseek.tasks.passkey (Landmark template: random 5-digit key at a random depth in repeated
filler; RULER-style multi-key with --keys N), tokenised as UTF-8 bytes (vocab 256) or a saved tokenizer,
followed by "\\nThe pass key is " and the key. The `train` command runs deepseek.train.passkey.train (PoSE position
skipping, or with --view training for the compressed cache with compact positions)."""

from __future__ import annotations

import math
import random
import re

import torch
from tqdm.auto import tqdm

ANSWER_PREFIX = "\nThe pass key is "


class ByteTokenizer:
    """UTF-8 bytes as token ids; the interface deepseek.tasks.passkey needs to count tokens exactly."""

    vocab_size = 256

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": self.encode(text)}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", "replace")


class HFTokenizer:
    """A transformers tokenizer behind the same interface (no special tokens added)."""

    def __init__(self, tok):
        self.tok, self.vocab_size = tok, len(tok)

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": self.encode(text)}

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


BYTES = ByteTokenizer()


def load_tokenizer(name: str):
    """"bytes", a model folder with tokenizer.json, or a bundled name such as "deepseek/r1-tiny"."""
    if name == "bytes":
        return BYTES
    from transformers import AutoTokenizer

    from deepseek.compat.checkpoint import resolve

    return HFTokenizer(AutoTokenizer.from_pretrained(str(resolve(name))))


def model_tokenizer(model_dir: str):
    """The tokenizer a passkey model (a folder or a bundled name) was trained with: its tokenizer.json, else bytes."""
    from deepseek.compat.checkpoint import resolve

    folder = resolve(model_dir)
    return load_tokenizer(str(folder)) if (folder / "tokenizer.json").is_file() else BYTES


def passkey_sample(rng: random.Random, length: int, keys: int = 1, tok=BYTES, filler: str = "repeat"):
    """(prompt ids (T,), key string): prompt + answer prefix is <= `length` tokens (exactly, for bytes).
    filler: the haystack (deepseek.tasks.passkey: "repeat", "essay", "train" or a real-prose family)."""
    from deepseek.tasks.passkey import Passkey

    task = Passkey(num_keys=keys, tokenizer=tok, filler=filler)
    ex = task.make_example(rng, max(64, length - len(tok.encode(ANSWER_PREFIX))))
    return torch.tensor(tok.encode(ex["prompt"] + ANSWER_PREFIX)), str(ex["key"])


def needle_spans(prompt_T: torch.Tensor, tok=BYTES, keys: bool = False) -> list[tuple[int, int]]:
    """Token spans [start, end) of every needle ("The pass key ... is K. Remember it. K is the pass key ...");
    keys=True: the spans of the two written keys K of each needle instead (two per needle)."""
    text = tok.decode(prompt_T.tolist())
    at = (lambda i: i) if isinstance(tok, ByteTokenizer) else (lambda i: len(tok.encode(text[:i])))
    spans = []
    for m in re.finditer(r"The pass key(?: for \w+)? is (\d+)\. Remember it\. (\1) is the pass key(?: for \w+)?\.", text):
        pairs = [(m.start(1), m.end(1)), (m.start(2), m.end(2))] if keys else [(m.start(), m.end())]
        spans += [(at(a), at(z)) for a, z in pairs]
    return spans


def small_config(**kw):
    """The small byte-level model of the 128K runs (fits a 2-core CPU); MLA latent C=64, R=16."""
    from deepseek import R1Config

    base = dict(
        vocab_size=256, hidden_size=128, intermediate_size=384, moe_intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=2, num_nextn_predict_layers=0, max_position_embeddings=131072 + 512,
        bos_token_id=0, eos_token_id=1, pad_token_id=0, kv_block_size=64, kv_window=512, kv_topk_blocks=16,
    )  # fmt: skip
    base.update(kw)
    return R1Config(**base)


@torch.inference_mode()
def passkey_trial(model, length: int, compressed: bool, seed, keys: int = 1, tok=BYTES,
                  filler: str = "repeat") -> dict:  # fmt: skip
    """One greedy retrieval: a fresh prompt of `length` bytes (from Random(seed)) with `filler` as haystack
    through the full or the compressed cache. Returns {"hit", "answer", "key"}."""
    from deepseek.generation.loop import generate
    from deepseek.model.longctx.prefill import make_cache

    prompt, key = passkey_sample(random.Random(seed), length, keys, tok, filler)
    ids = prompt[None]
    cache = make_cache(model.config, 1, ids.shape[1] + len(key) + 1, compressed=compressed)
    chunk = model.config.prefill_chunk if compressed else 256
    found = []  # after the prefill (step 0, before any decoding step): what the lead layer selected for the answer

    def after_prefill(step, _tokens):
        if step == 0 and compressed and cache.lead is not None:
            found.append(selected_key(prompt, key, cache, tok))

    out = generate(model, ids, max_new_tokens=len(key), cache=cache, prefill_chunk=chunk, on_token=after_prefill)
    out, found = out.new_tokens[0], (found or [None])[0]
    answer = tok.decode(out)
    return {"hit": answer == key, "answer": answer, "key": key, "selected": found}


def selected_key(prompt_T: torch.Tensor, key: str, cache, tok=BYTES) -> bool | None:
    """After the prefill: does the lead layer's selection (the blocks every layer reads for the first answer
    token, with the sinks and the recent buffer) hold one written copy of the asked key whole? None when the
    key is in the sinks or recent buffer anyway, or nothing is sealed."""
    idx = cache.lead_idx
    st = cache.store[cache.lead]
    if idx is None or not st.n_blocks:
        return None
    b, sink = cache.block, cache.sink_len
    chosen = set(idx.flatten().tolist())
    spans = [sp for sp in needle_spans(prompt_T, tok, keys=True) if tok.decode(prompt_T[sp[0] : sp[1]].tolist()) == key]
    sealed_end = sink + st.n_blocks * b
    if any(a < sink or z > sealed_end for a, z in spans):
        return None
    return any(all((p - sink) // b in chosen for p in range(a, z)) for a, z in spans)


def passkey_accuracy(model, length: int, trials: int, compressed: bool, seed: int = 0, keys: int = 1,
                     progress: bool = False, tok=BYTES, filler: str = "repeat") -> float:  # fmt: skip
    """Fraction of `trials` prompts of `length` bytes whose greedy 5-digit answer equals the key. Trial i
    uses the prompt of Random(f"{seed}-{i}"), so any subset of trials can be rerun (or sharded) alone."""
    hits = 0
    for i in tqdm(range(trials), desc=f"passkey {length}", disable=not progress, leave=False):
        hits += passkey_trial(model, length, compressed, f"{seed}-{i}", keys, tok, filler)["hit"]
    return hits / trials


def essay_ids(length: int, seed: int = 0, tok=BYTES) -> torch.Tensor:
    """`length` tokens of the project's prose filler (deepseek/tasks/filler.py), which repeats every ~4.6K
    bytes: past the first cycle a model can predict it by copying from one cycle back, beyond the window."""
    from deepseek.tasks.filler import PROSE

    text = " ".join(PROSE.split())
    start = random.Random(seed).randrange(len(text))
    reps = text[start:] + " " + (" " + text) * (length // len(text) + 2)  # >= length bytes >= length tokens
    return torch.tensor(tok.encode(reps)[:length])


@torch.inference_mode()
def long_perplexity(model, ids_T: torch.Tensor, compressed: bool, chunk: int = 512, skip: int = 0) -> float:
    """Teacher-forced perplexity of ids (T,) fed chunk by chunk through the full or compressed cache, over the
    positions >= skip (e.g. beyond the window, where the two caches differ)."""
    from deepseek.model.longctx.prefill import make_cache

    ids = ids_T[None]
    cache = make_cache(model.config, 1, ids.shape[1], compressed=compressed)
    nll, count = 0.0, 0
    for s in range(0, ids.shape[1] - 1, chunk):
        x = ids[:, s : s + chunk]
        pos = torch.arange(s, s + x.shape[1])[None]
        logits = model.lm_head(model.model(input_ids=x, position_ids=pos, cache=cache).last_hidden_state)[0]
        target = ids[0, s + 1 : s + 1 + x.shape[1]]
        keep = torch.arange(s, s + target.numel()) >= skip
        lp = logits[: target.numel()].float().log_softmax(-1).gather(1, target[:, None])[:, 0]
        nll -= float(lp[keep].sum())
        count += int(keep.sum())
    return math.exp(nll / max(1, count))


@torch.inference_mode()
def longdoc_trial(model, kind: str, length: int, compressed: bool, seed, tok=BYTES, filler: str = "package-readmes",
                  distractors: int = 3) -> dict:  # fmt: skip
    """One greedy answer to a long-document question (deepseek.tasks.haystack: "variables" or "clause") of
    `length` tokens through the full or compressed cache. Returns {"hit", "answer", "key", "seconds"}, seconds =
    time to answer (prefill + decoding the answer)."""
    import time

    from deepseek.generation.loop import generate
    from deepseek.model.longctx.prefill import make_cache
    from deepseek.tasks.haystack import LongDocument

    task = LongDocument(kind, filler=filler, distractors=distractors, tokenizer=tok)
    rng = random.Random(seed)
    probe = task.make_example(random.Random(seed), 64)  # the answer prefix's length is fixed per kind
    ex = task.make_example(rng, max(64, length - len(tok.encode(probe["answer_prefix"]))))
    ids = torch.tensor([tok.encode(ex["prompt"] + ex["answer_prefix"])])
    n = len(tok.encode(ex["answer"]))
    t0 = time.perf_counter()
    cache = make_cache(model.config, 1, ids.shape[1] + n + 1, compressed=compressed)
    chunk = model.config.prefill_chunk if compressed else 256
    out = generate(model, ids, max_new_tokens=n, cache=cache, prefill_chunk=chunk).new_tokens[0]
    answer = tok.decode(out)
    return {"hit": answer == ex["answer"], "answer": answer, "key": ex["answer"], "seconds": time.perf_counter() - t0}
