"""`oss-mlx serve` in a real subprocess, driven with the official `openai` client (and raw httpx).

The tiny random checkpoint writes random text, so replies that must be a tool call or an analysis +
final pair are scripted through the server's test hook (OSS_MLX_SCRIPTED_REPLIES, see
oss_mlx/testing/scripted.py): a rule fires when its marker is in the last message. The model still
runs every step. Requests without a marker are sampled for real.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.client import HTTPConnection
from pathlib import Path

import httpx
import openai
import pytest
from server_helpers import ServerProcess, free_port, running

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

KEY = "test-key-123"
ANALYSIS = "The user greets. Reply briefly."
FINAL = "Hello there! How can I help?"
CALL_ARGS = '{"city": "Paris"}'
UNOFFERED_ARGS = '{"confirm": true}'
RULES = [
    {
        "match": "[greet]",
        "reply": f"<|channel|>analysis<|message|>{ANALYSIS}<|end|><|start|>assistant<|channel|>final<|message|>{FINAL}<|return|>",  # noqa: E501
    },
    {
        "match": "[weather]",
        "reply": "<|channel|>analysis<|message|>Need the weather tool.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"  # noqa: E501
        + CALL_ARGS
        + "<|call|>",
    },
    # a plain answer where tool_choice forces a call: the constraint overrules the script
    {"match": "[forced]", "reply": "<|channel|>final<|message|>No call needed.<|return|>"},
    {"match": "temp_c", "reply": "<|channel|>final<|message|>It is 21C in Paris.<|return|>"},
    # examples/openai_client.py's three questions
    {
        "match": "Why is the sky blue?",
        "reply": "<|channel|>analysis<|message|>Rayleigh scattering.<|end|><|start|>assistant<|channel|>final<|message|>Air scatters blue light most.<|return|>",  # noqa: E501
    },
    {
        "match": "Name three prime numbers.",
        "reply": "<|channel|>analysis<|message|>Small primes.<|end|><|start|>assistant<|channel|>final<|message|>2, 3 and 5.<|return|>",  # noqa: E501
    },
    {
        "match": "What's the weather in Paris?",
        "reply": "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
        + CALL_ARGS
        + "<|call|>",
    },
    {"match": "[count]", "reply": "<|channel|>final<|message|>one two three four five<|return|>"},
    # a call to a function the request does not offer
    {
        "match": "[unoffered]",
        "reply": "<|channel|>commentary to=functions.delete_everything <|constrain|>json<|message|>"
        + UNOFFERED_ARGS
        + "<|call|>",
    },
    # a model that, asked for a call (tool_choice required), writes words where the call should be
    {"match": "[garbled]", "reply": "<|channel|>commentary to=functions. please look up the weather<|end|>"},
    {
        "match": "[slow]",
        "reply": "<|channel|>final<|message|>" + " word" * 400 + "<|return|>",
        "token_delay": 0.05,
    },
]
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CHAT_WEATHER_TOOL = {
    "type": "function",
    "function": {k: v for k, v in WEATHER_TOOL.items() if k != "type"},
}


@pytest.fixture(scope="module")
def servers(tiny_checkpoint, tmp_path_factory):
    """Two servers, started side by side: the main one (API key, small body limit) and one with
    --max-concurrency 1 --max-queue 1 for the 429 test."""
    folder = tmp_path_factory.mktemp("server")
    rules = folder / "rules.json"
    rules.write_text(json.dumps(RULES))
    env = {"OSS_MLX_SCRIPTED_REPLIES": str(rules), "OSS_MLX_API_KEY": ""}
    main = ServerProcess(
        tiny_checkpoint, folder / "main.log", "--api-key", KEY, "--max-body-bytes", "100000", env=env
    )
    small = ServerProcess(
        tiny_checkpoint, folder / "queue.log", "--max-concurrency", "1", "--max-queue", "1", env=env
    )
    with running(main, small):
        yield main, small


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        yield c


# ---- basics ------------------------------------------------------------------------------------------


def test_models_and_health(server, client):
    ids = [m.id for m in client.models.list().data]
    assert len(ids) == 1
    assert client.models.retrieve(ids[0]).id == ids[0]
    health = httpx.get(f"{server.url}/health").json()  # no key needed
    assert health["status"] == "ok" and health["model"] == ids[0]


# ---- Responses API -------------------------------------------------------------------------------------


def test_responses_plain_keeps_reasoning_out_of_the_text(client):
    r = client.responses.create(model="gpt-oss", input="[greet] hi", max_output_tokens=64)
    assert r.status == "completed"
    assert r.output_text == FINAL
    kinds = [item.type for item in r.output]
    assert kinds == ["reasoning", "message"]
    assert r.output[0].content[0].text == ANALYSIS and ANALYSIS not in r.output_text
    u = r.usage
    assert u.input_tokens > 20 and 0 < u.output_tokens_details.reasoning_tokens < u.output_tokens
    assert u.total_tokens == u.input_tokens + u.output_tokens


def test_responses_sampled_and_length_limit(client):
    r = client.responses.create(model="gpt-oss", input="Tell me a story.", max_output_tokens=5, temperature=0)
    assert r.usage.output_tokens <= 5
    assert r.status in ("completed", "incomplete")
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"


def test_responses_stream_event_sequence(client):
    events = list(client.responses.create(model="gpt-oss", input="[greet] hi", stream=True))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    # Each item: added, (part added), deltas, (text done, part done), item done.
    expected_shape = [
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    collapsed = [t for i, t in enumerate(types[2:-1]) if i == 0 or t != types[2:-1][i - 1]]
    assert collapsed == expected_shape
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert reasoning == ANALYSIS and text == FINAL
    reasoning_item = next(e for e in events if e.type == "response.output_item.done").item
    message_events = [e for e in events if e.type == "response.output_text.delta"]
    assert {e.output_index for e in message_events} == {1}
    assert {e.item_id for e in message_events} != {reasoning_item.id}
    final = events[-1].response
    assert final.output_text == FINAL and final.usage.output_tokens > 0

    # The SDK's strict stream accumulator agrees.
    with client.responses.stream(model="gpt-oss", input="[greet] again") as stream:
        assert stream.get_final_response().output_text == FINAL


def test_responses_tool_call_round_trip(client):
    question = {"role": "user", "content": "[weather] in Paris?"}
    events = list(
        client.responses.create(model="gpt-oss", input=[question], tools=[WEATHER_TOOL], stream=True)
    )
    types = [e.type for e in events]
    assert "response.function_call_arguments.delta" in types and types[-1] == "response.completed"
    args_done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert args_done.arguments == CALL_ARGS
    first = events[-1].response
    call = next(item for item in first.output if item.type == "function_call")
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id and call.status == "completed"

    # The client runs the tool and sends everything back (reasoning item included).
    second = client.responses.create(
        model="gpt-oss",
        input=[
            question,
            *[item.model_dump(exclude_none=True) for item in first.output],
            {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp_c": 21}'},
        ],
        tools=[WEATHER_TOOL],
    )
    assert second.output_text == "It is 21C in Paris."
    # The prompt repeats the first one and its reply: served from the cache.
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens


def _weather_round_trip(client):
    """A call to get_weather, then its output sent through previous_response_id: (the response with
    the call, the call, the answer)."""
    call_response = client.responses.create(model="gpt-oss", input="[weather] now", tools=[WEATHER_TOOL])
    call = next(item for item in call_response.output if item.type == "function_call")
    answer = client.responses.create(
        model="gpt-oss",
        previous_response_id=call_response.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"temp_c": 21}'}],
        tools=[WEATHER_TOOL],
    )
    return call_response, call, answer


def test_previous_response_id_reuses_history_and_cache(client):
    first = client.responses.create(model="gpt-oss", input="[greet] remember the number 42")
    second = client.responses.create(
        model="gpt-oss",
        previous_response_id=first.id,
        input="Which number?",
        max_output_tokens=3,
        temperature=0,
    )
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens + 10
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
    assert client.responses.retrieve(first.id).output_text == FINAL
    # A tool round trip through previous_response_id: the call id is known to the server.
    _, _, answer = _weather_round_trip(client)
    assert answer.output_text == "It is 21C in Paris."
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="gpt-oss", previous_response_id="resp_nope", input="hi")
    assert e.value.body["code"] == "previous_response_not_found"


# ---- Chat Completions ----------------------------------------------------------------------------------


def test_chat_plain_reasoning_in_its_own_field(client):
    r = client.chat.completions.create(
        model="gpt-oss",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "[greet]"}],
    )
    msg = r.choices[0].message
    assert msg.content == FINAL
    assert msg.model_extra["reasoning_content"] == ANALYSIS and msg.model_extra["reasoning"] == ANALYSIS
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens_details.reasoning_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_raw_sse(http):
    body = {
        "model": "gpt-oss",
        "messages": [{"role": "user", "content": "[greet]"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0]["role"] == "assistant"
    assert "".join(d.get("content") or "" for d in deltas) == FINAL
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == ANALYSIS
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_chat_sampled_max_tokens(client):
    r = client.chat.completions.create(
        model="gpt-oss", messages=[{"role": "user", "content": "Count."}], max_tokens=4, temperature=0, seed=1
    )
    assert r.usage.completion_tokens <= 4 and r.choices[0].finish_reason in ("length", "stop")


def test_chat_tool_call_round_trip(client):
    messages = [{"role": "user", "content": "[weather] in Paris?"}]
    r = client.chat.completions.create(model="gpt-oss", messages=messages, tools=[CHAT_WEATHER_TOOL])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'},
    ]
    r2 = client.chat.completions.create(model="gpt-oss", messages=messages, tools=[CHAT_WEATHER_TOOL])
    assert r2.choices[0].message.content == "It is 21C in Paris."
    assert r2.choices[0].finish_reason == "stop"
    assert r2.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens

    # Streamed: the call arrives as tool_calls deltas.
    stream = client.chat.completions.create(
        model="gpt-oss", messages=messages[:1], tools=[CHAT_WEATHER_TOOL], stream=True
    )
    name, args, reasons = "", "", []
    for chunk in stream:
        for c in chunk.choices:
            for tc in c.delta.tool_calls or []:
                name += tc.function.name or ""
                args += tc.function.arguments or ""
            reasons.append(c.finish_reason)
    assert name == "get_weather" and args == CALL_ARGS and reasons[-1] == "tool_calls"


def test_named_tool_choice_forces_the_call(client):
    """tool_choice naming a function: the reply is that call (its arguments valid for the schema) even
    though the model, left alone, answers in text (scripted): the constraint overrules it."""
    weather = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(
        model="gpt-oss",
        messages=[{"role": "user", "content": "[forced] Paris please"}],
        tools=[CHAT_WEATHER_TOOL],
        tool_choice=weather,
        max_completion_tokens=40,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    resp = client.responses.create(
        model="gpt-oss",
        input="[forced] Paris please",
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=40,
    )
    (call,) = [item for item in resp.output if item.type == "function_call"]
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments)["city"], str)


def test_chat_stop_sequence(client):
    messages = [{"role": "user", "content": "[count]"}]
    r = client.chat.completions.create(model="gpt-oss", messages=messages, stop=["three"])
    assert r.choices[0].message.content == "one two " and r.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(model="gpt-oss", messages=messages, stop="thr", stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two "


def test_stop_filter_holds_back_partial_matches():
    from oss_mlx.server.chat_completions import StopFilter

    f = StopFilter(["END", "xyz"])
    out = "".join(f.push(c) for c in "abcENxyEN") + f.flush()
    assert out == "abcENxyEN" and not f.hit
    f = StopFilter(["END", "xyz"])
    out = "".join(f.push(c) for c in "abEN") + f.push("D tail") + f.push("more") + f.flush()
    assert out == "ab" and f.hit


# ---- errors --------------------------------------------------------------------------------------------


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_numbers_past_float_and_long_values_are_400_quoted_short(http):
    """A JSON integer beyond float's range (10**309) where a number goes is a 400 naming the field, not
    an OverflowError's 500; a value out of range is quoted at most SHOWN_CHARS long."""
    from oss_mlx.server.schemas import SHOWN_CHARS

    huge, long = "1" + "0" * 309, "9" * 4000
    chat = '{"messages":[{"role":"user","content":"x"}],'
    cases = [
        ("/v1/chat/completions", chat + f'"temperature":{huge}}}', "temperature"),
        ("/v1/chat/completions", chat + f'"logit_bias":{{"7":{huge}}}}}', "logit_bias.7"),
        ("/v1/responses", f'{{"input":"x","top_p":-{huge}}}', "top_p"),
        ("/v1/responses", f'{{"input":"x","max_output_tokens":-{long}}}', "max_output_tokens"),
        ("/v1/chat/completions", chat + f'"top_k":-{long}}}', "top_k"),
    ]
    for path, body, param in cases:
        r = http.post(path, content=body.encode(), headers={"Content-Type": "application/json"})
        error = _error(r, 400)
        assert error["param"] == param and len(error["message"]) < 2 * SHOWN_CHARS + 80, error


