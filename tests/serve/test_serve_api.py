"""The HTTP API end to end on loopback with the official `openai` client against a real uvicorn server, a tiny
random model and a real BPE tokenizer: responses, streaming, usage metering in the database, errors, limits."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
import torch
from serve_support import LiveServer, make_model_dir

from deepseek.chat import chat_prompt_ids
from deepseek.generation.loop import generate
from deepseek.serve.api import create_app
from deepseek.serve.billing import Billing
from deepseek.serve.engine import Engine, EngineConfig

MAX_RUNNING = 16


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir = make_model_dir(root / "model")
    engine = Engine.from_pretrained(str(model_dir), EngineConfig(max_running=MAX_RUNNING, max_waiting=256))
    billing = Billing(f"sqlite:///{root / 'usage.db'}")
    app = create_app(engine, billing, auth=True)
    secret, key = billing.create_key("tests", tier="enterprise")
    with LiveServer(app) as live:
        yield {"engine": engine, "billing": billing, "url": live.url, "secret": secret, "key": key, "app": app}
    engine.close()


@pytest.fixture()
def client(stack):
    return openai.OpenAI(base_url=stack["url"] + "/v1", api_key=stack["secret"], max_retries=0)


def flush(stack):
    stack["app"].state.server.writer.flush()


def record(stack, request_id):
    flush(stack)
    rows = [r for r in stack["billing"].usage_records() if r["request_id"] == request_id]
    assert len(rows) == 1, f"expected exactly one usage row for {request_id}, found {len(rows)}"
    return rows[0]


def reference_tokens(stack, messages, n):
    engine = stack["engine"]
    ids = chat_prompt_ids(engine.tokenizer, messages)
    out = generate(engine.model, torch.tensor([ids]), max_new_tokens=n, eos_token_id=sorted(engine.eos_ids))
    return ids, out.new_tokens[0]


def test_models_and_health(stack, client):
    assert [m.id for m in client.models.list().data] == [stack["engine"].model_name]
    h = httpx.get(stack["url"] + "/health").json()
    assert h["status"] == "ok" and h["free_slots"] == MAX_RUNNING


def test_chat_greedy_matches_reference_and_is_metered(stack, client):
    messages = [{"role": "user", "content": "Hello world"}]
    r = client.chat.completions.create(model=stack["engine"].model_name, messages=messages, max_tokens=12,
                                       temperature=0)  # fmt: skip
    ids, ref = reference_tokens(stack, messages, 12)
    tok = stack["engine"].tokenizer
    # the template opens the answer with <think>, so all of it is reasoning until </think> appears
    expected = tok.decode([t for t in ref if t not in stack["engine"].eos_ids], skip_special_tokens=False)
    msg = r.choices[0].message
    assert msg.model_extra["reasoning_content"] == expected and msg.model_extra["reasoning"] == expected
    assert msg.content == ""
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(ref)
    assert r.usage.total_tokens == len(ids) + len(ref)
    assert r.usage.completion_tokens_details.reasoning_tokens == len(ref)
    row = record(stack, r.id)
    assert (row["prompt_tokens"], row["completion_tokens"], row["status"]) == (len(ids), len(ref), "ok")
    assert row["cost_usd"] == pytest.approx((len(ids) + len(ref)) / 1000 * 0.0008)  # enterprise rate
    assert row["key_id"] == stack["key"].id


def test_streaming_matches_non_streaming_and_reports_usage(stack, client):
    kw = dict(model=stack["engine"].model_name, messages=[{"role": "user", "content": "Count"}], max_tokens=10,
              temperature=0.8, seed=7)  # fmt: skip
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.model_extra["reasoning_content"]  # same seed, same tokens
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert record(stack, chunks[0].id)["completion_tokens"] == whole.usage.completion_tokens


def test_sse_ends_with_done(stack):
    body = {"model": stack["engine"].model_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            "stream": True}  # fmt: skip
    with httpx.stream("POST", stack["url"] + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {stack['secret']}"}) as r:  # fmt: skip
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_n_stop_and_max_completion_tokens(stack, client):
    r = client.chat.completions.create(model=stack["engine"].model_name, messages=[{"role": "user", "content": "x"}],
                                       n=3, max_completion_tokens=5, temperature=1.0, seed=1)  # fmt: skip
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens <= 15 and r.usage.prompt_tokens == 3 * r.usage.prompt_tokens // 3
    texts = [c.message.model_extra["reasoning_content"] for c in r.choices]
    assert len(set(texts)) > 1  # seeds differ per choice
    # a stop string cuts the text before it and ends with finish_reason "stop"
    full = client.chat.completions.create(model=stack["engine"].model_name, temperature=0, max_tokens=12,
                                          messages=[{"role": "user", "content": "y"}]).choices[0]  # fmt: skip
    text = full.message.model_extra["reasoning_content"]
    stop = text[3:5]
    if stop.strip() and stop not in text[:3]:
        cut = client.chat.completions.create(model=stack["engine"].model_name, temperature=0, max_tokens=12,
                                             stop=[stop], messages=[{"role": "user", "content": "y"}]).choices[0]
        assert cut.message.model_extra["reasoning_content"] == text[: text.index(stop)]
        assert cut.finish_reason == "stop"


def test_completions_echo_logprobs_match_the_model(stack, client):
    """What lm-evaluation-harness's local-completions sends to score a continuation."""
    engine = stack["engine"]
    ids = engine.tokenizer.encode("The quick brown fox jumps")
    r = client.completions.create(model=engine.model_name, prompt=ids, max_tokens=0, echo=True, logprobs=1,
                                  temperature=0)  # fmt: skip
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    with torch.no_grad():
        ref = engine.model(torch.tensor([ids])).logits[0].log_softmax(-1)
    want = [ref[t, ids[t + 1]].item() for t in range(len(ids) - 1)]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert r.choices[0].text == engine.tokenizer.decode(ids)
    # the top-1 entry is the argmax at each position (lm-eval's is_greedy check)
    greedy = [engine.tokenizer.decode([int(ref[t].argmax())]) for t in range(len(ids) - 1)]
    assert [next(iter(d)) for d in lp.top_logprobs[1:]] == greedy
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0


