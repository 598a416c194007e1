"""User data for training: loading, column detection, tokenisation with assistant-only loss, packing,
a content-hash train/validation split, and a resumable batch iterator.

    from deepseek.train.data import prepare_data, BatchIterator
    data = prepare_data("my_data.jsonl", tokenizer, block_size=512, val_fraction=0.05)
    it = BatchIterator(data.train, batch_size=8, seed=0)
    batch = next(it)                       # {"input_ids": (B, T) long, "labels": (B, T) long, -100 = no loss}
    state = it.state_dict(); ...; it.load_state_dict(state)   # exact resume

Sources: a .jsonl/.json/.csv/.tsv/.parquet/.txt/.md file, a folder of them (or a `save_to_disk` folder),
a `datasets.Dataset`/`DatasetDict`, or a dataset name present in the local Hugging Face cache (offline).
Record kinds, by columns: messages (chat) > prompt/completion > question/answer > text. Labels are aligned
with input_ids (the model shifts inside); only assistant tokens carry labels for chat/SFT records.
Shapes: N blocks, T = block_size, B = batch size.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..model.transformer import IGNORE  # noqa: F401  (re-exported: the trainer, GRPO and evaluation use it)

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt", ".md")
# kind -> accepted (first, second) column pairs, in order of preference
PAIR_COLUMNS = {
    "prompt_completion": [("prompt", "completion"), ("prompt", "response"), ("instruction", "output")],
    "question_answer": [("question", "answer"), ("problem", "solution")],
}
TEXT_COLUMNS = ("text", "content")
KINDS = ("messages", "prompt_completion", "question_answer", "text")


# ---------------------------------------------------------------------------------------------- loading
def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: each line must be a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return _read_jsonl(path)  # a .json file holding JSON lines
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()) and data:
        n = len(next(iter(data.values())))
        return [{k: v[i] for k, v in data.items()} for i in range(n)]
    if isinstance(data, list) and all(isinstance(r, dict) for r in data):
        return data
    raise ValueError(f"{path}: JSON must be a list of objects or an object of equal-length lists")


def _read_file(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix in (".txt", ".md"):
        return [{"text": path.read_text(encoding="utf-8", errors="replace")}]
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")


def _cached_hub_dataset(name: str, split: str):
    """A dataset name that `datasets` has cached locally, loaded without touching the network; None if absent."""
    import datasets

    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        return None
    cache_dir = os.path.expanduser(str(datasets.config.HF_DATASETS_CACHE))
    parts = name.split("/")
    root = os.path.join(cache_dir, "___".join(parts))
    configs = sorted({Path(p).parent.parent.name for p in glob.glob(os.path.join(root, "*", "*", "*"))
                      if os.path.isdir(p)})  # fmt: skip
    if not configs:
        return None
    config = "default" if "default" in configs else configs[0] if len(configs) == 1 else None
    if config is None:
        raise ValueError(f"dataset {name!r} has several cached configs ({', '.join(configs)}); load it with "
                         "datasets.load_dataset(name, config) and pass the Dataset")  # fmt: skip
    from datasets.packaged_modules.cache.cache import Cache

    builder = Cache(cache_dir=cache_dir, dataset_name=parts[-1], repo_id=name, config_name=config,
                    version="auto", hash="auto")  # fmt: skip
    splits = list(builder.info.splits or {})
    if splits and split not in splits:
        raise ValueError(f"dataset {name!r} has no split {split!r}; it has: {', '.join(splits)}")
    return builder.as_dataset(split=split)


def load_records(source, split: str = "train"):
    """A `datasets.Dataset` from a path, a folder, a Dataset/DatasetDict or a locally cached dataset name.
    Raises FileNotFoundError / ValueError with one clear line for anything unusable, including empty data."""
    import datasets

    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise ValueError(f"the DatasetDict has no split {split!r}; it has: {', '.join(source)}")
        source = source[split]
    if isinstance(source, datasets.Dataset):
        ds, where = source, "the given Dataset"
    elif isinstance(source, (list, tuple)) and all(isinstance(r, dict) for r in source):
        ds, where = datasets.Dataset.from_list(list(source)), "the given records"
    elif isinstance(source, (str, os.PathLike)):
        path, where = Path(source).expanduser(), str(source)
        if path.is_dir() and (path / "state.json").exists() and (path / "dataset_info.json").exists():
            ds = datasets.load_from_disk(str(path))
            return load_records(ds, split)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_SUFFIXES)
            if not files:
                raise ValueError(f"{path}: folder has no data files ({', '.join(FILE_SUFFIXES)})")
            rows = [r for f in files for r in _read_file(f)]
            ds = datasets.Dataset.from_list(rows) if rows else None
        elif path.is_file():
            rows = _read_file(path)
            ds = datasets.Dataset.from_list(rows) if rows else None
        else:
            ds = _cached_hub_dataset(str(source), split)
            if ds is None:
                raise FileNotFoundError(
                    f"{source}: no such file or folder, and no dataset of that name in the local Hugging Face "
                    f"cache ({datasets.config.HF_DATASETS_CACHE})"
                )
    else:
        raise ValueError(f"unsupported data source of type {type(source).__name__}: give a path, a dataset "
                         "name, a datasets.Dataset or a list of dicts")  # fmt: skip
    if ds is None or len(ds) == 0:
        raise ValueError(f"{where}: the dataset is empty")
    detect_kind(ds.column_names, where)
    return ds


# ---------------------------------------------------------------------------------------------- columns
def detect_kind(columns: Iterable[str], where: str = "dataset") -> str:
    """The record kind a set of columns supports; ValueError naming the columns found if none."""
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    for kind, pairs in PAIR_COLUMNS.items():
        if any(a in cols and b in cols for a, b in pairs):
            return kind
    if any(c in cols for c in TEXT_COLUMNS):
        return "text"
    raise ValueError(
        f"{where}: no usable columns (found: {', '.join(sorted(cols)) or 'none'}); need 'messages', "
        "'prompt'+'completion', 'question'+'answer' or 'text'"
    )


def _pair(record: dict, kind: str) -> tuple[str, str]:
    for a, b in PAIR_COLUMNS[kind]:
        if a in record and b in record:
            first = str(record[a])
            if a == "instruction" and record.get("input"):
                first = f"{first}\n\n{record['input']}"
            return first, str(record[b])
    raise ValueError(f"record has no {kind} columns: {sorted(record)}")


def _text(record: dict) -> str:
    return next(str(record[c]) for c in TEXT_COLUMNS if c in record and record[c] is not None)


def record_texts(record: dict, kind: str | None = None) -> list[str]:
    """The strings of a record (message contents, prompt and completion, or the text)."""
    kind = kind or detect_kind(record)
    if kind == "messages":
        return [str(m.get("content") or "") + str(m.get("reasoning_content") or "") for m in record["messages"]]
    if kind == "text":
        return [_text(record)]
    return list(_pair(record, kind))


def to_messages(record: dict, kind: str | None = None) -> list[dict] | None:
    """Chat messages for a chat/SFT record (None for plain text)."""
    kind = kind or detect_kind(record)
    if kind == "messages":
        msgs = record["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m for m in msgs):
            raise ValueError("'messages' must be a list of {'role': ..., 'content': ...} objects")
        return msgs
    if kind == "text":
        return None
    first, second = _pair(record, kind)
    return [{"role": "user", "content": first}, {"role": "assistant", "content": second}]


# ---------------------------------------------------------------------------------------------- tokens
def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    Works with any prefix-stable chat template: a span is what an assistant message adds after the
    generation prompt (its content and end-of-turn token)."""
    full = _render(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True)
        after = full if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1], False)
        if not (after.startswith(before) and full.startswith(after)):
            raise ValueError("the tokenizer's chat template is not prefix-stable; cannot locate assistant turns")
        spans.append((len(before), len(after)))
    return full, spans


