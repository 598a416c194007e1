"""API keys, pricing tiers, budgets, rate limits and usage metering, in SQLite (default) or PostgreSQL.

    db = Billing("sqlite:///deepseek-serve.db")           # or "postgresql+psycopg://user@host/db"
    secret, key = db.create_key("alice", tier="basic", budget_usd=5.0)   # the secret is shown once
    key = db.authenticate(secret)                         # AuthError with an OpenAI error code otherwise
    db.admit(request_id, key.id, "r1-tiny", "basic", prompt_tokens=20, reserve_tokens=84)  # row `started`
    db.checkpoint([(request_id, completion_so_far, reasoning_so_far)])                     # while it runs
    db.record_usage(request_id, key.id, "r1-tiny", prompt, completion, reasoning, latency_ms, "ok", tier)

Keys are random 256-bit secrets, stored only as SHA-256 hashes (a slow password hash buys nothing for
high-entropy secrets) plus a short display prefix.

A request's one usage row (the request id is the primary key) goes through `started` (written at admission,
before generation, with its reservation) -> a final status (`record_usage`), or -> `incomplete` when the server
that owned it stopped checkpointing (`reconcile`), carrying the tokens of its last checkpoint. Admission is one
transaction that first locks the key's row (an UPDATE: a row lock on PostgreSQL, the write lock on SQLite), so
concurrent requests on any number of replicas see each other's reservations: it refuses when the key's spend
plus open reservations already reach its budget, or when the requests / tokens (reserved tokens for running
requests, actual tokens for finished ones) of the last 60 s of usage rows would exceed the tier's RPM / TPM.
Settling a request adds its cost to the key's spend and releases its reservation in one transaction.

Schema changes are numbered migrations recorded in `schema_migrations`; on PostgreSQL they run under an
advisory lock so replicas starting together migrate once.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa

log = logging.getLogger("deepseek.serve.billing")
WINDOW_S = 60.0  # rate-limit window
OPEN, INCOMPLETE = "started", "incomplete"
FINAL_STATUSES = ("ok", "cancelled", "timeout", "error", "rejected", "revoked")


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


class DatabaseUnavailable(AuthError):
    """The usage database did not answer within the wait: the request is refused (503) before any work."""

    def __init__(self, message: str):
        super().__init__(503, "database_unavailable", message)


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
    reserved_usd: float = 0.0


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
    sa.Column("reserved_usd", sa.Float, nullable=False, server_default="0"),  # migration 3
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
    sa.Column("status", sa.String(30), nullable=False),  # started | incomplete | FINAL_STATUSES
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("day", sa.String(10), nullable=False),  # UTC YYYY-MM-DD, for per-day reports on any database
    # migration 3: the open-row lifecycle
    sa.Column("tier", sa.String(50), nullable=True),
    sa.Column("reserved_usd", sa.Float, nullable=False, server_default="0"),  # held while `started`
    sa.Column("reserved_tokens", sa.Integer, nullable=False, server_default="0"),  # counted by TPM while open
    sa.Column("updated_at", sa.Float, nullable=True),  # last checkpoint
    sa.Column("instance", sa.String(64), nullable=True),  # the server process that owns the open row
)  # fmt: skip
ADDED_IN_3 = {"api_keys": ["reserved_usd"],
              "usage": ["tier", "reserved_usd", "reserved_tokens", "updated_at", "instance"]}  # fmt: skip


def _migration_1(conn):
    v1 = sa.MetaData()  # the version-1 columns; later ones come from their own migrations
    for table in (api_keys, usage):
        later = set(ADDED_IN_3[table.name])
        cols = [sa.Column(c.name, c.type, *[sa.ForeignKey(f.target_fullname) for f in c.foreign_keys],
                          primary_key=c.primary_key, nullable=c.nullable, autoincrement=c.autoincrement,
                          unique=c.unique, server_default=c.server_default.arg if c.server_default else None)
                for c in table.columns if c.name not in later]  # fmt: skip
        sa.Table(table.name, v1, *cols)
    v1.create_all(conn)


def _migration_2(conn):
    conn.execute(sa.text("CREATE INDEX ix_usage_key_day ON usage (key_id, day)"))  # plain DDL: same on both


def _migration_3(conn):
    for table_name, names in ADDED_IN_3.items():
        table = metadata.tables[table_name]
        for name in names:
            col = table.c[name]
            ddl = col.type.compile(conn.dialect)
            default = f" NOT NULL DEFAULT {col.server_default.arg}" if col.server_default is not None else ""
            conn.execute(sa.text(f"ALTER TABLE {table_name} ADD COLUMN {name} {ddl}{default}"))
    conn.execute(sa.text("CREATE INDEX ix_usage_key_created ON usage (key_id, created_at)"))
    conn.execute(sa.text("CREATE INDEX ix_usage_status_updated ON usage (status, updated_at)"))


MIGRATIONS = [(1, "api_keys and usage tables", _migration_1), (2, "index usage by key and day", _migration_2),
              (3, "open usage rows (started / incomplete), reservations, checkpoints", _migration_3)]  # fmt: skip


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def storable(text: str, limit: int = 200) -> str:
    """Any client string as the database can store it: lone surrogates escaped, cut to the column's length."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")[:limit]


