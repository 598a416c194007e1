"""Budgets and rate limits are admission control, every refusal after authentication is metered, and the
prompt of an n > 1 request is billed once: a real uvicorn server on loopback, a tiny random model, SQLite, and
two real `deepseek serve` processes sharing one PostgreSQL for the limits that must hold across replicas."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import helpers
import httpx
import pytest
import sqlalchemy as sa
from serve_support import LiveServer, free_port, make_model_dir
from transformers import AutoTokenizer

from deepseek.chat import chat_prompt_ids
from deepseek.serve.api import create_app
from deepseek.serve.billing import Billing, Tier
from deepseek.serve.engine import Engine, EngineConfig

ROOT = helpers.ROOT


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("limits") / "model")


class Stack:
    """One engine + app + billing database behind a live server; closed by the fixture."""

    def __init__(self, model_dir, db_path, tiers=None, wait_s=5.0, usage=None, **engine_kw):
        self.engine = Engine.from_pretrained(str(model_dir), EngineConfig(**{"max_running": 8, **engine_kw}))
        self.db_path = db_path
        self.billing = Billing(f"sqlite:///{db_path}", tiers=tiers, wait_s=wait_s)
        self.app = create_app(self.engine, self.billing, auth=True, usage=usage)
        self.live = LiveServer(self.app).__enter__()
        self.url = self.live.url

    def close(self):
        self.live.__exit__(None, None, None)
        self.engine.close()
        self.app.state.server.writer.close()
        self.billing.close()

    def rows(self, key_id=None):
        return self.billing.usage_records(key_id)


@pytest.fixture
def make_stack(model_dir, tmp_path):
    made = []

    def make(**kw):
        made.append(Stack(model_dir, tmp_path / f"usage{len(made)}.db", **kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


def post_all(url: str, path: str, secret: str, bodies: list[dict]) -> list[httpx.Response]:
    """Send all bodies at once (non-streaming) and return the responses in order."""

    async def main():
        limits = httpx.Limits(max_connections=len(bodies) + 4)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits,
                                     headers={"Authorization": f"Bearer {secret}"}) as c:  # fmt: skip
            return await asyncio.gather(*[c.post(path, json=b) for b in bodies])

    return asyncio.run(main())


def chat(model: str, content: str = "hi", **kw) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0, **kw}


def test_budget_holds_under_16_concurrent_requests(make_stack):
    """A budget of 100 basic-tier tokens, 16 concurrent requests that each reserve prompt + 16 tokens: a
    request runs only if its maximum cost fits beside the spend and the running reservations, so the spend
    never passes the budget (before: 16/16 served, 170x a 10-token budget)."""
    s = make_stack()
    secret, key = s.billing.create_key("small", tier="basic", budget_usd=1e-4)
    rs = post_all(s.url, "/v1/chat/completions", secret,
                  [chat(s.engine.model_name, f"q{i}", max_tokens=16, ignore_eos=True) for i in range(16)])
    served = [r for r in rs if r.status_code == 200]
    refused = [r for r in rs if r.status_code == 429]
    assert len(served) + len(refused) == 16 and all(r.json()["error"]["code"] == "insufficient_quota" for r in refused)
    reservation = min((r.json()["usage"]["prompt_tokens"] + 16) / 1000 * 0.001 for r in served)
    assert 1 <= len(served) <= 1e-4 // reservation, f"{len(served)}/16 served on a budget of 100 tokens"
    k = s.billing.get_key(key.id)
    assert k.spent_usd <= 1e-4 * (1 + 1e-9) and k.reserved_usd == pytest.approx(0, abs=1e-12)
    rows = s.rows(key.id)  # every request has its row: the refusals as `rejected`, costing nothing
    assert len(rows) == 16 and sum(r["status"] == "rejected" for r in rows) == len(refused)
    assert sum(r["cost_usd"] for r in rows) == pytest.approx(k.spent_usd)


def test_tpm_counts_reserved_tokens_and_429s_are_metered(make_stack):
    """A burst of 30 against 600 tokens per minute: admission counts prompt + max_tokens of running requests,
    so the tokens actually used in the window never exceed the limit; each 429 writes a `rejected` row."""
    tiers = {"basic": Tier("basic", usd_per_1k_tokens=0.001, rpm=1000, tpm=600)}
    s = make_stack(tiers=tiers)
    secret, key = s.billing.create_key("tpm", tier="basic")
    rs = post_all(s.url, "/v1/chat/completions", secret,
                  [chat(s.engine.model_name, f"burst {i}", max_tokens=40, ignore_eos=True) for i in range(30)])
    served = [r.json() for r in rs if r.status_code == 200]
    limited = [r for r in rs if r.status_code == 429]
    assert len(served) + len(limited) == 30 and served and limited
    assert all(r.json()["error"]["code"] == "rate_limit_exceeded" for r in limited)
    used = sum(u["usage"]["total_tokens"] for u in served)
    assert used <= 600, f"{used} tokens served in one minute against a limit of 600 ({len(served)} requests)"
    rows = s.rows(key.id)
    assert len(rows) == 30 and sum(r["status"] == "rejected" for r in rows) == len(limited)
    assert sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows) == used


def test_n_bills_the_prompt_once(make_stack):
    s = make_stack()
    secret, key = s.billing.create_key("n", tier="enterprise")
    one, three = post_all(s.url, "/v1/chat/completions", secret,
                          [chat(s.engine.model_name, "same prompt", max_tokens=4, ignore_eos=True),
                           chat(s.engine.model_name, "same prompt", max_tokens=4, ignore_eos=True, n=3)])  # fmt: skip
    u1, u3 = one.json()["usage"], three.json()["usage"]
    assert u3["prompt_tokens"] == u1["prompt_tokens"], "n=3 billed the prompt more than once"
    assert u3["completion_tokens"] == 12 and u3["total_tokens"] == u1["prompt_tokens"] + 12
    row = next(r for r in s.rows(key.id) if r["request_id"] == three.json()["id"])
    assert (row["prompt_tokens"], row["completion_tokens"]) == (u1["prompt_tokens"], 12)
    assert row["cost_usd"] == pytest.approx((u1["prompt_tokens"] + 12) / 1000 * 0.0008)


def test_queue_full_and_bad_token_ids_are_recorded_rejected(make_stack):
    s = make_stack(max_running=1, max_waiting=1)
    secret, key = s.billing.create_key("q", tier="enterprise")
    body = {"model": s.engine.model_name, "prompt": "Hello", "max_tokens": 200, "ignore_eos": True}
    rs = post_all(s.url, "/v1/completions", secret, [body] * 6)
    full = [r for r in rs if r.status_code == 503]
    assert full and all(r.json()["error"]["code"] == "server_overloaded" for r in full)
    bad = httpx.post(s.url + "/v1/completions", headers={"Authorization": f"Bearer {secret}"},
                     json={"model": s.engine.model_name, "prompt": [10**6], "max_tokens": 2})  # fmt: skip
    assert bad.status_code == 400
    rows = s.rows(key.id)
    assert len(rows) == 7
    rejected = [r for r in rows if r["status"] == "rejected"]
    assert len(rejected) == len(full) + 1, sorted((r["status"], r["completion_tokens"]) for r in rows)
    assert all(r["cost_usd"] == 0 and r["completion_tokens"] == 0 for r in rejected)
    assert s.billing.get_key(key.id).reserved_usd == pytest.approx(0, abs=1e-12)


def test_refusal_of_a_model_name_with_a_lone_surrogate_is_recorded(make_stack):
    s = make_stack()
    secret, key = s.billing.create_key("surrogate", tier="enterprise")
    body = b'{"model": "r1\\ud800-' + b"x" * 300 + b'", "messages": [{"role": "user", "content": "hi"}]}'
    r = httpx.post(s.url + "/v1/chat/completions", content=body,
                   headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"})  # fmt: skip
    # 404 model_not_found, or 400 invalid_encoding where the request checks its strings first: recorded either way
    assert (r.status_code, r.json()["error"]["code"]) in ((404, "model_not_found"), (400, "invalid_encoding"))
    (row,) = s.rows(key.id)  # no flush: the row is committed before the response
    assert row["status"] == "rejected" and row["model"].startswith("r1\\ud800-x") and len(row["model"]) == 200


def test_every_row_is_readable_right_after_its_response(make_stack):
    """A burst of 24: as soon as each client has its response (no flush), its final row is in the database."""
    s = make_stack()
    secret, key = s.billing.create_key("burst", tier="enterprise")

    async def main():
        async with httpx.AsyncClient(base_url=s.url, timeout=120, headers={"Authorization": f"Bearer {secret}"},
                                     limits=httpx.Limits(max_connections=30)) as c:  # fmt: skip
            async def one(i):
                body = chat(s.engine.model_name, f"burst {i}", max_tokens=3 + i % 5, stream=i % 2 == 1)
                r = await c.post("/v1/chat/completions", json=body)
                rid = json.loads(r.text.split("\n")[0].removeprefix("data: "))["id"]
                return rid, [x for x in s.rows() if x["request_id"] == rid]  # read at once

            return await asyncio.gather(*[one(i) for i in range(24)])

    seen = asyncio.run(main())
    missing = [rid for rid, rows in seen if not rows or rows[0]["status"] != "ok"]
    assert not missing, f"{len(missing)}/24 rows not visible (or not final) right after their response"


# ---------------------------------------------------------------- two replicas on one PostgreSQL


def start_serve(model, db_url, port, log_path, *extra):
    """A real `deepseek serve` process on 127.0.0.1:port (auth on); the caller stops it."""
    cmd = [sys.executable, "-m", "deepseek.cli", "serve", "--model", str(model), "--port", str(port),
           "--db", db_url, "--auth", "on", "--threads", "1", "--max-running", "8", "--grace", "5", *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def wait_healthy(url, proc, log_path, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not healthy in {timeout} s:\n{log_path.read_text()[-3000:]}")


@pytest.fixture(params=["postgresql", "sqlite"])
def replicas(request, model_dir, tmp_path):
    """Two server processes on one database: PostgreSQL (several hosts) or one SQLite file (one host)."""
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE IF EXISTS usage, api_keys, schema_migrations CASCADE"))
        engine.dispose()
    else:
        url = f"sqlite:///{tmp_path / 'shared.db'}"
    billing = Billing(url)
    procs, urls = [], []
    for i in range(2):
        port = free_port()
        log = tmp_path / f"replica{i}.log"
        procs.append((start_serve(model_dir, url, port, log), log))
        urls.append(f"http://127.0.0.1:{port}")
    try:
        for (p, log), url in zip(procs, urls):
            wait_healthy(url, p, log)
        yield billing, urls
    finally:
        for p, _ in procs:
            p.terminate()
        for p, _ in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        billing.close()


def test_two_replicas_enforce_one_rpm_and_one_budget(replicas, model_dir):
    """Two `deepseek serve` processes on one database: 70 requests split across them get exactly the basic
    tier's 60 per minute, and 8 concurrent requests on a budget of one and a half requests run once in total."""
    billing, urls = replicas
    name = httpx.get(urls[0] + "/health").json()["model"]
    secret, key = billing.create_key("rpm", tier="basic")

    async def spread(secret, bodies):
        async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {secret}"},
                                     limits=httpx.Limits(max_connections=100)) as c:  # fmt: skip
            return await asyncio.gather(*[c.post(urls[i % 2] + "/v1/chat/completions", json=b)
                                          for i, b in enumerate(bodies)])  # fmt: skip

    rs = asyncio.run(spread(secret, [chat(name, f"r{i}", max_tokens=1) for i in range(70)]))
    codes = [r.status_code for r in rs]
    assert codes.count(200) == 60 and codes.count(429) == 10, codes
    rows = billing.usage_records(key.id)
    assert len(rows) == 70 and sum(r["status"] == "rejected" for r in rows) == 10
    assert len({r["instance"] for r in rows if r["status"] != "rejected"}) == 2  # both replicas served

    prompt = len(chat_prompt_ids(AutoTokenizer.from_pretrained(str(model_dir)), [{"role": "user", "content": "b0"}]))
    budget = 1.5 * (prompt + 16) / 1000 * 0.001  # one request's maximum cost and a half
    secret, key = billing.create_key("budget", tier="basic", budget_usd=budget)
    rs = asyncio.run(spread(secret, [chat(name, f"b{i}", max_tokens=16, ignore_eos=True) for i in range(8)]))
    codes = [r.status_code for r in rs]
    assert codes.count(200) == 1 and codes.count(429) == 7, codes
    k = billing.get_key(key.id)
    assert k.reserved_usd == pytest.approx(0, abs=1e-12) and k.spent_usd <= budget
