"""The language-model side of the multimodal system: projector, splicing, processor, checkpoints, generation."""

from __future__ import annotations

import json

import pytest
import torch
from mm_support import cloud, image, multimodal_model, npy_bytes, png_bytes, wav_bytes

from deepseek import R1Model
from deepseek.generation.loop import generate
from deepseek.multimodal.processor import R1Processor, flatten_messages, part_media
from deepseek.multimodal.projector import Projector, span_weights


@pytest.fixture(scope="module")
def mm():
    return multimodal_model()


def test_span_weights_average_valid_tokens_and_fill_every_span():
    mask = torch.tensor([[True] * 6 + [False] * 2, [True, True] + [False] * 6])
    w = span_weights(mask, 3)  # (2, 3, 8)
    assert torch.allclose(w.sum(-1), torch.ones(2, 3))
    assert torch.allclose(w[0, 0], torch.tensor([0.5, 0.5, 0, 0, 0, 0, 0, 0]))  # tokens 0-1 of 6
    assert (w[:, :, ~mask[0]] == 0).all() and (w[1, :, 2:] == 0).all()  # padding never read
    assert (w[1].sum(-1) > 0).all()  # 2 tokens still fill 3 spans (fractional overlap)
    assert torch.allclose(w[1, 1], torch.tensor([0.5, 0.5, 0, 0, 0, 0, 0, 0]))


def test_projector_first_slot_reads_the_pooled_vector():
    proj = Projector(8, 16, 4)
    tokens, mask, pooled = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool), torch.randn(2, 8)
    out = proj(tokens, mask, pooled)
    assert out.shape == (2, 4, 16)
    moved = proj(tokens, mask, pooled + 1)
    assert not torch.allclose(out[:, 0], moved[:, 0]) and torch.allclose(out[:, 1:], moved[:, 1:])


def test_embedding_at_each_placeholder_is_the_projector_output(mm):
    model, tok = mm
    inputs = model.processor(tok)(text="<image> and <points> then <image>", images=[image(0), image(1)],
                                  points=[cloud(0)])  # fmt: skip
    ids = inputs["input_ids"]
    K = model.multimodal.config.tokens_per_item
    assert int((ids == 8).sum()) == 2 * K and int((ids == 10).sum()) == K
    x = model.media_embeds(ids, inputs["media"])
    with torch.no_grad():
        want_img = model.multimodal.project("image", inputs["media"]["image"])  # (2, K, D)
        want_pts = model.multimodal.project("points", inputs["media"]["points"])
    assert torch.allclose(x[0][ids[0] == 8], want_img.reshape(-1, x.shape[-1]), rtol=1e-4, atol=1e-4)
    assert torch.allclose(x[0][ids[0] == 10], want_pts.reshape(-1, x.shape[-1]), rtol=1e-4, atol=1e-4)
    text = (ids[0] != 8) & (ids[0] != 10)
    assert torch.equal(x[0][text], model.model.embed_tokens(ids[0][text]))


def test_processor_expands_pads_left_and_round_trips(mm, tmp_path):
    model, tok = mm
    proc = model.processor(tok)
    inputs = proc(text=["<audio> hi", "a longer prompt <audio>"], audio=[wav_bytes(0.4), (torch.zeros(8000).numpy(), 8000)])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    K = proc.config.tokens_per_item
    assert ids.shape[0] == 2 and int(mask[0].sum()) < ids.shape[1] and bool(mask[1].all())
    assert (ids[0][mask[0] == 0] == tok.pad_token_id).all()
    assert [int((row == 9).sum()) for row in ids] == [K, K]
    rate = [a[1] for a in inputs["media"]["audio"]]
    assert rate == [16000, 16000] and len(inputs["media"]["audio"][1][0]) == 16000  # 1 s at 8 kHz -> 16 kHz
    proc.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["tokens_per_item"] == K and saved["placeholder_ids"] == {"image": 8, "audio": 9, "points": 10}
    again = R1Processor(tok, {k: v for k, v in saved.items() if k != "processor_class"})
    assert torch.equal(again(text="<audio> hi", audio=[wav_bytes(0.4)])["input_ids"], ids[0:1, -int(mask[0].sum()):])


def test_content_parts_become_placeholders_in_order():
    parts = [{"type": "text", "text": "compare"}, {"type": "image", "image": "a.png"},
             {"type": "input_points", "input_points": {"data": __import__("base64").b64encode(npy_bytes(cloud())).decode(),
                                                       "format": "npy"}}]  # fmt: skip
    flat, media = flatten_messages([{"role": "user", "content": parts}])
    assert flat[0]["content"] == "compare\n<image>\n<points>"
    assert media["image"] == ["a.png"] and media["points"][0].shape == (200, 3)


@pytest.mark.parametrize("part, message", [
    ({"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}, "remote URLs are not fetched"),
    ({"type": "image_url", "image_url": {"url": "data:image/gif;base64,AAAA"}}, "only base64 PNG or JPEG"),
    ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "mp3"}}, "only 'wav'"),
    ({"type": "input_audio", "input_audio": {"data": "not base64!", "format": "wav"}}, "not valid base64"),
    ({"type": "input_points", "input_points": {"data": "AAAA", "format": "obj"}}, "unsupported format"),
    ({"type": "video", "video": "x"}, "unknown content part type"),
])  # fmt: skip
def test_bad_parts_fail_in_one_line(part, message):
    with pytest.raises(ValueError, match=message):
        part_media(part)