def test_bad_requests_name_the_field(http):
    bad_json = http.post(
        "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert _error(bad_json, 400)["code"] == "invalid_json"
    cases = [
        ("/v1/chat/completions", {"model": "gpt-oss", "messages": "hi"}, "messages"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
            "temperature",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            "max_tokens",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "tool", "tool_call_id": "c1", "content": "x"}]},
            "messages[0].tool_call_id",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content[0].type",
        ),
        ("/v1/responses", {"input": 42}, "input"),
        ("/v1/responses", {}, "input"),
        ("/v1/responses", {"input": "x", "stream": "yes"}, "stream"),
        ("/v1/responses", {"input": "x", "reasoning": {"effort": "extreme"}}, "reasoning.effort"),
        ("/v1/responses", {"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        (
            "/v1/responses",
            {"input": "x", "tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "name": "nope"}},
            "tool_choice",
        ),
        (
            "/v1/responses",
            {"input": [{"type": "function_call_output", "call_id": "nope", "output": "x"}]},
            "input[0].call_id",
        ),
    ]
    for path, body, param in cases:
        error = _error(http.post(path, json=body), 400)
        assert error["param"] == param and error["type"] == "invalid_request_error", (body, error)


def test_unknown_model_is_404(client, http):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    assert _error(http.post("/v1/responses", json={"model": "llama", "input": "x"}), 404)["param"] == "model"
    assert _error(http.get("/v1/nothing"), 404)["code"] == "not_found"


def test_body_too_large_is_413(http):
    body = {"model": "gpt-oss", "messages": [{"role": "user", "content": "x" * 200_000}]}
    assert _error(http.post("/v1/chat/completions", json=body), 413)["code"] == "request_too_large"


def test_api_key_required(server):
    body = {"model": "gpt-oss", "messages": [{"role": "user", "content": "x"}]}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        error = _error(httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers), 401)
        assert error["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# ---- load ----------------------------------------------------------------------------------------------


def test_concurrent_clients_all_answered(client):
    results, errors = {}, []

    def ask(i: int) -> None:
        try:
            r = client.chat.completions.create(
                model="gpt-oss",
                messages=[{"role": "user", "content": f"Question {i}?"}],
                max_tokens=4,
                temperature=0,
            )
            results[i] = r.usage.completion_tokens
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and sorted(results) == [0, 1, 2, 3]
    assert all(1 <= n <= 4 for n in results.values())


def _slow_stream(c: httpx.Client, path: str = "/v1/chat/completions") -> httpx.Response:
    body = {"model": "gpt-oss", "messages": [{"role": "user", "content": "[slow]"}], "stream": True}
    response = c.send(c.build_request("POST", path, json=body), stream=True)
    assert response.status_code == 200
    return response


class _Generating:
    """A stream read up to its first word. Its line iterator is kept: a dropped one closes the
    connection (httpcore closes a stream whose iterator is garbage collected), which cancels the
    reply."""

    def __init__(self, response: httpx.Response):
        self.response, self.lines = response, response.iter_lines()
        while '"content":" word"' not in next(self.lines):
            pass

    def close(self) -> None:
        self.response.close()


def _until_generating(response: httpx.Response) -> _Generating:
    return _Generating(response)


def test_client_disconnect_frees_the_worker(server, http, client):
    response = _until_generating(_slow_stream(http))
    response.close()
    start = time.monotonic()
    r = client.chat.completions.create(model="gpt-oss", messages=[{"role": "user", "content": "[greet]"}])
    assert r.choices[0].message.content == FINAL
    assert time.monotonic() - start < 5  # the slow reply would take 20 s
    assert "cancelled" in server.log()


def test_non_streaming_client_that_gives_up_frees_the_worker(server, client):
    body = {"model": "gpt-oss", "input": "[slow]"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.url}/v1/responses", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=1
        )
    start = time.monotonic()
    r = client.responses.create(model="gpt-oss", input="[greet]")
    assert r.output_text == FINAL and time.monotonic() - start < 5


