"""OpenAI request bodies (pydantic, so /openapi.json describes them), the OpenAI error shape, the HTTP-level
settings (body size limit, disconnect polling, which routes need a key) and the body-limit middleware."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.responses import JSONResponse

MAX_N = 8  # completions per request
MAX_STOP = 16  # stop strings per request: OpenAI allows 4; lm-eval appends EOS to a task's own (docs/evaluation.md)
MiB = 2**20
_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON may carry "\\ud800"; no tokenizer or database takes it


@dataclass
class ServeSettings:
    """What the HTTP layer allows (the engine's own limits are in EngineConfig)."""

    max_body_bytes: int = 4 * MiB  # a larger POST body gets 413 before it is read in full (about 1M tokens)
    disconnect_poll_s: float = 0.25  # a non-streaming request checks this often whether its client went away
    open_metrics: bool = False  # with auth on, /metrics needs a key unless this is set
    open_docs: bool = False  # with auth on, /openapi.json, /docs and /redoc need a key unless this is set

    def __post_init__(self):
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        if not self.disconnect_poll_s > 0:
            raise ValueError(f"disconnect_poll_s must be > 0, got {self.disconnect_poll_s}")


class APIError(Exception):
    """Answered as {"error": {"message", "type", "param", "code"}} with this HTTP status."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type = type or ("server_error" if status >= 500 else {
            401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}.get(
            status, "invalid_request_error"))  # fmt: skip

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """Every error the server answers: {"error": {message, type, param, code}}."""

    error: ErrorDetail


_ERROR_TEXT = {400: "Bad request: malformed JSON or UTF-8, wrong types, out-of-range values, too long a prompt",
               401: "Missing, wrong or revoked API key", 404: "Unknown model",
               413: "Request body larger than the server's limit", 429: "Rate limit or budget exhausted",
               503: "Request queue full; retry later", 504: "Request timed out"}  # fmt: skip


def error_responses(*codes: int) -> dict:
    """FastAPI `responses=` for the error statuses a route can answer (documented in /openapi.json)."""
    return {c: {"model": ErrorBody, "description": _ERROR_TEXT[c]} for c in codes}


def drop_422(schema: dict) -> dict:
    """FastAPI documents 422 for every route with a body; this server answers 400 for those (see api.py)."""
    for ops in schema.get("paths", {}).values():
        for op in ops.values():
            op.get("responses", {}).pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        schema.get("components", {}).get("schemas", {}).pop(name, None)
    return schema


def surrogate_error(param: str, text: str | None) -> APIError | None:
    """A 400 naming `param` when text holds a lone UTF-16 surrogate, else None."""
    m = _SURROGATE.search(text) if text else None
    if m is None:
        return None
    return APIError(400, f"{param}: contains a lone UTF-16 surrogate (U+{ord(m.group()):04X} at character "
                    f"{m.start()}); send valid Unicode text", "invalid_encoding", param)  # fmt: skip


class BodyLimit:
    """ASGI middleware for POST bodies: over `max_bytes` -> 413, judged from Content-Length before anything is
    read and again while reading (chunked bodies); not UTF-8 -> 400. The app then gets the body in one message,
    and later receive() calls (disconnect checks) go to the server as usual."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        too_big = APIError(413, f"the request body is larger than the server's limit of {self.max_bytes} bytes",
                           "request_too_large")  # fmt: skip
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            error = too_big if length.isdigit() else APIError(400, "Content-Length is not a number", "invalid_request")
            return await _reply(error, scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await _reply(too_big, scope, receive, send)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            return await _reply(APIError(400, "the request body is not valid UTF-8", "invalid_encoding"), scope,
                                receive, send)  # fmt: skip
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _reply(error: APIError, scope, receive, send) -> None:
    await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ImagePart(BaseModel):
    """{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}} (PNG / JPEG data URLs)."""

    type: Literal["image_url"]
    image_url: ImageURL


class MediaData(BaseModel):
    data: str  # base64 of the file
    format: str


class AudioPart(BaseModel):
    """{"type": "input_audio", "input_audio": {"data": "<base64 wav>", "format": "wav"}}."""

    type: Literal["input_audio"]
    input_audio: MediaData


class PointsPart(BaseModel):
    """{"type": "input_points", "input_points": {"data": "<base64 .npy / .ply / .xyz>", "format": "npy"}}."""

    type: Literal["input_points"]
    input_points: MediaData


ContentPart = Annotated[TextPart | ImagePart | AudioPart | PointsPart, Field(discriminator="type")]
MAX_PARTS = 64  # content parts per message
PART_TYPES = ("text", "image_url", "input_audio", "input_points")


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]  # tool: a tool result (tool_call_id)
    content: str | Annotated[list[ContentPart], Field(max_length=MAX_PARTS)] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _known_parts(cls, v):
        """One clear message for an unknown part type (the union's own error would name its str member)."""
        if isinstance(v, list):
            for i, part in enumerate(v):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in PART_TYPES:
                    raise ValueError(f"content[{i}]: unknown content part type {kind!r}; expected one of "
                                     f"{', '.join(PART_TYPES)}")  # fmt: skip
        return v

    def text(self) -> str:
        """The text parts joined (media parts are not text; see has_media / content_parts)."""
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(
            p.text for p in self.content if isinstance(p, TextPart))  # fmt: skip

    def has_media(self) -> bool:
        return isinstance(self.content, list) and any(not isinstance(p, TextPart) for p in self.content)

    def content_parts(self) -> str | list[dict]:
        """The content as the processor takes it (deepseek/multimodal/processor.py: flatten_messages)."""
        if not isinstance(self.content, list):
            return self.content or ""
        return [p.model_dump(exclude_none=True) for p in self.content]


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields are accepted and ignored
    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False  # extension (as in vLLM): generate exactly max_tokens, for benchmarks

    def texts(self) -> list[tuple[str, str | None]]:
        """(param, text) for every string the server will read."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [("model", self.model), ("user", self.user)] + [(f"stop[{i}]", s) for i, s in enumerate(stops)]

    def check_text(self) -> None:
        """400 for a lone surrogate in any text, before tokenization (which would fail on it)."""
        for param, text in self.texts():
            if (error := surrogate_error(param, text)) is not None:
                raise error

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise APIError(400, f"stop: at most {MAX_STOP} non-empty strings", "invalid_value", "stop")
        return stops


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False

    def texts(self) -> list[tuple[str, str | None]]:
        return super().texts() + [(f"messages[{i}].content", m.text()) for i, m in enumerate(self.messages)]


# minLength for the schema only: a constrained str would refuse lone surrogates with a vaguer message before
# check_text() names the field; emptiness is checked by CompletionRequest._prompt_shape.
Text = Annotated[str, Field(json_schema_extra={"minLength": 1})]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]  # < vocab size: checked at submit


class CompletionRequest(SamplingFields):
    prompt: Text | Annotated[list[Text], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, v):
        """One clear message for the empty and negative cases (the union's own errors name its first member)."""
        items = v if isinstance(v, list) else [v]
        if v in ("", []) or any(x in ("", []) for x in items):
            raise ValueError("an empty prompt has nothing to complete")
        ids = [t for x in items for t in (x if isinstance(x, list) else [x]) if isinstance(t, int)]
        if ids and min(ids) < 0:
            raise ValueError("token ids must be >= 0")
        return v
    max_tokens: int | None = Field(None, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)

    def texts(self) -> list[tuple[str, str | None]]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        return super().texts() + [(f"prompt[{i}]", p) for i, p in enumerate(prompts) if isinstance(p, str)]


MAX_EMBED_INPUTS = 256


class EmbeddingRequest(BaseModel):
    """/v1/embeddings: texts and media parts (the chat content-part shapes) -> shared-space unit vectors."""

    model_config = ConfigDict(extra="allow")
    model: str
    input: str | Annotated[list[str | ContentPart], Field(min_length=1, max_length=MAX_EMBED_INPUTS)]
    encoding_format: Literal["float", "base64"] = "float"  # base64: little-endian float32 (the openai client's default)
    user: str | None = None
