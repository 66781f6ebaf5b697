"""POST /v1/responses (OpenAI Responses API); GET and DELETE /v1/responses/{id}, GET
/v1/responses/{id}/input_items, POST /v1/responses/{id}/cancel, POST /v1/responses/input_tokens.

Harmony messages map onto Responses items one to one:

* analysis message              -> ``reasoning`` item (``content: [{"type": "reasoning_text"}]``,
                                   ``summary: []``); streamed as ``response.reasoning_text.delta``
* final message                 -> ``message`` item, ``output_text`` part, ``phase: "final_answer"``
* commentary message to the user (a preamble) -> ``message`` item with ``phase: "commentary"``
* message to ``functions.NAME`` -> ``function_call`` item (``call_id`` made here); streamed as
                                   ``response.function_call_arguments.delta``. A call to a function
                                   the request did not offer is a ``message`` (common.called_function)

Input items go the other way (reasoning items are rendered back as analysis, as harmony wants
within a tool-calling turn). ``previous_response_id`` continues a conversation kept in memory
(store.py); as with OpenAI, instructions and tools are not carried over and must be sent again.
"""

from __future__ import annotations

import base64
import binascii
import copy
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..harmony import Message, MessageDone, TextDelta
from .common import (
    KEEPALIVE,
    KEEPALIVE_SECONDS,
    NOT_TOOLS,
    SSE_HEADERS,
    ServerState,
    as_the_client_saw,
    called_function,
    check_model,
    guarded,
    list_query,
    new_id,
    recipient_of,
    render,
    run_to_end,
    sse,
    submit,
)
from .schemas import (
    IDENTIFIER_CHARS,
    APIError,
    bounded_array,
    bounded_string,
    brief,
    function_name,
    function_tool,
    identifiers,
    invalid,
    join_instructions,
    metadata,
    no_effect_parameters,
    output_constraint,
    positive_int,
    reasoning_effort,
    refuse_unsupported,
    response_format,
    sampling_options,
    text_of_parts,
    tool_choice_echo,
    tool_choice_rules,
    tool_list,
)
from .schemas import (
    field as get,
)
from .store import json_size, page
from .worker import Failed, Finished, GenerationRequest, Usage

TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "reasoning_text")
# The one `include` value with a meaning here; the others name outputs of tools this server lacks
# (web search, file search, code interpreter, computer use, images) or logprobs.
ENCRYPTED = "reasoning.encrypted_content"
# "encrypted_content" of reasoning items: the reasoning text, encoded, not encrypted (it is in the
# item's content anyway); lets stateless clients (store: false) send it back as OpenAI's API wants.
ENCRYPTED_PREFIX = "oss-mlx:"
# Parameters this server does not implement: a 400 naming them when set.
UNSUPPORTED = (
    "background",
    "background_options",
    "conversation",
    "prompt",
    "context_management",
    "image",
    "moderation",
    "access_programs",
    "prompt_cache_options",
)


@dataclass
class StoredResponse:
    body: dict
    messages: list[Message]  # the conversation after this response (system/developer left out)
    calls: dict[str, str]  # call_id -> recipient ("functions.NAME") of every tool call in it
    input_items: list[dict] = field(default_factory=list)  # this request's input, as items with ids


def encode_reasoning(text: str) -> str:
    return ENCRYPTED_PREFIX + base64.b64encode(text.encode()).decode()


def decode_reasoning(value: str, param: str) -> str:
    try:
        if not value.startswith(ENCRYPTED_PREFIX):
            raise ValueError
        return base64.b64decode(value[len(ENCRYPTED_PREFIX) :], validate=True).decode()
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise invalid(
            param, "This encrypted_content was not made by this server (send the reasoning item as it came)."
        ) from None


# ---- request -> harmony ------------------------------------------------------------------------------


