"""What one request can and cannot do to the server (issue 21): extreme sampling values, a sequence whose
sampling or forward pass fails, non-streaming clients that leave, big bodies, lone surrogates, error types,
the documented status codes, and which routes need a key. The bundled r1-tiny behind the real app, on
loopback (a real uvicorn where the socket matters, fastapi's TestClient where it does not)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from serve_support import LiveServer

from deepseek.generation.loop import generate
from deepseek.generation.sampling import sample
from deepseek.serve import api as api_module
from deepseek.serve import runner as runner_module
from deepseek.serve.api import create_app
from deepseek.serve.billing import Billing
from deepseek.serve.engine import Engine, EngineConfig, SamplingParams
from deepseek.serve.protocol import ServeSettings
from deepseek.serve.scheduler import QueueFull, Scheduler
from deepseek.serve.sequence import Output, Sequence

MODEL = "deepseek/r1-tiny"
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def engine():
    eng = Engine.from_pretrained(MODEL, EngineConfig(max_running=8))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def client(engine):
    """Auth off, default settings."""
    return TestClient(create_app(engine), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def billing(tmp_path_factory):
    return Billing(f"sqlite:///{tmp_path_factory.mktemp('robust') / 'usage.db'}")


@pytest.fixture(scope="module")
def live(engine, billing):
    """Auth on, a real uvicorn on 127.0.0.1, a body limit of 8 MiB so a 5 MB prompt reaches tokenization."""
    app = create_app(engine, billing, auth=True, settings=ServeSettings(max_body_bytes=8 * 2**20))
    secret, _ = billing.create_key("robustness", tier="enterprise")
    with LiveServer(app) as server:
        yield {"url": server.url, "headers": {"Authorization": f"Bearer {secret}"}, "app": app}


def chat_body(content="2+3?", **kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **kw}


def wait_idle(engine, timeout=30.0):
    deadline = time.time() + timeout
    while engine.load()["running"] + engine.load()["waiting"] and time.time() < deadline:
        time.sleep(0.02)
    return engine.load()


# ---------------------------------------------------------------------------------------------- item 1
EXTREME = [(1e-300, 1.0), (1e-40, 1.0), (1.0, 1e-50), (2.0, 1e-8), (1e-6, 1e-50)]


@pytest.mark.parametrize("temperature,top_p", EXTREME)
def test_sample_is_greedy_in_the_degenerate_limit(temperature, top_p):
    """Tiny temperatures and nuclei used to underflow to NaN / empty distributions and raise in multinomial."""
    torch.manual_seed(0)
    logits_BV = torch.randn(4, 300) * 5
    got = sample(logits_BV, temperature, top_p, 0, torch.Generator().manual_seed(1))
    assert got.tolist() == logits_BV.argmax(-1).tolist()


def test_sample_handles_broken_rows():
    logits_BV = torch.randn(3, 50)
    logits_BV[0, 7] = float("nan")  # a stray NaN is never chosen
    logits_BV[1] = float("-inf")  # nothing left to sample: the argmax (0), not an exception
    logits_BV[1, 9] = float("-inf")
    got = sample(logits_BV, 1.0, 0.9, 5, torch.Generator().manual_seed(0))
    assert got[0] != 7 and got[1] == 0 and 0 <= got[2] < 50
    with pytest.raises(ValueError, match="NaN"):
        sample(torch.full((1, 50), float("nan")), 1.0)


@pytest.mark.parametrize("temperature,top_p", EXTREME[:3])
def test_poisoned_request_beside_healthy_streams(engine, live, temperature, top_p):
    """The reported attack: top_p 1e-50 / temperature 1e-300, 1e-40 beside 4 healthy greedy streams. Before:
    a 500 for it and engine_error in every stream. Now: it is answered (its greedy limit) and every stream
    gets exactly its reference tokens."""
    n = 24
    alone = httpx.post(live["url"] + CHAT, json=chat_body("healthy", max_tokens=n, temperature=0, ignore_eos=True),
                       headers=live["headers"], timeout=60).json()["choices"][0]["message"]  # fmt: skip
    want = alone.get("reasoning_content", "") + alone["content"]
    results = [None] * 4

    def stream(i):
        body = chat_body("healthy", max_tokens=n, temperature=0, stream=True, ignore_eos=True)
        with httpx.stream("POST", live["url"] + CHAT, json=body, headers=live["headers"], timeout=60) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        results[i] = events

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    poison = chat_body("poison", max_tokens=n, temperature=temperature, top_p=top_p, ignore_eos=True)
    r = httpx.post(live["url"] + CHAT, json=poison, headers=live["headers"], timeout=60)
    for t in threads:
        t.join(60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == n
    for events in results:
        assert not [e for e in events if "error" in e], events[-1]
        text = "".join(c["delta"].get("reasoning_content", "") + c["delta"].get("content", "")
                       for e in events for c in e["choices"])  # fmt: skip
        assert text == want
        assert [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]] == ["length"]


POISON = 0.77  # a temperature that failing_sample refuses


def failing_sample(logits_BV, temperature, *args, **kw):
    if temperature == POISON:
        raise RuntimeError("injected sampling failure")
    return sample(logits_BV, temperature, *args, **kw)


def test_a_failing_sequence_fails_alone(engine, monkeypatch):
    """Fault injection in the three places a sequence can break: sampling, the batched decode (the forward
    raises whenever the batch holds a position >= 40, i.e. only the long prompt's sequence) and prefill. Only
    the culprit ends with "error"; the others get exactly their reference greedy tokens."""
    real_forward = engine.model.model.forward

    def bad_forward(*args, position_ids=None, **kw):
        if position_ids is not None and int(position_ids.max()) >= 40:
            raise RuntimeError("injected forward failure")
        ids = kw.get("input_ids")  # a batched prefill fails if any row holds the culprit
        if ids is not None and 13 in ids.flatten().tolist() and position_ids.shape[1] > 1:
            raise RuntimeError("injected prefill failure")
        return real_forward(*args, position_ids=position_ids, **kw)

    monkeypatch.setattr(runner_module, "sample", failing_sample)
    monkeypatch.setattr(engine.model.model, "forward", bad_forward)
    healthy = [[20, 21, 22], [30, 31], [40, 41, 42, 43]]
    culprits = {"sampling": [11, 12, 14], "decode": [50] * 40, "prefill": [13, 14, 15]}
    outs: dict = {}

    def listener(key):
        acc = Output(request_id=str(key))
        return lambda o: (acc.merge(o), outs.__setitem__(key, acc) if o.finish_reason else None)

    params = SamplingParams(max_tokens=12, ignore_eos=True)
    for i, ids in enumerate(healthy):
        engine.submit(ids, params, listener(i))
    for name, ids in culprits.items():
        p = SamplingParams(max_tokens=12, ignore_eos=True, temperature=POISON if name == "sampling" else 0.0)
        engine.submit(ids, p, listener(name))
    deadline = time.time() + 60
    while len(outs) < len(healthy) + len(culprits) and time.time() < deadline:
        time.sleep(0.01)
    for name in culprits:
        assert outs[name].finish_reason == "error" and "injected" in outs[name].error, name
    assert outs["decode"].completion_tokens == 1  # its first token came from prefill; the decode failed
    monkeypatch.undo()
    for i, ids in enumerate(healthy):
        ref = generate(engine.model, torch.tensor([ids]), max_new_tokens=12)
        assert (outs[i].token_ids, outs[i].finish_reason) == (ref.new_tokens[0], "length"), i
    assert wait_idle(engine)["free_slots"] == engine.config.max_running


def test_a_failed_generation_is_a_server_error(engine, client, monkeypatch):
    """The 500 of a failed sequence used to be labelled invalid_request_error."""
    monkeypatch.setattr(runner_module, "sample", failing_sample)
    r = client.post(CHAT, json=chat_body(max_tokens=3, temperature=POISON))
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error" and r.json()["error"]["code"] == "engine_error"
    monkeypatch.undo()
    assert client.post(CHAT, json=chat_body(max_tokens=3)).status_code == 200


BAD_SAMPLING = [("temperature", -0.5), ("temperature", 2.5), ("temperature", "NaN"), ("temperature", "Infinity"),
                ("top_p", 0), ("top_p", 1.5), ("top_p", "NaN"), ("top_k", -1), ("seed", 2**64), ("n", 9),
                ("max_tokens", 0), ("logprobs", 3)]  # fmt: skip


@pytest.mark.parametrize("field,value", BAD_SAMPLING, ids=[f"{f}={v}" for f, v in BAD_SAMPLING])
def test_out_of_range_sampling_values_are_400s_naming_the_field(client, field, value):
    raw = json.dumps(chat_body(max_tokens=3)).replace('"max_tokens": 3', f'"max_tokens": 3, "{field}": {value}')
    if field == "max_tokens":
        raw = json.dumps(chat_body(max_tokens=0))
    r = client.post(CHAT, content=raw.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert field in err["message"] and err["type"] == "invalid_request_error" and "\n" not in err["message"]


# ---------------------------------------------------------------------------------------------- item 5
def test_non_streaming_client_that_leaves_is_cancelled(engine, live, billing):
    """Before: the disconnect check ran only when no token arrived for 0.5 s, so a busy sequence ran to
    max_tokens and was billed as ok. Now the sequence is cancelled within a poll interval or two."""
    assert wait_idle(engine)["running"] == 0
    before = {r["request_id"] for r in billing.usage_records()}
    body = chat_body("leave early", max_tokens=900, temperature=0, ignore_eos=True)
    t0 = time.time()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live["url"] + CHAT, json=body, headers=live["headers"], timeout=httpx.Timeout(5, read=0.4))
    load = wait_idle(engine, timeout=5)
    assert load["running"] == 0 and load["free_slots"] == engine.config.max_running
    assert time.time() - t0 < 3.0
    live["app"].state.server.writer.flush()
    rows = [r for r in billing.usage_records() if r["request_id"] not in before]
    assert len(rows) == 1 and rows[0]["status"] == "cancelled", rows
    assert 1 <= rows[0]["completion_tokens"] < 900


# ---------------------------------------------------------------------------------------------- item 6
def test_body_limit_is_a_413_from_content_length_and_while_reading(engine):
    assert ServeSettings().max_body_bytes == 4 * 2**20  # the documented default
    small = TestClient(create_app(engine, settings=ServeSettings(max_body_bytes=2000)))
    big = json.dumps(chat_body("x" * 5000, max_tokens=1)).encode()
    r = small.post(CHAT, content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert "2000 bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit is enforced on the bytes read
        for i in range(0, len(big), 500):
            yield big[i : i + 500]

    r = small.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    ok = small.post(CHAT, json=chat_body("hi", max_tokens=1))
    assert ok.status_code == 200, ok.text
    r = small.post(CHAT, content=b'{"model": "\xff"}', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_encoding"


def test_default_limit_refuses_5_mb_over_a_socket(engine):
    with LiveServer(create_app(engine)) as server:
        r = httpx.post(server.url + CHAT, content=b"x" * (5 * 10**6), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert httpx.get(server.url + "/health").status_code == 200


def health_latency_during(live, request) -> tuple[float, int, float]:
    """Run request() in a thread and poll /health meanwhile: (worst /health latency, polls, request seconds)."""
    worst, n = 0.0, 0
    with httpx.Client() as c:
        c.get(live["url"] + "/health")
        t = threading.Thread(target=request)
        t0 = time.perf_counter()
        t.start()
        while t.is_alive():
            t1 = time.perf_counter()
            c.get(live["url"] + "/health").raise_for_status()
            worst, n = max(worst, time.perf_counter() - t1), n + 1
            time.sleep(0.02)
        t.join()
    return worst, n, time.perf_counter() - t0


def test_a_5_mb_prompt_is_refused_before_tokenization(live):
    """Tokenizing 5 MB took ~11 s of CPU on the event loop (/health blocked for seconds). A text that cannot fit
    the context (it needs at least chars / max_token_chars tokens) is now refused before tokenization."""
    body = json.dumps(chat_body("The quick brown fox. " * 240_000, max_tokens=1)).encode()
    assert len(body) > 5 * 10**6
    result = {}

    def big():
        result["r"] = httpx.post(live["url"] + CHAT, content=body, timeout=120,
                                 headers={**live["headers"], "content-type": "application/json"})  # fmt: skip

    worst, _, took = health_latency_during(live, big)
    r = result["r"]
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text[:300]
    assert "at least" in r.json()["error"]["message"]
    assert took < 2.0 and worst < 0.1, (took, worst)


def test_the_early_refusal_never_refuses_what_fits(engine, client, monkeypatch):
    """Templates may drop assistant text (DeepSeek-R1's drops earlier reasoning), so assistant turns do not
    count towards the early bound: a 30K-character turn the template drops is served, not refused unread."""
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|user|>' + m['content'] }}"
                "{% endif %}{% endfor %}{{ '<|assistant|>' }}")  # fmt: skip
    monkeypatch.setattr(engine.tokenizer, "chat_template", template)
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>" + "x" * 30_000},
             {"role": "user", "content": "2+3?"}]  # fmt: skip
    assert engine.fewest_tokens(30_000) >= engine.max_model_len  # it would have been refused
    r = client.post(CHAT, json={"model": MODEL, "messages": turns, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] < 20, r.text[:300]


def test_tokenization_runs_off_the_event_loop(live, monkeypatch):
    """A prompt that takes 1.5 s to tokenize (an admissible but slow one, simulated) leaves /health fast."""
    real = api_module.chat_prompt_ids

    def slow(tokenizer, messages):
        time.sleep(1.5)
        return real(tokenizer, messages)

    monkeypatch.setattr(api_module, "chat_prompt_ids", slow)
    result = {}

    def request():
        result["r"] = httpx.post(live["url"] + CHAT, json=chat_body("slow", max_tokens=2), headers=live["headers"],
                                 timeout=60)  # fmt: skip

    worst, n, took = health_latency_during(live, request)
    assert result["r"].status_code == 200 and took >= 1.5 and n >= 10
    assert worst < 0.1, f"/health took {worst * 1000:.0f} ms while a prompt was tokenized"


# ---------------------------------------------------------------------------------------------- item 7
SURROGATES = [
    (CHAT, '{"model": "M", "messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages[0].content"),
    (CHAT, '{"model": "M", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
     "messages[0].content"),
    (CHAT, '{"model": "M", "messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud83d"]}', "stop[0]"),
    ("/v1/completions", '{"model": "M", "prompt": "x\\ud800"}', "prompt[0]"),
    ("/v1/completions", '{"model": "M", "prompt": ["ok", "\\udc00"]}', "prompt[1]"),
    ("/v1/completions", '{"model": "M\\ud800", "prompt": "hi"}', "model"),
]


@pytest.mark.parametrize("path,raw,param", SURROGATES, ids=[s[2] + s[0][4:] for s in SURROGATES])
def test_lone_surrogates_are_a_400(client, path, raw, param):
    r = client.post(path, content=raw.replace('"M', f'"{MODEL}').encode(), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "surrogate" in err["message"] and err["code"] == "invalid_encoding"


def test_lone_surrogate_refusal_is_metered_as_rejected(live, billing):
    """It used to be a 500 with no usage row; now a refusal after authentication, recorded as such."""
    live["app"].state.server.writer.flush()
    before = {r["request_id"] for r in billing.usage_records()}
    raw = json.dumps(chat_body("a\ud800b"), ensure_ascii=True).encode()
    r = httpx.post(live["url"] + CHAT, content=raw, headers={**live["headers"], "content-type": "application/json"})
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]
    live["app"].state.server.writer.flush()
    rows = [row for row in billing.usage_records() if row["request_id"] not in before]
    assert [(row["status"], row["completion_tokens"]) for row in rows] == [("rejected", 0)]


# ---------------------------------------------------------------------------------------------- item 9
def test_openapi_documents_the_statuses_the_server_answers(client):
    schema = client.get("/openapi.json").json()
    for path in (CHAT, "/v1/completions"):
        responses = schema["paths"][path]["post"]["responses"]
        assert "422" not in responses
        assert {"400", "401", "404", "413", "429", "503"} <= set(responses)
        assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert "HTTPValidationError" not in json.dumps(schema)
    r = client.post(CHAT, json={"model": MODEL, "messages": "not a list"})
    assert r.status_code == 400  # what the schema says, not 422


BAD_PROMPTS = [("", "empty prompt"), ([], "empty prompt"), (["ok", ""], "empty prompt"), ([[]], "empty prompt"),
               ([5, -1], "token ids must be >= 0"), ([[5], [-3]], "token ids must be >= 0")]  # fmt: skip


@pytest.mark.parametrize("prompt,message", BAD_PROMPTS, ids=[repr(p) for p, _ in BAD_PROMPTS])
def test_prompts_the_schema_forbids_are_400s(client, prompt, message):
    """The schema now says what the server refuses (non-empty prompts, ids >= 0), so fuzzers reach generation."""
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2})
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    assert r.json()["error"]["message"].startswith("prompt: ")
    schema = client.get("/openapi.json").json()["components"]["schemas"]["CompletionRequest"]["properties"]
    assert '"minLength": 1' in json.dumps(schema["prompt"]) and '"minimum": 0' in json.dumps(schema["prompt"])


PRIVATE = ["/metrics", "/openapi.json", "/docs", "/redoc"]


def test_metrics_and_docs_need_a_key_when_auth_is_on(engine, billing):
    secret, _ = billing.create_key("ops", tier="enterprise")
    closed = TestClient(create_app(engine, billing, auth=True))
    for path in PRIVATE:
        r = closed.get(path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
        assert closed.get(path, headers={"Authorization": f"Bearer {secret}"}).status_code == 200, path
    opened = TestClient(create_app(engine, billing, auth=True,
                                   settings=ServeSettings(open_metrics=True, open_docs=True)))  # fmt: skip
    assert all(opened.get(p).status_code == 200 for p in PRIVATE)
    assert "deepseek_requests_total" in opened.get("/metrics").text
    assert closed.get("/health").status_code == 200  # health stays open for load balancers


# ---------------------------------------------------------------------------------------------- issue 16
class FakeSlots:
    def __init__(self, n):
        self.free = list(range(n))

    def num_free(self):
        return len(self.free)

    def allocate(self):
        return self.free.pop(0)

    def release(self, slot):
        self.free.append(slot)


def seq(n_prompt=3, **kw):
    return Sequence(list(range(5, 5 + n_prompt)), SamplingParams(**kw), stream=None)


def test_the_scheduler_alone_admits_queues_and_limits():
    slots = FakeSlots(2)
    s = Scheduler(max_running=2, max_waiting=3, prefill_token_budget=8, slots=slots)
    a, b, c, d = seq(), seq(6), seq(), seq(timeout_s=1e-9)
    for x in (a, b, c):
        s.add(x)
    with pytest.raises(QueueFull):
        s.add(seq())
    step = s.schedule(time.monotonic())
    assert step.prefill == [a] and step.decode == [] and a.slot == 0  # b's 6 tokens exceed what is left of 8
    step = s.schedule(time.monotonic())
    assert step.prefill == [b] and step.decode == [a] and slots.num_free() == 0
    assert s.schedule(time.monotonic()).prefill == []  # no slot for c
    s.add(d)
    a.cancelled = True
    step = s.schedule(time.monotonic() + 1)
    assert step.ended == [(a, "cancelled"), (d, "timeout")] and a.slot == 0  # the engine finishes them
    s.finish(a)
    s.finish(a)  # twice is harmless
    assert a.slot is None and slots.num_free() == 1
    assert s.schedule(time.monotonic()).prefill == [c] and s.counts() == (0, 2)


def test_engine_queue_limit_is_the_schedulers(engine):
    small = Engine(engine.model, engine.tokenizer, EngineConfig(max_running=1, max_waiting=1), model_name="x")
    try:
        small.scheduler.slots = FakeSlots(0)  # nothing can start: every submit waits
        small.submit([5, 6], SamplingParams(max_tokens=1), lambda o: None)
        with pytest.raises(QueueFull, match="1 waiting"):
            small.submit([5, 6], SamplingParams(max_tokens=1), lambda o: None)
        assert small.load()["waiting"] == 1
    finally:
        small.close()


def test_output_merge_is_the_one_delta_merge():
    total = Output(request_id="")
    total.merge(Output("r", text="a", reasoning="x", token_ids=[1], logprobs=[(-1.0, {})], prompt_logprobs=[None]))
    total.merge(Output("r", text="b", token_ids=[2], finish_reason="length", prompt_tokens=3, completion_tokens=2,
                       reasoning_tokens=1))  # fmt: skip
    assert (total.request_id, total.text, total.reasoning, total.token_ids) == ("r", "ab", "x", [1, 2])
    assert total.prompt_logprobs == [None] and len(total.logprobs) == 1
    assert (total.finish_reason, total.prompt_tokens, total.completion_tokens, total.reasoning_tokens) == (
        "length", 3, 2, 1)


def test_engine_magic_numbers_are_settings(engine):
    cfg = EngineConfig()
    assert (cfg.default_max_model_len, cfg.idle_wait_s) == (4096, 0.5)
    capped = Engine(engine.model, engine.tokenizer, EngineConfig(max_running=1, default_max_model_len=128))
    try:
        assert capped.max_model_len == 128 and capped.runner.cache.num_free() == 1
    finally:
        capped.close()
