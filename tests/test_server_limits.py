"""`oss-mlx serve` from the outside: what a web page can and cannot make it do (docs/SERVER.md
"Security" states these as guarantees; each test here proves one), connection limits, the store's
byte bound, truncation, and `serve`'s argument checks. Real server processes on 127.0.0.1, raw
sockets and browser-shaped requests (Origin, Sec-Fetch-Site, Host, Content-Type as browsers send
them)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from server_helpers import ServerProcess, free_port, running

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

KEY = "limits-key"
GOOD = "http://good.example"
EVIL = "http://evil.example"
RULES = [{"match": "[greet]", "reply": "<|channel|>final<|message|>Hello!<|return|>"}]


@pytest.fixture(scope="module")
def servers(tiny_checkpoint, tmp_path_factory):
    """`open`: default security settings (no key, no --cors-origin), tight connection limits, a small
    store and context. `cors`: --api-key, one allowed origin, one extra Host name."""
    folder = tmp_path_factory.mktemp("limits")
    rules = folder / "rules.json"
    rules.write_text(json.dumps(RULES))
    env = {"OSS_MLX_SCRIPTED_REPLIES": str(rules), "OSS_MLX_API_KEY": ""}
    open_ = ServerProcess(
        tiny_checkpoint,
        folder / "open.log",
        *("--max-connections", "32", "--header-timeout", "2", "--keep-alive-timeout", "2"),
        *("--body-timeout", "2", "--max-stored-bytes", "200KB", "--context-limit", "2048"),
        env=env,
    )
    cors = ServerProcess(
        tiny_checkpoint,
        folder / "cors.log",
        *("--api-key", KEY, "--cors-origin", GOOD, "--allowed-host", "my.lan"),
        env=env,
    )
    with running(open_, cors):
        yield open_, cors


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def cors(servers):
    return servers[1]


def generations(server: ServerProcess) -> int:
    """How many generations the server has run (one log line each)."""
    return server.log().count("oss_mlx.server: done:") + server.log().count("oss_mlx.server: cancelled:")


class Connection:
    """One keep-alive HTTP/1.1 connection (http.client), to show that a refused request leaves it
    usable: the next request goes over the same socket."""

    def __init__(self, server: ServerProcess):
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        self.conn.connect()
        self.sock = self.conn.sock

    def send(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        self.conn.request(method, path, body=body, headers=headers or {})
        r = self.conn.getresponse()
        data = r.read()
        return r.status, dict((k.lower(), v) for k, v in r.getheaders()), data

    def still_the_same(self) -> bool:
        status, _, _ = self.send("GET", "/health")
        return status == 200 and self.conn.sock is self.sock

    def close(self) -> None:
        self.conn.close()


def error(status: int, body: bytes) -> dict:
    e = json.loads(body)["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"], e
    return e


# ---- what a page on another origin cannot do (default settings) --------------------------------------


def test_a_cross_origin_simple_post_runs_nothing(server):
    """A browser "simple" request (no preflight): text/plain or a form, with the page's Origin."""
    before = generations(server)
    c = Connection(server)
    body = json.dumps({"input": "[greet] hi"}).encode()
    for content_type in (
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ):
        status, headers, data = c.send(
            "POST",
            "/v1/responses",
            body,
            {"Content-Type": content_type, "Origin": EVIL, "Sec-Fetch-Site": "cross-site"},
        )
        assert status == 403 and error(status, data)["code"] == "origin_not_allowed"
        assert "--cors-origin http://evil.example" in error(status, data)["message"]
        assert "access-control-allow-origin" not in headers  # the page cannot even read the refusal
    # A non-browser client sending text/plain (no Origin) gets 415: a body must be declared JSON.
    status, _, data = c.send("POST", "/v1/chat/completions", body, {"Content-Type": "text/plain"})
    assert status == 415 and error(status, data)["code"] == "unsupported_media_type"
    assert (
        "application/json" in error(status, data)["message"]
        and "text/plain" in error(status, data)["message"]
    )
    status, _, data = c.send("POST", "/v1/responses", body, {})  # no Content-Type at all
    assert status == 415
    assert c.still_the_same()
    c.close()
    assert generations(server) == before


