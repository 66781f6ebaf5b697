"""POST /v1/responses (OpenAI Responses API), GET and DELETE /v1/responses/{id}.

Harmony messages map onto Responses items one to one:

* analysis message              -> ``reasoning`` item (``content: [{"type": "reasoning_text"}]``,
                                   ``summary: []``); streamed as ``response.reasoning_text.delta``
* final message                 -> ``message`` item, ``output_text`` part, ``phase: "final_answer"``
* commentary message to the user (a preamble) -> ``message`` item with ``phase: "commentary"``
* message to ``functions.NAME`` -> ``function_call`` item (``call_id`` made here); streamed as
                                   ``response.function_call_arguments.delta``

Input items go the other way (reasoning items are rendered back as analysis, as harmony wants
within a tool-calling turn). ``previous_response_id`` continues a conversation kept in memory
(``--max-stored-responses``, least recently used dropped first); as with OpenAI, instructions and
tools are not carried over and must be sent again.
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..harmony import Message, MessageDone, TextDelta
from .common import (
    KEEPALIVE,
    KEEPALIVE_SECONDS,
    SSE_HEADERS,
    ServerState,
    check_model,
    guarded,
    is_offered_call,
    new_id,
    run_to_end,
    sse,
    submit,
)
from .schemas import (
    APIError,
    function_name,
    function_tool,
    invalid,
    join_instructions,
    output_constraint,
    positive_int,
    reasoning_effort,
    response_format_text,
    sampling_options,
    text_of_parts,
    tool_choice_rules,
)
from .schemas import (
    field as get,
)
from .worker import Failed, Finished, GenerationRequest, Usage

TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "reasoning_text")


@dataclass
class StoredResponse:
    body: dict
    messages: list[Message]  # the conversation after this response (system/developer left out)
    calls: dict[str, str]  # call_id -> recipient ("functions.NAME") of every tool call in it


class ResponseStore:
    """Recent responses, in memory, least recently used dropped first."""

    def __init__(self, limit: int):
        self.limit = max(0, limit)
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def put(self, rid: str, stored: StoredResponse) -> None:
        if self.limit == 0:
            return
        self._items[rid] = stored
        self._items.move_to_end(rid)
        while len(self._items) > self.limit:
            self._items.popitem(last=False)

    def get(self, rid: str) -> StoredResponse | None:
        stored = self._items.get(rid)
        if stored is not None:
            self._items.move_to_end(rid)
        return stored

    def delete(self, rid: str) -> bool:
        return self._items.pop(rid, None) is not None


# ---- request -> harmony ------------------------------------------------------------------------------


def recipient_of(name: str) -> str:
    """A function's harmony address (function names cannot hold a dot; a dotted name is kept as is)."""
    return name if "." in name else f"functions.{name}"


def input_messages(items: Any, calls: dict[str, str]) -> tuple[list[Message], list[str]]:
    """``input`` -> harmony messages, plus the texts of system/developer messages (-> instructions).

    ``calls`` (call_id -> recipient) is read for function_call_output items and extended by
    function_call items.
    """
    if isinstance(items, str):
        return [Message("user", items)], []
    if not isinstance(items, list):
        raise invalid(
            "input", "Invalid type for 'input': expected a string or an array of items.", "invalid_type"
        )
    messages: list[Message] = []
    instructions: list[str] = []
    for i, item in enumerate(items):
        p = f"input[{i}]"
        if not isinstance(item, dict):
            raise invalid(p, f"Invalid type for '{p}': expected an object.", "invalid_type")
        kind = get(item, "type", "string", param=f"{p}.type", default="message")
        if kind == "message":
            role = get(item, "role", "string", param=f"{p}.role", required=True)
            if role not in ("user", "assistant", "system", "developer"):
                raise invalid(
                    f"{p}.role", f"Unknown role {role!r}: use user, assistant, system or developer."
                )
            text = text_of_parts(item.get("content", ""), f"{p}.content", TEXT_PARTS)
            if role in ("system", "developer"):
                instructions.append(text)
            elif role == "user":
                messages.append(Message("user", text))
            else:
                channel = "commentary" if item.get("phase") == "commentary" else "final"
                messages.append(Message("assistant", text, channel=channel))
        elif kind == "function_call":
            call_id = get(item, "call_id", "string", param=f"{p}.call_id", required=True)
            name = get(item, "name", "string", param=f"{p}.name", required=True)
            name = function_name(name, f"{p}.name", dotted=True)
            arguments = get(item, "arguments", "string", param=f"{p}.arguments", default="")
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
        elif kind == "function_call_output":
            call_id = get(item, "call_id", "string", param=f"{p}.call_id", required=True)
            if call_id not in calls:
                raise invalid(
                    f"{p}.call_id", f"No tool call found for function call output with call_id {call_id!r}."
                )
            output = text_of_parts(item.get("output", ""), f"{p}.output", TEXT_PARTS)
            messages.append(
                Message("tool", output, channel="commentary", recipient="assistant", name=calls[call_id])
            )
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            text = text_of_parts(parts, f"{p}.content", TEXT_PARTS)
            if text:
                messages.append(Message("assistant", text, channel="analysis"))
        else:
            raise invalid(
                f"{p}.type",
                f"Input items of type {kind!r} are not supported (message, function_call, "
                "function_call_output and reasoning are).",
                "unsupported_value",
            )
    return messages, instructions