def test_completions_text_batch_and_stream(stack, client):
    engine = stack["engine"]
    r = client.completions.create(model=engine.model_name, prompt=["Hello", "The dog"], max_tokens=4, temperature=0)
    assert len(r.choices) == 2 and all(c.finish_reason in ("stop", "length") for c in r.choices)
    ids = engine.tokenizer.encode("Hello")
    ref = generate(engine.model, torch.tensor([ids]), max_new_tokens=4, eos_token_id=sorted(engine.eos_ids))
    assert r.choices[0].text == engine.tokenizer.decode(ref.new_tokens[0])
    parts = list(client.completions.create(model=engine.model_name, prompt="Hello", max_tokens=4, temperature=0,
                                           stream=True))  # fmt: skip
    assert "".join(p.choices[0].text for p in parts) == r.choices[0].text


def test_async_client(stack):
    async def main():
        c = openai.AsyncOpenAI(base_url=stack["url"] + "/v1", api_key=stack["secret"], max_retries=0)
        rs = await asyncio.gather(*[c.chat.completions.create(
            model=stack["engine"].model_name, messages=[{"role": "user", "content": f"q{i}"}], max_tokens=4,
            temperature=0) for i in range(4)])  # fmt: skip
        await c.close()
        return rs

    rs = asyncio.run(main())
    assert all(r.usage.completion_tokens >= 1 for r in rs)