def test_a_preflighted_cross_origin_request_is_refused(server):
    c = Connection(server)
    preflight = {
        "Origin": EVIL,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    status, headers, data = c.send("OPTIONS", "/v1/responses", None, preflight)
    assert status == 403 and not any(h.startswith("access-control-") for h in headers)
    for method, path in (
        ("POST", "/v1/responses"),
        ("DELETE", "/v1/responses/resp_x"),
        ("GET", "/v1/models"),
    ):
        body = b'{"input": "[greet] hi"}' if method == "POST" else None
        status, headers, data = c.send(
            method, path, body, {"Origin": EVIL, "Content-Type": "application/json"}
        )
        assert status == 403 and "access-control-allow-origin" not in headers, (method, path)
    for origin in ("null", "file://"):  # sandboxed frames, file:// pages: nothing --cors-origin takes
        status, _, data = c.send("GET", "/health", None, {"Origin": origin})
        assert (
            status == 403 and "--cors-origin null" not in data.decode() and "localhost:PORT" in data.decode()
        )
    assert c.still_the_same()
    c.close()


def test_a_cross_site_get_without_origin_is_refused(server):
    """Image and script tags send no Origin on GET; modern browsers mark them Sec-Fetch-Site."""
    for site in ("cross-site", "same-site"):
        r = httpx.get(f"{server.url}/v1/models", headers={"Sec-Fetch-Site": site})
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    # Typed into the address bar (Sec-Fetch-Site: none) or from a program: answered.
    assert httpx.get(f"{server.url}/v1/models", headers={"Sec-Fetch-Site": "none"}).status_code == 200
    assert httpx.get(f"{server.url}/v1/models").status_code == 200


def test_dns_rebinding_is_refused_by_host(server):
    """A page on attacker.example, its name rebound to 127.0.0.1, sends Host: attacker.example."""
    before = generations(server)
    c = Connection(server)
    for host in (
        "attacker.example",
        f"attacker.example:{server.port}",
        "127.0.0.1.nip.io",
        "",
        "localhost.evil",
        "[::1].evil.com",  # after the bracket only a port may follow
        "[::1]evil",
        "127.0.0.1:80@evil.com",  # a port is digits
        "localhost:http",
    ):
        status, headers, data = c.send("GET", "/v1/models", None, {"Host": host})
        assert status == 403 and error(status, data)["code"] == "host_not_allowed", host
        status, _, _ = c.send(
            "POST",
            "/v1/responses",
            b'{"input": "[greet]"}',
            {"Host": host, "Content-Type": "application/json"},
        )
        assert status == 403
    for host in (
        "localhost",
        f"localhost:{server.port}",
        f"127.0.0.1:{server.port}",
        f"[::1]:{server.port}",
        "LOCALHOST",
    ):
        status, _, _ = c.send("GET", "/health", None, {"Host": host})
        assert status == 200, host
    assert c.still_the_same()
    c.close()
    assert generations(server) == before


def test_no_redirect_echoes_the_host(server):
    """A trailing slash is served as the path without it: no redirect, so no Location built from a
    Host header (which used to be copied into it)."""
    c = Connection(server)
    status, headers, data = c.send("GET", "/v1/models/", None, {"Host": f"localhost:{server.port}"})
    assert status == 200 and "location" not in headers and json.loads(data)["object"] == "list"
    status, headers, _ = c.send("GET", "/v1/models/", None, {"Host": "attacker.example"})
    assert status == 403 and "location" not in headers
    status, headers, data = c.send(
        "POST", "/v1/responses/input_tokens/", b'{"input": "hi"}', {"Content-Type": "application/json"}
    )
    assert status == 200 and json.loads(data)["input_tokens"] > 0
    c.close()


# ---- what a page on an allowed origin can do (--cors-origin), with --api-key -------------------------


def test_an_allowed_origin_gets_cors_and_still_needs_the_key(cors):
    c = Connection(cors)
    preflight = {
        "Origin": GOOD,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
        "Access-Control-Request-Private-Network": "true",
    }
    status, headers, _ = c.send("OPTIONS", "/v1/chat/completions", None, preflight)
    assert status == 200 and headers["access-control-allow-origin"] == GOOD
    assert "authorization" in headers["access-control-allow-headers"].lower()
    assert headers["access-control-allow-private-network"] == "true"
    assert "POST" in headers["access-control-allow-methods"]
    body = json.dumps({"messages": [{"role": "user", "content": "[greet]"}]}).encode()
    page = {"Origin": GOOD, "Content-Type": "application/json", "Sec-Fetch-Site": "cross-site"}
    status, headers, data = c.send("POST", "/v1/chat/completions", body, page)
    assert status == 401 and headers["access-control-allow-origin"] == GOOD  # readable by the page
    status, headers, data = c.send(
        "POST", "/v1/chat/completions", body, {**page, "Authorization": f"Bearer {KEY}"}
    )
    assert status == 200 and headers["access-control-allow-origin"] == GOOD
    assert json.loads(data)["choices"][0]["message"]["content"] == "Hello!"
    # Other origins still get nothing; the extra Host name is accepted, others are not.
    status, headers, _ = c.send(
        "POST", "/v1/chat/completions", body, {**page, "Origin": EVIL, "Authorization": f"Bearer {KEY}"}
    )
    assert status == 403 and "access-control-allow-origin" not in headers
    assert c.send("GET", "/health", None, {"Host": "my.lan:8000"})[0] == 200
    assert c.send("GET", "/health", None, {"Host": "other.lan"})[0] == 403
    assert c.still_the_same()
    c.close()


# ---- connections ------------------------------------------------------------------------------------


def test_stalled_connections_do_not_starve_the_server(server):
    """200 connections that never finish their headers (cap lowered to 32, deadline 2 s): /health
    keeps answering while they pile up, the process never holds more than about the cap, and each
    stalled one is closed (the oldest when the cap is reached, the rest at the deadline)."""
    fds = Path(f"/proc/{server.proc.pid}/fd")
    stalled = []
    try:
        for i in range(200):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: local")  # never finished
            stalled.append(s)
            if i % 50 == 49:
                start = time.monotonic()
                assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
                assert time.monotonic() - start < 2
                if fds.exists():
                    assert len(list(fds.iterdir())) < 32 + 40  # the cap, plus the process's own files
        # A slow client sending a byte now and then is not kept open past the deadline either.
        slow = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        start = time.monotonic()
        closed_at = None
        for b in b"GET /health HTTP/1.1\r\nHost: localhost\r\n":
            try:
                slow.sendall(bytes([b]))
            except OSError:
                closed_at = time.monotonic()
                break
            time.sleep(0.25)
        if closed_at is None:
            slow.settimeout(5)
            assert slow.recv(100) == b""
            closed_at = time.monotonic()
        assert closed_at - start < 4
        slow.close()
        # Every stalled connection is closed by the server within the deadline (and some slack).
        deadline = time.monotonic() + 6
        for s in stalled:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                assert s.recv(100) == b""
            except ConnectionResetError:
                pass
    finally:
        for s in stalled:
            s.close()
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    assert "Traceback" not in server.log()


def test_a_burst_past_the_cap_is_answered_not_reset(server):
    """60 clients connect at once (cap 32), then send their requests: none is closed to make room
    while its request may still sit unread (it would see a reset); each gets an HTTP answer, 200 or
    429 with Retry-After."""
    clients = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(60)]
    try:
        time.sleep(0.3)  # the server has taken every connection in
        answers = []
        for s in clients:
            try:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            except OSError:
                pass  # refused already: its 429 is waiting to be read
            answers.append(_read_all(s))
    finally:
        for s in clients:
            s.close()
    heads = [a.split(b"\r\n", 1)[0] for a in answers]
    assert all(h in (b"HTTP/1.1 200 OK", b"HTTP/1.1 429 Too Many Requests") for h in heads), heads
    assert heads.count(b"HTTP/1.1 200 OK") >= 30
    assert all(b"retry-after: 1" in a for a, h in zip(answers, heads) if h.endswith(b"Requests"))


