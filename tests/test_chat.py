"""`oss-mlx chat`: the real program driven in tmux, and unit tests of its parts.

End-to-end tests run `python -m oss_mlx.cli chat --model <tiny checkpoint>` in a 120x40 tmux pane.
The tiny model's output is random, so replies are scripted: OSS_MLX_SCRIPTED_REPLIES (a test hook
of the chat) makes the sampler pick given tokens while the model still runs, prefill and cache
included.
"""

from __future__ import annotations

import enum
import io
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Optional, TypedDict

import pytest
from chat_helpers import REPO, TmuxChat, env_has_tmux, function_call, harmony_reply, python_call
from conftest import make_hub_cache

from oss_mlx.atomic import write_text
from oss_mlx.chat import commands
from oss_mlx.chat.app import format_stats
from oss_mlx.chat.guard import LoopDetector
from oss_mlx.chat.history import (
    ChatFileError,
    data_dir,
    load_conversation,
    save_conversation,
)
from oss_mlx.chat.render import Block, BlockSplitter, MarkdownStream, rows_above, sanitize
from oss_mlx.chat.tools import (
    FunctionTool,
    PythonSandbox,
    ToolFileError,
    function_schema,
    load_tools,
    parse_docstring,
)
from oss_mlx.generation import GenerationStats
from oss_mlx.harmony import Message

# ===================================================================================================
# End to end, in tmux
# ===================================================================================================

needs_tmux = pytest.mark.skipif(not env_has_tmux(), reason="tmux is not installed (apt-get install -y tmux)")

HELLO = harmony_reply(
    "**Hello** there! Here is a list:\n\n- one\n- two\n\n"
    "```python\ndef double(x):\n    return x * 2\n```\n\nBye.",
    analysis="The user greets. Reply briefly.",
)
SHORT = harmony_reply("Short answer.", analysis="Easy.")
LONG = harmony_reply(" ".join(f"word{i}" for i in range(3000)))
LOOP = harmony_reply("ha" * 400)


@pytest.fixture(scope="module")
def loaded_tiny(tiny_checkpoint):
    import oss_mlx

    return oss_mlx.load(tiny_checkpoint)


@needs_tmux
def test_first_run_downloads_and_converts_a_hub_model_once(tmp_path, vocab_dir, tiny_checkpoint):
    """`--model ORG/NAME` (the default is openai/gpt-oss-20b), in neither the store nor the Hugging Face
    cache: fetched through huggingface_hub into the store's download cache (here already there, as
    after a download whose conversion was cut: offline), converted once into the store, the download
    removed; later runs load the converted copy."""
    rev = "fedcba9876543210fedcba9876543210fedcba98"
    home = tmp_path / "home"
    make_hub_cache(home / "models" / ".downloads", "acme/tiny-gpt-oss", tiny_checkpoint, rev)
    env = {"HF_HUB_CACHE": str(tmp_path / "empty-hub")}
    app = TmuxChat(home, vocab_dir).start(["--model", "acme/tiny-gpt-oss"], replies=[SHORT], env_extra=env)
    try:
        screen = app.wait_prompt(timeout=120)
        assert "first use of acme/tiny-gpt-oss" in screen and "Traceback" not in screen
        converted = home / "models" / "acme--tiny-gpt-oss"
        section = json.loads((converted / "config.json").read_text())["oss_mlx"]
        assert section["source"] == "acme/tiny-gpt-oss" and section["revision"] == rev
        assert not (home / "models" / ".downloads" / "models--acme--tiny-gpt-oss").exists()
        assert "Short answer." in app.command("Hi", r"tok/s")
    finally:
        app.close()
    again = TmuxChat(home, vocab_dir).start(["--model", "acme/tiny-gpt-oss"], env_extra=env)
    try:
        screen = again.wait_prompt(timeout=60)
        assert "first use" not in screen and "(oss-mlx) loaded" in screen  # the converted copy
    finally:
        again.close()


@needs_tmux
def test_memory_budget_streams_experts_and_stats_show_it(chat):
    app = chat("--memory-budget", "0.7GB", replies=[SHORT])
    assert "Short answer." in app.command("Hi", r"tok/s")
    assert "expert cache hit rate" in app.command("/stats", r"experts streamed from disk")


def saved(path: Path) -> dict:
    return json.loads(path.read_text())


@needs_tmux
def test_reply_help_effort_save_errors_and_exit(chat, tmp_path):
    app = chat(replies=[HELLO])
    screen = app.command("/help", r"/exit")
    for name in ("/help", "/effort", "/reasoning", "/system", "/developer", "/clear", "/regen", "/undo"):
        assert name in screen
    for name in ("/save FILE", "/load FILE", "/tools", "/stats", "/multi"):
        assert name in screen

    screen = app.command("Hi there", r"tok/s")
    assert "Hello there!" in screen and "• one" in screen and "def double(x):" in screen
    assert "```" not in screen and "**" not in screen  # rendered, not raw markdown
    assert "<|" not in screen  # no harmony markup leaks
    assert "thought for" in screen and "The user greets" not in screen  # reasoning collapsed
    stats_line = r"s to first token · [\d.]+ tok/s · \d+ tokens · prefilled \d+/\d+ · context \d+"
    assert re.search(stats_line, screen)

    screen = app.command("/reasoning", r"The user greets")  # the last reasoning, in full
    app.command("/effort high", r"reasoning effort: high")
    screen = app.command("/system", r"developer message")
    assert "Reasoning: high" in screen
    first = tmp_path / "first.json"
    app.command(f"/save {first}", r"saved 3 messages")
    data = saved(first)
    assert "Reasoning: high" in data["system_message"] and data["settings"]["reasoning_effort"] == "high"
    assert data["messages"][0] == {
        "role": "user",
        "content": "Hi there",
        "channel": None,
        "recipient": None,
        "content_type": None,
        "name": None,
    }
    assert [m["channel"] for m in data["messages"][1:]] == ["analysis", "final"]

    app.command("/frobnicate", r"unknown command /frobnicate")
    app.command("/load /nonexistent/chat.json", r"cannot load: .*no such file")
    bad = tmp_path / "bad.json"
    bad.write_text('{"messages": [')
    app.command(f"/load {bad}", r"cannot load: .*not valid JSON")
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"messages": [{"role": "wizard", "content": "hi"}]}')
    app.command(f"/load {wrong}", r"cannot load: .*role 'wizard'")
    app.command("/effort extreme", r"/effort takes one of")
    app.command("/save", r"/save FILE")
    app.command(f"/save {bad}/x.json", r"cannot save to")  # a file is not a folder
    assert "Traceback" not in app.screen()

    app.type("/exit")
    assert app.wait_exit() == 0
    # Autosaved under OSS_MLX_HOME.
    autosaved = list((tmp_path / "home" / "chats").glob("*.json"))
    assert autosaved and saved(autosaved[0])["messages"][0]["content"] == "Hi there"