@dataclass
class ResponsesCall:
    request: GenerationRequest
    response: dict  # the response object, status in_progress
    stream: bool
    store: bool
    calls: dict[str, str] = field(default_factory=dict)


def parse(body: dict, state: ServerState) -> ResponsesCall:
    model = check_model(body, state.config)
    previous_id = get(body, "previous_response_id", "string")
    history: list[Message] = []
    calls: dict[str, str] = {}
    if previous_id is not None:
        previous = state.store.get(previous_id)
        if previous is None:
            raise invalid(
                "previous_response_id",
                f"Previous response with id {previous_id!r} not found (this server keeps the last "
                f"{state.store.limit} responses in memory, and none from before a restart).",
                "previous_response_not_found",
            )
        history, calls = list(previous.messages), dict(previous.calls)
    raw_input = body.get("input")
    if raw_input is None and previous_id is None:
        raise APIError(400, "Missing required parameter: 'input'.", "input", "missing_required_parameter")
    new, extra_instructions = input_messages(raw_input if raw_input is not None else [], calls)
    if not history and not new:
        raise invalid("input", "'input' holds no message.")
    for unsupported in ("background", "conversation", "prompt"):
        if body.get(unsupported):
            raise invalid(
                unsupported, f"'{unsupported}' is not supported by this server.", "unsupported_parameter"
            )

    instructions = get(body, "instructions", "string")
    reasoning = get(body, "reasoning", "object", default={})
    effort = reasoning_effort(reasoning.get("effort"), "reasoning.effort") or state.config.reasoning_effort
    tools = []
    tool_params = {}  # function name -> where its parameters are in the request (for errors)
    for i, spec in enumerate(get(body, "tools", "array", default=[])):
        p = f"tools[{i}]"
        if not isinstance(spec, dict):
            raise invalid(p, f"Invalid type for '{p}': expected an object.", "invalid_type")
        kind = get(spec, "type", "string", param=f"{p}.type", required=True)
        if kind != "function":
            raise invalid(
                f"{p}.type",
                f"Tools of type {kind!r} are not supported (function tools are).",
                "unsupported_value",
            )
        tools.append(function_tool(spec, p))
        tool_params.setdefault(tools[-1].name, f"{p}.parameters")
    choice = body.get("tool_choice")
    rendered_tools, choice_text = tool_choice_rules(choice, tools)
    text_config = get(body, "text", "object", default={})
    fmt = text_config.get("format")
    format_text = response_format_text(fmt, "text.format")
    constraint = output_constraint(fmt, "text.format", rendered_tools, choice, tool_params)

    options = sampling_options(body)
    max_output = positive_int(body, "max_output_tokens")
    stream = get(body, "stream", "boolean", default=False)
    store = get(body, "store", "boolean", default=True)
    parallel = get(body, "parallel_tool_calls", "boolean", default=True)  # harmony: one call a reply
    metadata = get(body, "metadata", "object", default={})

    request = GenerationRequest(
        messages=history + new,
        instructions=join_instructions(*extra_instructions, instructions, choice_text, format_text),
        tools=rendered_tools,
        constraint=constraint,
        reasoning_effort=effort,
        options=options,
        max_tokens=max_output,
    )
    response = {
        "id": new_id("resp_"),
        "object": "response",
        "created_at": int(time.time()),
        "status": "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": instructions,
        "max_output_tokens": max_output,
        "max_tool_calls": None,
        "model": model,
        "output": [],
        "parallel_tool_calls": parallel,
        "previous_response_id": previous_id,
        "reasoning": {"effort": effort, "summary": None},
        "service_tier": "default",
        "store": store,
        "temperature": options.temperature,
        "text": {"format": text_config.get("format") or {"type": "text"}},
        "tool_choice": choice if choice is not None else "auto",
        "tools": [
            {
                "type": "function",
                "name": t.name,
                "description": t.description,
                "parameters": t.parameters,
                "strict": t.strict is not False,  # made exact once the schemas are checked (create)
            }
            for t in tools
        ],
        "top_p": options.top_p,
        "truncation": "disabled",
        "usage": None,
        "user": get(body, "user", "string"),
        "metadata": metadata,
    }
    return ResponsesCall(request, response, stream, store, calls)


