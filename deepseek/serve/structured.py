"""Structured outputs and tool calls for /v1/chat/completions: reading `response_format`, `tools`,
`tool_choice`, `parallel_tool_calls` and tool messages (400s with the field named), the request's grammar,
and turning the model's text into `tool_calls` (whole and streamed).

    plan = plan_request(engine, req)          # None for a plain request; APIError(400) for a bad one
    plan.grammar                              # constrained.Grammar or None (tool_choice auto / none, no format)
    plan.messages, plan.tools                 # what chat_tools.prompt_ids renders (plan.renders)
    plan.finish(body_choice, out)             # tool_calls + finish_reason "tool_calls" in a response
    plan.stream_delta(i, out, delta)          # the same for one streamed chunk

response_format: {"type": "text"}, {"type": "json_object"}, {"type": "json_schema", "json_schema": {"name",
"schema", "strict"}}, and two extensions: {"type": "regex", "regex": "..."} and {"type": "choice",
"choices": [...]}. json_schema is always enforced (strict or not). tool_choice "none" leaves the tools out
of the prompt; "auto" renders them and parses whatever calls the model writes (no mask, unless a
response_format asks for JSON: then calls or that JSON); "required" / a named function constrains the
answer to calls (of that function) with arguments valid under their parameters schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import chat_tools
from ..chat_tools import ToolCallStream, ToolError, check_tools, parse_tool_calls, tool_grammar
from ..generation.constrained import (
    ConstraintError,
    GrammarVocab,
    choice_grammar,
    closed_objects,
    json_object_grammar,
    json_schema_grammar,
    regex_grammar,
)
from .protocol import APIError


def _bad(message: str, param: str | None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, code, param)


def grammar_vocab(engine) -> GrammarVocab:
    """The engine's tokenizer for grammars (built on first use, then kept on the engine)."""
    vocab = getattr(engine, "_grammar_vocab", None)
    if vocab is None:
        vocab = GrammarVocab(engine.tokenizer, engine.model.config.vocab_size, engine.eos_ids)
        engine._grammar_vocab = vocab
    return vocab


@dataclass
class Plan:
    grammar: object = None  # constrained.Grammar
    tools: list[dict] | None = None  # checked definitions rendered into the prompt
    parse_tools: bool = False  # turn tool-call text into tool_calls
    messages: list[dict] | None = None  # the conversation in chat_tools' form (tool_calls, role "tool")
    streams: dict = field(default_factory=dict)  # choice index -> ToolCallStream

    reasoning_budget: int | None = None  # extension: reasoning tokens before </think> is forced

    def grammar_for(self, max_tokens: int):
        """The grammar with its reasoning budget: `reasoning_budget`, else half of max_tokens (so that a model
        that reasons still writes its constrained answer within max_tokens)."""
        if self.grammar is not None:
            budget = self.reasoning_budget
            self.grammar.force_close_after = max_tokens // 2 if budget is None else budget
        return self.grammar

    @property
    def renders(self) -> bool:
        return self.messages is not None

    # ---------------------------------------------------------------------------------- responses
    def finish(self, choice: dict, text: str, finish_reason: str | None) -> None:
        """Put the tool calls of a whole completion into its response choice."""
        if not self.parse_tools:
            return
        content, calls = parse_tool_calls(text)
        if calls:
            choice["message"]["content"] = content or None
            choice["message"]["tool_calls"] = calls
            if finish_reason == "stop":
                choice["finish_reason"] = "tool_calls"

    def stream_delta(self, i: int, text: str, final: bool, delta: dict, finish_reason: str | None):
        """(delta, finish_reason) of one streamed chunk: content until the calls begin, then tool_calls."""
        if not self.parse_tools:
            return delta, finish_reason
        stream = self.streams.setdefault(i, ToolCallStream())
        content, calls = stream.feed(text, final=final)
        delta = {k: v for k, v in delta.items() if k != "content"}
        if content:
            delta["content"] = content
        if calls:
            delta["tool_calls"] = calls
        if final and finish_reason == "stop" and stream.has_calls:
            finish_reason = "tool_calls"
        return delta, finish_reason


