"""What keeps web pages from driving the server: Host, Origin and Content-Type checks, CORS.

A page in the user's browser can send requests to 127.0.0.1 whatever the server says; the server
decides whether they do anything. The rules (docs/SERVER.md "Security" states them as guarantees):

* **Host** (DNS rebinding): bound to a loopback address, only loopback names are accepted
  (``localhost``, ``127.0.0.1``, ``[::1]``, any port) plus ``--allowed-host`` names; a page on
  ``attacker.example`` rebound to 127.0.0.1 sends ``Host: attacker.example`` and gets 403.
* **Origin**: browsers send it with every cross-origin request that can change anything (all POST
  and DELETE requests, every CORS request). A request with an Origin that ``--cors-origin`` does not
  list gets 403 before anything runs; so does one that a browser marks ``Sec-Fetch-Site:
  cross-site`` / ``same-site`` (a page's image or script tag: no Origin on those GETs).
* **Content-Type**: a body must be ``application/json`` (415 otherwise), so that no "simple"
  cross-origin request (text/plain, form posts: no CORS preflight) can carry one.
* **CORS** for the allowed origins, with Starlette's CORSMiddleware (preflight answers, Chrome's
  Private Network Access included; headers on every response, errors too, so that an allowed page
  can read them).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from .schemas import APIError, brief, clip

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_PORT = re.compile(r":[0-9]{1,5}")
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def is_loopback(host: str) -> bool:
    """Whether a bind address or host name is this machine only."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name in a Host header, lower case, without port or brackets: ``[::1]:8000`` -> ``::1``."""
    header = header.strip().lower()
    if header.startswith("["):  # [v6] or [v6]:port, nothing else after the bracket
        name, sep, after = header[1:].partition("]")
        return name if sep and (not after or _PORT.fullmatch(after)) else header
    if header.count(":") == 1:
        name, port = header.split(":")
        return name.rstrip(".") if port.isdigit() and port.isascii() else header
    return header.rstrip(".")


def _allow_hint(origin: str) -> str:
    try:
        return f"Start the server with --cors-origin {clip(check_origin_value(origin))} to allow that page."
    except ValueError:  # null (a local file, a sandboxed frame) or another scheme: nothing to name
        return "Serve the page from http://localhost:PORT and allow that origin with --cors-origin."


def normal_origin(origin: str) -> str:
    """``HTTP://LocalHost:3000/`` -> ``http://localhost:3000`` (origins compare this way)."""
    return origin.strip().rstrip("/").lower()


def check_origin_value(value: str) -> str:
    """A --cors-origin value: ``*`` or ``scheme://host[:port]`` (no path). ValueError otherwise."""
    if value == "*":
        return value
    origin = normal_origin(value)
    scheme, sep, rest = origin.partition("://")
    if not sep or scheme not in ("http", "https") or not rest or "/" in rest:
        raise ValueError(f"expected '*' or an origin like http://localhost:3000 (no path), got {value!r}")
    return origin


@dataclass(frozen=True)
class AccessPolicy:
    """Which Host names and browser origins the server answers."""

    hosts: frozenset[str] | None  # None: any Host header
    origins: frozenset[str] = field(default_factory=frozenset)  # normalised; "*" allows every origin

    @classmethod
    def for_bind(
        cls, bind_host: str, allowed_hosts: Iterable[str], cors_origins: Iterable[str]
    ) -> AccessPolicy:
        extra = {host_name(h) for h in allowed_hosts}
        origins = frozenset(cors_origins)
        if "*" in extra:
            return cls(None, origins)
        if is_loopback(bind_host):
            return cls(LOOPBACK_NAMES | extra, origins)
        # Reachable from the network: any name, unless --allowed-host lists them.
        return cls(LOOPBACK_NAMES | extra | {host_name(bind_host)} if extra else None, origins)

    def host_allowed(self, header: str) -> bool:
        return self.hosts is None or host_name(header) in self.hosts

    def origin_allowed(self, origin: str) -> bool:
        return "*" in self.origins or normal_origin(origin) in self.origins


def _refuse(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse(APIError(status, message, code=code).body(), status_code=status)


class BrowserGuard:
    """Host and Origin checks, outermost: a refused request runs nothing, its body is never read."""

    def __init__(self, app: ASGIApp, policy: AccessPolicy):
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        hosts, origins, fetch_site = [], [], None
        for name, value in scope["headers"]:
            if name == b"host":
                hosts.append(value.decode("latin-1"))
            elif name == b"origin":
                origins.append(value.decode("latin-1"))
            elif name == b"sec-fetch-site":
                fetch_site = value.decode("latin-1").strip().lower()
        refused = self._refusal(hosts, origins, fetch_site)
        if refused is not None:
            await refused(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, hosts: list[str], origins: list[str], fetch_site: str | None) -> JSONResponse | None:
        for host in hosts:
            if not self.policy.host_allowed(host):
                return _refuse(
                    403,
                    f"Host {brief(host)} is not allowed: this server answers only "
                    f"{', '.join(sorted(self.policy.hosts or ()))} (start it with --allowed-host NAME to add "
                    "a name). This stops web pages from reaching it through DNS rebinding.",
                    "host_not_allowed",
                )
        for origin in origins:
            if not self.policy.origin_allowed(origin):
                return _refuse(
                    403,
                    f"Requests from web pages are refused (Origin {brief(origin)}). {_allow_hint(origin)}",
                    "origin_not_allowed",
                )
        if not origins and fetch_site in ("cross-site", "same-site") and "*" not in self.policy.origins:
            return _refuse(
                403,
                "Cross-site browser requests are refused (Sec-Fetch-Site: "
                f"{fetch_site}); start the server with --cors-origin ORIGIN to allow a page.",
                "origin_not_allowed",
            )
        return None


class JSONBodyGuard:
    """A request body must be declared JSON (415 otherwise); a path's trailing slash is dropped
    (``/v1/models/`` is ``/v1/models``), so that no redirect, which would echo the Host header, is
    ever sent."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if len(path) > 1 and path.endswith("/"):
            raw = scope.get("raw_path") or path.encode()
            scope = {**scope, "path": path.rstrip("/") or "/", "raw_path": raw.rstrip(b"/") or b"/"}
        if scope["method"] in BODY_METHODS:
            headers = dict(scope["headers"])
            length = headers.get(b"content-length", b"").strip()
            has_body = b"transfer-encoding" in headers or (length not in (b"", b"0"))
            media = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if has_body and media != b"application/json":
                given = f"'{clip(media.decode('latin-1'))}'" if media else "none"
                response = _refuse(
                    415,
                    f"Request bodies must be JSON sent with 'Content-Type: application/json' (got {given}).",
                    "unsupported_media_type",
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