def test_full_queue_is_429_with_retry_after(servers):
    _, small = servers
    with httpx.Client(base_url=small.url, timeout=30) as c:
        running = _until_generating(_slow_stream(c))
        waiting = _slow_stream(c)
        try:
            full = {"running": 1, "prefilling": 0, "waiting": 1, "max_running": 1, "max_waiting": 1}
            # Polled until the second request is queued, each answer within 2 s (the first still
            # decodes: its stream is held open, see _Generating).
            start = time.monotonic()
            while True:
                asked = time.monotonic()
                health = c.get("/health").json()  # the event loop answers while the model works
                assert time.monotonic() - asked < 2
                if health["queue"] == full or time.monotonic() - start > 5:
                    break
                time.sleep(0.02)
            assert health["queue"] == full
            r = c.post("/v1/responses", json={"input": "[greet]"})
            error = _error(r, 429)
            assert error["code"] == "rate_limit_exceeded" and int(r.headers["Retry-After"]) >= 1
            assert "word" in next(line for line in running.lines if line)  # the first reply goes on
        finally:
            running.close()
            waiting.close()
        # The two clients left: their places free within a step (the server notices the disconnects
        # asynchronously, so a request sent at once may still meet a full queue), then a request runs.
        idle = {"running": 0, "prefilling": 0, "waiting": 0, "max_running": 1, "max_waiting": 1}
        start = time.monotonic()
        while c.get("/health").json()["queue"] != idle:
            assert time.monotonic() - start < 5, c.get("/health").json()
            time.sleep(0.05)
        r = c.post("/v1/responses", json={"input": "[greet]"})
        assert r.status_code == 200 and time.monotonic() - start < 5
    assert httpx.get(f"{small.url}/health").json()["queue"] == idle


