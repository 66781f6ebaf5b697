"""`oss-mlx serve`: an OpenAI-compatible server (Responses API and Chat Completions) on Starlette.

    oss-mlx serve --model openai/gpt-oss-20b [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Routes: POST /v1/responses, GET|DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items,
POST /v1/responses/{id}/cancel, POST /v1/responses/input_tokens; POST|GET /v1/chat/completions,
GET|POST|DELETE /v1/chat/completions/{id}, GET /v1/chat/completions/{id}/messages; GET /v1/models,
GET /v1/models/{id}, GET /health. See docs/SERVER.md.
"""

from __future__ import annotations

import argparse
import errno
import hmac
import logging
import os
import socket
import sys
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from . import chat_completions, responses
from .common import ServerConfig, ServerState
from .schemas import APIError, parse_json
from .security import AccessPolicy, BrowserGuard, JSONBodyGuard, check_origin_value, is_loopback
from .store import ObjectStore
from .worker import Engine

log = logging.getLogger("oss_mlx.server")

# A body beyond the limit is still read (and dropped) up to this much, so that the client, still
# sending, reads the 413 instead of a reset connection; past it the connection is simply closed.
DRAIN_LIMIT = 64 * 1024 * 1024


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def read_json(request: Request, limit: int, timeout: float = 60.0) -> dict:
    """The body as a JSON object: 413 past ``limit`` bytes, 408 if it takes over ``timeout``
    seconds to arrive, 400 if it is not JSON (or nests too deep: schemas.parse_json)."""
    too_large = APIError(
        413,
        f"The request body is larger than this server accepts ({limit} bytes; see --max-body-bytes).",
        code="request_too_large",
    )
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > DRAIN_LIMIT:
        raise too_large
    chunks, size = [], 0
    with anyio.move_on_after(timeout) as scope:
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif size > DRAIN_LIMIT:
                break
    if scope.cancelled_caught:  # the rest of the body would follow: the connection must close
        raise APIError(
            408,
            f"The request body did not arrive within {timeout:g} seconds (see --body-timeout).",
            code="request_timeout",
            headers={"Connection": "close"},
        )
    if size > limit:
        raise too_large
    return parse_json(b"".join(chunks))


class APIKeyMiddleware:
    """Bearer (or x-api-key) check in constant time; /health stays open for probes."""

    def __init__(self, app: ASGIApp, key: str | None):
        self.app = app
        self.key = key.encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.key is None
            or scope["type"] != "http"
            or scope["path"] == "/health"
            or scope["method"] == "OPTIONS"  # CORS preflights carry no credentials
        ):
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