@needs_tmux
def test_ctrl_c_stops_the_reply_and_the_chat_goes_on(chat, tmp_path):
    app = chat("--max-tokens", "100000", replies=[LONG, SHORT, LOOP])
    app.type("Tell me a very long story")
    app.wait_for(r"word12 ")
    app.keys("C-c")
    app.wait_for(r"stopped \(Ctrl-C\)")
    app.wait_prompt()
    assert app.alive()
    screen = app.command("Thanks, that is enough", r"Short answer\.")
    assert len(re.findall(r"tok/s", screen)) >= 2
    app.command("Now laugh", r"stopped: the model was repeating itself")  # the loop detector

    path = tmp_path / "after-interrupt.json"
    app.command(f"/save {path}", r"saved")
    messages = saved(path)["messages"]
    users = [m["content"] for m in messages if m["role"] == "user"]
    assert users == ["Tell me a very long story", "Thanks, that is enough", "Now laugh"]
    partial = messages[1]
    assert partial["role"] == "assistant" and partial["content"].startswith("word0 word1")
    assert len(partial["content"]) < len(" ".join(f"word{i}" for i in range(3000)))
    screen = app.command("/stats", r"context: ")
    assert re.search(r"^1 .*interrupted", screen, re.MULTILINE)

    # Ctrl-C at the prompt: the first clears the line; on an empty line the first says how to quit,
    # the second quits, saying where the conversation is.
    app.type("a draft I do not want", enter=False)
    app.wait_for(r">>> a draft I do not want")
    app.keys("C-c")
    app.wait_prompt()
    assert app.alive()
    app.keys("C-c")
    app.wait_for(r"Ctrl-C again quits")
    assert app.alive()
    app.keys("C-c")
    assert app.wait_exit() == 0
    assert re.search(r"bye: the conversation is saved in .*chats", app.screen())
    assert "Traceback" not in app.screen()