# ---- bounded fields, depth, parameters (issue: hardening) ---------------------------------------------


def _done_lines(server) -> int:
    return server.log().count("oss_mlx.server: done:")


def test_field_limits_are_openais(server, http, client):
    kept = client.responses.create(model="gpt-oss", input="[greet] keep me")
    ok_metadata = {f"k{i:02d}" + "x" * 61: "v" * 512 for i in range(16)}  # 16 keys of 64, values of 512
    r = client.responses.create(model="gpt-oss", input="[greet]", metadata=ok_metadata)
    assert r.metadata == ok_metadata
    tool = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    cases = [
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "object_above_max_properties"),
        ({"metadata": {"k" * 65: "v"}}, "metadata", "string_above_max_length"),
        ({"metadata": {"k": "v" * 513}}, "metadata.k", "string_above_max_length"),
        ({"metadata": {"k": 1}}, "metadata.k", "invalid_type"),
        ({"metadata": {"k": {"nested": "x"}}}, "metadata.k", "invalid_type"),
        ({"user": "u" * 65}, "user", "string_above_max_length"),
        ({"safety_identifier": "s" * 65}, "safety_identifier", "string_above_max_length"),
        ({"prompt_cache_key": "p" * 65}, "prompt_cache_key", "string_above_max_length"),
        ({"tools": [{**tool, "name": f"f{i}"} for i in range(129)]}, "tools", "array_above_max_length"),
        ({"tools": [tool, tool]}, "tools[1]", "invalid_value"),
        ({"tools": [{**tool, "name": "f" * 65}]}, "tools[0].name", "invalid_value"),
        (
            {"text": {"format": {"type": "json_schema", "name": "bad name", "schema": {}}}},
            "text.format.name",
            "invalid_value",
        ),
        (
            {"input": [{"type": "function_call_output", "call_id": "c" * 65, "output": "x"}]},
            "input[0].call_id",
            "string_above_max_length",
        ),
        ({"previous_response_id": "r" * 65}, "previous_response_id", "string_above_max_length"),
    ]
    for extra, param, code in cases:
        body = {"model": "gpt-oss", "input": "[greet] x", **extra}
        error = _error(http.post("/v1/responses", json=body), 400)
        assert (error["param"], error["code"]) == (param, code), (extra, error)
        assert len(error["message"]) < 400  # never the whole value echoed back
    chat = [
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"user": "u" * 65}, "user"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"tools": [CHAT_WEATHER_TOOL] * 2}, "tools[1]"),
        (
            {
                "messages": [
                    {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f"}}] * 129}
                ]
            },
            "messages[0].tool_calls",
        ),
    ]
    for extra, param in chat:
        body = {"model": "gpt-oss", "messages": [{"role": "user", "content": "[greet]"}], **extra}
        assert _error(http.post("/v1/chat/completions", json=body), 400)["param"] == param, extra
    # Nothing was lost: the earlier response is still there, the client still answered.
    assert client.responses.retrieve(kept.id).output_text == FINAL


