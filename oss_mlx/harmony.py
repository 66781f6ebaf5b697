"""The harmony chat format of gpt-oss: rendering conversations to tokens and parsing model output.

Our own pure-Python renderer and parser, rather than openai-harmony's, for two reasons: it works
from the vocabulary in the model folder (openai-harmony needs its own download / cache of the
vocabulary), and the parser must be tolerant — openai-harmony's ``StreamableParser`` raises on
malformed output, which a sampled model produces now and then. Rendering is token-for-token identical
to openai-harmony (``render_conversation_for_completion(conv, Role.ASSISTANT)`` and
``render_conversation``); the tests compare the two.

A message renders as::

    <|start|>{author}[ to={recipient}][<|channel|>{channel}][ {content_type}]<|message|>{content}<|end|>

ending in ``<|call|>`` instead when an assistant message has a recipient (a tool call).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from .tokenizer import HarmonyTokenizer, StreamingDecoder

__all__ = [
    "ROLES",
    "CHANNELS",
    "DEFAULT_MODEL_IDENTITY",
    "DEFAULT_KNOWLEDGE_CUTOFF",
    "Message",
    "Tool",
    "as_tool",
    "TextDelta",
    "MessageDone",
    "ToolCall",
    "Event",
    "render_system",
    "render_developer",
    "render_tools",
    "render_message",
    "render_conversation",
    "StreamParser",
    "parse_completion",
]

ROLES = ("system", "developer", "user", "assistant", "tool")
CHANNELS = ("analysis", "commentary", "final")
REASONING_EFFORTS = ("low", "medium", "high")
DEFAULT_MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
DEFAULT_KNOWLEDGE_CUTOFF = "2024-06"


@dataclass
class Message:
    """One harmony message.

    A tool call is an assistant message on channel ``"commentary"`` with recipient
    ``"functions.NAME"`` and content type ``"<|constrain|>json"``; its result is a ``"tool"`` message
    whose ``name`` is ``"functions.NAME"`` (rendered as the author) with recipient ``"assistant"``.
    For other roles ``name`` renders as ``role:name``.
    """

    role: str
    content: str
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None
    name: str | None = None


@dataclass
class Tool:
    """A function tool; ``parameters`` is a JSON schema (``None``: the function takes no argument).

    ``strict`` is read only when a reply is constrained (structured.py): True, the arguments follow
    ``parameters`` or the request is refused; None, they do when the engine supports the schema, else
    they are any JSON object; False, any JSON object. It does not change the rendering.
    """

    name: str
    description: str = ""
    parameters: dict | None = None
    strict: bool | None = None


# --------------------------------------------------------------------------------------------------
# System and developer messages
# --------------------------------------------------------------------------------------------------


def render_system(
    reasoning_effort: str | None = "medium",
    knowledge_cutoff: str | None = DEFAULT_KNOWLEDGE_CUTOFF,
    current_date: str | None = None,
    model_identity: str | None = DEFAULT_MODEL_IDENTITY,
    has_function_tools: bool = False,
) -> str:
    """Text of the system message (``None`` leaves a line out, as openai-harmony does).

    ``has_function_tools`` adds the line routing function calls to the commentary channel; harmony
    adds it whenever the conversation's developer message declares function tools.
    """
    head = []
    if model_identity is not None:
        head.append(model_identity)
    if knowledge_cutoff is not None:
        head.append(f"Knowledge cutoff: {knowledge_cutoff}")
    if current_date is not None:
        head.append(f"Current date: {current_date}")
    sections = ["\n".join(head)] if head else []
    if reasoning_effort is not None:
        sections.append(f"Reasoning: {_effort(reasoning_effort)}")
    channels = "# Valid channels: " + ", ".join(CHANNELS) + ". Channel must be included for every message."
    if has_function_tools:
        channels += "\nCalls to these tools must go to the commentary channel: 'functions'."
    sections.append(channels)
    return "\n\n".join(sections)


def _effort(effort: Any) -> str:
    value = str(getattr(effort, "value", effort)).lower()
    if value not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort must be one of {REASONING_EFFORTS}, not {effort!r}")
    return value


def render_developer(instructions: str | None = None, tools: Sequence[Tool] | None = None) -> str:
    """Text of the developer message: ``# Instructions`` and the ``functions`` tool namespace."""
    sections = []
    if instructions is not None:
        sections.append(f"# Instructions\n\n{instructions}")
    if tools:
        sections.append("# Tools\n\n" + render_tools(tools))
    return "\n\n".join(sections)