def create_app(
    state: ServerState, policy: AccessPolicy | None = None, body_timeout: float = 60.0
) -> Starlette:
    config = state.config
    policy = policy or AccessPolicy.for_bind("127.0.0.1", (), ())

    async def body(request: Request) -> dict:
        return await read_json(request, config.max_body_bytes, body_timeout)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": config.model_id, "queue": state.engine.queue_state()})

    def model_card() -> dict:
        return {"id": config.model_id, "object": "model", "created": 0, "owned_by": "openai"}

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request: Request) -> Response:
        name = request.path_params["model"]
        if name.lower() not in config.aliases:
            raise APIError(404, f"The model {name[:80]!r} does not exist.", "model", "model_not_found")
        return JSONResponse(model_card())

    async def create_response(request: Request) -> Response:
        return await responses.create(request, await body(request), state)

    async def count_tokens(request: Request) -> Response:
        return await responses.count_input_tokens(await body(request), state)

    async def one_response(request: Request) -> Response:
        rid = request.path_params["rid"]
        if request.method == "DELETE":
            return await responses.delete(rid, state)
        return await responses.retrieve(rid, state)

    async def input_items(request: Request) -> Response:
        return await responses.input_items(request, request.path_params["rid"], state)

    async def cancel(request: Request) -> Response:
        return await responses.cancel(request.path_params["rid"], state)

    async def chat(request: Request) -> Response:
        if request.method == "GET":
            return await chat_completions.list_completions(request, state)
        return await chat_completions.create(request, await body(request), state)

    async def one_completion(request: Request) -> Response:
        cid = request.path_params["cid"]
        if request.method == "DELETE":
            return await chat_completions.delete(cid, state)
        if request.method == "POST":
            return await chat_completions.update(cid, await body(request), state)
        return await chat_completions.retrieve(cid, state)

    async def completion_messages(request: Request) -> Response:
        return await chat_completions.list_messages(request, request.path_params["cid"], state)

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
        message = f"{request.method} {request.url.path[:200]}: {exc.detail}"
        return error_response(APIError(exc.status_code, message, code=code, headers=exc.headers))

    async def on_disconnect(request: Request, exc: Exception) -> Response:
        # The client left while its body was being read: nobody reads an answer, nothing to log.
        log.debug("client disconnected during %s %s", request.method, request.url.path[:200])
        return Response(status_code=400)

    async def on_bug(request: Request, exc: Exception) -> Response:
        log.exception("internal error on %s %s", request.method, request.url.path[:200], exc_info=exc)
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
        Route("/v1/responses/input_tokens", count_tokens, methods=["POST"]),
        Route("/v1/responses/{rid}", one_response, methods=["GET", "DELETE"]),
        Route("/v1/responses/{rid}/input_items", input_items, methods=["GET"]),
        Route("/v1/responses/{rid}/cancel", cancel, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["GET", "POST"]),
        Route("/v1/chat/completions/{cid}", one_completion, methods=["GET", "POST", "DELETE"]),
        Route("/v1/chat/completions/{cid}/messages", completion_messages, methods=["GET"]),
    ]
    middleware = [Middleware(BrowserGuard, policy=policy)]
    if policy.origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=sorted(policy.origins),
                allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
                allow_headers=["*"],
                allow_private_network=True,  # a public page calling a loopback server: Chrome asks
                expose_headers=["Retry-After"],
                max_age=600,
            )
        )
    middleware += [Middleware(JSONBodyGuard), Middleware(APIKeyMiddleware, key=config.api_key)]
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={
            APIError: on_api_error,
            HTTPException: on_http_error,
            ClientDisconnect: on_disconnect,
            Exception: on_bug,
        },
    )
    app.router.redirect_slashes = False  # a redirect would be built from the Host header
    app.state.server = state
    return app


# ---- command line -----------------------------------------------------------------------------------

# openai/gpt-oss-20b and -120b by shape (layers, experts): a folder of either, whatever its name,
# answers to the hub id and the local spellings of its size.
SIZES = {(24, 32): "20b", (36, 128): "120b"}


def model_aliases(
    model_arg: str, model_id: str, path: Path | None, shape: tuple[int, int] | None = None
) -> set[str]:
    """Names a request may use for the served model: its id, 'gpt-oss' (also 'gpt-oss:latest',
    'openai/gpt-oss'), a hub id given as --model, a folder's name (never its path: clients must not
    be able to probe the file system), and for gpt-oss-20b / -120b 'gpt-oss-20b', 'openai/gpt-oss-20b',
    'gpt-oss:20b' (the size told by the shape, or by the name)."""
    names = {model_id, "gpt-oss", "gpt-oss:latest", "openai/gpt-oss"}
    names.add(path.resolve().name if path is not None else model_arg)
    sizes = {SIZES[shape]} if shape in SIZES else set()
    for name in list(names):
        base = name.rstrip("/").rsplit("/", 1)[-1].lower()
        sizes |= {size for size in ("20b", "120b") if base.startswith(f"gpt-oss-{size}")}
    for size in sizes:
        names |= {f"gpt-oss-{size}", f"openai/gpt-oss-{size}", f"gpt-oss:{size}"}
    return {n.lower() for n in names if n}


# ---- argument checks (small and local: a shared CLI validation layer may take them over) --------------