def test_echoed_fields_keep_only_what_means_something(client):
    r = client.responses.create(
        model="gpt-oss",
        input="[greet]",
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "name": "get_weather", "junk": "x" * 1000},
        text={
            "format": {"type": "json_schema", "name": "out", "schema": {"type": "object"}, "junk": [1] * 100}
        },
        max_output_tokens=40,  # the named call is enforced: the scripted text answer is overruled
    )
    assert r.tool_choice.model_dump(exclude_none=True) == {"type": "function", "name": "get_weather"}
    fmt = r.text.format.model_dump(exclude_none=True, by_alias=True)
    assert fmt == {"type": "json_schema", "name": "out", "schema": {"type": "object"}}


def _nested(depth: int) -> dict | list:
    value: dict | list = {"leaf": 1}
    for i in range(depth):
        value = {"a": value} if i % 2 else [value]
    return value


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_deep_nesting_is_a_400_before_any_work(server, client, stream):
    """~500-900 levels used to overflow deepcopy: a 500 after the whole generation (streamed: 200,
    then a reset). Now every depth past 64 levels is a 400 at parse time, naming the field."""
    kept = client.responses.create(model="gpt-oss", input="[greet] before")
    generated = _done_lines(server)
    conn = HTTPConnection("127.0.0.1", server.port, timeout=30)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    tool = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    for depth in (65, 600, 900, 5000):
        for field, value in (
            ("metadata", {"k": _nested(depth)}),
            ("text", {"format": {"type": "json_schema", "name": "x", "schema": _nested(depth)}}),
            ("tool_choice", {"type": "function", "name": "f", "x": _nested(depth)}),
            ("tools", [{**tool, "parameters": {"type": "object", "properties": _nested(depth)}}]),
        ):
            body = {"model": "gpt-oss", "input": "[greet]", "stream": stream, "tools": [tool], field: value}
            try:
                raw = json.dumps(body)
            except RecursionError:  # too deep for this test's own encoder: written by hand
                raw = json.dumps({**body, field: "@"}).replace('"@"', "[" * depth + "]" * depth)
            conn.request("POST", "/v1/responses", body=raw, headers=headers)
            r = conn.getresponse()
            error = json.loads(r.read())["error"]
            assert r.status == 400 and error["code"] == "nesting_too_deep", (depth, field, error)
            assert "64 levels" in error["message"]
            if depth < 900:  # below the JSON parser's own limit the field is named
                assert error["param"] == field, error
    sock = conn.sock
    conn.request("GET", "/health", headers=headers)
    assert conn.getresponse().read() and conn.sock is sock  # the same connection still serves
    conn.close()
    assert _done_lines(server) == generated  # no generation ran for any of them
    assert client.responses.retrieve(kept.id).output_text == FINAL
    assert "Traceback" not in server.log()


