"""The downstream HTTP/2 connection: an asyncio Protocol driving ``protocols.h2.H2Server``.

One :class:`H2Connection` per socket that speaks HTTP/2 (ALPN ``h2`` over TLS, or h2c prior
knowledge; ``services/h2_dispatch.py`` chooses). Every stream becomes an :class:`H2Exchange`
(``services/h2_exchange.py``) with the public API of ``http_app.Exchange`` (head,
``read_body``, ``write_head``, ``write_body``, ``drain``, ``write_end``, ``respond``,
``respond_prebuilt``, ``respond_error``, trailers), so the same :class:`HttpApp` (static
service, proxy engine, every ProxyHttp phase) serves HTTP/1 and HTTP/2 unchanged. What it
guarantees:

- back-pressure: request body bytes are acknowledged (WINDOW_UPDATE) only when the app reads
  them, so a slow reader stops the client, not our memory; ``drain()`` waits while the
  stream's queued response bytes exceed what its flow-control window lets out, or while the
  socket's write buffer is full (reading from the socket pauses then, too);
- limits and abuse handling of ``H2Server`` (concurrent streams, header list size, resets,
  CONTINUATION floods);
- ``close_when_idle()`` (worker draining): GOAWAY, in-flight streams finish, then close;
- a client resetting a stream cancels its handler (like a client closing an HTTP/1 socket).
"""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Optional

from pyngora import log
from pyngora.errors import Error, ErrorSource, ErrorType
from pyngora.protocols import h2 as h2p
from pyngora.protocols.events import (ConnectionClosed, Data, MessageEnd, RequestHead,
                                      StreamReset)
from pyngora.services.base import ConnectionTracker, RefusedRequest, report_refused
# H2Exchange and StreamHandle are re-exported: they lived here before they got their own module.
from pyngora.services.h2_exchange import STREAM_HIGH_WATER, H2Exchange, StreamHandle, closed_error
from pyngora.services.http_exchange import request_clock
from pyngora.services.http_app import LINGER_SECONDS, HttpApp, HttpSettings, error_status_of
from pyngora.services.send_timeout import SendWatch

__all__ = ["H2Connection", "H2Exchange", "StreamHandle", "h2_limits"]

_LINGER_TICK = 0.25  # how often a lingering close looks at its write buffer

# How long the graceful GOAWAY waits for the PING's ACK before the final GOAWAY.
SHUTDOWN_PING_SECONDS = 1.0


def h2_limits(settings: HttpSettings, **overrides: Any) -> h2p.H2Limits:
    """H2Limits from a service's HttpSettings (header and body limits carry over)."""
    pl = settings.parser_limits
    kw: dict[str, Any] = {"max_header_list_size": getattr(pl, "max_header_bytes", 65536),
                          "max_body_bytes": getattr(pl, "max_body_bytes", None),
                          "max_concurrent_streams": settings.h2_max_concurrent_streams}
    kw.update(overrides)
    return h2p.H2Limits(**kw)


