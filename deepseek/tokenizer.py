"""Byte-level BPE tokenizer for the R1 models, trained with Hugging Face `tokenizers`.

    from deepseek.tokenizer import train_tokenizer, default_corpus
    tok = train_tokenizer(default_corpus(), vocab_size=4096, out_dir="runs/tok")   # or files / a folder
    tok = transformers.AutoTokenizer.from_pretrained("runs/tok")
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True)

CLI: `deepseek tokenizer train --out runs/tok --vocab-size 4096 [FILES_OR_FOLDERS ...]` (no files: the
default corpus). Special tokens have fixed ids (0 <|bos|>, 1 <|eos|>, 2 <|pad|>, 3-5 roles, 6-7 think tags,
8-10 modality placeholders, then reserved). Digits are split one per token, which arithmetic needs.

Chat format (DeepSeek-R1 style, every assistant turn ends with <|eos|> so generation stops there):
    <|bos|><|system|>You are...<|user|>What is 2 + 3?<|assistant|><think>\\n...\\n</think>\\n\\n5<|eos|>
An assistant message's reasoning can be given inside its content or as `reasoning_content`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from .chat import THINK_CLOSE, THINK_OPEN

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
THINK, END_THINK = THINK_OPEN, THINK_CLOSE
IMAGE, AUDIO, POINTS = "<image>", "<audio>", "<points>"
RESERVED = [f"<|reserved_{i}|>" for i in range(5)]
SPECIAL_TOKENS = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, THINK, END_THINK, IMAGE, AUDIO, POINTS, *RESERVED]
NOT_SKIPPED = (THINK, END_THINK)  # kept by decode(skip_special_tokens=True): reasoning stays visible
TEXT_SUFFIXES = (".txt", ".md", ".text")

# {% generation %} marks assistant tokens for apply_chat_template(return_assistant_tokens_mask=True).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>' + message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>' }}"
    "{% generation %}"
    "{% if message.get('reasoning_content') %}"
    "{{ '<think>\\n' + message['reasoning_content'] + '\\n</think>\\n\\n' }}"
    "{% endif %}"
    "{{ message['content'] + eos_token }}"
    "{% endgeneration %}"
    "{% else %}{{ raise_exception('chat role must be system, user or assistant, got ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def default_corpus(n_per_task: int = 300, seed: int = 0, prose_repeats: int = 20) -> list[str]:
    """Tokenizer training text made offline: task prompts, reasoning and answers at several difficulties,
    plus the package's English prose (repeated so that ordinary words get merges too)."""
    from .tasks import TASKS, get_task
    from .tasks.filler import PROSE

    texts = []
    for name in TASKS:
        task = get_task(name)
        levels = [task.min_difficulty] if name.startswith("passkey") else range(1, 7)
        for d in levels:
            d = max(d, task.min_difficulty, 128 if name.startswith("passkey") else 0)
            if d > task.max_difficulty:
                continue
            n = max(1, n_per_task // len(levels)) if not name.startswith("passkey") else 4
            for ex in task.generate(n, seed=seed, difficulty=d):
                texts.append(f"{ex['prompt']}\n{ex['reasoning']}\n{ex['answer']}")
    paragraphs = [p.strip() for p in PROSE.split("\n\n") if p.strip()]
    texts += paragraphs * prose_repeats
    return texts


def _expand(texts_or_files) -> Iterator[str]:
    """Texts from: a text, a file, a folder, or an iterable mixing them. Non-text files (jsonl, csv,
    parquet) go through the data loader and every text field of every record is used."""
    if isinstance(texts_or_files, (str, Path)):
        texts_or_files = [texts_or_files]
    for item in texts_or_files:
        # a str is a path only if it names an existing file or folder (an empty or multi-line str is text)
        is_path = isinstance(item, Path) or (item.strip() == item and 0 < len(item) < 4096 and "\n" not in item
                                             and os.path.exists(item))  # fmt: skip
        path = Path(item) if is_path else None
        if path is not None and path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            yield from _expand(files)
        elif path is not None and path.is_file():
            if path.suffix.lower() in TEXT_SUFFIXES:
                yield path.read_text(encoding="utf-8", errors="replace")
            else:
                from .train.data import load_records, record_texts

                for record in load_records(path):
                    yield from record_texts(record)
        elif isinstance(item, Path):
            raise FileNotFoundError(f"tokenizer corpus: no such file or folder: {item}")
        else:
            yield item


def build_bpe() -> Tokenizer:
    """An untrained byte-level BPE with digit splitting (the pipeline every R1 tokenizer uses)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def train_tokenizer(
    texts_or_files: str | os.PathLike | Iterable[str | os.PathLike],
    vocab_size: int = 4096,
    out_dir: str | os.PathLike | None = None,
    min_frequency: int = 2,
    show_progress: bool = True,
    model_max_length: int = 131072,
) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on texts / files / folders and save it (tokenizer.json + tokenizer_config.json
    with the chat template) to `out_dir` when given. Returns the transformers tokenizer."""
    floor = 256 + len(SPECIAL_TOKENS)
    if not isinstance(vocab_size, int) or vocab_size < floor:
        raise ValueError(f"vocab_size must be an integer >= {floor} (256 bytes + special tokens), got {vocab_size!r}")
    texts = [t for t in _expand(texts_or_files) if t]
    if not texts:
        raise ValueError("tokenizer corpus is empty: give texts, files or folders with some text in them")
    tok = build_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress,
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    # think tags: not "special", so decoding with skip_special_tokens keeps the reasoning markers
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in NOT_SKIPPED])
    spec = json.loads(tok.to_str())
    for added in spec["added_tokens"]:
        if added["content"] in NOT_SKIPPED:
            added["special"] = False
    tok = Tokenizer.from_str(json.dumps(spec))
    fast = wrap(tok, model_max_length)
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def wrap(tok: Tokenizer, model_max_length: int = 131072) -> PreTrainedTokenizerFast:
    """The transformers tokenizer around a trained `tokenizers.Tokenizer`, with our specials and template."""
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=model_max_length,
        extra_special_tokens={"image_token": IMAGE, "audio_token": AUDIO, "points_token": POINTS},
        clean_up_tokenization_spaces=False,
    )  # fmt: skip
    fast.chat_template = CHAT_TEMPLATE
    return fast
