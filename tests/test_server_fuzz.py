"""Property-based fuzz of `oss-mlx serve`: random bodies, headers, nesting, sizes and content types
against a real server process on loopback (the tiny random checkpoint), and random bytes on raw
sockets. Whatever comes in: no 5xx, no traceback in the server's log, and the server (and the same
connection) keeps answering. Bounded: fixed example counts, a deadline per example, derandomized so
that CI runs the same cases each time (a failure prints the example to reproduce).
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from server_helpers import ServerProcess, running

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

MAX_BODY = 65536
FUZZ = settings(
    max_examples=150,
    deadline=10_000,  # ms: a request that passes validation runs a (short) generation
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

PATHS = [
    "/v1/responses",
    "/v1/responses/input_tokens",
    "/v1/responses/resp_nope",
    "/v1/responses/resp_nope/input_items",
    "/v1/responses/resp_nope/cancel",
    "/v1/chat/completions",
    "/v1/chat/completions/chatcmpl-nope",
    "/v1/chat/completions/chatcmpl-nope/messages",
    "/v1/models",
    "/v1/models/gpt-oss",
    "/v1/models/%2e%2e%2fetc",
    "/health",
    "/v1/responses/",
    "/nothing",
]
FIELDS = [
    "model", "input", "messages", "instructions", "tools", "tool_choice", "text", "response_format",
    "metadata", "user", "stream", "store", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
    "max_output_tokens", "max_tokens", "max_completion_tokens", "reasoning", "reasoning_effort",
    "previous_response_id", "include", "truncation", "logit_bias", "top_logprobs", "logprobs", "n",
    "parallel_tool_calls", "stream_options", "service_tier", "background", "prompt_cache_key",
    "frequency_penalty", "presence_penalty", "modalities", "verbosity",
]  # fmt: skip
CONTENT_TYPES = [
    "application/json",
    "application/json; charset=utf-8",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "",
    "APPLICATION/JSON",
    "application/jsonx",
]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(["auto", "none", "required", "function", "json_schema", "user", "assistant", "gpt-oss"])
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "developer", "tool", "wizard"])},
    optional={
        "content": st.text(max_size=30) | json_values,
        "type": st.sampled_from(["message", "function_call", "function_call_output", "reasoning", "x"]),
        "call_id": st.text(max_size=8),
        "tool_call_id": st.text(max_size=8),
        "name": st.text(max_size=8),
        "arguments": st.text(max_size=12),
        "tool_calls": json_values,
    },
)
tool = st.fixed_dictionaries(
    {"type": st.sampled_from(["function", "web_search", "x"])},
    optional={
        "name": st.sampled_from(["get_weather", "f", "bad name", ""]),
        "function": st.fixed_dictionaries(
            {"name": st.sampled_from(["get_weather", "f"])}, optional={"parameters": json_values}
        ),
        "parameters": json_values,
    },
)  # fmt: skip
plausible = {
    "input": st.text(max_size=40) | st.lists(message, max_size=3),
    "messages": st.lists(message, max_size=3),
    "tools": st.lists(tool, max_size=3),
    "max_output_tokens": st.integers(1, 6),
    "max_tokens": st.integers(1, 6),
    "stream": st.booleans(),
    "metadata": st.dictionaries(st.text(max_size=70), st.text(max_size=600) | json_values, max_size=18),
}


@st.composite
def bodies(draw) -> dict:
    """Random fields (names from both APIs, or any), each a plausible or a random value."""
    keys = draw(st.lists(st.sampled_from(FIELDS) | st.text(max_size=6), max_size=7, unique=True))
    body = {k: draw(plausible[k] if k in plausible and draw(st.booleans()) else json_values) for k in keys}
    # Keep what passes validation short: a tiny model still takes time per token.
    if draw(st.integers(0, 9)):
        body.setdefault("max_output_tokens", draw(st.integers(1, 6)))
        body.setdefault("max_tokens", draw(st.integers(1, 6)))
    return body


WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}}
choices = st.sampled_from(
    [
        "auto",
        "none",
        "required",
        {"type": "function", "name": "get_weather"},
        {"type": "function", "function": {"name": "get_weather"}},
        {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "get_weather"}]},
        {"type": "function", "name": "missing"},
    ]
)
formats = st.sampled_from(
    [
        {"type": "text"},
        {"type": "json_object"},
        {"type": "json_schema", "name": "out", "schema": WEATHER},
        {"type": "json_schema", "json_schema": {"name": "out", "schema": WEATHER}},
        {"type": "json_schema", "name": "bad name", "schema": WEATHER},
    ]
)
common_options = {
    "temperature": st.floats(0, 2.5),
    "top_p": st.floats(0, 1.2),
    "seed": st.integers(-(2**70), 2**70),
    "stream": st.booleans(),
    "store": st.booleans(),
    "metadata": st.dictionaries(st.text(max_size=70), st.text(max_size=600), max_size=18),
    "user": st.text(max_size=80),
    "tool_choice": choices,
    "parallel_tool_calls": st.booleans(),
    "service_tier": st.sampled_from(["auto", "default", "flex", "turbo"]),
    "model": st.sampled_from(["gpt-oss", "gpt-oss-20b", "openai/gpt-oss-20b", "llama", "/etc/passwd"]),
}


@st.composite
def api_requests(draw) -> tuple[str, str, dict]:
    """Mostly well-formed requests of both APIs with random options: what reaches generation."""
    if draw(st.booleans()):
        body = {
            "input": draw(
                st.text(max_size=40)
                | st.lists(
                    st.fixed_dictionaries(
                        {
                            "role": st.sampled_from(["user", "assistant", "system"]),
                            "content": st.text(max_size=30),
                        }
                    ),
                    min_size=1,
                    max_size=3,
                )
            ),
            "max_output_tokens": draw(st.integers(1, 6)),
        }
        extra = {
            **common_options,
            "tools": st.just([{"type": "function", "name": "get_weather", "parameters": WEATHER}]),
            "text": st.fixed_dictionaries(
                {}, optional={"format": formats, "verbosity": st.sampled_from(["low", "medium"])}
            ),
            "reasoning": st.fixed_dictionaries(
                {},
                optional={
                    "effort": st.sampled_from(["low", "high", "max", "extreme"]),
                    "summary": st.sampled_from(["auto", "detailed"]),
                },
            ),
            "truncation": st.sampled_from(["auto", "disabled", "middle"]),
            "include": st.lists(
                st.sampled_from(["reasoning.encrypted_content", "file_search_call.results"]), max_size=2
            ),
            "top_logprobs": st.integers(0, 3),
            "previous_response_id": st.sampled_from(["resp_nope", ""]),
        }
        path = draw(st.sampled_from(["/v1/responses", "/v1/responses", "/v1/responses/input_tokens"]))
    else:
        body = {
            "messages": draw(
                st.lists(
                    st.fixed_dictionaries(
                        {
                            "role": st.sampled_from(["user", "assistant", "system", "developer"]),
                            "content": st.text(max_size=30),
                        }
                    ),
                    min_size=1,
                    max_size=3,
                )
            ),
            "max_tokens": draw(st.integers(1, 6)),
        }
        extra = {
            **common_options,
            "tools": st.just(
                [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
            ),
            "response_format": formats,
            "stop": st.lists(st.text(max_size=4), max_size=5),
            "logit_bias": st.dictionaries(
                st.sampled_from(["0", "1", "200000", "999999", "x"]), st.integers(-150, 150), max_size=3
            ),
            "logprobs": st.booleans(),
            "top_logprobs": st.integers(0, 3),
            "frequency_penalty": st.sampled_from([0, 0.5]),
            "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
            "n": st.integers(1, 2),
        }
        path = "/v1/chat/completions"
    for key in draw(st.lists(st.sampled_from(sorted(extra)), max_size=4, unique=True)):
        body[key] = draw(extra[key])
    return "POST", path, body


def deep(depth: int, kind: str) -> str:
    return ("[" * depth + "]" * depth) if kind == "list" else ('{"a":' * depth + "1" + "}" * depth)


@st.composite
def raw_bodies(draw) -> bytes:
    mode = draw(st.sampled_from(["json", "bytes", "deep", "truncated", "large", "empty"]))
    if mode == "bytes":
        return draw(st.binary(max_size=200))
    if mode == "deep":
        field = draw(st.sampled_from(["metadata", "tools", "tool_choice", "text", "input", "messages"]))
        nested = deep(draw(st.integers(50, 3000)), draw(st.sampled_from(["list", "dict"])))
        return f'{{"input": "x", "messages": [], "{field}": {nested}}}'.encode()
    if mode == "large":
        return json.dumps({"input": "x" * draw(st.integers(MAX_BODY - 100, 2 * MAX_BODY))}).encode()
    if mode == "empty":
        return b""
    text = json.dumps(draw(bodies()))
    return text[: draw(st.integers(0, len(text)))].encode() if mode == "truncated" else text.encode()


def printable(size: int) -> st.SearchStrategy[str]:
    """Header values a client can send (visible ASCII, no surrounding space)."""
    return st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=size).map(str.strip)


odd_headers = st.fixed_dictionaries(
    {"content-type": st.sampled_from(CONTENT_TYPES) | printable(20)},
    optional={
        "origin": st.sampled_from(["http://evil.example", "null", "http://localhost:3000", ""]),
        "host": st.sampled_from(
            ["localhost", "127.0.0.1:1", "[::1]:8000", "attacker.example", "", "LOCALHOST."]
        ),
        "sec-fetch-site": st.sampled_from(["cross-site", "same-site", "none", "same-origin"]),
        "authorization": st.sampled_from(["Bearer x", "Basic Zm9v", "", "bearer"]),
        "accept": st.sampled_from(["*/*", "text/event-stream", "application/json"]),
        "x-junk": printable(30),
    },
)  # fmt: skip
# Most examples must get past the browser and content-type checks to reach the APIs' validation.
headers = (
    st.just({"content-type": "application/json"})
    | st.just({"content-type": "application/json"})
    | odd_headers
)
ROUTES = [
    ("POST", "/v1/responses"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/responses/input_tokens"),
]
routes = st.sampled_from(ROUTES) | st.tuples(
    st.sampled_from(["POST", "GET", "DELETE", "OPTIONS", "PUT", "PATCH"]), st.sampled_from(PATHS)
)


@st.composite
def requests_(draw) -> tuple[str, str, dict, bytes]:
    """(method, path, headers, body): half well-formed API requests, half anything."""
    if draw(st.booleans()):
        method, path, body = draw(api_requests())
        return method, path, {"content-type": "application/json"}, json.dumps(body).encode()
    method, path = draw(routes)
    return method, path, draw(headers), draw(raw_bodies())


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    s = ServerProcess(
        tiny_checkpoint,
        folder / "fuzz.log",
        "--context-limit",
        "192",
        "--max-body-bytes",
        str(MAX_BODY),
        "--max-stored-bytes",
        "2MB",
        env={"OSS_MLX_API_KEY": "", "OSS_MLX_SCRIPTED_REPLIES": ""},
    )
    with running(s):
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def _clean(log: str) -> None:
    for sign in ("Traceback", "internal error", "Exception in ASGI"):
        assert sign not in log, log[-4000:]


def test_fuzz_http_requests(server, http):
    started = time.monotonic()
    answered: list[tuple[int, str, str]] = []

    @FUZZ
    @given(request=requests_())
    def one(request: tuple[str, str, dict, bytes]) -> None:
        method, path, head, body = request
        streamed = b'"stream": true' in body
        response = http.send(http.build_request(method, path, content=body, headers=head), stream=True)
        try:
            text = b"".join(response.iter_bytes()).decode(errors="replace")
        finally:
            response.close()
        answered.append((response.status_code, method, path))
        assert response.status_code < 500, (method, path, body[:300], head, response.status_code, text[:500])
        if response.status_code == 200 and streamed:
            assert "server_error" not in text and "response.failed" not in text, text[-500:]
        # The same client (its pooled connection, where it was kept) still gets answers.
        assert http.get("/health").status_code == 200

    one()
    assert time.monotonic() - started < 60
    # The fuzz reaches the models' work, not only the validation in front of it.
    generated = [a for a in answered if a[0] == 200 and a[2] in ("/v1/responses", "/v1/chat/completions")]
    assert len(generated) >= 20, sorted(set(answered))
    _clean(server.log())


def test_fuzz_raw_bytes_on_a_socket(server):
    host, port = "127.0.0.1", server.port
    post = b"POST /v1/responses HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    prefixes = [
        b"",
        b"GET / HTTP/1.1\r\n",
        post,
        post + b"Content-Length: 300\r\n\r\n",  # the body ends early: the client is gone
        post + b"Transfer-Encoding: chunked\r\n\r\n",
    ]

    @settings(max_examples=60, deadline=5000, derandomize=True, database=None)
    @given(prefix=st.sampled_from(prefixes), data=st.binary(max_size=300))
    def one(prefix: bytes, data: bytes) -> None:
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(prefix + data)
            s.shutdown(socket.SHUT_WR)
            reply = b""
            try:
                while chunk := s.recv(65536):
                    reply += chunk
            except (ConnectionResetError, TimeoutError):
                pass
        status = reply.split(b"\r\n", 1)[0]
        if status.startswith(b"HTTP/1."):
            code = int(status.split()[1])
            assert code < 500, (prefix + data, reply[:300])

    one()
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    _clean(server.log())
