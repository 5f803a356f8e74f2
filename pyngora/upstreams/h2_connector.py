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
  acknowledged to the upstream only when ``read_event`` hands them out; while the socket's
  buffer is full, the upstream is not read either (what we read makes us write ACKs).
- Floods of frames that carry no response end the connection with GOAWAY ENHANCE_YOUR_CALM
  (``protocols/h2_client.py``): the requests in flight fail like any HTTP/2 error (502).
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Hashable, Optional

from pyngora.errors import Error, ErrorSource, ErrorType
from pyngora.protocols import h2_client as h2c
from pyngora.protocols.events import StreamReset
from pyngora.upstreams.connector import Connector
from pyngora.upstreams.dial import WRITE_HIGH_WATER, WRITE_LOW_WATER, dial
from pyngora.upstreams.h2_stream import STREAM_HIGH_WATER, H2UpstreamStream, Unprocessed
from pyngora.upstreams.peer import HttpPeer

__all__ = ["H2Connector", "H2Session", "H2UpstreamStream", "Unprocessed", "wants_h2",
           "STREAM_HIGH_WATER"]

# Our own cap on streams per connection, whatever the upstream allows.
LOCAL_MAX_STREAMS = 128
# Dials a request may wait for (others' first, then its own) before giving up.
_MAX_DIAL_ROUNDS = 4
# How long a closed connection may keep unsent bytes (a GOAWAY, ACKs) before it is aborted.
CLOSE_LINGER_SECONDS = 5.0
# Unsent bytes past which the upstream is no longer read (see pause_writing).
READ_PAUSE_BUFFER = 2 * WRITE_HIGH_WATER

_UP = ErrorSource.Upstream


def wants_h2(peer: HttpPeer) -> bool:
    """True when ``peer`` asks for HTTP/2 (its ALPN list starts with ``h2``)."""
    alpn = peer.options.alpn
    return bool(alpn) and alpn[0] == "h2"


class H2Session(asyncio.Protocol):
    """One HTTP/2 connection to an upstream, shared by up to ``limit()`` streams at a time."""

    __slots__ = ("peer", "key", "proto", "transport", "loop", "streams", "reserved", "served",
                 "closed", "write_paused", "drain_waiting", "connect_duration", "alpn",
                 "_connector", "_ready", "_idle_handle", "_lost_error", "_early")

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
        # Bytes that came before start(): an upstream sends its SETTINGS at once, maybe
        # before dial() returned; fed to h2 then, they would have it queue a SETTINGS ACK
        # ahead of our preface (RFC 9113 3.4: the preface comes first).
        self._early: Optional[list[bytes]] = []

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
        """Send the preface and our SETTINGS (after TLS, when there is TLS), then take what
        the upstream sent meanwhile."""
        self.proto.initiate()
        self.flush()
        early, self._early = self._early, None
        for data in early or ():
            if self.closed:
                break
            self.data_received(data)

    def data_received(self, data: bytes) -> None:
        if self._early is not None:
            self._early.append(data)
            return
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
        if self.write_paused and self.transport.get_write_buffer_size() > READ_PAUSE_BUFFER:
            self._reading(False)  # what we read makes ACKs it does not take (pause_writing)
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
        """The socket's write buffer passed WRITE_HIGH_WATER: the upstream is not reading
        (request bodies wait in ``drain``). PING and SETTINGS ACKs, RST_STREAMs and
        WINDOW_UPDATEs are made by what we read, so once the buffer passes READ_PAUSE_BUFFER
        reading stops too (``data_received``), or an origin that sends and never reads would
        grow it without bound. Not at once: other streams' responses on the connection keep
        coming while a large upload fills the buffer to its high-water mark."""
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._reading(True)
        self._wake_drains()

    def _reading(self, on: bool) -> None:
        if self.closed or self.transport is None:
            return
        try:
            if on:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()
        except (RuntimeError, AttributeError):
            pass  # (a transport closing already)

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
        if ev.reason:  # we ended it: the upstream broke the protocol (RFC 9113 5.4.1)
            self._lost_error = Error(ErrorType.H2Error, _UP, None,
                                     f"{self.peer.address} broke HTTP/2, connection ended "
                                     f"with GOAWAY (error {ev.error_code}): {ev.reason}")
        elif ev.error_code:
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
            t = self.transport
            if t is not None:
                t.close()
                if t.get_write_buffer_size():
                    # close() waits for the buffer to go out: an upstream that reads
                    # nothing (a flood's ACKs, our GOAWAY) would hold the socket for ever.
                    self.loop.call_later(CLOSE_LINGER_SECONDS, t.abort)

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
            # Someone's dial: maybe it has room for us too. If it failed, so do we (at once,
            # not after a second connect timeout); the engine may retry elsewhere.
            failed = await asyncio.shield(dialing)
            if failed is not None:
                raise Error(failed.etype, failed.source, failed.cause, failed.context,
                            retry=failed.retry)
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
        except Error as e:
            if not fut.done():
                fut.set_result(e)
            raise
        finally:
            if self._dialing.get(key) is fut:
                del self._dialing[key]
            if not fut.done():
                fut.set_result(None)

    async def _connect(self, peer: HttpPeer) -> H2Session:
        """TCP (or Unix), then TLS with ALPN h2 (required), the preface, and the upstream's
        first SETTINGS, all within the peer's connect timeouts."""
        loop = asyncio.get_running_loop()
        clock = time.perf_counter()  # connect_duration's start (loop.time() is in whole ms)
        session, started, tcp_timeout = await dial(
            peer, lambda: H2Session(peer, self, loop),
            self.connector.ssl_context(peer) if peer.tls else None)
        if peer.tls and session.alpn != "h2":
            session.transport.abort()
            raise Error(ErrorType.H2Error, _UP, None,
                        f"{peer.address} did not choose h2 by ALPN "
                        f"(got {session.alpn!r})", retry=True)
        try:
            await self._handshake(peer, session, started, tcp_timeout)
            session.connect_duration = time.perf_counter() - clock
            return session
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
            what = ("closed the connection during the HTTP/2 handshake" if session.closed
                    else "sent no HTTP/2 SETTINGS")
            session.close()
            raise Error(ErrorType.H2Error, _UP, None, f"{peer.address} {what}", retry=True)
        return session