def test_a_model_path_is_not_a_model_name(server, http, tiny_checkpoint):
    for name in (str(tiny_checkpoint), str(tiny_checkpoint.resolve()), str(tiny_checkpoint) + "/"):
        body = {"model": name, "messages": [{"role": "user", "content": "[greet]"}]}
        assert _error(http.post("/v1/chat/completions", json=body), 404)["code"] == "model_not_found"
        assert _error(http.get(f"/v1/models/{name}"), 404)["code"] == "model_not_found"
    body = {"model": tiny_checkpoint.name, "messages": [{"role": "user", "content": "[greet]"}]}
    assert http.post("/v1/chat/completions", json=body).status_code == 200


def test_model_aliases_of_a_served_gpt_oss():
    from pathlib import Path as P

    from oss_mlx.server.app import model_aliases

    names = model_aliases("/models/my-finetune", "my-finetune", P("/models/my-finetune"), shape=(24, 32))
    assert {"openai/gpt-oss-20b", "gpt-oss-20b", "gpt-oss:20b", "my-finetune", "gpt-oss"} <= names
    assert not any("/models" in n for n in names) and "gpt-oss-120b" not in names
    names = model_aliases("openai/gpt-oss-120b", "openai/gpt-oss-120b", None)
    assert {"openai/gpt-oss-120b", "gpt-oss-120b", "gpt-oss:120b"} <= names and "gpt-oss-20b" not in names
    tiny = model_aliases("/tmp/tiny", "tiny", P("/tmp/tiny"), shape=(4, 4))
    assert not any("20b" in n or "120b" in n for n in tiny)


def test_accepted_parameters_work_or_are_refused_by_name(http, client):
    responses_cases = [
        ({"include": ["file_search_call.results"]}, "include[0]"),
        ({"include": ["reasoning.encrypted_content", "message.output_text.logprobs"]}, "include[1]"),
        ({"reasoning": {"summary": "detailed"}}, "reasoning.summary"),
        ({"reasoning": {"generate_summary": "concise"}}, "reasoning.generate_summary"),
        ({"reasoning": {"context": "all_turns"}}, "reasoning.context"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"truncation": "middle"}, "truncation"),
        ({"text": {"verbosity": "low"}}, "text.verbosity"),
        ({"background": True}, "background"),
        ({"prompt_cache_retention": "24h"}, "prompt_cache_retention"),
        ({"service_tier": "turbo"}, "service_tier"),
    ]
    for extra, param in responses_cases:
        body = {"model": "gpt-oss", "input": "[greet]", **extra}
        assert _error(http.post("/v1/responses", json=body), 400)["param"] == param, extra
    chat_cases = [
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"top_logprobs": 0}, "top_logprobs"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"presence_penalty": -1}, "presence_penalty"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"logit_bias": {"999999": 1}}, "logit_bias"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "alloy"}}, "audio"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"verbosity": "high"}, "verbosity"),
    ]
    for extra, param in chat_cases:
        body = {"model": "gpt-oss", "messages": [{"role": "user", "content": "[greet]"}], **extra}
        assert _error(http.post("/v1/chat/completions", json=body), 400)["param"] == param, extra
    # What is accepted is honoured, or echoed as what was done.
    r = client.responses.create(
        model="gpt-oss",
        input="[greet]",
        truncation="auto",
        reasoning={"effort": "low", "summary": "auto"},
        service_tier="flex",
        top_logprobs=0,
        prompt_cache_key="conversation-1",
    )
    assert r.truncation == "auto" and r.reasoning.summary == "auto" and r.service_tier == "default"
    assert r.prompt_cache_key == "conversation-1" and r.output_text == FINAL
    c = client.chat.completions.create(
        model="gpt-oss",
        messages=[{"role": "user", "content": "[greet]"}],
        frequency_penalty=0,
        presence_penalty=0,
        service_tier="auto",
    )
    assert c.choices[0].message.content == FINAL and c.service_tier == "default"


def test_logit_bias_steers_sampling(client):
    from oss_mlx.tokenizer import load_tokenizer

    tok = load_tokenizer()
    (token,) = tok.encode(" banana")
    r = client.chat.completions.create(
        model="gpt-oss",
        messages=[{"role": "user", "content": "Say anything."}],
        logit_bias={str(token): 100},
        temperature=0,
        max_tokens=4,
    )
    assert r.choices[0].message.content == tok.decode([token] * 4)


def test_encrypted_reasoning_round_trips_without_the_store(client, http):
    first = client.responses.create(
        model="gpt-oss",
        input="[weather] in Paris?",
        tools=[WEATHER_TOOL],
        store=False,
        include=["reasoning.encrypted_content"],
    )
    reasoning = next(item for item in first.output if item.type == "reasoning")
    assert reasoning.encrypted_content and reasoning.content[0].text == "Need the weather tool."
    call = next(item for item in first.output if item.type == "function_call")
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)  # store: false
    # A stateless client sends the reasoning back as the encrypted content alone.
    items = [item.model_dump(exclude_none=True) for item in first.output]
    opaque = [
        {"type": "reasoning", "id": i["id"], "summary": [], "encrypted_content": i["encrypted_content"]}
        if i["type"] == "reasoning"
        else i
        for i in items
    ]
    output = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp_c": 21}'}
    question = {"role": "user", "content": "[weather] in Paris?"}
    full = client.responses.input_tokens.count(input=[question, *items, output], tools=[WEATHER_TOOL])
    bare = client.responses.input_tokens.count(input=[question, *opaque, output], tools=[WEATHER_TOOL])
    without = client.responses.input_tokens.count(
        input=[question, *[i for i in items if i["type"] != "reasoning"], output], tools=[WEATHER_TOOL]
    )
    assert full.input_tokens == bare.input_tokens > without.input_tokens
    answer = client.responses.create(model="gpt-oss", input=[question, *opaque, output], tools=[WEATHER_TOOL])
    assert answer.output_text == "It is 21C in Paris."
    forged = [question, {"type": "reasoning", "summary": [], "encrypted_content": "not ours"}]
    error = _error(http.post("/v1/responses", json={"input": forged}), 400)
    assert error["param"] == "input[1].encrypted_content"


