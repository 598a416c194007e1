"""The multimodal recipe stage end to end on a few items: trains projectors + LoRA, merges, saves a checkpoint
that loads as a multimodal R1Model with its processor, and reports the held-out evaluation."""

from __future__ import annotations

import json
import re

import pytest
import torch

from deepseek import R1Model
from deepseek.model.transformer import IGNORE
from deepseek.multimodal.processor import R1Processor
from deepseek.train.multimodal import QUESTIONS, MultimodalRecipe, stage_loss, train_multimodal


def test_stage_trains_saves_and_evaluates(tmp_path):
    recipe = MultimodalRecipe(out_dir=str(tmp_path / "run"), steps=4, warmup=1, media_batch=4, replay_batch=1,
                              train_items=24, eval_items=6, points_per_glyph=1, points_per_cloud=256,
                              modalities=("image", "points"), image_views=1)  # fmt: skip
    record = train_multimodal(recipe, progress=False)
    assert record["training_features"] == {"image": 48, "points": 24}  # clean + one augmented view of each image
    assert torch.isfinite(torch.tensor(record["loss_last25"])) and record["trainable_parameters"] > 0
    final = tmp_path / "run" / "final"
    model = R1Model.from_pretrained(final)
    assert model.multimodal is not None and set(model.multimodal.projectors) == {"image", "points"}
    proc = R1Processor.from_pretrained(final)
    assert json.loads((final / "processor_config.json").read_text())["tokens_per_item"] == 8
    ev = record["eval"]
    assert ev["image"]["n"] == 6 and 0 <= ev["image"]["lm_answer"] <= 1 and 0 <= ev["points"]["zero_shot"] <= 1
    # LoRA was merged: the saved LM differs from r1-tiny's, and has no LoRA keys
    base = R1Model.from_pretrained("deepseek/r1-tiny")
    ids = proc(text="What is 2 + 3?")["input_ids"]
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base(ids).logits)
    assert not any("lora" in k for k in model.state_dict())


@pytest.mark.parametrize("lm", ["frozen", "lora"])
def test_projector_only_keeps_the_lm_and_lora_merges(tmp_path, lm):
    recipe = MultimodalRecipe(out_dir=str(tmp_path / lm), steps=2, warmup=1, media_batch=2, replay_batch=0,
                              train_items=8, eval_items=2, points_per_glyph=1, points_per_cloud=128,
                              modalities=("points",), lm=lm)  # fmt: skip
    train_multimodal(recipe, progress=False)
    model = R1Model.from_pretrained(tmp_path / lm / "final")
    base = R1Model.from_pretrained("deepseek/r1-tiny")
    ids = torch.tensor([[0, 4, 50, 60, 70]])
    with torch.no_grad():
        same = torch.allclose(model(ids).logits, base(ids).logits, atol=1e-6)
    assert same == (lm == "frozen")  # projector-only: the text model is untouched; LoRA: merged into it
    assert not any("lora" in k for k in model.state_dict())


def test_train_and_test_questions_are_disjoint():
    """Not only exact strings: no training question shares more than 2/3 of its words with a held-out one."""

    def words(s):
        return set(re.findall(r"[a-z0-9]+", s.lower()))

    for m in ("image", "audio", "points"):
        assert len(set(QUESTIONS["train"][m])) >= 100
        assert not set(QUESTIONS["train"][m]) & set(QUESTIONS["test"][m])
        for t in QUESTIONS["test"][m]:
            for q in QUESTIONS["train"][m]:
                overlap = len(words(q) & words(t)) / len(words(q) | words(t))
                assert overlap < 2 / 3, (m, t, q, overlap)


def test_stage_loss_averages_media_and_replay_rows_separately():
    """A long replay row must not drown a short media reply: each part is a mean over its own tokens."""
    torch.manual_seed(0)
    logits = torch.randn(2, 40, 11)
    labels = torch.full((2, 40), IGNORE)
    labels[0, 5:8] = torch.tensor([1, 2, 3])  # a media reply: 3 tokens
    labels[1, 1:40] = torch.randint(0, 11, (39,))  # a replay row: 39 tokens
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE,
                                           reduction="none")  # fmt: skip
    media = ce[0][labels[0, 1:] != IGNORE].mean()
    replay = ce[1][labels[1, 1:] != IGNORE].mean()
    assert torch.allclose(stage_loss(logits, labels, 1, 0.5), media + 0.5 * replay)
    assert torch.allclose(stage_loss(logits[:1], labels[:1], 1, 0.5), media)  # no replay rows


def test_augmented_views_are_new_features_of_the_same_items():
    """Image and audio views: one Features per view, same digits, features unlike the clean ones."""
    from mm_support import image, wav_bytes

    from deepseek.multimodal.binding import BindingModel
    from deepseek.train.multimodal import augmented_audio_views, augmented_views, encode_all, resolve_binding

    recipe = MultimodalRecipe(image_views=2, audio_views=2)
    binding = BindingModel.load(resolve_binding(recipe.binding))
    with torch.inference_mode():
        images = [image(s)[..., 0] for s in range(3)]
        clips = [wav_bytes(0.5, 16000, f) for f in (300.0, 500.0, 700.0)]
        for views, clean in ((augmented_views(binding, images, [1, 2, 3], recipe),
                              encode_all(binding, "image", images, [1, 2, 3])),
                             (augmented_audio_views(binding, clips, [1, 2, 3], recipe),
                              encode_all(binding, "audio", clips, [1, 2, 3]))):  # fmt: skip
            assert len(views) == 2 and all(v.digits == [1, 2, 3] for v in views)
            assert all(v.pooled.shape == clean.pooled.shape for v in views)
            assert all((v.pooled - clean.pooled).norm(dim=-1).min() > 1e-3 for v in views)
            assert (views[0].pooled - views[1].pooled).norm(dim=-1).min() > 1e-3
