"""Harmony rendering (token-for-token against openai-harmony) and the tolerant stream parser."""

from __future__ import annotations

import json
import random

import pytest

from oss_mlx import harmony as H
from oss_mlx.harmony import tools as harmony_tools
from oss_mlx.tokenizer import HarmonyTokenizer

oh = pytest.importorskip("openai_harmony")
from openai_harmony import (  # noqa: E402
    Author,
    Conversation,
    DeveloperContent,
    ReasoningEffort,
    RenderConversationConfig,
    Role,
    StreamableParser,
    SystemContent,
    ToolDescription,
)
from openai_harmony import Message as HMessage  # noqa: E402

DATE = "2025-06-28"


# --- building both sides --------------------------------------------------------------------------


def _theirs(m: H.Message) -> HMessage:
    """The openai-harmony twin of one of our messages."""
    role = Role(m.role)
    if m.name is not None:
        msg = HMessage.from_author_and_content(Author.new(role, m.name), m.content)
    else:
        msg = HMessage.from_role_and_content(role, m.content)
    if m.channel is not None:
        msg = msg.with_channel(m.channel)
    if m.recipient is not None:
        msg = msg.with_recipient(m.recipient)
    if m.content_type is not None:
        msg = msg.with_content_type(m.content_type)
    return msg


def _system(effort: str = "medium", date: str | None = DATE) -> HMessage:
    content = SystemContent.new().with_reasoning_effort(ReasoningEffort(effort.capitalize()))
    if date is not None:
        content = content.with_conversation_start_date(date)
    return HMessage.from_role_and_content(Role.SYSTEM, content)


def _developer(instructions: str | None = None, tools: list[H.Tool] | None = None) -> HMessage:
    content = DeveloperContent.new()
    if instructions is not None:
        content = content.with_instructions(instructions)
    if tools:
        content = content.with_function_tools(
            [ToolDescription.new(t.name, t.description, t.parameters) for t in tools]
        )
    return HMessage.from_role_and_content(Role.DEVELOPER, content)


def _reference(enc, messages: list[HMessage], for_completion: bool = True, drop: bool = True) -> list[int]:
    conv = Conversation.from_messages(messages)
    config = RenderConversationConfig(auto_drop_analysis=drop)
    if for_completion:
        return enc.render_conversation_for_completion(conv, Role.ASSISTANT, config)
    return enc.render_conversation(conv, config)


def _assert_same(tok: HarmonyTokenizer, ours: list[int], theirs: list[int]) -> None:
    if ours != theirs:  # show text, which is far easier to read than ids
        assert tok.decode(ours) == tok.decode(theirs)
    assert ours == theirs


WEATHER = H.Tool(
    "get_weather",
    "Gets the current weather in the provided location.",
    {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
            "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
        },
        "required": ["location"],
    },
)
TOOLS = [
    WEATHER,
    H.Tool("get_time", "Current time.\nNo arguments.", None),
    H.Tool("noop", "", {"type": "object", "properties": {}}),
    H.Tool(
        "search",
        "Search documents.",
        {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "What to look for"},
                "limit": {"type": "integer", "default": 10},
                "score": {"type": "number", "description": "Minimum score", "default": 0.5},
                "exact": {"type": "boolean", "default": False},
                "tags": {"type": "array", "items": {"type": "string"}, "description": "Tags to match"},
                "sort": {"type": "string", "enum": ["relevance", "date"]},
                "level": {"type": "integer", "enum": [1, 2, 3]},
                "since": {"type": ["string", "null"], "description": "ISO date"},
                "cursor": {"type": "string", "nullable": True},
                "filter": {
                    "type": "object",
                    "description": "Filters",
                    "properties": {
                        "author": {"type": "string"},
                        "year": {"type": "integer", "description": "Year of publication"},
                        "range": {
                            "type": "object",
                            "properties": {"from": {"type": "number"}, "to": {"type": "number"}},
                            "required": ["from"],
                        },
                    },
                    "required": ["author"],
                },
                "points": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                        "required": ["x", "y"],
                    },
                },
                "anything": {},
                "raw": {"type": "array"},
                "id": {
                    "oneOf": [{"type": "string"}, {"type": "integer", "description": "numeric id"}],
                    "description": "Document id",
                },
                "mode": {"type": "string", "title": "Mode", "examples": ["fast", "slow"], "default": "fast"},
            },
            "required": ["query"],
        },
    ),
]


# --- rendering ------------------------------------------------------------------------------------


