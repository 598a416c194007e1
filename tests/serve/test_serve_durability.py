"""Fault tests for usage metering, bounded in time, loopback only: kill -9 of a real `deepseek serve` (bundled
r1-tiny) mid-stream then a restart that reconciles; SIGTERM with requests in flight, queued in the engine and
final rows waiting on a locked database; the database locked for a few seconds; a key revoked mid-stream."""

from __future__ import annotations

import json
import logging
import signal
import sqlite3
import threading
import time

import httpx
import pytest
from serve_support import free_port, make_model_dir
from test_serve_limits import Stack, start_serve, wait_healthy

from deepseek.serve.billing import Billing

R1_TINY = "deepseek/r1-tiny"
FAST = ["--checkpoint-interval", "0.2"]


class Streams:
    """n streaming requests read on threads; each keeps its chunks until the server ends or dies."""

    def __init__(self, url, secret, bodies, path="/v1/completions"):
        self.chunks = [[] for _ in bodies]
        self.done = [False] * len(bodies)
        self.errors: list = [None] * len(bodies)
        headers = {"Authorization": f"Bearer {secret}"}
        self.threads = [threading.Thread(target=self._read, args=(i, url + path, b, headers), daemon=True)
                        for i, b in enumerate(bodies)]  # fmt: skip
        for t in self.threads:
            t.start()

    def _read(self, i, url, body, headers):
        try:
            with httpx.stream("POST", url, json={**body, "stream": True}, headers=headers, timeout=60) as r:
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        self.done[i] = True
                    elif line.startswith("data: "):
                        self.chunks[i].append(json.loads(line[6:]))
        except httpx.HTTPError as exc:  # the server was killed
            self.errors[i] = exc

    def wait(self, cond, timeout=60):
        deadline = time.time() + timeout
        while not cond():
            assert time.time() < deadline, "timed out waiting for the streams"
            time.sleep(0.02)

    def join(self, timeout=60):
        for t in self.threads:
            t.join(timeout)
            assert not t.is_alive(), "a stream did not end"


def wait_logged(caplog, text, timeout=15):
    deadline = time.time() + timeout
    while not any(text in r.getMessage() for r in caplog.records):
        assert time.time() < deadline, f"{text!r} was never logged"
        time.sleep(0.05)


def completion(i, max_tokens):
    return {"model": R1_TINY, "prompt": f"{i} + {i} =", "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0}  # fmt: skip


@pytest.fixture
def serve(tmp_path):
    """Start `deepseek serve` processes on one SQLite file; every one is stopped at the end."""
    db_url = f"sqlite:///{tmp_path / 'usage.db'}"
    procs = []

    def start(*extra, port=None):
        port, log = port or free_port(), tmp_path / f"serve{len(procs)}.log"
        p = start_serve(R1_TINY, db_url, port, log, *extra)
        procs.append(p)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, p, log)
        return p, url, log, port

    yield db_url, start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)