@pytest.mark.parametrize("kwargs, message", [
    (dict(text="<image> what?"), "placeholder but no image was given"),
    (dict(text="what?", images=[image()]), "no <image> placeholder"),
    (dict(text="<image> <image>", images=[image()]), "2 <image> placeholder"),
    (dict(text="<image>" * 9, images=[image()] * 9), "9 media items in one prompt"),
    (dict(text="<image>", images=[b"not an image"]), "undecodable image"),
    (dict(text="<audio>", audio=[b"ID3 mp3 data"]), "RIFF|WAV|wav"),
    (dict(text="<points>", points=[cloud(n=0)]), "empty"),
    (dict(text="<points>", points=[cloud() * float("nan")]), "NaN"),
])  # fmt: skip
def test_bad_media_and_placeholders_are_refused_before_any_model_work(mm, kwargs, message):
    model, tok = mm
    with pytest.raises(ValueError, match=message):
        model.processor(tok)(**kwargs)


def test_text_model_refuses_media_with_a_clear_error():
    from helpers import random_model, tiny_config

    model = random_model(tiny_config(vocab_size=1024), cls=R1Model)
    assert model.multimodal is None
    with pytest.raises(ValueError, match="text model"):
        model.media_embeds(torch.tensor([[8, 5]]), {"image": [image()]})


def test_checkpoint_round_trip_keeps_the_media_path(mm, tmp_path):
    model, tok = mm
    model.save_pretrained(tmp_path)
    tok.save_pretrained(str(tmp_path))
    assert (tmp_path / "multimodal.safetensors").is_file()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.startswith("multimodal.")]  # other tools see a plain V3 checkpoint
    loaded = R1Model.from_pretrained(tmp_path)
    inputs = R1Processor.from_pretrained(tmp_path)(text="<image> 1 + 2 =", images=[png_bytes()])
    with torch.no_grad():
        a = model(**inputs).logits
        b = loaded(**inputs).logits
    assert torch.allclose(a, b, atol=1e-5)
    # the media changes the logits (the splice is not a no-op) ...
    other = R1Processor.from_pretrained(tmp_path)(text="<image> 1 + 2 =", images=[png_bytes(seed=5)])
    with torch.no_grad():
        assert not torch.allclose(loaded(**other).logits[0, -1], b[0, -1], atol=1e-3)
    # ... and a text-model class still loads the checkpoint as a text model
    from deepseek.model.transformer import R1ForCausalLM

    text_only = R1ForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(text_only(ids).logits, loaded(ids).logits, atol=1e-5)


def test_config_section_without_weights_is_an_error(mm, tmp_path):
    model, tok = mm
    model.save_pretrained(tmp_path)
    (tmp_path / "multimodal.safetensors").unlink()
    with pytest.raises(ValueError, match="no multimodal.safetensors"):
        R1Model.from_pretrained(tmp_path)


def test_generate_with_media_equals_step_by_step_greedy(mm):
    model, tok = mm
    inputs = model.processor(tok)(text=["<image> 3 +", "a b <audio> c"], images=[image(2)], audio=[wav_bytes()])
    seqs = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    # reference: full forward over the growing sequence (no cache), media spliced every time
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    for _ in range(6):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, position_ids=pos, media=inputs["media"]).logits[:, -1]
        ids = torch.cat((ids, logits.argmax(-1, keepdim=True)), 1)
        mask = torch.cat((mask, torch.ones_like(mask[:, :1])), 1)
    eos = tok.eos_token_id
    for row, ref in zip(seqs.tolist(), ids.tolist()):
        cut = row.index(eos, ids.shape[1] - 6) + 1 if eos in row[ids.shape[1] - 6:] else len(row)
        assert row[:cut] == ref[:cut]


def test_chat_takes_content_parts_and_embed_gives_unit_vectors(mm):
    model, tok = mm
    reply = model.chat([{"role": "user", "content": [{"type": "image", "image": png_bytes()},
                                                     {"type": "text", "text": "Which digit?"}]}], max_new_tokens=4)
    assert reply.tokens <= 4
    vecs = model.embed(text=["seven"], images=[image()], audio=[wav_bytes()], points=[cloud()])
    assert set(vecs) == {"text", "image", "audio", "points"}
    for v in vecs.values():
        assert v.shape == (1, 32) and torch.allclose(v.norm(dim=-1), torch.ones(1), atol=1e-5)


def test_prefill_from_embeds_matches_ids_for_text(mm):
    model, _ = mm
    ids = torch.tensor([[5, 6, 7, 9 + 3]])
    a = generate(model, ids, max_new_tokens=5)
    b = generate(model, ids, max_new_tokens=5, inputs_embeds=model.model.embed_tokens(ids))
    assert a.new_tokens == b.new_tokens