@pytest.mark.parametrize("effort", ["low", "medium", "high"])
@pytest.mark.parametrize("date", [None, DATE])
def test_system_message(tok, enc, effort: str, date: str | None) -> None:
    ours = H.render_conversation([H.Message("user", "Hi")], tok, reasoning_effort=effort, current_date=date)
    theirs = _reference(enc, [_system(effort, date), _theirs(H.Message("user", "Hi"))])
    _assert_same(tok, ours, theirs)


def test_system_options(tok, enc) -> None:
    content = (
        SystemContent.new()
        .with_model_identity("You are a test.")
        .with_knowledge_cutoff("2023-10")
        .with_reasoning_effort(ReasoningEffort.HIGH)
        .with_conversation_start_date(DATE)
    )
    ours = H.render_conversation(
        [H.Message("user", "x")],
        tok,
        reasoning_effort="high",
        current_date=DATE,
        model_identity="You are a test.",
        knowledge_cutoff="2023-10",
    )
    theirs = _reference(
        enc, [HMessage.from_role_and_content(Role.SYSTEM, content), _theirs(H.Message("user", "x"))]
    )
    _assert_same(tok, ours, theirs)
    assert H.render_system(reasoning_effort=None, knowledge_cutoff=None, model_identity=None) == (
        "# Valid channels: analysis, commentary, final. Channel must be included for every message."
    )
    with pytest.raises(ValueError):
        H.render_system(reasoning_effort="extreme")


def test_developer_instructions_only(tok, enc) -> None:
    instructions = "Answer like a pirate.\n\nKeep it short."
    ours = H.render_conversation(
        [H.Message("user", "Hi")], tok, developer_instructions=instructions, current_date=DATE
    )
    theirs = _reference(enc, [_system(), _developer(instructions), _theirs(H.Message("user", "Hi"))])
    _assert_same(tok, ours, theirs)


@pytest.mark.parametrize("instructions", [None, "Use the tools when useful."])
def test_developer_with_function_tools(tok, enc, instructions: str | None) -> None:
    user = H.Message("user", "What's the weather in Paris?")
    ours = H.render_conversation(
        [user],
        tok,
        tools=TOOLS,
        developer_instructions=instructions,
        current_date=DATE,
        reasoning_effort="low",
    )
    theirs = _reference(enc, [_system("low"), _developer(instructions, TOOLS), _theirs(user)])
    _assert_same(tok, ours, theirs)
    text = tok.decode(ours)
    assert "Calls to these tools must go to the commentary channel: 'functions'." in text
    assert "type get_time = () => any;" in text
    # OpenAI-style tool dicts are accepted too.
    as_dicts = [{"type": "function", "function": t.__dict__} for t in TOOLS]
    kwargs = dict(developer_instructions=instructions, current_date=DATE, reasoning_effort="low")
    assert H.render_conversation([user], tok, tools=as_dicts, **kwargs) == ours


def test_tool_schema_rendering_text() -> None:
    text = H.render_developer(None, [WEATHER, TOOLS[1]])
    assert text == (
        "# Tools\n\n## functions\n\nnamespace functions {\n\n"
        "// Gets the current weather in the provided location.\n"
        "type get_weather = (_: {\n"
        "// The city and state, e.g. San Francisco, CA\n"
        "location: string,\n"
        'format?: "celsius" | "fahrenheit", // default: celsius\n'
        "}) => any;\n\n"
        "// Current time.\n// No arguments.\n"
        "type get_time = () => any;\n\n"
        "} // namespace functions"
    )


def _random_schema(rng: random.Random, depth: int = 0):
    kinds = [
        "string",
        "number",
        "integer",
        "boolean",
        "array",
        "object",
        "enum",
        "list",
        "oneOf",
        "null",
        "none",
    ]
    kind = rng.choice(kinds[:4] if depth > 2 else kinds)
    if kind == "enum":
        schema = {
            "type": rng.choice(["string", "integer"]),
            "enum": rng.sample(["a", "b", 1, "c d"], rng.randint(0, 3)),
        }
    elif kind == "list":
        schema = {"type": rng.sample(["string", "null", "integer", "object"], rng.randint(0, 3))}
    elif kind == "oneOf":
        schema = {"oneOf": [_random_schema(rng, depth + 1) for _ in range(rng.randint(0, 3))]}
    elif kind == "none":
        schema = {}
    else:
        schema = {"type": kind}
    if kind == "array" and rng.random() < 0.8:
        schema["items"] = _random_schema(rng, depth + 1)
    if kind == "object" and rng.random() < 0.9:
        props = {
            f"{rng.choice(['p', 'q', 'camelCase', 'snake_name'])}{i}": _random_schema(rng, depth + 1)
            for i in range(4)
        }
        schema["properties"] = dict(list(props.items())[: rng.randint(0, 4)])
        if rng.random() < 0.7:
            schema["required"] = rng.sample(
                [*schema["properties"], "missing"], rng.randint(0, len(schema["properties"]))
            )
    words = ["a", "two words", "ü", 'q"z', "line\nnext", ""]
    defaults = ["x", 1, 1.5, 0.25, 1e-05, 1e21, -3, True, None, [1, "b"], {"k": {"z": [0.5]}}, 'q"z']
    for key, p in [
        ("description", 0.4),
        ("title", 0.15),
        ("nullable", 0.2),
        ("default", 0.3),
        ("examples", 0.1),
    ]:
        if rng.random() < p:
            if key == "nullable":
                schema[key] = rng.choice([True, False])
            elif key == "default":
                schema[key] = rng.choice(defaults)
            elif key == "examples":
                schema[key] = rng.sample(["e1", 2, "e3"], rng.randint(0, 3))
            else:
                schema[key] = rng.choice(words)
    return schema


