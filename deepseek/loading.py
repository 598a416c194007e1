"""Load a model and its tokenizer from one folder, a bundled name or a repo in the local HF cache.

    from deepseek.loading import load_model_and_tokenizer
    model, tokenizer = load_model_and_tokenizer("deepseek/r1-tiny")            # ready for decoding
    model, tokenizer = load_model_and_tokenizer("runs/x/final", tokenizer="runs/tok")

The one loader the CLI, evaluation, the serving engine and the benchmarks share.
"""

from __future__ import annotations

from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
DEFAULT_MODEL = "deepseek/r1-tiny-mm"  # what `deepseek chat`, `generate` and `serve` load without --model


def load_model_and_tokenizer(name_or_path, *, tokenizer=None, device: str = "cpu", int8: bool = False, dtype=None,
                             for_decode: bool = True):  # fmt: skip
    """(model, tokenizer). tokenizer: a folder to take it from (default: the model's own). for_decode lays the
    weights out for one-token decode (same values; see prepare_for_decode). Errors name what is missing."""
    from transformers import AutoTokenizer

    from .compat.checkpoint import resolve
    from .model.layout import prepare_for_decode
    from .model.quant import quantize_int8
    from .sdk import R1Model

    path = resolve(name_or_path)
    tok_dir = Path(tokenizer) if tokenizer else path
    if not any((tok_dir / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{tok_dir} has no tokenizer (tokenizer.json); save one next to the model "
                                "or pass --tokenizer <folder>")  # fmt: skip
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    model = R1Model.from_pretrained(path, device=device, dtype=dtype).eval()
    if len(tok) > model.config.vocab_size:
        raise ValueError(f"{path}: tokenizer has {len(tok)} tokens but the model's vocab is {model.config.vocab_size}")
    if int8:
        quantize_int8(model)
    elif for_decode:
        prepare_for_decode(model)
    return model, tok


def served_name(name_or_path) -> str:
    """The model name a server reports: the bundled / repo name, or a folder's own name."""
    from .compat.checkpoint import resolve

    return str(name_or_path) if not Path(str(name_or_path)).is_dir() else resolve(name_or_path).name
