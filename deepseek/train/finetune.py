"""The three-line fine-tuning SDK:

    from deepseek import R1Model
    model = R1Model.from_pretrained("deepseek/r1-tiny")
    metrics = model.finetune(dataset="custom_data.jsonl", epochs=5)   # LoRA (PEFT) by default, merged back
    model.save_pretrained("my-model")

`dataset`: a file or folder (jsonl/json/csv/parquet/txt), a dataset name in the local Hugging Face cache, a
`datasets.Dataset`, or a list of dicts. Chat (`messages`), prompt/completion and question/answer records train
on the assistant side only; `text` records train on every token. LoRA adapts the attention projections and
the stacked routed/shared expert matrices; `lora=False` fine-tunes every weight. Everything that can be wrong
with the data (missing file, empty data, unusable columns) is an error before training starts.

Small data: when `epochs` passes over the data would give fewer than `min_steps` optimizer steps, the batch
size shrinks (down to 1) and, if that is still too few, training runs `min_steps` steps (more passes; the
returned `epochs` says how many). Without `out_dir` the run's folder is a temporary one, removed at the end.

`privacy={"epsilon": 8.0, "delta": 1e-5}` (or True) trains with DP-SGD instead: see deepseek/train/privacy.py.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

ATTENTION_TARGETS = ["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
MLP_TARGETS = ["gate_proj", "up_proj", "down_proj"]  # dense layers and shared experts (nn.Linear)
EXPERT_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj"]  # stacked (E, ., .) routed-expert weights
MIN_STEPS = 50  # optimizer steps a fine-tuning run makes at least (small data: smaller batches, more passes)


def find_tokenizer(model, tokenizer):
    from transformers import AutoTokenizer, PreTrainedTokenizerBase

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    candidates = [tokenizer, model.config._name_or_path]
    for c in candidates:
        if c and (Path(c) / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(str(c))
    raise ValueError("no tokenizer: the model was not loaded from a folder with tokenizer.json; pass "
                     "tokenizer=<folder or tokenizer object>")  # fmt: skip


def finetune(model, dataset, epochs: int = 1, lora: bool = True, lora_rank: int = 8, lora_alpha: int = 16,
             lora_experts: bool = True, merge: bool = True, adapter_dir=None, tokenizer=None, lr: float | None = None,
             batch_size: int = 8, micro_batch_size: int | None = None, seq_len: int = 512, val_fraction: float = 0.05,
             max_steps: int | None = None, out_dir=None, seed: int = 0, progress: bool = True,
             min_steps: int = MIN_STEPS, privacy=None, **overrides) -> dict:  # fmt: skip
    """Fine-tune `model` in place on `dataset`; returns the training metrics (see deepseek.train.trainer.train)
    plus the data stats and the trainable parameter count. With LoRA and merge=True the adapters are merged
    into the weights, so `model.save_pretrained` writes a plain checkpoint; with merge=False the PEFT model is
    returned under metrics["peft_model"]; adapter_dir saves the adapter (PEFT format) either way.
    privacy: None (off), True, a dict (epsilon, delta, max_grad_norm, accountant) or a PrivacyConfig: DP-SGD
    (deepseek/train/privacy.py); the metrics then hold epsilon (final and per epoch), delta, noise_multiplier,
    sample_rate, steps, max_grad_norm, accountant and privacy_unit."""
    from .privacy import resolve_privacy

    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if lora and lora_rank < 1:
        raise ValueError(f"lora_rank must be >= 1, got {lora_rank}")
    if adapter_dir is not None and not lora:
        raise ValueError("adapter_dir needs lora=True (full fine-tuning has no adapter)")
    if min_steps < 0 or batch_size < 1:
        raise ValueError(f"min_steps must be >= 0 and batch_size >= 1, got {min_steps} / {batch_size}")
    dp = resolve_privacy(privacy)
    if dp is not None and overrides:
        raise ValueError(f"private fine-tuning takes no trainer overrides, got {', '.join(sorted(overrides))}")
    tok = find_tokenizer(model, tokenizer)
    if dp is not None:
        from .privacy import prepare_records

        train_records, val_records, stats = prepare_records(dataset, tok, seq_len, val_fraction, str(seed), progress)
        dp.check_records(len(train_records))
        batch_size = min(batch_size, len(train_records))
        steps = max_steps or epochs * math.ceil(len(train_records) / batch_size)
        peft_model = add_lora(model, lora, lora_rank, lora_alpha, lora_experts)
        trained = peft_model if peft_model is not None else model
        metrics = private_finetune(trained, train_records, val_records, dp, steps, batch_size, lr or 2e-3, seed,
                                   progress, tok)  # fmt: skip
        metrics.update(data=stats, epochs=round(steps * batch_size / len(train_records), 2),
                       method="dp-lora" if lora else "dp-full")  # fmt: skip
        return finish(model, peft_model, metrics, adapter_dir, merge)
    from .config import TrainConfig
    from .data import BatchIterator, prepare_data
    from .trainer import train

    data = prepare_data(dataset, tok, block_size=seq_len, val_fraction=val_fraction, salt=str(seed),
                        show_progress=progress)  # fmt: skip
    n_blocks = len(data.train)
    batch_size = small_data_batch(n_blocks, batch_size, epochs, min_steps)
    micro = min(micro_batch_size or batch_size, batch_size)
    while batch_size % micro:
        micro -= 1
    steps_per_epoch = n_blocks // batch_size
    steps = max_steps or max(epochs * steps_per_epoch, min_steps)
    peft_model = add_lora(model, lora, lora_rank, lora_alpha, lora_experts)
    trained = peft_model if peft_model is not None else model
    trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    run_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="deepseek-finetune-"))
    config = TrainConfig(
        out_dir=str(run_dir), mode="sft", seq_len=seq_len,
        batch_size=batch_size, micro_batch_size=micro, max_steps=steps, lr=lr or (2e-3 if lora else 1e-4),
        warmup_steps=max(1, steps // 20), weight_decay=0.0, bias_update_speed=0.0 if lora else 0.001,
        eval_every=max(1, steps_per_epoch), eval_batches=4, resume=False, seed=seed, progress=progress,
        keep_checkpoints=1, **({"save_every": 0} if out_dir is None else {}), **overrides,
    )  # fmt: skip
    train_it = BatchIterator(data.train, batch_size=batch_size, seed=seed)
    val_it = None
    if data.val is not None and len(data.val) > 0:
        val_it = BatchIterator(data.val, batch_size=min(batch_size, len(data.val)), seed=0, shuffle=False)
    try:
        metrics = train(config, model=trained, train_batches=train_it, val_batches=val_it)
    finally:
        if out_dir is None:  # the user named no folder: nothing is left behind
            shutil.rmtree(run_dir, ignore_errors=True)
    if out_dir is None:
        metrics.update(checkpoint=None, out_dir=None)
    metrics.update(data=data.stats, trainable_parameters=trainable, epochs=round(steps / max(steps_per_epoch, 1), 2),
                   method="lora" if lora else "full", batch_size=batch_size)  # fmt: skip
    return finish(model, peft_model, metrics, adapter_dir, merge)


def small_data_batch(n_blocks: int, batch_size: int, epochs: int, min_steps: int) -> int:
    """The batch size, shrunk (down to 1) until `epochs` passes make at least `min_steps` optimizer steps."""
    batch_size = min(batch_size, n_blocks)
    while batch_size > 1 and epochs * (n_blocks // batch_size) < min_steps:
        batch_size -= 1
    return batch_size


def add_lora(model, lora: bool, rank: int, alpha: int, experts: bool):
    if not lora:
        return None
    from peft import LoraConfig, get_peft_model

    peft_config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=ATTENTION_TARGETS + MLP_TARGETS,
                             target_parameters=EXPERT_PARAMETERS if experts else None)  # fmt: skip
    return get_peft_model(model, peft_config)


def private_finetune(trained, train_records, val_records, dp, steps: int, batch_size: int, lr: float, seed: int,
                     progress: bool, tok) -> dict:  # fmt: skip
    from .privacy import LoopConfig
    from .privacy import train_records as run

    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    loop = LoopConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=max(1, steps // 20), seed=seed,
                      progress=progress)  # fmt: skip
    metrics = run(trained, train_records, val_records, loop, dp, pad_id)
    metrics.update(out_dir=None, checkpoint=None, batch_size=batch_size)
    return metrics


def finish(model, peft_model, metrics: dict, adapter_dir, merge: bool) -> dict:
    if peft_model is not None:
        if adapter_dir is not None:
            peft_model.save_pretrained(str(adapter_dir))
        if merge:
            peft_model.merge_and_unload()  # folds B @ A into the base weights of `model`, in place
        else:
            metrics["peft_model"] = peft_model
    model.eval()
    return metrics