def test_tool_schemas_fuzzed_against_openai_harmony(tok, enc) -> None:
    """Random JSON schemas (nesting, enums, oneOf, nullable, defaults, comments) render identically."""
    rng = random.Random(1234)
    for case in range(150):
        tools = []
        for i in range(rng.randint(1, 3)):
            params = None if rng.random() < 0.1 else _random_schema(rng)
            if params is not None and rng.random() < 0.5:
                params = {"type": "object", "properties": {"only": params}, "required": ["only"]}
            tools.append(
                H.Tool(f"tool_{i}", rng.choice(["", "Does things.", "two\nlines", "trailing\n"]), params)
            )
        ours = H.render_developer(None, tools)
        theirs = _reference(enc, [_developer(None, tools)], for_completion=False)
        expected = tok.decode(theirs).removeprefix("<|start|>developer<|message|>").removesuffix("<|end|>")
        assert ours == expected, f"case {case}: {json.dumps([t.__dict__ for t in tools])}"


def test_multi_turn_drops_previous_analysis(tok, enc) -> None:
    history = [
        H.Message("user", "What is 2+2?"),
        H.Message("assistant", "Simple arithmetic: 4.", channel="analysis"),
        H.Message("assistant", "2+2 = 4.", channel="final"),
        H.Message("user", "And 3+3?"),
    ]
    ours = H.render_conversation(history, tok, current_date=DATE)
    _assert_same(tok, ours, _reference(enc, [_system(), *map(_theirs, history)]))
    assert "Simple arithmetic" not in tok.decode(ours)
    # Kept when asked, as with auto_drop_analysis=False.
    kept = H.render_conversation(history, tok, current_date=DATE, drop_analysis=False)
    _assert_same(tok, kept, _reference(enc, [_system(), *map(_theirs, history)], drop=False))
    assert "Simple arithmetic" in tok.decode(kept)
    # The next turn's reasoning is in progress: the completed turn's analysis is still dropped and
    # the current one kept (openai-harmony 0.0.8 keeps both here; see _drop_old_analysis).
    ongoing = [*history, H.Message("assistant", "6, easy.", channel="analysis")]
    spec = [m for m in ongoing if m.content != "Simple arithmetic: 4."]
    for completion in (True, False):
        ours = H.render_conversation(ongoing, tok, current_date=DATE, for_completion=completion)
        _assert_same(tok, ours, _reference(enc, [_system(), *map(_theirs, spec)], completion, drop=False))
    # Two full turns: both turns' analysis goes (the spec; openai-harmony 0.0.8 keeps the second).
    two_turns = [*ongoing, H.Message("assistant", "3+3 = 6.", channel="final"), H.Message("user", "4+4?")]
    ours = H.render_conversation(two_turns, tok, current_date=DATE)
    spec = [m for m in two_turns if m.channel != "analysis"]
    _assert_same(tok, ours, _reference(enc, [_system(), *map(_theirs, spec)], drop=False))
    assert "6, easy." not in tok.decode(ours)
    buggy = _reference(enc, [_system(), *map(_theirs, two_turns)])
    assert "6, easy." in tok.decode(buggy)  # the library's behaviour we deliberately differ from