def _origin(text: str) -> str:
    try:
        return check_origin_value(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    from .. import cli_args as A

    p = A.parser("oss-mlx serve", "OpenAI-compatible server for gpt-oss: Responses API and Chat Completions.")
    p.add_argument(
        "--model",
        "-m",
        default=os.environ.get("OSS_MLX_MODEL", "openai/gpt-oss-20b"),
        help="hub repo id or checkpoint folder (default: $OSS_MLX_MODEL, else openai/gpt-oss-20b)",
    )
    p.add_argument(
        "--model-id",
        type=A.non_empty("--model-id"),
        help="the id clients see in /v1/models (default: the folder or repo name)",
    )
    p.add_argument(
        "--host",
        type=A.non_empty("--host"),  # an empty one binds every interface
        default="127.0.0.1",
        help="bind address (default 127.0.0.1: this machine only)",
    )
    p.add_argument("--port", type=A.Number(int, 1, 65535), default=8000, help="TCP port")
    p.add_argument(
        "--api-key",
        type=A.non_empty("--api-key"),  # an empty key would silently mean "no key"
        default=os.environ.get("OSS_MLX_API_KEY") or None,
        help="require 'Authorization: Bearer KEY' (default: $OSS_MLX_API_KEY, else no key)",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        type=_origin,
        default=[],
        metavar="ORIGIN",
        help="a web page origin (http://localhost:3000) allowed to call the server from a browser; "
        "repeatable; '*' allows every origin (default: none; requests from web pages are refused)",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        type=A.non_empty("--allowed-host"),
        default=[],
        metavar="NAME",
        help="a Host name to accept besides localhost, 127.0.0.1 and [::1] (repeatable; '*': any). "
        "(default: none; bound to a non-loopback address, any Host is then accepted)",
    )
    p.add_argument(
        "--reasoning-effort",
        choices=["low", "medium", "high"],
        default="medium",
        help="used when a request names none",
    )
    p.add_argument(
        "--max-concurrency",
        type=A.CONCURRENCY,
        default=8,
        metavar="N",
        help="requests that generate at once, decoded together (a new one starts while others "
        "decode); each needs its KV cache in memory, and a request waits until it fits",
    )
    p.add_argument(
        "--max-queue",
        type=A.Number(int, 0, 100_000),
        default=16,
        help="requests that may wait while --max-concurrency generate; more get 429",
    )
    p.add_argument(
        "--prefill-chunk",
        type=A.PREFILL_CHUNK,
        metavar="TOKENS",
        help="prompt tokens processed between two decode steps of the running requests: smaller "
        "keeps their tokens flowing during a long prompt, larger prefills faster (default: 2048, "
        "512 where memory is tight)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=A.Number(int, 1024, 2**31),
        default=8 * 1024 * 1024,
        help="request size limit in bytes (413 past it)",
    )
    p.add_argument(
        "--context-limit",
        type=A.CONTEXT,
        help="prompt + output tokens per request (default: the model's maximum)",
    )
    p.add_argument(
        "--cache-slots",
        type=A.Number(int, 1, 1024),
        default=2,
        help="conversations whose KV caches are kept for prefix reuse",
    )
    p.add_argument(
        "--max-stored-responses",
        type=A.Number(int, 0, 10**6),
        default=512,
        help="stored responses and chat completions kept in memory",
    )
    p.add_argument(
        "--max-stored-bytes",
        type=A.size_bytes,
        default="256MB",
        metavar="SIZE",
        help="their total size as JSON; the least recently used go first",
    )
    p.add_argument(
        "--max-connections",
        type=A.Number(int, 1, 100_000),
        default=64,
        help="open connections; past it the one waiting longest for request headers is closed",
    )
    p.add_argument(
        "--header-timeout",
        type=A.Number(float, 0.0, 86400.0, low_open=True),
        default=10.0,
        metavar="SECONDS",
        help="a connection must send a request's headers within this long after opening or after a "
        "response, or it is closed",
    )
    p.add_argument(
        "--keep-alive-timeout",
        type=A.Number(float, 0.0, 86400.0, low_open=True),
        default=5.0,
        metavar="SECONDS",
        help="an idle connection between requests is closed after this long",
    )
    p.add_argument(
        "--body-timeout",
        type=A.Number(float, 0.0, 86400.0, low_open=True),
        default=60.0,
        metavar="SECONDS",
        help="a request's body must arrive within this long, 408 otherwise",
    )
    p.add_argument(
        "--reasoning-field",
        choices=["both", "reasoning_content", "reasoning"],
        default="both",
        help="Chat Completions field(s) that carry the chain of thought",
    )
    p.add_argument(
        "--ignore-memory", action="store_true", help="load even if the memory planner says it will not fit"
    )
    p.add_argument(
        "--memory-budget",
        metavar="SIZE",
        type=A.size,
        help="e.g. 6GB: stream experts from the checkpoint, hot ones kept in memory (default: all resident)",
    )
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter folder (oss-mlx finetune's or PEFT's)")
    p.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="what the server logs",
    )
    from ..distributed import cli as distributed

    distributed.add_arguments(p)
    return p  # a string default goes through its type when parsed: 256MB -> bytes


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, made before the model loads so that a port in use or a bad
    address is reported at once. OSError with a readable message otherwise."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        raise OSError(f"cannot make a socket for {host}: {e.strerror}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            reason = "the port is in use (another server?); pick another --port"
        elif e.errno == errno.EACCES:
            reason = "permission denied (ports below 1024 need privileges); pick another --port"
        elif isinstance(e, socket.gaierror) or e.errno == errno.EADDRNOTAVAIL:
            reason = f"{host!r} is not an address of this machine (--host)"
        else:
            reason = e.strerror or str(e)
        raise OSError(f"cannot listen on {host}:{port}: {reason}") from None
    sock.set_inheritable(True)
    return sock


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from ..distributed import cli as distributed

    if distributed.is_worker():  # a compute rank under mlx.launch: no port, no HTTP (never returns)
        distributed.load(args.model, args)
    try:
        sock = listen(args.host, args.port)
    except OSError as e:
        print(f"oss-mlx serve: {e}", file=sys.stderr)
        return 2
    try:
        return _serve(args, sock)
    finally:
        sock.close()