def _day(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d")


class Billing:
    def __init__(self, url: str = "sqlite:///deepseek-serve.db", tiers: dict[str, Tier] | None = None,
                 wait_s: float = 5.0):  # fmt: skip
        """wait_s: how long a request waits for a locked or unreachable database before a 503."""
        if "://" not in url:
            raise ValueError(f"database URL {url!r} is not a URL (sqlite:///file.db or postgresql+psycopg://...)")
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
        if url.startswith("sqlite"):
            kw = {"connect_args": {"check_same_thread": False, "timeout": wait_s}}
        else:
            kw = {"pool_pre_ping": True, "connect_args": {"connect_timeout": max(1, int(wait_s))}}
        self.engine = sa.create_engine(url, **kw)
        self.wait_s = wait_s
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

    def _retry(self, fn, what: str):
        """Run fn (one transaction) until it succeeds or `wait_s` passes: then DatabaseUnavailable."""
        deadline, pause = time.monotonic() + self.wait_s, 0.05
        while True:
            try:
                return fn()
            except sa.exc.OperationalError as exc:  # locked, connection refused, server restarting
                if time.monotonic() + pause > deadline:
                    log.error("usage database unavailable for %s: %s", what, exc.orig or exc)
                    raise DatabaseUnavailable(f"the usage database is unavailable ({what}); retry later") from None
                time.sleep(pause)
                pause = min(pause * 2, 1.0)

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

    def authenticate(self, secret: str | None, check_budget: bool = True) -> ApiKey:
        """The key for a secret, or AuthError. check_budget=False leaves the budget to `admit` (the server)."""
        if not secret:
            raise AuthError(401, "invalid_api_key", "missing API key: send 'Authorization: Bearer <key>'")

        def read():
            with self.engine.connect() as conn:
                return conn.execute(sa.select(api_keys).where(api_keys.c.key_hash == hash_key(secret))).mappings().first()

        r = self._retry(read, "authentication")
        if r is None:
            raise AuthError(401, "invalid_api_key", "incorrect API key provided")
        key = _key(r)
        if key.revoked_at is not None:
            raise AuthError(401, "invalid_api_key", f"API key {key.prefix}... has been revoked")
        if check_budget and key.budget_usd is not None and key.spent_usd >= key.budget_usd:
            raise AuthError(429, "insufficient_quota", _over_budget(key))
        return key

    def revoked_among(self, key_ids) -> set[int]:
        """Which of these keys are revoked now (read on every replica's checkpoint tick)."""
        ids = sorted({k for k in key_ids if k is not None})
        if not ids:
            return set()
        with self.engine.connect() as conn:
            q = sa.select(api_keys.c.id).where(api_keys.c.id.in_(ids), api_keys.c.revoked_at.is_not(None))
            return {r[0] for r in conn.execute(q)}

    # ------------------------------------------------------------------ admission
    def admit(self, request_id: str, key_id: int | None, model: str, tier: str, prompt_tokens: int,
              reserve_tokens: int, instance: str | None = None) -> float:  # fmt: skip
        """Reserve the request's maximum cost and write its `started` row, or raise AuthError(429) (budget,
        RPM, TPM) / DatabaseUnavailable. reserve_tokens: prompt + every sequence's max_tokens. Returns the
        reservation in USD. Refused requests leave nothing behind (the caller records them as `rejected`)."""
        t = self.tiers[tier]
        reserve = t.cost(reserve_tokens)
        now = time.time()
        row = dict(request_id=request_id, key_id=key_id, model=storable(model), prompt_tokens=prompt_tokens,
                   completion_tokens=0, reasoning_tokens=0, cost_usd=0.0, latency_ms=0.0, status=OPEN,
                   created_at=now, day=_day(now), tier=tier, reserved_usd=reserve, reserved_tokens=reserve_tokens,
                   updated_at=now, instance=instance)  # fmt: skip

        attempts = []

        def run():
            attempts.append(1)
            try:
                with self.engine.begin() as conn:
                    if key_id is not None:
                        self._admit_key(conn, key_id, t, reserve, reserve_tokens, now)
                    conn.execute(usage.insert().values(**row))
            except sa.exc.IntegrityError:
                if len(attempts) == 1:
                    raise ValueError(f"request id {request_id!r} was already admitted") from None
                # an earlier attempt committed, then its connection failed before the answer: admitted once

        self._retry(run, "admission")
        return reserve

    def _admit_key(self, conn, key_id: int, t: Tier, reserve: float, reserve_tokens: int, now: float) -> None:
        # the first statement writes the key's row: every admission for this key (any replica) waits here
        conn.execute(api_keys.update().where(api_keys.c.id == key_id)
                     .values(reserved_usd=api_keys.c.reserved_usd + reserve))  # fmt: skip
        key = _key(conn.execute(sa.select(api_keys).where(api_keys.c.id == key_id)).mappings().one())
        if key.budget_usd is not None and key.spent_usd + key.reserved_usd > key.budget_usd * (1 + 1e-9):
            raise AuthError(429, "insufficient_quota", _over_budget(key, reserve))  # the transaction rolls back
        c = usage.c
        tokens = sa.case((c.status == OPEN, c.reserved_tokens), else_=c.prompt_tokens + c.completion_tokens)
        q = sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(tokens), 0)).where(
            c.key_id == key_id, c.created_at > now - WINDOW_S, c.status != "rejected")
        n_requests, n_tokens = conn.execute(q).one()
        if n_requests >= t.rpm:
            raise AuthError(429, "rate_limit_exceeded", f"rate limit: {t.rpm} requests per minute for the "
                            f"{t.name} tier; retry later")  # fmt: skip
        if n_tokens + reserve_tokens > t.tpm:
            raise AuthError(429, "rate_limit_exceeded", f"rate limit: {t.tpm} tokens per minute for the {t.name} "
                            f"tier ({n_tokens} in use, this request reserves {reserve_tokens} = prompt + max_tokens); "
                            "retry later or lower max_tokens")  # fmt: skip

    def checkpoint(self, counts: list[tuple[str, int, int]]) -> None:
        """Record the tokens generated so far by open requests: [(request_id, completion, reasoning)]."""
        if not counts:
            return
        now = time.time()
        stmt = (usage.update().where(usage.c.request_id == sa.bindparam("rid"), usage.c.status == OPEN)
                .values(completion_tokens=sa.bindparam("c"), reasoning_tokens=sa.bindparam("r"), updated_at=now))
        with self.engine.begin() as conn:
            conn.execute(stmt, [{"rid": rid, "c": c, "r": r} for rid, c, r in counts])

    # ------------------------------------------------------------------ settling
    def record_usage(self, request_id: str, key_id: int | None, model: str, prompt_tokens: int,
                     completion_tokens: int, reasoning_tokens: int, latency_ms: float, status: str,
                     tier: str = "basic") -> float | None:  # fmt: skip
        """Finalise the request's one usage row (written `started` at admission, or new for a request refused
        before admission): its cost goes to the key's spend and its reservation is released, in one
        transaction. Returns the cost, or None when the request already has a final row (nothing twice)."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"not a final usage status: {status!r}")
        cost = self.tiers[tier].cost(prompt_tokens + completion_tokens)
        now = time.time()
        final = dict(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, tier=tier,
                     reasoning_tokens=reasoning_tokens, cost_usd=cost, latency_ms=latency_ms, status=status,
                     updated_at=now, reserved_usd=0.0)  # fmt: skip
        try:
            return self._settle(request_id, key_id, model, cost, now, final)
        except sa.exc.IntegrityError:  # a concurrent writer inserted this request's row first: read it again
            return self._settle(request_id, key_id, model, cost, now, final)

    def _settle(self, request_id, key_id, model, cost, now, final) -> float | None:
        with self.engine.begin() as conn:
            # a write first: the row lock on PostgreSQL, the database write lock on SQLite
            conn.execute(usage.update().where(usage.c.request_id == request_id).values(updated_at=now))
            old = conn.execute(sa.select(usage).where(usage.c.request_id == request_id)).mappings().first()
            if old is None:
                conn.execute(usage.insert().values(request_id=request_id, key_id=key_id, model=storable(model),
                                                   created_at=now, day=_day(now), **final))  # fmt: skip
                spend, release = cost, 0.0
            elif old["status"] in (OPEN, INCOMPLETE):
                conn.execute(usage.update().where(usage.c.request_id == request_id).values(**final))
                # an `incomplete` row was already charged its checkpointed cost and released its reservation
                spend = cost - old["cost_usd"] if old["status"] == INCOMPLETE else cost
                release = old["reserved_usd"] if old["status"] == OPEN else 0.0
                key_id = old["key_id"]
            else:
                return None
            if key_id is not None and (spend or release):
                conn.execute(api_keys.update().where(api_keys.c.id == key_id)
                             .values(spent_usd=api_keys.c.spent_usd + spend,
                                     reserved_usd=api_keys.c.reserved_usd - release))  # fmt: skip
        return cost

    def reconcile(self, stale_after_s: float, dead_owner: str | None = None) -> list[str]:
        """Mark `started` rows not checkpointed for stale_after_s (their server died) as `incomplete` with the
        tokens of their last checkpoint: charge that cost and release the reservation. dead_owner: an instance
        prefix known to be dead (a server restarted on the same host and port), whose rows are marked at once.
        Safe to run on every replica at once. Returns the request ids marked now."""
        cut = time.time() - stale_after_s
        c = usage.c

        def orphaned(q_updated_at, q_instance):
            if dead_owner is None:
                return q_updated_at < cut
            return sa.or_(q_updated_at < cut, sa.func.substr(q_instance, 1, len(dead_owner)) == dead_owner)

        with self.engine.connect() as conn:
            stale = list(conn.execute(sa.select(c.request_id)
                                      .where(c.status == OPEN, orphaned(c.updated_at, c.instance))).scalars())  # fmt: skip
        marked = []
        for rid in stale:
            with self.engine.begin() as conn:
                conn.execute(usage.update().where(c.request_id == rid).values(status=c.status))  # the row lock
                old = conn.execute(sa.select(usage).where(c.request_id == rid)).mappings().one()
                dead = dead_owner is not None and (old["instance"] or "").startswith(dead_owner)
                if old["status"] != OPEN or (old["updated_at"] >= cut and not dead):
                    continue  # finished or checkpointed meanwhile
                tier = self.tiers.get(old["tier"] or "basic", self.tiers["basic"])
                cost = tier.cost(old["prompt_tokens"] + old["completion_tokens"])
                conn.execute(usage.update().where(usage.c.request_id == rid).values(
                    status=INCOMPLETE, cost_usd=cost, reserved_usd=0.0,
                    latency_ms=(old["updated_at"] - old["created_at"]) * 1e3))  # fmt: skip
                if old["key_id"] is not None:
                    conn.execute(api_keys.update().where(api_keys.c.id == old["key_id"])
                                 .values(spent_usd=api_keys.c.spent_usd + cost,
                                         reserved_usd=api_keys.c.reserved_usd - old["reserved_usd"]))  # fmt: skip
            marked.append(rid)
        if marked:
            log.warning("reconciled %d usage rows left open by a stopped server as incomplete", len(marked))
        return marked

    # ------------------------------------------------------------------ reports
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
                       sa.func.sum(c.cost_usd).label("cost_usd"),
                       *[sa.func.sum(sa.case((c.status == s, 1), else_=0)).label(s) for s in (OPEN, INCOMPLETE,
                                                                                             "rejected")])
             .group_by(c.key_id, c.day).order_by(c.day, c.key_id))  # fmt: skip
        if key_id is not None:
            q = q.where(c.key_id == key_id)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def close(self) -> None:
        self.engine.dispose()


def _over_budget(key: ApiKey, reserve: float = 0.0) -> str:
    left = key.budget_usd - key.spent_usd - (key.reserved_usd - reserve)
    ask = f"this request reserves ${reserve:.6f} (prompt + max_tokens) but " if reserve else ""
    return (f"API key {key.prefix}... budget ${key.budget_usd:.6f}: {ask}${max(left, 0.0):.6f} is left "
            f"(spent ${key.spent_usd:.6f}, reserved by running requests ${key.reserved_usd - reserve:.6f}); "
            "lower max_tokens or raise the budget")  # fmt: skip


def _key(r) -> ApiKey:
    return ApiKey(r["id"], r["name"], r["prefix"], r["tier"], r["budget_usd"], r["spent_usd"], r["created_at"],
                  r["revoked_at"], r.get("reserved_usd") or 0.0)  # fmt: skip
