"""Training the small passkey model: PoSE rows, and compact views of the compressed cache (VIEW_SETTINGS).

Legend: B batch, T tokens.

    deepseek passkey train --out runs/passkey --steps 600   # ~10 min on 2 cores
    deepseek passkey train --out runs/passkey_view --view --length 392 --pose 0 ...

Rows are passkey prompts (deepseek.eval.passkey) followed by the key. PoSE (Zhu et al. 2023): the
position ids jump by a random gap at a random point, so training distances reach 128K. With view=True most
rows are instead what the last query of a long prompt attends to through CompressedLatentCache with compact
positions (compact_view), so no distance exceeds view_length.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..eval.passkey import (
    BYTES,
    HFTokenizer,
    load_tokenizer,
    needle_spans,
    passkey_accuracy,
    passkey_sample,
    small_config,
)
from .data import IGNORE

# The compressed-cache settings a `view`-trained model is trained for and evaluated with: 64-token blocks,
# 2 read per query tile as one run of 2 consecutive blocks (a needle cut at a block boundary is read whole),
# a 64-token window, 64-token prefill chunks, rope positions compacted, no block means: a query sees at most
# view_length = 384 tokens, all at distances it was trained on. The prefill ends with refresh_recent, so the
# whole recent buffer has read the blocks the last tile selected, as every token of a view has.
VIEW_SETTINGS = dict(kv_compress=True, kv_block_size=64, kv_window=64, prefill_chunk=64, kv_topk_blocks=2,
                     kv_select_span=2, kv_coarse=False, kv_compact_positions=True, kv_refresh_recent=True)


def view_length(config) -> int:
    """Longest compact view (compact_view) a query sees: sinks + top-k blocks + the largest recent buffer."""
    b = config.compression.block_size
    return config.compression.sink_blocks * b + config.compression.topk_blocks * b + config.compression.window + b + config.prefill_chunk


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
    b, T = config.compression.block_size, prompt_T.numel()
    sink = config.compression.sink_blocks * b
    last_chunk = rng.randint(1, config.prefill_chunk)  # the recent buffer: [window, window + b) + last chunk
    n = max(0, (T - last_chunk - config.compression.window - sink) // b)  # sealed blocks
    if n <= config.compression.topk_blocks:
        return (prompt_T, 0, 0) if layout else prompt_T
    r = sink + n * b

    def blocks(span):
        lo, hi = max(span[0], sink), min(span[1], r)
        return list(range((lo - sink) // b, (hi - 1 - sink) // b + 1)) if lo < hi else []

    k, s = config.compression.topk_blocks, config.compression.select_span
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


def longdoc_sample(rng: random.Random, length: int, tok=BYTES, filler: str = "train"):
    """(prompt + answer prefix ids (T,), answer, spans that must be read, distractor spans): a variable-tracking
    or clause question of <= `length` tokens (deepseek.tasks.haystack) with 1-3 distractors. Byte tokens only
    (spans are character offsets)."""
    from ..tasks.haystack import LongDocument

    if not isinstance(tok, type(BYTES)):
        raise ValueError("long-document training rows need the byte tokenizer (their spans are character offsets)")
    task = LongDocument(rng.choice(["variables", "clause"]), filler=filler, distractors=rng.randint(1, 3), tokenizer=tok)
    ex = task.make_example(rng, max(64, length - 16))
    ids = torch.tensor(tok.encode(ex["prompt"] + ex["answer_prefix"]))
    return ids, ex["answer"], ex["spans"], ex["spans"] + ex["other_spans"]


def selection_row(config, source_T, view_T, tail: int, must, answer_len: int) -> dict | None:
    """What train/selection.py needs of a view row: the source prompt, its sealed blocks when the last tile
    selects, the blocks of each must-read span (sealed ones only), the last tile's and the answer's decoding
    positions in the view. None if the view is the whole prompt or no must-read span is sealed."""
    b = config.compression.block_size
    sink = config.compression.sink_blocks * b
    if tail == 0:
        return None
    last_chunk = view_T.numel() - tail
    n = max(0, (source_T.numel() - last_chunk - config.compression.window - sink) // b)
    targets = []
    for a, z in must:
        if a >= sink and z <= sink + n * b:
            targets.append(list(range((a - sink) // b, (z - 1 - sink) // b + 1)))
    if not targets or n <= config.compression.topk_blocks:
        return None
    plen = view_T.numel()
    return {"source": source_T, "n_blocks": n, "targets": targets, "tile": (tail, plen),
            "decode": list(range(plen, plen + answer_len - 1))}  # fmt: skip


def training_batch(rng: random.Random, batch: int, length: int, max_position: int, keys: int = 1,
                   pose: float = 0.8, min_length: int | None = None, tok=BYTES, max_gap: int | None = None,
                   view=None, view_frac: float = 0.75, view_source: tuple[int, int] = (1024, 8192),
                   with_mask: bool = False, blind_first_layer: bool = False, filler: str = "repeat",
                   longdoc: float = 0.0, sources: list | None = None):  # fmt: skip
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
    not a retrieval query) is filler as often as not, so retrieval is left to the later layers.
    filler: the haystack of every prompt ("repeat", or "train" for real prose of corpus.TRAIN_FAMILIES).
    longdoc: fraction of rows that are variable-tracking or clause questions instead (longdoc_sample).
    sources: a list to append, per row, what selection training needs (train/selection.py): for a view row whose
    must-read spans lie in sealed blocks, {"source", "n_blocks", "targets", "tile", "decode"}; else None."""
    ids, labels, pos, answer, masks = [], [], [], [], []
    for _ in range(batch):
        n_keys = rng.randint(1, keys)
        shortest = length // 2 if min_length is None else min(min_length, length - 8)
        cut = view is not None and rng.random() < view_frac
        n = rng.randint(*view_source) if cut else rng.randint(shortest, length - 8)
        doc = rng.random() < longdoc
        if doc:  # a variable-tracking or clause question (deepseek.tasks.haystack); its needles must all be read
            prompt, key, must, spans = longdoc_sample(rng, n, tok, filler)
        else:
            prompt, key = passkey_sample(rng, n, n_keys, tok, filler)
        if view is not None and prompt.numel() > length - 8:  # many keys need more room: cut it as well
            cut = True
        if cut and not doc:  # one written copy of the asked key for sure, the rest of the needles (any key) maybe
            spans = needle_spans(prompt, tok)
            copies = [sp for sp in needle_spans(prompt, tok, keys=True) if tok.decode(prompt[sp[0] : sp[1]].tolist()) == key]
            must = [rng.choice(copies)]
        if cut:
            source = prompt
            prompt, sel_end, tail = compact_view(rng, prompt, view, must, spans, layout=True)
        else:
            sel_end = tail = 0
        if sources is not None:
            sources.append(selection_row(view, source, prompt, tail, must, len(tok.encode(key))) if cut else None)
        row = torch.cat((prompt, torch.tensor(tok.encode(key + "."))))
        if row.numel() > length:
            raise ValueError(f"passkey training length {length} is below the shortest prompt + answer ({row.numel()})")
        n = row.numel()
        row = torch.nn.functional.pad(row, (0, length - n), value=0)
        lab = row.clone()
        lab[n:] = IGNORE  # no loss on padding
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
            sink = view.compression.sink_blocks * view.compression.block_size if view is not None else 0
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
    if mask.dim() == 4:  # (B, 2, T, T): the first layer's mask, then the others'
        mask = [mask[:, 0]] + [mask[:, 1]] * (len(model.model.layers) - 1)
    return model.lm_head(model.model(input_ids=ids_BT, position_ids=position_ids_BT, mask=mask).last_hidden_state)


