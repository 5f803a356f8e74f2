"""The ``static`` service: answers every request with one fixed response (SPEC section 5).

The quickstart's origin and the tests' origin, so it is built for speed: the response head is
serialised once per worker (only ``Date`` changes, once a second), requests are answered
synchronously from the connection's callback (no task per request), and request bodies are
read and dropped by the connection without reaching Python code here.
"""
from __future__ import annotations

import time
from email.utils import formatdate
from typing import Any, Optional

from pyngora.config.schema import StaticConf
from pyngora.services.base import WorkerContext
from pyngora.services.http_app import Exchange, HttpApp, status_line
from pyngora.services.http_service import HttpService

__all__ = ["StaticApp", "StaticService"]

# Fields the connection owns: whatever the configuration says, they are not sent as given.
_OWNED = frozenset(("content-length", "transfer-encoding", "connection", "keep-alive", "date"))


class StaticApp(HttpApp):
    """Per-worker handler: the same status, headers and body for every request."""

    __slots__ = ("status", "body", "_fixed", "_second", "_head")

    def __init__(self, status: int = 200, headers: tuple[tuple[str, str], ...] = (),
                 body: bytes | str = b"") -> None:
        self.status = status
        self.body = body.encode("utf-8") if isinstance(body, str) else body
        no_body = status in (204, 304) or status < 200
        if no_body:
            self.body = b""
        lines = [status_line(status)]
        for name, value in headers:
            if name.lower() in _OWNED:
                continue
            bname, bvalue = name.encode("latin-1"), value.encode("latin-1")
            if b"\r" in bvalue or b"\n" in bvalue or b"\r" in bname or b"\n" in bname:
                raise ValueError(f"invalid header {name!r}")
            lines.append(bname + b": " + bvalue + b"\r\n")
        if not no_body:
            lines.append(b"Content-Length: %d\r\n" % len(self.body))
        self._fixed = b"".join(lines)
        self._second = -1
        self._head = b""

    def head_bytes(self) -> bytes:
        """The head (with a ``Date`` of this second), without Connection and the blank line."""
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._head = self._fixed + b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        return self._head

    def handle(self, exchange: Exchange) -> None:
        exchange.respond_prebuilt(self.status, self.head_bytes(), self.body)
        return None


class StaticService(HttpService):
    """``type: static``: ``StaticService(name, conf)`` from YAML, or
    ``StaticService(name, status=200, headers=(("X-A", "b"),), body="hi")`` from Python."""

    kind = "static"

    def __init__(self, name: str = "static", conf: Any = None, status: Optional[int] = None,
                 headers: Optional[tuple[tuple[str, str], ...]] = None,
                 body: Optional[str | bytes] = None) -> None:
        spec = getattr(conf, "spec", None)
        if not isinstance(spec, StaticConf):
            spec = StaticConf()
        super().__init__(name, conf, spec.limits)
        self.status = status if status is not None else spec.status
        self.headers = tuple(headers) if headers is not None else spec.headers
        self.body = body if body is not None else spec.body

    def new_app(self, ctx: WorkerContext) -> StaticApp:
        return StaticApp(self.status, self.headers, self.body)