def item_id(item: dict, param: str, prefix: str) -> str:
    """A client's item id (kept, for input_items) or a new one."""
    given = bounded_string(item, "id", IDENTIFIER_CHARS, param=f"{param}.id")
    return given or new_id(prefix)


def input_messages(items: Any, calls: dict[str, str]) -> tuple[list[Message], list[str], list[dict]]:
    """``input`` -> harmony messages, the texts of system/developer messages (-> instructions), and
    the input as items with ids (for input_items).

    ``calls`` (call_id -> recipient) is read for function_call_output items and extended by
    function_call items.
    """
    if isinstance(items, str):
        record = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": items}]}
        return [Message("user", items)], [], [{"id": new_id("msg_"), **record, "status": "completed"}]
    if not isinstance(items, list):
        raise invalid(
            "input", "Invalid type for 'input': expected a string or an array of items.", "invalid_type"
        )
    messages: list[Message] = []
    instructions: list[str] = []
    records: list[dict] = []
    for i, item in enumerate(items):
        p = f"input[{i}]"
        if not isinstance(item, dict):
            raise invalid(p, f"Invalid type for '{p}': expected an object.", "invalid_type")
        kind = get(item, "type", "string", param=f"{p}.type", default="message")
        if kind == "message":
            role = get(item, "role", "string", param=f"{p}.role", required=True)
            if role not in ("user", "assistant", "system", "developer"):
                raise invalid(
                    f"{p}.role", f"Unknown role {brief(role)}: use user, assistant, system or developer."
                )
            text = text_of_parts(item.get("content", ""), f"{p}.content", TEXT_PARTS)
            part = "output_text" if role == "assistant" else "input_text"
            records.append(
                {
                    "id": item_id(item, p, "msg_"),
                    "type": "message",
                    "role": role,
                    "content": [
                        {"type": part, "text": text, **({"annotations": []} if role == "assistant" else {})}
                    ],
                    "status": "completed",
                }
            )
            if role in ("system", "developer"):
                instructions.append(text)
            elif role == "user":
                messages.append(Message("user", text))
            else:
                channel = "commentary" if item.get("phase") == "commentary" else "final"
                messages.append(Message("assistant", text, channel=channel))
        elif kind == "function_call":
            call_id = bounded_string(item, "call_id", IDENTIFIER_CHARS, param=f"{p}.call_id", required=True)
            name = get(item, "name", "string", param=f"{p}.name", required=True)
            name = function_name(name, f"{p}.name", dotted=True)
            arguments = get(item, "arguments", "string", param=f"{p}.arguments", default="")
            calls[call_id] = recipient_of(name)
            records.append(
                {
                    "id": item_id(item, p, "fc_"),
                    "type": "function_call",
                    "call_id": call_id,
                    "name": name,
                    "arguments": arguments,
                    "status": "completed",
                }
            )
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
            call_id = bounded_string(item, "call_id", IDENTIFIER_CHARS, param=f"{p}.call_id", required=True)
            if call_id not in calls:
                raise invalid(
                    f"{p}.call_id",
                    f"No tool call found for function call output with call_id {brief(call_id)}.",
                )
            output = text_of_parts(item.get("output", ""), f"{p}.output", TEXT_PARTS)
            records.append(
                {
                    "id": item_id(item, p, "fco_"),
                    "type": "function_call_output",
                    "call_id": call_id,
                    "output": output,
                    "status": "completed",
                }
            )
            messages.append(
                Message("tool", output, channel="commentary", recipient="assistant", name=calls[call_id])
            )
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            text = text_of_parts(parts, f"{p}.content", TEXT_PARTS)
            encrypted = get(item, "encrypted_content", "string", param=f"{p}.encrypted_content")
            if not text and encrypted:
                text = decode_reasoning(encrypted, f"{p}.encrypted_content")
            records.append(
                {
                    "id": item_id(item, p, "rs_"),
                    "type": "reasoning",
                    "summary": [],
                    "content": [{"type": "reasoning_text", "text": text}],
                    "status": "completed",
                }
            )
            if text:
                messages.append(Message("assistant", text, channel="analysis"))
        else:
            raise invalid(
                f"{p}.type",
                f"Input items of type {brief(kind)} are not supported (message, function_call, "
                "function_call_output and reasoning are).",
                "unsupported_value",
            )
    return messages, instructions, records


