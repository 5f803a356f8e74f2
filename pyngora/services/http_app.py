"""The downstream HTTP/1 connection: an asyncio Protocol driving ``h1.RequestParser``.

One :class:`H1Connection` per accepted socket. It parses requests (httptools callbacks only
collect; events come back from ``feed``), hands each request to an :class:`HttpApp` as an
:class:`Exchange`, and writes the app's response with the right framing. What it guarantees:

- keep-alive and pipelining: responses go out strictly in request order; events of later
  requests are held (and reading paused) until the current response is finished;
- a header read timeout (408) armed per request, and an idle keep-alive timeout (silent close);
- a malformed request gets its status (400/413/431) with an empty body,
  ``Cache-Control: private, no-store`` and ``Connection: close``, then the connection closes;
- back-pressure both ways: reading pauses while the app has not taken ~256 KiB of request body
  (or while the transport's write buffer is above its high-water mark and requests wait);
  ``Exchange.drain()`` waits while the write buffer is full;
- ``Expect: 100-continue``: ``100 Continue`` is sent when the app first reads the body;
- upgrades: after a ``101`` the app takes the raw byte stream as a :class:`Tunnel`.

The app side is small on purpose: ``HttpApp.handle(exchange)`` is called once per request and
may return an awaitable (run as a task) or ``None`` (answered synchronously, the fast path of
the static service).
"""
from __future__ import annotations

import asyncio
import http
import sys
from collections import deque
from typing import Any, Awaitable, Callable, Optional

from pyngora import log
from pyngora.config.schema import LimitsConf, ListenerConf
from pyngora.errors import Error, ErrorSource, ErrorType
from pyngora.headers import Headers
from pyngora.protocols import h1
from pyngora.protocols.events import Data, MessageEnd, RequestHead
from pyngora.services.base import ConnectionTracker, Service, WorkerContext

__all__ = ["HttpApp", "HttpSettings", "Exchange", "Tunnel", "H1Connection", "HttpService",
           "error_status_of"]

# Request body bytes buffered for the app before reading from the socket pauses (and resumes
# once it is back under the low mark): bounds memory per connection whatever the body size.
BODY_HIGH_WATER = 256 * 1024
BODY_LOW_WATER = 64 * 1024
# Tunnel bytes buffered before pausing (WebSocket and other upgrades).
TUNNEL_HIGH_WATER = 256 * 1024
# How long a closing connection keeps reading (and discarding) after its last response, so the
# kernel does not answer unread request bytes with a RST that would destroy that response.
LINGER_SECONDS = 2.0

# Reasons for pausing reads (a bitmask: reading resumes only when none is left).
_P_BODY = 1      # the app has not taken the request body buffered so far
_P_PIPELINE = 2  # events of a later request wait for the current response
_P_WRITE = 4     # the write buffer is full and requests are waiting to be answered
_P_TUNNEL = 8    # the tunnel's reader is behind

# Connection states.
_S_IDLE = 0      # between requests, nothing received yet (keep-alive timer armed)
_S_HEAD = 1      # some bytes of a request head received (header timer armed)
_S_ACTIVE = 2    # a request is being answered
_S_CLOSING = 3   # lingering close / closed: ignore input

_ERROR_HEADERS = b"Content-Length: 0\r\nCache-Control: private, no-store\r\nConnection: close\r\n\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_CRLF = b"\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


_STATUS_LINES: dict[int, bytes] = {}


def status_line(status: int, reason: Optional[bytes | str] = None) -> bytes:
    """``HTTP/1.1 200 OK\\r\\n`` (cached for the default reason phrases)."""
    if reason is None:
        line = _STATUS_LINES.get(status)
        if line is None:
            line = b"HTTP/1.1 %d %s\r\n" % (status, _reason(status))
            _STATUS_LINES[status] = line
        return line
    if isinstance(reason, str):
        reason = reason.encode("latin-1")
    if b"\r" in reason or b"\n" in reason:
        reason = _reason(status)
    return b"HTTP/1.1 %d %s\r\n" % (status, reason)


def error_response(status: int) -> bytes:
    """The bytes of an empty-bodied error answer that closes the connection (SPEC section 7)."""
    return status_line(status) + _ERROR_HEADERS


_PROTOCOL_ETYPES = {400: ErrorType.InvalidHTTPHeader, 408: ErrorType.RequestHeaderTimeout,
                    413: ErrorType.BodyTooLarge, 431: ErrorType.HeadersTooLarge}


