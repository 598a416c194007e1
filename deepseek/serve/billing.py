"""API keys, pricing tiers, budgets, rate limits and usage metering, in SQLite (default) or PostgreSQL.

    db = Billing("sqlite:///deepseek-serve.db")           # or "postgresql+psycopg://user@host/db"
    secret, key = db.create_key("alice", tier="basic", budget_usd=5.0)   # the secret is shown once
    key = db.authenticate(secret)                         # AuthError with an OpenAI error code otherwise
    db.record_usage(request_id, key.id, "r1-tiny", prompt, completion, reasoning, latency_ms, "ok", tier)

Keys are random 256-bit secrets, stored only as SHA-256 hashes (a slow password hash buys nothing for
high-entropy secrets) plus a short display prefix. Each request writes exactly one usage row: the request id
is the primary key, so a second write of the same request is refused, and the key's spend is updated in the
same transaction. Schema changes are numbered migrations recorded in `schema_migrations`; on PostgreSQL they
run under an advisory lock so replicas starting together migrate once.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa


@dataclass(frozen=True)
class Tier:
    name: str
    usd_per_1k_tokens: float  # prompt + completion tokens
    rpm: int  # requests per minute
    tpm: int  # tokens per minute

    def cost(self, tokens: int) -> float:
        return tokens / 1000 * self.usd_per_1k_tokens


def default_tiers() -> dict[str, Tier]:
    """The source document's basic tier ($0.001 per 1K tokens) and an enterprise tier with its own terms."""
    return {
        "basic": Tier("basic", usd_per_1k_tokens=0.001, rpm=60, tpm=100_000),
        "enterprise": Tier("enterprise", usd_per_1k_tokens=0.0008, rpm=6_000, tpm=10_000_000),
    }