def plan_request(engine, req) -> Plan | None:
    """What the request asks beyond plain text; None when nothing. Raises APIError(400) naming the field."""
    extra = req.model_extra or {}
    fmt, tools_raw, choice = extra.get("response_format"), extra.get("tools"), extra.get("tool_choice")
    parallel = extra.get("parallel_tool_calls", True)
    budget = extra.get("reasoning_budget")
    if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 0):
        raise _bad("reasoning_budget: must be an integer >= 0", "reasoning_budget")
    tool_messages = any(m.role == "tool" or (m.model_extra or {}).get("tool_calls") for m in req.messages)
    if fmt is None and tools_raw is None and choice is None and not tool_messages:
        return None
    if not isinstance(parallel, bool):
        raise _bad("parallel_tool_calls: must be a boolean", "parallel_tool_calls")
    tools = None
    if tools_raw is not None:
        try:
            tools = check_tools(tools_raw)
        except ToolError as exc:
            raise _bad(str(exc), exc.param) from None
    names = _tool_choice(choice, tools)  # None: no constraint from the tools
    plan = Plan(reasoning_budget=budget)
    content_schema = None
    vocab = grammar_vocab(engine)
    lark = _format_grammar(fmt)
    if isinstance(lark, dict):  # a JSON schema that tool calls may replace (tool_choice auto)
        content_schema, lark = lark, json_schema_grammar(lark)
    if names is not None and fmt is not None and _format_type(fmt) != "text":
        raise _bad("response_format cannot be combined with tool_choice \"required\" or a named function: the "
                   "answer is then the tool calls", "response_format")  # fmt: skip
    use_tools = tools is not None and choice != "none"
    if use_tools:
        plan.tools, plan.parse_tools = tools, True
        for k, t in enumerate(tools):  # each parameters schema must compile (unsupported features -> 400)
            try:
                vocab.compile(json_schema_grammar(t["parameters"]))
            except ConstraintError as exc:
                raise _bad(f"tools[{k}].function.parameters: {exc}", f"tools[{k}].function.parameters",
                           "invalid_schema") from None  # fmt: skip
        if names is not None:
            lark = tool_grammar(vocab, tools, names, parallel=parallel and choice == "required")
        elif content_schema is not None:
            lark = tool_grammar(vocab, tools, None, parallel=parallel, content_schema=content_schema)
    if lark is not None:
        try:
            plan.grammar = vocab.compile(lark)
        except ConstraintError as exc:
            param = "response_format" if fmt is not None and names is None else "tools"
            raise _bad(f"{param}: {exc}", param, "invalid_schema") from None
    if use_tools or tool_messages:
        plan.messages = _messages(req)
    return plan


def _format_type(fmt) -> str:
    return fmt.get("type") if isinstance(fmt, dict) else None


def _format_grammar(fmt):
    """The Lark grammar of a response_format (a dict for a JSON schema, so tools may be added), or None."""
    if fmt is None:
        return None
    kind = _format_type(fmt)
    try:
        if kind == "text":
            return None
        if kind == "json_object":
            return json_object_grammar()
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict):
                raise _bad("response_format.json_schema: must be an object with \"name\" and \"schema\"",
                           "response_format.json_schema")  # fmt: skip
            schema = spec.get("schema", {"type": "object"})
            if not isinstance(schema, dict):
                raise _bad("response_format.json_schema.schema: must be a JSON schema object",
                           "response_format.json_schema.schema")  # fmt: skip
            return closed_objects(schema) if spec.get("strict") else schema
        if kind == "regex":
            return regex_grammar(fmt.get("regex"))
        if kind == "choice":
            return choice_grammar(fmt.get("choices"))
    except ConstraintError as exc:
        raise _bad(f"response_format: {exc}", "response_format", "invalid_schema") from None
    raise _bad(f"response_format.type: must be one of text, json_object, json_schema, regex, choice; got {kind!r}",
               "response_format.type")  # fmt: skip


def _tool_choice(choice, tools) -> list[str] | None:
    """The tools the answer must call (None: not forced)."""
    if choice is None or choice in ("auto", "none"):
        return None
    if tools is None:
        raise _bad("tool_choice: given without tools", "tool_choice")
    known = [t["name"] for t in tools]
    if choice == "required":
        return known
    if isinstance(choice, dict) and choice.get("type", "function") == "function":
        name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) else None
        if not isinstance(name, str):
            raise _bad("tool_choice.function.name: missing", "tool_choice.function.name")
        if name not in known:
            raise _bad(f"tool_choice: no tool named {name!r} in tools (defined: {', '.join(known)})",
                       "tool_choice.function.name", "unknown_tool")  # fmt: skip
        return [name]
    raise _bad("tool_choice: must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": "
               "{\"name\": ...}}", "tool_choice")  # fmt: skip


def _messages(req) -> list[dict]:
    """The conversation with tool calls and tool results, checked (400 naming the field)."""
    out = []
    for i, m in enumerate(req.messages):
        extra = m.model_extra or {}
        role = "system" if m.role == "developer" else m.role
        msg = {"role": role, "content": m.text()}
        calls = extra.get("tool_calls")
        if calls is not None:
            if role != "assistant" or not isinstance(calls, list):
                raise _bad(f"messages[{i}].tool_calls: only an assistant message has tool_calls (a list)",
                           f"messages[{i}].tool_calls")  # fmt: skip
            for k, c in enumerate(calls):
                f = c.get("function") if isinstance(c, dict) else None
                if not isinstance(f, dict) or not isinstance(f.get("name"), str):
                    raise _bad(f"messages[{i}].tool_calls[{k}]: must be {{\"id\", \"type\": \"function\", "
                               "\"function\": {\"name\", \"arguments\"}}", f"messages[{i}].tool_calls[{k}]")  # fmt: skip
                if not isinstance(f.get("arguments", ""), (str, dict)):
                    raise _bad(f"messages[{i}].tool_calls[{k}].function.arguments: must be a JSON string",
                               f"messages[{i}].tool_calls[{k}].function.arguments")  # fmt: skip
            msg["tool_calls"] = calls
        if role == "tool" and not isinstance(extra.get("tool_call_id", ""), str):
            raise _bad(f"messages[{i}].tool_call_id: must be a string", f"messages[{i}].tool_call_id")
        out.append(msg)
    return out


def prompt_ids(tokenizer, plan: Plan) -> list[int]:
    return chat_tools.prompt_ids(tokenizer, plan.messages, plan.tools)