def error_status_of(exc: BaseException) -> int:
    """The status a request failing with ``exc`` is answered with (0 = write nothing)."""
    if isinstance(exc, Error):
        return exc.status
    st = getattr(exc, "status", None)
    return st if isinstance(st, int) else 500


def _downstream_error(exc: BaseException) -> Error:
    """A parser's ProtocolError (or any exception) as an Error from the downstream."""
    if isinstance(exc, Error):
        return exc
    status = getattr(exc, "status", 400)
    etype = _PROTOCOL_ETYPES.get(status, ErrorType.InvalidHTTPHeader)
    return Error(etype, ErrorSource.Downstream, exc, str(getattr(exc, "reason", "") or exc),
                 status=status)


def _closed_error(context: str = "downstream connection closed") -> Error:
    return Error(ErrorType.ConnectionClosed, ErrorSource.Downstream, None, context)


class HttpSettings:
    """Per-service knobs of the downstream connection (from ``limits`` of SPEC section 5)."""

    __slots__ = ("parser_limits", "header_read_timeout", "keepalive_timeout",
                 "keepalive_requests")

    def __init__(self, limits: Optional[LimitsConf] = None) -> None:
        limits = limits or LimitsConf()
        self.parser_limits = h1.H1Limits(max_header_bytes=limits.max_header_bytes,
                                         max_body_bytes=limits.max_body_bytes)
        self.header_read_timeout = limits.header_read_timeout_seconds
        self.keepalive_timeout = limits.keepalive_timeout_seconds
        self.keepalive_requests = limits.keepalive_requests


class HttpApp:
    """What a connection calls per request. Subclass and implement ``handle``.

    ``handle`` runs once per request, when its head has been parsed and every earlier response
    on the connection is finished. Return ``None`` when the response was written synchronously
    (``exchange.respond(...)``), or an awaitable that writes it (run as a task; if it fails
    before the response head, the client gets a 500; after, the connection is aborted so a
    truncated response never looks complete).
    """

    def handle(self, exchange: "Exchange") -> Optional[Awaitable[None]]:
        raise NotImplementedError