def _serve(args: argparse.Namespace, sock: socket.socket) -> int:
    if not is_loopback(args.host) and not args.api_key:
        log.warning(
            "listening on %s without --api-key: anyone who can reach this port can use the model", args.host
        )
    from ..distributed import cli as distributed

    loader = None
    if distributed.requested(args):  # this process is rank 0 and serves; the others only compute
        loaded = distributed.load(args.model, args)
        loader = lambda path: loaded  # noqa: E731 - the engine calls it on its thread
    elif not args.memory_budget and not args.ignore_memory:
        from ..plan_cli import refuse_unless_fits

        if refuse_unless_fits("oss-mlx serve", args.model):
            return 1
    from ..testing import scripted
    from .connections import GuardedH11Protocol

    script = scripted.Script.from_env()
    if script is not None:
        log.warning("TEST HOOK %s is set: replies are scripted, not sampled", scripted.ENV)
    engine = Engine(
        args.model,
        max_queue=args.max_queue,
        max_concurrency=args.max_concurrency,
        prefill_chunk=args.prefill_chunk,
        cache_slots=args.cache_slots,
        context_limit=args.context_limit,
        script=script,
        loader=loader,
        load_kwargs={k: v for k, v in (("memory_budget", args.memory_budget), ("adapter", args.adapter)) if v}
        or None,
    )
    log.info("loading %s", args.model)
    try:
        engine.start()
    except Exception as e:  # a bad path, a bad checkpoint: told in words (a bug: named as one)
        from ..cli_args import report

        return report("oss-mlx serve", e, doing=f"cannot load {args.model}")
    path = Path(args.model).expanduser()
    path = path if path.exists() else None
    model_id = args.model_id or (path.resolve().name if path is not None else args.model)
    cfg = getattr(engine.model, "config", None)
    shape = (getattr(cfg, "num_layers", None), getattr(cfg, "num_experts", None))
    fields = ("reasoning_content", "reasoning") if args.reasoning_field == "both" else (args.reasoning_field,)
    config = ServerConfig(
        model_id=model_id,
        aliases=model_aliases(args.model, model_id, path, shape),
        reasoning_effort=args.reasoning_effort,
        reasoning_fields=fields,
        max_body_bytes=args.max_body_bytes,
        api_key=args.api_key,
    )
    state = ServerState(engine, config, ObjectStore(args.max_stored_responses, args.max_stored_bytes))
    policy = AccessPolicy.for_bind(args.host, args.allowed_host, args.cors_origin)
    app = create_app(state, policy, body_timeout=args.body_timeout)

    import uvicorn

    log.info("serving %s on http://%s:%d/v1", model_id, args.host, args.port)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=5,
            http=GuardedH11Protocol.configured(args.header_timeout, args.max_connections),
            ws="none",
            timeout_keep_alive=args.keep_alive_timeout,
            h11_max_incomplete_event_size=16 * 1024,  # request line + headers (h11's default)
        )
    )
    from ..runtime import runtime_of

    group = runtime_of(engine.model).distributed
    if group is not None:  # a rank or a link is gone: the request in flight gets the error, then we stop

        def stop(reason: str) -> None:
            log.error("distributed run failed: %s; shutting down", reason)
            server.should_exit = True

        group.on_failure.append(stop)
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
    return 0
