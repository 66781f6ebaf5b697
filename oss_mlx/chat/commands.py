"""Slash commands: their table, parsing, help, and completion at the prompt.

The commands themselves are `ChatApp.cmd_<name>` methods (app.py); this module only knows their
names, arguments and help, so it stays cheap to import and easy to test.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from prompt_toolkit.completion import CompleteEvent, Completer, Completion, PathCompleter
from prompt_toolkit.document import Document


@dataclass(frozen=True)
class Command:
    name: str
    usage: str
    help: str
    choices: tuple[str, ...] = ()
    path: bool = False  # the argument is a file
    aliases: tuple[str, ...] = ()


COMMANDS: tuple[Command, ...] = (
    Command("help", "/help [COMMAND]", "this list, or one command's line"),
    Command(
        "effort",
        "/effort [low|medium|high]",
        "reasoning effort (system message 'Reasoning: ...'), from the next reply",
        ("low", "medium", "high"),
    ),
    Command(
        "reasoning",
        "/reasoning [show|hide|summary]",
        "how the chain of thought is shown; without argument: print the last one in full",
        ("show", "hide", "summary"),
    ),
    Command(
        "system",
        "/system [TEXT|none]",
        "instructions (harmony's developer message); without argument: show the system and developer "
        "messages as the model sees them",
    ),
    Command("developer", "/developer [TEXT|none]", "same as /system"),
    Command("clear", "/clear", "start a new conversation (settings kept)", aliases=("new", "reset")),
    Command("regen", "/regen", "drop the last reply and generate it again", aliases=("retry",)),
    Command("undo", "/undo", "remove your last message and its reply"),
    Command(
        "save",
        "/save FILE",
        "save the conversation as JSON; another file of that name is kept (/save! FILE replaces it)",
        path=True,
    ),
    Command("load", "/load FILE", "continue a saved conversation", path=True),
    Command("tools", "/tools", "the tools the model can call"),
    Command("stats", "/stats", "per reply: prompt, tokens prefilled (not reused from the cache), speed"),
    Command(
        "set",
        "/set [NAME VALUE]",
        "sampling: temperature, top_p, max_tokens, seed (none: random); without argument: show them",
        ("temperature", "top_p", "max_tokens", "seed"),
    ),
    Command(
        "copy",
        "/copy [code]",
        "copy the last reply (or its last code block) to the clipboard, exactly as written",
        ("code",),
    ),
    Command(
        "json",
        "/json [SCHEMA_FILE|off]",
        "answers follow this JSON schema (enforced; reasoning stays free); off: free text; no argument: show",
        path=True,
    ),
    Command("multi", "/multi", "toggle multi-line input (Enter: new line, Alt+Enter: send)"),
    Command("exit", "/exit", "quit (also Ctrl-D, or Ctrl-C twice on an empty line)", aliases=("quit", "q")),
)

_BY_NAME = {c.name: c for c in COMMANDS} | {a: c for c in COMMANDS for a in c.aliases}
_COMMAND_RE = re.compile(r"^/([A-Za-z][\w-]*!?)(?:\s+(.*))?$", re.DOTALL)  # "!": /save! replaces


def parse_command(line: str) -> tuple[str, str] | None:
    """(name, argument) when `line` is a slash command, else None.

    "/name arg": a command, known or not. A first word with a second slash ("/usr/bin is ...") is a
    message; so is a line starting with "//" (the first slash is dropped: see `unescape`).
    """
    text = line.strip()
    if not text.startswith("/") or text.startswith("//"):
        return None
    m = _COMMAND_RE.match(text)
    if m is None:
        return None
    return m.group(1).lower(), (m.group(2) or "").strip()


def looks_like_command(text: str) -> bool:
    """A lone word after one slash that is no command's form ("/", "/!", "/?", "/2"): a typo of a
    command, not a message (a path has a second slash; words after it make a message)."""
    rest = text[1:]
    return text.startswith("/") and not rest.startswith("/") and "/" not in rest and len(rest.split()) <= 1


def unescape(line: str) -> str:
    """A message that starts with "//" is sent with one slash."""
    stripped = line.lstrip()
    return stripped[1:] if stripped.startswith("//") else line


def find(name: str) -> Command | None:
    """A command by name or alias, or by an unambiguous prefix."""
    if name in _BY_NAME:
        return _BY_NAME[name]
    matches = candidates(name)
    return _BY_NAME[matches[0]] if len(matches) == 1 else None


def candidates(prefix: str) -> list[str]:
    """The commands a prefix could mean, one spelling each (the name, or the alias that matched)."""
    seen: dict[Command, str] = {}
    for key, command in _BY_NAME.items():
        if key.startswith(prefix) and command not in seen:
            seen[command] = command.name if command.name.startswith(prefix) else key
    return sorted(seen.values())


def help_rows() -> list[tuple[str, str]]:
    return [(c.usage, c.help) for c in COMMANDS]


class SlashCompleter(Completer):
    """Completes command names after "/", their fixed choices, and file names for /save and /load."""

    def __init__(self) -> None:
        self.paths = PathCompleter(expanduser=True)

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterable[Completion]:
        text = document.text_before_cursor
        if not text.startswith("/") or "\n" in text:
            return
        if " " not in text:
            word = text[1:].lower()
            for c in COMMANDS:
                if c.name.startswith(word):
                    yield Completion("/" + c.name, start_position=-len(text), display_meta=c.help[:60])
            return
        name, _, arg = text[1:].partition(" ")
        command = find(name.lower().rstrip("!"))  # /save! completes as /save
        if command is None:
            return
        if command.path:
            sub = Document(arg.lstrip(), len(arg.lstrip()))
            yield from self.paths.get_completions(sub, complete_event)
        elif command.choices and " " not in arg.strip():
            for choice in command.choices:
                if choice.startswith(arg.strip()):
                    yield Completion(choice, start_position=-len(arg.strip()))
