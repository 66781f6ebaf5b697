"""`oss-mlx chat` against bad input: files that are not conversations, saves that would replace
another file, a context limit, an unwritable history, a short terminal, odd commands. The real program
in tmux (chat_helpers.TmuxChat), as in test_chat.py, and unit tests of the parts."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from chat_helpers import REPO, TmuxChat, env_has_tmux, harmony_reply

from oss_mlx.chat.app import format_stats
from oss_mlx.chat.history import MAX_FILE_BYTES, ChatFileError, load_conversation
from oss_mlx.chat.keys import menu_rows
from oss_mlx.chat.render import WordWrap, plural
from oss_mlx.generation import GenerationStats

needs_tmux = pytest.mark.skipif(not env_has_tmux(), reason="tmux is not installed (apt-get install -y tmux)")

SHORT = harmony_reply("Short answer.", analysis="Easy.")
LONG = harmony_reply(" ".join(f"word{i}" for i in range(3000)))


def saved(path: Path) -> dict:
    return json.loads(path.read_text())


def users(path: Path) -> list[str]:
    return [m["content"] for m in saved(path)["messages"] if m["role"] == "user"]


def run_chat(args: list[str], home: Path, vocab_dir: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {
        **os.environ,
        "OSS_MLX_HOME": str(home),
        "TIKTOKEN_CACHE_DIR": str(vocab_dir),
        "TIKTOKEN_RS_CACHE_DIR": str(vocab_dir),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "oss_mlx.cli", "chat", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
        stdin=subprocess.DEVNULL,
    )


# ---------------------------------------------------------------------------------------------------
# /load: only regular files of a sane size; the conversation left is kept
# ---------------------------------------------------------------------------------------------------


def test_load_refuses_devices_pipes_and_huge_files_before_reading(tmp_path):
    with pytest.raises(ChatFileError, match="not a regular file"):
        load_conversation("/dev/zero")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    start = time.monotonic()
    with pytest.raises(ChatFileError, match="not a regular file"):
        load_conversation(fifo)  # no writer: reading it would wait forever
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: nothing is written, nothing must be read
    with pytest.raises(ChatFileError, match="too big for a conversation"):
        load_conversation(huge)
    assert time.monotonic() - start < 5
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ChatFileError, match="not UTF-8"):
        load_conversation(binary)


@needs_tmux
def test_load_keeps_the_conversation_it_replaces_and_refuses_dev_zero(chat, tmp_path):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"messages": [{"role": "user", "content": "An old question"}]}))
    app = chat(replies=[SHORT, SHORT])
    app.command("/load /dev/zero", r"cannot load: /dev/zero: not a regular file", timeout=10)
    app.command("My own question", r"Short answer\.")
    chats = tmp_path / "home" / "chats"
    (first,) = chats.glob("*.json")
    screen = app.command(f"/load {other}", r"loaded 1 message \(1 turn\)")
    assert f"the previous conversation stays saved in {first}" in screen
    assert users(first) == ["My own question"]  # not replaced by the loaded one
    app.command("And now?", r"Short answer\.", timeout=30)
    assert users(first) == ["My own question"]
    (second,) = set(chats.glob("*.json")) - {first}
    assert users(second) == ["An old question", "And now?"]
    assert users(other) == ["An old question"]  # the loaded file is left as it was
    screen = app.command("/clear", r"new conversation")
    assert f"the previous conversation stays saved in {second}" in screen
    assert "Traceback" not in app.screen()


# ---------------------------------------------------------------------------------------------------
# /save: never replaces another file unless asked; quotes; no folders made up
# ---------------------------------------------------------------------------------------------------


@needs_tmux
def test_save_refuses_to_replace_a_file_strips_quotes_and_wants_the_folder(chat, tmp_path):
    precious = tmp_path / "notes.txt"
    precious.write_text("my notes")
    precious.chmod(0o644)
    app = chat(replies=[SHORT])
    app.command("Hello", r"Short answer\.")
    screen = app.command(f"/save {precious}", r"already exists: choose another name, or /save! ")
    assert precious.read_text() == "my notes"
    mine = tmp_path / "mine.json"
    app.command(f"/save {mine}", r"saved 3 messages")
    app.command(f"/save {mine}", r"saved 3 messages", timeout=10)  # its own save: replaced
    app.command(f"/save! {precious}", r"saved 3 messages")
    assert users(precious) == ["Hello"] and (precious.stat().st_mode & 0o777) == 0o644  # mode kept
    app.command(f'/save "{tmp_path}/with space.json"', r"saved 3 messages")
    assert users(tmp_path / "with space.json") == ["Hello"]
    screen = app.command(f"/save {tmp_path}/missing/dir/x.json", r"does not exist \(create it")
    assert not (tmp_path / "missing").exists()
    app.command(f"/save {tmp_path}", r"it is a folder")
    app.command(f"/load! {mine}", r"/load has no ! form")
    assert [p.name for p in tmp_path.glob(".*.tmp")] == []  # no temporary file left
    screen = app.command("/help save", r"/save! FILE replaces it")
    assert "Traceback" not in screen


# ---------------------------------------------------------------------------------------------------
# The context limit
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def short_context_model(tiny_checkpoint, tmp_path) -> Path:
    """The tiny model with a context of 600 tokens (max_position_embeddings)."""
    folder = tmp_path / "short-context"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 600
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@needs_tmux
def test_the_context_limit_refuses_a_long_message_and_caps_the_reply(chat, tmp_path, short_context_model):
    app = chat("--max-tokens", "100000", replies=[LONG, SHORT], model=short_context_model)
    assert "context limit 600" in app.screen()
    app.paste(" ".join(f"w{i}" for i in range(700)))
    app.keys("Enter")
    screen = app.wait_for(r"message too long")
    app.wait_prompt()
    line = next(line for line in app.lines() if "message too long" in line)
    assert re.search(r"the prompt would be [\d,]+ tokens, over the context limit of 600", line), line
    assert "/undo" in line and "/clear" in line and "tok/s" not in screen  # nothing was processed
    # A reply stops at the limit, whatever --max-tokens says.
    screen = app.command("Tell me a long story", r"stopped at the context limit")
    found = re.findall(r"context ([\d,]+)/600", screen)
    assert found and int(found[-1].replace(",", "")) <= 600, found
    app.command("More?", r"message too long")  # the conversation fills the context
    path = tmp_path / "c.json"
    app.command(f"/save {path}", r"saved")
    assert users(path) == ["Tell me a long story"]  # neither refused message was kept
    # /undo: the bottom line shows what is left, at once.
    app.command("/undo", r"removed: Tell me")
    app.wait_for(r"· context 0/600 ·")
    assert "Traceback" not in app.screen()


# ---------------------------------------------------------------------------------------------------
# Start-up: a history that cannot be written, a bad test hook file
# ---------------------------------------------------------------------------------------------------


def test_an_unwritable_history_or_data_folder_stops_the_chat_at_start(tmp_path, vocab_dir, tiny_checkpoint):
    model = ["--model", str(tiny_checkpoint)]
    home = tmp_path / "home"
    proc = run_chat([*model, "--history", "/proc/h.json"], home, vocab_dir)
    assert proc.returncode == 2, proc.stderr
    assert "cannot keep the conversation: cannot write in /proc" in proc.stderr
    assert "--no-autosave" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "loading" not in proc.stdout  # before the model
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    proc = run_chat(model, a_file, vocab_dir)
    assert proc.returncode == 2 and "set OSS_MLX_HOME to a folder you can write" in proc.stderr, proc.stderr
    proc = run_chat([*model, "--history", str(tmp_path)], home, vocab_dir)
    assert proc.returncode == 2 and "is a folder, not a file" in proc.stderr, proc.stderr


def test_a_wrong_scripted_replies_file_is_one_line(tmp_path, vocab_dir, tiny_checkpoint):
    rules = tmp_path / "rules.json"
    for content in (
        '["<|channel|>final<|message|>Hi<|return|>"]',
        '[{"reply": "x", "token_delay": "slow"}]',
        "not json",
    ):
        rules.write_text(content)
        proc = run_chat(
            ["--model", str(tiny_checkpoint)],
            tmp_path / "home",
            vocab_dir,
            OSS_MLX_SCRIPTED_REPLIES=str(rules),
        )
        assert proc.returncode == 2, proc.stderr
        assert "OSS_MLX_SCRIPTED_REPLIES=" in proc.stderr and "list of rules" in proc.stderr
        assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ---------------------------------------------------------------------------------------------------
# A short terminal; small things
# ---------------------------------------------------------------------------------------------------


def test_menu_rows_shrink_on_a_short_terminal():
    assert menu_rows(40) == 8 and menu_rows(8) == 6 and menu_rows(5) == 3 and menu_rows(2) == 0


@needs_tmux
@pytest.mark.parametrize("rows", [8, 5])
def test_a_short_terminal_still_chats(chat, rows):
    app = chat(replies=[SHORT], height=rows)
    assert "Window too small" not in app.screen()
    app.command("Hi", r"Short answer\.")
    app.type("/ef", enter=False)  # the completion menu fits in what is left
    app.wait_for(r"/effort")
    assert "Window too small" not in app.screen()


def test_the_force_form_parses_and_completes(tmp_path):
    from prompt_toolkit.completion import CompleteEvent
    from prompt_toolkit.document import Document

    from oss_mlx.chat import commands

    assert commands.parse_command("/save! my.json") == ("save!", "my.json")
    assert commands.parse_command("/") is None  # the chat answers it (test_odd_commands_get_a_message)
    (tmp_path / "chat.json").write_text("{}")
    text = f"/save! {tmp_path}/ch"
    found = commands.SlashCompleter().get_completions(Document(text, len(text)), CompleteEvent())
    assert [c.text for c in found] == ["at.json"]


def test_plurals():
    assert plural(1, "token") == "1 token" and plural(0, "token") == "0 tokens"
    assert plural(1024, "line") == "1,024 lines"
    stats = GenerationStats(prompt_tokens=10, prefilled_tokens=10, generated_tokens=1, context_tokens=11)
    stats.finish_reason = "stop"
    assert " · 1 token · " in format_stats(stats, None)


def test_word_wrap_follows_a_resize():
    wrap = WordWrap(40)
    out = wrap.feed("aaaa " * 6)
    wrap.resize(12)
    out += wrap.feed("bbbb " * 6) + wrap.flush()
    rows = out.split("\n")
    assert all(len(r) <= 40 for r in rows) and all(len(r) <= 12 for r in rows[1:]), rows


@needs_tmux
def test_odd_commands_get_a_message(chat, tmp_path):
    app = chat(replies=[SHORT])
    app.command("/", r"/ is not a command: /help lists the commands")
    app.command("/!", r"/! is not a command: /help lists the commands")
    app.command("/help extra words", r"no command /extra words: /help alone lists them all")
    app.command("/help eff", r"/effort \[low\|medium\|high\]  reasoning effort")
    app.command("/clear now", r"/clear takes no argument")
    app.command("/set foo 1", r"unknown setting 'foo': /set takes temperature, top_p, max_tokens, seed")
    app.command("/set top_p", r"/set top_p VALUE")
    assert "tok/s" not in app.screen()  # none of them reached the model
    app.command("Hi", r"Short answer\.")
    path = tmp_path / "odd.json"
    app.command(f"/save {path}", r"saved 3 messages")
    assert users(path) == ["Hi"]


@needs_tmux
def test_keys_typed_before_the_reply_starts_wait_for_the_prompt(chat, tmp_path):
    """Enter, then more keys at once: they are not echoed into the reply, and each Enter sends."""
    app = chat(replies=[SHORT, SHORT, SHORT])
    app.type("first", enter=False)
    app.keys("Enter", "abc", "Enter", "def", "Enter")  # at once: the first message is still handled
    app.wait_for(r"Short answer\.", count=3)
    app.wait_prompt()
    path = tmp_path / "typed.json"
    app.command(f"/save {path}", r"saved")
    assert users(path) == ["first", "abc", "def"]


@needs_tmux
def test_keys_typed_while_a_command_works_wait_for_the_prompt(chat, tmp_path):
    """Between two prompts (here a /load that takes a moment) the terminal echoes nothing, and an
    Enter typed then still sends: it used to show in the output, and to reach the next prompt as a
    new line, merging the next two messages into one."""
    big = tmp_path / "big.json"
    filler = [{"role": "system", "content": ""}] * 600_000  # parsed, then dropped: slow, but no tokens
    big.write_text(json.dumps({"messages": [*filler, {"role": "user", "content": "Old"}]}))
    app = chat(replies=[SHORT, SHORT])
    app.type(f"/load {big}")
    time.sleep(0.3)  # the line has left the prompt; the file is being read
    app.keys("abc", "Enter", "def", "Enter")
    screen = app.wait_for(r"Short answer\.", count=2, timeout=60)
    app.wait_prompt()
    assert not re.search(r"^abc", screen[: screen.index("loaded")], re.MULTILINE), screen
    path = tmp_path / "typed.json"
    app.command(f"/save {path}", r"saved")
    assert users(path) == ["Old", "abc", "def"]


@needs_tmux
def test_streamed_reasoning_follows_a_resize(tmp_path, vocab_dir, tiny_checkpoint):
    """--reasoning show breaks lines between words at the terminal's width of the moment."""
    words = " ".join(f"word{i}" for i in range(300))
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"reply": harmony_reply("Done.", analysis=words), "token_delay": 0.01}]))
    app = TmuxChat(tmp_path / "home", vocab_dir, width=100, height=40)
    try:
        app.start(
            ["--model", str(tiny_checkpoint), "--reasoning", "show"],
            env_extra={"OSS_MLX_SCRIPTED_REPLIES": str(rules)},
            live_size=True,
        )
        app.wait_prompt(timeout=60)
        app.type("Count")
        app.wait_for(r"word40 ")
        app.tmux("resize-window", "-x", "50", "-y", "40")
        app.wait_for(r"Done\.", timeout=60)
        rows = app.tmux("capture-pane", "-p", "-S", "-").splitlines()  # rows as shown, not joined
        later = [r.rstrip() for r in rows if re.search(r"word(1\d\d|2\d\d)\b", r)]
        assert later and all(len(r) <= 50 for r in later), later
        tokens = " ".join(later).split()
        assert all(re.fullmatch(r"word\d+", t) for t in tokens), later  # no word cut in two
    finally:
        app.close()