def render_tools(tools: Sequence[Tool], namespace: str = "functions") -> str:
    """The TypeScript-like declaration of function tools that harmony puts in the developer message."""
    body = "\n\n".join(_render_tool(as_tool(t)) for t in tools)
    return f"## {namespace}\n\nnamespace {namespace} {{\n\n{body}\n\n}} // namespace {namespace}"


def as_tool(tool: Tool | Mapping[str, Any]) -> Tool:
    if isinstance(tool, Tool):
        return tool
    # OpenAI-style {"type": "function", "function": {...}} or a bare {"name", "description", "parameters"}.
    spec = tool.get("function", tool)
    return Tool(spec["name"], spec.get("description") or "", spec.get("parameters"), spec.get("strict"))


def _render_tool(tool: Tool) -> str:
    # The description is split like Rust's str::lines(): a final newline adds no empty comment line.
    lines = tool.description.split("\n")
    if tool.description.endswith("\n"):
        lines.pop()
    out = "".join(f"// {line.removesuffix(chr(13))}\n" for line in lines if tool.description)
    if tool.parameters is None:
        return f"{out}type {tool.name} = () => any;"
    return f"{out}type {tool.name} = (_: {_ts_type(tool.parameters, '')}) => any;"


# JSON schema -> TypeScript-like text. The layout (indents, where comments go, which keywords count)
# follows openai-harmony's output exactly, quirks included, since the model was trained on it.
# Handled: object/string/number/integer/boolean/array types, type lists, string enums, nullable,
# oneOf, required, description/title/examples/default comments. Anything else renders as `any`.


def _ts_type(schema: Any, indent: str) -> str:
    if not isinstance(schema, dict):
        return "any"
    one_of = schema.get("oneOf")
    if isinstance(one_of, list):
        return _ts_inline_union(one_of, indent)
    typ = schema.get("type")
    if isinstance(typ, list):
        names = ["number" if t == "integer" else t for t in typ if isinstance(t, str)]
        return " | ".join(names) if names else "any"
    if typ == "object":
        return _ts_object(schema, indent)
    if typ == "string":
        enum = schema.get("enum")
        values = [f'"{v}"' for v in enum if isinstance(v, str)] if isinstance(enum, list) else []
        return " | ".join(values) if values else "string"
    if typ in ("number", "integer"):
        return "number"
    if typ == "boolean":
        return "boolean"
    if typ == "array":
        return f"{_ts_type(schema['items'], indent)}[]" if "items" in schema else "Array<any>"
    return "any"


def _nullable(schema: Any, ts: str) -> str:
    if isinstance(schema, dict) and schema.get("nullable") is True and "null" not in ts:
        return f"{ts} | null"
    return ts


def _text(schema: Mapping[str, Any], key: str) -> str | None:
    value = schema.get(key)
    return value if isinstance(value, str) else None


def _ts_inline_union(variants: list, indent: str) -> str:
    # A oneOf in type position (parameters, array items): each variant on its own line.
    out = ""
    for variant in variants:
        ts = _nullable(variant, _ts_type(variant, indent + "   "))
        comments = []
        if isinstance(variant, dict):
            if (desc := _text(variant, "description")) is not None:
                comments.append(desc)
            if "default" in variant:
                comments.append(f"default: {_default_text(variant['default'], quote_strings=True)}")
        out += f"\n{indent} | {ts}" + (f" // {' '.join(comments)}" if comments else "")
    return out


def _ts_object(schema: Mapping[str, Any], indent: str) -> str:
    out = f"{indent}// {desc}\n" if (desc := _text(schema, "description")) is not None else ""
    out += "{\n"
    props = schema.get("properties")
    if isinstance(props, dict):
        req = schema.get("required")
        required = {r for r in req if isinstance(r, str)} if isinstance(req, list) else set()
        for key, prop in props.items():
            out += _ts_property(key, prop, key in required, indent)
    return out + f"{indent}}}"