def includes(body: dict) -> set[str]:
    """``include``: reasoning.encrypted_content is made; anything else is a 400 naming it."""
    values = bounded_array(body, "include", 16)
    for i, value in enumerate(values):
        if value != ENCRYPTED:
            raise invalid(
                f"include[{i}]",
                f"include value {brief(value)} is not supported: this server can include only "
                f"'{ENCRYPTED}' (it has no built-in tools, images or logprobs).",
                "unsupported_value",
            )
    return set(values)


def reasoning_options(body: dict, default_effort: str) -> tuple[str, str | None]:
    """``reasoning``: the effort, and ``summary`` (only ``auto``: gpt-oss writes no summaries, and
    'auto' is the best summarizer available, none; the full reasoning is in the item's content)."""
    reasoning = get(body, "reasoning", "object", default={})
    effort = reasoning_effort(reasoning.get("effort"), "reasoning.effort") or default_effort
    summary = None
    for key in ("summary", "generate_summary"):
        value = get(reasoning, key, "string", param=f"reasoning.{key}")
        if value not in (None, "auto"):
            raise invalid(
                f"reasoning.{key}",
                f"reasoning.{key} {brief(value)} is not supported: gpt-oss writes no reasoning summaries "
                "(the whole reasoning is in the reasoning item's content). Use 'auto' or leave it out.",
                "unsupported_value",
            )
        summary = summary or value
    context = get(reasoning, "context", "string", param="reasoning.context")
    if context not in (None, "auto", "current_turn"):
        raise invalid(
            "reasoning.context",
            f"reasoning.context {brief(context)} is not supported: harmony keeps the reasoning of the "
            "current turn only. Use 'auto' or 'current_turn'.",
            "unsupported_value",
        )
    mode = get(reasoning, "mode", "string", param="reasoning.mode")
    if mode not in (None, "standard"):
        raise invalid(
            "reasoning.mode", f"reasoning.mode {brief(mode)} is not supported.", "unsupported_value"
        )
    return effort, summary


@dataclass
class ResponsesCall:
    request: GenerationRequest
    response: dict  # the response object, status in_progress
    stream: bool
    store: bool
    calls: dict[str, str] = field(default_factory=dict)
    input_items: list[dict] = field(default_factory=list)
    offered: set[str] = field(default_factory=set)  # names of the functions the model was shown
    include: set[str] = field(default_factory=set)


