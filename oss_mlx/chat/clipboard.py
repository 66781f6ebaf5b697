"""`/copy`: text from the chat to the system clipboard, or to the terminal's, and always somewhere.

Order: the platform's clipboard program (pbcopy on macOS; wl-copy under Wayland; xclip or xsel
under X11; clip.exe on Windows and WSL); when there is none (a server over ssh, a container), the
terminal's clipboard through OSC 52 (iTerm2, kitty, WezTerm, Windows Terminal, foot, tmux with
set-clipboard on...), which cannot say whether it worked, so the text is also written to a file
whose path is printed. What is copied is the text exactly as the model wrote it, never what the
terminal shows (no wrapping, no padding).
"""

from __future__ import annotations

import base64
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Copied:
    how: str  # "xclip", "OSC 52", "file"...
    path: Path | None = None  # the file the text was also written to


def clipboard_programs() -> list[list[str]]:
    """The clipboard programs that apply here, best first (each reads the text on its stdin)."""
    found: list[list[str]] = []

    def add(*argv: str) -> None:
        if shutil.which(argv[0]):
            found.append(list(argv))

    if sys.platform == "darwin":
        add("pbcopy")
    if os.environ.get("WAYLAND_DISPLAY"):
        add("wl-copy")
    if os.environ.get("DISPLAY"):
        add("xclip", "-selection", "clipboard")
        add("xsel", "--clipboard", "--input")
    if sys.platform == "win32" or "microsoft" in platform.release().lower():  # Windows, WSL
        add("clip.exe")
    return found


def osc52(text: str) -> str:
    """The escape sequence that asks the terminal to put `text` on its clipboard."""
    return "\x1b]52;c;" + base64.b64encode(text.encode("utf-8")).decode("ascii") + "\x07"


def copy_text(
    text: str, fallback_file: Path, terminal: Callable[[str], None] | None = None, timeout: float = 5.0
) -> Copied:
    """Copy `text`: a clipboard program if one works, else OSC 52 through `terminal` (a function that
    writes to the terminal; None when the output is not one) and the file `fallback_file`."""
    for argv in clipboard_programs():
        try:
            done = subprocess.run(argv, input=text.encode("utf-8"), timeout=timeout, capture_output=True)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return Copied(argv[0])
    from ..atomic import write_text

    write_text(fallback_file, text, private=True, make_parents=True)
    if terminal is not None:
        terminal(osc52(text))
        return Copied("OSC 52", fallback_file)
    return Copied("file", fallback_file)