@pytest.mark.parametrize("for_completion", [True, False])
def test_tool_call_round_trip(tok, enc, for_completion: bool) -> None:
    conversation = [
        H.Message("user", "Weather in Tokyo?"),
        H.Message("assistant", "Need to call get_weather.", channel="analysis"),
        H.Message(
            "assistant",
            '{"location": "Tokyo"}',
            channel="commentary",
            recipient="functions.get_weather",
            content_type="<|constrain|>json",
        ),
        H.Message(
            "tool",
            '{"temperature": 20}',
            channel="commentary",
            recipient="assistant",
            name="functions.get_weather",
        ),
    ]
    ours = H.render_conversation(
        conversation, tok, tools=[WEATHER], current_date=DATE, for_completion=for_completion
    )
    reference = [_system(), _developer(None, [WEATHER]), *map(_theirs, conversation)]
    _assert_same(tok, ours, _reference(enc, reference, for_completion))
    text = tok.decode(ours)
    assert (
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>"
        '{"location": "Tokyo"}<|call|>'
        "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"
        '{"temperature": 20}<|end|>'
    ) in text
    # The continuation: the final answer, then the next user turn (analysis of the turn is dropped).
    done = [
        *conversation,
        H.Message("assistant", "It is 20°C in Tokyo.", channel="final"),
        H.Message("user", "Thanks"),
    ]
    ours = H.render_conversation(done, tok, tools=[WEATHER], current_date=DATE, for_completion=for_completion)
    reference = [_system(), _developer(None, [WEATHER]), *map(_theirs, done)]
    _assert_same(tok, ours, _reference(enc, reference, for_completion))


# --- tools on the analysis channel: dropped with their calls once the turn is complete --------------


def _call(recipient: str, args: str, content_type: str | None = None, channel: str = "analysis") -> H.Message:
    return H.Message("assistant", args, channel=channel, recipient=recipient, content_type=content_type)


def _output(tool: str, text: str, channel: str = "analysis") -> H.Message:
    """A tool's output, on the call's channel (as gpt-oss's reference tools send it back)."""
    return H.Message("tool", text, channel=channel, recipient="assistant", name=tool)


PYTHON_TURN = [
    H.Message("user", "What is 2**100?"),
    H.Message("assistant", "Use python.", channel="analysis"),
    _call("python", "print(2**100)", "code"),
    _output("python", "1267650600228229401496703205376"),
    H.Message("assistant", "2**100 = 1267650600228229401496703205376.", channel="final"),
]
BROWSER_TURN = [
    H.Message("user", "Any news on MLX?"),
    _call("browser.search", '{"query": "MLX release"}', "json"),
    _output("browser.search", "【0†MLX 0.32 released†github.com】"),
    H.Message("assistant", "Open the first result.", channel="analysis"),
    _call("browser.open", '{"id": 0}', "json"),
    _output("browser.open", "L0: MLX 0.32 adds ..."),
    H.Message("assistant", "MLX 0.32 was released.", channel="final"),
]
FUNCTION_ON_ANALYSIS_TURN = [
    H.Message("user", "Weather in Tokyo?"),
    _call("functions.get_weather", '{"location": "Tokyo"}', "<|constrain|>json"),
    _output("functions.get_weather", '{"temperature": 20}'),
    H.Message("assistant", "It is 20°C in Tokyo.", channel="final"),
]
NEXT_USER = H.Message("user", "Thanks! And tomorrow?")
ANALYSIS_TOOL_TURNS = {
    "python": PYTHON_TURN,
    "browser": BROWSER_TURN,
    "function-on-analysis": FUNCTION_ON_ANALYSIS_TURN,
    "commentary-call-kept": [  # a function called on commentary stays, call and output (the spec)
        H.Message("user", "Weather in Tokyo?"),
        H.Message("assistant", "Need get_weather.", channel="analysis"),
        _call("functions.get_weather", '{"location": "Tokyo"}', "<|constrain|>json", "commentary"),
        _output("functions.get_weather", '{"temperature": 20}', "commentary"),
        H.Message("assistant", "It is 20°C in Tokyo.", channel="final"),
    ],
}


@pytest.mark.parametrize("case", sorted(ANALYSIS_TOOL_TURNS))
@pytest.mark.parametrize("for_completion", [True, False])
def test_completed_turn_drops_tool_use_on_analysis(tok, enc, case: str, for_completion: bool) -> None:
    """One completed turn, then the next user message: openai-harmony drops every analysis-channel
    message, whoever wrote it (tool outputs too), and so do we: exactly its tokens."""
    conversation = [*ANALYSIS_TOOL_TURNS[case], NEXT_USER]
    tools = [WEATHER] if case.startswith(("function", "commentary")) else None
    ours = H.render_conversation(
        conversation, tok, tools=tools, current_date=DATE, for_completion=for_completion
    )
    developer = [_developer(None, [WEATHER])] if tools else []
    reference = [_system(), *developer, *map(_theirs, conversation)]
    _assert_same(tok, ours, _reference(enc, reference, for_completion))
    text = tok.decode(ours)
    assert "to=assistant<|channel|>analysis" not in text  # no tool output survives its dropped call
    assert "<|channel|>analysis" not in text
    if case == "commentary-call-kept":
        assert "functions.get_weather to=assistant<|channel|>commentary" in text


