"""uvicorn's h11 protocol with the two guards it lacks: a deadline for request headers, and a cap on
open connections that stalled ones cannot fill.

uvicorn 0.55 times out only idle keep-alive connections (``timeout_keep_alive``, armed after a
response, disarmed by the first byte of the next request), and has no header timeout; a connection
that never completes its request headers stays open forever. ``limit_concurrency`` does not help:
it counts such connections but acts only on complete requests (with a 503), so enough stalled
connections exhaust the process's file handles and nothing is answered any more. Hence this
subclass:

* **header deadline**: from the moment a connection opens, or finishes a response, it has
  ``header_timeout`` seconds to complete the next request's headers (the line and all headers, a
  deadline, not an idle timer: one byte every few seconds does not keep it open); then it is closed.
* **connection cap**: past ``max_connections`` open connections, a new one closes the connection
  that has waited longest on its client: for headers (stalled or idle between requests), or for the
  rest of a request body it declared, so stalled connections never lock real clients out. One opened
  a moment ago that has sent nothing yet is not taken for stalled (in a burst of clients its request
  is still unread). Only when no connection waits on its client is the new one refused (429,
  ``Retry-After``), so a burst past the cap gets answers, not resets.

Request bodies have their own deadline, in the app (``--body-timeout``, 408).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("oss_mlx.server")

_BUSY = json.dumps(
    {
        "error": {
            "message": "The server has too many open connections, all busy (see --max-connections). "
            "Retry later.",
            "type": "rate_limit_error",
            "param": None,
            "code": "too_many_connections",
        }
    }
).encode()
# 429, as a full queue: a limit of load the client retries after Retry-After, not a server fault.
REFUSED = (
    b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
    b"connection: close\r\ncontent-length: " + str(len(_BUSY)).encode() + b"\r\n\r\n" + _BUSY
)


FRESH = 1.0  # seconds a silent new connection is not taken for a stalled one (just_opened)
ROOM_DELAY = 0.1  # seconds after a connection past the cap opens until the cap is enforced


class GuardedH11Protocol(H11Protocol):
    header_timeout: float = 10.0
    max_connections: int = 64

    @classmethod
    def configured(cls, header_timeout: float, max_connections: int) -> type[GuardedH11Protocol]:
        """This protocol with these limits (uvicorn takes a class and makes one per connection)."""
        return type(
            cls.__name__, (cls,), {"header_timeout": header_timeout, "max_connections": max_connections}
        )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.waiting_since: float | None = None  # when it began waiting for request headers
        self.opened = 0.0
        self.heard = False  # whether any byte has come from the client
        self.request_since = 0.0  # when its current request's headers were read
        self._deadline: asyncio.TimerHandle | None = None

    # ---- the header deadline --------------------------------------------------------------------

    def _await_headers(self) -> None:
        self.waiting_since = time.monotonic()
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout, self._headers_too_late)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_too_late(self) -> None:
        self._deadline = None
        if self.waiting_since is not None and not self.transport.is_closing():
            log.debug("closed a connection that sent no complete request headers in %gs", self.header_timeout)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.heard = True
        super().data_received(data)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's headers were read: a new request-response cycle
            self.waiting_since = None
            self.request_since = time.monotonic()
            self._disarm()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._await_headers()  # before super(), which may read a pipelined request at once
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.waiting_since = None
        super().connection_lost(exc)

    # ---- the connection cap ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.opened = time.monotonic()
        self._await_headers()
        if len(self.connections) > self.max_connections:
            self._make_room(at_open=True)

    def _over_cap(self) -> None:
        if self.transport.is_closing() or len(self.connections) <= self.max_connections:
            return
        if self.waiting_since is None:  # its request came meanwhile and runs: it keeps its place
            return
        self._make_room(at_open=False)

    def stalled_since(self) -> float | None:
        """Since when this connection waits on its client: for request headers, or for the rest of
        its request's body; None while the server works on a complete request."""
        if self.transport.is_closing() or self.just_opened():
            return None
        if self.waiting_since is not None:
            return self.waiting_since
        if self.conn.their_state is h11.SEND_BODY:
            return self.request_since
        return None

    def just_opened(self) -> bool:
        """Opened under FRESH seconds ago with nothing read yet: in a burst of clients, its request is
        likely in the socket's buffer, not yet read by the event loop. Such a one is never closed
        to make room (that would reset a working client); the newcomer is refused instead."""
        return not self.heard and time.monotonic() - self.opened < FRESH

    def _make_room(self, at_open: bool) -> None:
        waiting = [
            (since, c)
            for c in self.connections
            if c is not self and (since := getattr(c, "stalled_since", lambda: None)()) is not None
        ]
        if waiting:
            _, oldest = min(waiting, key=lambda pair: pair[0])
            log.debug("connection cap reached: closed the connection waiting longest on its client")
            oldest.transport.close()
        elif at_open:
            # Decided a moment later, once the loop has read what the others sent: in a burst they
            # have sent nothing yet (just_opened), and their requests come in meanwhile.
            self.loop.call_later(ROOM_DELAY, self._over_cap)
        else:
            log.warning(
                "connection cap (%d) reached with every connection busy: refused one", self.max_connections
            )
            self.transport.write(REFUSED)
            self.transport.close()
