"""Structured outputs through `oss-mlx serve` and the official `openai` client, on a random tiny model.

Every schema of structured_cases.py through both APIs, streamed and whole: the answer parses and
validates. `.parse()` with Pydantic models succeeds in both APIs. tool_choice required / named /
allowed_tools always gives one well-formed call of an offered function with valid arguments; a call
of a function not offered never reaches the client as a call. What cannot be enforced is a 400
naming the keyword. The reasoning is not constrained (scripted through the server's test hook).
"""

from __future__ import annotations

import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from server_helpers import ServerProcess
from structured_cases import PERSON, SCHEMAS, validate

pytest.importorskip("llguidance")
pytest.importorskip("starlette")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
THOUGHT = 'Braces {"like": "these"} and [lists] in the reasoning are fine; so is prose.'
RULES = [
    {
        "match": "[reasoning]",
        "reply": f"<|channel|>analysis<|message|>{THOUGHT}<|end|><|start|>assistant<|channel|>final"
        '<|message|>{"name": "Ada", "age": 36}<|return|>',
    },
    # a call of a function the request does not offer
    {
        "match": "[unoffered]",
        "reply": '<|channel|>commentary to=functions.get_news <|constrain|>json<|message|>{"q": "x"}<|call|>',
    },
]
FUNCTIONS = [
    {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
        "strict": True,
    },
    {
        "name": "get_time",
        "description": "Time in a timezone",
        "parameters": {
            "type": "object",
            "properties": {"tz": {"type": "string", "pattern": "^[A-Z][a-z]+/[A-Z][a-z]+$"}},
            "required": ["tz"],
        },
    },
    {"name": "ping", "description": "No arguments"},
]
SCHEMA_OF = {f["name"]: f.get("parameters", {"type": "object", "maxProperties": 0}) for f in FUNCTIONS}
RESPONSES_TOOLS = [{"type": "function", **f} for f in FUNCTIONS]
CHAT_TOOLS = [{"type": "function", "function": f} for f in FUNCTIONS]


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("structured-server")
    rules = folder / "rules.json"
    rules.write_text(json.dumps(RULES))
    proc = ServerProcess(tiny_checkpoint, folder / "server.log", env={"OSS_MLX_SCRIPTED_REPLIES": str(rules)})
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def budget(vocab_dir):
    """max tokens per schema: the shortest valid reply (from the start) plus room to spare."""
    from oss_mlx.constrained import TurnConstraint
    from oss_mlx.structured import OutputConstraint, check
    from oss_mlx.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()

    def tokens(schema: dict) -> int:
        turn = TurnConstraint(check(OutputConstraint(json_schema=schema)), tokenizer, 10_000)
        turn.begin(10_000)
        return len(turn.closing_path()) + 16

    return tokens