class Exchange:
    """One request and its response on a downstream connection.

    Reading: ``head`` (a RequestHead), ``await read_body()`` -> next chunk or ``None`` at the end
    (raises Error when the client breaks off or sends a malformed body), ``trailers`` after it.
    Writing: ``write_head(status, headers, end=...)`` chooses the framing (Content-Length as given,
    else chunked on HTTP/1.1, else close-delimited), ``write_body(data)``, ``await drain()``,
    ``write_end(trailers)``; ``respond(status, headers, body)`` does all three; ``respond_error``
    sends an empty error that closes the connection. After a 101, ``tunnel()`` takes the socket.
    """

    __slots__ = ("conn", "head", "client_addr", "server_addr", "scheme", "start_time",
                 "status", "keep_alive", "head_sent", "finished", "req_bytes", "resp_bytes",
                 "trailers", "task", "_chunked", "_no_body", "_chunks", "_buffered",
                 "_body_done", "_error", "_waiter", "_continue_pending", "_upgrade",
                 "_tunnel", "_head_buf")

    def __init__(self, conn: "H1Connection", head: RequestHead, start_time: float) -> None:
        self.conn = conn
        self.head = head
        self.client_addr = conn.client_addr
        self.server_addr = conn.server_addr
        self.scheme = conn.scheme
        self.start_time = start_time
        self.status = 0
        self.keep_alive = head.keep_alive
        self.head_sent = False
        self.finished = False
        self.req_bytes = 0
        self.resp_bytes = 0
        self.trailers: Optional[Headers] = None
        self.task: Optional[asyncio.Task[Any]] = None
        self._chunked = False
        self._no_body = False
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._body_done = head.body == "none"
        self._error: Optional[Error] = None
        self._waiter: Optional[asyncio.Future[None]] = None
        self._continue_pending = head.expect_continue and not self._body_done
        self._upgrade = head.upgrade
        self._tunnel: Optional[Tunnel] = None
        self._head_buf: Optional[bytes] = None  # a response head not sent yet (see write_head)

    # ------------------------------------------------------------------ request body
    @property
    def body_done(self) -> bool:
        """True once the whole request body has been received (not necessarily read)."""
        return self._body_done

    async def read_body(self) -> Optional[bytes]:
        """The next piece of the request body, ``None`` at its end. Sends ``100 Continue`` the
        first time when the client asked for it. Raises Error (Downstream) when the body is
        malformed or too large (its ``status`` says 400/413) or the client went away."""
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks.popleft()
                self._buffered -= len(data)
                if self._buffered <= BODY_LOW_WATER:
                    self.conn._resume(_P_BODY)
                return data
            if self._body_done:
                return None
            if self._error is not None:
                raise self._error
            if self._continue_pending:
                self._continue_pending = False
                if not self.head_sent:
                    self.conn._write(_CONTINUE)
            waiter = self._waiter = self.conn.loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    async def read_full_body(self, limit: Optional[int] = None) -> bytes:
        """The whole request body (``limit`` bytes at most: Error 413 beyond)."""
        parts = []
        total = 0
        while True:
            data = await self.read_body()
            if data is None:
                return b"".join(parts)
            total += len(data)
            if limit is not None and total > limit:
                raise Error(ErrorType.BodyTooLarge, ErrorSource.Downstream, None,
                            "request body too large", status=413)
            parts.append(data)

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _feed(self, data: bytes) -> None:
        self.req_bytes += len(data)
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > BODY_HIGH_WATER:
            self.conn._pause(_P_BODY)
        self._wake()

    def _end(self, trailers: Optional[Headers]) -> None:
        self.trailers = trailers
        self._body_done = True
        self._continue_pending = False
        self._wake()

    def _fail(self, err: Error) -> None:
        if self._error is None:
            self._error = err
        w = self._waiter
        if w is not None and not w.done():
            w.set_exception(err)
        if self._tunnel is not None:
            self._tunnel._on_eof()

    # ------------------------------------------------------------------ response
    def write_informational(self, status: int, headers: Optional[Headers] = None) -> None:
        """Forward a 1xx (103 Early Hints, ...) before the final response; 100 and 101 are
        handled by the connection (100) and ``write_head`` (101)."""
        if self.head_sent or status in (100, 101) or not 100 < status < 200:
            return
        if self.head.version == "1.0":
            return  # HTTP/1.0 clients do not understand 1xx (RFC 9110 15.2)
        self.conn._write(status_line(status) + (headers.serialize() if headers else b"") + _CRLF)

    def write_head(self, status: int, headers: Headers, reason: Optional[bytes | str] = None,
                   end: bool = False) -> None:
        """Send the response head. ``headers`` is used (and edited: Connection and framing
        fields) as given; hop-by-hop fields from elsewhere must already be removed. ``end``:
        the response has no body (``Content-Length: 0`` is added when needed)."""
        if self.head_sent:
            raise RuntimeError("response head already sent")
        conn = self.conn
        if conn.closed:
            raise _closed_error()
        self.head_sent = True
        self.status = status
        self._continue_pending = False
        head = self.head
        if status == 101:
            # The connection becomes a tunnel: no framing, no keep-alive decision.
            self.keep_alive = False
            conn._write(status_line(101, reason) + headers.serialize() + _CRLF)
            return
        no_body = head.method == b"HEAD" or status == 204 or status == 304 or status < 200
        self._no_body = no_body
        keep_alive = self.keep_alive and conn._may_keep_alive()
        if (not self._body_done and head.expect_continue) or conn._upgrade_head:
            # The client may not send (or may be about to send) a body we would have to parse,
            # or the parser stopped at an upgrade that did not happen.
            keep_alive = False
        if no_body:
            if status == 204 or status < 200:
                headers.remove(b"content-length")
            headers.remove(b"transfer-encoding")
        elif b"content-length" in headers:
            headers.remove(b"transfer-encoding")
        elif end:
            headers.add(b"Content-Length", b"0")
        elif head.version == "1.1" and b"transfer-encoding" not in headers:
            headers.add(b"Transfer-Encoding", b"chunked")
            self._chunked = True
        elif head.version == "1.1":
            self._chunked = True  # the app asked for chunked itself
        else:
            # HTTP/1.0 client and no length: the body ends when the connection closes.
            headers.remove(b"transfer-encoding")
            keep_alive = False
        app_conn = headers.get(b"connection")
        if app_conn is not None and b"close" in app_conn.lower():
            keep_alive = False  # the app asked to close
        if keep_alive:
            if head.version == "1.0":
                headers.set(b"Connection", b"keep-alive")
            # HTTP/1.1: keep-alive is the default; an app's own Connection tokens stay.
        else:
            headers.set(b"Connection", b"close")
        self.keep_alive = keep_alive
        data = status_line(status, reason) + headers.serialize() + _CRLF
        if end:
            conn._write(data)
            self._finish()
        else:
            # Held back until the first body bytes (one send for head + body), or until the
            # end of this loop iteration when the body is not ready yet.
            self._head_buf = data
            conn.loop.call_soon(self._flush_head)

    def _flush_head(self) -> None:
        data = self._head_buf
        if data is not None:
            self._head_buf = None
            self.conn._write(data)

    def write_body(self, data: bytes) -> None:
        """Send a piece of the body (framed as chunked when the head chose it). Raises Error
        (Downstream, ConnectionClosed) when the client is gone, so pumps stop."""
        if self.finished:
            raise RuntimeError("response already finished")
        conn = self.conn
        if conn.closed:
            raise _closed_error()
        if not data or self._no_body:
            return
        self.resp_bytes += len(data)
        head = self._head_buf
        if head is not None:
            self._head_buf = None
            if self._chunked:
                conn.transport.writelines((head, b"%x\r\n" % len(data), data, _CRLF))  # type: ignore[union-attr]
            else:
                conn.transport.writelines((head, data))  # type: ignore[union-attr]
        elif self._chunked:
            conn.transport.writelines((b"%x\r\n" % len(data), data, _CRLF))  # type: ignore[union-attr]
        else:
            conn.transport.write(data)  # type: ignore[union-attr]

    async def drain(self) -> None:
        """Wait while the write buffer is above its high-water mark (write back-pressure).
        Raises Error (Downstream, ConnectionClosed) when the client is gone."""
        if self._head_buf is not None:
            self._flush_head()
        await self.conn._drain()

    def write_end(self, trailers: Optional[Headers] = None) -> None:
        """End the response (with trailers when chunked); the next request may start."""
        if self.finished:
            return
        head = self._head_buf
        if head is not None:
            self._head_buf = None
        else:
            head = b""
        if self._chunked:
            if trailers:
                self.conn._write(head + b"0\r\n" + trailers.serialize() + _CRLF)
            else:
                self.conn._write(head + _LAST_CHUNK)
        elif head:
            self.conn._write(head)
        self._finish()

    def respond(self, status: int, headers: Optional[Headers] = None, body: bytes = b"",
                reason: Optional[bytes | str] = None) -> None:
        """A whole response at once (``Content-Length`` is set from ``body``)."""
        if headers is None:
            headers = Headers()
        if b"content-length" not in headers and status != 204 and status != 304:
            headers.add(b"Content-Length", str(len(body)).encode())
        self.write_head(status, headers, reason)
        if body:
            self.write_body(body)
        self.write_end()

    def respond_prebuilt(self, status: int, head: bytes, body: bytes) -> None:
        """Fast path for fixed answers: ``head`` is the status line and header lines (with
        Content-Length, without Connection and the final blank line)."""
        if self.head_sent:
            raise RuntimeError("response head already sent")
        conn = self.conn
        if conn.closed:
            return
        self.head_sent = True
        self.status = status
        self._continue_pending = False
        keep_alive = self.keep_alive and conn._may_keep_alive() and not (
            (not self._body_done and self.head.expect_continue) or conn._upgrade_head)
        self.keep_alive = keep_alive
        if keep_alive:
            tail = b"Connection: keep-alive\r\n\r\n" if self.head.version == "1.0" else _CRLF
        else:
            tail = b"Connection: close\r\n\r\n"
        if body and self.head.method != b"HEAD":
            self.resp_bytes = len(body)
            conn.transport.writelines((head, tail, body))  # type: ignore[union-attr]
        else:
            conn.transport.write(head + tail)  # type: ignore[union-attr]
        self._finish()

    def respond_error(self, status: int) -> None:
        """An empty-bodied error that closes the connection, or an abort when a response head
        was already sent (a truncated response must not look complete)."""
        if self.finished:
            return
        if self.head_sent and self._head_buf is None:
            self.keep_alive = False
            self.conn.abort()
            self._finish()
            return
        self._head_buf = None  # a head still held back never reached the client: replace it
        self.head_sent = True
        self.status = status
        self.keep_alive = False
        self.conn._write(error_response(status))
        self._finish()

    def _finish(self) -> None:
        if not self.finished:
            self.finished = True
            self.conn._exchange_done(self)

    # ------------------------------------------------------------------ upgrades
    def tunnel(self) -> "Tunnel":
        """After ``write_head(101, ...)``: the raw two-way byte stream of the connection."""
        if self.status != 101:
            raise RuntimeError("tunnel() needs a 101 response first")
        if self._tunnel is None:
            self._tunnel = Tunnel(self.conn)
            self.conn._start_tunnel(self._tunnel)
        return self._tunnel


