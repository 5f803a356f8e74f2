"""UpstreamConnection: one HTTP/1.1 client connection to an upstream (see ``connector.py``,
which dials and pools them and re-exports this class).

It is an ``asyncio.Protocol`` (callbacks, not streams: this is the hot path, and it runs under
uvloop). The sans-IO ``h1.ResponseParser`` turns bytes into events; the protocol queues them and
hands them out one by one with ``read_timeout`` between them (``read_event``), or to a
callback-level reader (``listen``, the proxy's fast path), which may also be offered a whole
plain response as bytes first (``first_bytes_to`` / ``take_whole``).

Back-pressure both ways: a transport whose write buffer is over its high-water mark makes
``drain()`` wait (``write_timeout``); more than ``HIGH_WATER`` bytes of unread body make the
protocol pause reading from the upstream until the session catches up (``LOW_WATER``). So a
slow client never makes the proxy buffer a fast upstream's whole response.

A pooled (idle) connection that receives any byte or EOF is removed from the pool and closed
at once: the upstream closed it, or is speaking out of turn, and either way a request sent on it
could fail after the fact.
"""
from __future__ import annotations

import asyncio
import socket
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from pyngora.errors import Error, ErrorSource, ErrorType
from pyngora.headers import Headers
from pyngora.protocols import h1
from pyngora.protocols.events import Data, Event, MessageEnd, ResponseHead
from pyngora.protocols.h1_splice import take_whole
from pyngora.upstreams.dial import WRITE_HIGH_WATER, WRITE_LOW_WATER
from pyngora.upstreams.h1_tunnel import UpstreamTunnel
from pyngora.upstreams.peer import HttpPeer

if TYPE_CHECKING:  # pragma: no cover
    from pyngora.upstreams.connector import Connector

__all__ = ["UpstreamConnection", "HIGH_WATER", "LOW_WATER"]

# Unread response bytes above which reading from the upstream pauses (below LOW_WATER it
# resumes): about nginx's proxy_buffers. A stalled HTTP/2 stream holds this and ~2 reads: with
# 256 KiB, 100 of them held ~47 MiB, with 64 KiB ~25 (tests/reliability/test_abuse_h2.py).
HIGH_WATER = 64 * 1024
LOW_WATER = 16 * 1024

_UP = ErrorSource.Upstream
# TCP_QUICKACK exists on Linux only (None elsewhere: the ACK timing is left to the kernel).
_QUICKACK: Optional[int] = getattr(socket, "TCP_QUICKACK", None)

def _on_wait_timeout(fut: asyncio.Future) -> None:
    """Timer callback: ends a wait with False (= timed out) unless something woke it first."""
    if not fut.done():
        fut.set_result(False)