def parse(body: dict, state: ServerState) -> ResponsesCall:
    """Validate everything a request holds, before any work is queued or a stream begins."""
    model = check_model(body, state.config)
    refuse_unsupported(body, UNSUPPORTED)
    previous_id = bounded_string(body, "previous_response_id", IDENTIFIER_CHARS)
    history: list[Message] = []
    calls: dict[str, str] = {}
    if previous_id is not None:
        previous = state.store.get(previous_id)
        if not isinstance(previous, StoredResponse):
            raise invalid(
                "previous_response_id",
                f"Previous response with id {brief(previous_id)} not found (this server keeps recent "
                "responses in memory, up to --max-stored-responses / --max-stored-bytes, and none from "
                "before a restart).",
                "previous_response_not_found",
            )
        history, calls = list(previous.messages), dict(previous.calls)
    raw_input = body.get("input")
    if raw_input is None and previous_id is None:
        raise APIError(400, "Missing required parameter: 'input'.", "input", "missing_required_parameter")
    new, extra_instructions, records = input_messages(raw_input if raw_input is not None else [], calls)
    if not history and not new:
        raise invalid("input", "'input' holds no message.")

    instructions = get(body, "instructions", "string")
    effort, summary = reasoning_options(body, state.config.reasoning_effort)
    tools = tool_list(body, _tool)
    choice = body.get("tool_choice")
    rendered_tools, choice_text = tool_choice_rules(choice, tools)
    text_config = get(body, "text", "object", default={})
    fmt = text_config.get("format")
    format_text, format_echo = response_format(fmt, "text.format")
    parameters = {t.name: f"tools[{i}].parameters" for i, t in enumerate(tools)}
    constraint = output_constraint(fmt, "text.format", rendered_tools, choice, parameters)
    verbosity = get(text_config, "verbosity", "string", param="text.verbosity")
    if verbosity not in (None, "medium"):
        raise invalid(
            "text.verbosity",
            f"text.verbosity {brief(verbosity)} is not supported by gpt-oss (leave it out).",
            "unsupported_value",
        )
    truncation = get(body, "truncation", "string", default="disabled")
    if truncation not in ("auto", "disabled"):
        raise invalid("truncation", f"'truncation' must be 'auto' or 'disabled', got {brief(truncation)}.")
    top_logprobs = get(body, "top_logprobs", "integer")
    if top_logprobs:
        raise invalid("top_logprobs", "logprobs are not supported by this server.", "unsupported_parameter")
    include = includes(body)

    options = sampling_options(body)
    max_output = positive_int(body, "max_output_tokens")
    max_tool_calls = positive_int(body, "max_tool_calls")  # counts built-in tool calls: there are none
    stream = get(body, "stream", "boolean", default=False)
    store = get(body, "store", "boolean", default=True)
    parallel = get(body, "parallel_tool_calls", "boolean", default=True)  # harmony: one call a reply
    stream_options = get(body, "stream_options", "object", default={})
    get(stream_options, "include_obfuscation", "boolean", param="stream_options.include_obfuscation")
    extras = no_effect_parameters(body)
    ids = identifiers(body, ("user", "safety_identifier", "prompt_cache_key"))

    request = GenerationRequest(
        messages=history + new,
        instructions=join_instructions(*extra_instructions, instructions, choice_text, format_text),
        tools=rendered_tools,
        constraint=constraint,
        reasoning_effort=effort,
        options=options,
        max_tokens=max_output,
        truncate=truncation == "auto",
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
        "max_tool_calls": max_tool_calls,
        "model": model,
        "output": [],
        "parallel_tool_calls": parallel,
        "previous_response_id": previous_id,
        "reasoning": {"effort": effort, "summary": summary},
        "service_tier": extras["service_tier"],
        "store": store,
        "temperature": options.temperature,
        "text": {"format": format_echo, "verbosity": verbosity or "medium"},
        "tool_choice": tool_choice_echo(choice),
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
        "top_logprobs": top_logprobs or 0,
        "top_p": options.top_p,
        "truncation": truncation,
        "usage": None,
        "metadata": metadata(body),
        **ids,
        "prompt_cache_retention": extras["prompt_cache_retention"],
    }
    offered = {t.name for t in rendered_tools}
    return ResponsesCall(request, response, stream, store, calls, records, offered, include)


def _tool(spec: dict, param: str):
    kind = get(spec, "type", "string", param=f"{param}.type", required=True)
    if kind != "function":
        raise invalid(
            f"{param}.type",
            f"Tools of type {brief(kind)} are not supported (function tools are).",
            "unsupported_value",
        )
    return function_tool(spec, param)


# ---- harmony events -> items and stream events ------------------------------------------------------


@dataclass
class _Open:
    item: dict
    index: int
    kind: str  # "message" | "reasoning" | "function_call"
    text: str = ""