@needs_tmux
def test_load_restores_the_conversation_in_a_new_instance(chat, tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    app = chat("--system", "Answer in one line.", replies=[SHORT])
    app.command("Remember the number 42", r"Short answer\.")
    app.command("/effort low", r"effort: low")
    app.command(f"/save {first}", r"saved 3 messages")
    app.keys("C-d")
    assert app.wait_exit() == 0

    app = chat(replies=[SHORT])
    screen = app.command(f"/load {first}", r"loaded 3 messages \(1 turn\)")
    assert "Remember the number 42" in screen  # the last exchange is shown again
    app.command(f"/save {second}", r"saved 3 messages")
    a, b = saved(first), saved(second)
    assert a["messages"] == b["messages"]
    assert (
        b["settings"]["reasoning_effort"] == "low" and b["settings"]["instructions"] == "Answer in one line."
    )
    assert (
        a["developer_message"] == b["developer_message"] and "Answer in one line." in b["developer_message"]
    )
    # The conversation goes on from the loaded history (re-prefilled on this turn).
    screen = app.command("And now?", r"tok/s")
    app.type("/exit")
    assert app.wait_exit() == 0


@needs_tmux
def test_turn_three_prefills_only_what_is_new(chat, tmp_path):
    replies = [harmony_reply(f"Answer number {i}.", analysis=f"Thinking {i}.") for i in (1, 2, 3, 4)]
    app = chat(replies=replies)
    long_text = "\n".join(
        f"Line {i}: here is some context about the problem, with details worth remembering."
        for i in range(25)
    )
    app.paste(long_text)  # a bracketed paste: its new lines do not send it
    app.wait_for(r"Line 24: here is")
    assert "tok/s" not in app.screen()
    app.keys("Enter")
    app.wait_for(r"Answer number 1\.")
    app.wait_prompt()
    app.command("Second question?", r"Answer number 2\.")
    app.command("Third question?", r"Answer number 3\.")
    screen = app.command("/stats", r"context: ")
    rows = {
        m.group(1): (int(m.group(2)), int(m.group(3)))
        for m in re.finditer(r"^(\d+)\s+(\d+)\s+(\d+)\s+\d+\s", screen, re.MULTILINE)
    }
    assert set(rows) == {"1", "2", "3"}, screen
    prompt1, prefilled1 = rows["1"]
    prompt3, prefilled3 = rows["3"]
    assert prefilled1 == prompt1 > 400  # the first turn prefills everything
    assert prompt3 > prompt1
    assert prefilled3 < 30 and prefilled3 * 10 < prompt3  # turn 3: only the new tokens

    # /regen answers the same prompt again: all of it is in the cache but its last token.
    app.command("/regen", r"Answer number 4\.")
    screen = app.command("/stats", r"context: ", timeout=10)
    regen = re.search(r"^3r\s+(\d+)\s+(\d+)\s", screen, re.MULTILINE)
    assert regen and int(regen.group(1)) == prompt3 and int(regen.group(2)) == 1, screen
    # /undo drops the last question and its answer.
    app.command("/undo", r"removed: Third question\?")
    path = tmp_path / "undone.json"
    app.command(f"/save {path}", r"saved")
    users = [m["content"] for m in saved(path)["messages"] if m["role"] == "user"]
    assert users == [long_text, "Second question?"]
    assert saved(path)["messages"][-1]["content"] == "Answer number 2."
    app.command("/clear", r"new conversation")
    app.command("/stats", r"no replies yet")
    app.keys("C-d")
    assert app.wait_exit() == 0


@needs_tmux
def test_tools_from_a_module_a_json_file_and_the_python_sandbox(chat, tmp_path):
    replies = [
        function_call("get_weather", {"city": "Paris"}),
        harmony_reply("It is sunny in Paris."),
        function_call("get_stock_price", {"symbol": "AAPL"}),
        harmony_reply("Apple trades at the price you gave."),
        python_call("print(6 * 7)"),
        harmony_reply("The answer is 42."),
    ]
    example = REPO / "examples"
    app = chat(
        "--tools", str(example / "tools_example.py"), "--tools", str(example / "tools.json"), "--python",
        replies=replies,
    )  # fmt: skip
    screen = app.command("/tools", r"• python")
    assert "get_weather(city: string" in screen and "get_stock_price(symbol: string" in screen
    assert "network enforced" in screen or "network best effort" in screen

    screen = app.command("Weather in Paris?", r"It is sunny in Paris\.")
    assert "⚙ get_weather" in screen and '"sky": "sunny"' in screen  # the function ran

    app.type("What is AAPL at?")
    app.wait_for(r"result of get_stock_price")  # a JSON-only tool: the user types the result
    app.type("123.45 USD")
    app.wait_for(r"Apple trades at the price you gave\.")
    app.wait_prompt()

    screen = app.command("Compute 6 times 7 with python", r"The answer is 42\.")
    assert re.search(r"↳ 42", screen)

    path = tmp_path / "tools.json"
    app.command(f"/save {path}", r"saved")
    data = saved(path)
    tool_messages = [m for m in data["messages"] if m["role"] == "tool"]
    assert [m["name"] for m in tool_messages] == [
        "functions.get_weather",
        "functions.get_stock_price",
        "python",
    ]
    assert tool_messages[1]["content"] == "123.45 USD" and tool_messages[2]["content"].strip() == "42"
    assert "## python" in data["system_message"] and "get_weather" in data["developer_message"]
    assert "Traceback" not in app.screen()
    app.type("/exit")
    assert app.wait_exit() == 0


# ===================================================================================================
# Markdown blocks
# ===================================================================================================


def split(text: str, step: int | None = None) -> list[Block]:
    splitter = BlockSplitter()
    blocks: list[Block] = []
    if step is None:
        blocks += splitter.feed(text)
    else:
        for i in range(0, len(text), step):
            blocks += splitter.feed(text[i : i + step])
    return blocks + splitter.flush()


DOC = """# Title

A paragraph
on two lines.

- item one
- item two

  continued item two

- item three
Not a list any more? (lazy continuation)

After.

```python
def f():

    return 1
```
Setext heading
--------------

***

1. one
2. two

| a | b |
|---|---|
| 1 | 2 |
"""


def test_splitter_finds_blocks():
    blocks = split(DOC)
    kinds = [b.kind for b in blocks]
    texts = [b.text for b in blocks]
    assert texts[0] == "# Title" and kinds[0] == "heading"
    assert texts[1] == "A paragraph\non two lines."
    assert (
        texts[2].startswith("- item one") and "continued item two" in texts[2] and "- item three" in texts[2]
    )
    assert texts[3] == "After."
    assert kinds[4] == "code" and texts[4] == "```python\ndef f():\n\n    return 1\n```"
    assert kinds[5] == "heading" and texts[5].startswith("Setext heading")
    assert kinds[6] == "rule"
    assert texts[7] == "1. one\n2. two"
    assert texts[8].startswith("| a | b |") and texts[8].endswith("| 1 | 2 |")
    assert len(blocks) == 9


@pytest.mark.parametrize("step", [1, 2, 5, 17])
def test_splitter_streaming_gives_the_same_blocks(step):
    assert split(DOC, step) == split(DOC)


def test_splitter_emits_a_block_as_soon_as_it_is_complete():
    s = BlockSplitter()
    assert s.feed("Hello wor") == [] and s.pending == "Hello wor"
    assert s.feed("ld.\n") == [] and s.pending == "Hello world.\n"
    assert [b.text for b in s.feed("\n")] == ["Hello world."] and s.pending == ""
    assert s.feed("```sh\nls\n") == [] and s.in_code and s.pending == "```sh\nls\n"
    assert s.feed("\n") == []  # a blank line inside code does not end it
    assert [b.text for b in s.feed("```\n")] == ["```sh\nls\n\n```"]
    # A list waits for the line after a blank one.
    assert s.feed("- a\n\n") == []
    assert [b.text for b in s.feed("Next paragraph\n")] == ["- a"]
    assert s.pending == "Next paragraph\n"


def test_splitter_closes_an_unfinished_fence_and_splits_tall_blocks():
    assert [b.text for b in split("```py\nx = 1\n")] == ["```py\nx = 1\n```"]
    s = BlockSplitter()
    s.feed("```py\nline1\nline2\n")
    first = s.force()
    assert [(b.text, b.kind, b.continued, b.more) for b in first] == [
        ("```py\nline1\nline2\n```", "code", False, True)
    ]
    s.feed("line3\n```\n")
    assert s.pending == ""
    rest = s.flush()
    assert rest == []  # the fence was closed by the feed
    s2 = BlockSplitter()
    s2.feed("```py\na\n")
    s2.force()
    done = s2.feed("b\n```\n")
    assert [(b.text, b.continued) for b in done] == [("```py\nb\n```", True)]


def test_rows_above_counts_wrapped_lines():
    assert rows_above("", 10) == 0
    assert rows_above("abc", 10) == 0
    assert rows_above("abc\n", 10) == 1
    assert rows_above("x" * 10, 10) == 0  # the cursor waits on the last column
    assert rows_above("x" * 11, 10) == 1
    assert rows_above("x" * 25 + "\n\nab", 10) == 4
    assert rows_above("日本語", 4) == 1  # wide characters take two cells


def test_sanitize_drops_terminal_control_sequences():
    assert sanitize("a\x1b[2Jb\rc\x07\td\n") == "a[2Jbc    d\n"


def test_markdown_stream_to_a_pipe_prints_each_block_once():
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, width=60, force_terminal=False, highlight=False)
    stream = MarkdownStream(console)
    for ch in "Some **bold** text.\n\n- a\n- b\n\n```python\nprint(1)\n```\nEnd":
        stream.feed(ch)
    stream.finish()
    text = out.getvalue()
    assert "\x1b" not in text and "**" not in text and "```" not in text
    assert (
        text.count("Some bold text.") == 1 and text.count("print(1)") == 1 and text.rstrip().endswith("End")
    )


