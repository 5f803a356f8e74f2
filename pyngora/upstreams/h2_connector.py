"""HTTP/2 to upstreams (``h2: true``): pooled, multiplexed connections (Pingora's h2 connector).

The request path uses it exactly like the HTTP/1 :class:`~pyngora.upstreams.connector.Connector`::

    stream = await h2c.get(peer)                  # a stream slot on a pooled connection, or a new one
    stream.send_head(b"GET", b"/", headers)       # then send_body/send_end, await drain()
    ev = await stream.read_event()                # InformationalResponse*, ResponseHead, Data*, MessageEnd
    h2c.release(stream, reusable=True)            # the slot goes back; the connection stays pooled

:class:`H2UpstreamStream` has :class:`UpstreamConnection`'s interface (``send_head``,
``send_body``, ``send_end``, ``drain``, ``read_event``, ``can_reuse``, ``close``, ``reused``,
``response_bytes_seen``, ``connect_duration``), so the proxy engine drives both the same way.

- A peer speaks HTTP/2 when its ``options.alpn`` starts with ``"h2"`` (:func:`wants_h2`):
  over TLS the upstream must choose ``h2`` by ALPN; in plaintext, prior knowledge (h2c).
- A new connection is used only once the upstream's SETTINGS arrived, so its
  SETTINGS_MAX_CONCURRENT_STREAMS is known; a connection whose streams are all taken makes
  ``get`` open another one (requests arriving together share one dial).
- GOAWAY: no new streams on that connection; in-flight ones finish; a stream above its last
  stream id, or reset with REFUSED_STREAM, was never processed and fails with ``retry=True``.
- Back-pressure: ``drain`` waits while the stream's unsent body exceeds STREAM_HIGH_WATER (the
  upstream's window is closed) or the socket's buffer is full; response bytes are
  acknowledged to the upstream only when ``read_event`` hands them out.
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Hashable, Optional

from pyngora.errors import Error, ErrorSource, ErrorType
from pyngora.headers import Headers
from pyngora.protocols import h2_client as h2c
from pyngora.protocols.events import Data, Event, MessageEnd, StreamReset
from pyngora.upstreams.connector import (WRITE_HIGH_WATER, WRITE_LOW_WATER, Connector,
                                         _connect_error, _on_wait_timeout)
from pyngora.upstreams.peer import HttpPeer

__all__ = ["H2Connector", "H2Session", "H2UpstreamStream", "Unprocessed", "wants_h2",
           "STREAM_HIGH_WATER"]

# Unsent request body bytes per stream above which ``drain`` waits.
STREAM_HIGH_WATER = 64 * 1024
# Our own cap on streams per connection, whatever the upstream allows.
LOCAL_MAX_STREAMS = 128
# Dials a request may wait for (others' first, then its own) before giving up.
_MAX_DIAL_ROUNDS = 4

_UP = ErrorSource.Upstream


class Unprocessed(Error):
    """The upstream said it did not process the request (REFUSED_STREAM, or a stream above
    a GOAWAY's last stream id: RFC 9113 8.7), so even a non-idempotent one may be sent again
    as long as its whole body is still at hand."""

    __slots__ = ()


def wants_h2(peer: HttpPeer) -> bool:
    """True when ``peer`` asks for HTTP/2 (its ALPN list starts with ``h2``)."""
    alpn = peer.options.alpn
    return bool(alpn) and alpn[0] == "h2"


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
                 "_ended", "_closed", "_released")

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
            if not await self._wait(self.peer.options.read_timeout):
                err = Error(ErrorType.ReadTimedout, _UP, None,
                            f"no response from {self.peer.address} within "
                            f"{self.peer.options.read_timeout}s")
                self._fail(err)
                raise err

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


class H2Session(asyncio.Protocol):
    """One HTTP/2 connection to an upstream, shared by up to ``limit()`` streams at a time."""

    __slots__ = ("peer", "key", "proto", "transport", "loop", "streams", "reserved", "served",
                 "closed", "write_paused", "drain_waiting", "connect_duration", "alpn",
                 "_connector", "_ready", "_idle_handle", "_lost_error")

    def __init__(self, peer: HttpPeer, connector: "H2Connector",
                 loop: asyncio.AbstractEventLoop) -> None:
        self.peer = peer
        self.key: Hashable = peer.reuse_key
        self.proto = h2c.H2ClientConn()
        self.transport: Any = None
        self.loop = loop
        self.streams: dict[int, H2UpstreamStream] = {}
        self.reserved = 0      # stream slots handed out by the connector and not released
        self.served = 0        # slots handed out so far (the first one is not "reused")
        self.closed = False
        self.write_paused = False
        self.drain_waiting: set[H2UpstreamStream] = set()
        self.connect_duration = 0.0
        self.alpn: Optional[str] = None
        self._connector = connector
        self._ready: asyncio.Future = loop.create_future()  # the upstream's first SETTINGS
        self._idle_handle: Optional[asyncio.TimerHandle] = None
        self._lost_error: Optional[Error] = None

    # --- capacity ------------------------------------------------------------------------------

    def limit(self) -> int:
        """How many streams may be open at once (the upstream's SETTINGS, and ours)."""
        return min(self.proto.max_concurrent_streams, LOCAL_MAX_STREAMS)

    def usable(self) -> bool:
        """Open, SETTINGS seen, no GOAWAY: new streams may go here."""
        return not self.closed and self.proto.settings_received and self.proto.can_open()

    def has_room(self) -> bool:
        return self.usable() and self.reserved < self.limit()

    # --- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)

    def start(self) -> None:
        """Send the preface and our SETTINGS (after TLS, when there is TLS)."""
        self.proto.initiate()
        self.flush()

    def data_received(self, data: bytes) -> None:
        events = self.proto.feed(data)
        streams = self.streams
        for ev in events:
            cls = ev.__class__
            if cls is h2c.SettingsChanged:
                if not self._ready.done():
                    self._ready.set_result(True)
            elif cls is h2c.GoAway:
                self._on_goaway(ev)  # type: ignore[arg-type]
            else:
                st = streams.get(ev.stream_id)  # type: ignore[union-attr]
                if st is not None:
                    st._on_event(ev)
                    if cls is StreamReset:
                        del streams[ev.stream_id]  # type: ignore[union-attr]
        self.flush()
        if self.proto.closed:
            self._shutdown(self._lost_error or Error(
                ErrorType.H2Error, _UP, None, f"HTTP/2 error with {self.peer.address}"))
        elif self.write_paused is False and self.drain_waiting:
            self._wake_drains()  # windows may have opened

    def eof_received(self) -> bool:
        self._shutdown(None)
        return False

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._shutdown(None, exc)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_drains()

    # --- helpers -----------------------------------------------------------------------------

    def flush(self) -> None:
        data = self.proto.data_to_send()
        if data and not self.closed and self.transport is not None:
            self.transport.write(data)

    def _wake_drains(self) -> None:
        for st in list(self.drain_waiting):
            st._wake_drain()

    def _on_goaway(self, ev: h2c.GoAway) -> None:
        """No new streams here; refused ones fail retryably; the rest finish (graceful) or
        fail (error GOAWAY)."""
        for sid in ev.refused:
            st = self.streams.pop(sid, None)
            if st is not None:
                self.proto.streams.pop(sid, None)
                st._fail(Unprocessed(ErrorType.H2Error, _UP, None,
                                     f"{self.peer.address} sent GOAWAY before stream {sid}",
                                     retry=True))
        if ev.error_code:
            self._lost_error = Error(ErrorType.H2Error, _UP, None,
                                     f"{self.peer.address} sent GOAWAY (error {ev.error_code})")
        self._connector._forget(self)
        if not self.streams and self.reserved == 0:
            self.close()

    def _shutdown(self, err: Optional[Error], exc: Optional[BaseException] = None) -> None:
        """The connection is over: fail every stream still waiting for its response."""
        first = not self.closed
        self.closed = True
        if not self._ready.done():
            self._ready.set_result(False)
        for st in list(self.streams.values()):
            if st._ended:
                continue
            if err is not None:
                e = err
            else:
                seen = st.response_bytes_seen
                what = "mid-response" if seen else "before responding"
                e = Error(ErrorType.ConnectionClosed, _UP, exc,
                          f"{self.peer.address} closed the HTTP/2 connection {what}",
                          retry=st.reused and not seen)
            st._fail(e)
        self.streams.clear()
        self._cancel_idle()
        if first:
            self._connector._forget(self)
            if self.transport is not None:
                self.transport.close()

    def close(self) -> None:
        """Close the connection (GOAWAY first when it is healthy). Idempotent."""
        if self.closed:
            return
        self.proto.close()
        self.flush()
        self._shutdown(Error(ErrorType.ConnectionClosed, _UP, None,
                             f"HTTP/2 connection to {self.peer.address} closed"))

    def _arm_idle(self) -> None:
        self._cancel_idle()
        timeout = self.peer.options.idle_timeout
        if timeout is None:
            return  # no idle limit
        if timeout <= 0:
            self.close()  # 0: never keep an idle connection
            return
        self._idle_handle = self.loop.call_later(timeout, self._on_idle)

    def _cancel_idle(self) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None

    def _on_idle(self) -> None:
        self._idle_handle = None
        if self.reserved == 0:
            self.close()


class H2Connector:
    """HTTP/2 sessions to upstreams, per worker; dials through ``connector``'s TLS settings."""

    __slots__ = ("connector", "sessions", "_dialing")

    def __init__(self, connector: Optional[Connector] = None) -> None:
        self.connector = connector if connector is not None else Connector()
        self.sessions: dict[Hashable, list[H2Session]] = {}
        self._dialing: dict[Hashable, asyncio.Future] = {}

    async def get(self, peer: HttpPeer) -> H2UpstreamStream:
        """A stream slot to ``peer``: on a pooled connection with room (``reused``), else on
        a new one. Raises Error (retry=True) as ``Connector.get`` does."""
        key = peer.reuse_key
        for _ in range(_MAX_DIAL_ROUNDS):
            st = self._reserve(key, peer)
            if st is not None:
                return st
            dialing = self._dialing.get(key)
            if dialing is None:
                break
            await asyncio.shield(dialing)  # someone's dial: maybe it has room for us too
        session = await self._dial(peer)
        if not session.has_room():
            session.close()
            raise Error(ErrorType.H2Error, _UP, None,
                        f"{peer.address} allows no HTTP/2 stream", retry=True)
        return self._take(session, peer)

    def release(self, stream: H2UpstreamStream, reusable: bool) -> None:
        """The request is done with ``stream``: its slot goes back. The connection stays
        pooled while healthy; an unclean end resets only this stream."""
        if stream._released:
            return
        stream._released = True
        s = stream.session
        s.reserved -= 1
        clean = reusable and stream.can_reuse()
        if stream.sid:
            s.streams.pop(stream.sid, None)
            if clean:
                s.proto.forget(stream.sid)
            elif not s.closed:
                s.proto.reset(stream.sid, h2c.CANCEL)
            s.flush()
        stream._closed = True
        if s.closed:
            return
        if not s.usable():  # GOAWAY seen: close once its last stream is done
            if not s.streams and s.reserved == 0:
                s.close()
            return
        if s.reserved == 0:
            s._arm_idle()

    def close_all(self) -> None:
        """Close every connection (worker draining or exiting)."""
        for sessions in list(self.sessions.values()):
            for s in list(sessions):
                s.close()
        self.sessions.clear()

    # --- internals -----------------------------------------------------------------------------

    def _reserve(self, key: Hashable, peer: HttpPeer) -> Optional[H2UpstreamStream]:
        for s in self.sessions.get(key, ()):
            if s.has_room():
                return self._take(s, peer)
        return None

    def _take(self, s: H2Session, peer: HttpPeer) -> H2UpstreamStream:
        s._cancel_idle()
        st = H2UpstreamStream(s, peer, s.served > 0)
        s.reserved += 1
        s.served += 1
        return st

    def _forget(self, s: H2Session) -> None:
        sessions = self.sessions.get(s.key)
        if sessions is not None and s in sessions:
            sessions.remove(s)
            if not sessions:
                del self.sessions[s.key]

    async def _dial(self, peer: HttpPeer) -> H2Session:
        key = peer.reuse_key
        fut = asyncio.get_running_loop().create_future()
        self._dialing.setdefault(key, fut)
        try:
            session = await self._connect(peer)
            self.sessions.setdefault(key, []).append(session)
            return session
        finally:
            if self._dialing.get(key) is fut:
                del self._dialing[key]
            if not fut.done():
                fut.set_result(None)

    async def _connect(self, peer: HttpPeer) -> H2Session:
        """TCP (or Unix), then TLS with ALPN h2 (required), the preface, and the upstream's
        first SETTINGS, all within the peer's connect timeouts."""
        loop = asyncio.get_running_loop()
        opts = peer.options
        started = loop.time()
        total = opts.total_connection_timeout
        tcp_timeout = opts.connection_timeout
        if total is not None and (tcp_timeout is None or total < tcp_timeout):
            tcp_timeout = total

        def factory() -> H2Session:
            return H2Session(peer, self, loop)

        try:
            async with asyncio.timeout(tcp_timeout):
                if peer.unix_path is not None:
                    transport, session = await loop.create_unix_connection(factory,
                                                                           peer.unix_path)
                else:
                    transport, session = await loop.create_connection(factory, peer.host,
                                                                      peer.port)
        except (OSError, TimeoutError) as exc:
            raise _connect_error(exc, False, peer) from None
        remaining = None if total is None else max(total - (loop.time() - started), 0.001)
        if peer.tls:
            ctx = self.connector.ssl_context(peer)
            try:
                async with asyncio.timeout(remaining):
                    tls = await loop.start_tls(transport, session, ctx,
                                               server_hostname=peer.server_name or None,
                                               ssl_handshake_timeout=remaining)
            except (OSError, TimeoutError, ValueError) as exc:
                transport.abort()
                raise _connect_error(exc, True, peer) from None
            except BaseException:
                transport.abort()
                raise
            if tls is None:
                raise Error(ErrorType.TLSHandshakeFailure, _UP, None,
                            f"TLS handshake with {peer.address} aborted", retry=True)
            session.transport = tls
            tls.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
            ssl_object = tls.get_extra_info("ssl_object")
            session.alpn = ssl_object.selected_alpn_protocol() if ssl_object else None
            if session.alpn != "h2":
                tls.abort()
                raise Error(ErrorType.H2Error, _UP, None,
                            f"{peer.address} did not choose h2 by ALPN "
                            f"(got {session.alpn!r})", retry=True)
        try:
            return await self._handshake(peer, session, started, tcp_timeout)
        except BaseException:
            session.close()  # cancelled (the client left) or failed: never leak the socket
            raise

    async def _handshake(self, peer: HttpPeer, session: H2Session, started: float,
                         tcp_timeout: Optional[float]) -> H2Session:
        """The preface and the upstream's first SETTINGS (its stream limit)."""
        loop = session.loop
        total = peer.options.total_connection_timeout
        session.start()
        # The connect timeouts also bound the wait for the upstream's SETTINGS (a plaintext
        # peer that does not speak HTTP/2 never sends them).
        wait = tcp_timeout if total is None else max(total - (loop.time() - started), 0.001)
        try:
            async with asyncio.timeout(wait):
                ok = await asyncio.shield(session._ready)
        except TimeoutError:
            ok = False
        if not ok:
            session.close()
            raise Error(ErrorType.H2Error, _UP, None,
                        f"{peer.address} sent no HTTP/2 SETTINGS", retry=True)
        session.connect_duration = loop.time() - started
        return session