@pytest.mark.parametrize("case", ["python", "browser", "function-on-analysis"])
def test_tool_use_of_the_current_turn_is_kept(tok, enc, case: str) -> None:
    """A pending turn (its tool output not answered yet) keeps its reasoning, calls and outputs: the
    model continues from them. After a completed turn, only that turn's analysis goes."""
    turn = ANALYSIS_TOOL_TURNS[case]
    pending = turn[:-1]  # up to the last tool output
    tools = [WEATHER] if case.startswith("function") else None
    developer = [_developer(None, [WEATHER])] if tools else []
    ours = H.render_conversation(pending, tok, tools=tools, current_date=DATE)
    _assert_same(tok, ours, _reference(enc, [_system(), *developer, *map(_theirs, pending)]))
    assert "to=assistant<|channel|>analysis" in tok.decode(ours)
    # The same pending turn after a completed python turn: the completed turn's tool use is dropped,
    # the current one's kept. openai-harmony 0.0.8 drops nothing here (the conversation does not end
    # on a final answer): the documented difference, so compared with its rendering of the spec's
    # messages.
    conversation = [*PYTHON_TURN, *pending]
    ours = H.render_conversation(conversation, tok, tools=tools, current_date=DATE)
    spec = [m for m in PYTHON_TURN if m.channel != "analysis"] + pending
    _assert_same(tok, ours, _reference(enc, [_system(), *developer, *map(_theirs, spec)], drop=False))
    pending_python = sum(m.name == "python" for m in pending)  # turn 1's python output is not kept
    assert tok.decode(ours).count("<|start|>python to=assistant") == pending_python


def test_several_turns_with_tools_drop_every_completed_turn(tok, enc) -> None:
    """Three completed turns using python, the browser and a function on analysis, then a question:
    only the final answers remain. openai-harmony 0.0.8 drops only the first turn's (the documented
    difference): ours equals its rendering of the spec's messages, and its own keeps later outputs."""
    conversation = [*PYTHON_TURN, *BROWSER_TURN, *FUNCTION_ON_ANALYSIS_TURN, NEXT_USER]
    ours = H.render_conversation(conversation, tok, tools=[WEATHER], current_date=DATE)
    spec = [m for m in conversation if m.channel != "analysis"]
    developer = _developer(None, [WEATHER])
    _assert_same(tok, ours, _reference(enc, [_system(), developer, *map(_theirs, spec)], drop=False))
    assert [m.role for m in spec] == ["user", "assistant"] * 3 + ["user"]
    theirs = tok.decode(_reference(enc, [_system(), developer, *map(_theirs, conversation)]))
    assert "browser.open to=assistant<|channel|>analysis" in theirs  # what 0.0.8 leaves in


def test_messages_with_own_system_and_developer(tok, enc) -> None:
    conversation = [
        H.Message("system", "Custom system prompt."),
        H.Message("developer", "# Instructions\n\nBe terse."),
        H.Message("user", "Hi", name="alice"),
        H.Message("assistant", "Hello!", channel="final"),
        H.Message("user", "a <|end|> b"),  # special-token text in content stays text
    ]
    ours = H.render_conversation(conversation, tok, tools=[WEATHER], developer_instructions="ignored")
    _assert_same(tok, ours, _reference(enc, list(map(_theirs, conversation))))
    # A system message of ours alone: the developer message goes after it.
    ours = H.render_conversation(
        conversation[:1] + conversation[2:3], tok, developer_instructions="Be terse."
    )
    _assert_same(
        tok,
        ours,
        _reference(enc, [_theirs(conversation[0]), _developer("Be terse."), _theirs(conversation[2])]),
    )


def test_render_errors(tok) -> None:
    with pytest.raises(ValueError, match="needs the tool's name"):
        H.render_message(H.Message("tool", "{}"), tok)
    with pytest.raises(ValueError, match="unknown role"):
        H.render_message(H.Message("robot", "x"), tok)


def test_default_number_formatting() -> None:
    # serde_json's layout, not Python's repr.
    assert [harmony_tools._json(v) for v in (1e-05, 1e-06, 1e16, 1e21, 1.0, 100.0, -0.0, 0.25, 1234.5)] == [
        "0.00001", "1e-6", "1e16", "1e21", "1.0", "100.0", "-0.0", "0.25", "1234.5",
    ]  # fmt: skip
    assert harmony_tools._json({"a": [1, "ü", None, True]}) == '{"a":[1,"ü",null,true]}'


# --- parsing --------------------------------------------------------------------------------------