class UpstreamConnection(UpstreamTunnel, asyncio.Protocol):
    """One HTTP/1.1 client connection to an upstream; used by one request at a time.

    ``reused`` says it came from the pool; ``response_bytes_seen`` that some byte of the current
    response arrived (after that, no retry is safe); ``stray_response`` that the first of those
    bytes on a reused connection were no status line (left over from the previous exchange); ``connect_duration`` how long dialling took
    (0.0 for a reused connection); ``pause_count`` how often reading was paused for back-pressure.
    """

    __slots__ = ("peer", "pool_key", "reused", "response_bytes_seen", "stray_response",
                 "connect_duration", "body_sending", "pause_count",
                 "transport", "_connector", "_loop", "_parser", "_events", "_raw", "_buffered",
                 "_waiter", "_drain_waiter", "_error", "_eof", "_closed", "_reading_paused",
                 "_write_paused", "_idle", "_head_seen", "_tunnel", "alpn",
                 "_deadline", "_timer", "_timer_when", "_listener", "_sock", "_acked",
                 "_sink")

    def __init__(self, peer: HttpPeer, connector: "Connector",
                 loop: asyncio.AbstractEventLoop) -> None:
        self.peer = peer
        # The pool's key for it (the peer's reuse_key, which a pooled connection keeps: it is
        # handed only to peers of the same key).
        self.pool_key = peer.reuse_key
        self.reused = False
        self.response_bytes_seen = False
        self.stray_response = False
        self.connect_duration = 0.0
        # The request body is still going up: read_timeout waits for it (see body_done).
        self.body_sending = False
        self.pause_count = 0
        self.alpn: Optional[str] = None  # the protocol the TLS upstream chose (None: plaintext)
        self.transport: Any = None
        self._connector = connector
        self._loop = loop
        self._parser = h1.ResponseParser()
        self._events: deque[Event] = deque()
        self._raw: deque[bytes] = deque()  # tunnel bytes (after a 101)
        self._buffered = 0  # unread body/tunnel bytes held in _events/_raw
        self._waiter: Optional[asyncio.Future] = None
        self._drain_waiter: Optional[asyncio.Future] = None
        self._error: Optional[Error] = None
        self._eof = False
        self._closed = False
        self._reading_paused = False
        self._write_paused = False
        self._idle = False
        self._head_seen = False
        self._tunnel = False
        # The read deadline of the current wait (loop time; None: no limit), and the one lazy
        # timer that enforces it. The timer is armed once and re-armed only when it fires
        # early (a later wait pushed the deadline back), so a keep-alive connection pays one
        # TimerHandle per read_timeout period, not a call_later + cancel per wait.
        self._deadline: Optional[float] = None
        self._timer: Optional[asyncio.TimerHandle] = None
        self._timer_when = 0.0
        # A callback-level reader (see listen()) instead of read_event's awaited future.
        self._listener: Optional[Callable[[bool], None]] = None
        # The TCP socket, for TCP_QUICKACK (None: a Unix socket, not Linux, or it failed), and
        # whether the current response already had its quick ACK (see _quickack).
        self._sock: Any = None
        self._acked = False
        # A callback offered the response's first bytes before the parser (see first_bytes_to).
        self._sink: Optional[Callable[[bytes], bool]] = None

    # --- asyncio.Protocol callbacks ----------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        if _QUICKACK is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                self._sock = sock

    def data_received(self, data: bytes) -> None:
        sink = self._sink
        if sink is not None:
            self._sink = None
            if sink(data):
                return  # taken whole (take_whole): the response has ended
        if self._idle:
            self._drop_idle()  # bytes nobody asked for: never reuse this connection
            return
        if self._tunnel or self._parser.upgraded:
            self._raw.append(data)
            self._buffered += len(data)
            self._after_input()
            return
        if not self.response_bytes_seen:
            self.response_bytes_seen = True
            if self.reused and not (data.startswith(b"HTTP/") or b"HTTP/".startswith(data)):
                # The first bytes after reuse are no status line: the tail of the previous
                # exchange (an origin that sent a body after a HEAD head, say), not this
                # response. The engine may retry an idempotent request on a new connection.
                self.stray_response = True
        try:
            events = self._parser.feed(data)
        except h1.ProtocolError as exc:
            self._queue(exc.events)
            self._fail_protocol(exc)
            return
        self._queue(events)
        if not self._acked and (not events or events[-1].__class__ is not MessageEnd):
            self._quickack()
        self._after_input()

    def eof_received(self) -> bool:
        if self._idle:
            self._drop_idle()
            return False
        self._eof = True
        if self._tunnel or self._parser.upgraded:
            self._wake()
            # Keep the write half open so the tunnel can finish sending (TLS cannot half-close).
            return not self.peer.tls
        try:
            self._queue(self._parser.feed_eof())
        except h1.ProtocolError as exc:
            self._queue(exc.events)
            if self.response_bytes_seen:
                self._set_error(Error(ErrorType.ConnectionClosed, _UP, exc,
                                      "upstream closed the connection mid-response"))
        self._wake()
        return False

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._closed = True
        self._cancel_timer()
        self._parser.release()  # llhttp's parser <-> ours: freed now, not by the collector
        self._sink = None  # (a bound method of the request reading this connection)
        if self._idle:
            self._unpool()
        if exc is not None and self._error is None:
            self._set_error(Error(ErrorType.ReadError, _UP, exc, "upstream connection lost",
                                  retry=self.reused and not self.response_bytes_seen))
        self._wake()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    # --- sending -----------------------------------------------------------------------------

    def send_head(self, method: bytes, target: bytes, headers: Headers,
                  version: bytes = b"1.1") -> None:
        """Write a request head; starts expecting the response to ``method``. Raises Error."""
        self.send_raw_head(method, h1.serialize_request_head(method, target, headers, version))

    def send_raw_head(self, method: bytes, head: bytes) -> None:
        """``send_head`` for a head already serialised (a client's own, sent on unchanged)."""
        if self._closed or self._eof or self._error is not None:
            raise self._dead_error()
        self._parser.start(method)
        self._acked = False
        self.transport.write(head)

    def send_and_listen(self, method: bytes, head: bytes, listener: Callable[[bool], None],
                        timeout: Optional[float], sink: Callable[[bytes], bool]) -> bool:
        """For the proxy's express lane: when the connection is still ``untouched``,
        ``send_raw_head``, ``listen`` and ``first_bytes_to`` in one call, and True; else
        False, and nothing sent."""
        if not self.untouched():
            return False
        self._parser.start(method)
        self._acked = False
        self.transport.write(head)
        self._listener = listener
        self._sink = sink
        if timeout:
            self._arm_deadline(self._loop.time() + timeout)
        else:
            self._deadline = None
        return True

    def relisten(self, callback: Callable[[bool], None]) -> None:
        """Hand the current wait to another listener; its deadline stays as it is."""
        self._listener = callback

    def send_body(self, data: bytes, chunked: bool) -> None:
        """Write a piece of request body (as a chunk when ``chunked``). Raises Error if closed."""
        if not data:
            return  # an empty chunk would end a chunked body
        if self._closed:
            raise self._dead_error()
        self.transport.write(h1.encode_chunk(data) if chunked else data)

    def send_end(self, chunked: bool, trailers: Optional[Headers] = None) -> None:
        """End the request body: the last chunk (with ``trailers``) when chunked, else nothing."""
        if chunked:
            if self._closed:
                raise self._dead_error()
            self.transport.write(h1.encode_last_chunk(trailers))

    async def drain(self) -> None:
        """Wait until the write buffer is below its low-water mark.

        Returns at once when it is not paused. Raises Error(WriteTimedout) after
        ``write_timeout``, or the connection's error if it closed meanwhile.
        """
        if self._closed:
            raise self._dead_error()
        if not self._write_paused:
            return
        fut = self._loop.create_future()
        self._drain_waiter = fut
        timeout = self.peer.options.write_timeout
        handle = self._loop.call_later(timeout, _on_wait_timeout, fut) if timeout else None
        try:
            woke = await fut
        finally:
            self._drain_waiter = None
            if handle is not None:
                handle.cancel()
        if not woke:
            err = Error(ErrorType.WriteTimedout, _UP, None,
                        f"writing to {self.peer.address} timed out after {timeout}s")
            self._set_error(err)
            raise err
        if self._closed:
            raise self._dead_error()

    # --- receiving ---------------------------------------------------------------------------

    async def read_event(self) -> Event:
        """The next response event: InformationalResponse, ResponseHead, Data or MessageEnd.

        Waits at most ``read_timeout`` for each (Error ReadTimedout, answered 504). Raises
        Error ConnectionClosed (retry=self.reused) if the upstream closed before any byte of
        the response, and InvalidHTTPHeader/H1Error for a response the parser refuses.
        """
        # Not a busy loop: each turn returns, raises, or awaits a wake-up, which comes only
        # with a new event, EOF, an error or close (a partial head wakes nobody, so a
        # dribbling upstream cannot stretch read_timeout indefinitely).
        while True:
            event = self.next_event_nowait()
            if event is not None:
                return event
            if self._parser.upgraded:
                raise Error(ErrorType.InternalError, ErrorSource.Internal, None,
                            "read_event after the response was upgraded (use into_tunnel)")
            if not await self._wait(None if self.body_sending else self.peer.options.read_timeout):
                raise self._read_timeout()

    def body_done(self) -> None:
        """The request body is sent (or its sending stopped): read_timeout runs from now, as
        nginx's proxy_read_timeout starts once the request is sent. A slow but steady upload
        is bounded by write_timeout per blocked write, not by read_timeout as a whole."""
        self.body_sending = False
        fut = self._waiter
        if fut is not None and not fut.done():
            fut.set_result(True)  # read_event waits again, with its timeout

    def poll_event(self) -> Optional[Event]:
        """The next response event if one is already queued, else None (then call
        read_event, which waits). Never raises: errors and EOF are read_event's to report."""
        events = self._events
        if not events:
            return None
        event = events.popleft()
        if event.__class__ is Data:
            self._buffered -= len(event.data)  # type: ignore[union-attr]
            if self._reading_paused and self._buffered <= LOW_WATER:
                self._resume_reading()
        return event

    def next_event_nowait(self) -> Optional[Event]:
        """read_event without waiting: the next event, or None when none has arrived yet.
        Raises what read_event raises (the connection's error, or ConnectionClosed)."""
        event = self.poll_event()
        if event is not None:
            return event
        if self._error is not None:
            raise self._error
        if self._eof or self._closed:
            raise self._dead_error()
        return None

    def listen(self, callback: Optional[Callable[[bool], None]],
               timeout: Optional[float]) -> None:
        """Callback-level reading, for a reader that is no coroutine (the proxy's fast path):
        ``callback(True)`` runs whenever an event, EOF, an error or close arrives (then call
        :meth:`next_event_nowait` until it gives None), ``callback(False)`` when ``timeout``
        seconds pass first (call listen again after each batch: like read_event, the timeout
        is per wait). ``timeout`` None: no limit (while the reader itself waits for its
        client). ``listen(None, None)`` stops; ``Connector.release`` does that too."""
        self._listener = callback
        if callback is not None and timeout:
            self._arm_deadline(self._loop.time() + timeout)
        else:
            self._deadline = None

    def first_bytes_to(self, sink: Optional[Callable[[bytes], bool]]) -> None:
        """Offer the first bytes of the response to ``sink`` (after ``send_head``) before the
        parser sees them: ``sink(data)`` True says it took the whole response through
        :meth:`take_whole`; False leaves ``data`` to the parser and the events, as usual.
        Offered once; ``Connector.release`` withdraws the offer."""
        self._sink = sink

    def take_whole(self, data: bytes) -> Optional[tuple[int, bytes, Union[bytes, memoryview]]]:
        """For a sink (see first_bytes_to), on the response to a GET: when ``data`` is the
        whole of a plain response (``h1_splice``), end it here and give (status, the head to
        send downstream with the hop-by-hop fields cut, the body); None otherwise, and
        nothing changed."""
        parser = self._parser
        if self.response_bytes_seen or self._error is not None or parser.response_started:
            return None  # (response_started: bytes the parser already holds come first)
        taken = take_whole(data, parser.limits)
        if taken is None:
            return None
        status, head, body, keep_alive = taken
        self.response_bytes_seen = True
        parser.taken_whole(keep_alive)
        return status, head, body

    def untouched(self) -> bool:
        """True while nothing (no byte, EOF, error or close) has happened on a connection taken
        from the pool since it was taken: it may still carry a request."""
        return not (self._eof or self._closed or self._error is not None
                    or self.response_bytes_seen)

    def can_reuse(self) -> bool:
        """True when the last exchange ended cleanly and the upstream allows keep-alive."""
        return (not self._closed and not self._eof and self._error is None
                and not self._events and not self._tunnel and self._parser.reusable)

    # --- closing -----------------------------------------------------------------------------

    def is_idle_usable(self) -> bool:
        """For the pool: open, idle, and nothing received since it was released."""
        return self._idle and not self._closed and not self._eof

    def close(self) -> None:
        """Close the connection (idempotent). Pending output is flushed if any can be, else the
        connection is aborted: a stalled upstream must not hold a socket forever."""
        if self._idle:
            self._unpool()
        if self._closed:
            return
        self._closed = True
        self._cancel_timer()
        transport = self.transport
        if transport is None:
            return
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()
        self._wake()

    # --- internals ---------------------------------------------------------------------------

    def _queue(self, events: list[Event]) -> None:
        """Append parsed events, counting body bytes for back-pressure."""
        if not events:
            return
        for event in events:
            cls = event.__class__
            if cls is Data:
                self._buffered += len(event.data)  # type: ignore[union-attr]
            elif cls is ResponseHead:
                self._head_seen = True
        self._events.extend(events)

    def _after_input(self) -> None:
        """After new input: pause reading if too much is unread, and wake the reader."""
        if self._buffered > HIGH_WATER and not self._reading_paused and not self._closed:
            self._reading_paused = True
            self.pause_count += 1
            self.transport.pause_reading()
        if self._events or self._raw:  # a partial head alone wakes nobody
            self._wake()

    def _quickack(self) -> None:
        """Runs once per response, on its first read that leaves it incomplete: ACK what was
        read now instead of up to 40 ms later.

        Why: a keep-alive upstream connection is request/response traffic, so Linux puts it
        in delayed-ACK "pingpong" mode and holds the ACK of a short segment, hoping to carry
        it on our next request, which cannot come before this response ends. An origin whose
        last short segment waits for that ACK (Nagle's rule after nginx's ``tcp_nopush``
        cork is released, with ``sendfile``) then stalls until the delayed-ACK timer fires:
        the 40 ms p99 of a 64 KiB response. Setting TCP_QUICKACK leaves pingpong mode and
        sends the pending ACK at once; the kernel re-enters the mode when we next send, so it
        is set again per response. A response read whole in one go costs nothing here."""
        self._acked = True
        sock = self._sock
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)  # type: ignore[arg-type]
            except OSError:
                self._sock = None  # not a TCP socket after all: stop trying

    def _resume_reading(self) -> None:
        self._reading_paused = False
        if not self._closed:
            self.transport.resume_reading()

    def _wake(self) -> None:
        listener = self._listener
        if listener is not None:
            # This wait is over, as a resolved future's is: a timer due in this same loop
            # iteration must not time out a response that already arrived (listen() re-arms).
            self._deadline = None
            listener(True)
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    async def _wait(self, timeout: Optional[float]) -> bool:
        """Wait for input/EOF/error; False if ``timeout`` seconds passed first."""
        loop = self._loop
        fut = loop.create_future()
        self._waiter = fut
        if timeout:
            self._arm_deadline(loop.time() + timeout)
        else:
            self._deadline = None
        try:
            return await fut
        finally:
            self._waiter = None

    def _arm_deadline(self, deadline: float) -> None:
        """Set the current wait's deadline. The lazy timer is armed unless one already fires
        at or before it (it then re-arms itself for the rest: see _on_timer)."""
        self._deadline = deadline
        if self._timer is None or self._timer_when > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_when = deadline
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        """The lazy read timer fired: time out the current wait if its deadline passed, re-arm
        for the rest if a later wait moved the deadline, and go quiet when nobody waits."""
        self._timer = None
        fut = self._waiter
        listener = self._listener
        deadline = self._deadline
        if deadline is None or self._closed or (
                listener is None and (fut is None or fut.done())):
            return
        loop = self._loop
        if loop.time() >= deadline - 0.001:  # the loop clock has millisecond resolution
            if listener is not None:
                self._deadline = None
                listener(False)
            else:
                fut.set_result(False)  # type: ignore[union-attr]
            return
        self._timer_when = deadline
        self._timer = loop.call_at(deadline, self._on_timer)

    def _cancel_timer(self) -> None:
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()

    def _set_error(self, err: Error) -> None:
        if self._error is None:
            self._error = err

    def _fail_protocol(self, exc: h1.ProtocolError) -> None:
        etype = ErrorType.H1Error if self._head_seen else ErrorType.InvalidHTTPHeader
        self._set_error(Error(etype, _UP, exc, f"bad response from {self.peer.address}: "
                                                f"{exc.reason}"))
        self.close()

    def _dead_error(self) -> Error:
        """The error for using a connection the upstream already closed."""
        if self._error is not None:
            return self._error
        if self.response_bytes_seen:
            return Error(ErrorType.ConnectionClosed, _UP, None,
                         f"{self.peer.address} closed the connection mid-response")
        # A reused connection that the upstream closed before answering: the classic
        # keep-alive race, safe to retry (the caller still checks idempotency / body sent).
        return Error(ErrorType.ConnectionClosed, _UP, None,
                     f"{self.peer.address} closed the connection before responding",
                     retry=self.reused)

    def _read_timeout(self) -> Error:
        err = Error(ErrorType.ReadTimedout, _UP, None,
                    f"no response from {self.peer.address} within "
                    f"{self.peer.options.read_timeout}s")
        self._set_error(err)  # the exchange is broken: never pool this connection
        return err

    def _make_idle(self) -> None:
        """Called by the connector when the connection goes into the pool."""
        self._idle = True
        self._events.clear()
        self._buffered = 0
        if self._reading_paused:
            self._resume_reading()  # must see EOF or stray bytes while idle

    def _reactivate(self) -> None:
        """Called by the connector when the pool hands the connection out again."""
        self._idle = False
        self.reused = True
        self.response_bytes_seen = False
        self.stray_response = False
        self.connect_duration = 0.0
        self._head_seen = False

    def _unpool(self) -> None:
        self._idle = False
        self._connector.pool.remove(self)

    def _drop_idle(self) -> None:
        """An idle connection received bytes or EOF: close it now."""
        self._unpool()
        self.close()