def chat_answer(client, schema: dict, max_tokens: int, stream: bool, seed: int) -> tuple[str, str]:
    kwargs = dict(
        model="gpt-oss",
        messages=[{"role": "user", "content": "Answer as JSON."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": schema, "strict": True},
        },
        max_completion_tokens=max_tokens,
        seed=seed,
    )
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        return choice.message.content, choice.finish_reason
    text, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish


def responses_answer(client, schema: dict, max_tokens: int, stream: bool, seed: int) -> tuple[str, str]:
    kwargs = dict(
        model="gpt-oss",
        input="Answer as JSON.",
        text={"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}},
        max_output_tokens=max_tokens,
        extra_body={"seed": seed},
    )
    if not stream:
        r = client.responses.create(**kwargs)
        return r.output_text, r.status
    text, status = "", None
    for event in client.responses.create(stream=True, **kwargs):
        if event.type == "response.output_text.delta":
            text += event.delta
        elif event.type in ("response.completed", "response.incomplete"):
            status = event.response.status
            assert event.response.output_text == text
    return text, status


# ---- every schema, both APIs, streamed and whole ----------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("api", ["chat", "responses"])
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_schema_through_both_apis(client, budget, name, api, stream):
    schema = SCHEMAS[name]
    seed = sorted(SCHEMAS).index(name) + 2 * (api == "chat") + stream
    answer = chat_answer if api == "chat" else responses_answer
    text, finish = answer(client, schema, budget(schema), stream, seed)
    validate(text, schema)
    assert finish == ("stop" if api == "chat" else "completed")


# ---- the openai client's .parse() --------------------------------------------------------------------------


# The example's Pydantic model (nested, a Literal, bounds, a list with min/max length, an Optional).
Recipe = runpy.run_path(str(EXAMPLES / "openai_structured.py"), run_name="example")["Recipe"]


@pytest.mark.parametrize("seed", range(3))
def test_parse_with_a_pydantic_model_in_both_apis(client, seed):
    c = client.chat.completions.parse(
        model="gpt-oss",
        messages=[{"role": "user", "content": "A recipe."}],
        response_format=Recipe,
        max_completion_tokens=64,
        seed=seed,
    )
    assert isinstance(c.choices[0].message.parsed, Recipe)
    r = client.responses.parse(
        model="gpt-oss",
        input="A recipe.",
        text_format=Recipe,
        max_output_tokens=80,
        extra_body={"seed": seed},
    )
    assert isinstance(r.output_parsed, Recipe)


def test_parse_says_length_when_the_budget_cannot_fit_the_json(client):
    """Too few tokens for the shortest valid answer: finish_reason length / status incomplete, which
    the client reports as such (never an invalid answer claimed complete)."""
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(
            model="gpt-oss",
            messages=[{"role": "user", "content": "x"}],
            response_format=Recipe,
            max_completion_tokens=5,
        )
    r = client.responses.create(
        model="gpt-oss",
        input="x",
        text={"format": {"type": "json_schema", "name": "r", "schema": PERSON, "strict": True}},
        max_output_tokens=5,
    )
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"


# ---- tool calls --------------------------------------------------------------------------------------------


def _check_call(name: str, arguments: str, allowed: set[str]) -> None:
    assert name in allowed, name
    validate(arguments, SCHEMA_OF[name])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("seed", range(3))
def test_forced_calls_name_an_offered_tool_with_valid_arguments(client, seed, stream):
    names = {f["name"] for f in FUNCTIONS}
    chat_choices = [
        ("required", names),
        ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
        (
            {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
                {"type": "function", "function": {"name": "ping"}},
                {"type": "function", "function": {"name": "get_weather"}},
            ]}},
            {"ping", "get_weather"},
        ),
    ]  # fmt: skip
    for choice, allowed in chat_choices:
        kwargs = dict(
            model="gpt-oss",
            messages=[{"role": "user", "content": "Tokyo?"}],
            tools=CHAT_TOOLS,
            tool_choice=choice,
            max_completion_tokens=60,
            seed=seed,
            parallel_tool_calls=bool(seed % 2),
        )
        if stream:
            calls: dict[int, dict] = {}
            finish = None
            for chunk in client.chat.completions.create(stream=True, **kwargs):
                for ch in chunk.choices:
                    finish = ch.finish_reason or finish
                    for d in ch.delta.tool_calls or []:
                        call = calls.setdefault(d.index, {"name": "", "arguments": ""})
                        call["name"] += (d.function.name or "") if d.function else ""
                        call["arguments"] += (d.function.arguments or "") if d.function else ""
            found = [(c["name"], c["arguments"]) for c in calls.values()]
        else:
            choice0 = client.chat.completions.create(**kwargs).choices[0]
            finish = choice0.finish_reason
            found = [(c.function.name, c.function.arguments) for c in choice0.message.tool_calls or []]
        assert finish == "tool_calls" and len(found) == 1, (choice, found)
        _check_call(*found[0], allowed)
    responses_choices = [
        ("required", names),
        ({"type": "function", "name": "get_weather"}, {"get_weather"}),
        (
            {
                "type": "allowed_tools",
                "mode": "required",
                "tools": [{"type": "function", "name": "get_time"}],
            },
            {"get_time"},
        ),
    ]
    for choice, allowed in responses_choices:
        kwargs = dict(
            model="gpt-oss",
            input="Tokyo?",
            tools=RESPONSES_TOOLS,
            tool_choice=choice,
            max_output_tokens=60,
            extra_body={"seed": seed},
        )
        if stream:
            done = [
                e for e in client.responses.create(stream=True, **kwargs) if e.type == "response.completed"
            ]
            output = done[0].response.output
        else:
            output = client.responses.create(**kwargs).output
        calls = [item for item in output if item.type == "function_call"]
        assert len(calls) == 1 and [i for i in output if i.type == "message"] == [], (choice, output)
        _check_call(calls[0].name, calls[0].arguments, allowed)


