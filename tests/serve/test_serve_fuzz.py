"""Fuzzing the real app with schemathesis (issue 21): FUZZ_EXAMPLES generated requests per operation and mode
(valid bodies, and bodies schemathesis makes invalid on purpose) against a real uvicorn on 127.0.0.1 serving
the bundled r1-tiny, with auth on. The model name is fixed to the served one so valid bodies reach generation.
Every response must be below 500, every error in the OpenAI shape, every status documented in /openapi.json.

    python -m pytest tests/test_serve_fuzz.py -m slow -s      # prints the figures; see docs/serving.md
"""

from __future__ import annotations

import collections
import time

import httpx
import pytest
from serve_support import LiveServer

from deepseek.serve.api import create_app
from deepseek.serve.billing import Billing
from deepseek.serve.engine import Engine, EngineConfig

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402

pytestmark = pytest.mark.slow
MODEL = "deepseek/r1-tiny"
FUZZ_EXAMPLES = 300
# A short context keeps each generation short (fuzzed bodies often omit max_tokens: "the rest of the context").
MAX_MODEL_LEN = 96
OPERATIONS = [("/v1/chat/completions", "POST"), ("/v1/completions", "POST"), ("/v1/models", "GET"),
              ("/v1/pricing", "GET"), ("/health", "GET")]  # fmt: skip


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    engine = Engine.from_pretrained(MODEL, EngineConfig(max_running=16, max_model_len=MAX_MODEL_LEN))
    billing = Billing(f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'usage.db'}")
    secret, _ = billing.create_key("fuzz", tier="enterprise")
    app = create_app(engine, billing, auth=True)
    with LiveServer(app) as server:
        yield server.url, {"Authorization": f"Bearer {secret}"}
    engine.close()


def test_schemathesis_finds_no_5xx(live):
    url, headers = live
    documented = httpx.get(url + "/openapi.json", headers=headers).json()["paths"]
    schema = schemathesis.openapi.from_url(url + "/openapi.json", headers=headers)
    statuses: dict[tuple, collections.Counter] = {}
    failures: list[str] = []
    t0 = time.time()

    def run(path, method, mode):
        seen = statuses.setdefault((path, method, mode.value), collections.Counter())

        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                  derandomize=True)  # fmt: skip
        @given(case=schema[path][method].as_strategy(generation_mode=mode))
        def check(case):
            if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
                case.body["model"] = MODEL  # reach generation, not only the 404
            resp = case.call(base_url=url, headers=headers, timeout=120)
            seen[resp.status_code] += 1
            if resp.status_code >= 500 or str(resp.status_code) not in documented[path][method.lower()]["responses"]:
                failures.append(f"{method} {path} {mode.value}: {resp.status_code} {resp.text[:200]}")
            if resp.status_code >= 400:
                err = resp.json()["error"]
                assert err["message"] and err["type"], resp.text

        check()

    for path, method in OPERATIONS:
        run(path, method, schemathesis.GenerationMode.POSITIVE)
        if method == "POST":
            run(path, method, schemathesis.GenerationMode.NEGATIVE)
    took = time.time() - t0
    total = sum(sum(c.values()) for c in statuses.values())
    n5xx = sum(n for c in statuses.values() for s, n in c.items() if s >= 500)
    print(f"\nschemathesis: {total} requests, {len(OPERATIONS)} operations, {n5xx} 5xx, {took:.0f} s")
    for key, c in statuses.items():
        print(" ", *key, dict(sorted(c.items())))
    assert not failures, failures[:5]
    assert n5xx == 0
    for (path, method, mode), c in statuses.items():
        assert sum(c.values()) >= FUZZ_EXAMPLES * 0.9 or method == "GET", (path, mode, c)  # GETs have few inputs
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert statuses[(path, "POST", "positive")][200] >= FUZZ_EXAMPLES // 10, "generation was rarely reached"