def test_markdown_stream_on_a_terminal_erases_only_its_pending_block():
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, width=40, height=20, force_terminal=True, color_system=None, highlight=False)
    stream = MarkdownStream(console)
    stream.feed("Plain text first")
    assert out.getvalue() == "Plain text first"  # streamed as it comes
    stream.feed("\n\n")
    # The plain line is erased (carriage return, clear to the end of the screen) and printed rendered.
    assert out.getvalue().startswith("Plain text first\r\x1b[J") and "\x1b[1A" not in out.getvalue()
    stream.feed("Second one\nwraps\n")
    stream.finish()
    # A blank separator row and two rows of plain text: up three, then clear.
    assert "\r\x1b[3A\x1b[J" in out.getvalue()


def test_markdown_stream_leaves_a_line_taller_than_the_screen_as_streamed():
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, width=10, height=8, force_terminal=True, color_system=None, highlight=False)
    stream = MarkdownStream(console)
    stream.feed("intro\n\n")
    long_line = "x" * 100
    for i in range(0, 100, 7):
        stream.feed(long_line[i : i + 7])
    stream.feed("\n\nafter\n")
    stream.finish()
    text = out.getvalue()
    assert text.count(long_line) == 1  # written once, as it streamed, never erased
    assert text.index(long_line) < text.index("after") and text.count("intro") == 1
    assert not re.search(r"\x1b\[\d+A", text[text.index(long_line) :].split("after")[0])


# ===================================================================================================
# Loop detection
# ===================================================================================================


def test_loop_detector_catches_a_repeated_sentence():
    sentence = [f"t{i}" for i in range(30)]
    detector = LoopDetector()
    fed = sentence * 3
    hits = [i for i, token in enumerate(fed) if detector.feed(token)]
    assert hits and hits[0] == len(fed) - 1  # exactly at the end of the third repetition
    assert detector.period == 30


def test_loop_detector_catches_a_stuck_token_but_not_normal_text():
    import random

    detector = LoopDetector()
    assert not any(detector.feed("ha") for _ in range(89))
    assert detector.feed("ha")
    rng = random.Random(0)
    detector = LoopDetector()
    words = [rng.choice(["the", "a", "cat", "sat", "on", "mat", ",", "."]) for _ in range(5000)]
    assert not any(detector.feed(w) for w in words)
    # A repeated refrain that is short of 3 times (and of the window) is fine.
    detector = LoopDetector()
    assert not any(detector.feed(t) for t in [f"x{i}" for i in range(40)] * 2)


# ===================================================================================================
# Tool schemas from functions
# ===================================================================================================


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Point(TypedDict):
    x: float
    y: float


@dataclass
class Box:
    width: int
    label: str = ""


def sample_tool(
    city: str,
    days: int = 3,
    unit: Literal["c", "f"] = "c",
    tags: list[str] | None = None,
    color: Color = Color.RED,
    ratio: float = 0.5,
    flag: bool = False,
    where: Point | None = None,
    box: Optional[Box] = None,  # noqa: UP045
    note: Annotated[str, "a free note"] = "",
    *args,
    **kwargs,
) -> str:
    """Forecast for a city.

    Second paragraph of the description,
    on two lines.

    Args:
        city: The city, e.g.
            "Paris".
        days (int): How many days.
        unit: Unit.

    Returns:
        A forecast.
    """
    return city


def test_function_schema_from_signature_and_docstring():
    schema = function_schema(sample_tool)
    assert schema["name"] == "sample_tool"
    assert (
        schema["description"] == "Forecast for a city.\n\nSecond paragraph of the description, on two lines."
    )
    params = schema["parameters"]
    assert params["type"] == "object" and params["required"] == ["city"]
    p = params["properties"]
    assert p["city"] == {"type": "string", "description": 'The city, e.g. "Paris".'}
    assert p["days"] == {"type": "integer", "description": "How many days.", "default": 3}
    assert p["unit"] == {"type": "string", "enum": ["c", "f"], "description": "Unit.", "default": "c"}
    assert p["tags"] == {"type": "array", "items": {"type": "string"}, "nullable": True}
    assert p["color"] == {"type": "string", "enum": ["red", "blue"], "default": "red"}
    assert p["ratio"] == {"type": "number", "default": 0.5} and p["flag"] == {
        "type": "boolean",
        "default": False,
    }
    assert p["where"]["type"] == "object" and p["where"]["nullable"] is True
    assert p["where"]["properties"] == {"x": {"type": "number"}, "y": {"type": "number"}}
    assert p["box"]["required"] == ["width"] and p["box"]["nullable"] is True
    assert p["note"] == {"type": "string", "description": "a free note", "default": ""}
    assert set(p) == {"city", "days", "unit", "tags", "color", "ratio", "flag", "where", "box", "note"}


