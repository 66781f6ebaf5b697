"""Structured outputs through the Python API, on a random tiny model (the worst case: it never wants to
write JSON or end its reasoning): every reply parses and validates; the reasoning is not constrained;
forced calls name an offered tool; what cannot be enforced is refused by name."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from chat_helpers import TmuxChat, env_has_tmux
from structured_cases import CHECKER, PERSON, SCHEMAS, validate

import oss_mlx
from oss_mlx.generation import masked
from oss_mlx.harmony import Message, TextDelta, Tool, render_message
from oss_mlx.session import Done, Session
from oss_mlx.structured import ConstraintError, OutputConstraint, check, turn_grammar
from oss_mlx.testing.scripted import Script
from oss_mlx.tokenizer import SPECIAL_TOKENS

pytest.importorskip("llguidance")

WEATHER = Tool(
    "get_weather",
    "Current weather",
    {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
)
CLOCK = Tool(
    "get_time", "The time in a timezone", {"type": "object", "properties": {"tz": {"type": "string"}}}
)
TOOLS = [WEATHER, CLOCK]
FINAL = "<|start|>assistant<|channel|>final<|message|>"


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return oss_mlx.load(tiny_checkpoint, dtype=mx.float32)


def matcher(tokenizer, constraint: OutputConstraint, max_tokens: int = 200):
    import llguidance

    return llguidance.LLMatcher(tokenizer.grammar_tokenizer(), turn_grammar(check(constraint), max_tokens))


def allowed(tokenizer, m) -> np.ndarray:
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

    words = allocate_token_bitmask(1, tokenizer.vocab_size)
    fill_next_token_bitmask(m, words)
    return np.nonzero(np.unpackbits(words.view(np.uint8), bitorder="little")[: tokenizer.vocab_size])[0]


# ---- the engine's view of the vocabulary ---------------------------------------------------------------


def test_grammar_tokenizer_has_one_name_per_special_token(loaded):
    """llguidance gets our encoding: 201,088 ids, each special token under the name harmony uses. (tiktoken's
    own o200k_harmony names id 200018 twice, tiktoken#457, which makes llguidance count 201,089.)"""
    _, tokenizer = loaded
    grammar_tokenizer = tokenizer.grammar_tokenizer()
    assert grammar_tokenizer.vocab_size == tokenizer.vocab_size == 201088
    for name in (
        "<|start|>",
        "<|end|>",
        "<|message|>",
        "<|channel|>",
        "<|constrain|>",
        "<|return|>",
        "<|call|>",
    ):
        assert grammar_tokenizer.tokenize_str(name, parse_special=True) == [SPECIAL_TOKENS[name]]
    assert grammar_tokenizer.tokenize_str("<|reserved_200018|>", parse_special=True) == [200018]
    import tiktoken

    try:
        theirs = tiktoken.get_encoding("o200k_harmony")
    except Exception:  # noqa: BLE001 - its vocabulary may be unreachable offline
        return
    names = [n for n, i in theirs._special_tokens.items() if i == 200018]
    assert sorted(names) == ["<|endofprompt|>", "<|reserved_200018|>"]


def test_the_grammar_takes_a_call_as_openai_harmony_renders_it_and_as_the_model_writes_it(loaded):
    from openai_harmony import HarmonyEncodingName, Role, load_harmony_encoding
    from openai_harmony import Message as HMessage

    _, tokenizer = loaded
    encoding = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    call = (
        HMessage.from_role_and_content(Role.ASSISTANT, '{"city":"Paris","unit":"C"}')
        .with_channel("commentary")
        .with_recipient("functions.get_weather")
        .with_content_type("<|constrain|>json")
    )
    theirs = encoding.render(call)
    ours = render_message(
        Message(
            "assistant",
            '{"city":"Paris","unit":"C"}',
            "commentary",
            "functions.get_weather",
            "<|constrain|>json",
        ),
        tokenizer,
    )
    assert theirs == ours
    head = [tokenizer.START, *tokenizer.encode("assistant")]
    assert theirs[: len(head)] == head
    head_as_written = "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
    written = tokenizer.encode(head_as_written + '{"city": "Oslo", "unit": "F"}<|call|>', allow_special=True)
    for tokens in (theirs[len(head) :], written):
        m = matcher(tokenizer, OutputConstraint(tools=TOOLS, tool_choice="required"))
        assert m.try_consume_tokens(tokens) == len(tokens), tokenizer.decode(tokens)
        assert m.is_accepting()
    m = matcher(tokenizer, OutputConstraint(tools=TOOLS, tool_choice="required"))
    unknown = tokenizer.encode("<|channel|>commentary to=functions.get_news", allow_special=True)
    assert m.try_consume_tokens(unknown) < len(unknown)


def test_the_reasoning_is_free_text_and_the_answer_is_not(loaded):
    """In the analysis message the mask allows every ordinary token (braces, prose, anything) and <|end|>;
    once the final message is open it allows only what the schema does."""
    _, tokenizer = loaded
    m = matcher(tokenizer, OutputConstraint(json_schema=PERSON))
    assert m.consume_tokens(tokenizer.encode("<|channel|>analysis<|message|>", allow_special=True))
    free = allowed(tokenizer, m)
    ordinary = set(free[free < 199998].tolist())
    assert len(ordinary) > 199_000 and tokenizer.END in free
    for text in ('{"name": 5', "}}}", " Let me think", "[", "```json"):
        assert set(tokenizer.encode(text)) <= ordinary, text
    assert m.consume_tokens(tokenizer.encode('So {"name": } is wrong.', allow_special=True))
    assert m.consume_tokens(
        tokenizer.encode("<|end|><|start|>assistant<|channel|>final<|message|>", allow_special=True)
    )
    json_start = allowed(tokenizer, m)
    assert 0 < len(json_start) < 100
    assert all(tokenizer.decode([t]).lstrip().startswith("{") for t in json_start)


@pytest.mark.parametrize(
    "fmt, good, bad",
    [
        (
            "date",
            ["2024-02-29", "2000-02-29", "0001-01-01", "2023-12-31"],
            ["0000-01-01", "2023-02-29", "1900-02-29"],
        ),
        ("time", ["23:59:59Z", "12:00:00.123456+05:30"], ["23:59:60Z", "24:00:00Z", "12:00:00"]),
        ("date-time", ["2024-02-29T23:59:59.5-01:00"], ["0000-01-01T00:00:00Z", "2023-02-29T00:00:00Z"]),
    ],
)
def test_date_formats_allow_what_python_and_jsonschema_accept(loaded, fmt, good, bad):
    """llguidance's RFC 3339 grammar lets year 0000, second 60 and Feb 29 of any year through; Python's
    datetime, Pydantic and jsonschema do not, so the answer is held to what they accept."""
    _, tokenizer = loaded
    for value, expected in [(v, True) for v in good] + [(v, False) for v in bad]:
        m = matcher(tokenizer, OutputConstraint(json_schema={"type": "string", "format": fmt}))
        tokens = tokenizer.encode(f'<|channel|>final<|message|>"{value}"<|return|>', allow_special=True)
        assert (m.try_consume_tokens(tokens) == len(tokens)) is expected, value
        assert CHECKER.conforms(value, fmt) is expected, value


# ---- random weights: every reply valid ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_random_weights_write_valid_json_for_every_schema(loaded, name):
    """Streamed and whole (Done's reply is the stream collected): the final text parses and validates; the
    reply ends with <|return|>, within max_tokens (the shortest valid ending plus room to spare)."""
    model, tokenizer = loaded
    schema = SCHEMAS[name]
    shortest = _shortest(tokenizer, OutputConstraint(json_schema=schema, reasoning_budget=4))
    max_tokens = shortest + 12
    seed = sorted(SCHEMAS).index(name)
    events = list(
        oss_mlx.stream_generate(
            model,
            tokenizer,
            "Reply in JSON.",
            json_schema=schema,
            reasoning_budget=4,
            max_tokens=max_tokens,
            seed=seed,
        )
    )
    reply = events[-1].reply
    streamed = "".join(e.text for e in events if isinstance(e, TextDelta) and e.channel == "final")
    assert streamed == reply.text
    validate(reply.text, schema)
    assert reply.stats.finish_reason == "stop" and reply.tokens[-1] == tokenizer.RETURN
    assert len(reply.tokens) <= max_tokens and reply.stats.masked_tokens == len(reply.tokens)
    assert reply.stats.mask_seconds > 0


def _shortest(tokenizer, constraint: OutputConstraint) -> int:
    from oss_mlx.constrained import TurnConstraint

    turn = TurnConstraint(check(constraint), tokenizer, 10_000)
    turn.begin(10_000)
    return len(turn.closing_path())


def test_greedy_and_a_long_budget_are_valid_too(loaded):
    """Greedy decoding takes the same mask; with a budget far beyond the JSON's shortest form the reply
    still ends (closed to fit when the random model will not end it)."""
    model, tokenizer = loaded
    schema = SCHEMAS["nested"]
    for options in (dict(temperature=0.0, max_tokens=60), dict(temperature=1.0, seed=3, max_tokens=120)):
        reply = oss_mlx.generate(model, tokenizer, "JSON please.", json_schema=schema, **options)
        validate(reply.text, schema)
        assert reply.stats.finish_reason == "stop"


def test_a_budget_that_cannot_fit_the_json_ends_by_length_never_as_complete(loaded):
    model, tokenizer = loaded
    reply = oss_mlx.generate(model, tokenizer, "JSON.", json_schema=SCHEMAS["uuid-ip"], max_tokens=6, seed=0)
    assert reply.stats.finish_reason == "length" and not reply.stats.closed_to_fit
    with pytest.raises(ValueError):
        json.loads(reply.text)


def test_regex_and_lark_answers(loaded):
    model, tokenizer = loaded
    reply = oss_mlx.generate(model, tokenizer, "A code.", regex=r"[A-Z]{3}-[0-9]{2}", max_tokens=40, seed=1)
    assert re.fullmatch(r"[A-Z]{3}-[0-9]{2}", reply.text), reply.text
    lark = 'start: "yes" | "no" | "maybe, " NUMBER\nNUMBER: /[0-9]{1,3}/\n'
    for seed in range(3):
        reply = oss_mlx.generate(model, tokenizer, "Yes or no?", grammar=lark, max_tokens=40, seed=seed)
        assert re.fullmatch(r"yes|no|maybe, [0-9]{1,3}", reply.text), reply.text


# ---- reasoning ----------------------------------------------------------------------------------------


def test_scripted_reasoning_with_braces_and_prose_passes_unchanged(loaded):
    """A scripted analysis full of braces, brackets and prose is kept token for token under a JSON schema
    (the constraint only starts at the final message); the scripted answer, valid, is kept too."""
    model, tokenizer = loaded
    thought = 'The user wants {"name": ..., "age": ...}; braces } { and [lists], then prose. Fine.'
    answer = '{"name": "Ada", "age": 36}'
    script = f"<|channel|>analysis<|message|>{thought}<|end|>{FINAL}{answer}<|return|>"
    options = Script.replies([script], tokenizer).sampling(max_tokens=200)
    reply = oss_mlx.generate(model, tokenizer, "Who?", json_schema=PERSON, options=options)
    assert reply.analysis == thought
    assert reply.text == answer
    assert reply.tokens == tokenizer.encode(script, allow_special=True)


def test_a_scripted_answer_that_breaks_the_schema_is_overruled(loaded):
    """The same reasoning, then prose where the JSON should be: the reasoning passes, the answer is
    replaced token by token with what the schema allows."""
    model, tokenizer = loaded
    thought = "Braces { are fine here }."
    script = f"<|channel|>analysis<|message|>{thought}<|end|>{FINAL}Ada, 36 years old.<|return|>"
    options = Script.replies([script], tokenizer).sampling(max_tokens=60)
    reply = oss_mlx.generate(model, tokenizer, "Who?", json_schema=PERSON, options=options)
    assert reply.analysis == thought
    validate(reply.text, PERSON)


def test_the_reasoning_budget_ends_the_analysis(loaded):
    model, tokenizer = loaded
    long_thought = " ".join(["word"] * 80)
    script = Script.replies([f"<|channel|>analysis<|message|>{long_thought}<|end|>"], tokenizer)
    reply = oss_mlx.generate(
        model,
        tokenizer,
        "Think.",
        json_schema=PERSON,
        reasoning_budget=10,
        options=script.sampling(max_tokens=80),
    )
    assert len(tokenizer.encode(reply.analysis)) <= 10
    assert reply.analysis == " ".join(["word"] * len(reply.analysis.split()))
    validate(reply.text, PERSON)


# ---- tool calls ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_required_and_named_calls_name_an_offered_tool_with_valid_arguments(loaded, seed):
    model, tokenizer = loaded
    session = Session(model, tokenizer, tools=TOOLS)
    for choice in ("required", "get_time"):
        reply = list(
            session.stream("Weather?", tool_choice=choice, reasoning_budget=3, max_tokens=48, seed=seed)
        )[-1].reply
        assert len(reply.tool_calls) == 1 and reply.text == ""
        call = reply.tool_calls[0]
        assert call.name in {t.name for t in TOOLS} and (choice == "required" or call.name == choice)
        tool = next(t for t in TOOLS if t.name == call.name)
        validate(call.arguments, tool.parameters)
        assert reply.stats.finish_reason == "tool_call" and reply.tokens[-1] == tokenizer.CALL


def test_tool_choice_none_and_auto(loaded):
    model, tokenizer = loaded
    session = Session(model, tokenizer, tools=TOOLS)
    for seed in range(3):
        reply = list(session.stream("Hi", tool_choice="none", json_schema=PERSON, max_tokens=40, seed=seed))[
            -1
        ].reply
        assert reply.tool_calls == []
        validate(reply.text, PERSON)
        reply = list(session.stream("Hi", tool_choice="auto", max_tokens=40, seed=seed))[-1].reply
        for call in reply.tool_calls:  # a call, if any, is a valid one
            validate(call.arguments, next(t for t in TOOLS if t.name == call.name).parameters)
        assert reply.stats.finish_reason in ("stop", "tool_call")


def test_a_forced_prefix_is_read_by_the_grammar(loaded):
    """assistant_prefix (tokens the reply is made to start with) is fed to the matcher first."""
    model, tokenizer = loaded
    prefix = tokenizer.encode(
        "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>", allow_special=True
    )
    session = Session(model, tokenizer, tools=TOOLS)
    reply = list(
        session.stream("Oslo", assistant_prefix=prefix, tool_choice="required", max_tokens=40, seed=0)
    )[-1].reply
    assert [c.name for c in reply.tool_calls] == ["get_weather"]
    validate(reply.tool_calls[0].arguments, WEATHER.parameters)


# ---- what cannot be enforced -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "schema, keyword",
    [
        ({"type": "object", "not": {"required": ["a"]}}, "not"),
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"if": {"type": "string"}, "then": {"minLength": 2}}, "if"),
        ({"type": "string", "format": "color"}, "format"),
        ({"type": "object", "propertyNames": {"pattern": "^a"}}, "propertyNames"),
    ],
)
def test_unsupported_schema_keywords_are_refused_by_name(schema, keyword):
    with pytest.raises(ConstraintError) as err:
        check(OutputConstraint(json_schema=schema))
    assert keyword in err.value.keywords and keyword in str(err.value)
    lenient = check(OutputConstraint(json_schema=schema, strict=None))  # OpenAI's "when the schema allows"
    assert not lenient.answer.enforced


