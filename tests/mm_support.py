"""Shared pieces for the multimodal LM tests (no tests here): a tiny random multimodal R1Model folder with the
bundled r1-tiny tokenizer (which has the <image> / <audio> / <points> tokens), and small media items."""

from __future__ import annotations

import io
import wave
from pathlib import Path

import numpy as np
import torch
from helpers import ROOT, random_model, tiny_config

from deepseek import R1Model
from deepseek.multimodal.base import MultimodalConfig
from deepseek.multimodal.binding import BindingModel
from deepseek.multimodal.lm import attach

TOKENIZER = ROOT / "deepseek" / "bundled" / "r1-tiny"
SMALL = MultimodalConfig(dim=32, heads=2, layers=1, n_groups=8, group_size=8, sample_points=64)


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER))


def multimodal_model(seed: int = 0, tokens_per_item: int = 4) -> tuple[R1Model, object]:
    tok = tokenizer()
    cfg = tiny_config(vocab_size=len(tok), max_position_embeddings=512)
    model = random_model(cfg, seed=seed, cls=R1Model)
    torch.manual_seed(seed)
    attach(model, tok, BindingModel(SMALL), tokens_per_item=tokens_per_item)
    with torch.no_grad():  # fresh projectors are near zero: make their output visible in the logits
        for p in model.multimodal.projectors.parameters():
            p.normal_(0, 0.5)
    model.config._name_or_path = str(TOKENIZER)
    return model.eval(), tok


def make_mm_model_dir(path: Path, seed: int = 0) -> Path:
    model, tok = multimodal_model(seed)
    model.save_pretrained(path)
    tok.save_pretrained(str(path))
    return path


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((12, 9, 3)).astype(np.float32)


def png_bytes(seed: int = 0) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((image(seed) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes(seconds: float = 0.5, rate: int = 22050, freq: float = 440.0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    x = (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(x.tobytes())
    return buf.getvalue()


def cloud(seed: int = 0, n: int = 200) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3)).astype(np.float32)


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()