class AuthError(Exception):
    """status: HTTP status; code: OpenAI error code (invalid_api_key, insufficient_quota, ...)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


@dataclass
class ApiKey:
    id: int
    name: str
    prefix: str
    tier: str
    budget_usd: float | None
    spent_usd: float
    created_at: float
    revoked_at: float | None


metadata = sa.MetaData()
schema_migrations = sa.Table(
    "schema_migrations", metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("applied_at", sa.Float, nullable=False),
)  # fmt: skip
api_keys = sa.Table(
    "api_keys", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("prefix", sa.String(16), nullable=False),
    sa.Column("tier", sa.String(50), nullable=False),
    sa.Column("budget_usd", sa.Float, nullable=True),
    sa.Column("spent_usd", sa.Float, nullable=False, server_default="0"),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float, nullable=True),
)  # fmt: skip
usage = sa.Table(
    "usage", metadata,
    sa.Column("request_id", sa.String(100), primary_key=True),
    sa.Column("key_id", sa.Integer, sa.ForeignKey("api_keys.id"), nullable=True),  # None: auth switched off
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("reasoning_tokens", sa.Integer, nullable=False),
    sa.Column("cost_usd", sa.Float, nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("status", sa.String(30), nullable=False),  # ok | cancelled | timeout | error | rejected
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("day", sa.String(10), nullable=False),  # UTC YYYY-MM-DD, for per-day reports on any database
)  # fmt: skip


def _migration_1(conn):
    for table in (api_keys, usage):
        table.create(conn)


def _migration_2(conn):
    conn.execute(sa.text("CREATE INDEX ix_usage_key_day ON usage (key_id, day)"))  # plain DDL: same on both


MIGRATIONS = [(1, "api_keys and usage tables", _migration_1), (2, "index usage by key and day", _migration_2)]


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Billing:
    def __init__(self, url: str = "sqlite:///deepseek-serve.db", tiers: dict[str, Tier] | None = None):
        if "://" not in url:
            raise ValueError(f"database URL {url!r} is not a URL (sqlite:///file.db or postgresql+psycopg://...)")
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
        kw = {"connect_args": {"check_same_thread": False}} if url.startswith("sqlite") else {"pool_pre_ping": True}
        self.engine = sa.create_engine(url, **kw)
        self.tiers = tiers or default_tiers()
        self.migrate()

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def migrate(self) -> list[int]:
        """Apply pending migrations; returns the versions applied now."""
        applied_now = []
        with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(72737)"))
            schema_migrations.create(conn, checkfirst=True)
            done = {r[0] for r in conn.execute(sa.select(schema_migrations.c.version))}
            for version, name, fn in MIGRATIONS:
                if version not in done:
                    fn(conn)
                    conn.execute(schema_migrations.insert().values(version=version, name=name, applied_at=time.time()))
                    applied_now.append(version)
        return applied_now

    def schema_version(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.max(schema_migrations.c.version))).scalar() or 0

    # ------------------------------------------------------------------ keys
    def create_key(self, name: str, tier: str = "basic", budget_usd: float | None = None) -> tuple[str, ApiKey]:
        if tier not in self.tiers:
            raise ValueError(f"unknown tier {tier!r}; choose one of {', '.join(self.tiers)}")
        if budget_usd is not None and budget_usd < 0:
            raise ValueError(f"budget must be >= 0 USD, got {budget_usd}")
        secret = "sk-ds-" + secrets.token_urlsafe(32)
        row = dict(name=name, key_hash=hash_key(secret), prefix=secret[:10], tier=tier, budget_usd=budget_usd,
                   spent_usd=0.0, created_at=time.time())  # fmt: skip
        with self.engine.begin() as conn:
            key_id = conn.execute(api_keys.insert().values(**row).returning(api_keys.c.id)).scalar_one()
        return secret, self.get_key(key_id)

    def get_key(self, key_id: int) -> ApiKey:
        with self.engine.connect() as conn:
            r = conn.execute(sa.select(api_keys).where(api_keys.c.id == key_id)).mappings().first()
        if r is None:
            raise ValueError(f"no API key with id {key_id}")
        return _key(r)

    def list_keys(self) -> list[ApiKey]:
        with self.engine.connect() as conn:
            return [_key(r) for r in conn.execute(sa.select(api_keys).order_by(api_keys.c.id)).mappings()]

    def revoke(self, key_id: int) -> ApiKey:
        with self.engine.begin() as conn:
            n = conn.execute(api_keys.update().where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                             .values(revoked_at=time.time())).rowcount  # fmt: skip
        key = self.get_key(key_id)
        if n == 0 and key.revoked_at is None:
            raise ValueError(f"could not revoke key {key_id}")
        return key

    def authenticate(self, secret: str | None) -> ApiKey:
        if not secret:
            raise AuthError(401, "invalid_api_key", "missing API key: send 'Authorization: Bearer <key>'")
        with self.engine.connect() as conn:
            r = conn.execute(sa.select(api_keys).where(api_keys.c.key_hash == hash_key(secret))).mappings().first()
        if r is None:
            raise AuthError(401, "invalid_api_key", "incorrect API key provided")
        key = _key(r)
        if key.revoked_at is not None:
            raise AuthError(401, "invalid_api_key", f"API key {key.prefix}... has been revoked")
        if key.budget_usd is not None and key.spent_usd >= key.budget_usd:
            raise AuthError(429, "insufficient_quota",
                            f"API key {key.prefix}... has used its budget of ${key.budget_usd:.4f}")  # fmt: skip
        return key

    # ------------------------------------------------------------------ usage
    def record_usage(self, request_id: str, key_id: int | None, model: str, prompt_tokens: int,
                     completion_tokens: int, reasoning_tokens: int, latency_ms: float, status: str,
                     tier: str = "basic") -> float | None:  # fmt: skip
        """Write the request's one usage row and add its cost to the key's spend. Returns the cost, or None
        when this request was already recorded (nothing is written twice)."""
        cost = self.tiers[tier].cost(prompt_tokens + completion_tokens)
        now = time.time()
        row = dict(request_id=request_id, key_id=key_id, model=model, prompt_tokens=prompt_tokens,
                   completion_tokens=completion_tokens, reasoning_tokens=reasoning_tokens, cost_usd=cost,
                   latency_ms=latency_ms, status=status, created_at=now,
                   day=datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d"))  # fmt: skip
        try:
            with self.engine.begin() as conn:
                conn.execute(usage.insert().values(**row))
                if key_id is not None and cost:
                    conn.execute(api_keys.update().where(api_keys.c.id == key_id)
                                 .values(spent_usd=api_keys.c.spent_usd + cost))  # fmt: skip
        except sa.exc.IntegrityError:
            return None
        return cost

    def usage_records(self, key_id: int | None = None) -> list[dict]:
        q = sa.select(usage).order_by(usage.c.created_at)
        if key_id is not None:
            q = q.where(usage.c.key_id == key_id)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def usage_by_day(self, key_id: int | None = None) -> list[dict]:
        c = usage.c
        q = (sa.select(c.key_id, c.day, sa.func.count().label("requests"),
                       sa.func.sum(c.prompt_tokens).label("prompt_tokens"),
                       sa.func.sum(c.completion_tokens).label("completion_tokens"),
                       sa.func.sum(c.reasoning_tokens).label("reasoning_tokens"),
                       sa.func.sum(c.cost_usd).label("cost_usd"))
             .group_by(c.key_id, c.day).order_by(c.day, c.key_id))  # fmt: skip
        if key_id is not None:
            q = q.where(c.key_id == key_id)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def close(self) -> None:
        self.engine.dispose()


def _key(r) -> ApiKey:
    return ApiKey(r["id"], r["name"], r["prefix"], r["tier"], r["budget_usd"], r["spent_usd"], r["created_at"],
                  r["revoked_at"])  # fmt: skip


class RateLimiter:
    """Requests and tokens per key over the last 60 s (per server process)."""

    WINDOW_S = 60.0

    def __init__(self):
        self._lock = threading.Lock()
        self._requests: dict[int, deque[float]] = {}
        self._tokens: dict[int, deque[tuple[float, int]]] = {}

    def check_and_count(self, key_id: int, tier: Tier, now: float | None = None) -> None:
        """Count one request, or raise AuthError(429) if the key is over its RPM or TPM."""
        now = time.monotonic() if now is None else now
        with self._lock:
            reqs = self._requests.setdefault(key_id, deque())
            toks = self._tokens.setdefault(key_id, deque())
            while reqs and reqs[0] <= now - self.WINDOW_S:
                reqs.popleft()
            while toks and toks[0][0] <= now - self.WINDOW_S:
                toks.popleft()
            if len(reqs) >= tier.rpm:
                raise AuthError(429, "rate_limit_exceeded", f"rate limit: {tier.rpm} requests per minute "
                                f"for the {tier.name} tier; retry later")  # fmt: skip
            used = sum(n for _, n in toks)
            if used >= tier.tpm:
                raise AuthError(429, "rate_limit_exceeded", f"rate limit: {tier.tpm} tokens per minute "
                                f"for the {tier.name} tier; retry later")  # fmt: skip
            reqs.append(now)

    def add_tokens(self, key_id: int, n: int, now: float | None = None) -> None:
        with self._lock:
            self._tokens.setdefault(key_id, deque()).append((time.monotonic() if now is None else now, n))