def test_docstring_styles():
    numpy_doc = """Add.

    Parameters
    ----------
    a : int
        The first
        number.
    b : int
        The second.
    """
    assert parse_docstring(numpy_doc) == ("Add.", {"a": "The first number.", "b": "The second."})
    rest_doc = """Add.

    :param a: the first
    :param int b: the second
    :returns: the sum
    """
    assert parse_docstring(rest_doc) == ("Add.", {"a": "the first", "b": "the second"})
    assert parse_docstring(None) == ("", {})


def test_schemas_render_in_the_developer_message():
    from oss_mlx.harmony import Tool, render_developer

    schema = function_schema(sample_tool)
    text = render_developer(None, [Tool(schema["name"], schema["description"], schema["parameters"])])
    assert "type sample_tool = (_: {" in text and 'unit?: "c" | "f", // default: c' in text


def test_example_tools_module_and_json():
    tools = {t.name: t for t in load_tools(REPO / "examples" / "tools_example.py")}
    assert set(tools) == {"get_weather", "calculate", "current_time", "roll_dice"}
    ok, out = tools["get_weather"].call('{"city": "Paris", "unit": "fahrenheit"}')
    assert ok and json.loads(out) == {
        "city": "Paris",
        "sky": "sunny",
        "temperature": 70,
        "unit": "fahrenheit",
    }
    assert tools["calculate"].call('{"expression": "2 ** 10"}') == (True, "1024.0")
    ok, out = tools["calculate"].call('{"expression": "__import__(\'os\')"}')
    assert not ok and "unknown names" in out
    assert tools["get_weather"].call("{not json")[0] is False
    assert tools["get_weather"].call('{"town": "x"}') == (
        False,
        "error: get_weather() got an unexpected keyword argument 'town'",
    )
    manual = {t.name: t for t in load_tools(REPO / "examples" / "tools.json")}
    assert set(manual) == {"get_stock_price", "lookup_contact"}
    assert all(t.function is None for t in manual.values())
    assert manual["lookup_contact"].parameters["required"] == ["name"]


def test_bad_tool_files(tmp_path):
    (tmp_path / "broken.py").write_text("import nonexistent_module_xyz\n")
    (tmp_path / "empty.py").write_text("X = 1\n")
    (tmp_path / "bad.json").write_text("[{")
    (tmp_path / "noname.json").write_text('[{"description": "x"}]')
    (tmp_path / "tools.txt").write_text("")
    for name, message in [
        ("broken.py", "importing it failed"),
        ("empty.py", "no public functions"),
        ("bad.json", "not valid JSON"),
        ("noname.json", "has no name"),
        ("tools.txt", "expected a Python module"),
        ("missing.py", "no such file"),
    ]:
        with pytest.raises(ToolFileError, match=message):
            load_tools(tmp_path / name)


def test_function_tool_reports_errors_to_the_model():
    def boom(x: int) -> int:
        raise RuntimeError("no luck")

    tool = FunctionTool("boom", "", function_schema(boom)["parameters"], boom)
    assert tool.call('{"x": 1}') == (False, "error: RuntimeError: no luck")
    assert tool.call("[1]") == (False, "error: the arguments must be a JSON object")
    assert tool.signature() == "boom(x: integer)"


# ===================================================================================================
# The python sandbox
# ===================================================================================================


@pytest.mark.skipif(not sys.platform.startswith(("linux", "darwin")), reason="POSIX limits")
def test_python_sandbox_runs_code_with_limits():
    box = PythonSandbox(timeout=2, memory_mb=512)
    result = box.run("import os\nprint('cwd', os.getcwd().split(os.sep)[-1][:14])\n6 * 7")
    assert result.ok and result.output.splitlines() == ["cwd oss-mlx-python", "42"]
    result = box.run("x = bytearray(2 << 30)")
    assert not result.ok and "MemoryError" in result.output
    result = box.run("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)")
    assert not result.ok and ("unreachable" in result.output or "disabled" in result.output)
    result = box.run("1/0")
    assert "ZeroDivisionError" in result.output and "runner" not in result.output
    assert 'File "<string>"' not in result.output  # the runner's own frames are hidden


def test_python_sandbox_times_out():
    result = PythonSandbox(timeout=1).run("while True:\n    pass")
    assert result.timed_out and "timed out after 1 seconds" in result.output


# ===================================================================================================
# Saving and loading, commands, stats
# ===================================================================================================


def test_save_and_load_round_trip(tmp_path):
    messages = [
        Message("user", "Hi"),
        Message("assistant", "thinking", channel="analysis"),
        Message("assistant", '{"a": 1}', "commentary", "functions.f", "<|constrain|>json"),
        Message("tool", "ok", "commentary", "assistant", name="functions.f"),
        Message("assistant", "Hello", channel="final"),
    ]
    path = tmp_path / "sub" / "chat.json"
    save_conversation(path, [Message("system", "ours"), *messages], {"reasoning_effort": "low"})
    loaded, settings = load_conversation(path)
    assert loaded == messages and settings == {"reasoning_effort": "low"}
    assert [p.name for p in path.parent.iterdir()] == ["chat.json"]  # no temporary file left


def test_load_errors(tmp_path):
    cases = {
        "missing.json": None,
        "bad.json": "{",
        "list.json": '{"messages": 3}',
        "role.json": '{"messages": [{"role": "x", "content": ""}]}',
        "field.json": '{"messages": [{"role": "user", "content": "", "mood": "happy"}]}',
        "content.json": '{"messages": [{"role": "user", "content": 5}]}',
        "tool.json": '{"messages": [{"role": "tool", "content": "x"}]}',
        "format.json": '{"format": "other", "messages": []}',
    }
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(ChatFileError):
            load_conversation(tmp_path / name)
    with pytest.raises(ChatFileError, match="is a folder"):
        load_conversation(tmp_path)