def deepen(model, layers: int):
    """A `layers`-layer copy of `model` that computes the same function: after each old layer comes a copy of
    it whose output projections (attention o_proj, MLP down_proj) are zero, so it adds nothing until trained
    (block expansion, as in LLaMA Pro). Dense layers only; layers must be a multiple of the current depth."""
    from deepseek import R1ForCausalLM

    old = model.config.num_hidden_layers
    if layers % old or model.config.first_k_dense_replace < old:
        raise ValueError(f"deepen: {layers} layers is not a multiple of {old}, or the model has MoE layers")
    d = model.config.to_dict()
    d["compression"]["lead_layer"] = None  # the old lead index names another layer now
    config = type(model.config).from_dict({**d, "num_hidden_layers": layers, "first_k_dense_replace": layers})
    new = R1ForCausalLM(config)
    state, per = {}, layers // old
    for k, v in model.state_dict().items():
        if not k.startswith("model.layers."):
            state[k] = v
            continue
        i, rest = k[len("model.layers.") :].split(".", 1)
        for c in range(per):
            zero = c > 0 and rest in ("self_attn.o_proj.weight", "mlp.down_proj.weight")
            state[f"model.layers.{int(i) * per + c}.{rest}"] = torch.zeros_like(v) if zero else v.clone()
    new.load_state_dict(state)
    return new


