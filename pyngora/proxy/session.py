"""``Session``: one downstream request as the ProxyHttp phases see it (Pingora's Session).

Built by the engine per request over the connection's :class:`Exchange`. It offers the
client's request head (``req_header``, editable), the addresses, the body reader, and the
response writers, with Pingora's names.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Mapping, Optional

from pyngora.headers import Headers, RequestHeader, ResponseHeader, _as_headers
from pyngora.proxy.wire import informational_fields
from pyngora.services.http_app import Exchange

__all__ = ["Session"]

_IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))


def _as_bytes(data: Any, what: str) -> bytes:
    """``data`` (a body piece given by user code) as bytes: bytes-like ones are copied;
    anything else (a str above all: its encoding is the caller's choice) is a TypeError
    raised before a byte goes out, so the request still gets a whole 500."""
    if data.__class__ is bytes:
        return data  # type: ignore[no-any-return]
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"{what}: the body must be bytes, not {type(data).__name__}")


class Session:
    """The downstream side of one proxied request.

    ``req_header``: the client's request head (a RequestHeader: method, uri, version, headers);
    ``client_addr`` / ``server_addr``: the socket addresses (tuples for TCP, a path or '' for
    Unix sockets); ``scheme``: "http" or "https"; ``ctx_data``: a free dict-less slot for
    whatever the engine's users want to keep. ``upstream_status`` / ``peer`` / ``retries`` are
    filled in by the engine as it goes (for logging).
    """

    __slots__ = ("exchange", "_req_header", "client_addr", "server_addr", "scheme",
                 "peer", "upstream_status", "retries", "body_bytes_sent_upstream",
                 "_retry_buf", "_retry_size", "_retry_truncated", "_body_finished",
                 "service", "max_retries", "tried", "_read_ahead", "_ahead_size")

    # Request body bytes kept so that a failed attempt can be retried with the same body.
    RETRY_BUFFER_LIMIT = 64 * 1024
    # Request body bytes a phase read before the request was proxied, kept to be sent
    # upstream first; a phase that read more and then proxies gets a 500.
    READ_AHEAD_LIMIT = 1024 * 1024

    def __init__(self, exchange: Exchange, service: str = "") -> None:
        head = exchange.head
        self.exchange = exchange
        self._req_header: Optional[RequestHeader] = None  # built on first use (see req_header)
        self.client_addr = exchange.client_addr
        self.server_addr = exchange.server_addr
        self.scheme = exchange.scheme
        self.service = service
        self.peer: Any = None
        self.upstream_status = 0
        self.retries = 0
        self.max_retries: Optional[int] = None  # per-request override of the server's
        # Backend addresses this request's attempts went to (a balancer skips them on a retry).
        self.tried: Optional[set[str]] = None
        self.body_bytes_sent_upstream = 0
        self._retry_buf: list[bytes] = []
        self._retry_size = 0
        self._retry_truncated = False
        self._body_finished = head.body == "none"
        # What phases read of the body and no attempt sent yet (None last: its end); the
        # size kept, or -1 once over READ_AHEAD_LIMIT (dropped).
        self._read_ahead: Optional[deque[Optional[bytes]]] = None
        self._ahead_size = 0

    # ------------------------------------------------------------------ the request
    @property
    def req_header(self) -> RequestHeader:
        """The client's request head (built on first use: a proxy whose phases never look at
        it, the declarative one without routes, does not pay for it)."""
        req = self._req_header
        if req is None:
            head = self.exchange.head
            req = self._req_header = RequestHeader._trusted(
                head.method.decode("latin-1"), head.target.decode("latin-1"), head.version,
                head.headers)
        return req

    @req_header.setter
    def req_header(self, value: RequestHeader) -> None:
        if not isinstance(value, RequestHeader):  # (its method and uri were checked when set)
            raise TypeError(f"req_header must be a RequestHeader, not {type(value).__name__}")
        self._req_header = value

    def host_and_path(self) -> tuple[bytes, str]:
        """The request's Host value (b"" when none) and request-target, as ``req_header``
        says, without building it when no phase did (routing looks at nothing else, and the
        fast path sends the client's own bytes only while nobody built, and so perhaps
        edited, the head)."""
        req = self._req_header
        if req is None:
            head = self.exchange.head
            return head.headers.get(b"host") or b"", head.target.decode("latin-1")
        return req.headers.get(b"host") or b"", req.uri

    @property
    def client_ip(self) -> str:
        """The client's IP address as text ('' on a Unix socket)."""
        addr = self.client_addr
        return addr[0] if isinstance(addr, tuple) and addr else ""

    @property
    def is_upgrade_req(self) -> bool:
        """True when the client asked for a protocol upgrade (WebSocket)."""
        return self.exchange.head.upgrade

    @property
    def is_idempotent(self) -> bool:
        return self.exchange.head.method in _IDEMPOTENT

    def get_header(self, name: str | bytes) -> Optional[bytes]:
        """The first value of a request header (any case), or None."""
        return self.req_header.headers.get(name)

    async def read_request_body(self) -> Optional[bytes]:
        """The next piece of the request body, None at its end. Raises Error (Downstream) for
        a malformed or too-large body (status 400/413) or a client that went away.

        A phase that reads the body and then lets the request be proxied does not lose it:
        what it read goes upstream first (through ``request_body_filter``), then the rest, as
        the request's framing says (the client's, or chunked under a request_body_filter).
        Up to ``READ_AHEAD_LIMIT`` (1 MiB) is kept for that; a phase that read more and then
        proxies gets a 500 (one that answers itself loses nothing)."""
        data = await self.exchange.read_body()
        if data is None:
            self._body_finished = True
        size = self._ahead_size
        if size >= 0:
            if data is not None:
                size += len(data)
            if size > self.READ_AHEAD_LIMIT:
                self._read_ahead = None
                size = -1
            else:
                self._unread(data, last=True)
            self._ahead_size = size
        return data

    @property
    def request_body_finished(self) -> bool:
        return self._body_finished

    def request_summary(self) -> str:
        """``METHOD URI, Host: HOST`` for error logs."""
        host = self.req_header.headers.get(b"host")
        return (f"{self.req_header.method} {self.req_header.uri}, Host: "
                f"{host.decode('latin-1') if host else ''}")

    # ------------------------------------------------------------------ the response
    @property
    def response_written(self) -> Optional[int]:
        """The status of the response head already sent to the client, or None."""
        ex = self.exchange
        return ex.status if ex.head_sent else None

    @property
    def response_finished(self) -> bool:
        return self.exchange.finished

    async def write_response_header(self, resp: ResponseHeader, end: bool = False) -> None:
        """Send a response head to the client (``end``: no body follows). Framing is chosen by
        the connection: Content-Length if present, else chunked (HTTP/1.1). An informational
        status (103 Early Hints, ...) goes out as such, and the final response follows later
        (as in Pingora); HTTP/1.0 clients get none (RFC 9110 15.2). ``resp`` is not changed:
        one kept and sent again (a module-level head) goes out the same each time."""
        headers = resp.headers
        if not isinstance(headers, Headers):  # (checked before any byte goes out)
            raise TypeError(f"response headers must be a Headers, not {type(headers).__name__}")
        # A copy: the connection adds its framing and Connection fields to what it sends, and
        # a head sent again would carry the last response's (Content-Length: 0, close...).
        headers = headers.copy()
        status = resp.status
        if 100 <= status < 200 and status != 101:
            # A 1xx has no content, so no framing field, nor hop-by-hop ones (RFC 9110 15.2,
            # 7.6.1): a client that read them would take the final response as a body.
            self.exchange.write_informational(status, informational_fields(headers))
            return
        self.exchange.write_head(status, headers, resp.reason, end)

    async def write_response_body(self, data: Optional[bytes], end: bool = False) -> None:
        """Send a piece of the response body (waits while the client is slow: back-pressure);
        ``end`` finishes the response. TypeError, before anything is sent, for a body that is
        not bytes (a str must be encoded first)."""
        ex = self.exchange
        if data:
            ex.write_body(_as_bytes(data, "write_response_body"))
            await ex.drain()
        if end:
            ex.write_end()

    async def write_response_trailers(self, trailers: Headers) -> None:
        """Finish a chunked response with trailers (a Headers, pairs or a dict)."""
        self.exchange.write_end(_as_headers(trailers))

    async def respond(self, status: int, body: bytes = b"",
                      headers: Optional[Headers | Mapping[str, str]
                                        | list[tuple[str, str]]] = None) -> None:
        """A whole response at once (Content-Length from ``body``). ``headers``: a Headers,
        (name, value) pairs or a dict, not changed (the connection's framing fields go on a
        copy). TypeError, before anything is sent, for a body that is not bytes."""
        body = _as_bytes(body, "respond") if body else b""
        h = headers.copy() if isinstance(headers, Headers) else _as_headers(headers)
        self.exchange.respond(status, h, body)
        await self.exchange.drain()

    async def respond_error(self, status: int) -> None:
        """An empty error response (``Cache-Control: private, no-store``) that closes the
        connection; if a response already started, the connection is closed instead. A
        status that is no final one (below 200, above 999) is answered 500."""
        if not isinstance(status, int) or not 200 <= status <= 999:
            status = 500
        self.exchange.respond_error(status)

    def set_keepalive(self, seconds: Optional[float]) -> None:
        """Pingora's ``set_keepalive``: None closes the client connection after this response
        (the idle timeout itself is the service's ``keepalive_timeout_seconds``)."""
        if seconds is None or seconds <= 0:
            self.exchange.keep_alive = False

    def abort(self) -> None:
        """Close the client connection now (nothing more is sent). Does nothing once this
        request's response is finished: the connection may be serving a later request by
        then (a session kept past its request, in ctx or a background task)."""
        ex = self.exchange
        if ex.finished:
            return
        ex.keep_alive = False
        ex.conn.abort()
        if not ex.finished:
            ex._finish()

    # ------------------------------------------------------------------ retries (engine)
    def _remember_body(self, data: bytes) -> None:
        """Keep what was sent upstream while it is small enough to be sent again."""
        self.body_bytes_sent_upstream += len(data)
        if self._retry_truncated:
            return
        self._retry_size += len(data)
        if self._retry_size > self.RETRY_BUFFER_LIMIT:
            self._retry_truncated = True
            self._retry_buf.clear()
        else:
            self._retry_buf.append(data)

    def _unread(self, data: Optional[bytes], last: bool = False) -> None:
        """Keep a piece of body (None: its end) for the next attempt to send: after what is
        kept (``last``: read by a phase), or before it (a piece an attempt took but did not
        send)."""
        ahead = self._read_ahead
        if ahead is None:
            ahead = self._read_ahead = deque()
        if last:
            ahead.append(data)
        else:
            ahead.appendleft(data)

    def _body_replayable(self) -> bool:
        """True when a new attempt can send the same body (nothing sent, or all kept)."""
        return self.body_bytes_sent_upstream == 0 or (
            not self._retry_truncated and self.is_idempotent)