def _ts_property(key: str, prop: Any, required: bool, indent: str) -> str:
    opt = "" if required else "?"
    if not isinstance(prop, dict):
        return f"{indent}{key}{opt}: any,\n"
    out = ""
    if (title := _text(prop, "title")) is not None:
        out += f"{indent}// {title}\n{indent}//\n"
    desc = _text(prop, "description")
    one_of = prop.get("oneOf")
    if desc is not None and not isinstance(one_of, list):
        out += f"{indent}// {desc}\n"
    examples = prop.get("examples")
    if isinstance(examples, list) and examples:
        out += f"{indent}// Examples:\n"
        out += "".join(f'{indent}// - "{ex}"\n' for ex in examples if isinstance(ex, str))
    if isinstance(one_of, list):
        return out + _ts_union_property(key, opt, prop, one_of, desc, indent)
    ts = _nullable(prop, _ts_type(prop, indent + "    "))
    out += f"{indent}{key}{opt}: {ts}"
    if "default" in prop:
        return out + f", // default: {_default_text(prop['default'], quote_strings=not _has_enum(prop))}\n"
    return out + ",\n"


def _ts_union_property(
    key: str, opt: str, prop: Mapping, variants: list, desc: str | None, indent: str
) -> str:
    # With a property description, the first variant's description is not repeated (and the property's
    # is left out when it equals the first variant's) — openai-harmony's behaviour.
    first = variants[0] if variants else None
    first_desc = _text(first, "description") if isinstance(first, dict) else None
    out = ""
    if desc is not None and first_desc != desc:
        out += f"{indent}// {desc}\n"
    if "default" in prop:
        out += f"{indent}// default: {_default_text(prop['default'], quote_strings=True)}\n"
    out += f"{indent}{key}{opt}:\n"
    for i, variant in enumerate(variants):
        ts = _nullable(variant, _ts_type(variant, indent + "   "))
        comments = []
        if isinstance(variant, dict):
            vdesc = _text(variant, "description")
            if vdesc is not None and not (desc is not None and (i == 0 or vdesc == desc)):
                comments.append(vdesc)
            if "default" in variant:
                quote = not _has_enum(variant)
                comments.append(f"default: {_default_text(variant['default'], quote_strings=quote)}")
        out += f"{indent} | {ts}" + (f" // {' '.join(comments)}" if comments else "") + "\n"
    return out + f"{indent},\n"


def _has_enum(schema: Mapping[str, Any]) -> bool:
    # Next to a property, a string default is shown bare when the schema lists an enum (its values are
    # already shown quoted), else in quotes.
    enum = schema.get("enum")
    return isinstance(enum, list) and len(enum) > 0


def _default_text(value: Any, quote_strings: bool) -> str:
    if isinstance(value, str):
        return f'"{value}"' if quote_strings else value
    return _json(value)