class Tunnel:
    """The downstream side of an upgraded connection: ``await read()`` (b"" at EOF),
    ``write(data)``, ``await drain()``, ``write_eof()``, ``close()``."""

    __slots__ = ("conn", "_chunks", "_buffered", "_eof", "_waiter")

    def __init__(self, conn: "H1Connection") -> None:
        self.conn = conn
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._eof = False
        self._waiter: Optional[asyncio.Future[None]] = None

    def _feed(self, data: bytes) -> None:
        if data:
            self._chunks.append(data)
            self._buffered += len(data)
            if self._buffered > TUNNEL_HIGH_WATER:
                self.conn._pause(_P_TUNNEL)
            self._wake()

    def _on_eof(self) -> None:
        self._eof = True
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def read(self) -> bytes:
        while True:
            if self._chunks:
                data = self._chunks.popleft()
                self._buffered -= len(data)
                if self._buffered <= BODY_LOW_WATER:
                    self.conn._resume(_P_TUNNEL)
                return data
            if self._eof:
                return b""
            self._waiter = self.conn.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def write(self, data: bytes) -> None:
        if self.conn.closed:
            raise _closed_error()
        self.conn.transport.write(data)  # type: ignore[union-attr]

    async def drain(self) -> None:
        await self.conn._drain()

    def write_eof(self) -> None:
        t = self.conn.transport
        if t is not None and not self.conn.closed and t.can_write_eof():
            try:
                t.write_eof()
            except (OSError, RuntimeError):
                pass

    def close(self) -> None:
        self.conn._close()