# ---- harmony events -> items and stream events ------------------------------------------------------


@dataclass
class _Open:
    item: dict
    index: int
    kind: str  # "message" | "reasoning" | "function_call"
    text: str = ""


class ResponseBuilder:
    """Turns the worker's events into output items and, for streaming, the Responses event sequence."""

    def __init__(self, response: dict, offered: set[str] = frozenset()):
        self.response = response
        self.offered = offered  # functions the request offered: a call to any other is not a call
        self.output: list[dict] = response["output"]
        self.seq = 0
        self.current: _Open | None = None
        self.new_calls: dict[str, str] = {}

    def _event(self, kind: str, **fields: Any) -> dict:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return event

    def _snapshot(self) -> dict:
        return copy.deepcopy(self.response)

    def begin(self) -> list[dict]:
        return [
            self._event("response.created", response=self._snapshot()),
            self._event("response.in_progress", response=self._snapshot()),
        ]

    def feed(self, event: Any) -> list[dict]:
        out: list[dict] = []
        if isinstance(event, TextDelta):
            if self.current is None:
                out += self._open(event.channel, event.recipient)
            out += self._delta(event.text)
        elif isinstance(event, MessageDone):
            if self.current is None:
                out += self._open(event.message.channel, event.message.recipient)
            out += self._close("completed" if event.end_token is not None else "incomplete")
        return out  # ToolCall: its message's MessageDone says it all

    def _open(self, channel: str | None, recipient: str | None) -> list[dict]:
        index = len(self.output)
        if is_offered_call(recipient, self.offered):
            kind, part = "function_call", None
            call_id = new_id("call_")
            self.new_calls[call_id] = recipient
            item = {
                "id": new_id("fc_"),
                "type": "function_call",
                "status": "in_progress",
                "arguments": "",
                "call_id": call_id,
                "name": recipient.removeprefix("functions."),
            }
        elif channel == "analysis":
            kind, part = "reasoning", {"type": "reasoning_text", "text": ""}
            item = {
                "id": new_id("rs_"),
                "type": "reasoning",
                "summary": [],
                "content": [],
                "status": "in_progress",
            }
        else:
            kind, part = "message", {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            item = {
                "id": new_id("msg_"),
                "type": "message",
                "role": "assistant",
                "status": "in_progress",
                "content": [],
                "phase": "commentary" if channel == "commentary" else "final_answer",
            }
        self.output.append(item)
        self.current = _Open(item, index, kind)
        events = [self._event("response.output_item.added", output_index=index, item=copy.deepcopy(item))]
        if part is not None:
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    part=part,
                )
            )
        return events

    def _delta(self, text: str) -> list[dict]:
        cur = self.current
        cur.text += text
        ids = {"item_id": cur.item["id"], "output_index": cur.index}
        if cur.kind == "function_call":
            cur.item["arguments"] = cur.text
            return [self._event("response.function_call_arguments.delta", **ids, delta=text)]
        if cur.kind == "reasoning":
            return [self._event("response.reasoning_text.delta", **ids, content_index=0, delta=text)]
        return [self._event("response.output_text.delta", **ids, content_index=0, delta=text, logprobs=[])]

    def _close(self, status: str) -> list[dict]:
        cur, self.current = self.current, None
        item, ids = cur.item, {"item_id": cur.item["id"], "output_index": cur.index}
        item["status"] = status
        if cur.kind == "function_call":
            item["arguments"] = cur.text
            events = [
                self._event(
                    "response.function_call_arguments.done", **ids, arguments=cur.text, name=item["name"]
                )
            ]
        elif cur.kind == "reasoning":
            part = {"type": "reasoning_text", "text": cur.text}
            item["content"] = [part]
            events = [
                self._event("response.reasoning_text.done", **ids, content_index=0, text=cur.text),
                self._event("response.content_part.done", **ids, content_index=0, part=part),
            ]
        else:
            part = {"type": "output_text", "text": cur.text, "annotations": [], "logprobs": []}
            item["content"] = [part]
            events = [
                self._event("response.output_text.done", **ids, content_index=0, text=cur.text, logprobs=[]),
                self._event("response.content_part.done", **ids, content_index=0, part=part),
            ]
        events.append(
            self._event("response.output_item.done", output_index=cur.index, item=copy.deepcopy(item))
        )
        return events

    def end(self, finished: Finished) -> list[dict]:
        events = self._close("incomplete") if self.current is not None else []
        r = self.response
        stats = finished.reply.stats
        if stats.finish_reason == "length":
            r["status"], r["incomplete_details"] = "incomplete", {"reason": "max_output_tokens"}
        else:
            r["status"] = "completed"
        r["completed_at"] = int(time.time())
        r["usage"] = usage_object(finished.usage)
        kind = "response.incomplete" if r["status"] == "incomplete" else "response.completed"
        events.append(self._event(kind, response=self._snapshot()))
        return events

    def fail(self, message: str) -> list[dict]:
        self.response["status"] = "failed"
        self.response["error"] = {"code": "server_error", "message": message}
        return [self._event("response.failed", response=self._snapshot())]


