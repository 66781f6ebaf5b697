"""POST /v1/chat/completions (OpenAI Chat Completions).

* system / developer messages -> the harmony developer message's instructions (joined, in order)
* user -> user; tool (``tool_call_id``) -> the tool result, addressed from the matching call
* assistant -> its reasoning (``reasoning_content``, ``reasoning`` or ``thinking``, the field of
  transformers' chat template and of the cookbook's fine-tuning data) as an analysis message, its
  content (``final``, or ``commentary`` when it carries tool_calls: a preamble), its tool_calls
* reply: ``message.content`` holds only text meant for the user (final channel and commentary
  preambles); the chain of thought is in ``message.reasoning_content`` and ``message.reasoning``
  (``--reasoning-field`` picks one or both), never in content; tool calls in ``message.tool_calls``
  with ``finish_reason: "tool_calls"``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..harmony import Message, MessageDone, TextDelta, Tool
from .common import (
    KEEPALIVE,
    KEEPALIVE_SECONDS,
    SSE_HEADERS,
    ServerState,
    check_model,
    guarded,
    new_id,
    run_to_end,
    sse,
    submit,
)
from .schemas import (
    APIError,
    forced_call_prefix,
    function_name,
    function_tool,
    invalid,
    join_instructions,
    number_in,
    positive_int,
    reasoning_effort,
    response_format_text,
    sampling_options,
    text_of_parts,
    tool_choice_rules,
)
from .schemas import field as get
from .worker import Failed, Finished, GenerationRequest, Usage

TEXT_PARTS = ("text", "input_text", "output_text")
NOT_TOOLS = ("all", "assistant", "user")


def recipient_of(name: str) -> str:
    return name if "." in name else f"functions.{name}"


def conversation(raw: Any) -> tuple[list[Message], list[str]]:
    """``messages`` -> harmony messages, and the system/developer texts (-> instructions)."""
    if not isinstance(raw, list):
        raise invalid("messages", "Invalid type for 'messages': expected an array.", "invalid_type")
    if not raw:
        raise invalid("messages", "'messages' must hold at least one message.")
    messages: list[Message] = []
    instructions: list[str] = []
    calls: dict[str, str] = {}  # tool_call_id -> recipient
    for i, m in enumerate(raw):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(p, f"Invalid type for '{p}': expected an object.", "invalid_type")
        role = get(m, "role", "string", param=f"{p}.role", required=True)
        content = m.get("content")
        if role in ("system", "developer"):
            instructions.append(text_of_parts(content or "", f"{p}.content", TEXT_PARTS))
        elif role == "user":
            messages.append(Message("user", text_of_parts(content or "", f"{p}.content", TEXT_PARTS)))
        elif role == "assistant":
            for key in ("reasoning_content", "reasoning", "thinking"):
                thought = get(m, key, "string", param=f"{p}.{key}")
                if thought:
                    messages.append(Message("assistant", thought, channel="analysis"))
                    break
            tool_calls = get(m, "tool_calls", "array", param=f"{p}.tool_calls", default=[])
            text = text_of_parts(content, f"{p}.content", TEXT_PARTS) if content is not None else ""
            if text or not tool_calls:
                messages.append(Message("assistant", text, channel="commentary" if tool_calls else "final"))
            for j, call in enumerate(tool_calls):
                q = f"{p}.tool_calls[{j}]"
                if not isinstance(call, dict):
                    raise invalid(q, f"Invalid type for '{q}': expected an object.", "invalid_type")
                fn = get(call, "function", "object", param=f"{q}.function", required=True)
                name = get(fn, "name", "string", param=f"{q}.function.name", required=True)
                name = function_name(name, f"{q}.function.name", dotted=True)
                arguments = get(fn, "arguments", "string", param=f"{q}.function.arguments", default="")
                call_id = get(call, "id", "string", param=f"{q}.id")
                if call_id is not None:
                    calls[call_id] = recipient_of(name)
                messages.append(
                    Message(
                        "assistant",
                        arguments,
                        channel="commentary",
                        recipient=recipient_of(name),
                        content_type="<|constrain|>json",
                    )
                )
        elif role in ("tool", "function"):
            call_id = get(m, "tool_call_id", "string", param=f"{p}.tool_call_id")
            name = get(m, "name", "string", param=f"{p}.name")
            if name is not None:
                name = function_name(name, f"{p}.name", dotted=True)
            if call_id is not None and call_id in calls:
                recipient = calls[call_id]
            elif name is not None:
                recipient = recipient_of(name)
            elif call_id is None:
                raise APIError(
                    400,
                    f"Missing required parameter: '{p}.tool_call_id'.",
                    f"{p}.tool_call_id",
                    "missing_required_parameter",
                )
            else:
                raise invalid(
                    f"{p}.tool_call_id",
                    f"No assistant tool call with id {call_id!r} comes before this tool message.",
                )
            text = text_of_parts(content or "", f"{p}.content", TEXT_PARTS)
            messages.append(
                Message("tool", text, channel="commentary", recipient="assistant", name=recipient)
            )
        else:
            raise invalid(
                f"{p}.role", f"Unknown role {role!r}: use system, developer, user, assistant or tool."
            )
    return messages, instructions


def function_tools(body: dict) -> list[Tool]:
    """``tools`` (``[{"type": "function", "function": {...}}]``) -> harmony function tools."""
    tools = []
    for i, spec in enumerate(get(body, "tools", "array", default=[])):
        p = f"tools[{i}]"
        if not isinstance(spec, dict):
            raise invalid(p, f"Invalid type for '{p}': expected an object.", "invalid_type")
        kind = get(spec, "type", "string", param=f"{p}.type", default="function")
        if kind != "function":
            raise invalid(f"{p}.type", f"Tools of type {kind!r} are not supported.", "unsupported_value")
        tools.append(
            function_tool(
                get(spec, "function", "object", param=f"{p}.function", required=True), f"{p}.function"
            )
        )
    return tools


@dataclass
class ChatCall:
    request: GenerationRequest
    model: str
    stream: bool
    include_usage: bool
    stops: list[str] = field(default_factory=list)


def parse(body: dict, state: ServerState) -> ChatCall:
    model = check_model(body, state.config)
    if "messages" not in body:
        raise APIError(
            400, "Missing required parameter: 'messages'.", "messages", "missing_required_parameter"
        )
    messages, system_texts = conversation(body["messages"])

    effort = reasoning_effort(body.get("reasoning_effort"), "reasoning_effort")
    if effort is None and isinstance(body.get("reasoning"), dict):
        effort = reasoning_effort(body["reasoning"].get("effort"), "reasoning.effort")
    tools = function_tools(body)
    rendered_tools, choice_text = tool_choice_rules(body.get("tool_choice"), tools)
    format_text = response_format_text(body.get("response_format"), "response_format")

    n = get(body, "n", "integer", default=1)
    if n != 1:
        raise invalid("n", "Only n=1 is supported.", "unsupported_value")
    if get(body, "logprobs", "boolean", default=False):
        raise invalid("logprobs", "logprobs are not supported by this server.", "unsupported_value")
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise invalid(
            "stop", "Invalid type for 'stop': expected a string or an array of strings.", "invalid_type"
        )
    stops = [s for s in stops if s]
    if len(stops) > 4:
        raise invalid("stop", "At most 4 stop sequences are allowed.")

    max_tokens = positive_int(body, "max_completion_tokens") or positive_int(body, "max_tokens")
    options = sampling_options(body)
    for key in ("frequency_penalty", "presence_penalty"):
        number_in(body, key, -2, 2)  # accepted and ignored (no penalties in this sampler)
    stream = get(body, "stream", "boolean", default=False)
    stream_options = get(body, "stream_options", "object", default={})
    include_usage = get(
        stream_options, "include_usage", "boolean", param="stream_options.include_usage", default=False
    )
    get(body, "parallel_tool_calls", "boolean")

    request = GenerationRequest(
        messages=messages,
        instructions=join_instructions(*system_texts, choice_text, format_text),
        tools=rendered_tools,
        assistant_prefix=forced_call_prefix(body.get("tool_choice"), rendered_tools),
        reasoning_effort=effort or state.config.reasoning_effort,
        options=options,
        max_tokens=max_tokens,
    )
    return ChatCall(request, model, stream, include_usage, stops)


class StopFilter:
    """Cuts content at the first stop sequence; holds back text that may be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.held = ""
        self.hit = False

    def push(self, text: str) -> str:
        if not self.stops or self.hit:
            return "" if self.hit else text
        self.held += text
        found = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.held, self.hit = self.held[: min(found)], "", True
            return out
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.held)), keep, -1):
                if self.held.endswith(s[:k]):
                    keep = k
                    break
        out = self.held[: len(self.held) - keep]
        self.held = self.held[len(self.held) - keep :]
        return out

    def flush(self) -> str:
        out, self.held = self.held, ""
        return "" if self.hit else out


