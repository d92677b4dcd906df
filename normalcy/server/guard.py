"""What every request must pass before the service reads its body.

- Host: the `Host` header must name the address the service was bound to (or a name given
  with `--allowed-host`). A page on another site that resolves its own name to 127.0.0.1
  (DNS rebinding) sends its own name as Host, so it is refused.
- Origin: a browser's state-changing request from another origin (a cross-site form post)
  is refused unless that origin was allowed with `--allowed-origin`.
- A body larger than `max_body` bytes is refused before any of it is read when its
  Content-Length says so, else as soon as what arrived passes the limit.
- A body that stops arriving, or trickles: all of it must arrive within `read_timeout`
  seconds plus one second per `MIN_BODY_RATE` bytes.

Refusals are answered as JSON with a stable code, like every other error of the service.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from fastapi import HTTPException
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MIN_BODY_RATE = 16 * 1024  # bytes per second a request body must keep up, after the timeout
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_ADDRESSES = frozenset({"0.0.0.0", "::", ""})


class Refusal(HTTPException):
    """A request refused by the guard, with the service's error `code`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status_code=status, detail=message)
        self.code = code


def allowed_hosts(bind_host: str, extra: Iterable[str] = ()) -> frozenset[str] | None:
    """Host names requests may be addressed to; None: any. A loopback bind answers its
    loopback names, another address that address, a wildcard bind (0.0.0.0, ::) any host
    unless names are given; `extra` adds names ("*": any)."""
    names = {name.strip().lower() for name in extra if name.strip()}
    if "*" in names:
        return None
    host = bind_host.strip("[]").lower()
    if host in WILDCARD_ADDRESSES:
        return frozenset(names) if names else None
    if host in LOOPBACK_NAMES or _is_loopback(host):
        names |= LOOPBACK_NAMES
    return frozenset(names | {host})


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The host of a `Host` header or an origin's authority, without port or brackets."""
    parsed = urlsplit(f"//{header}")
    try:
        return (parsed.hostname or "").lower()
    except ValueError:
        return ""


class RequestGuard:
    """ASGI middleware: checks Host and Origin before the app runs; times body reads."""

    def __init__(
        self,
        app: ASGIApp,
        hosts: frozenset[str] | None,
        origins: Iterable[str] = (),
        max_body: int | None = None,
        read_timeout: float = 30.0,
        on_refusal: Callable[[str], None] | None = None,
    ) -> None:
        self.app = app
        self.hosts = hosts
        self.origins = frozenset(origin.rstrip("/").lower() for origin in origins)
        self.max_body = max_body
        self.read_timeout = read_timeout
        self.on_refusal = on_refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            self._check_headers(scope)
        except Refusal as refusal:
            await self._refuse(refusal, scope, receive, send)
            return
        # A body refused while streaming reaches the app as a disconnect; whatever the app
        # then answers is replaced by the refusal.
        refused: list[Refusal] = []
        answered = False

        async def guarded_send(message: Message) -> None:
            nonlocal answered
            if not refused:
                await send(message)
            elif not answered and message["type"] == "http.response.start":
                answered = True
                await self._refuse(refused[0], scope, receive, send)

        try:
            await self.app(scope, self._guarded(receive, refused), guarded_send)
        except Exception:
            if not refused:
                raise
        if refused and not answered:
            await self._refuse(refused[0], scope, receive, send)

    async def _refuse(self, refusal: Refusal, scope: Scope, receive: Receive, send: Send) -> None:
        if self.on_refusal is not None:
            self.on_refusal(refusal.code)
        body = {"error": {"code": refusal.code, "message": refusal.detail}}
        # Connection: close, so an unread body is not awaited as the next request.
        response = JSONResponse(
            body, status_code=refusal.status_code, headers={"Connection": "close"}
        )
        await response(scope, receive, send)

    def _check_headers(self, scope: Scope) -> None:
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if self.hosts is not None and host_name(host) not in self.hosts:
            raise Refusal(
                421, "host_not_allowed", "this service does not answer for that Host header"
            )
        length = headers.get("content-length")
        if length is not None and not length.isdigit():
            raise Refusal(400, "invalid_request", "the Content-Length header is not a number")
        if length is not None and self.max_body is not None and int(length) > self.max_body:
            raise Refusal(
                413, "request_too_large", f"request body larger than {self.max_body} bytes"
            )
        origin = headers.get("origin")
        if scope["method"] in SAFE_METHODS or origin is None:
            return
        origin = origin.rstrip("/").lower()
        same_origin = urlsplit(origin).netloc == host.lower()
        if not (same_origin or origin in self.origins or "*" in self.origins):
            raise Refusal(
                403,
                "cross_origin",
                "requests from other web sites are refused (see --allowed-origin)",
            )

    def _guarded(self, receive: Receive, refused: list[Refusal]) -> Receive:
        """`receive`, ending as a disconnect (the refusal noted in `refused`) a body past
        `max_body`, or one that arrives slower than `read_timeout` seconds plus a second per
        `MIN_BODY_RATE` bytes so far (a client trickling a byte now and then cannot hold its
        connection); once the body is complete, it waits untimed (for a disconnect)."""
        complete = False
        received = 0
        start = time.monotonic()

        async def guarded_receive() -> Message:
            nonlocal complete, received
            if complete:
                return await receive()
            allowed = self.read_timeout + received / MIN_BODY_RATE - (time.monotonic() - start)
            try:
                message = await asyncio.wait_for(receive(), max(0.0, allowed))
            except (TimeoutError, asyncio.TimeoutError):  # distinct before Python 3.11
                message = None
                seconds = f"{self.read_timeout:g}"
                refused.append(
                    Refusal(
                        408,
                        "read_timeout",
                        f"the request body stalled (no data for {seconds} s, or slower "
                        f"than {MIN_BODY_RATE // 1024} KiB/s)",
                    )
                )
            if message is not None and message["type"] == "http.request":
                received += len(message.get("body", b""))
                if self.max_body is not None and received > self.max_body:
                    limit = f"request body larger than {self.max_body} bytes"
                    refused.append(Refusal(413, "request_too_large", limit))
            if refused:
                complete = True
                return {"type": "http.disconnect"}
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        return guarded_receive
