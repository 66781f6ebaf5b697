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
from ..tokenizer import HarmonyTokenizer
from .common import (
    KEEPALIVE,
    KEEPALIVE_SECONDS,
    SSE_HEADERS,
    ServerState,
    called_function,
    check_model,
    guarded,
    list_query,
    new_id,
    recipient_of,
    run_to_end,
    sse,
    submit,
)
from .schemas import (
    IDENTIFIER_CHARS,
    MAX_STOP,
    MAX_TOOLS,
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
    number_in,
    output_constraint,
    positive_int,
    reasoning_effort,
    refuse_unsupported,
    response_format,
    sampling_options,
    text_of_parts,
    tool_choice_rules,
    tool_list,
)
from .schemas import field as get
from .store import json_size, page
from .worker import Failed, Finished, GenerationRequest, Usage

TEXT_PARTS = ("text", "input_text", "output_text")
# Parameters this server does not implement: a 400 naming them when set. (`functions` and
# `function_call` are the deprecated forms of `tools` and `tool_choice`.)
UNSUPPORTED = (
    "audio",
    "prediction",
    "web_search_options",
    "functions",
    "function_call",
    "moderation",
    "prompt_cache_options",
)
MAX_LOGIT_BIAS = 1024  # entries; OpenAI documents none
MAX_STOP_CHARS = 1024  # per stop sequence; OpenAI documents none


def conversation(raw: Any) -> tuple[list[Message], list[str], list[dict]]:
    """``messages`` -> harmony messages, the system/developer texts (-> instructions), and the
    messages as a stored completion lists them (role, text content, tool calls)."""
    if not isinstance(raw, list):
        raise invalid("messages", "Invalid type for 'messages': expected an array.", "invalid_type")
    if not raw:
        raise invalid("messages", "'messages' must hold at least one message.")
    messages: list[Message] = []
    instructions: list[str] = []
    records: list[dict] = []
    calls: dict[str, str] = {}  # tool_call_id -> recipient
    for i, m in enumerate(raw):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(p, f"Invalid type for '{p}': expected an object.", "invalid_type")
        role = get(m, "role", "string", param=f"{p}.role", required=True)
        content = m.get("content")
        record: dict[str, Any] = {"role": role}
        records.append(record)
        if role in ("system", "developer"):
            instructions.append(text_of_parts(content or "", f"{p}.content", TEXT_PARTS))
            record["content"] = instructions[-1]
        elif role == "user":
            messages.append(Message("user", text_of_parts(content or "", f"{p}.content", TEXT_PARTS)))
            record["content"] = messages[-1].content
        elif role == "assistant":
            for key in ("reasoning_content", "reasoning", "thinking"):
                thought = get(m, key, "string", param=f"{p}.{key}")
                if thought:
                    messages.append(Message("assistant", thought, channel="analysis"))
                    break
            tool_calls = bounded_array(m, "tool_calls", MAX_TOOLS, param=f"{p}.tool_calls")
            text = text_of_parts(content, f"{p}.content", TEXT_PARTS) if content is not None else ""
            record["content"] = text or None
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
                call_id = bounded_string(call, "id", IDENTIFIER_CHARS, param=f"{q}.id")
                if call_id is not None:
                    calls[call_id] = recipient_of(name)
                record.setdefault("tool_calls", []).append(
                    {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
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
        elif role in ("tool", "function"):
            call_id = bounded_string(m, "tool_call_id", IDENTIFIER_CHARS, param=f"{p}.tool_call_id")
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
                    f"No assistant tool call with id {brief(call_id)} comes before this tool message.",
                )
            text = text_of_parts(content or "", f"{p}.content", TEXT_PARTS)
            messages.append(
                Message("tool", text, channel="commentary", recipient="assistant", name=recipient)
            )
            record.update(content=text, tool_call_id=call_id)
        else:
            raise invalid(
                f"{p}.role", f"Unknown role {brief(role)}: use system, developer, user, assistant or tool."
            )
    return messages, instructions, records


def function_tools(body: dict) -> list[Tool]:
    """``tools`` (``[{"type": "function", "function": {...}}]``) -> harmony function tools (also read
    by fine-tuning's data, finetune/data.py)."""
    return tool_list(body, _tool)


@dataclass
class ChatCall:
    request: GenerationRequest
    model: str
    stream: bool
    include_usage: bool
    stops: list[str] = field(default_factory=list)
    offered: set[str] = field(default_factory=set)  # names of the functions the model was shown
    store: bool = False
    metadata: dict[str, str] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)  # the request's messages, for messages.list


