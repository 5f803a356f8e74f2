"""One HTTP/2 request stream to an upstream, with ``UpstreamConnection``'s interface (see
``h2_connector.py`` for the connections and the pool that hand these out).

- ``send_head`` opens the stream (it ends at once unless the head announces a body: the
  engine frames every body it sends with Transfer-Encoding or a non-zero Content-Length);
- ``drain`` waits while the stream's unsent body exceeds STREAM_HIGH_WATER (the upstream's
  window is closed) or the socket's buffer is full;
- ``read_event`` hands out response events and only then acknowledges their bytes to the
  upstream (WINDOW_UPDATE): a slow client slows the upstream down;
- errors: ``Unprocessed`` (retry=True) when the upstream refused the stream unprocessed.
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Optional

from pyngora.errors import Error, ErrorSource, ErrorType
from pyngora.headers import Headers
from pyngora.protocols import h2_client as h2c
from pyngora.protocols.events import Data, Event, MessageEnd, StreamReset
from pyngora.upstreams.h1_upstream import _on_wait_timeout
from pyngora.upstreams.peer import HttpPeer

if TYPE_CHECKING:
    from pyngora.upstreams.h2_connector import H2Session

__all__ = ["H2UpstreamStream", "Unprocessed", "STREAM_HIGH_WATER"]

# Unsent request body bytes per stream above which ``drain`` waits.
STREAM_HIGH_WATER = 64 * 1024

_UP = ErrorSource.Upstream


class Unprocessed(Error):
    """The upstream said it did not process the request (REFUSED_STREAM, or a stream above
    a GOAWAY's last stream id: RFC 9113 8.7), so even a non-idempotent one may be sent again
    as long as its whole body is still at hand."""

    __slots__ = ()


def _fields(headers: Optional[Headers]) -> Optional[list[tuple[bytes, bytes]]]:
    if not headers:
        return None
    return [(n.lower(), v) for n, v in headers]


def _has_body(headers: Headers) -> bool:
    """Whether the engine will send a body after this head: it frames every body it sends
    with Transfer-Encoding (streamed) or a non-zero Content-Length."""
    if b"transfer-encoding" in headers:
        return True
    cl = headers.get(b"content-length")
    return cl is not None and cl.strip() not in (b"0", b"")


class H2UpstreamStream:
    """One request/response exchange on an :class:`H2Session` (UpstreamConnection's API)."""

    __slots__ = ("peer", "session", "sid", "reused", "response_bytes_seen", "connect_duration",
                 "pause_count", "alpn", "_events", "_waiter", "_drain_waiter", "_error",
                 "_ended", "_closed", "_released", "body_sending")

    def __init__(self, session: "H2Session", peer: HttpPeer, reused: bool) -> None:
        self.peer = peer
        self.session = session
        self.sid = 0  # 0 until send_head opened the stream
        self.reused = reused
        self.response_bytes_seen = False
        self.connect_duration = 0.0 if reused else session.connect_duration
        self.pause_count = 0
        self.alpn: Optional[str] = session.alpn
        self._events: deque[Event] = deque()
        self._waiter: Optional[asyncio.Future] = None
        self._drain_waiter: Optional[asyncio.Future] = None
        self._error: Optional[Error] = None
        self._ended = False     # the whole response (MessageEnd) was queued
        self._closed = False
        self._released = False
        self.body_sending = False  # as UpstreamConnection.body_sending

    # --- sending -----------------------------------------------------------------------------

    def send_head(self, method: bytes, target: bytes, headers: Headers,
                  version: bytes = b"1.1", te_trailers: bool = False) -> None:
        """Open the stream with this request head. ``version`` is ignored (this is HTTP/2);
        the stream ends at once unless the head announces a body. Raises Error (retry=True
        when the connection cannot take the stream: nothing was sent)."""
        if self._error is not None:
            raise self._error
        s = self.session
        peer = self.peer
        if s.closed:
            # Closed between the reservation and now (EOF, GOAWAY): nothing was sent.
            err = Unprocessed(ErrorType.ConnectionClosed, _UP, None,
                              f"HTTP/2 connection to {peer.address} closed before the request",
                              retry=True)
            self._error = err
            raise err
        scheme = b"https" if peer.tls else b"http"
        authority = b"localhost" if peer.unix_path else peer.address.encode("latin-1")
        fields = h2c.request_fields(method, target, scheme, authority, headers, te_trailers)
        try:
            self.sid = s.proto.start_request(fields, not _has_body(headers), method == b"HEAD")
        except h2c.H2ClientError as exc:
            err = Error(ErrorType.H2Error, _UP, exc, f"{peer.address}: {exc}", retry=True)
            self._error = err
            raise err from None
        s.streams[self.sid] = self
        s.flush()

    def send_body(self, data: bytes, chunked: bool = False) -> None:
        """Queue a piece of the request body (``chunked`` means nothing in HTTP/2)."""
        if self._closed or self._error is not None:
            raise self._dead_error()
        if data:
            self.session.proto.send_body(self.sid, data)
            self.session.flush()

    def send_end(self, chunked: bool = False, trailers: Optional[Headers] = None) -> None:
        """End the request body (END_STREAM, on the trailers when there are any)."""
        if self._closed or self._error is not None:
            raise self._dead_error()
        self.session.proto.send_end(self.sid, _fields(trailers))
        self.session.flush()

    async def drain(self) -> None:
        """Wait while this stream's unsent body exceeds STREAM_HIGH_WATER (the upstream's
        window is closed) or the socket's write buffer is full. Raises Error(WriteTimedout)
        after ``write_timeout`` without progress, or the stream's error."""
        s = self.session
        timeout = self.peer.options.write_timeout
        while True:
            if self._error is not None or self._closed:
                raise self._dead_error()
            if s.proto.pending(self.sid) <= STREAM_HIGH_WATER and not s.write_paused:
                return
            fut = s.loop.create_future()
            self._drain_waiter = fut
            s.drain_waiting.add(self)
            handle = s.loop.call_later(timeout, _on_wait_timeout, fut) if timeout else None
            try:
                woke = await fut
            finally:
                self._drain_waiter = None
                s.drain_waiting.discard(self)
                if handle is not None:
                    handle.cancel()
            if not woke:
                err = Error(ErrorType.WriteTimedout, _UP, None,
                            f"writing to {self.peer.address} timed out after {timeout}s")
                self._fail(err)
                raise err

    # --- receiving ---------------------------------------------------------------------------

    async def read_event(self) -> Event:
        """The next response event (InformationalResponse, ResponseHead, Data, MessageEnd).

        Waits at most ``read_timeout`` for each (Error ReadTimedout). Raises the stream's
        error: retry=True when the upstream refused it unprocessed (REFUSED_STREAM, or above
        a GOAWAY's last stream id)."""
        events = self._events
        while True:  # each turn returns, raises, or awaits a wake-up
            if events:
                event = events.popleft()
                if event.__class__ is Data:
                    n = len(event.data)  # type: ignore[union-attr]
                    self.session.proto.consumed(self.sid, n)
                    self.session.flush()
                return event
            if self._error is not None:
                raise self._error
            if self._closed:
                raise self._dead_error()
            if not await self._wait(None if self.body_sending else self.peer.options.read_timeout):
                err = Error(ErrorType.ReadTimedout, _UP, None,
                            f"no response from {self.peer.address} within "
                            f"{self.peer.options.read_timeout}s")
                self._fail(err)
                raise err

    def body_done(self) -> None:
        """As ``UpstreamConnection.body_done``: read_timeout runs from now."""
        self.body_sending = False
        fut = self._waiter
        if fut is not None and not fut.done():
            fut.set_result(True)

    def can_reuse(self) -> bool:
        """True when the exchange ended cleanly (the stream slot can go back)."""
        return self._ended and self._error is None and not self._closed and not self._events

    # --- tunnels do not exist in HTTP/2 (RFC 8441 extended CONNECT is not supported) -----------

    def into_tunnel(self) -> tuple[bytes, ...]:
        raise Error(ErrorType.H2Error, _UP, None, "no upgrade over an HTTP/2 upstream")

    def write_raw(self, data: bytes) -> None:
        raise Error(ErrorType.H2Error, _UP, None, "no upgrade over an HTTP/2 upstream")

    def write_eof(self) -> None:
        return None

    async def read_raw(self) -> bytes:
        raise Error(ErrorType.H2Error, _UP, None, "no upgrade over an HTTP/2 upstream")

    # --- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        """Abandon the exchange: RST_STREAM CANCEL unless it ended (the connection, shared
        with other streams, stays open). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.sid and not (self._ended and self._error is None):
            self.session.proto.reset(self.sid, h2c.CANCEL)
            self.session.flush()
        self._wake()
        self._wake_drain()

    # --- called by the session ------------------------------------------------------------

    def _on_event(self, ev: Event) -> None:
        cls = ev.__class__
        if cls is StreamReset:
            code = ev.error_code  # type: ignore[union-attr]
            if self._ended and code == h2c.NO_ERROR:
                # RFC 9113 8.1: a complete response, and "stop sending the request body".
                return
            cls_ = Unprocessed if code == h2c.REFUSED_STREAM and not self.response_bytes_seen \
                else Error
            self._fail(cls_(ErrorType.H2Error, _UP, None,
                            f"{self.peer.address} reset the stream (error {code})",
                            retry=cls_ is Unprocessed))
            return
        self.response_bytes_seen = True
        if cls is MessageEnd:
            self._ended = True
        self._events.append(ev)
        self._wake()

    def _fail(self, err: Error) -> None:
        if self._error is None:
            self._error = err
        self._wake()
        self._wake_drain()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(True)

    def _wake_drain(self) -> None:
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(True)

    async def _wait(self, timeout: Optional[float]) -> bool:
        loop = self.session.loop
        fut = loop.create_future()
        self._waiter = fut
        handle = loop.call_later(timeout, _on_wait_timeout, fut) if timeout else None
        try:
            return await fut
        finally:
            self._waiter = None
            if handle is not None:
                handle.cancel()

    def _dead_error(self) -> Error:
        if self._error is not None:
            return self._error
        return Error(ErrorType.ConnectionClosed, _UP, None,
                     f"stream to {self.peer.address} closed",
                     retry=self.reused and not self.response_bytes_seen)