def test_atomic_write_replaces_whole_files(tmp_path):
    path = tmp_path / "f.json"
    write_text(path, "one", private=True)
    assert path.stat().st_mode & 0o777 == 0o600  # a new private file
    path.chmod(0o640)
    write_text(path, "two")
    assert path.read_text() == "two" and len(list(tmp_path.iterdir())) == 1
    assert path.stat().st_mode & 0o777 == 0o640  # a replaced file keeps its permissions


def test_data_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("OSS_MLX_HOME", str(tmp_path / "h"))
    assert data_dir() == tmp_path / "h"
    monkeypatch.delenv("OSS_MLX_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "x"))
    assert data_dir() == tmp_path / "x" / "oss-mlx"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert data_dir() == Path("~/.local/share/oss-mlx").expanduser()


def test_command_parsing_and_completion():
    from prompt_toolkit.completion import CompleteEvent
    from prompt_toolkit.document import Document

    assert commands.parse_command("/effort high") == ("effort", "high")
    assert commands.parse_command("  /SAVE  my file.json ") == ("save", "my file.json")
    assert commands.parse_command("/usr/bin is a folder") is None
    assert commands.parse_command("//effort is a word") is None
    assert commands.unescape("//effort is a word") == "/effort is a word"
    assert commands.parse_command("hello /help") is None
    assert commands.find("quit").name == "exit" and commands.find("re") is None  # regen / reasoning / reset
    assert commands.find("st").name == "stats"
    assert commands.find("eff").name == "effort"

    def complete(text: str) -> list[str]:
        completer = commands.SlashCompleter()
        return [c.text for c in completer.get_completions(Document(text, len(text)), CompleteEvent())]

    assert complete("/ef") == ["/effort"]
    assert set(complete("/re")) == {"/reasoning", "/regen"}
    assert complete("/effort h") == ["high"]
    assert complete("/reasoning ") == ["show", "hide", "summary"]
    assert complete("hello") == []


def test_stats_line():
    stats = GenerationStats(
        prompt_tokens=1200,
        prefilled_tokens=35,
        generated_tokens=150,
        generation_seconds=3.0,
        time_to_first_token=0.25,
        peak_memory_gb=12.5,
        context_tokens=1385,
        finish_reason="stop",
    )
    line = format_stats(stats, 131072)
    assert line == (
        "0.25 s to first token · 50.0 tok/s · 150 tokens · prefilled 35/1,200 · context 1,385/131,072 · "
        "peak 12.50 GB"
    )
    stats.finish_reason = "length"
    assert format_stats(stats, None).endswith("· length")


def test_refuses_a_model_that_does_not_fit_and_says_what_to_do(tiny_checkpoint, vocab_dir, tmp_path):
    """Never let the machine swap: the planner's advice, and no load, when the model does not fit."""
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "TIKTOKEN_CACHE_DIR": str(vocab_dir),
        "OSS_MLX_HOME": str(tmp_path),
        "OSS_MLX_MEMORY_GB": "0.01",  # plan as if the GPU budget were 10 MB
    }
    cmd = [sys.executable, "-m", "oss_mlx.cli", "chat", "--model", str(tiny_checkpoint)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert "does not fit" in text and "--memory-budget" in text and "Traceback" not in text
    assert "loaded in" not in text


# ===================================================================================================
# Keys, long prompts, copying, Ctrl-C, reasoning, commands (end to end, in tmux)
# ===================================================================================================


def user_messages(app: TmuxChat, path: Path) -> list[str]:
    app.command(f"/save {path}", r"saved")
    return [m["content"] for m in saved(path)["messages"] if m["role"] == "user"]


@needs_tmux
def test_alt_enter_adds_a_line_and_enter_sends(chat, tmp_path):
    app = chat(replies=[SHORT, SHORT, SHORT])
    app.type("first line", enter=False)
    app.keys("M-Enter")  # Alt+Enter as a terminal sends it: Escape, then Enter
    app.type("second line", enter=False)
    app.keys("Escape", "Enter")  # the same, typed as two keys
    app.type("third line", enter=False)
    app.wait_for(r"^\.\.\. third line", count=1)
    assert "tok/s" not in app.screen()  # nothing was sent yet
    app.keys("Enter")
    app.wait_for(r"Short answer\.")
    app.wait_prompt()
    assert user_messages(app, tmp_path / "a.json") == ["first line\nsecond line\nthird line"]
    # /multi swaps them: Enter adds a line, Alt+Enter sends.
    app.command("/multi", r"multi-line input")
    app.type("one", enter=False)
    app.keys("Enter")
    app.type("two", enter=False)
    app.keys("M-Enter")
    app.wait_for(r"Short answer\.", count=2)
    app.wait_prompt()
    app.type("/multi", enter=False)
    app.keys("M-Enter")
    app.wait_for(r"single-line input")
    app.wait_prompt()
    assert user_messages(app, tmp_path / "b.json")[-1] == "one\ntwo"


CODE = (
    "def double(x):\n"
    "    return x * 2  # " + "a comment longer than the terminal is wide " * 3 + "\n"
    "\n"
    "class A:\n"
    "    pass"
)
CODE_REPLY = harmony_reply(f"Here:\n\n```python\n{CODE}\n```\n\nAnd `inline`.\n\n```sh\nls -l\n```\n\nDone.")


def fake_clipboard(folder: Path) -> tuple[Path, Path]:
    """A `wl-copy` that writes what it is given to a file (the clipboard program's place)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "clipboard.txt"
    program = folder / "wl-copy"
    program.write_text(f"#!/bin/sh\n{shutil.which('cat')} > {out}\n")
    program.chmod(0o755)
    return folder, out


@needs_tmux
def test_code_blocks_copy_exactly_and_copy_puts_them_on_the_clipboard(tmp_path, vocab_dir, tiny_checkpoint):
    no_clipboard = {"DISPLAY": "", "WAYLAND_DISPLAY": ""}
    app = TmuxChat(tmp_path / "home", vocab_dir).start(
        ["--model", str(tiny_checkpoint)], replies=[CODE_REPLY], env_extra=no_clipboard
    )
    try:
        app.wait_prompt(60)
        app.command("Some code?", r"Done\.")
        # What the pane shows, wrapped lines joined and trailing spaces kept (tmux -J): the code
        # lines, exactly, with no padding column on the left and no spaces to the full width.
        shown = app.tmux("capture-pane", "-p", "-J", "-S", "-").split("\n")
        first = shown.index("def double(x):")
        assert shown[first : first + 5] == CODE.split("\n")
        assert "ls -l" in shown and shown[first - 1] == "" and shown[first + 5] == ""

        screen = app.command("/copy code", r"copied the code block")
        path = Path(re.search(r"also in (\S+)\)", screen).group(1))
        assert path == tmp_path / "home" / "copied.txt" and path.read_text() == "ls -l\n"
        assert app.tmux("show-buffer") == "ls -l\n"  # OSC 52 reached the terminal (tmux)
        app.command("/copy", r"copied the reply")
        reply = path.read_text()
        assert reply.startswith("Here:\n\n```python\ndef double(x):") and reply.endswith("Done.")
        assert app.tmux("show-buffer") == reply
        app.command("/copy everything", r"/copy code its last code block")
    finally:
        app.close()
    # Where a clipboard program exists, it gets the text.
    bin_dir, clipboard = fake_clipboard(tmp_path / "bin")
    env = {"WAYLAND_DISPLAY": "wayland-test", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    app = TmuxChat(tmp_path / "home2", vocab_dir).start(
        ["--model", str(tiny_checkpoint)], replies=[CODE_REPLY], env_extra=env
    )
    try:
        app.wait_prompt(60)
        app.command("/copy", r"nothing to copy: no reply yet")
        app.command("Some code?", r"Done\.")
        app.command("/copy code", r"copied the code block .* to the clipboard \(wl-copy\)")
        assert clipboard.read_text() == "ls -l\n"
    finally:
        app.close()


@needs_tmux
def test_a_long_prompt_shows_progress_and_ctrl_c_says_what_happened(chat):
    """Prefill progress (done/total, rate) while a long paste is read; Ctrl-C then reports how many
    tokens were processed and that there is no reply; /stats shows real numbers."""
    app = chat(replies=[SHORT])
    text = "\n".join(
        f"Line {i}: here is some context about the problem, with details worth remembering."
        for i in range(600)
    )
    app.paste(text)
    app.wait_for(r"Line 599: here")
    app.keys("Enter")
    shown = app.wait_for(r"reading the prompt: (2,048|[3-9],\d{3})/10,\d{3} tokens \(\d+%\) · [\d,]+ tok/s")
    total = int(re.search(r"reading the prompt: [\d,]+/([\d,]+)", shown).group(1).replace(",", ""))
    app.keys("C-c")
    app.wait_for(r"stopped \(Ctrl-C\) while reading the prompt", timeout=60)
    # the turn's status line comes after the message (a loaded machine may show the screen between)
    screen = app.wait_for(r"no reply · prefilled [\d,]+/[\d,]+ in [\d.]+ s", timeout=60)
    app.wait_prompt()
    m = re.search(r"while reading the prompt: ([\d,]+) of ([\d,]+) new tokens were processed", screen)
    done = int(m.group(1).replace(",", ""))
    assert int(m.group(2).replace(",", "")) == total and 2048 <= done < total and done % 2048 == 0
    assert "no reply was produced" in screen and "the reply so far is kept" not in screen
    assert re.search(rf"no reply · prefilled {done:,}/{total:,} in [\d.]+ s", screen)
    screen = app.command("/stats", r"context: ")
    assert re.search(rf"^1\s+{total}\s+{done}\s+0\s.*interrupted", screen, re.MULTILINE), screen
    assert re.search(rf"context: {done:,} / [\d,]+ tokens in the cache", screen)  # kept for the next turn
    peak = float(re.search(r"peak memory ([\d.]+) GB", screen).group(1))
    assert peak > 0
    assert "Traceback" not in screen


@needs_tmux
def test_three_quick_ctrl_c_do_not_quit_silently(chat):
    app = chat("--max-tokens", "100000", replies=[LONG])
    app.type("Tell me a very long story")
    app.wait_for(r"word12 ")
    app.keys("C-c", "C-c", "C-c")  # one meant for the reply, two more in the heat of the moment
    app.wait_for(r"stopped \(Ctrl-C\)")
    app.wait_prompt()
    time.sleep(1.0)
    assert app.alive(), app.screen()
    # From the prompt, Ctrl-C twice quits, and says so.
    for _ in range(2):  # the third press above may already have armed the quit
        app.keys("C-c")
        deadline = time.monotonic() + 3
        while app.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not app.alive():
            break
    assert app.wait_exit() == 0
    screen = app.screen()
    assert "Ctrl-C again quits" in screen and "bye: the conversation is saved in" in screen


@needs_tmux
def test_streamed_reasoning_breaks_lines_between_words(chat):
    words = [f"w{i}{'x' * (3 + i % 9)}" for i in range(90)]
    app = chat("--reasoning", "show", replies=[harmony_reply("Fine.", analysis=" ".join(words))])
    app.command("Think aloud", r"Fine\.")
    rows = app.tmux("capture-pane", "-p", "-S", "-").splitlines()  # the screen's rows, as wrapped
    shown = [row for row in rows if row.startswith("w") and "x" in row]
    assert len(shown) >= 5  # the reasoning took several rows of the 120-column pane
    assert " ".join(" ".join(shown).split()) == " ".join(words)
    for row in shown:
        assert all(word in words for word in row.split()), row  # no word cut in two


@needs_tmux
def test_ambiguous_commands_and_the_date_in_the_system_message(chat, tmp_path):
    from oss_mlx.chat.slash import today

    app = chat(replies=[SHORT])
    app.command("/e", r"/e could be /effort or /exit: type more of the name")
    app.command("/re", r"/re could be /reasoning or /regen or /reset")
    screen = app.command("/system", r"developer message")
    assert f"Current date: {today()}" in screen
    app.command("Hi", r"Short answer\.")
    path = tmp_path / "dated.json"
    app.command(f"/save {path}", r"saved")
    data = saved(path)
    assert (
        data["settings"]["current_date"] == today() and f"Current date: {today()}" in data["system_message"]
    )
    # A conversation loaded keeps its own start date (the one its cache and history were made with).
    data["settings"]["current_date"] = "2025-08-05"
    path.write_text(json.dumps(data))
    app.command(f"/load {path}", r"loaded")
    assert "Current date: 2025-08-05" in app.command("/system", r"developer message", timeout=10)


# ===================================================================================================
# Parts of the above, in-process
# ===================================================================================================


def test_code_blocks_render_without_padding():
    from rich.console import Console

    for terminal in (True, False):
        out = io.StringIO()
        console = Console(file=out, width=30, force_terminal=terminal, color_system="256", highlight=False)
        stream = MarkdownStream(console, live=False)
        stream.feed(f"Intro.\n\n```python\n{CODE}\n```\n\n- a list with code:\n\n  ```\n  x = 1\n  ```\n")
        stream.finish()
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in out.getvalue().split("\n")]
        first = lines.index("def double(x):")
        assert lines[first : first + 5] == CODE.split("\n")  # long lines are not cut either
        nested = next(line for line in lines if "x = 1" in line)
        assert nested.strip() == "x = 1" and not nested.endswith(" ")


def test_word_wrap_never_cuts_a_word():
    from oss_mlx.chat.render import WordWrap

    words = [f"word{i}{'y' * (i % 11)}" for i in range(200)]
    text = " ".join(words) + "\nnext paragraph\n"
    for step in (1, 3, 7):
        wrap = WordWrap(40)
        out = "".join(wrap.feed(text[i : i + step]) for i in range(0, len(text), step)) + wrap.flush()
        rows = out.split("\n")
        assert all(len(row) <= 40 and not row.endswith(" ") for row in rows)
        assert " ".join(" ".join(rows[:-2]).split()) == " ".join(words) and rows[-2] == "next paragraph"


def test_ambiguous_prefixes_list_their_candidates():
    assert commands.candidates("e") == ["effort", "exit"]
    assert commands.candidates("re") == ["reasoning", "regen", "reset"]  # reset: /clear's alias
    assert commands.candidates("zz") == [] and commands.find("cop").name == "copy"


def test_osc52_and_the_file_fallback(tmp_path, monkeypatch):
    import base64

    from oss_mlx.chat import clipboard

    bin_dir, out = fake_clipboard(tmp_path / "bin")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    written: list[str] = []
    done = clipboard.copy_text("héllo\n  world\n", tmp_path / "copied.txt", written.append)
    assert done.how == "OSC 52" and done.path.read_text() == "héllo\n  world\n"
    assert written == ["\x1b]52;c;" + base64.b64encode("héllo\n  world\n".encode()).decode() + "\x07"]
    done = clipboard.copy_text("x", tmp_path / "copied.txt", None)  # not a terminal: the file only
    assert done.how == "file" and done.path.read_text() == "x"
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("WAYLAND_DISPLAY", "wayland-test")
    assert clipboard.copy_text("y", tmp_path / "unused.txt", written.append).how == "wl-copy"
    assert out.read_text() == "y" and not (tmp_path / "unused.txt").exists()


def test_set_checks_values_as_the_flags_do():
    from types import SimpleNamespace

    from rich.console import Console

    from oss_mlx.chat.app import ChatApp

    out = io.StringIO()
    app = ChatApp(SimpleNamespace(messages=[], tools=[]), Console(file=out, width=200), sampling={"seed": 3})
    for line, expected in [
        ("temperature -3", "temperature must be between 0 and 2 (got -3)"),
        ("top_p 9", "top_p must be greater than 0 and at most 1 (got 9)"),
        ("seed 99999999999999999999", "seed must be between -1 and 2^64-1 (got 99999999999999999999)"),
        ("max_tokens 0", "max_tokens must be between 1 and"),
        ("seed -1", "seed: random"),
        ("temperature 0.7", "temperature: 0.7"),
    ]:
        app.cmd_set(line)
        assert expected in out.getvalue(), (line, out.getvalue())
    assert app.sampling == {"temperature": 0.7}  # -1: the seed is random again


def test_stats_line_of_a_reply_stopped_in_its_prompt():
    stats = GenerationStats(
        prompt_tokens=29599, prefilled_tokens=8192, prompt_seconds=4.0, context_tokens=8192,
        peak_memory_gb=0.3, finish_reason="interrupted",
    )  # fmt: skip
    assert format_stats(stats, None) == (
        "no reply · prefilled 8,192/29,599 in 4.0 s (2,048 tok/s) · context 8,192 · peak 0.30 GB"
        " · interrupted"
    )


def test_the_system_message_date_renders_as_openai_harmony_renders_it(loaded_tiny):
    """The chat's Session carries today's date (as OpenAI's reference chat does), token for token."""
    oh = pytest.importorskip("openai_harmony")
    from oss_mlx.chat.slash import today
    from oss_mlx.session import Session

    model, tokenizer = loaded_tiny
    date = today()
    ours = Session(model, tokenizer, current_date=date).render([Message("user", "Hi")])
    enc = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    system = oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort.MEDIUM)
    system = system.with_conversation_start_date(date)
    conversation = oh.Conversation.from_messages(
        [
            oh.Message.from_role_and_content(oh.Role.SYSTEM, system),
            oh.Message.from_role_and_content(oh.Role.USER, "Hi"),
        ]
    )
    theirs = enc.render_conversation_for_completion(conversation, oh.Role.ASSISTANT)
    assert ours == theirs and f"Current date: {date}" in tokenizer.decode(ours)
