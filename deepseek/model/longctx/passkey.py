"""Passkey retrieval with a small model: training data with position skipping, and accuracy at any length.

Legend: B batch, T tokens.

    python -m deepseek.model.longctx.passkey train --out runs/passkey --steps 600   # ~10 min on 2 cores
    python -m deepseek.model.longctx.passkey eval --model runs/passkey --lengths 4096,131072 --trials 10

Prompts come from deepseek.tasks.passkey (Landmark template: random 5-digit key at a random depth in repeated
filler; RULER-style multi-key with --keys N), tokenised as UTF-8 bytes (vocab 256), followed by
"\\nThe pass key is " and the key. Training runs at a few hundred tokens, but with PoSE position skipping
(Zhu et al. 2023): the position ids jump by a random gap at a random point, so the relative distances the
model sees during training reach the evaluation length (128K) without 128K-token sequences. With --view the
model is trained instead for the compressed cache with compact positions (VIEW_SETTINGS): most rows are what
the last query of a long prompt attends to through that cache (compact_view), so no distance exceeds 384.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from pathlib import Path

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
    """The tokenizer a passkey model was trained with: its saved tokenizer.json, else bytes."""
    return load_tokenizer(model_dir) if (Path(model_dir) / "tokenizer.json").is_file() else BYTES


def passkey_sample(rng: random.Random, length: int, keys: int = 1, tok=BYTES):
    """(prompt ids (T,), key string): prompt + answer prefix is <= `length` tokens (exactly, for bytes)."""
    from deepseek.tasks.passkey import Passkey

    task = Passkey(num_keys=keys, tokenizer=tok)
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


# The compressed-cache settings a `view`-trained model is trained for and evaluated with: 64-token blocks,
# 2 read per query tile as one run of 2 consecutive blocks (a needle cut at a block boundary is read whole),
# a 64-token window, 64-token prefill chunks, rope positions compacted, no block means: a query sees at most
# view_length = 384 tokens, all at distances it was trained on.
VIEW_SETTINGS = dict(kv_compress=True, kv_block_size=64, kv_window=64, prefill_chunk=64, kv_topk_blocks=2,
                     kv_select_span=2, kv_coarse=False, kv_compact_positions=True)


def view_length(config) -> int:
    """Longest compact view (compact_view) a query sees: sinks + top-k blocks + the largest recent buffer."""
    b = config.kv_block_size
    return config.kv_sink_blocks * b + config.kv_topk_blocks * b + config.kv_window + b + config.prefill_chunk


def compact_view(rng: random.Random, prompt_T: torch.Tensor, config, must: list[tuple[int, int]],
                 may: list[tuple[int, int]] = (), layout: bool = False):  # fmt: skip
    """The tokens the last query of `prompt_T` attends to through CompressedLatentCache with
    kv_compact_positions and no block means, in the order (= rope positions) it sees them: the sinks, top-k
    sealed blocks in order, then the recent buffer (window + part of a block + the last prefill chunk).
    Selection is simulated: blocks overlapping `must` spans, then `may` spans (each with probability 1/2),
    then random blocks; so a needle cut at a block boundary is seen whole or in part, as selection may pick it.
    With kv_select_span s > 1 blocks come in runs of s, as the cache reads them: a span gets one run covering
    it at a random offset, the rest are random disjoint runs.
    layout=True returns (view, selected_end, last_chunk_start): the selected blocks are view[sinks:selected_end],
    the last prefill chunk (whose tile selected them) starts at last_chunk_start; (prompt, 0, 0) if nothing is cut.
    Training on these rows teaches retrieval across the cuts the cache makes."""
    b, T = config.kv_block_size, prompt_T.numel()
    sink = config.kv_sink_blocks * b
    last_chunk = rng.randint(1, config.prefill_chunk)  # the recent buffer: [window, window + b) + last chunk
    n = max(0, (T - last_chunk - config.kv_window - sink) // b)  # sealed blocks
    if n <= config.kv_topk_blocks:
        return (prompt_T, 0, 0) if layout else prompt_T
    r = sink + n * b

    def blocks(span):
        lo, hi = max(span[0], sink), min(span[1], r)
        return list(range((lo - sink) // b, (hi - 1 - sink) // b + 1)) if lo < hi else []

    k, s = config.kv_topk_blocks, getattr(config, "kv_select_span", 1)
    chosen: list[int] = []

    def take(run) -> None:  # a run of blocks joins the selection if it is disjoint from it and fits
        if len(chosen) + len(run) <= k and not set(run) & set(chosen):
            chosen.extend(run)

    for span in list(must) + [sp for sp in may if rng.random() < 0.5]:
        hit = blocks(span)
        if not hit:
            continue
        if s == 1:
            for j in hit:
                take([j])
        else:  # one run covering the span (or, if longer than a run, part of it), at a random offset
            whole = hit[-1] - hit[0] < s
            lo = max(0, (hit[-1] if whole else hit[0]) - s + 1)
            hi = min(n - s, hit[0] if whole else hit[-1])
            w = rng.randint(lo, hi) if lo <= hi else 0
            take(list(range(w, w + s)))
    while len(chosen) + s <= k:  # random runs, disjoint, then single blocks if no whole run fits
        free = [w for w in range(n - s + 1) if not set(range(w, w + s)) & set(chosen)]
        if not free:
            break
        w = rng.choice(free)
        take(list(range(w, w + s)))
    rest = [j for j in range(n) if j not in chosen]
    chosen += rng.sample(rest, k - len(chosen))
    parts = [prompt_T[:sink]] + [prompt_T[sink + j * b : sink + (j + 1) * b] for j in sorted(chosen)]
    view = torch.cat(parts + [prompt_T[r:]])
    return (view, sink + k * b, view.numel() - last_chunk) if layout else view


def training_batch(rng: random.Random, batch: int, length: int, max_position: int, keys: int = 1,
                   pose: float = 0.8, min_length: int | None = None, tok=BYTES, max_gap: int | None = None,
                   view=None, view_frac: float = 0.75, view_source: tuple[int, int] = (1024, 8192),
                   with_mask: bool = False, blind_first_layer: bool = False):  # fmt: skip
    """ids (B, T), labels (B, T), position_ids (B, T) with one PoSE gap per row (in a `pose` fraction of
    rows), answer (B, T) bool marking the retrieved key digits and their full stop (weighted in the loss:
    they are the only bytes that need retrieval). keys > 1: 1..keys named keys per row, one asked for.
    view (an R1Config): a `view_frac` fraction of rows are compact views (compact_view) of prompts of
    view_source tokens, as the compressed cache with kv_compact_positions shows them; no PoSE on those.
    with_mask: also return mask (B, T, T) bool (True = attend), causal except that in view rows the recent
    tokens before the last prefill chunk do not see the selected blocks: in the cache those tokens were
    prefilled by tiles whose own selection (their mean query) was filler, so the model must not learn to
    route the key through them. blind_first_layer: mask (B, 2, T, T), [:, 0] for the first layer, where no
    recent token (the answer included) sees the selected blocks: the first layer's own selection (its query is
    not a retrieval query) is filler as often as not, so retrieval is left to the later layers."""
    ids, labels, pos, answer, masks = [], [], [], [], []
    for _ in range(batch):
        n_keys = rng.randint(1, keys)
        shortest = length // 2 if min_length is None else min(min_length, length - 8)
        cut = view is not None and rng.random() < view_frac
        prompt, key = passkey_sample(rng, rng.randint(*view_source) if cut else rng.randint(shortest, length - 8),
                                     n_keys, tok)  # fmt: skip
        if view is not None and prompt.numel() > length - 8:  # many keys need more room: cut it as well
            cut = True
        if cut:  # one written copy of the asked key for sure, the rest of the needles (any key) maybe
            spans = needle_spans(prompt, tok)
            copies = [sp for sp in needle_spans(prompt, tok, keys=True) if tok.decode(prompt[sp[0] : sp[1]].tolist()) == key]
            prompt, sel_end, tail = compact_view(rng, prompt, view, [rng.choice(copies)], spans, layout=True)
        else:
            sel_end = tail = 0
        row = torch.cat((prompt, torch.tensor(tok.encode(key + "."))))
        if row.numel() > length:
            raise ValueError(f"passkey training length {length} is below the shortest prompt + answer ({row.numel()})")
        n = row.numel()
        row = torch.nn.functional.pad(row, (0, length - n), value=0)
        lab = row.clone()
        lab[n:] = -100  # no loss on padding
        ans = torch.zeros(length, dtype=torch.bool)
        ans[prompt.numel() : n] = True  # the key and its full stop
        split = rng.randint(1, length - 1)
        top = max_position - length if max_gap is None else min(max_gap, max_position - length)
        gap = rng.randint(0, max(0, top)) if rng.random() < pose and not cut else 0
        p = torch.arange(length)
        p[split:] += gap
        ids.append(row)
        labels.append(lab)
        pos.append(p)
        answer.append(ans)
        if with_mask:
            m = torch.ones(length, length, dtype=torch.bool).tril()
            sink = view.kv_sink_blocks * view.kv_block_size if view is not None else 0
            m[sel_end:tail, sink:sel_end] = False  # empty unless a view row
            if blind_first_layer:
                m0 = m.clone()
                m0[sel_end:, sink:sel_end] = False
                m = torch.stack((m0, m))
            masks.append(m)
    out = (torch.stack(ids), torch.stack(labels), torch.stack(pos), torch.stack(answer))
    return out + (torch.stack(masks),) if with_mask else out


def masked_logits(model, ids_BT, position_ids_BT, mask) -> torch.Tensor:
    """model(ids).logits with an explicit boolean attention mask (True = attend): (B, T, V). mask is (B, T, T)
    for every layer, or (B, 2, T, T): [:, 0] for the first layer, [:, 1] for the others."""
    bb = model.model
    x_BTD = bb.embed_tokens(ids_BT)
    cos, sin = bb.rotary_emb(position_ids_BT, x_BTD.dtype)
    for i, layer in enumerate(bb.layers):
        mask_BTT = mask if mask.dim() == 3 else mask[:, min(i, 1)]
        x_BTD = layer(x_BTD, cos, sin, mask_BTT, None)
    return model.lm_head(bb.norm(x_BTD))


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


def train(out: str, steps: int = 600, batch: int = 8, length: int = 384, lr: float = 3e-3, seed: int = 0,
          max_position: int = 131072, keys: int = 1, threads: int | None = None, answer_weight: float = 1.0,
          pose: float = 0.8, pose_after: float = 0.25, eval_every: int = 200, layers: int = 2,
          init: str | None = None, min_length: int | None = None, tokenizer: str = "bytes",
          gap_start: int | None = None, view: bool = False, view_frac: float = 0.75,
          view_source: tuple[int, int] = (1024, 8192), blind_recent: bool = False,
          blind_first_layer: bool = False) -> list[float]:  # fmt: skip
    """Train the small byte-level model on passkey data; save it to `out` with a loss curve PNG.

    loss = mean next-byte loss + answer_weight * mean loss on the key bytes of the answer. Position skipping
    (PoSE) starts after a `pose_after` fraction of the steps, so retrieval is first learnt at plain positions.
    Every `eval_every` steps: greedy accuracy on 16 fresh prompts of `length` bytes (logged, shown on the bar).
    init: continue from a saved model (e.g. a longer-row second stage); min_length: shortest row (default
    length // 2), so one run can mix row lengths. view: train for the compressed cache with compact
    positions (VIEW_SETTINGS written into the model's config): a view_frac fraction of rows are what its
    last query attends to in prompts of view_source tokens (compact_view); in-training accuracy is then
    measured through the compressed cache at 4x `length`. blind_recent (with view): the recent tokens before
    the last prefill chunk do not see the selected blocks (training_batch with_mask), as in the cache."""
    from deepseek import R1ForCausalLM

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = load_tokenizer(tokenizer)
    config = small_config(max_position_embeddings=max_position + 512, num_hidden_layers=layers,
                          first_k_dense_replace=layers, vocab_size=tok.vocab_size)  # fmt: skip
    model = (R1ForCausalLM.from_pretrained(init) if init else R1ForCausalLM(config)).train()
    if view:
        for k, v in VIEW_SETTINGS.items():
            setattr(model.config, k, v)
        if length < view_length(model.config) + 8:
            raise ValueError(f"--length {length} is below the longest compact view + answer ({view_length(model.config) + 8})")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    losses, answer_losses, evals = [], [], []
    bar = tqdm(range(steps), desc="passkey train", unit="step")
    for step in bar:
        warm = min(1.0, (step + 1) / 30)
        for g in opt.param_groups:
            g["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * step / steps))
        p = pose if step >= pose_after * steps else 0.0
        max_gap = None
        if gap_start:
            frac = max(0.0, (step - pose_after * steps) / max(1.0, (1 - pose_after) * steps))
            max_gap = int(gap_start * (max_position / gap_start) ** min(1.0, frac))
        ids, labels, pos, answer, *mask = training_batch(rng, batch, length, max_position, keys, pose=p,
                                                         min_length=min_length, tok=tok, max_gap=max_gap,
                                                         view=model.config if view else None, view_frac=view_frac,
                                                         view_source=view_source, with_mask=view and blind_recent,
                                                         blind_first_layer=blind_first_layer)  # fmt: skip
        if mask:
            logits = masked_logits(model, ids, pos, mask[0])[:, :-1].float()  # (B, T-1, V)
        else:
            logits = model(ids, position_ids=pos).logits[:, :-1].float()
        target, ans = labels[:, 1:], answer[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none")
        lm = nll[target != -100].mean()
        retr = nll[ans].mean()
        loss = lm + answer_weight * retr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(lm.item())
        answer_losses.append(retr.item())
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            model.eval()
            acc = passkey_accuracy(model, 4 * length if view else length, 16, compressed=view, seed=10_000 + step,
                                   tok=tok)  # fmt: skip
            model.train()
            evals.append((step + 1, acc))
        post = dict(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}",
                    key=f"{sum(answer_losses[-20:]) / len(answer_losses[-20:]):.3f}")  # fmt: skip
        if evals:
            post["acc"] = f"{evals[-1][1]:.2f}"
        bar.set_postfix(post)
    model.eval()
    Path(out).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if isinstance(tok, HFTokenizer):
        tok.tok.save_pretrained(out)
    log = {"tokenizer": tokenizer, "steps": steps, "batch": batch, "length": length, "lr": lr, "answer_weight": answer_weight,
           "pose": pose, "pose_after": pose_after, "view": view, "view_frac": view_frac, "blind_recent": blind_recent, "blind_first_layer": blind_first_layer, "init": init, "losses": losses, "answer_losses": answer_losses,
           "evals": evals}  # fmt: skip
    (Path(out) / "train_log.json").write_text(json.dumps(log))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot(losses, label="all bytes")
    ax[0].plot(answer_losses, label="key bytes of the answer", alpha=0.7)
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("loss (nats/byte)")
    ax[0].set_yscale("log")
    ax[0].legend()
    if evals:
        ax[1].plot(*zip(*evals), marker="o")
    ax[1].set_xlabel("step")
    ax[1].set_ylabel(f"passkey accuracy at {length} bytes")
    ax[1].set_ylim(-0.02, 1.02)
    fig.suptitle("passkey training")
    fig.tight_layout()
    fig.savefig(Path(out) / "loss.png", dpi=110)
    return losses


@torch.inference_mode()
def passkey_trial(model, length: int, compressed: bool, seed, keys: int = 1, tok=BYTES) -> dict:
    """One greedy retrieval: a fresh prompt of `length` bytes (from Random(seed)) through the full or the
    compressed cache. Returns {"hit", "answer", "key"}."""
    from .prefill import chunked_prefill, make_cache

    prompt, key = passkey_sample(random.Random(seed), length, keys, tok)
    ids = prompt[None]
    cache = make_cache(model.config, 1, ids.shape[1] + len(key) + 1, compressed=compressed)
    logits = chunked_prefill(model, ids, cache, chunk=model.config.prefill_chunk if compressed else 256)
    out = []
    for i in range(len(key)):
        next_id = logits.argmax(-1)
        out.append(int(next_id))
        pos = torch.tensor([[ids.shape[1] + i]])
        h = model.model(input_ids=next_id[:, None], position_ids=pos, cache=cache).last_hidden_state
        logits = model.lm_head(h[:, -1])
    answer = tok.decode(out)
    return {"hit": answer == key, "answer": answer, "key": key}


def passkey_accuracy(model, length: int, trials: int, compressed: bool, seed: int = 0, keys: int = 1,
                     progress: bool = False, tok=BYTES) -> float:  # fmt: skip
    """Fraction of `trials` prompts of `length` bytes whose greedy 5-digit answer equals the key. Trial i
    uses the prompt of Random(f"{seed}-{i}"), so any subset of trials can be rerun (or sharded) alone."""
    hits = 0
    for i in tqdm(range(trials), desc=f"passkey {length}", disable=not progress, leave=False):
        hits += passkey_trial(model, length, compressed, f"{seed}-{i}", keys, tok)["hit"]
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
    from .prefill import backbone, make_cache

    ids = ids_T[None]
    cache = make_cache(model.config, 1, ids.shape[1], compressed=compressed)
    nll, count = 0.0, 0
    for s in range(0, ids.shape[1] - 1, chunk):
        x = ids[:, s : s + chunk]
        pos = torch.arange(s, s + x.shape[1])[None]
        logits = model.lm_head(backbone(model, x, pos, cache))[0]  # (t, V)
        target = ids[0, s + 1 : s + 1 + x.shape[1]]
        keep = torch.arange(s, s + target.numel()) >= skip
        lp = logits[: target.numel()].float().log_softmax(-1).gather(1, target[:, None])[:, 0]
        nll -= float(lp[keep].sum())
        count += int(keep.sum())
    return math.exp(nll / max(1, count))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=int, default=600)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--length", type=int, default=384)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--keys", type=int, default=1)
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--answer-weight", type=float, default=1.0)
    t.add_argument("--pose", type=float, default=0.8, help="fraction of rows with a position gap")
    t.add_argument("--pose-after", type=float, default=0.25, help="gaps start after this fraction of the steps")
    t.add_argument("--eval-every", type=int, default=200)
    t.add_argument("--layers", type=int, default=2)
    t.add_argument("--init", default=None, help="continue from this saved model")
    t.add_argument("--min-length", type=int, default=None, help="shortest row (default: half of --length)")
    t.add_argument("--tokenizer", default="bytes", help='"bytes" or a tokenizer/model folder or bundled name')
    t.add_argument("--gap-start", type=int, default=None, help="PoSE gap curriculum: largest gap at the start")
    t.add_argument("--view", action="store_true", help="train for the compressed cache's compact views")
    t.add_argument("--view-frac", type=float, default=0.75, help="with --view: fraction of rows that are views")
    t.add_argument("--view-source", default="1024,8192", help="with --view: prompt lengths the views come from")
    t.add_argument("--blind-recent", action="store_true",
                   help="with --view: recent tokens before the last prefill chunk do not see the selected blocks")
    t.add_argument("--blind-first-layer", action="store_true",
                   help="with --blind-recent: in the first layer no recent token sees the selected blocks")
    e = sub.add_parser("eval")
    e.add_argument("--model", required=True)
    e.add_argument("--lengths", default="4096,16384")
    e.add_argument("--trials", type=int, default=10)
    e.add_argument("--keys", type=int, default=1)
    e.add_argument("--modes", default="full,compressed")
    e.add_argument("--ppl-lengths", default="", help="also perplexity on repeating prose of these lengths")
    args = parser.parse_args()
    if args.cmd == "train":
        t0 = time.time()
        losses = train(args.out, args.steps, args.batch, args.length, args.lr, keys=args.keys, threads=args.threads,
                       answer_weight=args.answer_weight, pose=args.pose, pose_after=args.pose_after,
                       eval_every=args.eval_every, layers=args.layers, init=args.init,
                       min_length=args.min_length, tokenizer=args.tokenizer, gap_start=args.gap_start,
                       view=args.view, view_frac=args.view_frac, blind_recent=args.blind_recent,
                       blind_first_layer=args.blind_first_layer,
                       view_source=tuple(int(x) for x in args.view_source.split(",")))  # fmt: skip
        print(json.dumps({"final_loss": round(sum(losses[-20:]) / 20, 4), "seconds": round(time.time() - t0)}))
        return
    from deepseek import R1ForCausalLM

    from .prefill import extend_context

    model = R1ForCausalLM.from_pretrained(args.model).eval()
    lengths = [int(x) for x in args.lengths.split(",")]
    extend_context(model, max(lengths) + 64)
    result = {}
    for n in lengths:
        for mode in args.modes.split(","):
            acc = passkey_accuracy(model, n, args.trials, mode == "compressed", seed=n, keys=args.keys, progress=True,
                                   tok=model_tokenizer(args.model))  # fmt: skip
            result[f"{n // 1024}k_{mode}"] = acc
            print(f"{n:>7} {mode:<10} {acc:.2f}", flush=True)
    skip = model.config.kv_window + 2 * model.config.kv_block_size  # where the caches start to differ
    for n in [int(x) for x in args.ppl_lengths.split(",") if x]:
        ids = essay_ids(n, tok=model_tokenizer(args.model))
        for mode in args.modes.split(","):
            ppl = long_perplexity(model, ids, mode == "compressed", skip=skip)
            result[f"{n // 1024}k_ppl_{mode}"] = round(ppl, 4)
            print(f"{n:>7} {mode:<10} perplexity {ppl:.4f}", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
