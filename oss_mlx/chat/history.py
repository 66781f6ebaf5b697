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

import contextlib
import json
import os
import tempfile
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

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


def atomic_write(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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


def save_conversation(path: Path, messages: list[Message], settings: dict[str, Any], **extra: Any) -> None:
    atomic_write(Path(path).expanduser(), conversation_json(messages, settings, **extra))


def load_conversation(path: str | os.PathLike) -> tuple[list[Message], dict[str, Any]]:
    """(messages, settings) of a saved conversation; ChatFileError says what is wrong."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ChatFileError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise ChatFileError(f"{p}: is a folder") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ChatFileError(f"{p}: cannot read it ({e})") from None
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