def test_responses_endpoints_through_the_sdk(client):
    items = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "[greet] second question"},
    ]
    r = client.responses.create(model="gpt-oss", input=items, instructions="Answer kindly.", temperature=0)
    # input_tokens.count: the same prompt the response ran (our harmony renderer, real tokens).
    counted = client.responses.input_tokens.count(model="gpt-oss", input=items, instructions="Answer kindly.")
    assert counted.object == "response.input_tokens" and counted.input_tokens == r.usage.input_tokens
    # input_items.list: newest first by default, pages of `limit`, the SDK following them.
    listed = client.responses.input_items.list(r.id)
    assert [i.role for i in listed.data] == ["user", "assistant", "user", "developer"]
    assert listed.data[0].content[0].text == "[greet] second question" and listed.data[0].id
    paged = list(client.responses.input_items.list(r.id, limit=1, order="asc"))
    assert [i.role for i in paged] == ["developer", "user", "assistant", "user"]
    first_page = client.responses.input_items.list(r.id, limit=3)
    assert first_page.has_more and len(first_page.data) == 3
    # cancel: only background responses can be; this server makes none (OpenAI's answer: 400).
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.cancel(r.id)
    assert "Cannot cancel a synchronous response" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_nope")
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list("resp_nope")
    # A tool round trip's items list their calls and outputs.
    _, call, out = _weather_round_trip(client)
    (listed_output,) = client.responses.input_items.list(out.id).data
    assert listed_output.type == "function_call_output" and listed_output.call_id == call.call_id
    # delete: gone afterwards, and a continuation from it is refused.
    assert client.responses.delete(r.id) is None
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="gpt-oss", previous_response_id=r.id, input="more")


def test_chat_stored_completions_through_the_sdk(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "[greet]"}]
    plain = client.chat.completions.create(model="gpt-oss", messages=messages)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve(plain.id)  # store defaults to false, as with OpenAI
    stored = client.chat.completions.create(
        model="gpt-oss", messages=messages, store=True, metadata={"run": "a"}
    )
    other = client.chat.completions.create(
        model="gpt-oss", messages=messages, store=True, metadata={"run": "b"}, stream=True
    )
    other_id = next(iter(other)).id
    for _ in other:
        pass
    got = client.chat.completions.retrieve(stored.id)
    assert got.id == stored.id and got.choices[0].message.content == FINAL
    ids = [c.id for c in client.chat.completions.list(metadata={"run": "a"})]
    assert ids == [stored.id]
    assert [c.id for c in client.chat.completions.list()][-2:] == [stored.id, other_id]
    assert [c.id for c in client.chat.completions.list(order="desc", limit=1)][:1] == [other_id]
    assert client.chat.completions.retrieve(other_id).choices[0].message.content == FINAL
    updated = client.chat.completions.update(stored.id, metadata={"run": "c"})
    assert updated.metadata == {"run": "c"}
    assert [c.id for c in client.chat.completions.list(metadata={"run": "c"})] == [stored.id]
    listed = list(client.chat.completions.messages.list(stored.id, limit=1))
    assert [(m.role, m.content) for m in listed] == [("system", "Be brief."), ("user", "[greet]")]
    assert len({m.id for m in listed}) == 2
    deleted = client.chat.completions.delete(stored.id)
    assert deleted.deleted and deleted.object == "chat.completion.deleted"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve(stored.id)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_call_to_a_function_not_offered_is_text(client, stream):
    """The model calls delete_everything and the request offers no tools (so nothing constrains the
    reply): no client can run that call, so it is answered as text (the call's arguments), never as
    a function call."""
    question = "[unoffered] clean up"
    if stream:
        events = list(client.responses.create(model="gpt-oss", input=question, stream=True))
        assert not any("function_call" in e.type for e in events)
        r = events[-1].response
    else:
        r = client.responses.create(model="gpt-oss", input=question)
    assert [i.type for i in r.output] == ["message"] and r.output[0].phase == "final_answer"
    assert r.output_text == UNOFFERED_ARGS and r.status == "completed"
    # The stored conversation agrees with what the client saw: continuing it works.
    follow = client.responses.create(model="gpt-oss", previous_response_id=r.id, input="[greet] ok")
    assert follow.output_text == FINAL
    messages = [{"role": "user", "content": question}]
    if stream:
        chunks = list(client.chat.completions.create(model="gpt-oss", messages=messages, stream=True))
        assert not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    else:
        c = client.chat.completions.create(model="gpt-oss", messages=messages)
        assert c.choices[0].message.tool_calls is None
        text, reason = c.choices[0].message.content, c.choices[0].finish_reason
    assert text == UNOFFERED_ARGS and reason == "stop"