BAD_REQUESTS = [
    ("malformed JSON", b'{"model": "x", "messages": [', 400),
    ("invalid UTF-8", b'{"model": "\xff\xfe", "messages": []}', 400),
    ("wrong type", json.dumps({"model": "M", "messages": "hello"}).encode(), 400),
    ("unknown model", json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}).encode(), 404),
    ("negative max_tokens", json.dumps({"model": "M", "messages": [{"role": "user", "content": "h"}],
                                        "max_tokens": -5}).encode(), 400),  # fmt: skip
    ("huge max_tokens", json.dumps({"model": "M", "messages": [{"role": "user", "content": "h"}],
                                    "max_tokens": 10**12}).encode(), 400),  # fmt: skip
    ("huge n", json.dumps({"model": "M", "messages": [{"role": "user", "content": "h"}], "n": 10**6}).encode(), 400),
    ("prompt too long", json.dumps({"model": "M", "messages": [{"role": "user", "content": "word " * 2000}]}).encode(),
     400),
    ("empty messages", json.dumps({"model": "M", "messages": []}).encode(), 400),
    ("bad role", json.dumps({"model": "M", "messages": [{"role": "robot", "content": "h"}]}).encode(), 400),
    ("temperature out of range", json.dumps({"model": "M", "messages": [{"role": "user", "content": "h"}],
                                             "temperature": -1}).encode(), 400),  # fmt: skip
]


