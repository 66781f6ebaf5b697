"""What both APIs share: server settings, model names, submitting a job, SSE framing, ids, which
replies are tool calls, list pages."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.requests import Request

from ..harmony import Message
from ..structured import ConstraintError
from .schemas import APIError, brief, constraint_error, invalid
from .store import ObjectStore
from .worker import ContextTooLong, Engine, Failed, Finished, GenerationRequest, Job, QueueFull

log = logging.getLogger("oss_mlx.server")

# How a client disconnect is noticed while a non-streaming request waits.
DISCONNECT_POLL_SECONDS = 0.5
# A stream that has nothing to say for this long (waiting in the queue, a long prefill) sends an SSE
# comment, which clients ignore and proxies take as life.
KEEPALIVE_SECONDS = 10.0
KEEPALIVE = b": keep-alive\n\n"


@dataclass
class ServerConfig:
    model_id: str
    aliases: set[str] = field(default_factory=set)
    reasoning_effort: str = "medium"
    reasoning_fields: tuple[str, ...] = ("reasoning_content", "reasoning")
    max_body_bytes: int = 8 * 1024 * 1024
    api_key: str | None = None


@dataclass
class ServerState:
    engine: Engine
    config: ServerConfig
    store: ObjectStore = field(default_factory=lambda: ObjectStore(512, 256 * 10**6))


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def check_model(body: dict, config: ServerConfig) -> str:
    """The served model's id if ``body["model"]`` names it (or is absent); 404 model_not_found else."""
    name = body.get("model")
    if name is None:
        return config.model_id
    if not isinstance(name, str):
        raise APIError(400, "Invalid type for 'model': expected a string.", "model", "invalid_type")
    if name.lower() in config.aliases:
        return config.model_id
    raise APIError(
        404,
        f"The model {brief(name)} does not exist. This server serves '{config.model_id}' "
        "(see GET /v1/models).",
        "model",
        "model_not_found",
    )


async def render(state: ServerState, req: GenerationRequest, prompt_param: str, check: bool = True) -> None:
    """Render the prompt off the event loop (400 when it does not fit the context, with ``check``)."""
    try:
        await anyio.to_thread.run_sync(lambda: state.engine.prepare(req, check))
    except ContextTooLong as e:
        raise APIError(400, str(e), prompt_param, "context_length_exceeded") from None
    except ConstraintError as e:  # a schema or tool_choice the engine cannot enforce
        raise constraint_error(e) from None
    except (ValueError, KeyError, TypeError, RecursionError) as e:  # a message harmony cannot render
        raise APIError(400, f"The conversation cannot be rendered: {brief(str(e))}", prompt_param) from None


async def submit(state: ServerState, req: GenerationRequest, prompt_param: str) -> Job:
    """Render the prompt, then queue the job (400 context / 429 queue full)."""
    await render(state, req, prompt_param)
    try:
        return state.engine.submit(req)
    except QueueFull as e:
        raise APIError(
            429,
            "The server is busy: too many requests are waiting. Retry later.",
            code="rate_limit_exceeded",
            type="rate_limit_error",
            headers={"Retry-After": str(e.retry_after)},
        ) from None


async def run_to_end(job: Job, request: Request, on_event: Callable[[Any], None]) -> Finished:
    """Non-streaming: feed each event before Finished to ``on_event``; cancel if the client goes away."""
    loop = asyncio.get_running_loop()
    next_check = loop.time() + DISCONNECT_POLL_SECONDS
    try:
        async for event in job.stream(DISCONNECT_POLL_SECONDS):
            if loop.time() >= next_check:  # by the clock: events may come faster than any timeout
                next_check = loop.time() + DISCONNECT_POLL_SECONDS
                if await request.is_disconnected():
                    raise APIError(499, "client disconnected")
            if event is None:
                continue
            if isinstance(event, Failed):
                raise APIError(
                    event.status, f"Generation failed: {event.message}", code=event.code, type=event.code
                )
            if isinstance(event, Finished):
                return event
            on_event(event)
        raise RuntimeError("a job's stream ended without Finished")
    finally:
        job.cancel()  # no-op once finished; frees its place on any other way out


def sse(data: Any, event: str | None = None) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {text}\n\n".encode()


async def guarded(job: Job, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A streaming body whose end, however it comes (disconnect, error), cancels the job."""
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        job.cancel()


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# ---- which replies are tool calls --------------------------------------------------------------------

NOT_TOOLS = ("all", "assistant", "user")


def called_function(recipient: str | None, offered: set[str]) -> str | None:
    """The name of the offered function a message calls; None when it is no call, or a call to a
    function the request did not offer (gpt-oss may call its built-in ``browser.*`` / ``python`` tools,
    or a function from earlier turns): such a call is returned as text, since a client cannot run it
    (the Agents SDK, for one, fails on it)."""
    if recipient is None or recipient in NOT_TOOLS:
        return None
    name = recipient.removeprefix("functions.")
    if recipient.startswith("functions.") and name in offered:
        return name
    log.warning("the model called %s, which the request did not offer: returned as text", brief(recipient))
    return None


def as_the_client_saw(messages: list[Message], offered: set[str]) -> list[Message]:
    """The reply's messages as they were answered: a call to a function that was not offered
    becomes the final-channel text it was returned as, so that a continued conversation agrees with
    what the client was told."""
    out = []
    for m in messages:
        if m.role == "assistant" and m.recipient not in (None, *NOT_TOOLS):
            name = m.recipient.removeprefix("functions.")
            if not (m.recipient.startswith("functions.") and name in offered):
                m = Message(
                    "assistant", m.content, channel="analysis" if m.channel == "analysis" else "final"
                )
        out.append(m)
    return out


def recipient_of(name: str) -> str:
    """A function's harmony address (function names cannot hold a dot; a dotted name is kept as is)."""
    return name if "." in name else f"functions.{name}"


# ---- lists ---------------------------------------------------------------------------------------------


def list_query(request: Request, default_order: str, default_limit: int = 20) -> tuple[str | None, int, str]:
    """``after``, ``limit`` (1-100) and ``order`` (asc / desc) of a list request's query."""
    q = request.query_params
    limit_text = q.get("limit", str(default_limit))
    if not (limit_text.isascii() and limit_text.isdigit() and 1 <= int(limit_text) <= 100):
        raise invalid("limit", f"'limit' must be an integer from 1 to 100, got {brief(limit_text)}.")
    order = q.get("order", default_order)
    if order not in ("asc", "desc"):
        raise invalid("order", f"'order' must be 'asc' or 'desc', got {brief(order)}.")
    return q.get("after"), int(limit_text), order