def test_with_tools_offered_a_call_of_another_function_cannot_be_written(client):
    """The same scripted call while get_weather is offered: the grammar allows only offered names, so
    the script is overruled where it names delete_everything and the reply is a call of get_weather,
    its arguments valid for the schema."""
    r = client.responses.create(
        model="gpt-oss", input="[unoffered] clean up", tools=[WEATHER_TOOL], max_output_tokens=40
    )
    (call,) = [i for i in r.output if i.type == "function_call"]
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments)["city"], str)
    c = client.chat.completions.create(
        model="gpt-oss",
        messages=[{"role": "user", "content": "[unoffered] clean up"}],
        tools=[CHAT_WEATHER_TOOL],
        max_completion_tokens=40,
    )
    (call,) = c.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and c.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("seed", range(3))
def test_required_with_several_tools_is_always_a_call_of_one_of_them(client, seed):
    """tool_choice required with two tools, and a model that writes no name (scripted: words where the
    name should be): the reply is still one well-formed call of an offered tool, never text."""
    second = {**WEATHER_TOOL, "name": "get_time"}
    r = client.responses.create(
        model="gpt-oss",
        input="[garbled]",
        tools=[WEATHER_TOOL, second],
        tool_choice="required",
        max_output_tokens=48,
        extra_body={"seed": seed},
    )
    assert [i.type for i in r.output if i.type != "reasoning"] == ["function_call"]
    (call,) = [i for i in r.output if i.type == "function_call"]
    assert call.name in ("get_weather", "get_time") and isinstance(json.loads(call.arguments)["city"], str)
    c = client.chat.completions.create(
        model="gpt-oss",
        messages=[{"role": "user", "content": "[garbled]"}],
        tools=[
            CHAT_WEATHER_TOOL,
            {"type": "function", "function": {**CHAT_WEATHER_TOOL["function"], "name": "get_time"}},
        ],
        tool_choice="required",
        max_completion_tokens=48,
        seed=seed,
    )
    (call,) = c.choices[0].message.tool_calls
    assert call.function.name in ("get_weather", "get_time") and c.choices[0].message.content is None


def test_still_healthy_after_everything(servers):
    for s in servers:
        assert s.proc.poll() is None
        assert httpx.get(f"{s.url}/health").json()["status"] == "ok"


def test_refuses_a_model_that_does_not_fit(tiny_checkpoint, vocab_dir):
    import os
    import subprocess
    import sys

    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(vocab_dir), "OSS_MLX_MEMORY_GB": "0.01"}
    port = str(free_port())
    cmd = [sys.executable, "-m", "oss_mlx.cli", "serve", "--model", str(tiny_checkpoint), "--port", port]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 1
    assert "does not fit" in out.stderr and "--memory-budget" in out.stderr and "Traceback" not in out.stderr


def test_the_openai_client_example_runs_against_the_server(server):
    """examples/openai_client.py as a user runs it, against the server: both APIs, each plain, streamed
    and with a tool round trip (its three questions have scripted replies above)."""
    example = Path(__file__).resolve().parents[1] / "examples" / "openai_client.py"
    cmd = [sys.executable, str(example), "--base-url", f"{server.url}/v1", "--api-key", KEY]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.count("[reasoning] Rayleigh scattering.") == 2  # Responses' reasoning item, chat's field
    assert "[answer] Air scatters blue light most.\n" in text  # Responses
    assert "[answer] Air scatters blue light most. (stop)" in text  # Chat Completions
    assert text.count("2, 3 and 5.") == 2  # both streams
    assert text.count('model calls get_weather({"city": "Paris"})') == 2
    assert text.count("[answer] It is 21C in Paris.") == 2
    assert "cached prompt tokens:" in text


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("api", ["chat", "responses"])
def test_the_agents_sdk_example_runs_against_the_server(server, api, stream):
    """examples/agents_sdk.py (an OpenAI Agents SDK agent with a tool) against the server, through
    both of the SDK's model classes: the agent calls get_weather, then answers from its result."""
    pytest.importorskip("agents", reason="examples/agents_sdk.py needs openai-agents (the test extra)")
    example = Path(__file__).resolve().parents[1] / "examples" / "agents_sdk.py"
    cmd = [sys.executable, str(example), "--base-url", f"{server.url}/v1", "--api-key", KEY, "--api", api]
    cmd += ["--stream"] if stream else []
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip().endswith("It is 21C in Paris."), out.stdout
    if stream:
        assert '[calls get_weather({"city": "Paris"})]' in out.stdout