def logit_bias(body: dict) -> dict[int, float] | None:
    """OpenAI's logit_bias: token ids (as strings) -> -100..100, added to the logits."""
    bias = get(body, "logit_bias", "object")
    if not bias:
        return None
    if len(bias) > MAX_LOGIT_BIAS:
        raise invalid(
            "logit_bias", f"'logit_bias' holds {len(bias)} entries; at most {MAX_LOGIT_BIAS} are allowed."
        )
    out = {}
    for key in bias:
        vocab = HarmonyTokenizer.vocab_size
        if not (key.isascii() and key.isdigit() and len(key) < 8 and int(key) < vocab):
            raise invalid(
                "logit_bias",
                f"logit_bias keys must be token ids from 0 to {vocab - 1}, got {brief(key)}.",
            )
        out[int(key)] = float(number_in(bias, key, -100, 100, param=f"logit_bias.{key}"))
    return out


def parse(body: dict, state: ServerState) -> ChatCall:
    """Validate everything a request holds, before any work is queued or a stream begins."""
    model = check_model(body, state.config)
    refuse_unsupported(body, UNSUPPORTED)
    if "messages" not in body:
        raise APIError(
            400, "Missing required parameter: 'messages'.", "messages", "missing_required_parameter"
        )
    messages, system_texts, records = conversation(body["messages"])

    effort = reasoning_effort(body.get("reasoning_effort"), "reasoning_effort")
    reasoning = get(body, "reasoning", "object")  # the Responses API's form, taken here too
    if effort is None and reasoning is not None:
        effort = reasoning_effort(reasoning.get("effort"), "reasoning.effort")
    tools = function_tools(body)
    choice = body.get("tool_choice")
    rendered_tools, choice_text = tool_choice_rules(choice, tools)
    fmt = body.get("response_format")
    format_text, _ = response_format(fmt, "response_format")
    parameters = {t.name: f"tools[{i}].function.parameters" for i, t in enumerate(tools)}
    constraint = output_constraint(fmt, "response_format", rendered_tools, choice, parameters)

    n = get(body, "n", "integer", default=1)
    if n != 1:
        raise invalid("n", "Only n=1 is supported.", "unsupported_value")
    if get(body, "logprobs", "boolean", default=False):
        raise invalid("logprobs", "logprobs are not supported by this server.", "unsupported_value")
    if get(body, "top_logprobs", "integer") is not None:
        raise invalid(
            "top_logprobs",
            "top_logprobs needs logprobs: true, and logprobs are not supported by this server.",
            "unsupported_parameter",
        )
    modalities = get(body, "modalities", "array", default=["text"])
    if modalities != ["text"]:
        raise invalid("modalities", "Only the text modality is supported: ['text'].", "unsupported_value")
    verbosity = get(body, "verbosity", "string")
    if verbosity not in (None, "medium"):
        raise invalid(
            "verbosity",
            f"verbosity {brief(verbosity)} is not supported by gpt-oss (leave it out).",
            "unsupported_value",
        )
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
    if len(stops) > MAX_STOP:
        raise invalid("stop", f"At most {MAX_STOP} stop sequences are allowed.")
    if any(len(s) > MAX_STOP_CHARS for s in stops):  # each is matched against every delta
        raise invalid("stop", f"A stop sequence may be at most {MAX_STOP_CHARS} characters long.")

    max_tokens = positive_int(body, "max_completion_tokens") or positive_int(body, "max_tokens")
    options = sampling_options(body)
    options.logit_bias = logit_bias(body)
    for key in ("frequency_penalty", "presence_penalty"):
        if number_in(body, key, -2, 2):
            # Penalties count every earlier token; in harmony that includes the header words each
            # message repeats (assistant, final, ...), so they would break the format, not the prose.
            raise invalid(
                key, f"'{key}' is not supported by this server (0 is accepted).", "unsupported_value"
            )
    stream = get(body, "stream", "boolean", default=False)
    stream_options = get(body, "stream_options", "object", default={})
    include_usage = get(
        stream_options, "include_usage", "boolean", param="stream_options.include_usage", default=False
    )
    get(stream_options, "include_obfuscation", "boolean", param="stream_options.include_obfuscation")
    get(body, "parallel_tool_calls", "boolean")  # harmony writes one call per reply: either way, one
    no_effect_parameters(body)
    identifiers(body, ("user", "safety_identifier", "prompt_cache_key"))
    store = get(body, "store", "boolean", default=False)

    request = GenerationRequest(
        messages=messages,
        instructions=join_instructions(*system_texts, choice_text, format_text),
        tools=rendered_tools,
        constraint=constraint,
        reasoning_effort=effort or state.config.reasoning_effort,
        options=options,
        max_tokens=max_tokens,
    )
    offered = {t.name for t in rendered_tools}
    return ChatCall(request, model, stream, include_usage, stops, offered, store, metadata(body), records)