class H2Connection(asyncio.Protocol):
    """An HTTP/2 server connection (built by ``h2_dispatch``; ``initial`` = bytes already
    read by the dispatcher, the client preface included)."""

    __slots__ = ("loop", "app", "settings", "tracker", "metrics", "scheme", "transport", "proto",
                 "client_addr", "server_addr", "closed", "_streams", "_write_paused",
                 "_read_paused", "_drain_waiting", "_flush_scheduled", "_timer",
                 "_draining", "_initial", "_send_watch", "_linger")

    def __init__(self, app: HttpApp, settings: HttpSettings,
                 tracker: Optional[ConnectionTracker] = None, scheme: str = "https",
                 metrics: Any = None, loop: Optional[asyncio.AbstractEventLoop] = None,
                 limits: Optional[h2p.H2Limits] = None, initial: bytes = b"") -> None:
        self.loop = loop or asyncio.get_event_loop()
        self.app = app
        self.settings = settings
        self.tracker = tracker
        self.metrics = metrics
        self.scheme = scheme
        self.transport: Optional[asyncio.Transport] = None
        self.proto = h2p.H2Server(limits or h2_limits(settings))
        self.client_addr: Any = None
        self.server_addr: Any = None
        self.closed = False
        self._streams: dict[int, H2Exchange] = {}
        self._write_paused = False
        self._read_paused = False
        self._drain_waiting: set[H2Exchange] = set()
        self._flush_scheduled = False
        self._timer: Optional[asyncio.TimerHandle] = None
        self._draining = False
        self._initial = initial
        self._send_watch: Optional[SendWatch] = None  # made on the first pause_writing
        # Lingering close (see _close_lingering): [started, buffer empty since (or 0.0)].
        self._linger: Optional[list[float]] = None

    # ------------------------------------------------------------------ asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.client_addr = transport.get_extra_info("peername")
        self.server_addr = transport.get_extra_info("sockname")
        if self.metrics is not None:
            self.metrics.connection_opened()
        self.proto.initiate()
        self._flush()
        # The first request must come within the header timeout, later ones within the
        # keep-alive timeout (both re-armed whenever the connection goes idle).
        self._arm(self.settings.header_read_timeout)
        if self.tracker is not None:
            self.tracker.add(self)  # may call close_when_idle at once (draining worker)
        initial, self._initial = self._initial, b""
        if initial:
            self.data_received(initial)

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.closed = True
        self._cancel_timer()
        if self._send_watch is not None:
            self._send_watch.resumed()
        if self.tracker is not None:
            self.tracker.discard(self)
        if self.metrics is not None:
            self.metrics.connection_closed()
        err = closed_error("downstream connection closed")
        for ex in list(self._streams.values()):
            self._stream_gone(ex, err)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        events = self.proto.feed(data)
        for ev in events:
            if self.closed:
                break  # a fatal error closed us while handling earlier events
            cls = ev.__class__
            if cls is Data:
                ex = self._streams.get(ev.stream_id)
                if ex is not None:
                    ex._feed(ev.data)
                else:
                    self.proto.consumed(ev.stream_id, len(ev.data))
            elif cls is RequestHead:
                self._start(ev)
            elif cls is MessageEnd:
                ex = self._streams.get(ev.stream_id)
                if ex is not None:
                    ex._end(ev.trailers)
            elif cls is StreamReset:
                ex = self._streams.get(ev.stream_id)
                if ex is not None:
                    self._stream_gone(ex, closed_error("client reset the stream"))
            elif cls is h2p.RequestRejected:
                self._rejected(ev)
            elif cls is ConnectionClosed:
                if not self.proto.closed:
                    self._draining = True  # the client's graceful GOAWAY
        self._flush()

    def eof_received(self) -> Optional[bool]:
        # A half-closed HTTP/2 client cannot send WINDOW_UPDATE or new requests: finish now.
        return None

    def pause_writing(self) -> None:
        self._write_paused = True
        # Control frames (PING/SETTINGS ACKs, RSTs) are produced by what we read: stop
        # reading while the client is not reading either.
        self._pause_reading()
        # A client that takes nothing lets its streams (and their upstreams) go with the
        # connection, also one already closing (after a GOAWAY, an idle timeout, a drain),
        # whose close() would wait for the buffer for ever.
        watch = self._send_watch
        if watch is None:
            watch = self._send_watch = SendWatch(self.loop, self.settings.send_timeout,
                                                 f"HTTP/2 client {self.client_addr}",
                                                 self._aborted)
        watch.paused(self.transport)

    def _aborted(self) -> None:
        self.closed = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._send_watch is not None:
            self._send_watch.resumed()
        self._resume_reading()
        self._wake_drains()

    # ------------------------------------------------------------------ draining
    def close_when_idle(self) -> None:
        """Graceful stop: GOAWAY (2^31-1 + PING, then the real last stream id); in-flight
        streams finish; the socket closes when none is left."""
        self._draining = True
        if self.closed:
            return
        self.proto.begin_shutdown()
        self.loop.call_later(SHUTDOWN_PING_SECONDS, self._final_goaway)
        self._flush()

    def _final_goaway(self) -> None:
        if not self.closed:
            self.proto.goaway()
            self._flush()

    def abort(self) -> None:
        """Close the socket now (fast stop)."""
        if self.transport is not None:
            self.transport.abort()
        self.closed = True

    # ------------------------------------------------------------------ streams
    def _start(self, head: RequestHead) -> None:
        self._cancel_timer()
        ex = H2Exchange(self, head, request_clock())
        self._streams[head.stream_id] = ex
        try:
            result: Optional[Awaitable[None]] = self.app.handle(ex)  # type: ignore[arg-type]
        except Exception as exc:  # the app failed synchronously
            self._app_failed(ex, exc)
            self._release(ex)
            return
        if result is not None:
            task = self.loop.create_task(result)  # type: ignore[arg-type]
            ex.task = task
            task.add_done_callback(lambda t, ex=ex: self._task_done(ex, t))
        elif ex.task is None:
            self._release(ex)  # answered synchronously (the static service)
        # else a callback-level app took the stream (the proxy's fast path, whose forwarder
        # is ex.task): its end (_exchange_done) or the task it hands over to releases it

    def _app_failed(self, ex: H2Exchange, exc: BaseException) -> None:
        if not (isinstance(exc, Error) and exc.source is ErrorSource.Downstream):
            log.ERROR.error("request handler failed: %s %s: %r", ex.head.method.decode("latin-1"),
                            ex.head.target.decode("latin-1"), exc, exc_info=exc)
        if not ex.finished:
            ex.respond_error(error_status_of(exc))

    def _task_done(self, ex: H2Exchange, task: "asyncio.Task[Any]") -> None:
        exc: Optional[BaseException] = None if task.cancelled() else task.exception()
        if exc is not None:
            self._app_failed(ex, exc)
        elif not ex.finished:
            if task.cancelled():
                ex.respond_error(0)
            else:
                if not ex.head_sent:
                    log.ERROR.error("request handler returned without a response: %s %s",
                                    ex.head.method.decode("latin-1"),
                                    ex.head.target.decode("latin-1"))
                ex.respond_error(500)
        self._release(ex)
        self._schedule_flush()

    def _release(self, ex: H2Exchange) -> None:
        """The handler is done: the stream no longer counts against the concurrency limit."""
        if self._streams.pop(ex.stream_id, None) is not None:
            self.proto.release(ex.stream_id)
            if not self._streams:
                self._arm(self.settings.keepalive_timeout)
        self._maybe_close()

    def _exchange_done(self, ex: H2Exchange) -> None:
        """The stream's response is complete (or given up)."""
        if self.metrics is not None:
            self.metrics.request_done(ex.status, request_clock() - ex.start_time,
                                      ex.req_bytes, ex.resp_bytes)
        if ex.task is None:
            # No request task will end: a synchronous answer, or a callback-level app's.
            self._release(ex)

    def _stream_gone(self, ex: H2Exchange, err: Error) -> None:
        """The client reset the stream or the connection closed: fail reads and drains, and
        cancel a handler still working on it (its cleanup closes the upstream it used)."""
        ex._reset = True
        ex._fail(err)
        if ex._buffered:
            self.proto.consumed(ex.stream_id, ex._buffered)
            ex._buffered = 0
            ex._chunks.clear()
        if ex.task is not None and not ex.task.done():
            if not ex.finished:
                ex.task.cancel()  # _task_done releases it
        else:
            if not ex.finished:
                ex.finished = True
                if self.metrics is not None:
                    self.metrics.request_done(0, request_clock() - ex.start_time,
                                              ex.req_bytes, ex.resp_bytes)
            self._release(ex)

    def _rejected(self, ev: h2p.RequestRejected) -> None:
        ex = self._streams.get(ev.stream_id)
        if ex is not None:
            # The body was refused (413) or its trailers malformed (400): the handler sees an
            # Error from read_body and answers (or the stream is reset already).
            if ev.error_code:
                ex._reset = True  # the protocol reset the stream itself
            ex._fail(Error(ErrorType.BodyTooLarge if ev.status == 413 else
                           ErrorType.InvalidHTTPHeader, ErrorSource.Downstream, None,
                           ev.reason, status=ev.status or 400))
        elif ev.status:
            if self.metrics is not None:
                self.metrics.request_done(ev.status, 0.0, 0, 0)
            # An access line for the answer the protocol sent for headers it refused (no
            # error code; no body byte taken: a 413 for body bytes that came after the app
            # released its stream sent nothing, the app's own answer has its line).
            if log._access_on and not ev.error_code:
                s = self.proto.streams.get(ev.stream_id)
                if s is None or not s.body_bytes:
                    report_refused(self.app, RefusedRequest(self.client_addr, None, "HTTP/2",
                                                            ev.status, 0.0, ev.reason))

    def _reset_stream(self, sid: int, code: int) -> None:
        self.proto.reset(sid, code)
        ex = self._streams.get(sid)
        if ex is not None:
            ex._reset = True
            ex._wake_drain(closed_error("stream reset"))
        self._schedule_flush()

    def _consumed(self, sid: int, n: int) -> None:
        self.proto.consumed(sid, n)
        self._schedule_flush()

    # ------------------------------------------------------------------ output
    def _schedule_flush(self) -> None:
        """Write what the protocol queued at the end of this loop iteration: one write for
        all the frames the handlers produced meanwhile."""
        if not self._flush_scheduled and not self.closed:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.closed or self.transport is None:
            return
        data = self.proto.data_to_send()
        if data:
            self.transport.write(data)
        if self._drain_waiting:
            self._wake_drains()
        self._maybe_close()

    def _wake_drains(self) -> None:
        if self._write_paused:
            return
        proto = self.proto
        for ex in list(self._drain_waiting):
            if proto.pending(ex.stream_id) <= STREAM_HIGH_WATER or ex._gone():
                ex._wake_drain()

    def _maybe_close(self) -> None:
        """Close the socket when the protocol is over: a fatal error, or draining with no
        stream left after the final GOAWAY (sent at once when no PING is outstanding)."""
        proto = self.proto
        if self.closed:
            return
        if not proto.closed:
            if not (self._draining and not self._streams and proto.is_idle()):
                return
            if not proto.goaway_sent:
                if proto.shutting_down:
                    return  # waiting for the PING's ACK (or _final_goaway's timer)
                proto.goaway()
            if not proto.closed:
                return
        data = proto.data_to_send()
        t = self.transport
        if t is not None:
            if data:
                t.write(data)
            self.closed = True
            self._cancel_timer()
            self._close_lingering(t)

    def _close_lingering(self, t: Any) -> None:
        """FIN once what is buffered is written, then read (and discard) until the client's
        EOF: Linux answers a close with unread input by a reset that destroys what the
        client had not read yet, and an HTTP/2 client keeps sending WINDOW_UPDATEs while it
        reads the end of a response (HTTP/1's _linger, for the same reason). Bounded:
        LINGER_SECONDS once everything is written, send_timeout in all."""
        try:
            if not t.can_write_eof():  # TLS: its close_notify, no half-close
                t.close()
                return
            t.write_eof()  # libuv shuts the socket down once the buffer is written
            if self._read_paused:
                self._read_paused = False
                t.resume_reading()
        except (OSError, RuntimeError):
            t.close()
            return
        now = self.loop.time()
        self._linger = [now, 0.0]
        self._timer = self.loop.call_later(_LINGER_TICK, self._linger_tick)

    def _linger_tick(self) -> None:
        self._timer = None
        t, linger = self.transport, self._linger
        if t is None or linger is None:
            return
        now = self.loop.time()
        if t.get_write_buffer_size():
            linger[1] = 0.0
        elif not linger[1]:
            linger[1] = now
        limit = self.settings.send_timeout or LINGER_SECONDS
        if (linger[1] and now - linger[1] >= LINGER_SECONDS) or now - linger[0] >= limit:
            if t.get_write_buffer_size():
                t.abort()  # a client that stopped reading: nothing more will be written
            else:
                t.close()
            return
        self._timer = self.loop.call_later(_LINGER_TICK, self._linger_tick)

    # ------------------------------------------------------------------ timers and reading
    def _arm(self, delay: Optional[float]) -> None:
        self._cancel_timer()
        if delay and delay > 0 and not self.closed:
            self._timer = self.loop.call_later(delay, self._on_idle_timeout)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_idle_timeout(self) -> None:
        self._timer = None
        if not self._streams:
            self._draining = True
            self.proto.goaway()
            self._flush()

    def _pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None and not self.closed:
            self._read_paused = True
            try:
                self.transport.pause_reading()
            except (RuntimeError, AttributeError):
                pass

    def _resume_reading(self) -> None:
        if self._read_paused and self.transport is not None and not self.closed:
            self._read_paused = False
            try:
                self.transport.resume_reading()
            except (RuntimeError, AttributeError):
                pass