def test_bad_constraints_raise_before_the_message_is_added(loaded):
    model, tokenizer = loaded
    session = Session(model, tokenizer, tools=TOOLS)
    for kwargs, needle in [
        (dict(json_schema={"not": {}}), "not"),
        (dict(tool_choice="get_news"), "get_news"),
        (dict(regex="(?=a)b"), "look-around"),
        (dict(grammar="start: undefined_rule"), "undefined_rule"),
        (dict(json_schema=PERSON, regex="a"), "one answer format"),
        (dict(reasoning_budget=-1), "reasoning_budget"),
    ]:
        with pytest.raises(ConstraintError, match=re.escape(needle)):
            list(session.send("Hi", max_tokens=4, **kwargs))
    assert session.messages == []


def test_masked_sets_forbidden_logits_to_minus_infinity():
    logits = mx.arange(70, dtype=mx.float32)[None]
    words = np.zeros((1, 3), dtype=np.uint32)
    for token in (0, 31, 33, 69):
        words[0, token // 32] |= np.uint32(1 << (token % 32))
    out = np.array(masked(logits, mx.array(words.view(np.int32))))[0]
    assert np.isfinite(out).nonzero()[0].tolist() == [0, 31, 33, 69]
    assert out[31] == 31 and np.isneginf(out[1])


def test_stats_report_mask_time(loaded):
    model, tokenizer = loaded
    reply = oss_mlx.generate(model, tokenizer, "JSON.", json_schema=PERSON, max_tokens=30, seed=2)
    stats = reply.stats.as_dict()
    assert stats["masked_tokens"] == len(reply.tokens) and stats["mask_ms_per_token"] > 0
    free = oss_mlx.generate(model, tokenizer, "Text.", max_tokens=5, seed=2).stats
    assert free.masked_tokens == 0 and free.mask_seconds == 0
    assert isinstance(list(oss_mlx.stream_generate(model, tokenizer, "x", max_tokens=2))[-1], Done)


# ---- the chat -----------------------------------------------------------------------------------------


@pytest.mark.skipif(not env_has_tmux(), reason="tmux is not installed (apt-get install -y tmux)")
def test_chat_json_command_constrains_the_next_answers(tmp_path, vocab_dir, tiny_checkpoint):
    """`/json FILE` in the real chat (tmux): the random model's next answers are valid JSON for the
    schema, a scripted reasoning with braces passes unchanged, bad files are refused with the reason,
    `/json off` goes back to free text."""
    schema_file, bad_file = tmp_path / "person.json", tmp_path / "bad.json"
    schema_file.write_text(json.dumps(PERSON))
    bad_file.write_text(json.dumps({"type": "array", "uniqueItems": True}))
    thought = "Braces { and } are fine here."
    replies = [f"<|channel|>analysis<|message|>{thought}<|end|>{FINAL}not json<|return|>", None]
    app = TmuxChat(tmp_path / "home", vocab_dir).start(["--model", str(tiny_checkpoint)], replies=replies)
    try:
        app.wait_prompt(timeout=60)
        app.command(f"/json {tmp_path / 'missing.json'}", r"cannot read")
        app.command(f"/json {bad_file}", r"uniqueItems")
        app.command(f"/json {schema_file}", r"answers follow the JSON schema")
        app.command("/set max_tokens 40", r"max_tokens: 40")
        app.command("Who are you?", r"tok/s", timeout=120)
        app.command("And now?", r"tok/s", timeout=120)
        saved = tmp_path / "conversation.json"
        app.command(f"/save {saved}", r"saved")
        app.command("/json off", r"free text again")
    finally:
        app.close()
    messages = json.loads(saved.read_text())["messages"]
    finals = [m["content"] for m in messages if m.get("role") == "assistant" and m.get("channel") == "final"]
    assert len(finals) == 2
    for text in finals:
        validate(text, PERSON)
    analyses = [m["content"] for m in messages if m.get("channel") == "analysis"]
    assert analyses[0] == thought  # the scripted reasoning, kept token for token


def test_the_structured_output_example_runs(tiny_checkpoint):
    """examples/structured_output.py as a user runs it (the tiny random model, replies capped): both
    answers parse as recipes of its schema, whole and streamed."""
    example = Path(__file__).resolve().parents[1] / "examples" / "structured_output.py"
    out = subprocess.run(
        [sys.executable, str(example), str(tiny_checkpoint), "--max-tokens", "60"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    recipe_schema = _example_schema(example)
    lines = {
        line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in out.stdout.splitlines() if ": " in line
    }
    for key in ("recipe", "soup"):
        validate(lines[key], recipe_schema)
    assert lines["finish"].startswith("stop, mask ")


def _example_schema(example: Path) -> dict:
    """RECIPE from the example's source, without running it (it loads a model at import)."""
    import ast

    tree = ast.parse(example.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "RECIPE")
    return ast.literal_eval(node.value)


def test_a_schema_nested_too_deeply_is_refused_in_words():
    schema: dict = {"type": "string"}
    for _ in range(5000):
        schema = {"type": "array", "items": schema}
    with pytest.raises(ConstraintError, match="nested too deeply"):
        check(OutputConstraint(json_schema=schema))


# ---- what a constraint may cost (a client's schema must not stall the server) ---------------------------


@pytest.mark.parametrize(
    "pattern,count",
    [
        ("^[0-9]{5}$", 5),
        ("^(a{100}){100}$", 10_000),
        ("^(?:(?<x>a{10}){10}b{5}){100}$", 10_000),
        ("^((a{10}){10}){10}$", 1_000),
        ("^a{2,}$", 2),
        ("^a{3,7}$", 7),
        (r"^\{1000000\}$", 1),  # escaped braces are text
        ("^[{]1000000}$", 1),  # a brace in a class too
        ("^[]{9}]{3}$", 3),  # "]" first in a class is literal
    ],
)
def test_repeat_count_multiplies_nested_counts(pattern, count):
    from oss_mlx.structured import repeat_count

    assert repeat_count(pattern) == count


@pytest.mark.parametrize(
    "constraint",
    [
        OutputConstraint(json_schema={"type": "string", "pattern": "^(a{1000}){1000}$"}),
        OutputConstraint(json_schema={"type": "object", "properties": {"enum": {"pattern": "^a{20000}$"}}}),
        OutputConstraint(
            json_schema={"$defs": {"s": {"type": "string", "pattern": "x{10001}"}}, "$ref": "#/$defs/s"}
        ),
        OutputConstraint(regex="(ab{200}){200}"),
        OutputConstraint(grammar='start: "a"{20000}'),
    ],
    ids=["nested", "under-a-property-named-enum", "in-defs", "regex", "lark"],
)
def test_counts_past_the_limit_are_refused_at_once(constraint):
    with pytest.raises(ConstraintError, match=r"repetitions; at most 10,000"):
        check(constraint)


def test_a_schema_no_text_satisfies_is_refused_on_the_vocabulary(loaded):
    _, tokenizer = loaded
    for schema in ({"$ref": "#"}, {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}):
        check(OutputConstraint(json_schema=schema))  # the grammar compiles...
    with pytest.raises(ConstraintError, match="no text satisfies") as e:
        check(OutputConstraint(json_schema={"$ref": "#"}), tokenizer)  # ...but starts nowhere
    assert "\n" not in e.value.message


def test_long_forced_text_costs_a_mask_not_its_whole_tokenization(loaded):
    """A pattern forcing 9,000 bytes: the forced tokens come from the first FORCED_BYTES (the same
    first tokens llguidance's compute_ff_tokens gives, which tokenizes all 9,000), each step fast."""
    import time

    from oss_mlx.constrained import TurnConstraint

    _, tokenizer = loaded
    schema = {"type": "string", "pattern": "^(ab){4500}$"}
    checked = check(OutputConstraint(json_schema=schema, reasoning_budget=0))
    c = TurnConstraint(checked, tokenizer, 40)
    c.begin(40)
    for _ in range(3):
        theirs, ours = c.matcher.compute_ff_tokens(), c._forced_tokens(c.matcher)
        assert len(ours) > 10 and ours == theirs[: len(ours)]
        c.matcher.consume_token(ours[0])
    start = time.perf_counter()
    for i in range(30):
        c.advance(c._forced_tokens(c.matcher)[0], 30 - i)
    assert time.perf_counter() - start < 2  # compute_ff_tokens each step: ~40 ms at 9,000 bytes


def test_a_grammar_error_in_a_reply_is_one_line(loaded):
    from oss_mlx.constrained import TurnConstraint

    _, tokenizer = loaded
    c = TurnConstraint(check(OutputConstraint(json_schema=PERSON), tokenizer), tokenizer, 40)
    c.begin(40)
    with pytest.raises(ConstraintError, match="constrained decoding failed") as e:
        c.advance(tokenizer.RETURN, 39)  # not allowed before the answer
    assert "\n" not in e.value.message and "<state>" not in e.value.message
