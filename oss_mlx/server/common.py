"""What both APIs share: server settings, model names, submitting a job, SSE framing, ids."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.requests import Request

from ..structured import ConstraintError
from .schemas import APIError, constraint_error
from .worker import ContextTooLong, Engine, Failed, Finished, GenerationRequest, Job, QueueFull

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
    max_stored_responses: int = 512


@dataclass
class ServerState:
    engine: Engine
    config: ServerConfig
    store: Any = None  # responses.ResponseStore


def is_offered_call(recipient: str | None, offered: set[str]) -> bool:
    """Whether a message to `recipient` is a call of a function the request offered. Other messages,
    calls of functions it did not offer included (a model without tools in view may still write one),
    reach the client as text, never as a call; with tools offered the grammar allows only theirs."""
    return recipient is not None and recipient.startswith("functions.") and recipient[10:] in offered


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
        f"The model '{name}' does not exist. This server serves '{config.model_id}' (see GET /v1/models).",
        "model",
        "model_not_found",
    )


async def submit(state: ServerState, req: GenerationRequest, prompt_param: str) -> Job:
    """Render the prompt off the event loop, then queue the job (400 context / 429 queue full)."""
    try:
        await anyio.to_thread.run_sync(state.engine.prepare, req)
    except ContextTooLong as e:
        raise APIError(400, str(e), prompt_param, "context_length_exceeded") from None
    except ConstraintError as e:  # a schema or tool_choice the engine cannot enforce
        raise constraint_error(e) from None
    except (ValueError, KeyError, TypeError, RecursionError) as e:  # a message harmony cannot render
        raise APIError(400, f"The conversation cannot be rendered: {e}", prompt_param) from None
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
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_SECONDS)
            except asyncio.TimeoutError:
                event = None
            if loop.time() >= next_check:  # by the clock: events may come faster than any timeout
                next_check = loop.time() + DISCONNECT_POLL_SECONDS
                if await request.is_disconnected():
                    raise APIError(499, "client disconnected")
            if event is None:
                continue
            if isinstance(event, Failed):
                raise APIError(
                    500, f"Generation failed: {event.message}", code="server_error", type="server_error"
                )
            if isinstance(event, Finished):
                return event
            on_event(event)
    finally:
        job.cancel()  # no-op once finished; frees the worker on any other way out


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