def _read_all(s: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except OSError:
        pass
    return data


def test_bodies_that_never_arrive_do_not_lock_clients_out(server):
    """The cap's places held by requests whose bodies trickle (complete headers, Content-Length 100,
    one byte sent): a new client closes the oldest of them, never a 429 while they stall."""
    stalled = []
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    try:
        for _ in range(40):  # past the cap (32)
            s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            s.sendall(head + b"Content-Length: 100\r\n\r\n{")
            stalled.append(s)
        time.sleep(0.3)
        for _ in range(5):
            start = time.monotonic()
            r = httpx.get(f"{server.url}/health", timeout=5)
            assert r.status_code == 200 and time.monotonic() - start < 2, r.text
    finally:
        for s in stalled:
            s.close()
    assert "Traceback" not in server.log()


def test_idle_keep_alive_connection_is_closed(server):
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    start, data = time.monotonic(), b""
    while chunk := s.recv(4096):  # the answer, then the end: closed after --keep-alive-timeout 2
        data += chunk
    s.close()
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"}")
    assert 1 < time.monotonic() - start < 4


def test_a_body_that_never_arrives_is_408(server):
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    s.sendall(
        b"POST /v1/responses HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"input": '
    )
    reply = b""
    while chunk := s.recv(4096):
        reply += chunk
    s.close()
    assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply and b"--body-timeout" in reply
    assert httpx.get(f"{server.url}/health").status_code == 200


