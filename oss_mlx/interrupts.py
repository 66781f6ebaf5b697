"""Ctrl-C held off where work must not be cut half-way (the chat's replies and saves, a training
step's update): InterruptGuard."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


class InterruptGuard:
    """SIGINT (Ctrl-C) in the main thread, while work that must not be cut half-way runs.

    While `streaming` (a chat's reply arriving) the first Ctrl-C only sets `requested`: the chat
    stops at the next streamed token and closes the reply, so history and cache stay consistent.
    Otherwise (a long prefill, a training step's computation), or at a second Ctrl-C,
    KeyboardInterrupt is raised at once. `hold()` defers even that, for code that must not be cut
    (closing a reply, writing a file, applying a training step): `requested` then says it came.
    """

    def __init__(self) -> None:
        self.requested = False
        self.streaming = False  # events are arriving: a flag is enough
        self._held = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        first = not self.requested
        self.requested = True
        if self._held:
            return
        if not first or not self.streaming:
            raise KeyboardInterrupt

    def __enter__(self) -> InterruptGuard:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        held, self._held = self._held, True
        try:
            yield
        finally:
            self._held = held
