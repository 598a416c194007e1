"""Media through the serving engine and the OpenAI API: mixed batches equal each request alone, every content
part through the official client, /v1/embeddings, usage counting placeholder tokens, and bad media as 400s."""

from __future__ import annotations

import base64
import threading

import httpx
import openai
import pytest
import torch
from mm_support import cloud, make_mm_model_dir, npy_bytes, png_bytes, wav_bytes
from serve_support import LiveServer

from deepseek.generation.loop import generate
from deepseek.serve.api import create_app
from deepseek.serve.billing import Billing
from deepseek.serve.engine import Engine, EngineConfig, SamplingParams

B64 = lambda b: base64.b64encode(b).decode()  # noqa: E731


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmserve")
    model_dir = make_mm_model_dir(root / "model")
    engine = Engine.from_pretrained(str(model_dir), EngineConfig(max_running=4))
    billing = Billing(f"sqlite:///{root / 'usage.db'}")
    app = create_app(engine, billing, auth=True)
    secret, _ = billing.create_key("tests", tier="enterprise")
    with LiveServer(app) as live:
        yield {"engine": engine, "url": live.url, "secret": secret}
    engine.close()


@pytest.fixture()
def client(stack):
    return openai.OpenAI(base_url=stack["url"] + "/v1", api_key=stack["secret"], max_retries=0)


def parts_image():
    return [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + B64(png_bytes(1))}},
            {"type": "text", "text": "Which digit?"}]  # fmt: skip


def test_mixed_batch_of_text_and_media_requests_equals_each_alone(stack):
    engine = stack["engine"]
    model, proc = engine.model, engine.model.processor(engine.tokenizer)
    requests = [proc(text="<image> 1 +", images=[png_bytes(2)]), proc(text="2 + 3 ="),
                proc(text="<audio> and <points>", audio=[wav_bytes()], points=[cloud(3)]),
                proc(text="<image> <image>", images=[png_bytes(4), png_bytes(5)])]  # fmt: skip
    results, done = [None] * len(requests), threading.Event()

    def listener_for(i):
        acc = []

        def on(out):
            acc.extend(out.token_ids)
            if out.finish_reason:
                results[i] = acc
                if all(r is not None for r in results):
                    done.set()

        return on

    for i, r in enumerate(requests):  # all four in one running batch (max_running=4)
        engine.submit(r["input_ids"][0].tolist(), SamplingParams(max_tokens=6, ignore_eos=True), listener_for(i),
                      media=r["media"])  # fmt: skip
    assert done.wait(60)
    for i, r in enumerate(requests):
        embeds = model.media_embeds(r["input_ids"], r["media"]) if r["media"] else None
        ref = generate(model, r["input_ids"], max_new_tokens=6, inputs_embeds=embeds)
        assert results[i] == ref.new_tokens[0], f"request {i} differs from its run alone"


def test_every_content_part_through_the_openai_client(client, stack):
    K = stack["engine"].model.multimodal.config.tokens_per_item
    text_only = client.chat.completions.create(model="default", max_tokens=3, messages=[
        {"role": "user", "content": "Which digit?"}])  # fmt: skip
    with_image = client.chat.completions.create(model="default", max_tokens=3, messages=[
        {"role": "user", "content": parts_image()}])  # fmt: skip
    # the placeholder counts as K prompt tokens (+ the "\n" joining the parts): billed like text
    assert with_image.usage.prompt_tokens >= text_only.usage.prompt_tokens + K
    audio = client.chat.completions.create(model="default", max_tokens=3, messages=[{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": B64(wav_bytes(0.6, 16000)), "format": "wav"}},
        {"type": "text", "text": "Which digit is spoken?"}]}])  # fmt: skip
    points = client.chat.completions.create(model="default", max_tokens=3, stream=True, messages=[{"role": "user",
        "content": [{"type": "input_points", "input_points": {"data": B64(npy_bytes(cloud())), "format": "npy"}},
                    {"type": "text", "text": "Which digit?"}]}])  # fmt: skip
    chunks = list(points)
    assert audio.choices[0].finish_reason in ("length", "stop") and audio.usage.completion_tokens <= 3
    assert chunks and chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_embeddings_of_text_and_media(client):
    out = client.embeddings.create(model="default", input=["the digit seven"])
    assert len(out.data) == 1 and abs(sum(x * x for x in out.data[0].embedding) - 1) < 1e-4
    mixed = client.embeddings.with_raw_response.create(model="default", input=["seven", parts_image()[0],
        {"type": "input_points", "input_points": {"data": B64(npy_bytes(cloud())), "format": "npy"}}])  # fmt: skip
    data = mixed.parse().data
    assert [d.index for d in data] == [0, 1, 2] and all(len(d.embedding) == 32 for d in data)


