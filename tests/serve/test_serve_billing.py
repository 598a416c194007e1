"""Keys, tiers, budgets, rate limits and usage metering on SQLite and on a real PostgreSQL server that the test
starts itself (skipped with the reason when PostgreSQL is not installed; scripts/ci_services.sh installs it)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from deepseek.cli import main
from deepseek.serve.billing import AuthError, Billing, Tier, hash_key


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    if request.param == "sqlite":
        billing = Billing(f"sqlite:///{tmp_path / 'b.db'}")
        yield billing
    else:
        url = request.getfixturevalue("pg_url")
        engine = sa.create_engine(url)
        with engine.begin() as conn:  # a clean schema per test
            conn.execute(sa.text("DROP TABLE IF EXISTS usage, api_keys, schema_migrations CASCADE"))
        engine.dispose()
        billing = Billing(url)
        yield billing
    billing.close()


def test_migrations_apply_once_and_record_versions(db):
    assert db.schema_version() == 3
    assert db.migrate() == []  # a second start (another replica) applies nothing
    with db.engine.connect() as conn:
        names = set(sa.inspect(conn).get_table_names())
    assert {"api_keys", "usage", "schema_migrations"} <= names


def test_keys_are_stored_only_as_hashes(db):
    secret, key = db.create_key("alice", tier="basic", budget_usd=2.5)
    assert secret.startswith("sk-ds-") and len(secret) > 40 and key.prefix == secret[:10]
    with db.engine.connect() as conn:
        stored = [tuple(map(str, r)) for r in conn.execute(sa.text("SELECT * FROM api_keys"))]
    assert not any(secret in v for row in stored for v in row)
    assert any(hash_key(secret) in row for row in stored)
    assert db.authenticate(secret).id == key.id
    with pytest.raises(AuthError) as e:
        db.authenticate(secret + "x")
    assert (e.value.status, e.value.code) == (401, "invalid_api_key")
    db.revoke(key.id)
    with pytest.raises(AuthError, match="revoked"):
        db.authenticate(secret)
    with pytest.raises(ValueError, match="unknown tier"):
        db.create_key("bob", tier="platinum")


def test_usage_written_exactly_once_with_tier_cost_and_budget(db):
    secret, key = db.create_key("carol", tier="basic", budget_usd=0.002)
    cost = db.record_usage("req-1", key.id, "r1-tiny", 700, 300, 120, 12.5, "ok", tier="basic")
    assert cost == pytest.approx(0.001)  # 1000 tokens at the basic $0.001 / 1K
    assert db.record_usage("req-1", key.id, "r1-tiny", 700, 300, 120, 12.5, "ok", tier="basic") is None
    db.record_usage("req-2", key.id, "r1-tiny", 10, 0, 0, 1.0, "cancelled", tier="basic")
    rows = db.usage_records(key.id)
    assert [r["request_id"] for r in rows] == ["req-1", "req-2"]
    assert db.get_key(key.id).spent_usd == pytest.approx(0.00101)
    db.authenticate(secret)  # still under budget
    db.record_usage("req-3", key.id, "r1-tiny", 1000, 0, 0, 1.0, "ok", tier="basic")
    with pytest.raises(AuthError) as e:
        db.authenticate(secret)
    assert (e.value.status, e.value.code) == (429, "insufficient_quota")
    day = db.usage_by_day(key.id)
    assert len(day) == 1 and day[0]["requests"] == 3 and day[0]["prompt_tokens"] == 1710
    assert day[0]["cost_usd"] == pytest.approx(0.00201)


def test_concurrent_writers_never_double_count(db):
    _, key = db.create_key("dave", tier="enterprise")
    results = []

    def write(i):
        results.append(db.record_usage(f"req-{i % 20}", key.id, "m", 100, 100, 0, 1.0, "ok", tier="enterprise"))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(60)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sum(r is not None for r in results) == 20 and len(db.usage_records(key.id)) == 20
    assert db.get_key(key.id).spent_usd == pytest.approx(20 * 200 / 1000 * 0.0008)


def test_admission_enforces_rpm_and_tpm_from_the_usage_rows(tmp_path):
    """RPM counts admitted requests of the last 60 s; TPM counts reserved tokens of open requests and actual
    tokens of finished ones, and refuses before the window would be exceeded."""
    tiers = {"basic": Tier("basic", 0.001, rpm=3, tpm=500)}
    db = Billing(f"sqlite:///{tmp_path / 'rl.db'}", tiers=tiers)
    _, a = db.create_key("a")
    _, b = db.create_key("b")
    db.admit("r1", a.id, "m", "basic", prompt_tokens=10, reserve_tokens=210)
    db.admit("r2", a.id, "m", "basic", prompt_tokens=10, reserve_tokens=210)
    with pytest.raises(AuthError, match="tokens per minute") as e:  # 420 reserved + 210 > 500
        db.admit("r3", a.id, "m", "basic", prompt_tokens=10, reserve_tokens=210)
    assert e.value.status == 429 and e.value.code == "rate_limit_exceeded"
    db.record_usage("r1", a.id, "m", 10, 5, 0, 1.0, "ok", tier="basic")  # settled: 15 tokens count, not 210
    db.admit("r3", a.id, "m", "basic", prompt_tokens=10, reserve_tokens=210)
    with pytest.raises(AuthError, match="3 requests per minute"):
        db.admit("r4", a.id, "m", "basic", prompt_tokens=1, reserve_tokens=2)
    db.admit("r5", b.id, "m", "basic", prompt_tokens=1, reserve_tokens=2)  # other keys are independent
    assert {r["request_id"] for r in db.usage_records()} == {"r1", "r2", "r3", "r5"}  # refusals leave nothing
    with db.engine.begin() as conn:  # the window moves on
        conn.execute(sa.text("UPDATE usage SET created_at = created_at - 61"))
    db.admit("r4", a.id, "m", "basic", prompt_tokens=1, reserve_tokens=2)
    db.close()


def test_a_version_2_database_upgrades_and_keeps_its_rows(tmp_path):
    """A database written by the previous release (schema version 2) migrates to 3; its rows stay readable."""
    path = tmp_path / "v2.db"
    with sqlite3.connect(path) as conn:  # the version-2 schema, as that release created it
        conn.executescript("""
            CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name VARCHAR(200) NOT NULL,
                                            applied_at FLOAT NOT NULL);
            CREATE TABLE api_keys (id INTEGER PRIMARY KEY AUTOINCREMENT, name VARCHAR(200) NOT NULL,
                key_hash VARCHAR(64) NOT NULL UNIQUE, prefix VARCHAR(16) NOT NULL, tier VARCHAR(50) NOT NULL,
                budget_usd FLOAT, spent_usd FLOAT DEFAULT '0' NOT NULL, created_at FLOAT NOT NULL, revoked_at FLOAT);
            CREATE TABLE usage (request_id VARCHAR(100) PRIMARY KEY, key_id INTEGER REFERENCES api_keys (id),
                model VARCHAR(200) NOT NULL, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
                reasoning_tokens INTEGER NOT NULL, cost_usd FLOAT NOT NULL, latency_ms FLOAT NOT NULL,
                status VARCHAR(30) NOT NULL, created_at FLOAT NOT NULL, day VARCHAR(10) NOT NULL);
            CREATE INDEX ix_usage_key_day ON usage (key_id, day);
            INSERT INTO schema_migrations VALUES (1, 'api_keys and usage tables', 0), (2, 'index', 0);
            INSERT INTO api_keys VALUES (1, 'old', 'h', 'sk-ds-old', 'basic', 1.0, 0.25, 0, NULL);
            INSERT INTO usage VALUES ('old-1', 1, 'm', 10, 20, 0, 0.25, 1.0, 'ok', 0, '1970-01-01');
        """)
    db = Billing(f"sqlite:///{path}")
    assert db.schema_version() == 3 and db.migrate() == []
    (row,) = db.usage_records()
    assert (row["request_id"], row["status"], row["reserved_usd"], row["instance"]) == ("old-1", "ok", 0, None)
    key = db.get_key(1)
    assert (key.spent_usd, key.reserved_usd) == (0.25, 0)
    db.admit("new-1", 1, "m", "basic", prompt_tokens=10, reserve_tokens=30)  # the new columns work
    assert db.get_key(1).reserved_usd == pytest.approx(30 / 1000 * 0.001)
    db.close()


def test_open_row_checkpoint_reconcile_and_a_late_final_row(db):
    """started -> checkpointed -> (its server stops checkpointing) incomplete, charged its checkpointed cost with
    the reservation released -> a final row arriving late corrects the spend by the difference."""
    _, key = db.create_key("lifecycle", tier="basic", budget_usd=1.0)
    reserve = db.admit("r", key.id, "m", "basic", prompt_tokens=100, reserve_tokens=1100)
    assert reserve == pytest.approx(0.0011) and db.get_key(key.id).reserved_usd == pytest.approx(0.0011)
    db.checkpoint([("r", 300, 40)])
    (row,) = db.usage_records(key.id)
    assert (row["status"], row["completion_tokens"], row["reasoning_tokens"]) == ("started", 300, 40)
    assert db.reconcile(stale_after_s=60) == []  # checkpointed recently: its server is alive
    time.sleep(0.05)
    assert db.reconcile(stale_after_s=0.01) == ["r"] and db.reconcile(stale_after_s=0.01) == []
    (row,) = db.usage_records(key.id)
    assert row["status"] == "incomplete" and row["cost_usd"] == pytest.approx(0.0004)
    k = db.get_key(key.id)
    assert k.spent_usd == pytest.approx(0.0004) and k.reserved_usd == pytest.approx(0)
    assert db.record_usage("r", key.id, "m", 100, 500, 40, 9.0, "ok", tier="basic") == pytest.approx(0.0006)
    k = db.get_key(key.id)
    assert k.spent_usd == pytest.approx(0.0006) and k.reserved_usd == pytest.approx(0)
    assert db.record_usage("r", key.id, "m", 100, 500, 40, 9.0, "ok", tier="basic") is None  # final is final
    with pytest.raises(ValueError, match="final usage status"):
        db.record_usage("x", key.id, "m", 1, 1, 0, 1.0, "started")


def test_rows_of_a_server_restarted_at_the_same_address_are_reconciled_at_once(db):
    _, key = db.create_key("restart", tier="basic")
    db.admit("dead", key.id, "m", "basic", prompt_tokens=10, reserve_tokens=20, instance="host:8000/aaa")
    db.admit("alive", key.id, "m", "basic", prompt_tokens=10, reserve_tokens=20, instance="host:8001/bbb")
    db.admit("near", key.id, "m", "basic", prompt_tokens=10, reserve_tokens=20, instance="host:80000/ccc")
    assert db.reconcile(stale_after_s=60, dead_owner="host:8000/") == ["dead"]
    assert {r["request_id"]: r["status"] for r in db.usage_records()} == {
        "dead": "incomplete", "alive": "started", "near": "started"}


def test_concurrent_admissions_never_overshoot_the_budget(db):
    """32 threads admit at once against a budget of one and a half reservations: exactly one is admitted."""
    _, key = db.create_key("race", tier="basic", budget_usd=1.5 * 50 / 1000 * 0.001)
    results = []

    def admit(i):
        try:
            db.admit(f"a{i}", key.id, "m", "basic", prompt_tokens=10, reserve_tokens=50)
            results.append("ok")
        except AuthError as exc:
            results.append(exc.code)

    threads = [threading.Thread(target=admit, args=(i,)) for i in range(32)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert results.count("ok") == 1 and results.count("insufficient_quota") == 31
    assert db.get_key(key.id).reserved_usd == pytest.approx(50 / 1000 * 0.001)


def test_bad_database_url_is_one_clear_error():
    with pytest.raises(ValueError, match="not a URL"):
        Billing("usage.db")


def test_cli_keys_and_usage(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'cli.db'}"

    def run(*args):
        code = main(list(args))
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    r = run("keys", "--db", url, "create", "erin", "--tier", "enterprise", "--budget", "3")
    assert r.returncode == 0, r.stderr
    secret = r.stdout.strip().splitlines()[-1]
    db = Billing(url)
    key = db.authenticate(secret)
    assert (key.name, key.tier, key.budget_usd) == ("erin", "enterprise", 3.0)
    db.record_usage("r", key.id, "m", 1000, 1000, 10, 5.0, "ok", tier="enterprise")
    listing = run("keys", "--db", url, "list").stdout
    assert "erin" in listing and secret not in listing and "active" in listing
    usage = run("usage", "--db", url, "--json").stdout
    assert '"completion_tokens": 1000' in usage and '"cost_usd": 0.0016' in usage
    db.admit("open", key.id, "m", "enterprise", prompt_tokens=5, reserve_tokens=50)  # running / dead server
    (day,) = [json.loads(line) for line in run("usage", "--db", url, "--json").stdout.splitlines()]
    assert (day["requests"], day["started"], day["incomplete"], day["rejected"]) == (2, 1, 0, 0)
    table = run("usage", "--db", url).stdout.splitlines()
    assert table[0].split()[-3:] == ["running", "incomplete", "rejected"] and table[1].split()[-3:] == ["1", "0", "0"]
    assert f"{50 / 1000 * 0.0008:.6f}" in run("keys", "--db", url, "list").stdout  # the open reservation
    assert run("keys", "--db", url, "revoke", str(key.id)).returncode == 0
    assert "revoked" in run("keys", "--db", url, "list").stdout
    bad = run("keys", "--db", url, "create", "x", "--tier", "gold")
    assert bad.returncode == 2 and "unknown tier" in bad.stderr


def test_http_server_meters_into_postgresql(pg_url, tmp_path):
    """The whole stack on PostgreSQL: the openai client streams, the usage row lands in the server's database."""
    import openai
    from serve_support import LiveServer, make_model_dir

    from deepseek.serve.api import create_app
    from deepseek.serve.engine import Engine, EngineConfig

    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE IF EXISTS usage, api_keys, schema_migrations CASCADE"))
    engine.dispose()
    billing = Billing(pg_url)
    model = Engine.from_pretrained(str(make_model_dir(tmp_path / "m")), EngineConfig(max_running=4))
    app = create_app(model, billing, auth=True)
    secret, key = billing.create_key("pg-client", tier="basic")
    try:
        with LiveServer(app) as live:
            c = openai.OpenAI(base_url=live.url + "/v1", api_key=secret, max_retries=0)
            chunks = list(c.chat.completions.create(model=model.model_name, max_tokens=5, stream=True,
                                                    messages=[{"role": "user", "content": "hi"}],
                                                    stream_options={"include_usage": True}))  # fmt: skip
            app.state.server.writer.flush()
    finally:
        model.close()
        app.state.server.writer.close()
    (row,) = billing.usage_records(key.id)
    assert row["request_id"] == chunks[0].id and row["completion_tokens"] == chunks[-1].usage.completion_tokens
    assert billing.get_key(key.id).spent_usd == pytest.approx(chunks[-1].usage.total_tokens / 1000 * 0.001)
    billing.close()


def test_auth_is_on_by_default_beyond_localhost():
    from deepseek.cli.serve import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.com")


def test_serve_with_a_missing_model_is_one_clear_error(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "nope"), "--db", f"sqlite:///{tmp_path / 'x.db'}"]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and len(err.strip().splitlines()) == 1
