"""One request and its response on a downstream HTTP/1 connection: ``Exchange`` (what an
``HttpApp`` reads and writes), ``Tunnel`` (the byte stream after a 101), ``HttpSettings`` and
the connection's shared constants. ``http_app`` (the connection) re-exports every name.
"""
from __future__ import annotations

import asyncio
import http
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Awaitable, Optional, Union

from pyngora import log
from pyngora.config.schema import LimitsConf
from pyngora.errors import Error, ErrorSource, ErrorType
from pyngora.headers import Headers
from pyngora.protocols import h1
from pyngora.protocols.events import RequestHead
from pyngora.protocols.h1_wire import REASON_CHARS
from pyngora.services.request_body import RequestBody

if TYPE_CHECKING:  # pragma: no cover
    from pyngora.services.http_app import H1Connection

# Request body bytes buffered for the app before reading from the socket pauses (and resumes
# once it is back under the low mark): bounds memory per connection whatever the body size.
BODY_HIGH_WATER = 256 * 1024
BODY_LOW_WATER = 64 * 1024
# Tunnel bytes buffered before pausing (WebSocket and other upgrades).
TUNNEL_HIGH_WATER = 256 * 1024
# How long a closing connection keeps reading (and discarding) after its last response, so the
# kernel does not answer unread request bytes with a RST that would destroy that response.
LINGER_SECONDS = 2.0

# Request start times and durations (metrics, access log): uvloop's loop.time() is in whole
# milliseconds, cached per loop iteration, which would leave the histogram's lower buckets
# meaningless.
request_clock = time.perf_counter

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
_CLOSE_FIELD = b"Connection: close\r\n"
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
        try:
            reason = reason.encode("latin-1")
        except UnicodeEncodeError:  # (set by a phase) no latin-1 text: the standard phrase
            return status_line(status)
    if reason.translate(None, REASON_CHARS):  # CR, LF, NUL, ESC...: the standard phrase
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


def _length(value: bytes) -> Optional[int]:
    """A Content-Length value as a number, or None when it is not one."""
    if not value.isdigit():
        value = value.strip(b" \t")
        if not value.isdigit():
            return None
    return int(value)


def _declared_length(headers: Headers) -> Optional[bytes]:
    """The response's Content-Length value, one field left: repeats of the same value are
    merged; different values (a filter added one) give b"" (not a length: dropped)."""
    value = headers.get(b"content-length")
    if value is None or headers._keys.count(b"content-length") < 2:  # (keys: lowercased)
        return value
    values = headers.get_all(b"content-length")
    first = values[0].strip(b" \t")
    if any(v.strip(b" \t") != first for v in values):
        return b""
    headers.set(b"Content-Length", first)
    return first


def _chunked_last(headers: Headers) -> None:
    """An app's own Transfer-Encoding, with chunked as its last coding: the body is framed
    chunked, and a client reads a response whose last coding is not chunked until the
    connection closes (RFC 9112 6.3), the next response included."""
    codings = [c.strip(b" \t") for v in headers.get_all(b"transfer-encoding")
               for c in v.split(b",")]
    # identity is no coding at all; chunked is applied once, by this exchange, last
    codings = [c for c in codings if c and c.lower() not in (b"identity", b"chunked")]
    codings.append(b"chunked")
    headers.set(b"Transfer-Encoding", b", ".join(codings))


class HttpSettings:
    """Per-service knobs of the downstream connection (from ``limits`` of SPEC section 5)."""

    __slots__ = ("parser_limits", "header_read_timeout", "keepalive_timeout",
                 "keepalive_requests", "send_timeout", "body_read_timeout",
                 "h2_max_concurrent_streams")

    def __init__(self, limits: Optional[LimitsConf] = None) -> None:
        limits = limits or LimitsConf()
        self.parser_limits = h1.H1Limits(max_header_bytes=limits.max_header_bytes,
                                         max_body_bytes=limits.max_body_bytes)
        self.header_read_timeout = limits.header_read_timeout_seconds
        self.keepalive_timeout = limits.keepalive_timeout_seconds
        self.keepalive_requests = limits.keepalive_requests
        self.send_timeout = limits.send_timeout_seconds
        self.body_read_timeout = limits.body_read_timeout_seconds
        self.h2_max_concurrent_streams = limits.h2_max_concurrent_streams


