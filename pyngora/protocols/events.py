"""Protocol events: what the sans-IO parsers (h1, h2) hand to a session.

HTTP/1 and HTTP/2 map onto the same events, so the proxy engine and every ProxyHttp
phase work unchanged whichever protocol a connection speaks. Events are plain data
with ``__slots__``; they carry no behaviour and import nothing of asyncio.
"""
from __future__ import annotations

from typing import Optional

from pyngora.headers import Headers


class RequestHead:
    """A parsed request head. ``target`` is the raw request-target (origin-form for proxying).

    ``body`` says how the body is framed: "none", "length" (``content_length`` bytes),
    "chunked", or "stream" (HTTP/2 DATA frames / an upgraded tunnel).
    """

    __slots__ = ("method", "target", "version", "headers", "keep_alive", "body",
                 "content_length", "expect_continue", "upgrade", "stream_id", "raw")

    def __init__(self, method: bytes, target: bytes, version: str, headers: Headers,
                 keep_alive: bool, body: str, content_length: Optional[int],
                 expect_continue: bool = False, upgrade: bool = False,
                 stream_id: int = 0) -> None:
        self.method = method
        self.target = target
        self.version = version  # "1.0", "1.1" or "2"
        self.headers = headers
        self.keep_alive = keep_alive
        self.body = body
        self.content_length = content_length
        self.expect_continue = expect_continue
        self.upgrade = upgrade
        self.stream_id = stream_id
        # The head's exact bytes, when an HTTP/1.1 request without a body came alone in one
        # read (the parser sets it): a proxy may send them on as they are.
        self.raw: Optional[bytes] = None


class ResponseHead:
    """A parsed response head from an upstream (framing already decided by request method)."""

    __slots__ = ("status", "reason", "version", "headers", "keep_alive", "body",
                 "content_length", "stream_id")

    def __init__(self, status: int, reason: bytes, version: str, headers: Headers,
                 keep_alive: bool, body: str, content_length: Optional[int],
                 stream_id: int = 0) -> None:
        self.status = status
        self.reason = reason
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.body = body  # "none" | "length" | "chunked" | "close" (read until EOF) | "stream"
        self.content_length = content_length
        self.stream_id = stream_id


class Data:
    """A piece of message body (already de-chunked)."""

    __slots__ = ("data", "stream_id")

    def __init__(self, data: bytes, stream_id: int = 0) -> None:
        self.data = data
        self.stream_id = stream_id


class MessageEnd:
    """The end of a message body; ``trailers`` when the peer sent any."""

    __slots__ = ("trailers", "stream_id")

    def __init__(self, trailers: Optional[Headers] = None, stream_id: int = 0) -> None:
        self.trailers = trailers
        self.stream_id = stream_id


class InformationalResponse:
    """A 1xx (other than 101) from an upstream: forwarded, then the real response follows."""

    __slots__ = ("status", "headers", "stream_id")

    def __init__(self, status: int, headers: Headers, stream_id: int = 0) -> None:
        self.status = status
        self.headers = headers
        self.stream_id = stream_id


class StreamReset:
    """HTTP/2 only: the peer reset one stream."""

    __slots__ = ("stream_id", "error_code")

    def __init__(self, stream_id: int, error_code: int) -> None:
        self.stream_id = stream_id
        self.error_code = error_code


class ConnectionClosed:
    """HTTP/2 GOAWAY received, or the peer closed cleanly between messages."""

    __slots__ = ("last_stream_id",)

    def __init__(self, last_stream_id: int = 0) -> None:
        self.last_stream_id = last_stream_id


Event = RequestHead | ResponseHead | Data | MessageEnd | InformationalResponse | StreamReset | ConnectionClosed
