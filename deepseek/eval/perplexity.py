"""Perplexity of a model on a text file, folder or dataset: exp(mean next-token NLL) over non-overlapping
windows of `seq_len` tokens of the concatenated documents (each document <bos> text <eos>).

Legend: B windows per batch, T window length, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..train.data import IGNORE


def corpus_tokens(source, tokenizer, max_records: int | None = None) -> torch.Tensor:
    """One 1-D stream of token ids from any source deepseek.train.data can load (texts of every record)."""
    from ..train.data import detect_kind, load_records, record_texts

    ds = load_records(source)
    kind = detect_kind(ds.column_names, str(source) if isinstance(source, str) else "dataset")
    if max_records is not None:
        ds = ds.select(range(min(max_records, len(ds))))
    texts = [t for r in ds for t in record_texts(r, kind) if t]
    if not texts:
        raise ValueError(f"{source}: no text to evaluate")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = [t for enc in tokenizer(texts, add_special_tokens=False)["input_ids"] for t in bos + enc + eos]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def perplexity(model, tokenizer, source, seq_len: int = 256, batch_size: int = 8, max_tokens: int | None = None,
               show_progress: bool = False) -> dict:  # fmt: skip
    """{"perplexity", "nll", "tokens", "windows"} of `model` on `source`."""
    from tqdm.auto import tqdm

    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    stream = source if isinstance(source, torch.Tensor) else corpus_tokens(source, tokenizer)
    if max_tokens is not None:
        stream = stream[:max_tokens]
    n_windows = max(1, math.ceil((stream.numel() - 1) / (seq_len - 1)))
    if stream.numel() < 2:
        raise ValueError("need at least 2 tokens to measure perplexity")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll_sum, count = 0.0, 0
    # window w covers tokens [w*(T-1), w*(T-1)+T): consecutive windows share one token, so every token after
    # the first is predicted exactly once
    starts = [w * (seq_len - 1) for w in range(n_windows)]
    for i in tqdm(range(0, n_windows, batch_size), desc="perplexity", unit="batch", disable=not show_progress):
        windows = [stream[s : s + seq_len] for s in starts[i : i + batch_size]]
        lengths = [w.numel() for w in windows]
        T = max(lengths)
        ids_BT = torch.zeros(len(windows), T, dtype=torch.long)
        labels_BT = torch.full((len(windows), T), IGNORE, dtype=torch.long)
        for b, w in enumerate(windows):
            ids_BT[b, : w.numel()] = w
            labels_BT[b, : w.numel()] = w
        logits_BTV = model(input_ids=ids_BT.to(device)).logits.float()
        nll = F.cross_entropy(logits_BTV[:, :-1].flatten(0, 1), labels_BT[:, 1:].flatten().to(device),
                              ignore_index=IGNORE, reduction="sum")  # fmt: skip
        nll_sum += float(nll)
        count += int((labels_BT[:, 1:] != IGNORE).sum())
    model.train(was_training)
    mean = nll_sum / max(count, 1)
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": count, "windows": n_windows}
