"""The bundled default model, deepseek/r1-tiny-mm: what `deepseek chat` / `serve` load without --model. It is
r1-tiny plus the bound encoders and projectors, answers media questions (held-out 3D glyphs from fonts it
never saw), and still does r1-tiny's arithmetic."""

from __future__ import annotations

import json

import pytest
import torch

from deepseek.compat.checkpoint import resolve
from deepseek.loading import DEFAULT_MODEL, load_model_and_tokenizer

NAME = "deepseek/r1-tiny-mm"


@pytest.fixture(scope="module")
def loaded():
    return load_model_and_tokenizer(NAME)


def test_it_is_the_default_and_small():
    assert DEFAULT_MODEL == NAME
    folder = resolve(NAME)
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "multimodal.safetensors", "processor_config.json",
            "tokenizer.json", "generation_config.json", "training.json"} <= files  # fmt: skip
    assert sum(p.stat().st_size for p in folder.iterdir()) < 25 * 2**20
    record = json.loads((folder / "training.json").read_text())
    assert record["eval"]["points"]["n"] >= 100  # the held-out evaluation travels with the weights


def test_answers_held_out_point_clouds(loaded):
    """20 clouds of Computer Modern glyphs (fonts never trained on), one per digit x 2 fonts."""
    from deepseek.eval.multimodal import lm_answer_accuracy
    from deepseek.multimodal import data

    model, tok = loaded
    rng = __import__("numpy").random.default_rng(7)
    fonts = data.font_files("test")[:2]
    items = [data.glyph_points(f, d, 1024, rng) for f in fonts for d in range(10)]
    digits = [d for _ in fonts for d in range(10)]
    acc = lm_answer_accuracy(model, tok, "points", items, digits)["accuracy"]
    assert acc >= 0.8, acc  # chance is 0.1; the full benchmark (300 items): 96.3%, docs/multimodal_lm.md


def test_keeps_arithmetic(loaded):
    from deepseek.eval.tasks import task_accuracy

    model, tok = loaded
    with torch.inference_mode():
        acc = task_accuracy(model, tok, "addition", n=16, difficulty=2, max_new_tokens=256)["accuracy"]
    assert acc >= 0.9, acc