class H1Connection(asyncio.Protocol):
    """An HTTP/1.x server connection. Created by ``HttpService.protocol_factory`` per socket."""

    __slots__ = ("loop", "app", "settings", "tracker", "metrics", "scheme", "transport",
                 "parser", "client_addr", "server_addr", "closed", "_state", "_exchange",
                 "_body_open", "_discarding", "_pending", "_pumping", "_paused",
                 "_write_paused", "_drain_waiters", "_timer", "_deadline", "_timer_cb",
                 "_requests", "_draining",
                 "_tunnel", "_upgrade_head", "_upgrade_buf", "_eof", "_broken")

    def __init__(self, app: HttpApp, settings: HttpSettings,
                 tracker: Optional[ConnectionTracker] = None, scheme: str = "http",
                 metrics: Any = None, loop: Optional[asyncio.AbstractEventLoop] = None) -> None:
        self.loop = loop or asyncio.get_event_loop()
        self.app = app
        self.settings = settings
        self.tracker = tracker
        self.metrics = metrics
        self.scheme = scheme
        self.transport: Optional[asyncio.Transport] = None
        self.parser = h1.RequestParser(settings.parser_limits)
        self.client_addr: Any = None
        self.server_addr: Any = None
        self.closed = False
        self._state = _S_IDLE
        self._exchange: Optional[Exchange] = None
        self._body_open = False      # events belong to the current exchange's body
        self._discarding = False     # response done before the request body: drop its rest
        self._pending: deque[Any] = deque()
        self._pumping = False
        self._paused = 0
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._timer: Optional[asyncio.TimerHandle] = None
        self._deadline: Optional[float] = None  # when _timer_cb is due (None: no timeout)
        self._timer_cb: Optional[Callable[[], None]] = None
        self._requests = 0
        self._draining = False
        self._tunnel: Optional[Tunnel] = None
        self._upgrade_head = False   # the parser stopped at an upgrade request
        self._upgrade_buf: list[bytes] = []  # bytes after it, until the app takes the tunnel
        self._eof = False
        self._broken = False         # a protocol error was seen: parse nothing more

    # ------------------------------------------------------------------ asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.client_addr = transport.get_extra_info("peername")
        self.server_addr = transport.get_extra_info("sockname")
        if self.metrics is not None:
            self.metrics.connection_opened()
        # The first request must start within the header timeout; a connection on which nothing
        # at all arrives is closed silently (browsers open spare connections).
        self._state = _S_IDLE
        self._arm(self.settings.header_read_timeout, self._close)
        if self.tracker is not None:
            self.tracker.add(self)

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.closed = True
        self._state = _S_CLOSING
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()  # do not keep the connection alive until it would fire
            self._timer = None
        if self.tracker is not None:
            self.tracker.discard(self)
        if self.metrics is not None:
            self.metrics.connection_closed()
        err = _closed_error()
        for w in self._drain_waiters:
            if not w.done():
                w.set_exception(err)
        self._drain_waiters.clear()
        if self._tunnel is not None:
            self._tunnel._on_eof()
        ex = self._exchange
        if ex is not None and not ex.finished:
            ex._fail(err)
            # A handler still waiting (on its upstream, say) is cancelled: its cleanup closes
            # the upstream connection instead of pooling it (the response was cut short).
            if ex.task is not None and not ex.task.done() and self._tunnel is None:
                ex.task.cancel()

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state == _S_CLOSING or self._broken:
            return  # lingering close, or after a malformed request: discard
        if self._tunnel is not None or self._upgrade_head:
            self._tunnel_data(data)
            return
        if state == _S_IDLE:
            # The next request starts: from now on the header timeout applies.
            self._state = _S_HEAD
            self._arm(self.settings.header_read_timeout, self._on_header_timeout)
        try:
            events = self.parser.feed(data)
        except h1.ProtocolError as exc:
            if exc.events:
                self._pending.extend(exc.events)  # earlier pipelined requests are served first
            self._on_protocol_error(exc)
            return
        if events:
            self._pending.extend(events)
            self._pump()

    def eof_received(self) -> Optional[bool]:
        self._eof = True
        if self._tunnel is not None:
            self._tunnel._on_eof()
            return True  # half-close: the other direction may still carry data
        if self._upgrade_head:
            return True
        # Idle: close. With a request in flight, EOF means the client gave up (nginx's "client
        # prematurely closed connection"): closing runs connection_lost, which cancels the
        # handler so its upstream connection is closed rather than left to finish for nobody.
        return None

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiters = self._drain_waiters
        self._drain_waiters = []
        for w in waiters:
            if not w.done():
                w.set_result(None)
        if self._paused & _P_WRITE:
            self._resume(_P_WRITE)
            self._pump()

    # ------------------------------------------------------------------ draining (services.base)
    def close_when_idle(self) -> None:
        """Close now if idle, else after the current response (which says Connection: close)."""
        self._draining = True
        # A fresh connection whose first request has not arrived yet is not idle: its client
        # just connected and is sending. It gets that one answer (with Connection: close), and
        # the header timeout still bounds the wait. Closing it would fail a request that HTTP
        # gives the client no reason to retry.
        if self._requests == 0 and not self._pending:
            return
        if self._exchange is None and not self._pending and self._tunnel is None:
            self._close()

    def abort(self) -> None:
        """Close the socket now, dropping whatever is buffered."""
        if self.transport is not None:
            self.transport.abort()
        self.closed = True

    # ------------------------------------------------------------------ request dispatch
    def _pump(self) -> None:
        """Route parsed events: the current request's body goes to its exchange; the next
        request starts only once the current response is finished (pipelining order)."""
        if self._pumping:
            return
        self._pumping = True
        pending = self._pending
        try:
            while pending and not self.closed:
                ex = self._exchange
                if self._body_open:
                    ev = pending.popleft()
                    if ev.__class__ is Data:
                        if ex is not None:
                            ex._feed(ev.data)
                    elif ev.__class__ is MessageEnd:
                        self._body_open = False
                        if ex is not None:
                            ex._end(ev.trailers)
                        else:
                            self._discarding = False
                            self._after_response()
                    elif isinstance(ev, h1.ProtocolError):  # a malformed body
                        self._body_open = False
                        if ex is not None:
                            ex.keep_alive = False
                            ex._fail(_downstream_error(ev))
                        else:
                            self._close()
                    continue
                if ex is not None:
                    break  # a later request waits for the current response
                if self._write_paused:
                    self._pause(_P_WRITE)
                    break
                ev = pending.popleft()
                if ev.__class__ is RequestHead:
                    self._start(ev)
                elif isinstance(ev, h1.ProtocolError):
                    pending.clear()
                    self._send_error(getattr(ev, "status", 400) or 400)
        finally:
            self._pumping = False
        if pending and self._exchange is not None and not self._body_open:
            self._pause(_P_PIPELINE)
        elif self._paused & _P_PIPELINE and not pending:
            self._resume(_P_PIPELINE)

    def _start(self, head: RequestHead) -> None:
        self._cancel_timer()
        self._state = _S_ACTIVE
        self._requests += 1
        ex = Exchange(self, head, self.loop.time())
        self._exchange = ex
        # Events up to this request's MessageEnd are its own (a body-less request has one too:
        # leaving it queued would look like a pipelined request and pause reading).
        self._body_open = True
        if head.upgrade and self.parser.upgraded:
            # Everything after this head belongs to whatever the app upgrades to.
            self._upgrade_head = True
            self._body_open = False
            ex._body_done = True
            self._pending.clear()  # only this request's MessageEnd can follow its head
            trailing = self.parser.take_trailing()
            if trailing:
                self._upgrade_buf.append(trailing)
        try:
            result = self.app.handle(ex)
        except Exception as exc:  # the app failed synchronously
            self._app_failed(ex, exc)
            return
        if result is not None and not ex.finished:
            task = self.loop.create_task(result)  # type: ignore[arg-type]
            ex.task = task
            task.add_done_callback(lambda t, ex=ex: self._task_done(ex, t))
        elif result is not None:
            # Finished synchronously but returned a coroutine: run it to completion anyway.
            ex.task = self.loop.create_task(result)  # type: ignore[arg-type]

    def _app_failed(self, ex: Exchange, exc: BaseException) -> None:
        status = error_status_of(exc)
        if not (isinstance(exc, Error) and exc.source is ErrorSource.Downstream):
            log.ERROR.error("request handler failed: %s %s: %r", ex.head.method.decode("latin-1"),
                            ex.head.target.decode("latin-1"), exc, exc_info=exc)
        if ex.finished:
            return
        if status == 0 or self.closed:
            ex.keep_alive = False
            ex.finished = True
            self._exchange = None
            self._close()
            return
        ex.respond_error(status)

    def _task_done(self, ex: Exchange, task: "asyncio.Task[Any]") -> None:
        if task.cancelled():
            exc: Optional[BaseException] = _closed_error("request handler cancelled")
        else:
            exc = task.exception()
        if ex.status == 101:
            ex._finish()  # the tunnel is over
            return
        if exc is not None:
            self._app_failed(ex, exc)
        elif not ex.finished:
            if ex.head_sent:
                ex.respond_error(500)  # aborts: the app left its response unfinished
            else:
                log.ERROR.error("request handler returned without a response: %s %s",
                                ex.head.method.decode("latin-1"), ex.head.target.decode("latin-1"))
                ex.respond_error(500)

    def _exchange_done(self, ex: Exchange) -> None:
        """Called once per exchange when its response is complete (or given up)."""
        if self.metrics is not None:
            self.metrics.request_done(ex.status, self.loop.time() - ex.start_time,
                                      ex.req_bytes, ex.resp_bytes)
        if ex is not self._exchange:
            return
        self._exchange = None
        if ex.status == 101:
            self._close()
            return
        if not ex.keep_alive or self.closed:
            self._linger()
            return
        if self._body_open:
            # Answered before the request body was read (the static service does that): the
            # rest of the body is read and dropped, then the next request may start.
            self._discarding = True
            self._resume(_P_BODY)
            return
        self._after_response()

    def _after_response(self) -> None:
        if self._draining or self._eof:
            self._linger()
            return
        self._state = _S_IDLE
        if self._pending:
            self._pump()
        if self._exchange is None and self._state == _S_IDLE and not self.closed:
            if self.parser.in_message:
                # Part of the next (pipelined) request is already here: the header timeout.
                self._state = _S_HEAD
                self._arm(self.settings.header_read_timeout, self._on_header_timeout)
            else:
                self._arm(self.settings.keepalive_timeout, self._close)

    def _may_keep_alive(self) -> bool:
        limit = self.settings.keepalive_requests
        return not (self._draining or self._eof or self.closed or
                    (limit is not None and self._requests >= limit))

    # ------------------------------------------------------------------ errors and timers
    def _on_protocol_error(self, exc: "h1.ProtocolError") -> None:
        """A malformed request: nothing more is parsed; it is answered in order (after the
        responses to the requests before it), then the connection closes."""
        self._broken = True
        self._pending.append(exc)
        self._pump()

    def _send_error(self, status: int) -> None:
        """An empty-bodied error without a request to hang it on (malformed head, 408)."""
        self._write(error_response(status))
        if self.metrics is not None:
            self.metrics.request_done(status, 0.0, 0, 0)
        self._linger()

    def _on_header_timeout(self) -> None:
        if self._exchange is None and self._state == _S_HEAD:
            self._send_error(408)

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` in ``delay`` seconds unless re-armed or cancelled first.

        Lazy, because it runs twice per request: one loop timer per connection is kept and
        only moved earlier when needed; when it fires early it re-schedules itself for the
        current deadline. So a keep-alive request costs no timer-heap work at all."""
        if not delay or delay <= 0:
            self._deadline = None
            return
        when = self.loop.time() + delay
        self._deadline = when
        self._timer_cb = callback
        timer = self._timer
        if timer is not None:
            if timer.when() <= when:
                return
            timer.cancel()
        self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None or self.closed:
            return
        if self.loop.time() < deadline:
            self._timer = self.loop.call_at(deadline, self._on_timer)
            return
        self._deadline = None
        callback, self._timer_cb = self._timer_cb, None
        if callback is not None:
            callback()

    def _cancel_timer(self) -> None:
        self._deadline = None

    # ------------------------------------------------------------------ I/O helpers
    def _write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    async def _drain(self) -> None:
        if self.closed:
            raise _closed_error()
        if not self._write_paused:
            return
        waiter = self.loop.create_future()
        self._drain_waiters.append(waiter)
        await waiter

    def _pause(self, reason: int) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            try:
                self.transport.pause_reading()
            except (RuntimeError, AttributeError):
                pass
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        if self._paused & reason:
            self._paused &= ~reason
            if not self._paused and self.transport is not None and not self.closed:
                try:
                    self.transport.resume_reading()
                except (RuntimeError, AttributeError):
                    pass

    def _linger(self) -> None:
        """Close after the last response: send FIN, keep reading (and discarding) for a while
        so unread request bytes do not turn into a RST that destroys the response."""
        self._state = _S_CLOSING
        self._pending.clear()
        t = self.transport
        if t is None or self.closed:
            return
        if self._eof or not t.can_write_eof():
            self._close()
            return
        if self._paused:
            self._paused = 0
            try:
                t.resume_reading()
            except (RuntimeError, AttributeError):
                pass
        try:
            t.write_eof()
        except (OSError, RuntimeError):
            self._close()
            return
        self._arm(LINGER_SECONDS, self._close)

    def _close(self) -> None:
        self._state = _S_CLOSING
        self._cancel_timer()
        if self.transport is not None and not self.closed:
            self.transport.close()

    # ------------------------------------------------------------------ upgrades
    def _tunnel_data(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel._feed(data)
        else:
            # The app has not taken the tunnel yet (it is still talking to its upstream).
            self._upgrade_buf.append(data)
            self._pause(_P_TUNNEL)

    def _start_tunnel(self, tunnel: Tunnel) -> None:
        self._tunnel = tunnel
        self._cancel_timer()
        buf, self._upgrade_buf = self._upgrade_buf, []
        for data in buf:
            tunnel._feed(data)
        if tunnel._buffered <= BODY_LOW_WATER:
            self._resume(_P_TUNNEL)
        if self._eof or self.closed:
            tunnel._on_eof()


class HttpService(Service):
    """A listening service that speaks HTTP/1 through an :class:`HttpApp`.

    Subclasses implement ``new_app(ctx)`` (runs in each worker, from ``start_worker``) and may
    override ``start_worker`` to build more per-worker state first (call ``super()``).
    ``ctx.state["service_metrics"]``, when someone put one there, gets per-request and
    per-connection counts (``request_done``, ``connection_opened``, ``connection_closed``).
    """

    kind = "http"

    def __init__(self, name: str, conf: Any = None, limits: Optional[LimitsConf] = None) -> None:
        super().__init__(name, conf)
        if limits is None and conf is not None:
            limits = getattr(getattr(conf, "spec", None), "limits", None)
        self.limits: LimitsConf = limits or LimitsConf()

    def new_app(self, ctx: WorkerContext) -> HttpApp:
        """The per-worker request handler."""
        raise NotImplementedError

    async def start_worker(self, ctx: WorkerContext) -> None:
        if "service_metrics" not in ctx.state:
            # The worker loads the metrics registry when metrics are on; services must not
            # import it (DESIGN's one-way doors), so it is used only if already loaded.
            registry = sys.modules.get("pyngora.metrics.registry")
            if registry is not None:
                ctx.state["service_metrics"] = registry.service_metrics(self.name)
        ctx.state["http_app"] = self.new_app(ctx)

    def protocol_factory(self, ctx: WorkerContext,
                         listener: ListenerConf) -> Callable[[], asyncio.BaseProtocol]:
        app = ctx.state.get("http_app")
        if app is None:
            app = ctx.state["http_app"] = self.new_app(ctx)
        settings = HttpSettings(self.limits)
        tracker = ctx.connections
        scheme = "https" if listener.tls is not None else "http"
        loop = ctx.loop

        def factory() -> asyncio.BaseProtocol:
            return H1Connection(app, settings, tracker, scheme,
                                ctx.state.get("service_metrics"), loop)

        return factory
