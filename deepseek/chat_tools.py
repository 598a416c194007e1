"""Tools in the chat format (DeepSeek-V3's tool-call format): validating tool definitions, rendering tools,
tool calls and tool results into the prompt, the grammar that makes a model write tool calls, and parsing
the model's tool-call text back into OpenAI `tool_calls` (whole or streamed).

    ids = prompt_ids(tokenizer, messages, tools)            # messages may hold tool_calls and role "tool"
    content, calls = parse_tool_calls(text)                  # calls: [{"id", "type", "function": {name, arguments}}]
    lark = tool_grammar(vocab, tools, names=["get_weather"], parallel=True)   # for tool_choice required / named

The format (documented in docs/structured.md): tool definitions go into the system text under "## Tools";
an assistant's calls are

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    ARGUMENTS
    ```<｜tool▁call▁end｜>(newline, the next call ...)<｜tool▁calls▁end｜>

and consecutive tool results are one block
`<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>RESULT<｜tool▁output▁end｜>...<｜tool▁outputs▁end｜>`.
Real DeepSeek tokenizers have each marker as one special token; other tokenizers spell them in bytes.
The parser also reads DeepSeek-V3.1's form (`<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGUMENTS<｜tool▁call▁end｜>`).

The role markers around these come from the tokenizer's own chat template, probed once with placeholder
messages (so the bundled models, real DeepSeek checkpoints and any other template get their own markers).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
OUTPUTS_BEGIN, OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
OUTPUT_BEGIN, OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
FENCE_OPEN, FENCE_CLOSE = "\n```json\n", "\n```"
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ToolError(ValueError):
    """A tool definition, tool choice or tool message that cannot be used; `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# ---------------------------------------------------------------------------------------------- definitions
def check_tools(tools) -> list[dict]:
    """OpenAI tool definitions -> [{"name", "description", "parameters"}]; ToolError naming the field."""
    if not isinstance(tools, list) or not tools:
        raise ToolError("tools: must be a non-empty list of {\"type\": \"function\", \"function\": {...}}", "tools")
    out, seen = [], set()
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(t.get("function"), dict):
            raise ToolError(f"{where}: must be {{\"type\": \"function\", \"function\": {{\"name\", ...}}}}", where)
        f = t["function"]
        name = f.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ToolError(f"{where}.function.name: must be 1-64 characters of a-z, A-Z, 0-9, _ or -, got {name!r}",
                            f"{where}.function.name")  # fmt: skip
        if name in seen:
            raise ToolError(f"{where}.function.name: {name!r} is defined twice", f"{where}.function.name")
        seen.add(name)
        params = f.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise ToolError(f"{where}.function.parameters: must be a JSON schema object", f"{where}.function.parameters")
        desc = f.get("description") or ""
        if not isinstance(desc, str):
            raise ToolError(f"{where}.function.description: must be a string", f"{where}.function.description")
        out.append({"name": name, "description": desc, "parameters": params})
    return out


def tools_text(tools: list[dict]) -> str:
    """The tool definitions as they appear in the system text."""
    parts = ["## Tools", "You have access to the following tools:"]
    for t in tools:
        parts.append(f"### {t['name']}\nDescription: {t['description']}\n\n"
                     f"Parameters: {json.dumps(t['parameters'], ensure_ascii=False)}")  # fmt: skip
    parts.append("IMPORTANT: ALWAYS adhere to this exact format for tool use:\n"
                 f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}tool_name{FENCE_OPEN}arguments as JSON{FENCE_CLOSE}{CALL_END}"
                 f"{CALLS_END}\nFor several calls, write one {CALL_BEGIN}...{CALL_END} after the other, each on "
                 "its own line.")  # fmt: skip
    return "\n\n".join(parts)


def calls_text(calls: list[dict]) -> str:
    """OpenAI tool_calls ([{"function": {"name", "arguments"}}]) in the format."""
    body = "\n".join(f"{CALL_BEGIN}function{SEP}{c['function']['name']}{FENCE_OPEN}"
                     f"{_arguments(c['function'].get('arguments'))}{FENCE_CLOSE}{CALL_END}" for c in calls)  # fmt: skip
    return CALLS_BEGIN + body + CALLS_END


def _arguments(a) -> str:
    return a if isinstance(a, str) else json.dumps(a if a is not None else {}, ensure_ascii=False)


# ------------------------------------------------------------------------------------------------ rendering
@dataclass
class Markers:
    """What a chat template writes around each role (found by rendering placeholder messages)."""

    bos: str
    system: str  # before the system text
    user: str  # before a user text (after any earlier turn)
    assistant: str  # before an assistant text
    end: str  # after an assistant text
    generation: str  # the generation prompt after the last turn (may open <think>)


_PROBES = ("\x01S\x01", "\x01U\x01", "\x01A\x01", "\x01V\x01")


def markers(tokenizer) -> Markers:
    """The template's role markers (cached on the tokenizer); DeepSeek-R1's own without a template."""
    cached = getattr(tokenizer, "_deepseek_chat_markers", None)
    if cached is not None:
        return cached
    from .chat import ASSISTANT, BOS, EOS, THINK_OPEN, USER

    m = Markers(BOS, "", USER, ASSISTANT, EOS, ASSISTANT + THINK_OPEN + "\n")
    if getattr(tokenizer, "chat_template", None):
        s, u, a, v = _PROBES
        render = lambda msgs: tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)  # noqa: E731
        text = render([{"role": "system", "content": s}, {"role": "user", "content": u},
                       {"role": "assistant", "content": a}, {"role": "user", "content": v}])  # fmt: skip
        head, rest = text.split(s, 1)
        between_su, rest = rest.split(u, 1)
        ua, rest = rest.split(a, 1)
        av, gen = rest.split(v, 1)
        bos = tokenizer.bos_token or ""
        bos = bos if head.startswith(bos) else ""
        # av = end of assistant + user marker; between_su = (separator) + user marker
        user = _common_suffix(between_su, av)
        m = Markers(bos, head[len(bos):], user, ua, av[: len(av) - len(user)], gen)
    try:
        tokenizer._deepseek_chat_markers = m
    except AttributeError:
        pass
    return m


def _common_suffix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return a[len(a) - n :]


def render(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> str:
    """The prompt text of a conversation with tools (definitions checked by check_tools), assistant tool_calls
    and role "tool" results, ending with the generation prompt."""
    m = markers(tokenizer)
    system = "\n\n".join(x["content"] or "" for x in messages if x["role"] in ("system", "developer"))
    if tools:
        system = (system + "\n\n" if system else "") + tools_text(tools)
    text = m.bos + (m.system + system if system else "")
    in_outputs = False
    for x in messages:
        role = x["role"]
        if role in ("system", "developer"):
            continue
        if in_outputs and role != "tool":
            text += OUTPUTS_END
            in_outputs = False
        if role == "user":
            text += m.user + (x["content"] or "")
        elif role == "assistant":
            body = x.get("content") or ""
            if x.get("tool_calls"):
                body += calls_text(x["tool_calls"])
            text += m.assistant + body + m.end
        elif role == "tool":
            text += ("" if in_outputs else OUTPUTS_BEGIN) + OUTPUT_BEGIN + (x["content"] or "") + OUTPUT_END
            in_outputs = True
    if in_outputs:
        text += OUTPUTS_END
    return text + m.generation


def prompt_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    return tokenizer.encode(render(tokenizer, messages, tools), add_special_tokens=False)


def needs_tool_format(messages: list[dict], tools) -> bool:
    """Whether the conversation needs this module's rendering (else chat.chat_prompt_ids renders it)."""
    return bool(tools) or any(x["role"] == "tool" or x.get("tool_calls") for x in messages)


# -------------------------------------------------------------------------------------------------- grammar
def tool_grammar(vocab, tools: list[dict], names: list[str] | None = None, parallel: bool = True,
                 lead_newlines: int = 2, content_schema: dict | None = None) -> str:  # fmt: skip
    """A Lark grammar (llguidance) for one block of tool calls to the named tools (default: all), each call's
    arguments valid under its parameters schema; with content_schema, a JSON answer under that schema is
    allowed instead of the calls."""
    from .generation.constrained import json_rule, lark_string

    lit = vocab.literal
    chosen = [t for t in tools if names is None or t["name"] in names]
    rules = [f'f{k}: {lark_string(t["name"] + FENCE_OPEN)} {json_rule(t["parameters"])} {lark_string(FENCE_CLOSE)}'
             for k, t in enumerate(chosen)]  # fmt: skip
    more = ' ("\\n" call)*' if parallel else ""
    body = "calls" if content_schema is None else f"calls | {json_rule(content_schema)}"
    lead = f'start: "\\n"{{0,{lead_newlines}}} body\n' if lead_newlines else "start: body\n"
    return (lead + f"body: {body}\n" + f"calls: {lit(CALLS_BEGIN)} call{more} {lit(CALLS_END)}\n"
            + f'call: {lit(CALL_BEGIN)} "function" {lit(SEP)} ({" | ".join(f"f{k}" for k in range(len(chosen)))}) '
            + f"{lit(CALL_END)}\n" + "\n".join(rules) + "\n")  # fmt: skip


# -------------------------------------------------------------------------------------------------- parsing
def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _parse_block(block: str) -> tuple[str, str] | None:
    """(name, arguments) of the text between a call's begin and end markers."""
    if SEP not in block:
        return None
    head, body = block.split(SEP, 1)
    if head.strip() in ("function", "") and "\n" in body:  # V3: function<sep>NAME\n```json\nARGS\n```
        name, args = body.split("\n", 1)
        args = args.strip()
        if args.startswith("```"):
            args = args[3:].removeprefix("json")
        args = args.removesuffix("```").strip()
    else:  # V3.1: NAME<sep>ARGS
        name, args = head, body.strip()
    name = name.strip()
    return (name, args) if name else None


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(content, tool_calls) of a completion: the text before the calls and the complete calls, in OpenAI's
    shape. A text without calls comes back unchanged with []."""
    if CALLS_BEGIN not in text and CALL_BEGIN not in text:
        return text, []
    cut = min(i for i in (text.find(CALLS_BEGIN), text.find(CALL_BEGIN)) if i >= 0)
    content, rest = text[:cut], text[cut:]
    calls = []
    for block in re.findall(re.escape(CALL_BEGIN) + "(.*?)" + re.escape(CALL_END), rest, flags=re.S):
        parsed = _parse_block(block)
        if parsed is not None:
            calls.append({"id": new_call_id(), "type": "function",
                          "function": {"name": parsed[0], "arguments": parsed[1]}})  # fmt: skip
    if not calls:
        return text, []
    return content.rstrip(), calls


class ToolCallStream:
    """Streams a completion's text as (content delta, tool_calls deltas in OpenAI's chunk shape): content until
    the calls begin; then, per call, one delta with its id, type and name (arguments "") as soon as the name
    is complete, and argument deltas as they are written."""

    def __init__(self):
        self.text = ""
        self.sent_content = 0
        self.calls: list[dict] = []  # {"id", "name", "sent"}: what was emitted per call
        self.in_calls = False

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[dict]]:
        self.text += delta
        if not self.in_calls:
            cut = _first(self.text, (CALLS_BEGIN, CALL_BEGIN))
            if cut is None:
                hold = 0 if final else max(_prefix_overlap(self.text, CALLS_BEGIN), _prefix_overlap(self.text, CALL_BEGIN))
                out = self.text[self.sent_content : len(self.text) - hold]
                self.sent_content += len(out)
                return out, []
            self.in_calls = True
            content = self.text[self.sent_content : cut].rstrip() if cut > self.sent_content else ""
            self.sent_content = cut
            return content, self._call_deltas(final)
        return "", self._call_deltas(final)

    def _call_deltas(self, final: bool) -> list[dict]:
        section = self.text[self.sent_content :]
        deltas = []
        for k, piece in enumerate(section.split(CALL_BEGIN)[1:]):
            complete = CALL_END in piece
            block = piece.split(CALL_END, 1)[0]
            name, args = _partial(block, complete or final)
            if name is None:
                break
            if k == len(self.calls):
                self.calls.append({"id": new_call_id(), "name": name, "sent": ""})
                deltas.append({"index": k, "id": self.calls[k]["id"], "type": "function",
                               "function": {"name": name, "arguments": ""}})  # fmt: skip
            c = self.calls[k]
            if args.startswith(c["sent"]) and len(args) > len(c["sent"]):
                deltas.append({"index": k, "function": {"arguments": args[len(c["sent"]) :]}})
                c["sent"] = args
            if not complete:
                break
        return deltas

    @property
    def has_calls(self) -> bool:
        return bool(self.calls)


def _first(text: str, needles) -> int | None:
    found = [i for i in (text.find(n) for n in needles) if i >= 0]
    return min(found) if found else None


def _prefix_overlap(text: str, marker: str) -> int:
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def _partial(block: str, complete: bool) -> tuple[str | None, str]:
    """(name, arguments so far) of a call being written; name None until it is complete."""
    if complete:
        parsed = _parse_block(block)
        return (parsed[0], parsed[1]) if parsed else (None, "")
    if SEP not in block:
        return None, ""
    head, body = block.split(SEP, 1)
    if head.strip() not in ("function", ""):  # V3.1: arguments follow the separator directly
        return head.strip(), body[: len(body) - _prefix_overlap(body, CALL_END)].strip()
    if "\n" not in body:
        return None, ""
    name, args = body.split("\n", 1)
    if not args.startswith(FENCE_OPEN[1:]):
        return name.strip(), ""
    args = args[len(FENCE_OPEN) - 1 :]
    end = args.find(FENCE_CLOSE)
    if end >= 0:
        return name.strip(), args[:end]
    return name.strip(), args[: len(args) - _prefix_overlap(args, FENCE_CLOSE)]