def _tool(spec: dict, param: str):
    kind = get(spec, "type", "string", param=f"{param}.type", default="function")
    if kind != "function":
        raise invalid(f"{param}.type", f"Tools of type {brief(kind)} are not supported.", "unsupported_value")
    return function_tool(
        get(spec, "function", "object", param=f"{param}.function", required=True), f"{param}.function"
    )


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

    def __init__(self, stops: list[str], reasoning_fields: tuple[str, ...], offered: set[str]):
        self.offered = offered
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
        name = called_function(recipient, self.offered)
        if name is not None:
            self.current = "tool"
            call = {
                "id": new_id("call_"),
                "type": "function",
                "function": {"name": name, "arguments": ""},
            }
            self.tool_calls.append(call)
            index = len(self.tool_calls) - 1
            return [{"tool_calls": [{"index": index, **copy.deepcopy(call)}]}]
        # A call to a function that was not offered is text: reasoning on the analysis channel,
        # else content.
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
    builder = ChatBuilder(call.stops, state.config.reasoning_fields, call.offered)
    cid, created = new_id("chatcmpl-"), int(time.time())

    def on_event(event: Any) -> None:
        builder.feed(event)
        if builder.stopped:
            job.cancel()

    def completion(finished: Finished) -> dict:
        return {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": call.model,
            "service_tier": "default",
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

    if not call.stream:
        finished = await run_to_end(job, request, on_event)
        builder.finish()
        body = completion(finished)
        _remember(state, call, body)
        return JSONResponse(body)

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
                    "type": event.code,
                    "param": None,
                    "code": event.code,
                }
                yield sse({"error": error})
                return
            if isinstance(event, Finished):
                for delta in builder.finish():
                    yield chunk(delta)
                yield chunk({}, builder.finish_reason(event))
                _remember(state, call, completion(event))
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


# ---- stored completions (store: true) ------------------------------------------------------------------


@dataclass
class StoredCompletion:
    body: dict  # the chat.completion object, with its metadata
    messages: list[dict]  # the request's messages, with ids
    order: int = field(default_factory=time.monotonic_ns)  # lists follow the order they were made


def _remember(state: ServerState, call: ChatCall, body: dict) -> None:
    if not call.store:
        return
    body = {**body, "metadata": call.metadata}
    messages = [{"id": f"{body['id']}-{i}", "content_parts": None, **r} for i, r in enumerate(call.records)]
    stored = StoredCompletion(body, messages)
    state.store.put(body["id"], stored, json_size(body, messages))


def stored_completion(cid: str, state: ServerState) -> StoredCompletion:
    stored = state.store.get(cid)
    if not isinstance(stored, StoredCompletion):
        raise APIError(
            404,
            f"No chat completion with id {brief(cid)} is stored on this server (only those created with "
            "store: true are kept).",
            "completion_id",
            "not_found",
        )
    return stored


async def retrieve(cid: str, state: ServerState) -> Response:
    return JSONResponse(stored_completion(cid, state).body)


async def update(cid: str, body: dict, state: ServerState) -> Response:
    """POST /v1/chat/completions/{id}: replace its metadata (the only field that may change)."""
    stored = stored_completion(cid, state)
    if "metadata" not in body:
        raise APIError(
            400, "Missing required parameter: 'metadata'.", "metadata", "missing_required_parameter"
        )
    stored.body["metadata"] = metadata(body)
    state.store.resize(cid, json_size(stored.body, stored.messages))
    return JSONResponse(stored.body)


async def delete(cid: str, state: ServerState) -> Response:
    stored_completion(cid, state)
    state.store.delete(cid)
    return JSONResponse({"id": cid, "object": "chat.completion.deleted", "deleted": True})


async def list_completions(request: Request, state: ServerState) -> Response:
    """GET /v1/chat/completions: stored completions, oldest first by default; ``model`` and
    ``metadata[KEY]=VALUE`` filter them."""
    after, limit, order = list_query(request, "asc")
    model = request.query_params.get("model")
    wanted = {}
    for key, value in request.query_params.multi_items():
        if key.startswith("metadata[") and key.endswith("]"):
            wanted[key[len("metadata[") : -1]] = value
        elif key == "metadata":
            raise invalid("metadata", "Filter by metadata as metadata[KEY]=VALUE.")
    stored = sorted(
        (s for s in state.store.values() if isinstance(s, StoredCompletion)), key=lambda s: s.order
    )
    matching = [
        s.body
        for s in stored
        if (model is None or s.body["model"] == model)
        and all(s.body["metadata"].get(k) == v for k, v in wanted.items())
    ]
    return JSONResponse(page(matching, after, limit, order))


async def list_messages(request: Request, cid: str, state: ServerState) -> Response:
    """GET /v1/chat/completions/{id}/messages: the request's messages, in order by default."""
    after, limit, order = list_query(request, "asc")
    return JSONResponse(page(stored_completion(cid, state).messages, after, limit, order))