class HttpApp:
    """What a connection calls per request. Subclass and implement ``handle``.

    ``handle`` runs once per request, when its head has been parsed and every earlier response
    on the connection is finished. Return ``None`` when the response was written synchronously
    (``exchange.respond(...)``), or an awaitable that writes it (run as a task; if it fails
    before the response head, the client gets a 500; after, the connection is aborted so a
    truncated response never looks complete).
    """

    #: Offered each request that arrives alone on an idle HTTP/1 connection before it is
    #: parsed: ``express.take(connection, data)`` True says it took the request (the
    #: proxy's express lane, proxy/express.py); None: every request goes to ``handle``.
    express: Any = None

    def handle(self, exchange: "Exchange") -> Optional[Awaitable[None]]:
        raise NotImplementedError


class Exchange(RequestBody):
    """One request and its response on a downstream connection.

    Reading: ``head`` (a RequestHead), ``await read_body()`` -> next chunk or ``None`` at the end
    (raises Error when the client breaks off or sends a malformed body), ``trailers`` after it.
    Writing: ``write_head(status, headers, end=...)`` chooses the framing (Content-Length as given,
    else chunked on HTTP/1.1, else close-delimited), ``write_body(data)``, ``await drain()``,
    ``write_end(trailers)``; ``respond(status, headers, body)`` does all three; ``respond_error``
    sends an empty error that closes the connection. After a 101, ``tunnel()`` takes the socket.
    """

    __slots__ = ("conn", "head", "client_addr", "server_addr", "scheme", "start_time",
                 "status", "keep_alive", "head_sent", "finished", "resp_bytes", "task",
                 "_chunked", "_no_body", "_upgrade", "_tunnel", "_head_buf", "_left"
                 ) + RequestBody.BODY_SLOTS

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
        self.resp_bytes = 0
        self.task: Optional[asyncio.Task[Any]] = None
        self._chunked = False
        self._no_body = False
        self._init_body(head)
        self._upgrade = head.upgrade
        self._tunnel: Optional[Tunnel] = None
        self._head_buf: Optional[bytes] = None  # a response head not sent yet (see write_head)
        self._left: Optional[int] = None  # body bytes the head's Content-Length still owes

    # ------------------------------------------------------------------ request body
    # (read_body, read_full_body, body_done, _end: see RequestBody)
    def _took(self, n: int) -> None:
        if self._buffered <= BODY_LOW_WATER:
            self.conn._resume(_P_BODY)

    def _send_continue(self) -> None:
        self.conn._write(_CONTINUE)
        self.conn._body_expected()  # the client starts sending only now

    def _feed(self, data: bytes) -> None:
        self.req_bytes += len(data)
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > BODY_HIGH_WATER:
            self.conn._pause(_P_BODY)
        self._wake()

    def _fail(self, err: Error) -> None:
        self._fail_body(err)
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
                   end: bool = False, hold: bool = False) -> None:
        """Send the response head. ``headers`` is used (and edited: Connection and framing
        fields) as given; hop-by-hop fields from elsewhere must already be removed. ``end``:
        the response has no body (``Content-Length: 0`` is added when needed). ``hold``: the
        caller writes body bytes (or calls ``flush_head``) before it returns to the loop, so
        the head waits for them without a scheduled flush (the fast path's single send)."""
        if self.head_sent:
            raise RuntimeError("response head already sent")
        if status < 200 or status > 999:
            # A 1xx as the final head would make the next response answer this request; only
            # an upgrade request may be switched (101: the connection becomes a tunnel).
            if status != 101:
                raise RuntimeError(f"{status} is no final response status")
            if not self.head.upgrade:
                raise RuntimeError("101 to a request that asked for no upgrade")
        conn = self.conn
        if conn.closed:
            raise _closed_error()
        # head_sent is set only once the head's bytes are made: headers a phase broke (not a
        # Headers) raise here with nothing sent, and the request still gets its 500.
        head = self.head
        if status == 101:
            # The connection becomes a tunnel: no framing, no keep-alive decision.
            data = status_line(101, reason) + headers.serialize() + _CRLF
            self.head_sent = True
            self.status = status
            self._continue_pending = False
            self.keep_alive = False
            conn._write(data)
            return
        no_body = head.method == b"HEAD" or status == 204 or status == 304 or status < 200
        self._no_body = no_body
        keep_alive = self.keep_alive and conn._may_keep_alive()
        if (not self._body_done and head.expect_continue) or conn._upgrade_head:
            # The client may not send (or may be about to send) a body we would have to parse,
            # or the parser stopped at an upgrade that did not happen.
            keep_alive = False
        declared = None if no_body else _declared_length(headers)
        length = _length(declared) if declared is not None else None
        if declared is not None and length is None:
            log.ERROR.warning("response Content-Length %r is not a length: dropped", declared)
            headers.remove(b"content-length")
        if no_body:
            if status == 204 or status < 200:
                headers.remove(b"content-length")
            headers.remove(b"transfer-encoding")
        elif length is not None:
            headers.remove(b"transfer-encoding")
            # The body is held to it (write_body, write_end): a body filter that changed the
            # length without removing the field must not put bytes on the wire that the
            # client would read as the next response, nor leave it waiting for bytes never
            # sent (a head that ends the response but promises a body closes the connection).
            self._left = length
            if end and length:
                keep_alive = False
        elif end:
            headers.add(b"Content-Length", b"0")
        elif head.version == "1.1" and b"transfer-encoding" not in headers:
            headers.add(b"Transfer-Encoding", b"chunked")
            self._chunked = True
        elif head.version == "1.1":
            self._chunked = True  # the app set Transfer-Encoding itself: chunked goes last
            _chunked_last(headers)
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
        data = status_line(status, reason) + headers.serialize() + _CRLF
        self.head_sent = True
        self.status = status
        self._continue_pending = False
        self.keep_alive = keep_alive
        if end:
            conn._write(data)
            self._finish()
        else:
            # Held back until the first body bytes (one send for head + body), or until the
            # end of this loop iteration when the body is not ready yet.
            self._head_buf = data
            if not hold:
                conn.loop.call_soon(self._flush_head)

    def may_write_whole(self) -> bool:
        """True when a whole upstream response may go out as it came (``write_whole``): the
        answer to an HTTP/1.1 GET (no body, so no framing or 100-continue state of ours), and
        no head sent yet."""
        head = self.head
        return not self.head_sent and head.method == b"GET" and head.version == "1.1"

    def write_whole(self, status: int, head: bytes, body: Union[bytes, memoryview]) -> None:
        """Send a complete response -- ``head``, with its Content-Length and no hop-by-hop
        field, ending in the blank line; and ``body`` -- and end the exchange; only after
        ``may_write_whole`` said True. As ``write_head``, adds ``Connection: close`` when this
        connection ends with it. A memoryview body (a large one, left in the upstream's read)
        goes out behind the head in one writev, uncopied."""
        conn = self.conn
        keep_alive = self.keep_alive and conn._may_keep_alive() and not conn._upgrade_head
        if not keep_alive:
            head = head[:-2] + _CLOSE_FIELD + _CRLF
            self.keep_alive = False
        self.head_sent = True
        self.status = status
        self._continue_pending = False
        self.resp_bytes += len(body)
        # conn._write and self._finish, inline: every proxied whole response ends here
        if not conn.closed and conn.transport is not None:
            if body.__class__ is bytes:
                conn.transport.write(head + body)  # type: ignore[operator]
            else:
                conn.transport.writelines((head, body))
        if not self.finished:
            self.finished = True
            conn._exchange_done(self)

    def flush_head(self) -> None:
        """Send a head that ``write_head(hold=True)`` kept back, if it still is."""
        self._flush_head()

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
        if not self.head_sent:
            raise RuntimeError("response body before its head: write the head first")
        conn = self.conn
        if conn.closed:
            raise _closed_error()
        if not data or self._no_body:
            return
        left = self._left
        if left is not None:
            if len(data) > left:
                if left or not self.resp_bytes:  # once per response, not per chunk
                    log.ERROR.warning("response body longer than its Content-Length (%d): "
                                      "the rest dropped", self.resp_bytes + left)
                data = data[:left]
                if not data:
                    return
            self._left = left - len(data)
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
        if self._left:  # shorter than its Content-Length: the client must see it cut
            log.ERROR.warning("response body %d bytes short of its Content-Length: "
                              "connection closed", self._left)
            self.keep_alive = False
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
        if status < 200 or status > 999:  # a 1xx (from Error.set_status, say) is no final
            status = 500  # response; four digits are no status at all (RFC 9110 15)
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
