"""Where the chat keeps its files, and conversations saved as JSON (autosave, /save, /load).

Data folder: $OSS_MLX_HOME if set, else $XDG_DATA_HOME/oss-mlx, else ~/.local/share/oss-mlx.
    input_history        what you typed (prompt_toolkit's history file: Up / Ctrl-R)
    chats/<time>.json    each conversation, autosaved after every turn

A saved conversation (format "oss-mlx-chat", version 1)::

    {"format": "oss-mlx-chat", "version": 1, "saved_at": "...", "model": "...",
     "settings": {"reasoning_effort": "high", "instructions": "...", "tools": ["get_weather"], ...},
     "system_message": "<the system message as rendered>", "developer_message": "..." | null,
     "messages": [{"role": "user", "content": "...", "channel": null, "recipient": null,
                   "content_type": null, "name": null}, ...]}

Every write goes to a temporary file in the same folder, is flushed to disk, then renamed over the
target: a crash leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from ..atomic import write_text
from ..harmony import ROLES, Message
from ..model_store import data_dir

FORMAT = "oss-mlx-chat"
VERSION = 1
_MESSAGE_FIELDS = [f.name for f in fields(Message)]


class ChatFileError(ValueError):
    """A conversation file that cannot be read (the message says why)."""


def new_autosave_path(folder: Path | None = None) -> Path:
    folder = (folder or data_dir()) / "chats"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = folder / f"{stamp}.json"
    n = 1
    while path.exists():
        n += 1
        path = folder / f"{stamp}-{n}.json"
    return path


def message_to_dict(message: Message) -> dict[str, Any]:
    return asdict(message)


def message_from_dict(data: Any, where: str) -> Message:
    if not isinstance(data, dict):
        raise ChatFileError(f"{where}: a message must be an object")
    unknown = set(data) - set(_MESSAGE_FIELDS)
    if unknown:
        raise ChatFileError(f"{where}: unknown message fields {sorted(unknown)}")
    role, content = data.get("role"), data.get("content")
    if role not in ROLES:
        raise ChatFileError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise ChatFileError(f"{where}: content must be a string")
    for key in ("channel", "recipient", "content_type", "name"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise ChatFileError(f"{where}: {key} must be a string or null")
    if role == "tool" and not data.get("name"):
        raise ChatFileError(f"{where}: a tool message needs the tool's name")
    return Message(**data)


def conversation_json(
    messages: list[Message],
    settings: dict[str, Any],
    *,
    model: str = "",
    system_message: str | None = None,
    developer_message: str | None = None,
) -> str:
    data = {
        "format": FORMAT,
        "version": VERSION,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": model,
        "settings": settings,
        "system_message": system_message,
        "developer_message": developer_message,
        # A system message of our own (the python tool's) is re-made from the settings on load.
        "messages": [message_to_dict(m) for m in messages if m.role != "system"],
    }
    return json.dumps(data, ensure_ascii=False, indent=1) + "\n"


def save_conversation(
    path: Path, messages: list[Message], settings: dict[str, Any], *, make_parents: bool = True, **extra: Any
) -> None:
    text = conversation_json(messages, settings, **extra)
    write_text(Path(path).expanduser(), text, private=True, make_parents=make_parents)


# A saved conversation is text: far below this. A bigger file (or a device such as /dev/zero) is refused
# before anything is read, since reading it would take all the memory and could not be stopped.
MAX_FILE_BYTES = 64 * 2**20


def read_small_file(path: Path, what: str = "file", limit: int = MAX_FILE_BYTES) -> str:
    """The text of a regular file of at most `limit` bytes; ChatFileError (one line) otherwise."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ChatFileError(f"{path}: no such file") from None
    except OSError as e:
        raise ChatFileError(f"{path}: cannot read it ({e.strerror or e})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ChatFileError(f"{path}: is a folder, not a {what}")
    if not stat.S_ISREG(info.st_mode):
        raise ChatFileError(f"{path}: not a regular file (a device, a pipe...): give a {what} file")
    if info.st_size > limit:
        raise ChatFileError(
            f"{path}: {info.st_size / 2**20:,.0f} MB, too big for a {what} (at most {limit // 2**20} MB)"
        )
    try:
        # O_NONBLOCK: should the path become a pipe after the check, open() must not hang on it.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            data = f.read(limit + 1)  # never more, even if the file grows meanwhile
    except OSError as e:
        raise ChatFileError(f"{path}: cannot read it ({e.strerror or e})") from None
    if len(data) > limit:
        raise ChatFileError(f"{path}: too big for a {what} (at most {limit // 2**20} MB)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ChatFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def load_conversation(path: str | os.PathLike) -> tuple[list[Message], dict[str, Any]]:
    """(messages, settings) of a saved conversation; ChatFileError says what is wrong."""
    p = Path(path).expanduser()
    text = read_small_file(p, "conversation")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ChatFileError(f"{p}: not valid JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
    if isinstance(data, list):  # a bare list of messages
        data = {"messages": data}
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise ChatFileError(f"{p}: not a saved conversation (no list of messages)")
    if data.get("format", FORMAT) != FORMAT:
        raise ChatFileError(f"{p}: format {data.get('format')!r} is not {FORMAT!r}")
    if isinstance(data.get("version"), int) and data["version"] > VERSION:
        raise ChatFileError(f"{p}: written by a newer oss-mlx (version {data['version']})")
    messages = [
        message_from_dict(m, f"{p}: message {i + 1}")
        for i, m in enumerate(data["messages"])
        if not (isinstance(m, dict) and m.get("role") == "system")
    ]
    settings = data.get("settings") or {}
    if not isinstance(settings, dict):
        raise ChatFileError(f"{p}: settings must be an object")
    return messages, settings