@pytest.mark.parametrize("name,body,status", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_is_a_4xx_in_openai_shape(stack, name, body, status):
    body = body.replace(b'"M"', json.dumps(stack["engine"].model_name).encode())
    r = httpx.post(stack["url"] + "/v1/chat/completions", content=body,
                   headers={"Authorization": f"Bearer {stack['secret']}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    assert httpx.get(stack["url"] + "/health").status_code == 200  # the server is still fine


def test_keys_missing_wrong_revoked_and_budget(stack):
    url, model = stack["url"] + "/v1", stack["engine"].model_name
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="sk-ds-wrong", max_retries=0).models.list()
    r = httpx.post(url + "/chat/completions", json={"model": model, "messages": msgs})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    billing = stack["billing"]
    secret, key = billing.create_key("short-lived", tier="enterprise")
    c = openai.OpenAI(base_url=url, api_key=secret, max_retries=0)
    c.chat.completions.create(model=model, messages=msgs, max_tokens=2)
    billing.revoke(key.id)
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        c.chat.completions.create(model=model, messages=msgs, max_tokens=2)
    # a budget of one and a half requests' maximum cost: the first request runs, the next one is refused
    prompt = len(chat_prompt_ids(stack["engine"].tokenizer, msgs))
    secret, key = billing.create_key("tiny-budget", tier="basic", budget_usd=1.5 * billing.tiers["basic"].cost(prompt + 2))
    assert billing.tiers["basic"].cost(prompt + 2) > 0
    c = openai.OpenAI(base_url=url, api_key=secret, max_retries=0)
    c.chat.completions.create(model=model, messages=msgs, max_tokens=2)
    flush(stack)
    with pytest.raises(openai.RateLimitError) as exc:
        c.chat.completions.create(model=model, messages=msgs, max_tokens=2)
    assert exc.value.code == "insufficient_quota"


def test_rejected_requests_are_metered_once(stack, client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=stack["engine"].model_name, max_tokens=10**6,
                                       messages=[{"role": "user", "content": "hi"}])  # fmt: skip
    flush(stack)
    rows = [r for r in stack["billing"].usage_records(stack["key"].id) if r["status"] == "rejected"]
    assert rows and rows[-1]["completion_tokens"] == 0


def test_disconnect_stops_generation_and_frees_the_slot(stack):
    engine = stack["engine"]
    body = {"model": engine.model_name, "messages": [{"role": "user", "content": "go"}], "max_tokens": 240,
            "stream": True, "temperature": 0}  # fmt: skip
    with httpx.stream("POST", stack["url"] + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {stack['secret']}"}) as r:  # fmt: skip
        lines = r.iter_lines()
        first = json.loads(next(lines)[6:])
        for line in lines:  # leave after the first generated token (the first chunk may carry only the role)
            delta = json.loads(line[6:])["choices"][0]["delta"] if line.startswith("data: {") else {}
            if delta.get("content") or delta.get("reasoning_content"):
                break
    idle = {"waiting": 0, "running": 0, "free_slots": MAX_RUNNING}
    deadline = time.time() + 30  # generous: the disconnect is noticed at the next step, on a busy CPU
    while engine.load() != idle and time.time() < deadline:  # (earlier tests' requests may still drain)
        time.sleep(0.02)
    assert engine.load() == idle
    deadline = time.time() + 10
    while time.time() < deadline:
        flush(stack)
        rows = [x for x in stack["billing"].usage_records() if x["request_id"] == first["id"]]
        if rows:
            break
        time.sleep(0.05)
    assert len(rows) == 1 and rows[0]["status"] == "cancelled" and 1 <= rows[0]["completion_tokens"] < 240


def test_metrics_exposes_counters_and_histograms(stack, client):
    client.chat.completions.create(model=stack["engine"].model_name, messages=[{"role": "user", "content": "m"}],
                                   max_tokens=2)  # fmt: skip
    text = httpx.get(stack["url"] + "/metrics", headers={"Authorization": f"Bearer {stack['secret']}"}).text
    for name in ("deepseek_requests_total", "deepseek_completion_tokens_total",
                 "deepseek_request_latency_seconds_bucket", "deepseek_time_to_first_token_seconds_count",
                 "deepseek_queue_depth", "deepseek_running_batch_size", "deepseek_prefix_cache_hit_tokens",
                 "deepseek_prefix_cache_tokens", "deepseek_prefill_forwards"):  # fmt: skip
        assert name in text, name
    computed = [line for line in text.splitlines() if line.startswith("deepseek_prefill_computed_tokens ")]
    assert computed and float(computed[0].split()[-1]) >= 1  # the engine's prefill counter, read at the scrape
    ok = [line for line in text.splitlines() if line.startswith('deepseek_requests_total{endpoint="chat",status="ok"}')]
    assert ok and float(ok[0].split()[-1]) >= 1


def test_64_concurrent_streams_complete_and_match_usage_records(stack):
    """Bounded load test: every stream completes, and the database holds exactly what each client received."""
    n_clients, max_tokens = 64, 8

    async def one(c, i):
        stream = await c.chat.completions.create(
            model=stack["engine"].model_name, messages=[{"role": "user", "content": f"client {i}"}],
            max_tokens=max_tokens, temperature=1.0, seed=i, stream=True, stream_options={"include_usage": True})
        rid, n_chunks, usage, finish, done = None, 0, None, None, False
        async for chunk in stream:
            rid = chunk.id
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.choices and (chunk.choices[0].delta.model_extra or {}).get("reasoning_content"):
                n_chunks += 1
            if chunk.usage:
                usage, done = chunk.usage, True
        return rid, usage, finish, done

    async def main():
        c = openai.AsyncOpenAI(base_url=stack["url"] + "/v1", api_key=stack["secret"], max_retries=0,
                               http_client=openai.DefaultAsyncHttpxClient(limits=httpx.Limits(max_connections=100)))
        results = await asyncio.gather(*[one(c, i) for i in range(n_clients)])
        await c.close()
        return results

    results = asyncio.run(main())
    assert len(results) == n_clients and all(done and finish in ("stop", "length") for _, _, finish, done in results)
    flush(stack)
    rows = {r["request_id"]: r for r in stack["billing"].usage_records()}
    for rid, usage, _, _ in results:
        row = rows[rid]
        assert row["status"] == "ok"
        assert (row["prompt_tokens"], row["completion_tokens"], row["reasoning_tokens"]) == (
            usage.prompt_tokens, usage.completion_tokens, usage.completion_tokens_details.reasoning_tokens)
    assert stack["engine"].load()["free_slots"] == MAX_RUNNING


def test_schemathesis_finds_no_5xx(stack):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    headers = {"Authorization": f"Bearer {stack['secret']}"}
    schema = schemathesis.openapi.from_url(stack["url"] + "/openapi.json", headers=headers)
    def make_check(path, op):
        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def check(case):
            resp = case.call(base_url=stack["url"], headers=headers)
            assert resp.status_code < 500, f"{path}: {resp.status_code} {resp.text[:300]}"
            if resp.status_code >= 400:
                assert "error" in resp.json()

        return check

    for path, method in [("/v1/chat/completions", "POST"), ("/v1/completions", "POST"), ("/v1/models", "GET"),
                         ("/health", "GET")]:  # fmt: skip
        make_check(path, schema[path][method])()