def test_kill_9_mid_stream_then_restart_reconciles_incomplete_rows(serve, tmp_path):
    db_url, start = serve
    billing = Billing(db_url)
    secret, key = billing.create_key("crash", tier="basic")
    proc, url, _, port = start(*FAST)
    streams = Streams(url, secret, [completion(i, 600) for i in range(8)])
    streams.wait(lambda: all(len(c) >= 10 for c in streams.chunks))
    time.sleep(0.5)  # past a checkpoint after every stream has tokens
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    streams.join()
    received = [sum(1 for c in cs if c.get("choices")) for cs in streams.chunks]

    rows = billing.usage_records(key.id)
    assert len(rows) == 8, f"{len(rows)}/8 rows after kill -9"
    assert all(r["status"] == "started" and 1 <= r["completion_tokens"] < 600 for r in rows), rows
    with sqlite3.connect(tmp_path / "usage.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    checkpointed = {r["request_id"]: r["completion_tokens"] for r in rows}
    # a checkpoint lags the stream by at most one interval (0.2 s, here < 100 tokens at 8 streams)
    assert sum(checkpointed.values()) >= sum(received) - 8 * 100, (checkpointed, received)

    # restarted on the same host and port: the dead server's rows are marked and settled at start-up, before it
    # serves (without waiting --reconcile-after, 10 s by default: nothing else can hold that address)
    proc2, url2, log2, _ = start("--checkpoint-interval", "0.2", port=port)
    assert "8 open usage rows reconciled as incomplete" in log2.read_text()
    rows = billing.usage_records(key.id)
    assert sum(r["status"] == "incomplete" for r in rows) == 8, [r["status"] for r in rows]
    for r in rows:
        assert r["completion_tokens"] == checkpointed[r["request_id"]]  # the counts of the last checkpoint
        assert r["cost_usd"] == pytest.approx((r["prompt_tokens"] + r["completion_tokens"]) / 1000 * 0.001)
    k = billing.get_key(key.id)
    assert k.spent_usd == pytest.approx(sum(r["cost_usd"] for r in rows)) and k.reserved_usd == pytest.approx(0)
    r = httpx.post(url2 + "/v1/completions", json=completion(0, 4), headers={"Authorization": f"Bearer {secret}"},
                   timeout=30)  # fmt: skip
    assert r.status_code == 200 and len(billing.usage_records(key.id)) == 9
    proc2.send_signal(signal.SIGTERM)
    assert proc2.wait(timeout=30) == 0
    billing.close()


def test_sigterm_drains_in_flight_and_queued_and_flushes_rows_within_the_grace_period(serve, tmp_path):
    """4 streams on 2 slots (2 running, 2 queued in the engine); their final rows wait on a database locked for
    2 s; SIGTERM meanwhile: all 4 finish, all 4 rows are written, the process exits 0 within the grace."""
    db_url, start = serve
    billing = Billing(db_url)
    secret, key = billing.create_key("term", tier="basic")
    proc, url, log, _ = start("--max-running", "2", "--grace", "20")
    streams = Streams(url, secret, [completion(i, 120) for i in range(4)])
    streams.wait(lambda: sum(len(c) >= 1 for c in streams.chunks) >= 2)  # two run, two wait
    streams.wait(lambda: len(billing.usage_records(key.id)) == 4, timeout=10)  # all four admitted (`started`)
    lock = sqlite3.connect(tmp_path / "usage.db", timeout=10)
    lock.execute("BEGIN EXCLUSIVE")
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    time.sleep(2.0)
    lock.rollback()
    lock.close()
    rc = proc.wait(timeout=40)
    took = time.time() - t0
    streams.join()
    assert rc == 0, log.read_text()[-3000:]
    assert took < 20, f"exit took {took:.1f} s"
    assert all(streams.done), [len(c) for c in streams.chunks]
    rows = billing.usage_records(key.id)
    assert [r["status"] for r in rows] == ["ok"] * 4 and all(r["completion_tokens"] == 120 for r in rows)
    assert billing.get_key(key.id).reserved_usd == pytest.approx(0)
    assert "usage rows all written" in log.read_text()
    billing.close()


def test_sigterm_cancels_what_outlives_the_grace_period_and_records_it(serve):
    """--grace 1 and a 900-token stream: SIGTERM stops it about a second later; its row is `cancelled` with the
    tokens it generated, and the process exits 0 soon after."""
    db_url, start = serve
    billing = Billing(db_url)
    secret, key = billing.create_key("grace", tier="basic")
    proc, url, log, _ = start("--grace", "1")
    st = Streams(url, secret, [completion(0, 900)])
    st.wait(lambda: len(st.chunks[0]) >= 5)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=30)
    took = time.time() - t0
    st.join()
    assert rc == 0 and took < 10, (rc, took, log.read_text()[-2000:])
    (row,) = billing.usage_records(key.id)
    assert row["status"] == "cancelled" and 5 <= row["completion_tokens"] < 900, row
    k = billing.get_key(key.id)
    assert k.spent_usd == pytest.approx(row["cost_usd"]) and k.reserved_usd == pytest.approx(0)
    billing.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("durability") / "model")


