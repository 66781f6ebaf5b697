"""`oss-mlx serve` decoding several requests together (continuous batching), in real subprocesses on
127.0.0.1, driven by the official `openai` client: concurrent streams give what each gives alone,
a new request starts while others decode, a client that leaves frees its place at once, and a full
queue still answers 429 with Retry-After."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import openai
import pytest
from server_helpers import InProcessServer, ServerProcess, running

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

GREETING = "Hello there! How can I help?"
RULES = [
    {"match": "[greet]", "reply": f"<|channel|>final<|message|>{GREETING}<|return|>"},
]
# Eight requests, different lengths and both APIs; greedy, so each reply is fixed by its prompt.
REQUESTS = [
    ("chat" if i % 2 == 0 else "responses", f"Question number {i}: {'tell me more ' * i}?", 6 + 5 * i)
    for i in range(8)
]


@pytest.fixture(scope="module")
def servers(tiny_checkpoint, tmp_path_factory):
    """One server decoding up to 8 requests together, one with room for 2 (and 1 waiting; 4 cached
    conversations, so that the requests filling it need not take an idle one's cache)."""
    folder = tmp_path_factory.mktemp("batching")
    rules = folder / "rules.json"
    rules.write_text(json.dumps(RULES))
    env = {"OSS_MLX_SCRIPTED_REPLIES": str(rules), "OSS_MLX_API_KEY": ""}
    wide = ServerProcess(
        tiny_checkpoint, folder / "wide.log", "--max-concurrency", "8", "--prefill-chunk", "128", env=env
    )
    narrow = ServerProcess(
        tiny_checkpoint,
        folder / "narrow.log",
        "--max-concurrency",
        "2",
        "--max-queue",
        "1",
        "--prefill-chunk",
        "64",
        "--cache-slots",
        "4",
        env=env,
    )
    with running(wide, narrow):
        yield wide, narrow


def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


def streamed(server: ServerProcess, api: str, prompt: str, max_tokens: int) -> dict:
    """One streamed request: its event kinds in order, its text and reasoning, its token count."""
    c = client(server)
    kinds, text, reasoning = [], "", ""
    if api == "chat":
        stream = c.chat.completions.create(
            model="gpt-oss",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        tokens = None
        for chunk in stream:
            if chunk.usage is not None:
                kinds.append("usage")
                tokens = chunk.usage.completion_tokens
                continue
            choice = chunk.choices[0]
            delta = choice.delta
            if delta.role:
                kinds.append("role")
            if delta.content:
                text += delta.content
                kinds.append("content")
            extra = getattr(delta, "reasoning_content", None) or (delta.model_extra or {}).get(
                "reasoning_content"
            )
            if extra:
                reasoning += extra
                kinds.append("reasoning")
            if choice.finish_reason:
                kinds.append(f"finish:{choice.finish_reason}")
    else:
        stream = c.responses.create(
            model="gpt-oss", input=prompt, max_output_tokens=max_tokens, temperature=0, stream=True
        )
        tokens = None
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                text += event.delta
            elif event.type == "response.reasoning_text.delta":
                reasoning += event.delta
            elif event.type in ("response.completed", "response.incomplete"):
                tokens = event.response.usage.output_tokens
    return {"kinds": kinds, "text": text, "reasoning": reasoning, "tokens": tokens}


def _well_formed(api: str, kinds: list[str]) -> bool:
    if api == "chat":
        finish = [k for k in kinds if k.startswith("finish:")]
        return (
            kinds[0] == "role"
            and len(finish) == 1
            and kinds[-2].startswith("finish:")
            and kinds[-1] == "usage"
        )
    ends = [k for k in kinds if k in ("response.completed", "response.incomplete")]
    return (
        kinds[:2] == ["response.created", "response.in_progress"] and len(ends) == 1 and kinds[-1] == ends[0]
    )


def test_eight_concurrent_streams_equal_each_alone(servers):
    """Eight streamed clients (both APIs, 6 to 41 tokens) at once: every stream is well formed and
    gives the text, reasoning and token count its request gives alone; the server decoded them
    together (its log says how many at most)."""
    wide, _ = servers
    alone = [streamed(wide, *r) for r in REQUESTS]
    together: dict[int, dict] = {}
    errors: list[BaseException] = []
    gate = threading.Barrier(len(REQUESTS))

    def ask(i: int) -> None:
        try:
            gate.wait(30)
            together[i] = streamed(wide, *REQUESTS[i])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(REQUESTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    for i, (api, _, max_tokens) in enumerate(REQUESTS):
        got, want = together[i], alone[i]
        assert _well_formed(api, got["kinds"]), (i, got["kinds"])
        assert 1 <= got["tokens"] <= max_tokens
        assert (got["text"], got["reasoning"], got["tokens"]) == (
            want["text"],
            want["reasoning"],
            want["tokens"],
        ), i
    sizes = [int(n) for n in re.findall(r"decoded in a batch of up to (\d+)", wide.log())]
    assert max(sizes) >= 4, sizes


def test_a_new_request_does_not_wait_for_the_others(servers):
    """While three long replies decode, a short request is answered: it ends before they do."""
    wide, _ = servers
    c = client(wide)
    streams = [
        c.chat.completions.create(
            model="gpt-oss",
            messages=[{"role": "user", "content": f"Long answer {i}"}],
            max_tokens=3000,
            temperature=1.0,
            stream=True,
        )
        for i in range(3)
    ]
    try:
        for s in streams:  # each is decoding
            next(iter(s))
            next(iter(s))
        start = time.monotonic()
        r = c.chat.completions.create(model="gpt-oss", messages=[{"role": "user", "content": "[greet]"}])
        took = time.monotonic() - start
        assert r.choices[0].message.content == GREETING
        health = httpx.get(f"{wide.url}/health").json()["queue"]
        assert health["running"] == 3, health  # the long ones are still going
        assert took < 20
    finally:
        for s in streams:
            s.close()


class _Decoding:
    """A streamed reply being read (its client kept: a dropped client closes the connection)."""

    def __init__(self, h: httpx.Client, response: httpx.Response, lines):
        self.h, self.response, self.lines = h, response, lines  # a dropped iterator closes the stream

    def close(self) -> None:  # the client disconnects
        self.response.close()
        self.h.close()


def _long_decode(server: ServerProcess, instructions: str | None = None) -> _Decoding:
    system = [{"role": "system", "content": instructions}] if instructions else []
    body = {
        "model": "gpt-oss",
        "messages": [*system, {"role": "user", "content": "Write for a long time"}],
        "max_tokens": 5000,
        "temperature": 1.0,
        "stream": True,
    }
    h = httpx.Client(base_url=server.url, timeout=120)
    response = h.send(h.build_request("POST", "/v1/chat/completions", json=body), stream=True)
    assert response.status_code == 200
    lines = response.iter_lines()
    for _ in range(4):  # the role chunk, then tokens: it is decoding
        next(lines)
    return _Decoding(h, response, lines)


def _queue(server: ServerProcess) -> dict:
    return httpx.get(f"{server.url}/health", timeout=10).json()["queue"]


def test_a_disconnect_during_another_prefill_frees_its_place(servers):
    """Two places: one client decodes, another's long prompt is being prefilled, a third waits. The
    decoding client leaves: its place is free within a step, so the third request is admitted and
    answered while the long prompt is still being read (prefill chunks take turns)."""
    _, narrow = servers
    decoding = _long_decode(narrow)
    replied: list[float] = []  # when the long prompt's reply began (its first event past the start)

    def long_request() -> None:
        body = {"model": "gpt-oss", "input": "word " * 6000, "max_output_tokens": 4, "stream": True}
        with httpx.Client(base_url=narrow.url, timeout=180) as h:
            with h.stream("POST", "/v1/responses", json=body) as r:
                for line in r.iter_lines():
                    kind = line.removeprefix("event: ")
                    if line.startswith("event: ") and kind not in (
                        "response.created",
                        "response.in_progress",
                    ):
                        replied.append(time.monotonic())
                        break

    prefilling = threading.Thread(target=long_request)
    prefilling.start()
    deadline = time.monotonic() + 60
    while _queue(narrow)["prefilling"] < 1:
        assert time.monotonic() < deadline, _queue(narrow)
        time.sleep(0.02)
    answered: list[float] = []

    def waiting_request() -> None:
        r = client(narrow).chat.completions.create(
            model="gpt-oss", messages=[{"role": "user", "content": "[greet]"}]
        )
        assert r.choices[0].message.content == GREETING
        answered.append(time.monotonic())

    waiter = threading.Thread(target=waiting_request)
    waiter.start()
    while _queue(narrow)["waiting"] < 1:
        assert time.monotonic() < deadline, _queue(narrow)
        time.sleep(0.02)
    queue = _queue(narrow)
    assert queue["running"] == 2 and queue["prefilling"] == 1 and not replied, queue
    left = time.monotonic()
    decoding.close()
    waiter.join(60)
    prefilling.join(120)
    assert answered and replied, (answered, replied)
    assert answered[0] < replied[0], "the waiting request should not wait for the long prefill"
    assert answered[0] - left < 30
    assert "cancelled" in narrow.log()


def test_a_client_leaving_during_its_own_prefill_frees_its_place_within_a_chunk(servers):
    """A long prompt's client disconnects while its prompt is being read: the prefill stops between
    two chunks (the log's line for it counts the prompt tokens it did not read as not prefilled), no
    token is generated, and its place is free at once, long before the prompt would have been read."""
    _, narrow = servers
    body = {"model": "gpt-oss", "input": "word " * 60000, "max_output_tokens": 4, "stream": True}
    h = httpx.Client(base_url=narrow.url, timeout=180)
    response = h.send(h.build_request("POST", "/v1/responses", json=body), stream=True)
    assert response.status_code == 200
    deadline = time.monotonic() + 60
    while _queue(narrow)["prefilling"] < 1:
        assert time.monotonic() < deadline, _queue(narrow)
        time.sleep(0.02)
    time.sleep(0.5)  # some chunks in
    response.close()
    h.close()
    left = time.monotonic()
    while _queue(narrow)["running"]:
        assert time.monotonic() - left < 10, _queue(narrow)
        time.sleep(0.02)
    freed = time.monotonic() - left
    line = re.findall(r"cancelled: prompt (\d+) tokens \((\d+) cached\), (\d+) generated", narrow.log())[-1]
    prompt, not_prefilled, generated = (int(n) for n in line)
    assert prompt > 60000 and generated == 0
    assert not_prefilled > prompt // 4, line  # most of the prompt was never read
    assert freed < 3, freed
    r = client(narrow).chat.completions.create(
        model="gpt-oss", messages=[{"role": "user", "content": "[greet]"}]
    )
    assert r.choices[0].message.content == GREETING


def test_a_full_queue_is_429_with_retry_after(servers):
    _, narrow = servers
    decoding = [_long_decode(narrow), _long_decode(narrow)]
    waiting = None
    try:
        h = httpx.Client(base_url=narrow.url, timeout=60)
        body = {"model": "gpt-oss", "messages": [{"role": "user", "content": "[greet]"}], "stream": True}
        waiting = h.send(h.build_request("POST", "/v1/chat/completions", json=body), stream=True)
        deadline = time.monotonic() + 30
        while _queue(narrow)["waiting"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = h.post("/v1/responses", json={"input": "[greet]"})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
    finally:
        for d in decoding:
            d.close()
        if waiting is not None:
            waiting.close()


class _Probed:
    """The scheduler's lock and lists, watched: after every change of a list made outside the lock,
    and after every release of the lock, by the stepping thread, `probe` runs (the moments another
    thread could read the scheduler at)."""

    def __init__(self, lock, probe):
        self.lock, self.probe = lock, probe

    def __enter__(self):
        return self.lock.__enter__()

    def __exit__(self, *exc):
        self.lock.__exit__(*exc)
        self.probe()

    def __getattr__(self, name):
        return getattr(self.lock, name)


def _watched(kind, probe):
    class Watched(kind):
        pass

    for name in ("append", "appendleft", "extend", "remove", "pop", "popleft", "clear", "insert"):
        if hasattr(kind, name):

            def changed(self, *args, _name=name):
                result = getattr(kind, _name)(self, *args)
                probe()
                return result

            setattr(Watched, name, changed)
    return Watched


def test_health_is_one_snapshot_at_every_transition(tiny_checkpoint):
    """/health, asked over HTTP at every moment the stepping thread moves a request between its
    lists (queued, admitted, prefilled chunk by chunk, joining the batch, done), equals what the
    requests' states say then: a request is never counted twice (running above --max-concurrency),
    nor lost between two lists."""
    from collections import deque

    from oss_mlx.scheduler import _DECODE, _PREFILL, _WAITING

    with InProcessServer(tiny_checkpoint, max_concurrency=2, max_queue=8, prefill_chunk=16) as server:
        engine = server.engine
        scheduler = engine.runtime.scheduler
        submitted, compared, mismatched = [], [], []
        health = httpx.Client(base_url=server.url, timeout=30)

        def truth() -> dict:
            states = [s.state for s in submitted]
            running = sum(s in (_PREFILL, _DECODE) for s in states)
            return {
                "running": running,
                "prefilling": states.count(_PREFILL),
                "waiting": states.count(_WAITING),
            }

        def probe() -> None:
            if threading.current_thread() is not engine._thread or scheduler._lock.locked():
                return  # a reader would wait for the lock: it sees the move whole
            if all(s.done for s in submitted):
                return
            before = truth()
            queue = health.get("/health").json()["queue"]
            if truth() == before:  # (no submit came in between)
                seen = {k: queue[k] for k in before}
                (compared if seen == before else mismatched).append((seen, before))

        lock = scheduler._lock
        scheduler.waiting = _watched(deque, probe)()
        scheduler.prefilling = _watched(list, probe)()
        scheduler.decoding = _watched(list, probe)()
        Submitted = _watched(deque, lambda: None)

        class Recorded(Submitted):
            def append(self, seq):
                submitted.append(seq)
                super().append(seq)

        scheduler._submitted = Recorded()
        scheduler._lock = _Probed(lock, probe)
        c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
        errors = []

        def ask(i: int) -> None:
            try:
                c.chat.completions.create(
                    model="gpt-oss",
                    messages=[{"role": "user", "content": f"Request {i}: " + "more words " * (12 * i)}],
                    max_tokens=3 + i,
                    temperature=0,
                )
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        try:
            threads = [threading.Thread(target=ask, args=(i,)) for i in range(5)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
        finally:
            scheduler._lock = lock
            health.close()
        assert not errors, errors
        assert not mismatched, mismatched[:5]
        seen = [s for s, _ in compared]
        assert any(s["waiting"] for s in seen) and any(s["running"] == 2 and s["prefilling"] for s in seen)
        assert engine.queue_state()["running"] == 0


def test_a_refused_request_leaves_the_idle_conversations_cache_alone(servers):
    """A conversation's KV cache is kept while the server is full; requests refused with 429 meanwhile
    do not take its session (picking one rewinds its cache): continued afterwards, its whole earlier
    prompt is still cached."""
    _, narrow = servers
    c = client(narrow)
    conversation = [{"role": "user", "content": "[greet] " + "earlier words " * 200}]
    first = c.chat.completions.create(model="gpt-oss", messages=conversation)
    conversation += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "[greet] and then?"},
    ]
    # The others have instructions of their own: they share no prefix with it and take fresh sessions.
    decoding = [_long_decode(narrow, "Be long."), _long_decode(narrow, "Be long.")]
    h = httpx.Client(base_url=narrow.url, timeout=60)
    own = [{"role": "system", "content": "Be short."}, {"role": "user", "content": "[greet]"}]
    body = {"model": "gpt-oss", "messages": own, "stream": True}
    waiting = h.send(h.build_request("POST", "/v1/chat/completions", json=body), stream=True)
    try:
        deadline = time.monotonic() + 30
        while _queue(narrow)["waiting"] < 1:
            assert time.monotonic() < deadline, _queue(narrow)
            time.sleep(0.05)
        for i in range(3):
            r = h.post(
                "/v1/chat/completions", json={"messages": [{"role": "user", "content": f"[greet] {i}"}]}
            )
            assert r.status_code == 429, r.text
    finally:
        for d in decoding:
            d.close()
        waiting.close()
        h.close()
    deadline = time.monotonic() + 30
    while _queue(narrow)["running"] or _queue(narrow)["waiting"]:  # the disconnects, noticed
        assert time.monotonic() < deadline, _queue(narrow)
        time.sleep(0.05)
    again = c.chat.completions.create(model="gpt-oss", messages=conversation)
    assert again.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens, again.usage


def test_a_new_conversation_opening_alike_leaves_an_idle_ones_cache_alone(servers):
    """Two conversations with the same (no) instructions whose first messages open with the same
    words are not one: the second gets a fresh session (or the least recently used one's), and the
    first, continued, still finds its whole earlier prompt cached."""
    _, narrow = servers
    c = client(narrow)
    conversation = [{"role": "user", "content": "[greet] " + "first conversation words " * 100}]
    first = c.chat.completions.create(model="gpt-oss", messages=conversation)
    other = c.chat.completions.create(
        model="gpt-oss", messages=[{"role": "user", "content": "[greet] other"}]
    )
    assert other.choices[0].message.content
    conversation += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "[greet] and then?"},
    ]
    again = c.chat.completions.create(model="gpt-oss", messages=conversation)
    assert again.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens, again.usage