@pytest.mark.parametrize("content, message", [
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + B64(b"not a png")}}], "undecodable image"),
    ([{"type": "image_url", "image_url": {"url": "https://example.com/seven.png"}}], "remote URLs"),
    ([{"type": "input_audio", "input_audio": {"data": B64(b"ID3..."), "format": "mp3"}}], "only 'wav'"),
    ([{"type": "input_audio", "input_audio": {"data": B64(b"RIFF0000WAVEjunk"), "format": "wav"}}], "audio|WAV|wav"),
    ([{"type": "input_points", "input_points": {"data": B64(npy_bytes(cloud(n=0))), "format": "npy"}}], "no points|empty"),
    ([{"type": "input_points", "input_points": {"data": B64(npy_bytes(cloud() * float("nan"))), "format": "npy"}}], "NaN"),
    ([{"type": "text", "text": "<image> what is this?"}], "no image was given"),
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + B64(png_bytes())}}] * 9, "9 media items"),
    ([{"type": "video", "video": {"data": "AAAA"}}], "video|type"),
])  # fmt: skip
def test_bad_media_is_a_400_with_a_message(stack, content, message):
    r = httpx.post(stack["url"] + "/v1/chat/completions", headers={"Authorization": f"Bearer {stack['secret']}"},
                   json={"model": "default", "max_tokens": 2, "messages": [{"role": "user", "content": content}]},
                   timeout=60)  # fmt: skip
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    import re

    assert re.search(message, err["message"]), err["message"]


def test_oversized_media_payload_is_a_413(stack):
    big = B64(b"\0" * (5 * 2**20))
    r = httpx.post(stack["url"] + "/v1/chat/completions", headers={"Authorization": f"Bearer {stack['secret']}"},
                   json={"model": "default", "messages": [{"role": "user", "content": [
                       {"type": "input_audio", "input_audio": {"data": big, "format": "wav"}}]}]}, timeout=60)  # fmt: skip
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


def test_text_model_server_refuses_media(tmp_path):
    from serve_support import make_model_dir

    engine = Engine.from_pretrained(str(make_model_dir(tmp_path / "m")), EngineConfig(max_running=2))
    try:
        with LiveServer(create_app(engine)) as live:
            r = httpx.post(live.url + "/v1/chat/completions", json={"model": "default", "messages": [
                {"role": "user", "content": parts_image()}]}, timeout=60)  # fmt: skip
            assert r.status_code == 400 and "text model" in r.json()["error"]["message"]
            r = httpx.post(live.url + "/v1/embeddings", json={"model": "default", "input": "x"}, timeout=60)
            assert r.status_code == 400 and "text model" in r.json()["error"]["message"]
    finally:
        engine.close()


def test_media_tensor_never_leaks_between_sequences(stack):
    """Two requests with the same prompt ids and different images get different logits at prefill."""
    engine = stack["engine"]
    proc = engine.model.processor(engine.tokenizer)
    a, b = proc(text="<image> 1", images=[png_bytes(7)]), proc(text="<image> 1", images=[png_bytes(8)])
    assert torch.equal(a["input_ids"], b["input_ids"])
    ea = engine.model.media_embeds(a["input_ids"], a["media"])
    eb = engine.model.media_embeds(b["input_ids"], b["media"])
    assert not torch.allclose(ea, eb)
