"""A detector of output that loops, and the terminal checks of a reply (no echo, interactive or not)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Hashable, Iterator


class LoopDetector:
    """Says when the output has been repeating itself.

    A loop: the last `window` items (and at least `repeats` periods) repeat with some period p <=
    max_period, i.e. a sequence of p tokens said `repeats` times in a row, covering `window` tokens
    in all (with the defaults: a 30-token sentence 3 times, or "ha" 45 times). Items are whatever
    stands for a token; the chat feeds (channel, text) of each streamed delta.

    Incremental, O(max_period) per item: for each period p it keeps how many consecutive recent
    items equal the one p items before them.
    """

    def __init__(self, window: int = 90, repeats: int = 3, max_period: int = 200) -> None:
        self.window, self.repeats, self.max_period = window, repeats, max_period
        self.items: list[Hashable] = []
        self.runs = [0] * (max_period + 1)
        self.period = 0  # the period found, once a loop is detected

    def feed(self, item: Hashable) -> bool:
        items = self.items
        items.append(item)
        n = len(items)
        found = False
        for p in range(1, min(self.max_period, n - 1) + 1):
            if items[-1] == items[-1 - p]:
                self.runs[p] += 1
                # A p-periodic suffix of length L has L - p matching positions.
                needed = max(self.window, self.repeats * p) - p
                if self.runs[p] >= needed and not found:
                    found, self.period = True, p
            else:
                self.runs[p] = 0
        if n > 4 * max(self.window, self.repeats * self.max_period):
            del items[: n // 2]  # only the tail matters
        return found

    def reset(self) -> None:
        self.items.clear()
        self.runs = [0] * (self.max_period + 1)
        self.period = 0


@contextlib.contextmanager
def no_echo() -> Iterator[None]:
    """Keys typed while a reply streams are not echoed into it; they wait for the next prompt."""
    fd = None
    try:
        import termios

        if sys.stdin.isatty():
            fd = sys.stdin.fileno()
            old = termios.tcgetattr(fd)
            new = list(old)
            new[3] &= ~termios.ECHO
            # Keep Enter as CR: translated to LF now, it would reach the next prompt as Ctrl-J (new line).
            new[0] &= ~termios.ICRNL
            termios.tcsetattr(fd, termios.TCSANOW, new)
    except (ImportError, OSError, ValueError):
        fd = None
    try:
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(Exception):
                termios.tcsetattr(fd, termios.TCSANOW, old)


def is_interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty() and os.environ.get("TERM") != "dumb"