class ResponseBuilder:
    """Turns the worker's events into output items and, for streaming, the Responses event sequence."""

    def __init__(self, response: dict, offered: set[str], include: set[str] = frozenset()):
        self.response = response
        self.output: list[dict] = response["output"]
        self.offered = offered
        self.encrypt = ENCRYPTED in include
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
        name = called_function(recipient, self.offered)
        if name is not None:
            kind, part = "function_call", None
            call_id = new_id("call_")
            self.new_calls[call_id] = recipient
            item = {
                "id": new_id("fc_"),
                "type": "function_call",
                "status": "in_progress",
                "arguments": "",
                "call_id": call_id,
                "name": name,
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
                # a call to a function not offered is answered as text: the final answer
                "phase": "commentary"
                if channel == "commentary" and recipient in (None, *NOT_TOOLS)
                else "final_answer",
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
            if self.encrypt:
                item["encrypted_content"] = encode_reasoning(cur.text)
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

    def fail(self, failed: Failed) -> list[dict]:
        self.response["status"] = "failed"
        self.response["error"] = {"code": failed.code, "message": failed.message}
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
    reply = as_the_client_saw(list(finished.reply.messages), call.offered)
    stored = StoredResponse(
        call.response, call.request.messages + reply, {**call.calls, **builder.new_calls}, call.input_items
    )
    size = json_size(stored.body, stored.messages, stored.input_items)
    state.store.put(call.response["id"], stored, size)


async def create(request: Request, body: dict, state: ServerState) -> Response:
    call = parse(body, state)
    job = await submit(state, call.request, "input")
    if call.request.checked is not None:  # whether each tool's schema is enforced, now it is compiled
        enforced = call.request.checked.enforced_tools
        for tool in call.response["tools"]:
            tool["strict"] = enforced.get(tool["name"], tool["strict"])
    builder = ResponseBuilder(call.response, call.offered, call.include)

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
                out = builder.fail(event)
            elif isinstance(event, Finished):
                out = builder.end(event)
                _remember(state, call, builder, event)
            else:
                out = builder.feed(event)
            for e in out:
                yield sse(e, e["type"])

    return StreamingResponse(guarded(job, events()), media_type="text/event-stream", headers=SSE_HEADERS)


def stored_response(rid: str, state: ServerState) -> StoredResponse:
    stored = state.store.get(rid)
    if not isinstance(stored, StoredResponse):
        raise APIError(
            404, f"No response with id {brief(rid)} is stored on this server.", "response_id", "not_found"
        )
    return stored


async def retrieve(rid: str, state: ServerState) -> Response:
    return JSONResponse(stored_response(rid, state).body)


async def delete(rid: str, state: ServerState) -> Response:
    stored_response(rid, state)
    state.store.delete(rid)
    return JSONResponse({"id": rid, "object": "response.deleted", "deleted": True})


async def input_items(request: Request, rid: str, state: ServerState) -> Response:
    """GET /v1/responses/{id}/input_items: the request's input items (newest first by default)."""
    after, limit, order = list_query(request, "desc")
    for i, value in enumerate(request.query_params.getlist("include")):
        if value != ENCRYPTED:
            raise invalid(
                f"include[{i}]", f"include value {brief(value)} is not supported.", "unsupported_value"
            )
    return JSONResponse(page(stored_response(rid, state).input_items, after, limit, order))


async def cancel(rid: str, state: ServerState) -> Response:
    """POST /v1/responses/{id}/cancel: only background responses can be cancelled, and this server
    makes none, so a stored response gets OpenAI's answer for a foreground one (a 400)."""
    stored_response(rid, state)
    raise invalid("response_id", "Cannot cancel a synchronous response.", "invalid_request")


async def count_input_tokens(body: dict, state: ServerState) -> Response:
    """POST /v1/responses/input_tokens: the prompt a create with this body would run, in tokens
    (rendered by the same harmony renderer; a forced tool-call header counts, as in usage)."""
    body = {k: v for k, v in body.items() if k not in ("stream", "store", "background")}
    call = parse(body, state)
    await render(state, call.request, "input", check=False)
    tokens = len(call.request.prompt)
    return JSONResponse({"object": "response.input_tokens", "input_tokens": tokens})