def usage_object(u: Usage) -> dict:
    return {
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }


# ---- endpoints ---------------------------------------------------------------------------------------


def _remember(state: ServerState, call: ResponsesCall, builder: ResponseBuilder, finished: Finished) -> None:
    if not call.store:
        return
    messages = call.request.messages + list(finished.reply.messages)
    state.store.put(
        call.response["id"], StoredResponse(call.response, messages, {**call.calls, **builder.new_calls})
    )


async def create(request: Request, body: dict, state: ServerState) -> Response:
    call = parse(body, state)
    job = await submit(state, call.request, "input")
    checked = call.request.checked
    if checked is not None:  # whether each tool's schema is enforced, now that it was compiled
        enforced = checked.enforced_tools
        for tool in call.response["tools"]:
            tool["strict"] = enforced.get(tool["name"], tool["strict"])
    builder = ResponseBuilder(call.response, {t.name for t in call.request.tools})

    if not call.stream:
        finished = await run_to_end(job, request, builder.feed)
        builder.end(finished)
        _remember(state, call, builder, finished)
        return JSONResponse(call.response)

    async def events():
        for e in builder.begin():
            yield sse(e, e["type"])
        async for event in job.stream(KEEPALIVE_SECONDS):
            if event is None:
                yield KEEPALIVE
                continue
            if isinstance(event, Failed):
                out = builder.fail(event.message)
            elif isinstance(event, Finished):
                out = builder.end(event)
                _remember(state, call, builder, event)
            else:
                out = builder.feed(event)
            for e in out:
                yield sse(e, e["type"])

    return StreamingResponse(guarded(job, events()), media_type="text/event-stream", headers=SSE_HEADERS)


async def retrieve(rid: str, state: ServerState) -> Response:
    stored = state.store.get(rid)
    if stored is None:
        raise APIError(
            404, f"No response with id {rid!r} is stored on this server.", "response_id", "not_found"
        )
    return JSONResponse(stored.body)


async def delete(rid: str, state: ServerState) -> Response:
    if not state.store.delete(rid):
        raise APIError(
            404, f"No response with id {rid!r} is stored on this server.", "response_id", "not_found"
        )
    return JSONResponse({"id": rid, "object": "response.deleted", "deleted": True})
