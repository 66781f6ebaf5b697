"""`oss-mlx serve`: an OpenAI-compatible server (Responses API and Chat Completions) on Starlette.

    oss-mlx serve --model openai/gpt-oss-20b [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Routes: POST /v1/responses, GET|DELETE /v1/responses/{id}, POST /v1/chat/completions,
GET /v1/models, GET /v1/models/{id}, GET /health. See docs/SERVER.md.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import logging
import os
import sys
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from . import chat_completions, responses
from .common import ServerConfig, ServerState
from .schemas import APIError, parse_json
from .worker import Engine

log = logging.getLogger("oss_mlx.server")

# A body beyond the limit is still read (and dropped) up to this much, so that the client, still
# sending, reads the 413 instead of a reset connection; past it the connection is simply closed.
DRAIN_LIMIT = 64 * 1024 * 1024


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object: 413 past ``limit`` bytes, 400 if it is not JSON."""
    too_large = APIError(
        413,
        f"The request body is larger than this server accepts ({limit} bytes; see --max-body-bytes).",
        code="request_too_large",
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > DRAIN_LIMIT:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > DRAIN_LIMIT:
            break
    if size > limit:
        raise too_large
    return parse_json(b"".join(chunks))


class APIKeyMiddleware:
    """Bearer (or x-api-key) check in constant time; /health stays open for probes."""

    def __init__(self, app: ASGIApp, key: str | None):
        self.app = app
        self.key = key.encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.key is None or scope["type"] != "http" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"")
        if given[:7].lower() == b"bearer ":
            given = given[7:].strip()
        else:
            given = headers.get(b"x-api-key", b"") or headers.get(b"api-key", b"")
        if not hmac.compare_digest(given, self.key):
            message = (
                "Incorrect API key provided." if given else "Missing API key (Authorization: Bearer KEY)."
            )
            error = APIError(401, message, code="invalid_api_key")
            response = JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(state: ServerState) -> Starlette:
    config = state.config

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": config.model_id, "queue": state.engine.queue_state()})

    def model_card() -> dict:
        return {"id": config.model_id, "object": "model", "created": 0, "owned_by": "openai"}

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request: Request) -> Response:
        name = request.path_params["model"]
        if name.lower() not in config.aliases:
            raise APIError(404, f"The model '{name}' does not exist.", "model", "model_not_found")
        return JSONResponse(model_card())

    async def create_response(request: Request) -> Response:
        body = await read_json(request, config.max_body_bytes)
        return await responses.create(request, body, state)

    async def get_response(request: Request) -> Response:
        rid = request.path_params["rid"]
        if request.method == "DELETE":
            return await responses.delete(rid, state)
        return await responses.retrieve(rid, state)

    async def chat(request: Request) -> Response:
        body = await read_json(request, config.max_body_bytes)
        return await chat_completions.create(request, body, state)

    async def on_api_error(request: Request, exc: Exception) -> Response:
        return error_response(exc)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        code = (
            "not_found"
            if exc.status_code == 404
            else "method_not_allowed"
            if exc.status_code == 405
            else None
        )
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(APIError(exc.status_code, message, code=code))

    async def on_bug(request: Request, exc: Exception) -> Response:
        log.exception("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(
            APIError(
                500,
                f"Internal server error: {type(exc).__name__}",
                code="internal_error",
                type="server_error",
            )
        )

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        Route("/v1/responses", create_response, methods=["POST"]),
        Route("/v1/responses/{rid}", get_response, methods=["GET", "DELETE"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={APIError: on_api_error, HTTPException: on_http_error, Exception: on_bug},
    )
    app.add_middleware(APIKeyMiddleware, key=config.api_key)
    app.state.server = state
    return app


# ---- command line -----------------------------------------------------------------------------------


def model_aliases(model_arg: str, model_id: str, path: Path | None) -> set[str]:
    """Names a request may use for the served model: its id, the --model argument, the folder name,
    'gpt-oss', and for gpt-oss-20b/-120b folders 'gpt-oss-20b', 'openai/gpt-oss-20b', 'gpt-oss:20b'."""
    names = {model_id, model_arg, "gpt-oss", "gpt-oss:latest", "openai/gpt-oss"}
    if path is not None:
        names |= {path.name, str(path), str(path.resolve())}
    for name in list(names):
        base = name.rstrip("/").rsplit("/", 1)[-1].lower()
        for size in ("20b", "120b"):
            if base.startswith(f"gpt-oss-{size}"):
                names |= {f"gpt-oss-{size}", f"openai/gpt-oss-{size}", f"gpt-oss:{size}"}
    return {n.lower() for n in names if n}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="oss-mlx serve",
        description="OpenAI-compatible server for gpt-oss: Responses API and Chat Completions.",
    )
    p.add_argument(
        "--model",
        "-m",
        default=os.environ.get("OSS_MLX_MODEL", "openai/gpt-oss-20b"),
        help="hub repo id or checkpoint folder (default: $OSS_MLX_MODEL, else openai/gpt-oss-20b)",
    )
    p.add_argument("--model-id", help="the id clients see in /v1/models (default: the folder or repo name)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("OSS_MLX_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $OSS_MLX_API_KEY, else no key)",
    )
    p.add_argument(
        "--reasoning-effort",
        choices=["low", "medium", "high"],
        default="medium",
        help="default when a request names none",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=16,
        help="requests that may wait while one generates; more get 429 (default 16)",
    )
    p.add_argument(
        "--max-body-bytes", type=int, default=8 * 1024 * 1024, help="request size limit (413 past it)"
    )
    p.add_argument(
        "--context-limit", type=int, help="prompt + output tokens per request (default: the model's maximum)"
    )
    p.add_argument(
        "--cache-slots",
        type=int,
        default=2,
        help="conversations whose KV caches are kept for prefix reuse (default 2)",
    )
    p.add_argument(
        "--max-stored-responses",
        type=int,
        default=512,
        help="responses kept in memory for previous_response_id (default 512)",
    )
    p.add_argument(
        "--reasoning-field",
        choices=["both", "reasoning_content", "reasoning"],
        default="both",
        help="Chat Completions field(s) that carry the chain of thought (default both)",
    )
    p.add_argument(
        "--ignore-memory", action="store_true", help="load even if the memory planner says it will not fit"
    )
    p.add_argument(
        "--memory-budget",
        metavar="SIZE",
        help="e.g. 6GB: stream experts from the checkpoint, hot ones kept in memory (default: all resident)",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    from ..distributed import cli as distributed

    distributed.add_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not is_loopback(args.host) and not args.api_key:
        log.warning(
            "listening on %s without --api-key: anyone who can reach this port can use the model", args.host
        )
    from ..distributed import cli as distributed

    loader = None
    if distributed.requested(args):  # this process is rank 0 and serves; the others only compute
        from ..distributed.errors import DistributedError

        try:
            loaded = distributed.load(args.model, args)
        except (DistributedError, ValueError, OSError) as e:
            print(f"oss-mlx serve: cannot start the distributed run: {e}", file=sys.stderr)
            return 1
        loader = lambda path: loaded  # noqa: E731 - the engine calls it on its thread
    elif not args.memory_budget and not args.ignore_memory:
        from ..memory import fit_advice

        advice = fit_advice(args.model)
        if advice:  # refuse before loading rather than let the machine swap
            print("oss-mlx serve: " + "\n  ".join(advice), file=sys.stderr)
            print(
                "oss-mlx serve: pass --memory-budget SIZE to keep only hot experts in memory, "
                "or --ignore-memory to load anyway",
                file=sys.stderr,
            )
            return 1
    from . import scripted

    script = scripted.Script.from_env()
    if script is not None:
        log.warning("TEST HOOK %s is set: replies are scripted, not sampled", scripted.ENV)
    engine = Engine(
        args.model,
        max_queue=max(0, args.max_queue),
        cache_slots=args.cache_slots,
        context_limit=args.context_limit,
        script=script,
        loader=loader,
        load_kwargs={"memory_budget": args.memory_budget} if args.memory_budget else None,
    )
    log.info("loading %s", args.model)
    try:
        engine.start()
    except Exception as e:  # a bad path, a bad checkpoint: told in words
        print(f"oss-mlx serve: cannot load {args.model}: {e}", file=sys.stderr)
        return 1
    path = Path(args.model).expanduser()
    path = path if path.exists() else None
    model_id = args.model_id or (path.resolve().name if path is not None else args.model)
    fields = ("reasoning_content", "reasoning") if args.reasoning_field == "both" else (args.reasoning_field,)
    config = ServerConfig(
        model_id=model_id,
        aliases=model_aliases(args.model, model_id, path),
        reasoning_effort=args.reasoning_effort,
        reasoning_fields=fields,
        max_body_bytes=args.max_body_bytes,
        api_key=args.api_key,
        max_stored_responses=args.max_stored_responses,
    )
    state = ServerState(engine, config, responses.ResponseStore(args.max_stored_responses))
    app = create_app(state)

    import uvicorn

    log.info("serving %s on http://%s:%d/v1", model_id, args.host, args.port)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5
        )
    )
    runtime = getattr(engine.model, "runtime", None)
    if runtime is not None:  # a rank or a link is gone: the request in flight gets the error, then we stop

        def stop(reason: str) -> None:
            log.error("distributed run failed: %s; shutting down", reason)
            server.should_exit = True

        runtime.on_failure.append(stop)
    try:
        server.run()
    finally:
        engine.stop()
    return 0
