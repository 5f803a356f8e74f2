"""One downstream HTTP/2 stream as an exchange: :class:`H2Exchange` and its :class:`StreamHandle`.

Built by ``services/h2_app.py``'s :class:`H2Connection` for every request it reads, and handed
to the :class:`HttpApp`, which cannot tell it from an HTTP/1 ``http_app.Exchange``: the same
API (head, ``read_body``, ``write_head``, ``write_body``, ``drain``, ``write_end``,
``respond``, ``respond_prebuilt``, ``respond_error``, trailers). Reading the body hands the
flow-control window back to the client; writing queues frames on the connection's sans-IO
``H2Server`` and schedules one socket write per loop iteration (the connection's job).
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from pyngora.errors import Error, ErrorSource, ErrorType
from pyngora.headers import Headers
from pyngora.protocols import h2 as h2p
from pyngora.protocols.events import RequestHead
from pyngora.services.request_body import RequestBody

if TYPE_CHECKING:
    from pyngora.services.h2_app import H2Connection

__all__ = ["H2Exchange", "StreamHandle", "STREAM_HIGH_WATER", "closed_error"]

# Queued response bytes per stream above which ``drain()`` waits.
STREAM_HIGH_WATER = 64 * 1024

_ERROR_FIELDS = [(b"content-length", b"0"), (b"cache-control", b"private, no-store")]


def closed_error(context: str = "downstream stream closed") -> Error:
    """The Error a read, write or drain of a stream that is gone raises (Downstream)."""
    return Error(ErrorType.ConnectionClosed, ErrorSource.Downstream, None, context)


_PREBUILT: dict[bytes, list[tuple[bytes, bytes]]] = {}


def _expire(waiter: "asyncio.Future[Any]") -> None:
    if not waiter.done():
        waiter.set_result(False)  # drain's send_timeout passed


def _parse_prebuilt(head: bytes) -> list[tuple[bytes, bytes]]:
    """An HTTP/1 head (status line + fields, see ``Exchange.respond_prebuilt``) -> HTTP/2
    fields. Cached: the static service changes its head once a second."""
    hit = _PREBUILT.get(head)
    if hit is not None:
        return hit
    fields = []
    for line in head.split(b"\r\n")[1:]:
        if not line:
            continue
        name, _, value = line.partition(b":")
        fields.append((name.strip(), value.strip()))
    out = h2p.response_fields(fields)
    if len(_PREBUILT) > 16:
        _PREBUILT.clear()
    _PREBUILT[head] = out
    return out


class StreamHandle:
    """What ``exchange.conn`` offers for one stream: ``loop``, ``closed`` and ``abort()``
    (which resets this stream only, not the connection its neighbours share), and what a
    callback-level app (the proxy's fast path) asks of an HTTP/1 connection: ``run_task``,
    ``_write_paused`` and ``on_drained``, for this stream."""

    __slots__ = ("connection", "exchange", "loop")

    def __init__(self, connection: "H2Connection", exchange: "H2Exchange") -> None:
        self.connection = connection
        self.exchange = exchange
        self.loop = connection.loop

    @property
    def closed(self) -> bool:
        return self.exchange._gone()

    def abort(self) -> None:
        self.connection._reset_stream(self.exchange.stream_id, h2p.INTERNAL_ERROR)

    def run_task(self, ex: "H2Exchange", coro: Any) -> None:
        """Run ``coro`` as the stream's request task (as ``H1Connection.run_task``): the
        connection answers its failure and releases the stream when it is done."""
        connection = self.connection
        task = connection.loop.create_task(coro)
        ex.task = task
        task.add_done_callback(lambda t, ex=ex: connection._task_done(ex, t))

    @property
    def _write_paused(self) -> bool:
        """True while ``drain()`` would wait: more than STREAM_HIGH_WATER bytes queued on the
        stream (its window is shut), or the socket's write buffer full."""
        connection = self.connection
        return connection._write_paused or \
            connection.proto.pending(self.exchange.stream_id) > STREAM_HIGH_WATER

    def on_drained(self, callback: Callable[[Optional[BaseException]], None]) -> None:
        """``drain()`` for a callback-level app: ``callback(None)`` once the stream may take
        more (at once when it may), ``callback(error)`` when it is gone first or, as in
        ``drain()``, when no byte could go out for ``send_timeout`` (the stream is reset)."""
        ex, connection = self.exchange, self.connection
        if ex._gone():
            callback(closed_error())
            return
        if not self._write_paused:
            callback(None)
            return
        loop = connection.loop
        w = ex._drain_waiter = loop.create_future()
        connection._drain_waiting.add(ex)
        timeout = connection.settings.send_timeout
        timer = loop.call_later(timeout, _expire, w) if timeout and timeout > 0 else None

        def woke(f: "asyncio.Future[Any]") -> None:
            if ex._drain_waiter is w:
                ex._drain_waiter = None
            connection._drain_waiting.discard(ex)
            if timer is not None:
                timer.cancel()
            err = closed_error() if f.cancelled() else f.exception()
            if err is None and f.result() is False:
                connection._reset_stream(ex.stream_id, h2p.CANCEL)
                err = Error(ErrorType.WriteTimedout, ErrorSource.Downstream, None,
                            f"the client took nothing for {timeout}s")
            callback(err)
        w.add_done_callback(woke)


class H2Exchange(RequestBody):
    """One HTTP/2 stream: a request and its response, with ``http_app.Exchange``'s API."""

    __slots__ = ("conn", "h2conn", "stream_id", "head", "client_addr", "server_addr", "scheme",
                 "start_time", "status", "keep_alive", "head_sent", "finished", "resp_bytes",
                 "task", "_no_body", "_drain_waiter", "_reset", "_body_deadline",
                 "_body_timer") + RequestBody.BODY_SLOTS

    def __init__(self, h2conn: "H2Connection", head: RequestHead, start_time: float) -> None:
        self.h2conn = h2conn
        self.stream_id = head.stream_id
        self.conn = StreamHandle(h2conn, self)
        self.head = head
        self.client_addr = h2conn.client_addr
        self.server_addr = h2conn.server_addr
        self.scheme = h2conn.scheme
        self.start_time = start_time
        self.status = 0
        self.keep_alive = True
        self.head_sent = False
        self.finished = False
        self.resp_bytes = 0
        self.task: Optional[asyncio.Task[Any]] = None
        self._no_body = False
        self._drain_waiter: Optional[asyncio.Future[None]] = None
        self._reset = False
        self._init_body(head)
        self._body_deadline = 0.0
        self._body_timer: Optional[asyncio.TimerHandle] = None
        timeout = h2conn.settings.body_read_timeout
        if not self._body_done and timeout and timeout > 0:
            # The stream's body, as HTTP/1's: each piece within body_read_timeout
            self._body_deadline = h2conn.loop.time() + timeout
            self._body_timer = h2conn.loop.call_at(self._body_deadline, self._body_check)

    # ------------------------------------------------------------------ request body
    # (read_body, read_full_body, body_done, _end: see RequestBody)
    def _took(self, n: int) -> None:
        self.h2conn._consumed(self.stream_id, n)  # the window goes back as the body is read

    def _send_continue(self) -> None:
        self.h2conn.proto.send_informational(self.stream_id, 100)
        self.h2conn._schedule_flush()
        if self._body_timer is not None:  # the client sends only from now on
            self._body_deadline = self.h2conn.loop.time() + self.h2conn.settings.body_read_timeout

    def _feed(self, data: bytes) -> None:
        self.req_bytes += len(data)
        if self._body_timer is not None:  # (the timer itself moves only when it fires)
            self._body_deadline = self.h2conn.loop.time() + self.h2conn.settings.body_read_timeout
        if self.finished:
            self.h2conn._consumed(self.stream_id, len(data))  # nobody will read it
            return
        self._chunks.append(data)
        self._buffered += len(data)
        self._wake()

    def _end(self, trailers: Optional[Headers]) -> None:
        self._stop_body_timer()
        super()._end(trailers)

    def _stop_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_check(self) -> None:
        """The body timer: no DATA on this stream for ``body_read_timeout`` (nginx's
        client_body_timeout). Not the client's fault while the handler has not read what came
        (the window is then shut by us) or the client waits for our 100: wait again. Else
        408 when no response started, a reset stream when one did."""
        self._body_timer = None
        if self.finished or self._body_done or self._reset or self.h2conn.closed:
            return
        loop, timeout = self.h2conn.loop, self.h2conn.settings.body_read_timeout
        now = loop.time()
        if self._buffered or self._continue_pending:
            self._body_deadline = now + timeout
        if now < self._body_deadline:
            self._body_timer = loop.call_at(self._body_deadline, self._body_check)
            return
        self._fail(Error(ErrorType.ReadTimedout, ErrorSource.Downstream, None,
                         "request body timed out"))
        if self.head_sent:
            self.h2conn._reset_stream(self.stream_id, h2p.CANCEL)
        else:
            self.respond_error(408)

    def _fail(self, err: Error) -> None:
        self._stop_body_timer()
        self._fail_body(err)
        self._wake_drain(err)

    def _wake_drain(self, err: Optional[Error] = None) -> None:
        w = self._drain_waiter
        if w is not None and not w.done():
            if err is None:
                w.set_result(None)
            else:
                w.set_exception(err)

    # ------------------------------------------------------------------ response
    def _gone(self) -> bool:
        """The stream was reset (by either side) or the connection is closed."""
        return self._reset or self.h2conn.closed

    def write_informational(self, status: int, headers: Optional[Headers] = None) -> None:
        """Forward a 1xx (103 Early Hints, ...) before the final response."""
        if self.head_sent or status in (100, 101) or not 100 < status < 200 or self._gone():
            return
        self.h2conn.proto.send_informational(self.stream_id, status,
                                             h2p.response_fields(headers or ()))
        self.h2conn._schedule_flush()

    def write_head(self, status: int, headers: Headers, reason: Optional[bytes | str] = None,
                   end: bool = False, hold: bool = False) -> None:
        """Send the response head (``reason`` has no place in HTTP/2 and is ignored).
        Connection-specific fields are dropped, names lower-cased. ``end``: no body.
        ``hold`` (HTTP/1's: keep the head for the body's first write) changes nothing here:
        every frame of a loop iteration goes out in one write anyway."""
        if self.head_sent:
            raise RuntimeError("response head already sent")
        if self._gone():
            raise closed_error()
        if status == 101 or status < 200 or status > 999:
            raise RuntimeError(f"{status} is no final HTTP/2 response status (no upgrades; "
                               "1xx through write_informational)")
        # The fields first: headers a phase broke raise here with nothing sent, and the
        # stream still gets its 500 (as HTTP/1's Exchange.write_head).
        fields = h2p.response_fields(headers, drop_length=status == 204)
        self.head_sent = True
        self.status = status
        self._continue_pending = False
        no_body = self.head.method == b"HEAD" or status == 204 or status == 304
        self._no_body = no_body
        self.h2conn.proto.send_head(self.stream_id, status, fields, end or no_body)
        self.h2conn._schedule_flush()
        if end:
            self._finish()

    def write_body(self, data: bytes) -> None:
        """Queue a piece of the body. Raises Error (Downstream, ConnectionClosed) when the
        stream or the connection is gone, so pumps stop."""
        if self.finished:
            raise RuntimeError("response already finished")
        if not self.head_sent:
            raise RuntimeError("response body before its head: write the head first")
        if not data or self._no_body:
            return
        if self._gone():
            raise closed_error()
        self.resp_bytes += len(data)
        self.h2conn.proto.send_body(self.stream_id, data)
        self.h2conn._schedule_flush()

    async def drain(self) -> None:
        """Wait while this stream has more than STREAM_HIGH_WATER bytes queued (its window is
        closed) or the socket's write buffer is full. Raises Error when the stream is gone,
        or when no byte could go out for ``send_timeout`` (the client keeps the stream's
        window shut): the stream is then reset (CANCEL), as nginx's send_timeout would."""
        conn = self.h2conn
        timeout = conn.settings.send_timeout
        while True:
            if self._gone():
                raise closed_error()
            if conn.proto.pending(self.stream_id) <= STREAM_HIGH_WATER and not conn._write_paused:
                return
            w = self._drain_waiter = conn.loop.create_future()
            conn._drain_waiting.add(self)
            timer = conn.loop.call_later(timeout, _expire, w) if timeout and timeout > 0 \
                else None
            try:
                woke = await w
            finally:
                self._drain_waiter = None
                conn._drain_waiting.discard(self)
                if timer is not None:
                    timer.cancel()
            if woke is False:
                conn._reset_stream(self.stream_id, h2p.CANCEL)
                raise Error(ErrorType.WriteTimedout, ErrorSource.Downstream, None,
                            f"the client took nothing for {timeout}s")

    def write_end(self, trailers: Optional[Headers] = None) -> None:
        """End the response (with trailers: gRPC) once the queued body is out."""
        if self.finished:
            return
        if not self._gone() and not self._no_body:
            self.h2conn.proto.send_end(self.stream_id,
                                       h2p.response_fields(trailers) if trailers else None)
            self.h2conn._schedule_flush()
        self._finish()

    def respond(self, status: int, headers: Optional[Headers] = None, body: bytes = b"",
                reason: Optional[bytes | str] = None) -> None:
        """A whole response at once (``Content-Length`` is set from ``body``)."""
        if headers is None:
            headers = Headers()
        if b"content-length" not in headers and status != 204 and status != 304:
            headers.add(b"Content-Length", str(len(body)).encode())
        if not body:
            self.write_head(status, headers, reason, end=True)
            return
        self.write_head(status, headers, reason)
        if not self._no_body:
            self.resp_bytes += len(body)
            self.h2conn.proto.send_body(self.stream_id, body, end=True)
        self._finish()

    def respond_prebuilt(self, status: int, head: bytes, body: bytes) -> None:
        """Fast path for fixed answers: ``head`` is an HTTP/1 status line and fields (the
        static service's), turned into HTTP/2 fields once and cached."""
        if self.head_sent:
            raise RuntimeError("response head already sent")
        if self._gone():
            return
        self.head_sent = True
        self.status = status
        self._continue_pending = False
        proto = self.h2conn.proto
        fields = _parse_prebuilt(head)
        if body and self.head.method != b"HEAD":
            self.resp_bytes = len(body)
            proto.send_head(self.stream_id, status, fields, False)
            proto.send_body(self.stream_id, body, end=True)
        else:
            proto.send_head(self.stream_id, status, fields, True)
        self.h2conn._schedule_flush()
        self._finish()

    def flush_head(self) -> None:
        """(HTTP/1's ``write_head(hold=True)`` counterpart: nothing is held here.)"""

    def may_write_whole(self) -> bool:
        """True when a whole upstream response may go out through ``write_whole``: the
        answer to a GET, no head sent yet (as ``http_app.Exchange.may_write_whole``)."""
        return not self.head_sent and self.head.method == b"GET"

    def write_whole(self, status: int, head: bytes, body: Union[bytes, memoryview]) -> None:
        """Send a complete upstream response -- ``head``, an HTTP/1 status line and fields
        with its Content-Length and no hop-by-hop field (``h1_splice.take_whole``'s), and
        ``body`` -- and end the exchange; only after ``may_write_whole`` said True."""
        if self._gone():
            self._finish()  # (nothing can go out; the books are closed as for any end)
            return
        self.respond_prebuilt(status, head, body if body.__class__ is bytes else bytes(body))

    def respond_error(self, status: int) -> None:
        """An empty-bodied error (``Cache-Control: private, no-store``), or a stream reset
        when a response head was already sent (a truncated response must not look whole)."""
        if self.finished:
            return
        if self.head_sent or status <= 0:
            self.h2conn._reset_stream(self.stream_id, h2p.INTERNAL_ERROR)
            self._finish()
            return
        if status < 200 or status > 999:  # a 1xx is no final response, four digits no
            status = 500  # status at all (RFC 9110 15)
        self.head_sent = True
        self.status = status
        if not self._gone():
            self.h2conn.proto.send_head(self.stream_id, status, _ERROR_FIELDS, True)
            self.h2conn._schedule_flush()
        self._finish()

    def _finish(self) -> None:
        if not self.finished:
            self.finished = True
            if self._buffered:
                # Read no further: return what was buffered to the connection window.
                self.h2conn._consumed(self.stream_id, self._buffered)
                self._buffered = 0
                self._chunks.clear()
            self.h2conn._exchange_done(self)

    def tunnel(self) -> Any:
        raise RuntimeError("HTTP/2 streams cannot be upgraded")