def _json(value: Any) -> str:
    """Compact JSON as serde_json (Rust) writes it: no spaces, UTF-8 kept, floats in shortest form."""
    if isinstance(value, float) and math.isfinite(value):
        return _float_text(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{_json(str(k))}:{_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_json(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def _float_text(value: float) -> str:
    """Shortest round-trip digits, laid out as Rust's ryu does (Python's repr switches to exponent
    notation at other magnitudes: 1e-05 vs 0.00001, 1e+16 vs 1e16)."""
    if value == 0:
        return "-0.0" if math.copysign(1.0, value) < 0 else "0.0"
    _, digit_tuple, exp = Decimal(repr(abs(value))).normalize().as_tuple()
    digits = "".join(map(str, digit_tuple))
    sign_text = "-" if value < 0 else ""
    n, point = len(digits), len(digits) + exp  # value = 0.digits * 10**point
    if exp >= 0 and point <= 16:
        text = digits + "0" * exp + ".0"
    elif 0 < point <= 16:
        text = f"{digits[:point]}.{digits[point:]}"
    elif -5 < point <= 0:
        text = "0." + "0" * -point + digits
    elif n == 1:
        text = f"{digits}e{point - 1}"
    else:
        text = f"{digits[0]}.{digits[1:]}e{point - 1}"
    return sign_text + text


# --------------------------------------------------------------------------------------------------
# Conversations
# --------------------------------------------------------------------------------------------------


def _as_message(message: Message | Mapping[str, Any]) -> Message:
    if isinstance(message, Message):
        return message
    return Message(**message)


def render_message(message: Message, tokenizer: HarmonyTokenizer) -> list[int]:
    """Tokens of one message, ``<|start|>`` to its end token."""
    m = _as_message(message)
    if m.role not in ROLES:
        raise ValueError(f"unknown role {m.role!r}; expected one of {ROLES}")
    if m.role == "tool":
        if not m.name:
            raise ValueError("a tool message needs the tool's name, e.g. name='functions.get_weather'")
        author = m.name
    else:
        author = f"{m.role}:{m.name}" if m.name is not None else m.role
    ids = [tokenizer.START, *tokenizer.encode(author)]
    # "all" is the implicit recipient: never written out (but it still makes an assistant message a call).
    if m.recipient is not None and m.recipient != "all":
        ids += tokenizer.encode(f" to={m.recipient}")
    if m.channel is not None:
        ids += [tokenizer.CHANNEL, *tokenizer.encode(m.channel)]
    if m.content_type is not None:
        # Only a leading <|constrain|> is the special token (as openai-harmony renders it).
        constrain = "<|constrain|>"
        if m.content_type.startswith(constrain):
            ids += [
                *tokenizer.encode(" "),
                tokenizer.CONSTRAIN,
                *tokenizer.encode(m.content_type[len(constrain) :]),
            ]
        else:
            ids += tokenizer.encode(f" {m.content_type}")
    ids += [tokenizer.MESSAGE, *tokenizer.encode(m.content)]
    ids.append(tokenizer.CALL if m.role == "assistant" and m.recipient is not None else tokenizer.END)
    return ids


def _drop_old_analysis(messages: list[Message]) -> list[Message]:
    # Harmony's rule: the chain of thought of completed turns is not shown again, i.e. every message on
    # the analysis channel before the last final answer is dropped, whoever wrote it: the reasoning,
    # built-in tool calls made in it (python, browser.*, functions called on analysis) and those tools'
    # outputs, which come back on the call's channel. The current turn's (after the last final answer:
    # reasoning and tool use that lead to a pending answer) stays. This is the spec, what transformers'
    # gpt-oss chat template renders, and what openai/harmony PR #96 fixes: openai-harmony 0.0.8 drops
    # the same messages, but only those before the FIRST final answer and only when the conversation
    # ends on one, so from the third turn on it would show the model reasoning it never saw in
    # training. Elsewhere we render token-for-token as openai-harmony does (tested).
    last_final = max(
        (i for i, m in enumerate(messages) if m.role == "assistant" and m.channel == "final"), default=None
    )
    if last_final is None:
        return messages
    return [m for i, m in enumerate(messages) if not (i < last_final and m.channel == "analysis")]


def render_conversation(
    messages: Iterable[Message | Mapping[str, Any]],
    tokenizer: HarmonyTokenizer,
    *,
    reasoning_effort: str | None = None,
    tools: Sequence[Tool] | None = None,
    developer_instructions: str | None = None,
    for_completion: bool = True,
    current_date: str | None = None,
    knowledge_cutoff: str | None = DEFAULT_KNOWLEDGE_CUTOFF,
    model_identity: str | None = DEFAULT_MODEL_IDENTITY,
    drop_analysis: bool = True,
) -> list[int]:
    """Tokens of a conversation, ending with ``<|start|>assistant`` when ``for_completion``.

    A system message (and a developer message, when ``developer_instructions`` or ``tools`` are given)
    is put in front unless ``messages`` already has one of that role. ``reasoning_effort`` defaults to
    medium. Previous turns' analysis is dropped as harmony does (``drop_analysis``).
    """
    msgs = [_as_message(m) for m in messages]
    tool_list = [as_tool(t) for t in tools or ()]
    prefix: list[Message] = []
    if not any(m.role == "system" for m in msgs):
        system = render_system(
            reasoning_effort=reasoning_effort or "medium",
            knowledge_cutoff=knowledge_cutoff,
            current_date=current_date,
            model_identity=model_identity,
            has_function_tools=bool(tool_list),
        )
        prefix.append(Message("system", system))
    if (developer_instructions is not None or tool_list) and not any(m.role == "developer" for m in msgs):
        developer = Message("developer", render_developer(developer_instructions, tool_list))
        # After the caller's own system message(s), if any.
        n_system = next((i for i, m in enumerate(msgs) if m.role != "system"), len(msgs))
        msgs = msgs[:n_system] + [developer] + msgs[n_system:]
    msgs = prefix + msgs
    if drop_analysis:
        msgs = _drop_old_analysis(msgs)
    ids: list[int] = []
    for m in msgs:
        ids += render_message(m, tokenizer)
    if for_completion:
        ids += [tokenizer.START, *tokenizer.encode("assistant")]
    return ids


# --------------------------------------------------------------------------------------------------
# Parsing model output
# --------------------------------------------------------------------------------------------------


@dataclass
class TextDelta:
    """Content text as it streams; ``recipient`` is set for tool-call arguments."""

    channel: str
    text: str
    recipient: str | None = None


@dataclass
class MessageDone:
    """A message ended; ``end_token`` is the id that ended it (``None``: cut off or implicit end)."""

    message: Message
    end_token: int | None = None


@dataclass
class ToolCall:
    """A completed tool call. ``name`` has no ``functions.`` prefix; ``recipient`` is the full address."""

    name: str
    arguments: str
    channel: str
    recipient: str = ""
    content_type: str | None = None


Event = TextDelta | MessageDone | ToolCall

# Past this many header tokens without <|message|>, the "header" is taken to be text.
_MAX_HEADER_TOKENS = 64
_EXPECT_START, _HEADER, _CONTENT = "expect_start", "header", "content"


@dataclass
class _Header:
    role: str | None  # None: not read yet (the header began with <|start|>)
    ids: list[int] = field(default_factory=list)


class StreamParser:
    """Incremental, tolerant parser of the model's harmony output, fed one token id at a time.

    It starts after the prompt's ``<|start|>assistant`` (``role=None``: expects ``<|start|>`` first);
    output that repeats ``<|start|>assistant`` is accepted too. It never raises: a missing
    ``<|channel|>`` means the final channel, a header that cannot be read becomes text (on the final
    channel, or on the known channel it names), stray special tokens inside content are skipped
    (``<|start|>`` and ``<|channel|>`` begin a new message), text after ``<|return|>`` starts a new
    message, and :meth:`finish` flushes a message cut off by the end of the stream.
    """

    def __init__(self, tokenizer: HarmonyTokenizer, role: str | None = "assistant") -> None:
        self.tokenizer = tokenizer
        self.messages: list[Message] = []
        self._specials = {
            name: tokenizer.token_id(f"<|{name}|>")
            for name in ("start", "end", "return", "call", "channel", "message", "constrain", "endoftext")
        }
        self._ends = {self._specials[k] for k in ("end", "return", "call", "endoftext")}
        self._state = _HEADER if role is not None else _EXPECT_START
        self._header = _Header(role)
        self._decoder: StreamingDecoder = tokenizer.streaming_decoder()
        self._message: Message | None = None
        self._parts: list[str] = []

    # -- state, for callers -------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """``"expect_start"``, ``"header"`` or ``"content"``."""
        return self._state

    @property
    def current_channel(self) -> str | None:
        """Channel of the message whose content is streaming, if any."""
        return self._message.channel if self._message is not None else None

    @property
    def current_recipient(self) -> str | None:
        """Recipient of the message whose content is streaming, if any."""
        return self._message.recipient if self._message is not None else None

    # -- feeding ------------------------------------------------------------------------------------

    def feed(self, token_id: int) -> list[Event]:
        """Process one generated token; return the events it completes."""
        events: list[Event] = []
        sp = self._specials
        if self._state == _EXPECT_START:
            if token_id == sp["start"]:
                self._begin_header(None)
            elif token_id == sp["channel"]:  # <|start|>assistant left out
                self._begin_header("assistant", [token_id])
            elif not self.tokenizer.is_special(token_id):  # text after the end: a new message
                self._begin_header("assistant")
                self._header_token(token_id, events)
            # other special tokens between messages carry nothing: skipped
        elif self._state == _HEADER:
            if token_id == sp["message"]:
                self._open_from_header(events)
            elif token_id in self._ends:
                # A header without content: kept as text only if it is not a header at all.
                if self._header_is_text():
                    self._degrade_header(events)
                    self._close(token_id, events)
                else:
                    self._state = _EXPECT_START
            elif token_id == sp["start"]:
                if self._header_is_text():
                    self._degrade_header(events)
                    self._close(None, events)
                self._begin_header(None)
            else:
                self._header_token(token_id, events)
        else:  # content
            if token_id in self._ends:
                self._close(token_id, events)
            elif token_id == sp["start"]:
                self._close(None, events)
                self._begin_header(None)
            elif token_id == sp["channel"]:
                self._close(None, events)
                self._begin_header("assistant", [token_id])
            elif not self.tokenizer.is_special(token_id):
                self._text(self._decoder.feed(token_id), events)
            # <|message|>, <|constrain|>, reserved ids inside content: skipped
        return events

    def feed_many(self, token_ids: Iterable[int]) -> list[Event]:
        """Process several tokens; return all their events."""
        events: list[Event] = []
        for t in token_ids:
            events += self.feed(t)
        return events

    def finish(self) -> list[Event]:
        """End of stream: flush a message cut off mid-way (as its current channel)."""
        events: list[Event] = []
        if self._state == _HEADER and self._header_is_text():
            self._degrade_header(events)
        if self._state == _CONTENT:
            self._close(None, events)
        self._state = _EXPECT_START
        return events

    # -- internals ----------------------------------------------------------------------------------

    def _begin_header(self, role: str | None, ids: list[int] | None = None) -> None:
        self._state = _HEADER
        self._header = _Header(role, list(ids or ()))

    def _header_is_text(self) -> bool:
        """For a header cut short (no <|message|>): whether it holds words beyond author, channel and
        recipient — those are kept as text, since a header that ends there cannot have a content type."""
        if not self._header.ids:
            return False
        parsed = self._parse_header(self._header_text(), self._header.role)
        return parsed is None or parsed.content_type is not None

    def _header_token(self, token_id: int, events: list[Event]) -> None:
        self._header.ids.append(token_id)
        if len(self._header.ids) > _MAX_HEADER_TOKENS or not self._could_be_header():
            self._degrade_header(events)

    def _header_text(self) -> str:
        return self.tokenizer.decode(self._header.ids)

    def _could_be_header(self) -> bool:
        """Whether the header so far can still become a valid one (checked while the role is known,
        so that plain text written without any header streams at once instead of waiting)."""
        if self._header.role is None or self.tokenizer.CHANNEL in self._header.ids:
            return True
        text = self._header_text()
        if "assistant".startswith(text):
            return True
        text = text.removeprefix("assistant")
        return (
            text == ""
            or " to=".startswith(text)
            or text.startswith((" to=", "<|channel|>", "<|constrain|>", " <|constrain|>"))
        )

    def _degrade_header(self, events: list[Event]) -> None:
        """The header is not one: its text becomes content, on the final channel — or on the channel
        named right after <|channel|> when that is a known one, so that garbled analysis stays analysis.
        A leading role word and the channel word are not repeated in the text."""
        ids = self._header.ids
        cut = ids.index(self.tokenizer.CHANNEL) if self.tokenizer.CHANNEL in ids else len(ids)
        head = self.tokenizer.decode_bytes(t for t in ids[:cut] if not self.tokenizer.is_special(t))
        tail = self.tokenizer.decode_bytes(t for t in ids[cut:] if not self.tokenizer.is_special(t))
        role, channel = self._header.role or "assistant", "final"
        first = head.split()[:1]
        if self._header.role is None and first and first[0].decode(errors="replace") in ROLES:
            role = first[0].decode()
            head = head.lstrip()[len(first[0]) :].lstrip()
        first = tail.split()[:1]
        if first and first[0].decode(errors="replace") in CHANNELS:
            channel = first[0].decode()
            tail = tail.lstrip()[len(first[0]) :].lstrip()
        # An address (`to=functions.x`) is header syntax, never text for the reader.
        head, tail = (
            _ADDRESS.sub(b"", part).lstrip() if _ADDRESS.search(part) else part for part in (head, tail)
        )
        self._open(Message(role, "", channel))
        self._text(self._decoder.feed_bytes(head + tail), events)

    def _open_from_header(self, events: list[Event]) -> None:
        parsed = self._parse_header(self._header_text(), self._header.role)
        if parsed is None:
            self._degrade_header(events)
        else:
            self._open(parsed)

    @staticmethod
    def _parse_header(text: str, role: str | None) -> Message | None:
        """Read ``[author] [to=R] [<|channel|>C] [to=R] [content type]``; None if it is not a header."""
        before, sep, after = text.partition("<|channel|>")
        # <|constrain|> is glued to the content type, and may be glued to the word before it.
        words = before.replace("<|constrain|>", " <|constrain|>").split()
        name = None
        if role is None:
            if not words:
                return None
            author = words.pop(0)
            role, _, name = author.partition(":")
            if role not in ROLES:  # an author like functions.get_weather is a tool
                role, name = "tool", author
            name = name or None
        elif words and words[0] == "assistant":  # <|start|>assistant repeated
            words.pop(0)
        channel = None
        after_words = after.replace("<|constrain|>", " <|constrain|>").split()
        if sep and after_words and not after_words[0].startswith(("to=", "<|constrain|>")):
            channel = after_words.pop(0)
        recipient = content_type = None
        for w in words + after_words:
            if w.startswith("to=") and recipient is None:
                recipient = w[3:]
            elif content_type is None:
                content_type = w
            else:
                return None  # more than a header holds
        if content_type == "<|constrain|>":  # a lone constrain: drop it
            content_type = None
        if channel is None:
            is_call = recipient is not None and recipient.startswith("functions.")
            channel = "commentary" if is_call else "final"
        return Message(role, "", channel, recipient, content_type, name)

    def _open(self, message: Message) -> None:
        self._state = _CONTENT
        self._message = message
        self._parts = []
        self._decoder = self.tokenizer.streaming_decoder()

    def _text(self, text: str, events: list[Event]) -> None:
        if text and self._message is not None:
            self._parts.append(text)
            events.append(TextDelta(self._message.channel or "final", text, self._message.recipient))

    def _close(self, end_token: int | None, events: list[Event]) -> None:
        message = self._message
        if message is None:
            self._state = _EXPECT_START
            return
        self._text(self._decoder.finish(), events)
        message.content = "".join(self._parts)
        self.messages.append(message)
        events.append(MessageDone(message, end_token))
        recipient = message.recipient
        if recipient is not None and recipient not in ("all", "assistant", "user"):
            # <|call|> is a tool call; a functions.* message ended by <|end|>/<|return|> is treated as one
            # too (the model meant to call). A message cut off (end_token None) is not executed.
            sp = self._specials
            ended_as_call = end_token == sp["call"] or (
                end_token in (sp["end"], sp["return"]) and recipient.startswith("functions.")
            )
            if ended_as_call:
                events.append(
                    ToolCall(
                        name=recipient.removeprefix("functions."),
                        arguments=message.content,
                        channel=message.channel or "commentary",
                        recipient=recipient,
                        content_type=message.content_type,
                    )
                )
        self._message = None
        self._parts = []
        self._state = _EXPECT_START


_ADDRESS = re.compile(rb"(?:^|\s+)to=\S*")


def parse_completion(
    token_ids: Iterable[int], tokenizer: HarmonyTokenizer, role: str | None = "assistant"
) -> list[Message]:
    """All messages in generated tokens (the tolerant :class:`StreamParser`, then ``finish``)."""
    parser = StreamParser(tokenizer, role=role)
    parser.feed_many(token_ids)
    parser.finish()
    return parser.messages