def _parse(tok, text: str, role: str | None = "assistant", finish: bool = True):
    parser = H.StreamParser(tok, role=role)
    events = []
    for t in tok.encode(text, allow_special=True):
        events += parser.feed(t)
    if finish:
        events += parser.finish()
    return parser, events


def _streamed(events) -> list[tuple[str, str | None, str]]:
    """Deltas merged per consecutive (channel, recipient)."""
    out: list[tuple[str, str | None, str]] = []
    for e in events:
        if isinstance(e, H.TextDelta):
            if out and out[-1][:2] == (e.channel, e.recipient):
                out[-1] = (e.channel, e.recipient, out[-1][2] + e.text)
            else:
                out.append((e.channel, e.recipient, e.text))
    return out


def _as_tuples(messages) -> list[tuple]:
    return [(m.role, m.channel, m.recipient, m.content_type, m.content) for m in messages]


def _harmony_parse(enc, ids: list[int], role=Role.ASSISTANT):
    parser = StreamableParser(enc, role=role)
    deltas: list[tuple[str, str]] = []
    for t in ids:
        parser.process(t)
        if parser.last_content_delta:
            deltas.append((parser.current_channel, parser.last_content_delta))
    parser.process_eos()
    messages = [
        (m.author.role.value, m.channel, m.recipient, m.content_type, "".join(c.text for c in m.content))
        for m in parser.messages
    ]
    return messages, deltas


WELL_FORMED = [
    "<|channel|>analysis<|message|>User says hi. Respond politely.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>Hello! How can I help you today? 😊<|return|>",
    "<|channel|>analysis<|message|>Need the weather.<|end|>"
    "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
    '{"location":"Tokyo","format":"celsius"}<|call|>',
    "<|channel|>commentary<|message|>Let me check that.<|end|>"
    '<|start|>assistant to=functions.search<|channel|>commentary json<|message|>{"query": "日本"}<|call|>',
    "<|channel|>final<|message|>Line one.\n\nLine two — with ünïcödé and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢.<|return|>",
]


@pytest.mark.parametrize("text", WELL_FORMED)
def test_well_formed_stream_matches_openai_harmony(tok, enc, text: str) -> None:
    ids = tok.encode(text, allow_special=True)
    parser, events = _parse(tok, text)
    theirs, their_deltas = _harmony_parse(enc, ids)
    assert _as_tuples(parser.messages) == theirs
    assert [e.message for e in events if isinstance(e, H.MessageDone)] == parser.messages
    ours_by_channel: dict[str, str] = {}
    for channel, _, piece in _streamed(events):
        ours_by_channel[channel] = ours_by_channel.get(channel, "") + piece
    theirs_by_channel: dict[str, str] = {}
    for channel, piece in their_deltas:
        theirs_by_channel[channel] = theirs_by_channel.get(channel, "") + piece
    assert ours_by_channel == theirs_by_channel
    assert H.parse_completion(ids, tok) == parser.messages


def test_analysis_then_final_events(tok) -> None:
    parser, events = _parse(tok, WELL_FORMED[0])
    assert _streamed(events) == [
        ("analysis", None, "User says hi. Respond politely."),
        ("final", None, "Hello! How can I help you today? 😊"),
    ]
    done = [e for e in events if isinstance(e, H.MessageDone)]
    assert [d.end_token for d in done] == [tok.END, tok.RETURN]
    assert not any(isinstance(e, H.ToolCall) for e in events)


def test_tool_call_event(tok) -> None:
    parser, events = _parse(tok, WELL_FORMED[1])
    calls = [e for e in events if isinstance(e, H.ToolCall)]
    assert len(calls) == 1
    call = calls[0]
    assert (call.name, call.recipient, call.channel) == ("get_weather", "functions.get_weather", "commentary")
    assert call.content_type == "<|constrain|>json"
    assert json.loads(call.arguments) == {"location": "Tokyo", "format": "celsius"}
    assert events[-1] is call and isinstance(events[-2], H.MessageDone)
    assert ("commentary", "functions.get_weather", call.arguments) in _streamed(events)


def test_stream_with_start_token_and_tool_result(tok) -> None:
    text = (
        "<|start|>assistant<|channel|>commentary to=functions.f <|constrain|>json<|message|>{}<|call|>"
        "<|start|>functions.f to=assistant<|channel|>commentary<|message|>42<|end|>"
        "<|start|>assistant<|channel|>final<|message|>It is 42.<|return|>"
    )
    for role in ("assistant", None):
        parser, events = _parse(tok, text, role=role)
        assert _as_tuples(parser.messages) == [
            ("assistant", "commentary", "functions.f", "<|constrain|>json", "{}"),
            ("tool", "commentary", "assistant", None, "42"),
            ("assistant", "final", None, None, "It is 42."),
        ]
        assert parser.messages[1].name == "functions.f"
        assert [e.name for e in events if isinstance(e, H.ToolCall)] == ["f"]