class ChatBuilder:
    """The worker's events -> the assistant message and, for streaming, chat.completion.chunk deltas."""

    def __init__(self, stops: list[str], reasoning_fields: tuple[str, ...]):
        self.content = ""
        self.reasoning = ""
        self.tool_calls: list[dict] = []
        self.fields = reasoning_fields
        self.filter = StopFilter(stops)
        self.current: str | None = None  # "content" | "reasoning" | "tool" for the open message

    @property
    def stopped(self) -> bool:
        return self.filter.hit

    def feed(self, event: Any) -> list[dict]:
        """Deltas for this event."""
        if isinstance(event, TextDelta):
            deltas = self._open(event.channel, event.recipient) if self.current is None else []
            return deltas + self._text(event.text)
        if isinstance(event, MessageDone):
            deltas = (
                self._open(event.message.channel, event.message.recipient) if self.current is None else []
            )
            self.current = None
            return deltas
        return []

    def _open(self, channel: str | None, recipient: str | None) -> list[dict]:
        if recipient is not None and recipient not in NOT_TOOLS:
            self.current = "tool"
            call = {
                "id": new_id("call_"),
                "type": "function",
                "function": {"name": recipient.removeprefix("functions."), "arguments": ""},
            }
            self.tool_calls.append(call)
            index = len(self.tool_calls) - 1
            return [{"tool_calls": [{"index": index, **copy.deepcopy(call)}]}]
        self.current = "reasoning" if channel == "analysis" else "content"
        return []

    def _text(self, text: str) -> list[dict]:
        if self.current == "tool":
            self.tool_calls[-1]["function"]["arguments"] += text
            return [{"tool_calls": [{"index": len(self.tool_calls) - 1, "function": {"arguments": text}}]}]
        if self.current == "reasoning":
            self.reasoning += text
            return [dict.fromkeys(self.fields, text)]
        text = self.filter.push(text)
        self.content += text
        return [{"content": text}] if text else []

    def finish(self) -> list[dict]:
        text = self.filter.flush()
        self.content += text
        return [{"content": text}] if text else []

    def finish_reason(self, finished: Finished) -> str:
        if self.stopped:
            return "stop"
        if finished.reply.stats.finish_reason == "length":  # a call cut short is no call to run
            return "length"
        return "tool_calls" if self.tool_calls else "stop"

    def message(self) -> dict:
        msg: dict[str, Any] = {
            "role": "assistant",
            "content": self.content if self.content or not self.tool_calls else None,
            "refusal": None,
        }
        for key in self.fields:
            msg[key] = self.reasoning or None
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg


def usage_object(u: Usage) -> dict:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
    }


async def create(request: Request, body: dict, state: ServerState) -> Response:
    call = parse(body, state)
    job = await submit(state, call.request, "messages")
    builder = ChatBuilder(call.stops, state.config.reasoning_fields)
    cid, created = new_id("chatcmpl-"), int(time.time())

    def on_event(event: Any) -> None:
        builder.feed(event)
        if builder.stopped:
            job.cancel()

    if not call.stream:
        finished = await run_to_end(job, request, on_event)
        builder.finish()
        return JSONResponse(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": call.model,
                "system_fingerprint": None,
                "choices": [
                    {
                        "index": 0,
                        "message": builder.message(),
                        "logprobs": None,
                        "finish_reason": builder.finish_reason(finished),
                    }
                ],
                "usage": usage_object(finished.usage),
            }
        )

    def chunk(delta: dict | None, finish_reason: str | None = None, usage: dict | None = None) -> bytes:
        choices = (
            []
            if delta is None
            else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        )
        data = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": call.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if call.include_usage:
            data["usage"] = usage
        return sse(data)

    async def events():
        yield chunk({"role": "assistant", "content": ""})
        async for event in job.stream(KEEPALIVE_SECONDS):
            if event is None:
                yield KEEPALIVE
                continue
            if isinstance(event, Failed):
                error = {
                    "message": f"Generation failed: {event.message}",
                    "type": "server_error",
                    "param": None,
                    "code": "server_error",
                }
                yield sse({"error": error})
                return
            if isinstance(event, Finished):
                for delta in builder.finish():
                    yield chunk(delta)
                yield chunk({}, builder.finish_reason(event))
                if call.include_usage:
                    yield chunk(None, usage=usage_object(event.usage))
                yield sse("[DONE]")
                return
            if builder.stopped:
                continue  # the job is being cancelled; what comes now is past the stop sequence
            for delta in builder.feed(event):
                yield chunk(delta)
            if builder.stopped:
                job.cancel()

    return StreamingResponse(guarded(job, events()), media_type="text/event-stream", headers=SSE_HEADERS)