def train(out: str, steps: int = 600, batch: int = 8, length: int = 384, lr: float = 3e-3, seed: int = 0,
          max_position: int = 131072, keys: int = 1, threads: int | None = None, answer_weight: float = 1.0,
          pose: float = 0.8, pose_after: float = 0.25, eval_every: int = 200, layers: int = 2,
          init: str | None = None, min_length: int | None = None, tokenizer: str = "bytes",
          gap_start: int | None = None, view: bool = False, view_frac: float = 0.75,
          view_source: tuple[int, int] = (1024, 8192), blind_recent: bool = False,
          blind_first_layer: bool = False, lead_layer: int | None = None,
          view_topk: int | None = None, filler: str = "repeat", longdoc: float = 0.0,
          select_weight: float = 0.0, select_rows: int = 4) -> list[float]:  # fmt: skip
    """Train the small byte-level model on passkey data; save it to `out` with a loss curve PNG.

    loss = mean next-byte loss + answer_weight * mean loss on the key bytes of the answer. Position skipping
    (PoSE) starts after a `pose_after` fraction of the steps, so retrieval is first learnt at plain positions.
    Every `eval_every` steps: greedy accuracy on 16 fresh prompts of `length` bytes (logged, shown on the bar).
    init: continue from a saved model (e.g. a longer-row second stage); min_length: shortest row (default
    length // 2), so one run can mix row lengths. view: train for the compressed cache with compact
    positions (VIEW_SETTINGS written into the model's config): a view_frac fraction of rows are what its
    last query attends to in prompts of view_source tokens (compact_view); in-training accuracy is then
    measured through the compressed cache at 4x `length`. blind_recent (with view): the recent tokens before
    the last prefill chunk do not see the selected blocks (training_batch with_mask), as in the cache.
    layers > the init model's: deepen it first (which drops its kv_lead_layer). lead_layer (with view):
    kv_lead_layer for evaluation and saving; None keeps the init model's. view_topk (with view): blocks read
    per query instead of VIEW_SETTINGS' 2 (e.g. 4 = two runs of 2, room for a second needle in multi-key
    views, so the model learns to pick the asked name's key among the needles selection brings).
    filler: the haystack of training rows and in-training checks; the held-out prose family may not be used.
    longdoc: fraction of rows that are variable-tracking or clause questions (deepseek.tasks.haystack).
    select_weight (with view and a lead layer): weight of the selection loss (train/selection.py), which trains the
    lead layer's block choice to find the must-read spans in the view rows' source prompts; on at most
    select_rows rows per step (each costs a prefill of its source through the layers up to the lead layer)."""
    from deepseek import R1ForCausalLM

    from .. import tasks
    from ..tasks.corpus import HELD_OUT

    if filler == HELD_OUT:
        raise ValueError(f"passkey train: {HELD_OUT!r} is the held-out prose family; train on 'train' or another family")
    tasks.Passkey(filler=filler)  # a bad filler fails here, before any work
    if not 0.0 <= longdoc <= 1.0 or (longdoc and tokenizer != "bytes"):
        raise ValueError(f"passkey train: --longdoc must be a fraction in [0, 1] with the byte tokenizer, got {longdoc}")
    if select_weight < 0 or select_rows < 1 or (select_weight and not view):
        raise ValueError(f"passkey train: --select-weight must be >= 0 and needs --view, --select-rows >= 1 "
                         f"(got {select_weight}, {select_rows}, view={view})")  # fmt: skip
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = load_tokenizer(tokenizer)
    config = small_config(max_position_embeddings=max_position + 512, num_hidden_layers=layers,
                          first_k_dense_replace=layers, vocab_size=tok.vocab_size)  # fmt: skip
    model = R1ForCausalLM.from_pretrained(init) if init else R1ForCausalLM(config)
    if init and layers > model.config.num_hidden_layers:
        model = deepen(model, layers)
    model.train()
    if view:
        extra = {"kv_topk_blocks": view_topk} if view_topk is not None else {}
        if lead_layer is not None:
            extra["kv_lead_layer"] = lead_layer
        model.config.set_components(**{**VIEW_SETTINGS, **extra})
        if length < view_length(model.config) + 8:
            raise ValueError(f"--length {length} is below the longest compact view + answer ({view_length(model.config) + 8})")
    hook = None
    if select_weight:
        from .selection import LeadQueries

        hook = LeadQueries(model)  # refuses a model without kv_lead_layer
    eval_length = 4 * length if view else length  # views: prompts long enough to have sealed blocks
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    losses, answer_losses, select_losses, evals, multi_evals = [], [], [], [], []
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
        sources = [] if hook is not None else None
        ids, labels, pos, answer, *mask = training_batch(rng, batch, length, max_position, keys, pose=p,
                                                         min_length=min_length, tok=tok, max_gap=max_gap,
                                                         view=model.config if view else None, view_frac=view_frac,
                                                         view_source=view_source, with_mask=view and blind_recent,
                                                         blind_first_layer=blind_first_layer, filler=filler,
                                                         longdoc=longdoc, sources=sources)  # fmt: skip
        if mask:
            logits = masked_logits(model, ids, pos, mask[0])[:, :-1].float()  # (B, T-1, V)
        else:
            logits = model(ids, position_ids=pos).logits[:, :-1].float()
        target, ans = labels[:, 1:], answer[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none")
        lm = nll[target != IGNORE].mean()
        retr = nll[ans].mean()
        loss = lm + answer_weight * retr
        if hook is not None:
            from .selection import selection_loss

            sel = selection_loss(model, hook, sources, max_rows=select_rows)
            if sel is not None:
                loss = loss + select_weight * sel
                select_losses.append(sel.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(lm.item())
        answer_losses.append(retr.item())
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            model.eval()
            acc = passkey_accuracy(model, eval_length, 16, compressed=view, seed=10_000 + step,
                                   tok=tok, filler=filler)  # fmt: skip
            if keys > 1:  # and the multi-key variant with the most keys
                mk = passkey_accuracy(model, eval_length, 16, compressed=view,
                                      seed=20_000 + step, keys=keys, tok=tok, filler=filler)  # fmt: skip
                multi_evals.append((step + 1, mk))
            model.train()
            evals.append((step + 1, acc))
        post = dict(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}",
                    key=f"{sum(answer_losses[-20:]) / len(answer_losses[-20:]):.3f}")  # fmt: skip
        if select_losses:
            post["select"] = f"{sum(select_losses[-20:]) / len(select_losses[-20:]):.3f}"
        if evals:
            post["acc"] = f"{evals[-1][1]:.2f}"
        if multi_evals:
            post["multi"] = f"{multi_evals[-1][1]:.2f}"
        bar.set_postfix(post)
    model.eval()
    if hook is not None:
        hook.remove()
    Path(out).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if isinstance(tok, HFTokenizer):
        tok.tok.save_pretrained(out)
    log = {"tokenizer": tokenizer, "steps": steps, "batch": batch, "length": length, "lr": lr, "answer_weight": answer_weight,
           "pose": pose, "pose_after": pose_after, "view": view, "view_frac": view_frac, "blind_recent": blind_recent, "blind_first_layer": blind_first_layer, "init": init, "layers": model.config.num_hidden_layers, "lead_layer": model.config.compression.lead_layer, "losses": losses, "answer_losses": answer_losses,
           "evals": evals, "multi_evals": multi_evals, "view_topk": model.config.compression.topk_blocks if view else None, "filler": filler,
           "longdoc": longdoc, "select_weight": select_weight, "select_losses": select_losses}  # fmt: skip
    (Path(out) / "train_log.json").write_text(json.dumps(log))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot(losses, label="all bytes")
    ax[0].plot(answer_losses, label="key bytes of the answer", alpha=0.7)
    if select_losses:
        ax[0].plot(select_losses, label="selection (share off the needle's blocks)", alpha=0.7)
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("loss (nats/byte)")
    ax[0].set_yscale("log")
    ax[0].legend()
    if evals:
        ax[1].plot(*zip(*evals), marker="o", label="1 key")
    if multi_evals:
        ax[1].plot(*zip(*multi_evals), marker="s", label=f"{keys} keys")
        ax[1].legend()
    ax[1].set_xlabel("step")
    ax[1].set_ylabel(f"passkey accuracy at {eval_length} bytes")
    ax[1].set_ylim(-0.02, 1.02)
    fig.suptitle("passkey training")
    fig.tight_layout()
    fig.savefig(Path(out) / "loss.png", dpi=110)
    return losses