@pytest.fixture
def stack(model_dir, tmp_path):
    made = []

    def make(model=model_dir, **kw):
        made.append(Stack(model, tmp_path / f"usage{len(made)}.db", **kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_database_locked_requests_wait_or_get_503_and_nothing_is_lost(stack, caplog):
    """Locked 1 s (under the 3 s wait): requests wait and succeed. Locked longer (until a running stream has
    ended, >= 3 s): new requests get 503 after the wait, the stream's final row fails loudly (logged) and is
    retried until it lands. Nothing is lost."""
    s = stack(model=R1_TINY, wait_s=3.0, usage={"checkpoint_s": 0.2, "retry_s": 1.0, "confirm_s": 1.0})
    secret, key = s.billing.create_key("locked", tier="enterprise")
    headers = {"Authorization": f"Bearer {secret}"}
    body = {"model": s.engine.model_name, "prompt": "Hello", "max_tokens": 4}

    def post_many(n, out):
        ts = [threading.Thread(target=lambda: out.append(httpx.post(s.url + "/v1/completions", json=body,
                                                                    headers=headers, timeout=60)))
              for _ in range(n)]  # fmt: skip
        for t in ts:
            t.start()
        return ts

    def lock():
        conn = sqlite3.connect(s.db_path, timeout=10)
        conn.execute("BEGIN EXCLUSIVE")  # readers and writers wait (the default rollback journal)
        return conn

    short: list = []
    held = lock()
    posts = post_many(4, short)
    time.sleep(1.0)
    held.rollback()
    for t in posts:
        t.join(30)
    assert [r.status_code for r in short] == [200] * 4

    caplog.set_level(logging.WARNING, logger="deepseek.serve")
    long: list = []
    running = Streams(s.url, secret, [{**body, "max_tokens": 150, "ignore_eos": True}])  # admitted before the lock
    running.wait(lambda: len(running.chunks[0]) >= 1)
    held = lock()
    t0 = time.time()
    for t in post_many(3, long):
        t.join(30)
    running.join()  # it ends while the lock is held: its final row cannot be written yet
    wait_logged(caplog, "NOT written")  # the writer gave up its first retries, loudly
    locked_for = time.time() - t0
    held.rollback()
    held.close()
    assert [r.status_code for r in long] == [503] * 3
    assert all(r.json()["error"]["code"] == "database_unavailable" for r in long)
    assert running.done[0] and locked_for >= 3.0
    deadline = time.time() + 10  # the unwritten row is retried on every checkpoint tick
    while time.time() < deadline:
        rows = s.rows(key.id)
        if len(rows) == 5 and all(r["status"] == "ok" for r in rows):
            break
        time.sleep(0.1)
    assert sorted(r["completion_tokens"] for r in rows) == [4, 4, 4, 4, 150], [(r["status"], r["completion_tokens"])
                                                                               for r in rows]  # fmt: skip
    # the 503s were refused before authentication could read the key: no row to attribute, nothing billed
    k = s.billing.get_key(key.id)
    assert k.spent_usd == pytest.approx(sum(r["cost_usd"] for r in rows)) and k.reserved_usd == pytest.approx(0)


def test_revocation_stops_an_open_stream_promptly(stack):
    """Revoked through the database (another connection) after 20 chunks of a 900-token stream: the stream stops
    within about a checkpoint interval and its row says `revoked` with the tokens generated."""
    s = stack(model=R1_TINY, usage={"checkpoint_s": 0.2})
    secret, key = s.billing.create_key("revoke-me", tier="basic")
    st = Streams(s.url, secret, [completion(0, 900)])
    st.wait(lambda: len(st.chunks[0]) >= 20)
    other = Billing(f"sqlite:///{s.db_path}")
    other.revoke(key.id)
    at = len(st.chunks[0])
    t0 = time.time()
    st.join(30)
    stopped_after = time.time() - t0
    (row,) = s.rows(key.id)
    assert row["status"] == "revoked" and 20 <= row["completion_tokens"] < 900, row
    assert stopped_after < 2.0 and len(st.chunks[0]) - at < 300, (stopped_after, len(st.chunks[0]) - at)
    assert s.billing.get_key(key.id).spent_usd == pytest.approx(row["cost_usd"])
    assert st.chunks[0][-1]["error"]["code"] == "invalid_api_key" and "revoked" in st.chunks[0][-1]["error"]["message"]
    # not streaming: the response is a 401 saying so
    secret, key = s.billing.create_key("revoke-me-too", tier="basic")
    revoker = threading.Timer(0.5, lambda: other.revoke(key.id))
    revoker.start()
    r = httpx.post(s.url + "/v1/completions", json=completion(1, 900), headers={"Authorization": f"Bearer {secret}"},
                   timeout=30)  # fmt: skip
    revoker.join()
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
    (row,) = s.rows(key.id)
    assert row["status"] == "revoked" and 0 < row["completion_tokens"] < 900
    other.close()


@pytest.fixture
def pg(tmp_path):
    from serve_support import Postgres, postgres_bin

    if postgres_bin() is None:
        pytest.skip("PostgreSQL (initdb, pg_ctl) is not installed: run scripts/ci_services.sh")
    with Postgres() as server:
        yield server


def test_postgresql_down_for_a_few_seconds_503s_and_loses_nothing(pg, caplog):
    """The PostgreSQL server stops while a stream runs and until it has ended: a request meanwhile gets 503 after
    the wait, the stream's final row is retried until the server is back; every admitted request has its row."""
    from serve_support import LiveServer

    from deepseek.serve.api import create_app
    from deepseek.serve.engine import Engine, EngineConfig

    billing = Billing(pg.url, wait_s=1.0)
    engine = Engine.from_pretrained(R1_TINY, EngineConfig(max_running=4))
    app = create_app(engine, billing, auth=True, usage={"checkpoint_s": 0.2, "retry_s": 1.0, "confirm_s": 1.0})
    secret, key = billing.create_key("pg-down", tier="enterprise")
    opts = f"-p {pg.port} -k {pg.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
    try:
        with LiveServer(app) as live:
            caplog.set_level(logging.WARNING, logger="deepseek.serve")
            st = Streams(live.url, secret, [completion(0, 100)])
            st.wait(lambda: len(st.chunks[0]) >= 5)
            pg._run("pg_ctl", "-D", pg.data, "-m", "fast", "-w", "stop")
            try:
                down = httpx.post(live.url + "/v1/completions", json=completion(1, 4), timeout=30,
                                  headers={"Authorization": f"Bearer {secret}"})  # fmt: skip
                st.join(30)  # the stream ends while the database is down
                wait_logged(caplog, "NOT written")
            finally:
                pg._run("pg_ctl", "-D", pg.data, "-l", pg.dir / "log", "-w", "-o", opts, "start")
            up = httpx.post(live.url + "/v1/completions", json=completion(2, 4), timeout=30,
                            headers={"Authorization": f"Bearer {secret}"})  # fmt: skip
            deadline = time.time() + 10
            while time.time() < deadline:
                rows = billing.usage_records(key.id)
                if len(rows) == 2 and all(r["status"] == "ok" for r in rows):
                    break
                time.sleep(0.2)
    finally:
        engine.close()
        app.state.server.writer.close()
    assert down.status_code == 503 and down.json()["error"]["code"] == "database_unavailable"
    assert st.done[0] and up.status_code == 200
    assert sorted(r["completion_tokens"] for r in rows) == [4, 100], [(r["status"], r["completion_tokens"]) for r in rows]
    k = billing.get_key(key.id)
    assert k.spent_usd == pytest.approx(sum(r["cost_usd"] for r in rows)) and k.reserved_usd == pytest.approx(0)
    billing.close()
