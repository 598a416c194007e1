"""The OpenAI-compatible HTTP API over the engine (FastAPI).

    app = create_app(engine, billing=Billing("sqlite:///serve.db"), auth=True)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: GET / (playground), /health, /metrics, /v1/models; POST /v1/chat/completions, /v1/completions.
Every error is {"error": {message, type, param, code}} with a 4xx status for anything a client can send wrong.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat import chat_prompt_ids
from ..generation.defaults import sampling_defaults
from .billing import AuthError, Billing, Tier, default_tiers
from .engine import Engine, QueueFull
from .metering import Metrics, RequestRecord, UsageWriter
from .protocol import (
    APIError,
    BodyLimit,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ServeSettings,
    drop_422,
    error_responses,
    surrogate_error,
)
from .responses import chat_chunk, chat_response, completion_response, openai_reason, sse, usage_body
from .sequence import Output, SamplingParams
from .structured import plan_request
from .structured import prompt_ids as tool_prompt_ids

WEB_DIR = Path(__file__).resolve().parent / "web"
FAIL_STATUS = {"timeout": (504, "timeout", "the request timed out"),
               "error": (500, "engine_error", "generation failed"),
               "cancelled": (499, "cancelled", "the request was cancelled")}  # fmt: skip


@dataclass
class Caller:
    key_id: int | None
    tier: Tier


class Server:
    """State shared by the routes (no module-level globals)."""

    def __init__(self, engine: Engine, billing: Billing | None, auth: bool, request_timeout_s: float | None,
                 usage: dict | None = None):  # fmt: skip
        if auth and billing is None:
            raise ValueError("authentication needs a billing database (pass billing=Billing(url))")
        self.engine, self.billing, self.auth = engine, billing, auth
        self.tiers = billing.tiers if billing else default_tiers()
        self.metrics = Metrics()
        self.writer = UsageWriter(billing, cancel=engine.cancel, **(usage or {})) if billing else None
        self.request_timeout_s = request_timeout_s
        self.defaults = sampling_defaults(engine.model)  # temperature / top_p / top_k a request leaves unset

    def caller(self, request: Request) -> Caller:
        if not self.auth:
            return Caller(None, self.tiers["basic"])
        header = request.headers.get("authorization", "")
        secret = header[7:].strip() if header.lower().startswith("bearer ") else None
        try:
            key = self.billing.authenticate(secret, check_budget=False)  # budget, RPM, TPM: at admission
        except AuthError as exc:
            raise APIError(exc.status, str(exc), exc.code) from None
        return Caller(key.id, self.tiers[key.tier])

    async def admit(self, record: RequestRecord, prompt_tokens: int, reserve_tokens: int) -> None:
        """Reserve the request's maximum cost and write its `started` row (429 / 503 when refused).
        prompt_tokens: each distinct prompt once; reserve_tokens: that plus every sequence's max_tokens."""
        record.prompt_tokens = prompt_tokens
        if self.writer is None:
            return
        try:
            await run_in_threadpool(self.writer.admit, record, prompt_tokens, reserve_tokens)
        except AuthError as exc:
            raise APIError(exc.status, str(exc), exc.code) from None

    def check_model(self, name: str) -> None:
        if name not in (self.engine.model_name, "default"):
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                           f"{self.engine.model_name!r}", "model_not_found", "model")  # fmt: skip

    def params(self, req, max_tokens: int, prompt_len: int, logprobs=None, prompt_logprobs=None,
               parse_reasoning: bool = True) -> SamplingParams:  # fmt: skip
        limit = self.engine.max_model_len
        if prompt_len >= limit or prompt_len + max_tokens > limit:
            what = "the prompt" if prompt_len >= limit else "the prompt plus max_tokens"
            raise APIError(400, f"{what} ({prompt_len} + {max_tokens} tokens) exceeds the context length "
                           f"({limit} tokens)", "context_length_exceeded", "messages")  # fmt: skip
        try:
            return self._params(req, max_tokens, logprobs, prompt_logprobs, parse_reasoning)
        except ValueError as exc:
            raise APIError(400, str(exc), "invalid_value") from None

    def _params(self, req, max_tokens, logprobs, prompt_logprobs, parse_reasoning) -> SamplingParams:
        d = self.defaults  # unset sampling fields: the model's generation_config.json, as in the CLI and SDK
        return SamplingParams(max_tokens=max_tokens, temperature=d.temperature if req.temperature is None else req.temperature,
                              top_p=d.top_p if req.top_p is None else req.top_p,
                              top_k=d.top_k if req.top_k is None else req.top_k, seed=req.seed,
                              stop=req.stop_list(), ignore_eos=req.ignore_eos, logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs, parse_reasoning=parse_reasoning,
                              timeout_s=self.request_timeout_s)  # fmt: skip

    def start(self, record: RequestRecord, prompts: list[list[int]], params: list[SamplingParams],
              media: dict | None = None):  # fmt: skip
        """Submit every sequence (each with the same decoded `media`, if any); returns (asyncio queue of
        (index, Output), sequences)."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        seqs = record.seqs  # the record reads token counts from them (checkpoints) and stops them (revocation)

        def listener_for(i):
            def listener(out: Output):
                if out.finish_reason is not None:
                    record.on_final(out)
                loop.call_soon_threadsafe(q.put_nowait, (i, out))

            return listener

        for i, (ids, p) in enumerate(zip(prompts, params)):
            try:
                seqs.append(self.engine.submit(ids, p, listener_for(i), request_id=f"{record.request_id}-{i}",
                                               media=media))  # fmt: skip
            except (QueueFull, ValueError) as exc:
                for s in seqs:
                    self.engine.cancel(s)
                for _ in range(len(prompts) - i):
                    record.sequence_never_started()
                if isinstance(exc, QueueFull):
                    raise APIError(503, str(exc), "server_overloaded") from None
                raise APIError(400, str(exc), "invalid_value") from None
        return q, seqs


def create_app(engine: Engine, billing: Billing | None = None, auth: bool = False,
               request_timeout_s: float | None = 600.0, usage: dict | None = None,
               settings: ServeSettings | None = None) -> FastAPI:  # fmt: skip
    """usage: UsageWriter options (checkpoint_s, reconcile_after_s, retry_s, confirm_s, name).
    settings: body size limit, disconnect polling, whether /metrics and the docs need a key (ServeSettings)."""
    server = Server(engine, billing, auth, request_timeout_s, usage)
    settings = settings or ServeSettings()
    app = FastAPI(title="DeepSeek-R1 OpenAI-compatible API", version="1.0", docs_url=None, redoc_url=None,
                  openapi_url=None)  # served below, behind the key when auth is on  # fmt: skip
    app.state.server = server
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)  # 413 / bad UTF-8 before parsing

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            msg, param = "the request body is not valid JSON", None
        else:
            text = str(first.get("msg")).removeprefix("Value error, ")
            msg, param = f"{'.'.join(loc) or 'body'}: {text}", ".".join(loc) or None
        return JSONResponse(APIError(400, msg, "invalid_request", param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        body = APIError(500, f"internal error: {type(exc).__name__}", "internal_error", type="server_error").body()
        return JSONResponse(body, status_code=500)

    def caller(request: Request) -> Caller:
        return server.caller(request)

    def key_unless(is_open: bool):
        """A dependency: with auth on, the route needs a valid key unless the setting opens it."""

        def check(request: Request) -> None:
            if server.auth and not is_open:
                server.caller(request)

        return Depends(check)

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = drop_422(get_openapi(title=app.title, version=app.version, routes=app.routes))
        return app.openapi_schema

    app.openapi = openapi

    @app.get("/openapi.json", include_in_schema=False, dependencies=[key_unless(settings.open_docs)])
    async def openapi_json():
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=[key_unless(settings.open_docs)])
    async def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title=app.title)

    @app.get("/redoc", include_in_schema=False, dependencies=[key_unless(settings.open_docs)])
    async def redoc():
        return get_redoc_html(openapi_url="/openapi.json", title=app.title)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground():
        return HTMLResponse((WEB_DIR / "index.html").read_text())

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.model_name, **engine.load()}

    @app.get("/metrics", include_in_schema=False, dependencies=[key_unless(settings.open_metrics)])
    async def metrics():
        load = engine.load()
        server.metrics.queue_depth.set(load["waiting"])
        server.metrics.running.set(load["running"])
        server.metrics.free_slots.set(load["free_slots"])
        for key, gauge in server.metrics.engine_stats.items():
            gauge.set(engine.stats.get(key, 0))
        return Response(generate_latest(server.metrics.registry), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", responses=error_responses(401, 429))
    async def models(who: Caller = Depends(caller)):
        return {"object": "list", "data": [{"id": engine.model_name, "object": "model", "created": 0,
                                            "owned_by": "deepseek", "max_model_len": engine.max_model_len,
                                            "sampling_defaults": server.defaults.as_dict()}]}  # fmt: skip

    @app.get("/v1/pricing")
    async def pricing():
        return {name: {"usd_per_1k_tokens": t.usd_per_1k_tokens, "rpm": t.rpm, "tpm": t.tpm}
                for name, t in server.tiers.items()}  # fmt: skip

    @app.post("/v1/chat/completions", responses=error_responses(400, 401, 404, 413, 429, 503, 504))
    async def chat_completions(req: ChatCompletionRequest, request: Request, who: Caller = Depends(caller)):
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        record = RequestRecord(rid, "chat", req.model, who.key_id, who.tier, req.n, server.writer, server.metrics)
        try:
            req.check_text()  # 400 for a lone surrogate, before the tokenizer sees it
            server.check_model(req.model)
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in req.messages]  # fmt: skip
            # assistant turns do not count: templates may drop them in part (R1 drops earlier reasoning)
            _check_prompt_size(engine, sum(len(m["content"]) for m in messages if m["role"] != "assistant"),
                               "messages")  # fmt: skip
            media = None
            plan = await asyncio.to_thread(plan_request, engine, req)  # response_format / tools (400s here)
            if plan is not None and plan.renders:  # tools, tool calls or tool results in the prompt
                if any(m.has_media() for m in req.messages):
                    raise APIError(400, "messages: media content parts together with tools are not supported yet",
                                   "invalid_value", "messages")  # fmt: skip
                ids = await asyncio.to_thread(tool_prompt_ids, engine.tokenizer, plan)
            elif any(m.has_media() for m in req.messages) or getattr(engine.model, "multimodal", None) is not None:
                ids, media = await asyncio.to_thread(_media_prompt, engine, req.messages)  # decoded, checked
            else:
                ids = await asyncio.to_thread(chat_prompt_ids, engine.tokenizer, messages)  # off the event loop
            max_tokens = req.max_completion_tokens or req.max_tokens or (engine.max_model_len - len(ids))
            params = server.params(req, max_tokens, len(ids), logprobs=0 if req.logprobs else None)
            params.grammar = plan.grammar_for(max_tokens) if plan is not None else None  # constrained (structured.py)
            params_n = [_seeded(params, req.seed, i) for i in range(req.n)]
            await server.admit(record, len(ids), len(ids) + req.n * max_tokens)
            q, seqs = server.start(record, [ids] * req.n, params_n, media)
        except APIError:
            record.pending = 0
            record.finish("rejected")
            await record.wait_written()
            raise
        except Exception:  # a bug after admission: close the row (and its reservation) instead of leaving it open
            record.pending = 0
            record.finish("error")
            raise
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            gen = _chat_stream(engine, record, q, seqs, rid, created, req.model, req.n, include_usage, plan)
            return StreamingResponse(gen, media_type="text/event-stream")
        outs = await _collect(engine, request, q, seqs, req.n, settings.disconnect_poll_s)
        await record.wait_written()  # the usage row is committed before the response is sent
        _raise_failure(outs, record)
        body = chat_response(rid, created, req.model, outs, record.totals())
        if plan is not None:  # tool-call text -> tool_calls, finish_reason "tool_calls"
            for choice, o in zip(body["choices"], outs):
                plan.finish(choice, o.text, choice["finish_reason"])
        return body

    @app.post("/v1/embeddings", responses=error_responses(400, 401, 404, 413, 429))
    async def embeddings(req: EmbeddingRequest, who: Caller = Depends(caller)):
        """Shared-space vectors (deepseek/multimodal) for texts, images, audio and point clouds; the vectors of
        one concept in different modalities are close. Counted in usage as prompt tokens, not billed."""
        server.check_model(req.model)
        items = [req.input] if isinstance(req.input, str) else list(req.input)
        vectors, tokens = await asyncio.to_thread(_embed_items, engine, items)
        if req.encoding_format == "base64":
            import base64
            import struct

            vectors = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() for v in vectors]
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": req.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip

    @app.post("/v1/completions", responses=error_responses(400, 401, 404, 413, 429, 503, 504))
    async def completions(req: CompletionRequest, request: Request, who: Caller = Depends(caller)):
        rid = f"cmpl-{uuid.uuid4().hex}"
        prompts = _prompt_list(req.prompt)
        record = RequestRecord(rid, "completions", req.model, who.key_id, who.tier, req.n * len(prompts),
                               server.writer, server.metrics)  # fmt: skip
        try:
            req.check_text()
            server.check_model(req.model)
            for p in prompts:
                _check_prompt_size(engine, len(p) if isinstance(p, str) else 0, "prompt")
            ids_list = await asyncio.to_thread(_encode_all, engine.tokenizer, prompts)  # off the event loop
            if any(len(ids) == 0 for ids in ids_list):
                raise APIError(400, "prompt: an empty prompt has nothing to complete", "invalid_value", "prompt")
            max_tokens = 16 if req.max_tokens is None else req.max_tokens
            if max_tokens == 0 and not req.echo:
                raise APIError(400, "max_tokens: 0 is only meaningful with echo=true", "invalid_value", "max_tokens")
            all_ids, all_params = [], []
            for ids in ids_list:
                p = server.params(req, max_tokens, len(ids), logprobs=req.logprobs,
                                  prompt_logprobs=req.logprobs if req.echo and req.logprobs is not None else None,
                                  parse_reasoning=False)
                for i in range(req.n):
                    all_ids.append(ids)
                    all_params.append(_seeded(p, req.seed, i))
            n_prompt = sum(len(ids) for ids in ids_list)
            await server.admit(record, n_prompt, n_prompt + len(all_ids) * max_tokens)
            q, seqs = server.start(record, all_ids, all_params)
        except APIError:
            record.pending = 0
            record.finish("rejected")
            await record.wait_written()
            raise
        except Exception:  # a bug after admission: close the row (and its reservation) instead of leaving it open
            record.pending = 0
            record.finish("error")
            raise
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            gen = _completion_stream(engine, record, q, seqs, rid, created, req.model, include_usage)
            return StreamingResponse(gen, media_type="text/event-stream")
        outs = await _collect(engine, request, q, seqs, len(seqs), settings.disconnect_poll_s)
        await record.wait_written()
        _raise_failure(outs, record)
        return completion_response(engine.tokenizer, rid, created, req.model, outs, all_ids, req.echo,
                                   req.logprobs, record.totals())  # fmt: skip

    return app


def _media_prompt(engine: Engine, messages) -> tuple[list[int], dict]:
    """Prompt ids (K placeholder ids per media item) and the decoded media of a chat request; 400 naming the
    problem for a text model, undecodable or unsupported media, or placeholders that do not match the media."""
    import torch

    from ..multimodal.lm import check_placeholders
    from ..multimodal.processor import R1Processor, flatten_messages

    adapter = getattr(engine.model, "multimodal", None)
    if adapter is None:
        raise APIError(400, f"messages: model {engine.model_name!r} is a text model; image_url, input_audio and "
                       "input_points content parts need a multimodal model", "unsupported_content", "messages")  # fmt: skip
    try:
        flat, media = flatten_messages([{"role": "system" if m.role == "developer" else m.role,
                                         "content": m.content_parts()} for m in messages])  # fmt: skip
        processor = R1Processor(engine.tokenizer, adapter.config)
        ids = processor.expand(chat_prompt_ids(engine.tokenizer, flat))
        media = {k: v for k, v in media.items() if v}
        check_placeholders(adapter.config, torch.tensor(ids), media)
        return ids, adapter.decode(media)
    except ValueError as exc:
        raise APIError(400, f"messages: {exc}", "invalid_media", "messages") from None


def _embed_items(engine: Engine, items: list) -> tuple[list[list[float]], int]:
    """Unit vectors in the input order and the token count (text tokens; K per media item)."""
    from ..multimodal.processor import part_media

    adapter = getattr(engine.model, "multimodal", None)
    if adapter is None:
        raise APIError(400, f"model {engine.model_name!r} is a text model: it has no shared-space encoders",
                       "unsupported_model", "model")  # fmt: skip
    groups: dict[str, list[tuple[int, object]]] = {}
    tokens = 0
    for i, item in enumerate(items):
        param = f"input[{i}]"
        if isinstance(item, str):
            if (error := surrogate_error(param, item)) is not None:
                raise error
            if not item:
                raise APIError(400, f"{param}: empty text", "invalid_value", param)
            groups.setdefault("text", []).append((i, item))
            tokens += len(engine.tokenizer.encode(item, add_special_tokens=False))
            continue
        try:
            found = part_media(item.model_dump(exclude_none=True))
        except ValueError as exc:
            raise APIError(400, f"{param}: {exc}", "invalid_media", param) from None
        if found is None:  # a text part
            groups.setdefault("text", []).append((i, item.text))
            tokens += len(engine.tokenizer.encode(item.text, add_special_tokens=False))
            continue
        groups.setdefault(found[0], []).append((i, found[1]))
        tokens += adapter.config.tokens_per_item
    out: list = [None] * len(items)
    keys = {"text": "text", "image": "images", "audio": "audio", "points": "points"}
    for modality, entries in groups.items():
        try:
            vecs = engine.model.embed(**{keys[modality]: [x for _, x in entries]})[modality]
        except ValueError as exc:
            raise APIError(400, f"input: {exc}", "invalid_media", "input") from None
        for (i, _), v in zip(entries, vecs.tolist()):
            out[i] = v
    return out, tokens


def _seeded(p: SamplingParams, seed: int | None, i: int) -> SamplingParams:
    if i == 0 and seed is None:
        return p
    return SamplingParams(**{**p.__dict__, "seed": None if seed is None else seed + i, "stop": list(p.stop)})


def _prompt_list(prompt) -> list:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt: must not be empty", "invalid_value", "prompt")
    return list(prompt)


def _check_prompt_size(engine: Engine, n_chars: int, param: str) -> None:
    """400 for a text certainly too long for the context, before it is tokenized."""
    n = engine.fewest_tokens(n_chars)
    if n >= engine.max_model_len:
        raise APIError(400, f"the prompt ({n_chars} characters, at least {n} tokens) exceeds the context length "
                       f"({engine.max_model_len} tokens)", "context_length_exceeded", param)  # fmt: skip


def _encode_all(tokenizer, prompts: list) -> list[list[int]]:
    return [p if isinstance(p, list) else tokenizer.encode(p) for p in prompts]


async def _collect(engine: Engine, request: Request, q: asyncio.Queue, seqs, n: int, poll_s: float) -> list[Output]:
    """Wait for all sequences; cancel them (finish_reason "cancelled") if the client goes away. The client is
    checked every poll_s seconds by the clock, also while tokens keep arriving."""
    totals = [Output(request_id=s.request_id) for s in seqs]
    finished = 0
    next_check = time.monotonic() + poll_s
    try:
        while finished < n:
            try:
                i, out = await asyncio.wait_for(q.get(), timeout=poll_s)
                totals[i].merge(out)
                finished += out.finish_reason is not None
            except TimeoutError:
                pass
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + poll_s
                if await request.is_disconnected():
                    raise APIError(499, "the client disconnected", "cancelled")
    finally:
        for s in seqs:
            if s.finish_reason is None:
                engine.cancel(s)
    return totals


def _fail_status(record: RequestRecord, reason: str) -> tuple[int, str, str]:
    if record.revoked:  # stopped by the checkpoint thread: say why, not just "cancelled"
        return 401, "invalid_api_key", "the API key was revoked while the request ran"
    return FAIL_STATUS[reason]


def _raise_failure(outs: list[Output], record: RequestRecord) -> None:
    for o in outs:
        if o.finish_reason in FAIL_STATUS:
            status, code, msg = _fail_status(record, o.finish_reason)
            raise APIError(status, f"{msg}" + (f": {o.error}" if o.error else ""), code)


async def _chat_stream(engine, record, q, seqs, rid, created, model, n, include_usage, plan=None):
    try:
        for i in range(n):
            yield sse(chat_chunk(rid, created, model, i, {"role": "assistant", "content": ""}))
        finished = 0
        while finished < n:
            i, out = await q.get()
            delta = {}
            if out.reasoning:
                delta["reasoning_content"] = delta["reasoning"] = out.reasoning
            if out.text:
                delta["content"] = out.text
            if out.finish_reason in FAIL_STATUS:
                status, code, msg = _fail_status(record, out.finish_reason)
                yield sse(APIError(status, msg, code).body())
                finished += 1
                continue
            reason = openai_reason(out.finish_reason)
            if plan is not None:  # tool-call text -> tool_calls deltas
                delta, reason = plan.stream_delta(i, out.text, out.finish_reason is not None, delta, reason)
            if delta or out.finish_reason:
                yield sse(chat_chunk(rid, created, model, i, delta, reason))
            finished += out.finish_reason is not None
        if include_usage:
            yield sse(chat_chunk(rid, created, model, None, None, usage=record.totals()))
        await record.wait_written()
        yield "data: [DONE]\n\n"
    finally:
        for s in seqs:  # client gone or stream done: stop what still runs, free its cache slot
            if s.finish_reason is None:
                engine.cancel(s)


async def _completion_stream(engine, record, q, seqs, rid, created, model, include_usage):
    try:
        finished = 0
        while finished < len(seqs):
            i, out = await q.get()
            if out.finish_reason in FAIL_STATUS:
                status, code, msg = _fail_status(record, out.finish_reason)
                yield sse(APIError(status, msg, code).body())
                finished += 1
                continue
            text = out.reasoning + out.text
            if text or out.finish_reason:
                yield sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                           "choices": [{"index": i, "text": text, "logprobs": None,
                                        "finish_reason": openai_reason(out.finish_reason)}]})  # fmt: skip
            finished += out.finish_reason is not None
        if include_usage:
            yield sse({"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
                       "usage": usage_body(record.totals())})  # fmt: skip
        await record.wait_written()
        yield "data: [DONE]\n\n"
    finally:
        for s in seqs:
            if s.finish_reason is None:
                engine.cancel(s)


__all__ = ["create_app", "Server"]