# Malformed output: (model text, expected messages as (channel, recipient, content)).
MALFORMED = {
    "no header at all": ("Just an answer.<|return|>", [("final", None, "Just an answer.")]),
    "no header, leading space": (" Just an answer.<|return|>", [("final", None, " Just an answer.")]),
    "no channel": ("<|message|>Answer.<|return|>", [("final", None, "Answer.")]),
    "recipient before channel": (
        " to=functions.x<|channel|>commentary json<|message|>{}<|call|>",
        [("commentary", "functions.x", "{}")],
    ),
    "recipient after channel": (
        "<|start|>assistant<|channel|>commentary to=functions.x <|constrain|>json<|message|>{}<|call|>",
        [("commentary", "functions.x", "{}")],
    ),
    "recipient, no channel": (" to=functions.x<|message|>{}<|call|>", [("commentary", "functions.x", "{}")]),
    "unknown channel": ("<|channel|>thoughts<|message|>Hmm.<|end|>", [("thoughts", None, "Hmm.")]),
    "header garbage": (
        "<|channel|>final here is my answer<|message|>: 42<|return|>",
        [("final", None, "here is my answer: 42")],
    ),
    "garbled analysis header stays analysis": (
        "<|channel|>analysis some stray words here<|message|>thinking<|end|>",
        [("analysis", None, "some stray words herethinking")],
    ),
    "header without message token": ("<|channel|>final Hello<|return|>", [("final", None, "Hello")]),
    "garbage after start": (
        "<|start|>Hello there my friend<|end|>",
        [("final", None, "Hello there my friend")],
    ),
    "special tokens mid-content": (
        "<|channel|>final<|message|>A<|message|>B<|constrain|>C<|reserved_200010|>D<|startoftext|>E<|return|>",
        [("final", None, "ABCDE")],
    ),
    "channel mid-content starts a message": (
        "<|channel|>analysis<|message|>think<|channel|>final<|message|>answer<|return|>",
        [("analysis", None, "think"), ("final", None, "answer")],
    ),
    "start mid-content starts a message": (
        "<|channel|>analysis<|message|>think<|start|>assistant<|channel|>final<|message|>answer<|return|>",
        [("analysis", None, "think"), ("final", None, "answer")],
    ),
    "text after return": (
        "<|channel|>final<|message|>Done.<|return|> trailing words",
        [("final", None, "Done."), ("final", None, " trailing words")],
    ),
    "message without start after end": (
        "<|channel|>analysis<|message|>a<|end|><|channel|>final<|message|>b<|return|>",
        [("analysis", None, "a"), ("final", None, "b")],
    ),
    "eof mid-message": (
        "<|channel|>analysis<|message|>Let me think about",
        [("analysis", None, "Let me think about")],
    ),
    "eof mid-header": (
        "<|channel|>analysis<|message|>a<|end|><|start|>assistant<|channel|>fin",
        [("analysis", None, "a")],
    ),
    "empty": ("", []),
    "only end tokens": ("<|end|><|return|><|call|>", []),
    "repeated role": ("assistant<|channel|>final<|message|>x<|return|>", [("final", None, "x")]),
    "endoftext ends": ("<|channel|>final<|message|>x<|endoftext|>", [("final", None, "x")]),
    "message token twice in header": (
        "<|channel|>final<|message|><|message|>x<|return|>",
        [("final", None, "x")],
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_output_never_raises(tok, enc, case: str) -> None:
    text, expected = MALFORMED[case]
    parser, events = _parse(tok, text)
    assert [(m.channel, m.recipient, m.content) for m in parser.messages] == expected
    # Everything streamed is in the messages, and nothing else.
    assert "".join(e.text for e in events if isinstance(e, H.TextDelta)) == "".join(m[2] for m in expected)


def test_openai_harmony_raises_where_we_do_not(tok, enc) -> None:
    # Why the parser is ours: openai-harmony's StreamableParser gives up on sloppy output.
    ids = tok.encode("<|channel|>final<|message|>Done.<|return|> trailing words", allow_special=True)
    with pytest.raises(oh.HarmonyError):
        _harmony_parse(enc, ids)


def test_header_too_long_degrades_to_text(tok) -> None:
    text = " to=functions." + "very_long_name_" * 40 + "<|return|>"
    parser, events = _parse(tok, text)
    assert parser.messages[0].channel == "final"
    # What follows the header limit is text; the address itself never is.
    content = parser.messages[0].content
    assert "to=" not in content and text.removesuffix("<|return|>").endswith(content) and len(content) > 300
    # It streamed before the end, once the header limit was passed.
    first = next(i for i, e in enumerate(events) if isinstance(e, H.TextDelta))
    assert first < len(events) - 2


def test_a_broken_header_never_shows_its_address(tok) -> None:
    """A header the model garbles (a forced `to=functions.` it does not complete, a recipient with
    words after it) becomes text without its `to=...` address: headers are not prose."""
    cases = {
        "<|channel|>commentary to=functions. Paris weather<|message|>hi<|end|>": (
            "commentary",
            "Paris weatherhi",
        ),
        "<|channel|>commentary to=functions.get weather now please and more<|end|>": (
            "commentary",
            "weather now please and more",
        ),
        "<|channel|>final to=functions.x blah blah blah blah blah blah blah<|return|>": (
            "final",
            "blah blah blah blah blah blah blah",
        ),
    }
    for text, (channel, content) in cases.items():
        parser, _ = _parse(tok, text)
        assert [(m.channel, m.recipient, m.content) for m in parser.messages] == [(channel, None, content)], (
            text
        )


def test_a_call_header_cut_off_shows_no_text(tok) -> None:
    """A reply that ends (max_tokens) inside a forced call's header leaves no fragment of it (` t`,
    ` to`, `json`) in visible text; a cut-off header that holds words is still kept as text."""
    cuts = [
        "<|channel|>commentary t",
        "<|channel|>commentary to",
        "<|channel|>commentary to=functions.f",
        "<|channel|>commentary to=functions.f <|constrain|>json",
        " to=functions.f<|channel|>commentary",
    ]
    for cut in cuts:
        parser, events = _parse(tok, cut)
        assert not [e for e in events if isinstance(e, H.TextDelta)], (cut, events)
        assert all(not m.content for m in parser.messages), cut
    parser, _ = _parse(tok, "<|channel|>final some words that are not a header")
    assert "words" in parser.messages[0].content


def test_unterminated_tool_call_is_not_executed(tok) -> None:
    parser, events = _parse(tok, '<|channel|>commentary to=functions.f <|constrain|>json<|message|>{"a": ')
    assert parser.messages[0].content == '{"a": '
    assert not any(isinstance(e, H.ToolCall) for e in events)
    # ...but one ended with <|end|> instead of <|call|> is still the call the model meant.
    parser, events = _parse(tok, '<|channel|>commentary to=functions.f json<|message|>{"a": 1}<|end|>')
    assert [e.arguments for e in events if isinstance(e, H.ToolCall)] == ['{"a": 1}']


def test_utf8_split_across_tokens_streams_whole_characters(tok) -> None:
    content = "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🎉👩‍👩‍👧 ナイーブ"
    ids = [tok.CHANNEL, *tok.encode("final"), tok.MESSAGE, *tok.encode(content), tok.RETURN]
    assert any(_partial_utf8(tok.token_bytes(i)) for i in ids)
    parser = H.StreamParser(tok)
    deltas = [e.text for t in ids for e in parser.feed(t) if isinstance(e, H.TextDelta)]
    assert "".join(deltas) == content
    assert all("\ufffd" not in d for d in deltas)
    assert len(deltas) > 1
    # Cut in the middle of a character: finish() flushes it as U+FFFD rather than losing the message.
    cut = next(i for i in range(3, len(ids)) if _partial_utf8(tok.token_bytes(ids[i])))
    parser = H.StreamParser(tok)
    parser.feed_many(ids[: cut + 1])
    parser.finish()
    assert parser.messages[0].content.endswith("\ufffd")


def _partial_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return True
    return False


def test_random_token_soup_never_raises(tok) -> None:
    rng = random.Random(7)
    specials = [
        tok.START,
        tok.END,
        tok.MESSAGE,
        tok.CHANNEL,
        tok.RETURN,
        tok.CALL,
        tok.CONSTRAIN,
        200010,
        199998,
    ]
    words = tok.encode(" to=functions.x analysis final commentary json assistant Hello 𝔘🎉 {}")
    for _ in range(300):
        ids = [
            rng.choice(specials) if rng.random() < 0.3 else rng.choice(words)
            for _ in range(rng.randint(0, 40))
        ]
        parser = H.StreamParser(tok, role=rng.choice(["assistant", None]))
        events = parser.feed_many(ids) + parser.finish()
        streamed = "".join(e.text for e in events if isinstance(e, H.TextDelta))
        assert streamed == "".join(m.content for m in parser.messages)
