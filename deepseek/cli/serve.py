"""`deepseek serve`, `deepseek keys create|list|revoke`, `deepseek usage`.

    deepseek serve --model deepseek/r1-tiny                     # http://127.0.0.1:8000, auth off on loopback
    deepseek serve --model runs/sft --host 0.0.0.0 --db postgresql+psycopg://user@db/deepseek   # auth on
    deepseek keys create alice --tier basic --budget 5          # prints the secret once
    deepseek keys list ; deepseek keys revoke 3 ; deepseek usage --key 3
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import socket

from deepseek.loading import DEFAULT_MODEL

DB_HELP = ("usage/keys database URL, SQLite or PostgreSQL (default: $DEEPSEEK_DB, else "
           "sqlite:///$XDG_DATA_HOME/deepseek/serve.db, ~/.local/share/deepseek/serve.db: the same from any directory)")


def default_db() -> str:
    """The one default database of serve, keys and usage: $DEEPSEEK_DB, else a SQLite file in the user's data
    folder ($XDG_DATA_HOME/deepseek/serve.db or ~/.local/share/deepseek/serve.db), never relative to the
    working directory (created on first use)."""
    if os.environ.get("DEEPSEEK_DB"):
        return os.environ["DEEPSEEK_DB"]
    from pathlib import Path

    folder = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "deepseek"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(folder / 'serve.db').resolve()}"


def _open_db(args, **kw):
    """Billing on --db (or the default), its location printed on stderr (stdout stays the command's output)."""
    import sys

    from ..serve.billing import Billing

    args.db = args.db or default_db()
    billing = Billing(args.db, **kw)
    print(f"database: {shown_url(args.db)}", file=sys.stderr, flush=True)
    return billing


def shown_url(url: str) -> str:
    """The URL with any password masked."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible API server with continuous batching and a playground")
    p.add_argument("--model", default=DEFAULT_MODEL, help="bundled name or model folder (with tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface, turns auth on)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--db", default=None, help=DB_HELP)
    p.add_argument("--auth", choices=["auto", "on", "off"], default="auto",
                   help="API keys: auto = on unless bound to loopback")  # fmt: skip
    # engine and HTTP settings default to None here: the one default lives in EngineConfig / ServeSettings
    p.add_argument("--max-running", type=int, default=None, help="sequences in the running batch (cache slots)")
    p.add_argument("--max-waiting", type=int, default=None, help="queued requests before answering 503")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + completion tokens per sequence")
    p.add_argument("--timeout", type=float, default=None, help="per-request timeout, seconds")
    p.add_argument("--prefix-cache-tokens", type=int, default=None,
                   help="latents of computed prompt prefixes kept for reuse (0: no prefix cache)")  # fmt: skip
    p.add_argument("--max-body-bytes", type=int, default=None, help="a larger request body gets 413")
    p.add_argument("--open-metrics", action="store_true", default=None, help="with auth on, /metrics without a key")
    p.add_argument("--open-docs", action="store_true", default=None,
                   help="with auth on, /openapi.json, /docs and /redoc without a key")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--grace", type=float, default=30.0,
                   help="on SIGTERM / Ctrl-C: seconds open requests may finish before they are cancelled")  # fmt: skip
    p.add_argument("--db-wait", type=float, default=5.0,
                   help="seconds a request waits for a locked / unreachable database before a 503")  # fmt: skip
    p.add_argument("--checkpoint-interval", type=float, default=1.0,
                   help="seconds between writes of open requests' token counts (and revocation checks)")  # fmt: skip
    p.add_argument("--reconcile-after", type=float, default=10.0,
                   help="an open usage row not checkpointed this long (its server died) is marked incomplete")  # fmt: skip
    p.set_defaults(func=run_serve)

    k = sub.add_parser("keys", help="manage API keys (create, list, revoke)")
    k.add_argument("--db", default=None, help=DB_HELP)
    ks = k.add_subparsers(dest="keys_command", required=True)
    c = ks.add_parser("create", help="create a key; the secret is printed once")
    c.add_argument("name", help="who the key is for (shown in keys list)")
    c.add_argument("--tier", default="basic", help="pricing and rate limits: basic ($0.001 / 1K tokens, 60 rpm, "
                   "100K tpm) or enterprise ($0.0008 / 1K, 6000 rpm, 10M tpm)")
    c.add_argument("--budget", type=float, default=None, help="USD the key may spend (default: unlimited)")
    ks.add_parser("list", help="list keys (never the secrets)")
    r = ks.add_parser("revoke", help="revoke a key by id")
    r.add_argument("id", type=int, help="the key id (from keys list)")
    k.set_defaults(func=run_keys)

    u = sub.add_parser("usage", help="usage and cost per key and day")
    u.add_argument("--db", default=None, help=DB_HELP)
    u.add_argument("--key", type=int, default=None, help="only this key id")
    u.add_argument("--json", action="store_true", help="one JSON object per row")
    u.set_defaults(func=run_usage)


def run_serve(args) -> int:
    import torch
    import uvicorn

    from ..serve.api import create_app
    from ..serve.engine import Engine, EngineConfig
    from ..serve.protocol import ServeSettings

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    auth = {"on": True, "off": False, "auto": not is_loopback(args.host)}[args.auth]
    given = lambda **kw: {k: v for k, v in kw.items() if v is not None}  # noqa: E731  (unset: the dataclass default)
    config = EngineConfig(**given(max_running=args.max_running, max_waiting=args.max_waiting,
                                  max_model_len=args.max_model_len, default_timeout_s=args.timeout,
                                  prefix_cache_tokens=args.prefix_cache_tokens))  # fmt: skip
    settings = ServeSettings(**given(max_body_bytes=args.max_body_bytes, open_metrics=args.open_metrics,
                                     open_docs=args.open_docs))  # fmt: skip
    from ..compat.checkpoint import resolve

    resolve(args.model)  # a missing model is one line, before the database is opened (or created)
    billing = _open_db(args, wait_s=args.db_wait)  # fails fast on a bad URL, before the model loads
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = Engine.from_pretrained(args.model, config)
    usage = {"checkpoint_s": args.checkpoint_interval, "reconcile_after_s": args.reconcile_after,
             "name": f"{socket.gethostname()}:{args.port}"}  # rows of an earlier server here: reconciled at once
    app = create_app(engine, billing, auth=auth, request_timeout_s=config.default_timeout_s, usage=usage,
                     settings=settings)  # fmt: skip
    writer = app.state.server.writer
    print(f"serving {engine.model_name} on http://{args.host}:{args.port} (auth {'on' if auth else 'off'}, "
          f"db {shown_url(args.db)}, {config.max_running} slots x {engine.max_model_len} tokens, "
          f"{len(writer.reconciled)} open usage rows reconciled as incomplete)", flush=True)  # fmt: skip
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                           timeout_graceful_shutdown=args.grace))  # fmt: skip
    # uvicorn drains (stops accepting, lets open responses finish for --grace seconds), then re-raises the signal
    # that stopped it; with SIGTERM's default action (or SIGINT's KeyboardInterrupt) that would end the process
    # before the flush below, so the re-raised signal is ignored
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        engine.close()  # finishes what still runs as cancelled, so every request still gets its usage row
        flushed = writer.close(timeout=max(args.grace, 5.0))
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"stopped; usage rows {'all written' if flushed else 'NOT all written (see the errors above)'}",
          flush=True)  # fmt: skip
    return 0 if flushed else 1


def run_keys(args) -> int:
    db = _open_db(args)
    if args.keys_command == "create":
        secret, key = db.create_key(args.name, args.tier, args.budget)
        print(f"created key {key.id} ({key.name}, tier {key.tier}, budget {_money(key.budget_usd)})")
        print(secret)
    elif args.keys_command == "list":
        print(f"{'id':>4}  {'name':<16}{'prefix':<12}{'tier':<12}{'budget':>10}{'spent':>12}{'reserved':>12}  status")
        for k in db.list_keys():
            status = "revoked" if k.revoked_at else "active"
            print(f"{k.id:>4}  {k.name:<16}{k.prefix:<12}{k.tier:<12}{_money(k.budget_usd):>10}"
                  f"{k.spent_usd:>12.6f}{k.reserved_usd:>12.6f}  {status}")  # fmt: skip
    else:
        key = db.revoke(args.id)
        print(f"revoked key {key.id} ({key.name})")
    return 0


def run_usage(args) -> int:
    rows = _open_db(args).usage_by_day(args.key)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    print(f"{'day':<12}{'key':>5}{'requests':>10}{'prompt':>10}{'completion':>12}{'reasoning':>11}{'cost $':>12}"
          f"{'running':>9}{'incomplete':>12}{'rejected':>10}")  # fmt: skip
    for r in rows:
        print(f"{r['day']:<12}{str(r['key_id']):>5}{r['requests']:>10}{r['prompt_tokens']:>10}"
              f"{r['completion_tokens']:>12}{r['reasoning_tokens']:>11}{r['cost_usd']:>12.6f}"
              f"{r['started']:>9}{r['incomplete']:>12}{r['rejected']:>10}")  # fmt: skip
    return 0


def _money(v) -> str:
    """Dollars with the digits a small budget needs: $5.00, $0.015, $0.000125 (never "$0.00" for a non-zero one)."""
    if v is None:
        return "unlimited"
    whole, frac = f"{v:.6f}".rstrip("0").split(".")
    return f"${whole}.{frac.ljust(2, '0')}"


__all__ = ["add_parser", "is_loopback"]