def _span_labels(ids: list[int], offsets, spans) -> list[int]:
    return [t if any(s <= start < e for s, e in spans) else IGNORE for t, (start, _) in zip(ids, offsets)]


def chat_ids_labels(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of a rendered conversation, and labels that keep only assistant-turn tokens."""
    full, spans = assistant_spans(messages, tokenizer)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], _span_labels(enc["input_ids"], enc["offset_mapping"], spans)


def tokenize_record(record: dict, tokenizer, kind: str | None = None, chat: bool | None = None):
    """(input_ids, labels) of one record; see tokenize_records."""
    return tokenize_records([record], tokenizer, kind or detect_kind(record), chat, show_progress=False)[0]


def tokenize_records(records: Sequence[dict], tokenizer, kind: str, chat: bool | None = None,
                     batch_size: int = 512, show_progress: bool = True) -> list[tuple[list[int], list[int]]]:  # fmt: skip
    """(input_ids, labels) per record, tokenised in batches.

    Text: <bos> text <eos>, every token trained. Chat/SFT: the chat template (when the tokenizer has one and
    `chat` is not False), loss on assistant tokens only; without a template, <bos> prompt completion <eos>
    with loss on the completion and <eos>."""
    from tqdm.auto import tqdm

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    head, tail = ([bos] if bos is not None else []), ([eos] if eos is not None else [])
    use_chat = getattr(tokenizer, "chat_template", None) is not None if chat is None else chat

    def encode(texts, offsets=False):
        return tokenizer(texts, add_special_tokens=False, return_offsets_mapping=offsets)

    out = []
    bar = tqdm(total=len(records), desc="tokenize", unit="rec", disable=not show_progress)
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        if kind == "text":
            for ids in encode([_text(r) for r in chunk])["input_ids"]:
                ids = head + ids + tail
                out.append((ids, list(ids)))
        elif use_chat:
            rendered = [assistant_spans(to_messages(r, kind), tokenizer) for r in chunk]
            enc = encode([full for full, _ in rendered], offsets=True)
            for ids, offs, (_, spans) in zip(enc["input_ids"], enc["offset_mapping"], rendered):
                out.append((ids, _span_labels(ids, offs, spans)))
        else:
            pairs = [to_messages(r, kind) for r in chunk]
            if any(len(m) != 2 for m in pairs):
                raise ValueError("multi-turn 'messages' need a tokenizer with a chat template")
            prompts = encode([m[0]["content"] for m in pairs])["input_ids"]
            completions = encode([m[1]["content"] for m in pairs])["input_ids"]
            for p, c in zip(prompts, completions):
                p, c = head + p, c + tail
                out.append((p + c, [IGNORE] * len(p) + c))
        bar.update(len(chunk))
    bar.close()
    return out


# ---------------------------------------------------------------------------------------------- split
def content_key(record: dict, kind: str | None = None) -> str:
    """sha256 of the record's normalised content (case and whitespace folded): duplicates share a key."""
    text = "\x1f".join(" ".join(t.split()).lower() for t in record_texts(record, kind))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_by_hash(keys: Sequence[str], val_fraction: float, salt: str = "") -> tuple[list[int], list[int]]:
    """(train indices, validation indices) decided by the hash of each content key, so every copy of the same
    content lands on the same side: the two sides never share a key. If the fraction leaves the validation
    side empty, the whole content group with the smallest hash goes there (still no overlap)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    score = {k: int(hashlib.sha256((salt + k).encode()).hexdigest()[:15], 16) / 16**15 for k in set(keys)}
    val_keys = {k for k, s in score.items() if s < val_fraction}
    if val_fraction > 0 and not val_keys and len(score) > 1:
        val_keys = {min(score, key=score.get)}
    if len(val_keys) == len(score) and len(score) > 1:
        val_keys.discard(max(val_keys, key=score.get))
    train = [i for i, k in enumerate(keys) if k not in val_keys]
    val = [i for i, k in enumerate(keys) if k in val_keys]
    return train, val


# ---------------------------------------------------------------------------------------------- packing
@dataclass
class Blocks:
    """Fixed-length training blocks: input_ids_NT and labels_NT (IGNORE = no loss, also on padding)."""

    input_ids: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def block_size(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_label_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


def pack(sequences: Sequence[tuple[list[int], list[int]]], block_size: int, pad_id: int,
         split_documents: bool = True) -> Blocks:  # fmt: skip
    """Pack (ids, labels) sequences into blocks of `block_size` tokens.

    split_documents=True: one stream cut every block_size tokens (pretraining style; the last block padded).
    split_documents=False: whole sequences placed in order into the current block while they fit, the rest
    padded (SFT style); a sequence longer than a block is truncated to it."""
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    blocks_ids, blocks_labels = [], []
    if split_documents:
        ids = [t for s, _ in sequences for t in s]
        labels = [t for _, s in sequences for t in s]
        for start in range(0, len(ids), block_size):
            blocks_ids.append(ids[start : start + block_size])
            blocks_labels.append(labels[start : start + block_size])
    else:
        cur_ids, cur_labels = [], []
        for s_ids, s_labels in sequences:
            s_ids, s_labels = s_ids[:block_size], s_labels[:block_size]
            if cur_ids and len(cur_ids) + len(s_ids) > block_size:
                blocks_ids.append(cur_ids)
                blocks_labels.append(cur_labels)
                cur_ids, cur_labels = [], []
            cur_ids, cur_labels = cur_ids + s_ids, cur_labels + s_labels
        if cur_ids:
            blocks_ids.append(cur_ids)
            blocks_labels.append(cur_labels)
    input_ids_NT = torch.full((len(blocks_ids), block_size), pad_id, dtype=torch.long)
    labels_NT = torch.full((len(blocks_ids), block_size), IGNORE, dtype=torch.long)
    for n, (i, l) in enumerate(zip(blocks_ids, blocks_labels)):
        input_ids_NT[n, : len(i)] = torch.tensor(i, dtype=torch.long)
        labels_NT[n, : len(l)] = torch.tensor(l, dtype=torch.long)
    return Blocks(input_ids_NT, labels_NT)



def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids_BT, attention_mask_BT) of prompts, every row right-aligned to the longest (what generate() takes).
    Used by evaluation and GRPO rollouts."""
    if not rows:
        raise ValueError("left_pad needs at least one row")
    if not all(len(r) for r in rows):
        raise ValueError(f"left_pad: row {next(i for i, r in enumerate(rows) if not len(r))} is empty; "
                         "every prompt needs at least one token")  # fmt: skip
    T = max(len(r) for r in rows)
    ids_BT = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask_BT = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):
        ids_BT[b, T - len(r) :] = torch.tensor(list(r), dtype=torch.long)
        mask_BT[b, T - len(r) :] = 1
    return ids_BT, mask_BT