def test_auto_and_none(client):
    names = {f["name"] for f in FUNCTIONS}
    for seed in range(3):
        r = client.chat.completions.create(
            model="gpt-oss",
            messages=[{"role": "user", "content": "Hi"}],
            tools=CHAT_TOOLS,
            max_completion_tokens=40,
            seed=seed,
        )
        for call in r.choices[0].message.tool_calls or []:  # a call, if the model makes one, is valid
            _check_call(call.function.name, call.function.arguments, names)
        r = client.chat.completions.create(
            model="gpt-oss",
            messages=[{"role": "user", "content": "Hi"}],
            tools=CHAT_TOOLS,
            tool_choice="none",
            response_format={"type": "json_object"},
            max_completion_tokens=40,
            seed=seed,
        )
        assert r.choices[0].message.tool_calls is None
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_a_call_of_a_function_not_offered_is_not_a_call(client):
    r = client.chat.completions.create(model="gpt-oss", messages=[{"role": "user", "content": "[unoffered]"}])
    choice = r.choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason == "stop"
    assert choice.message.content == '{"q": "x"}'
    resp = client.responses.create(model="gpt-oss", input="[unoffered]")
    assert [item.type for item in resp.output] == ["message"] and resp.output_text == '{"q": "x"}'


def test_strict_is_echoed_as_enforced(client):
    """Responses echoes each tool's strict as what is enforced: absent and supported -> true; absent
    with a keyword the engine cannot enforce -> false (any JSON object); false -> false."""
    tools = [
        {
            "type": "function",
            "name": "a",
            "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}},
        },
        {"type": "function", "name": "b", "parameters": {"type": "object", "not": {"required": ["x"]}}},
        {"type": "function", "name": "c", "parameters": {"type": "object"}, "strict": False},
    ]
    r = client.responses.create(model="gpt-oss", input="Hi", tools=tools, max_output_tokens=4)
    assert {t.name: t.strict for t in r.tools} == {"a": True, "b": False, "c": False}


# ---- reasoning ---------------------------------------------------------------------------------------------


def test_the_reasoning_is_not_constrained(client):
    """A scripted reasoning full of braces passes unchanged under a JSON schema, in both APIs."""
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": True}}
    r = client.chat.completions.create(
        model="gpt-oss", messages=[{"role": "user", "content": "[reasoning]"}], response_format=fmt
    )
    message = r.choices[0].message
    assert message.model_extra["reasoning_content"] == THOUGHT
    assert json.loads(message.content) == {"name": "Ada", "age": 36}
    resp = client.responses.create(
        model="gpt-oss",
        input="[reasoning]",
        text={"format": {"type": "json_schema", "name": "p", "schema": PERSON, "strict": True}},
    )
    (reasoning,) = [item for item in resp.output if item.type == "reasoning"]
    assert reasoning.content[0].text == THOUGHT and json.loads(resp.output_text) == {"name": "Ada", "age": 36}


# ---- what cannot be enforced -------------------------------------------------------------------------------


