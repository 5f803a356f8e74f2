"""The downstream HTTP/1 connection: an asyncio Protocol driving ``h1.RequestParser``.

One :class:`H1Connection` per accepted socket. It parses requests (httptools callbacks only
collect; events come back from ``feed``), hands each request to an :class:`HttpApp` as an
:class:`Exchange`, and writes the app's response with the right framing. What it guarantees:

- keep-alive and pipelining: responses go out strictly in request order; events of later
  requests are held (and reading paused) until the current response is finished;
- a header read timeout (408) armed per request, and an idle keep-alive timeout (silent close);
- a malformed request gets its status (400/413/431) with an empty body, ``Cache-Control:
  private, no-store`` and ``Connection: close``, then the connection closes (the app's
  ``log_refused`` writes its access line);
- back-pressure both ways: reading pauses while the app has not taken ~256 KiB of request body
  (or while the transport's write buffer is above its high-water mark and requests wait);
  ``Exchange.drain()`` waits while the write buffer is full;
- ``Expect: 100-continue``: ``100 Continue`` is sent when the app first reads the body;
- upgrades: after a ``101`` the app takes the raw byte stream as a :class:`Tunnel`.

``HttpApp.handle(exchange)`` is called once per request and may return an awaitable (run as a
task) or ``None`` (answered synchronously, as the static service does).
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Callable, Optional

from pyngora import log
from pyngora.errors import Error, ErrorSource, ErrorType
from pyngora.protocols import h1, h1_refused
from pyngora.protocols.events import Data, MessageEnd, RequestHead
from pyngora.services.base import ConnectionTracker, RefusedRequest, report_refused
from pyngora.services.half_close import send_fin
from pyngora.services.lazy_timer import LazyTimer
from pyngora.services.http_exchange import (  # noqa: F401 - re-exported
    BODY_HIGH_WATER,
    BODY_LOW_WATER,
    Exchange,
    HttpApp,
    HttpSettings,
    LINGER_SECONDS,
    Tunnel,
    _P_BODY,
    _P_PIPELINE,
    _P_TUNNEL,
    _P_WRITE,
    _S_ACTIVE,
    _S_CLOSING,
    _S_HEAD,
    _S_IDLE,
    _closed_error,
    _downstream_error,
    error_response,
    error_status_of,
    request_clock,
    status_line)
from pyngora.services.http_service import HttpService  # noqa: F401 - re-exported
from pyngora.services.send_timeout import SendWatch

__all__ = ["HttpApp", "HttpSettings", "Exchange", "Tunnel", "H1Connection", "HttpService",
           "error_status_of"]

# Pipelined requests started in one turn of the loop before the connection yields to the
# others (reading paused meanwhile): one client's pipeline cannot hold the worker.
PIPELINE_BATCH = 16
# How long a draining worker keeps an idle keep-alive connection open for a request already on
# its way (see close_when_idle); a drain ends that much later at most.
DRAIN_IDLE_SECONDS = 1.0


class H1Connection(LazyTimer, asyncio.Protocol):
    """An HTTP/1.x server connection. Created by ``HttpService.protocol_factory`` per socket."""

    __slots__ = ("loop", "app", "settings", "tracker", "metrics", "scheme", "transport",
                 "parser", "client_addr", "server_addr", "closed", "_state", "_exchange",
                 "_body_open", "_discarding", "_pending", "_pumping", "_paused",
                 "_write_paused", "_drain_waiters", "_requests", "_draining",
                 "_tunnel", "_upgrade_head", "_upgrade_buf", "_eof", "_broken", "_send_watch",
                 "_express")

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
        self._init_timer()
        self._requests = 0
        self._draining = False
        self._tunnel: Optional[Tunnel] = None
        self._upgrade_head = False   # the parser stopped at an upgrade request
        self._upgrade_buf: list[bytes] = []  # bytes after it, until the app takes the tunnel
        self._eof = False
        self._broken = False         # a protocol error was seen: parse nothing more
        self._send_watch: Optional[SendWatch] = None  # made on the first pause_writing
        self._express = app.express

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
        # Break the reference cycles of a closed connection (transport <-> protocol, parser
        # <-> llhttp's callbacks) so it is freed at once, not by the garbage collector, whose
        # full collections are latency spikes under connection churn.
        self.transport = None
        self.parser.release()
        self._drop_timer()
        if self._send_watch is not None:
            self._send_watch.resumed()
        if self.tracker is not None:
            self.tracker.discard(self)
        if self.metrics is not None:
            self.metrics.connection_closed()
        # The error is made only for someone to receive it: a churned connection that ended
        # between requests (most of them) has nobody.
        err: Optional[Error] = None
        if self._drain_waiters:
            err = _closed_error()
            for w in self._drain_waiters:
                if not w.done():
                    w.set_exception(err)
            self._drain_waiters.clear()
        if self._tunnel is not None:
            self._tunnel._on_eof()
        ex = self._exchange
        if ex is not None and not ex.finished:
            ex._fail(err or _closed_error())
            # A handler still waiting (on its upstream, say) is cancelled: its cleanup closes
            # the upstream connection instead of pooling it (the response was cut short).
            if ex.task is not None and not ex.task.done() and self._tunnel is None:
                ex.task.cancel()

    def data_received(self, data: bytes) -> None:
        state = self._state
        # The express lane: only between requests, with nothing held back (a paused write
        # buffer holds requests back) and nothing but HTTP on the connection.
        if (state == _S_IDLE and self._express is not None and not self._write_paused
                and not self._pending and not self._upgrade_head and self._tunnel is None
                and not self._broken and self._express.take(self, data)):
            return
        if state == _S_CLOSING or self._broken:
            return  # lingering close, or after a malformed request: discard
        if self._tunnel is not None or self._upgrade_head:
            self._tunnel_data(data)
            return
        if state == _S_IDLE:
            # The next request starts: from now on the header timeout applies.
            self._state = _S_HEAD
            self._arm(self.settings.header_read_timeout, self._on_header_timeout)
        elif self._body_open or self._discarding:
            # Body bytes: the body timeout starts over (nginx's client_body_timeout is
            # between two reads, not for the whole body).
            self._arm(self.settings.body_read_timeout, self._on_body_timeout)
        try:
            events = self.parser.feed(data)
        except h1.ProtocolError as exc:
            if log._access_on and hasattr(self.app, "log_refused"):  # (what came: made now)
                exc.refused = self._refused(exc.status, exc.reason, data if state == _S_IDLE
                                            and not exc.events else None)
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
        if self._upgrade_head and self._state != _S_CLOSING:
            return True  # the app may still take the tunnel (after a refusal: closing)
        # Idle, or lingering after the last response: close. With a request in flight, EOF
        # means the client gave up (nginx's "client prematurely closed connection"): closing
        # runs connection_lost, which cancels the handler so its upstream connection is
        # closed rather than left to finish for nobody.
        return None

    def pause_writing(self) -> None:
        self._write_paused = True
        # nginx's send_timeout: a client that takes nothing must not hold the connection,
        # and the upstream behind it, for ever
        watch = self._send_watch
        if watch is None:
            watch = self._send_watch = SendWatch(self.loop, self.settings.send_timeout,
                                                 f"client {self.client_addr}", self._aborted)
        watch.paused(self.transport)

    def _aborted(self) -> None:
        self.closed = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._send_watch is not None:
            self._send_watch.resumed()
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
            if self.parser.in_message:
                return  # a request in part read: answered (the header timeout bounds it)
            if self._state in (_S_IDLE, _S_HEAD):  # (_S_HEAD: only a stray CRLF came)
                # A busy keep-alive client sends its next request within a moment of the
                # last response: closing now would answer it with EOF or a reset (an attack
                # helper counted 100-280 of 300 clients per upgrade). Wait that moment; a
                # request that comes is answered with Connection: close.
                deadline = self._deadline
                grace = DRAIN_IDLE_SECONDS
                if deadline is None or deadline - self.loop.time() > grace:
                    self._arm(grace, self._close)
                return
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
        started = 0
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
                        if ex is not None and ex.head.body != "none":
                            self._cancel_timer()  # the body timeout (see _start)
                        if ex is None:
                            self._discarding = False
                            self._after_response()
                        elif not ex._body_done:  # (a body-less request's is done already)
                            ex._end(ev.trailers)
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
                if started:  # pipelined requests answered in this turn
                    if self.transport.is_closing():
                        # The client is gone (its reset made the transport drop our
                        # writes, so back-pressure never comes): answer no more.
                        pending.clear()
                        break
                    if started >= PIPELINE_BATCH:
                        self._pause(_P_PIPELINE)
                        self.loop.call_soon(self._pump)
                        break
                ev = pending.popleft()
                if ev.__class__ is RequestHead:
                    started += 1
                    self._start(ev)
                elif isinstance(ev, h1.ProtocolError):
                    pending.clear()
                    self._send_error(getattr(ev, "status", 400) or 400, ev)
        finally:
            self._pumping = False
        if pending and self._exchange is not None and not self._body_open:
            self._pause(_P_PIPELINE)
        elif self._paused & _P_PIPELINE and not pending:
            self._resume(_P_PIPELINE)

    def _start(self, head: RequestHead) -> None:
        self._cancel_timer()
        if head.body != "none":  # the whole body must come, each piece within the timeout
            self._arm(self.settings.body_read_timeout, self._on_body_timeout)
        self._state = _S_ACTIVE
        self._requests += 1
        ex = Exchange(self, head, request_clock())
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
            self.run_task(ex, result)
        elif result is not None:
            # Finished synchronously but returned a coroutine: run it to completion anyway.
            ex.task = self.loop.create_task(result)  # type: ignore[arg-type]

    def begin_known(self, head: RequestHead) -> Exchange:
        """The app's ``express`` took ``head``, a request it was offered before parsing
        (see ``HttpApp.express``): the exchange ``_start`` would make, without ``handle``."""
        self._deadline = None  # (_cancel_timer: the header timeout is over)
        self._state = _S_ACTIVE
        self._requests += 1
        ex = Exchange(self, head, request_clock())
        self._exchange = ex
        return ex

    def run_task(self, ex: Exchange, coro: Any) -> None:
        """Run ``coro`` as ``ex``'s request task: a failure answers 500 (or aborts after the
        head), a cancelled or unfinished one is cleaned up. ``handle`` returning an awaitable
        ends here; a callback-level app that took a request and then needs a coroutine after
        all (the proxy's fast path on an error) calls it itself."""
        task = self.loop.create_task(coro)
        ex.task = task
        task.add_done_callback(lambda t, ex=ex: self._task_done(ex, t))

    def on_drained(self, callback: Callable[[Optional[BaseException]], None]) -> None:
        """``drain()`` for a callback-level app: ``callback(None)`` once the write buffer is
        below its low-water mark (at once when it is), ``callback(error)`` when the connection
        closes first."""
        if self.closed:
            callback(_closed_error())
            return
        if not self._write_paused:
            callback(None)
            return
        waiter = self.loop.create_future()
        self._drain_waiters.append(waiter)
        waiter.add_done_callback(lambda f: callback(f.exception()))

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
            self.metrics.request_done(ex.status, request_clock() - ex.start_time,
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

    def _send_error(self, status: int, err: Optional[BaseException] = None) -> None:
        """An empty-bodied error without a request to hang it on: a malformed head (``err``,
        the parser's error) or the header timeout (408, no ``err``). Gets its access line."""
        self._write(error_response(status))
        if self.metrics is not None:
            self.metrics.request_done(status, 0.0, 0, 0)
        if log._access_on and hasattr(self.app, "log_refused"):
            report_refused(self.app, getattr(err, "refused", None) if err is not None
                           else self._refused(status, "request header timed out"))
        self._linger()

    def _refused(self, status: int, reason: str, data: Optional[bytes] = None) -> RefusedRequest:
        """A request refused now, as its access line sees it; its time runs from when its head
        began and armed the header timeout (0.0 with none: one pipelined behind a response)."""
        timeout, deadline, took = self.settings.header_read_timeout, self._deadline, 0.0
        if self._state == _S_HEAD and timeout:  # (no deadline: it ran out, the 408)
            took = timeout if deadline is None else max(self.loop.time() - deadline + timeout, 0)
        line = h1_refused.refused_line(self.parser, data)
        return RefusedRequest(self.client_addr, line, None, status, took, reason)

    def _on_body_timeout(self) -> None:
        """nginx's client_body_timeout: no byte of the request body (or of the rest of one
        being discarded) for ``body_read_timeout``. 408 when no response started, else the
        connection is closed; the handler's body read fails either way."""
        ex = self._exchange
        if self._paused & _P_BODY or (ex is not None and ex._continue_pending):
            # we stopped reading it (the app is slow), or the client waits for our 100
            self._body_expected()
            return
        if ex is not None and not ex.finished:
            ex.keep_alive = False
            ex._fail(Error(ErrorType.ReadTimedout, ErrorSource.Downstream, None,
                           "request body timed out"))
            ex.respond_error(408)  # (an abort when a response had started)
        else:
            self._close()

    def _body_expected(self) -> None:
        """The body timeout starts (over): body bytes may come from now on."""
        self._arm(self.settings.body_read_timeout, self._on_body_timeout)

    def _on_header_timeout(self) -> None:
        if self._exchange is None and self._state == _S_HEAD:
            self._send_error(408)

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
            if reason & _P_BODY and self._state == _S_ACTIVE and self._body_open:
                self._body_expected()  # the client gets the whole window again
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
            if t.get_write_buffer_size() or not send_fin(t):
                t.write_eof()  # libuv shuts the socket down once the buffer is written
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