# ---------------------------------------------------------------------------------------------- prepare
@dataclass
class PreparedData:
    train: Blocks
    val: Blocks | None
    kind: str
    stats: dict = field(default_factory=dict)


def prepare_data(source, tokenizer, block_size: int, val_fraction: float = 0.05, split: str = "train",
                 kind: str | None = None, split_documents: bool | None = None, max_records: int | None = None,
                 salt: str = "", show_progress: bool = True) -> PreparedData:  # fmt: skip
    """Load, check, split by content hash, tokenise and pack. Errors come before any tokenisation.

    split_documents defaults to True for text (pretraining) and False for chat/SFT records."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    ds = load_records(source, split)
    kind = kind or detect_kind(ds.column_names, str(source) if isinstance(source, (str, Path)) else "dataset")
    if max_records is not None:
        ds = ds.select(range(min(max_records, len(ds))))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    records = list(ds)
    keys = [content_key(r, kind) for r in records]
    train_idx, val_idx = split_by_hash(keys, val_fraction, salt)
    seqs = tokenize_records(records, tokenizer, kind, show_progress=show_progress)
    split_documents = (kind == "text") if split_documents is None else split_documents
    train = pack([seqs[i] for i in train_idx], block_size, pad_id, split_documents)
    val = pack([seqs[i] for i in val_idx], block_size, pad_id, split_documents) if val_idx else None
    if len(train) == 0 or train.num_label_tokens == 0:
        raise ValueError("no training tokens with labels after tokenisation (empty or all-masked records)")
    stats = {"records": len(records), "train_records": len(train_idx), "val_records": len(val_idx),
             "train_blocks": len(train), "val_blocks": len(val) if val is not None else 0,
             "train_tokens": train.num_label_tokens, "block_size": block_size, "kind": kind}  # fmt: skip
    return PreparedData(train, val, kind, stats)


# ---------------------------------------------------------------------------------------------- batches
class BatchIterator:
    """Endless shuffled batches over Blocks, one permutation per epoch from (seed, epoch), with an exact
    resumable position. With world_size > 1 every rank walks the same permutation and takes its own slice
    of each global batch (batch_size is per rank)."""

    def __init__(self, blocks: Blocks, batch_size: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, drop_last: bool = True):  # fmt: skip
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size={batch_size} / rank={rank} / world_size={world_size}")
        global_batch = batch_size * world_size
        if drop_last and len(blocks) < global_batch:
            raise ValueError(f"only {len(blocks)} blocks for a global batch of {global_batch}; use less data per "
                             "batch (batch size, block size) or more data")  # fmt: skip
        self.blocks, self.batch_size, self.seed, self.shuffle = blocks, batch_size, seed, shuffle
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.steps_per_epoch = (len(blocks) // global_batch) if drop_last else math.ceil(len(blocks) / global_batch)
        self.epoch, self.step = 0, 0
        self._perm, self._perm_epoch = None, -1

    def _order(self) -> torch.Tensor:
        if self._perm_epoch != self.epoch:
            n = len(self.blocks)
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
                self._perm = torch.randperm(n, generator=g)
            else:
                self._perm = torch.arange(n)
            self._perm_epoch = self.epoch
        return self._perm

    def __iter__(self):
        return self

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        start = (self.step * self.world_size + self.rank) * self.batch_size
        idx = self._order()[start : start + self.batch_size]
        self.step += 1
        return {"input_ids": self.blocks.input_ids[idx], "labels": self.blocks.labels[idx]}  # (B, T) each

    @property
    def position(self) -> float:
        """Epochs done, fractional."""
        return self.epoch + self.step / max(1, self.steps_per_epoch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "num_blocks": len(self.blocks),
                "batch_size": self.batch_size, "world_size": self.world_size}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        for k in ("num_blocks", "batch_size", "world_size"):
            mine = len(self.blocks) if k == "num_blocks" else getattr(self, k)
            if state.get(k, mine) != mine:
                raise ValueError(f"cannot resume data position: saved {k}={state[k]} but this run has {mine}")
        self.epoch, self.step, self.seed = int(state["epoch"]), int(state["step"]), int(state["seed"])
