"""Driving the real `oss-mlx chat` in tmux: start it, type, paste, press keys, read the screen.

Each TmuxChat runs its own tmux server (-L with a unique socket name), so tests never touch the
user's sessions, and keeps the pane after the program exits (remain-on-exit) to read its last
screen and exit status.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

from oss_mlx.testing.scripted import in_order

REPO = Path(__file__).resolve().parents[1]
TMUX = shutil.which("tmux")


def harmony_reply(final: str, analysis: str | None = None) -> str:
    """A scripted completion: optional analysis, then the final answer."""
    head = f"<|channel|>analysis<|message|>{analysis}<|end|><|start|>assistant" if analysis else ""
    return f"{head}<|channel|>final<|message|>{final}<|return|>"


def function_call(name: str, arguments: dict) -> str:
    header = f"<|channel|>commentary to=functions.{name} <|constrain|>json"
    return f"{header}<|message|>{json.dumps(arguments)}<|call|>"


def python_call(code: str) -> str:
    return f"<|channel|>analysis to=python code<|message|>{code}<|call|>"


class TmuxChat:
    def __init__(self, home: Path, vocab_dir: Path, width: int = 120, height: int = 40) -> None:
        self.socket = f"oss-mlx-test-{uuid.uuid4().hex[:10]}"
        self.home = home
        self.vocab_dir = vocab_dir
        self.width, self.height = width, height
        self.started = False

    def tmux(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(
            [TMUX, "-L", self.socket, *args], capture_output=True, text=True, timeout=20, check=False
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def start(
        self,
        args: list[str],
        replies: list[str | None] | None = None,
        env_extra: dict | None = None,
        live_size: bool = False,
    ) -> TmuxChat:
        """live_size: without the COLUMNS and LINES that a detached tmux puts in the pane's environment
        (80x24, whatever the pane's size), so that the chat follows the pane's real size and resizes,
        as in a terminal."""
        env = {
            **(env_extra or {}),
            "TIKTOKEN_CACHE_DIR": str(self.vocab_dir),
            "TIKTOKEN_RS_CACHE_DIR": str(self.vocab_dir),
            "OSS_MLX_HOME": str(self.home),
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(REPO),
            "TERM": "xterm-256color",
        }
        if replies is not None:
            script = self.home / f"replies-{uuid.uuid4().hex[:8]}.json"
            script.parent.mkdir(parents=True, exist_ok=True)
            script.write_text(json.dumps(in_order(replies)))
            env["OSS_MLX_SCRIPTED_REPLIES"] = str(script)
        unset = "-u COLUMNS -u LINES " if live_size else ""
        chat = f"env {unset}" + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        chat += " " + shlex.join([sys.executable, "-m", "oss_mlx.cli", "chat", *args])
        # tmux does not always collect the exit status of a pane's process, so a shell writes it down
        # (its INT trap keeps it alive through the Ctrl-C presses meant for the chat).
        self.status_file = self.home / f"status-{uuid.uuid4().hex[:8]}"
        record = f"echo $? > {shlex.quote(str(self.status_file))}"
        command = shlex.join(["bash", "-c", f"trap : INT; {chat}; {record}"])
        config = self.home / "tmux.conf"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(
            "set -g remain-on-exit on\nset -g history-limit 20000\nset -g status off\n"
            "set -g set-clipboard on\n"  # OSC 52 from the chat (/copy) lands in a tmux buffer
        )
        self.tmux(
            "-f", str(config), "new-session", "-d", "-x", str(self.width), "-y", str(self.height),
            "-c", str(REPO), command,
        )  # fmt: skip
        self.started = True
        return self

    # -- input --------------------------------------------------------------------------------------

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", *keys)

    def type(self, text: str, enter: bool = True) -> None:
        self.tmux("send-keys", "-l", text)
        if enter:
            self.tmux("send-keys", "Enter")

    def paste(self, text: str) -> None:
        """A bracketed paste, as a terminal does when you paste."""
        path = self.home / "paste.txt"
        path.write_text(text)
        self.tmux("load-buffer", "-b", "p", str(path))
        self.tmux("paste-buffer", "-p", "-d", "-b", "p")

    # -- output -------------------------------------------------------------------------------------

    def screen(self) -> str:
        """All the pane has shown (scrollback included), wrapped lines joined."""
        return self.tmux("capture-pane", "-p", "-J", "-S", "-", check=False)

    def lines(self) -> list[str]:
        return [line.rstrip() for line in self.screen().splitlines()]

    def wait_for(self, pattern: str, timeout: float = 30.0, count: int = 1) -> str:
        """Wait until `pattern` (a regex) occurs `count` times on the screen; return the screen."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if len(regex.findall(text)) >= count:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {pattern!r} x{count}; screen:\n{text}")
            if not self.alive():
                text = self.screen()
                if len(regex.findall(text)) >= count:
                    return text
                raise AssertionError(f"the chat exited while waiting for {pattern!r}; screen:\n{text}")
            time.sleep(0.1)

    def at_prompt(self) -> bool:
        """The last line above the bottom toolbar is an empty prompt."""
        lines = [line for line in self.lines() if line.strip()]
        if lines and "/help" in lines[-1] and "effort" in lines[-1]:
            lines = lines[:-1]  # the toolbar
        return bool(lines) and lines[-1] == ">>>"

    def wait_prompt(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while not self.at_prompt():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for the prompt; screen:\n{self.screen()}")
            if not self.alive():
                raise AssertionError(f"the chat exited; screen:\n{self.screen()}")
            time.sleep(0.1)
        return self.screen()

    def command(self, line: str, expect: str, timeout: float = 30.0) -> str:
        """Type a line, wait for `expect` (regex) after it, and for the prompt again."""
        before = len(re.findall(expect, self.screen(), re.MULTILINE))
        self.type(line)
        self.wait_for(expect, timeout, count=before + 1)
        return self.wait_prompt(timeout)

    def alive(self) -> bool:
        out = self.tmux("display-message", "-p", "#{pane_dead}", check=False).strip()
        return out == "0"

    def wait_exit(self, timeout: float = 15.0) -> int:
        """Wait for the chat to end; its exit status."""
        deadline = time.monotonic() + timeout
        while not (self.status_file.exists() and self.status_file.read_text().strip()):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the chat did not exit within {timeout:.0f} s; its processes:\n{self.processes()}"
                    f"\nscreen:\n{self.screen()}"
                )
            time.sleep(0.05)
        return int(self.status_file.read_text())

    def processes(self) -> str:
        """The pane's processes (its session: tmux makes each pane a session leader), with their states:
        what a chat that does not exit is waiting on."""
        pane = self.tmux("display-message", "-p", "#{pane_pid}", check=False).strip()
        if not pane.isdigit():
            return "(the pane is gone)"
        ps = subprocess.run(
            ["ps", "-s", pane, "-o", "pid,ppid,stat,etime,wchan:24,args"], capture_output=True, text=True
        )
        return ps.stdout or ps.stderr

    def close(self) -> None:
        if self.started:
            self.tmux("kill-server", check=False)
            self.started = False


def env_has_tmux() -> bool:
    return TMUX is not None and os.access(TMUX, os.X_OK)