# ---- the store, by bytes ----------------------------------------------------------------------------


def test_the_store_is_bounded_by_bytes(server):
    """--max-stored-bytes 200KB. (Runs of spaces are ~128 characters a token: large, yet within the
    2048-token context.)"""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=30)
    first = client.responses.create(input="[greet] first", max_output_tokens=4)
    assert client.responses.retrieve(first.id).id == first.id
    # A response larger than the whole budget is answered but not kept, and pushes nothing out.
    huge = client.responses.create(input="[greet]" + " " * 230_000, max_output_tokens=1)
    assert huge.status in ("completed", "incomplete")
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(huge.id)
    assert client.responses.retrieve(first.id).id == first.id
    assert "not stored" in server.log()
    # Responses of ~60 KB each: the least recently used go, the newest stay.
    ids = [client.responses.create(input="[greet]" + " " * 30_000, max_output_tokens=1).id for _ in range(5)]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(ids[0])
    assert client.responses.retrieve(ids[-1]).id == ids[-1]


def test_truncation_auto_drops_the_oldest_turns(server):
    """--context-limit 2048: a long conversation is refused with truncation disabled (the default)
    and fits with truncation: auto, which drops whole turns from the start."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=30)
    turns = []
    for i in range(12):
        turns += [
            {"role": "user", "content": f"turn {i} " + "words " * 200},
            {"role": "assistant", "content": f"answer {i}"},
        ]
    turns.append({"role": "user", "content": "[greet] last"})
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(input=turns, max_output_tokens=8)
    assert e.value.body["code"] == "context_length_exceeded"
    r = client.responses.create(input=turns, max_output_tokens=8, truncation="auto")
    assert r.truncation == "auto" and r.output_text == "Hello!"
    assert 1000 < r.usage.input_tokens <= 2048 - 512  # room kept for a reply: a quarter of the context
    counted = client.responses.input_tokens.count(input=turns, truncation="auto")
    assert counted.input_tokens == r.usage.input_tokens
    full = client.responses.input_tokens.count(input=turns)
    assert full.input_tokens > 2048  # counting does not refuse: it says how long it is


# ---- `serve` argument checks: before loading anything ------------------------------------------------


def serve(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    env = {**os.environ, "OSS_MLX_API_KEY": ""}
    cmd = [sys.executable, "-m", "oss_mlx.cli", "serve", "--model", "/nonexistent/model", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.parametrize(
    "args, says",
    [
        (("--port", "99999"), "argument --port: must be between 1 and 65,535 (got 99999)"),
        (("--port", "-1"), "argument --port: must be between 1 and 65,535 (got -1)"),
        (("--port", "0"), "argument --port: must be between 1 and 65,535 (got 0)"),
        (("--port", "http"), "argument --port: must be a whole number"),
        (("--max-queue", "-1"), "argument --max-queue: must be between 0 and 100,000"),
        (("--context-limit", "0"), "argument --context-limit: must be between 1 and"),
        (("--cache-slots", "0"), "argument --cache-slots: must be between 1 and 1024"),
        (("--max-body-bytes", "10"), "argument --max-body-bytes: must be between 1024 and"),
        (("--max-connections", "0"), "argument --max-connections: must be between 1 and"),
        (("--header-timeout", "0"), "argument --header-timeout: must be greater than 0"),
        (("--body-timeout", "nan"), "argument --body-timeout: must be a finite number greater than 0"),
        (("--max-stored-bytes", "banana"), "argument --max-stored-bytes: expected a size like"),
        (("--memory-budget=-6GB",), "argument --memory-budget: expected a size like"),
        (("--cors-origin", "http://x.example/path"), "argument --cors-origin: expected '*' or an origin"),
        (("--host", "256.1.1.1"), "cannot listen on 256.1.1.1"),
    ],
)
def test_bad_serve_arguments_fail_at_once(args, says):
    start = time.monotonic()
    out = serve(*args)
    assert out.returncode == 2, out.stderr
    assert says in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "terminate called" not in out.stderr
    assert "cannot load" not in out.stderr  # refused before any loading
    assert time.monotonic() - start < 20


def test_a_port_in_use_fails_at_once():
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        out = serve("--port", str(port))
    assert out.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in out.stderr
    assert "Traceback" not in out.stderr and "cannot load" not in out.stderr


def test_the_port_is_bound_before_the_model_loads(tiny_checkpoint, tmp_path):
    """The socket exists while the model loads: a client connecting then is answered once it is up
    (not refused), and a port in use is never discovered after a long load."""
    port = free_port()
    env = {**os.environ, "OSS_MLX_API_KEY": "", "OSS_MLX_SCRIPTED_REPLIES": ""}
    cmd = [sys.executable, "-m", "oss_mlx.cli", "serve", "--model", str(tiny_checkpoint), "--port", str(port)]
    log = open(tmp_path / "log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
        loaded = "serving" in (tmp_path / "log").read_text()
        s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        s.settimeout(60)
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        s.close()
        assert not loaded, "the port only opened once the model was loaded"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_access_policies_in_process():
    """The combinations the servers above do not run: an allowed origin without --api-key, `*`,
    and binding beyond loopback (the same app and middleware, driven in process)."""
    from starlette.testclient import TestClient

    from oss_mlx.server.app import create_app
    from oss_mlx.server.common import ServerConfig, ServerState
    from oss_mlx.server.security import AccessPolicy

    class NoEngine:
        def queue_state(self) -> dict:
            return {"running": 0, "prefilling": 0, "waiting": 0, "max_running": 1, "max_waiting": 0}

    def client(policy: AccessPolicy) -> TestClient:
        app = create_app(ServerState(NoEngine(), ServerConfig("m", aliases={"m"})), policy)
        return TestClient(app, base_url="http://localhost")

    c = client(AccessPolicy.for_bind("127.0.0.1", [], [GOOD]))
    r = c.get("/v1/models", headers={"Origin": GOOD, "Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == GOOD  # no key needed
    assert c.get("/v1/models", headers={"Origin": EVIL}).status_code == 403
    assert c.get("/v1/models", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403

    c = client(AccessPolicy.for_bind("127.0.0.1", [], ["*"]))
    r = c.get("/v1/models", headers={"Origin": EVIL})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    assert c.get("/v1/models", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200
    assert c.get("/v1/models", headers={"Host": "attacker.example"}).status_code == 403  # Host still checked

    c = client(AccessPolicy.for_bind("0.0.0.0", [], []))
    assert c.get("/health", headers={"Host": "my-mac.local:8000"}).status_code == 200
    assert c.get("/health", headers={"Origin": EVIL}).status_code == 403
    c = client(AccessPolicy.for_bind("0.0.0.0", ["my-mac.local"], []))
    assert c.get("/health", headers={"Host": "my-mac.local:8000"}).status_code == 200
    assert c.get("/health", headers={"Host": "0.0.0.0:8000"}).status_code == 200
    assert c.get("/health", headers={"Host": "other.local"}).status_code == 403
    c = client(AccessPolicy.for_bind("127.0.0.1", ["*"], []))
    assert c.get("/health", headers={"Host": "anything.example"}).status_code == 200


def test_the_store_unit():
    from oss_mlx.server.store import ObjectStore, page

    store = ObjectStore(max_items=3, max_bytes=100)
    assert store.put("a", 1, 40) and store.put("b", 2, 40)
    assert store.get("a") == 1  # a is now the most recently used
    assert store.put("c", 3, 40)  # 120 > 100: b (least recently used) goes
    assert store.get("b") is None and store.get("a") == 1 and store.bytes == 80
    assert not store.put("big", 4, 101) and store.get("a") == 1 and store.get("c") == 3
    store.resize("a", 10)
    assert store.bytes == 50 and store.delete("a") and store.bytes == 40
    items = [{"id": str(i)} for i in range(5)]
    assert page(items, None, 2, "asc") == {
        "object": "list",
        "data": items[:2],
        "first_id": "0",
        "last_id": "1",
        "has_more": True,
    }
    assert page(items, "3", 2, "asc")["data"] == items[4:] and not page(items, "3", 2, "asc")["has_more"]
    assert [i["id"] for i in page(items, "3", 5, "desc")["data"]] == ["2", "1", "0"]