def test_unsupported_schemas_are_400_naming_the_keyword(server):
    bad = {"type": "object", "properties": {"x": {"type": "array", "uniqueItems": True}}}
    chat = {"messages": [{"role": "user", "content": "x"}]}

    def chat_format(schema, **extra):
        return {
            **chat,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": schema, **extra},
            },
        }

    def text_format(schema, **extra):
        return {
            "input": "x",
            "text": {"format": {"type": "json_schema", "name": "x", "schema": schema, **extra}},
        }

    color = {"type": "string", "format": "color"}
    cases = [
        (
            "/v1/chat/completions",
            chat_format(bad, strict=True),
            "response_format.json_schema.schema",
            "uniqueItems",
        ),
        ("/v1/responses", text_format(bad, strict=True), "text.format.schema", "uniqueItems"),
        (
            "/v1/chat/completions",
            {
                **chat,
                "tools": [{"type": "function", "function": {"name": "f", "parameters": bad, "strict": True}}],
            },
            "tools[0].function.parameters",
            "uniqueItems",
        ),
        (
            "/v1/responses",
            {"input": "x", "tools": [{"type": "function", "name": "g", "parameters": color, "strict": True}]},
            "tools[0].parameters",
            "format",
        ),
        (
            "/v1/responses",
            text_format({"type": "strng"}),
            "text.format.schema",
            "strng",
        ),  # wrong, not unsupported
        (
            "/v1/chat/completions",
            chat_format({}, strict="yes"),
            "response_format.json_schema.strict",
            "strict",
        ),
    ]
    for path, body, param, needle in cases:
        r = httpx.post(f"{server.url}{path}", json=body, timeout=30)
        assert r.status_code == 400, (path, r.text)
        error = r.json()["error"]
        assert error["param"] == param and needle in error["message"], error
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_schemas_that_would_stall_or_admit_nothing_are_400_before_queueing(server):
    """A counted repetition the lexer cannot afford (a mask of `a{100000}` took 4 s; `(a{1000}){1000}`
    held the mask thread for minutes), and a schema no text satisfies (only a reference to itself),
    are refused before the request is queued: a 400 naming the parameter, in one line, at once."""
    import time

    tools = [{"type": "function", "name": "f", "parameters": {"$ref": "#"}, "strict": True}]
    cases = [
        ({"type": "string", "pattern": "^(a{1000}){1000}$"}, "text.format.schema", "1,000,000 repetitions"),
        ({"type": "string", "pattern": "^a{100000}$"}, "text.format.schema", "maxLength"),
        ({"type": "object", "patternProperties": {"^x{20000}$": {}}}, "text.format.schema", "20,000"),
        ({"$ref": "#"}, "text.format.schema", "no text satisfies"),
    ]
    bodies = [
        (
            {"input": "x", "text": {"format": {"type": "json_schema", "name": "x", "schema": schema}}},
            param,
            needle,
        )
        for schema, param, needle in cases
    ]
    required = {"input": "x", "tools": tools, "tool_choice": "required"}
    bodies.append((required, "tools[0].parameters", "no text satisfies"))
    for body, param, needle in bodies:
        start = time.monotonic()
        r = httpx.post(f"{server.url}/v1/responses", json=body, timeout=30)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and needle in error["message"], error
        assert "<state>" not in error["message"] and "\n" not in error["message"]
        assert time.monotonic() - start < 5
    assert httpx.get(f"{server.url}/health", timeout=5).json()["status"] == "ok"


# ---- the examples ------------------------------------------------------------------------------------------


def run_example(name: str, server) -> list[str]:
    """An example as a user runs it, against the server (the random model: replies capped); its lines."""
    cmd = [sys.executable, str(EXAMPLES / name), "--base-url", f"{server.url}/v1", "--max-tokens", "60"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_the_structured_examples_run_against_the_server(server):
    """examples/openai_structured.py (.parse() in both APIs) and examples/forced_tool_call.py."""
    lines = run_example("openai_structured.py", server)
    assert [line.split(" ", 2)[:2] for line in lines] == [["responses:", "Recipe"], ["chat:", "Recipe"]]
    for line in lines:
        Recipe.model_validate_json(line.split(" ", 2)[2])
    calls = run_example("forced_tool_call.py", server)
    assert len(calls) == 4, calls
    example = runpy.run_path(str(EXAMPLES / "forced_tool_call.py"), run_name="example")
    parameters = {f["name"]: f["parameters"] for f in example["FUNCTIONS"]}
    for line, allowed in zip(calls, [{"get_weather", "get_time"}, {"get_time"}] * 2):
        found = re.fullmatch(r"(responses|chat) \((.*)\): (\w+)\((.*)\)", line)
        assert found and found[3] in allowed, line
        validate(found[4], parameters[found[3]])
