"""Sans-IO HTTP/2 server side: bytes in, pyngora events out, over ``h2.connection.H2Connection``.

No asyncio here (DESIGN's one-way doors): the asyncio edge is ``services/h2_app.py``. One
:class:`H2Server` per downstream connection. ``feed(data)`` returns the same events as the
HTTP/1 parser (RequestHead, Data, MessageEnd, each with its ``stream_id``) plus StreamReset,
ConnectionClosed and :class:`RequestRejected`; the responses go in through ``send_head``,
``send_body``, ``send_end``; ``data_to_send()`` says what to write to the socket.

Decisions where the RFCs leave a choice (documented in the report and tests):

- Request translation and validation (what is malformed, what gets 400, 413 or 501):
  ``protocols/h2_fields.py``, whose names are re-exported here.
- Content-Length not matching the DATA received is detected by the h2 library, which ends the
  whole connection (GOAWAY PROTOCOL_ERROR): RFC 9113 5.4.1 lets a stream error be treated as
  a connection error, and a client lying about lengths does not deserve its other streams.
- Concurrency: SETTINGS_MAX_CONCURRENT_STREAMS is advertised; streams beyond it whose
  handlers still run (the client reset them, but our work goes on: the "rapid reset" attack)
  are refused with RST_STREAM REFUSED_STREAM, which a client may retry. A client that opens
  more streams than it was told (after acknowledging the SETTINGS) gets GOAWAY PROTOCOL_ERROR
  from the h2 library: a connection error, which RFC 9113 5.4.1 allows for a stream error.
  A header block that does not decode (HPACK) ends the connection with COMPRESSION_ERROR
  (RFC 9113 4.3): the library says PROTOCOL_ERROR, and ``_feed`` recodes its GOAWAY.
- Abuse: every stream the client resets before its response ended, and every refused or
  malformed stream, counts as "premature"; past ``max_premature_resets`` and more than half of
  all streams, the connection ends with GOAWAY ENHANCE_YOUR_CALM. CONTINUATION floods are
  bounded by the library (64 frames per header block) and by ``max_header_list_size``.
- Floods of frames that cost work and carry no request (the 2019 HTTP/2 DoS family: PING,
  SETTINGS, PRIORITY, unknown types, empty DATA, tiny WINDOW_UPDATEs): each counts as
  "overhead", which fades by ``OVERHEAD_FADE_PER_SECOND`` (a long-lived gRPC stream's keepalive
  PINGs never add up); past ``max_overhead_frames`` and more than ``OVERHEAD_PER_STREAM`` per
  stream the client opened, GOAWAY ENHANCE_YOUR_CALM. Input is taken in slices of ``FEED_SLICE`` bytes,
  checked between slices, so one read of tiny frames cannot hold the worker's loop for long
  before the connection is ended. (The PING and SETTINGS ACKs such a flood asks for are
  bounded by the connection, which stops reading while the client does not read them.)
- Graceful shutdown (RFC 9113 6.8): GOAWAY with the last stream id 2^31-1 and a PING; on the
  PING's ACK, a second GOAWAY with the last stream actually seen. Streams up to it finish. The
  GOAWAY frames are built here because h2's state machine forbids any frame after its own.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Iterable, Optional

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from hpack.exceptions import HPACKError
from hyperframe.frame import GoAwayFrame, PingFrame

from pyngora.protocols import hpack_cache
from pyngora.protocols.events import ConnectionClosed, Data, MessageEnd, StreamReset
from pyngora.protocols.h2_conn import H2Conn
# Re-exported: this module was the home of the field rules before they got their own.
from pyngora.protocols.h2_fields import (CONNECTION_SPECIFIC, UNKNOWN_LENGTH_BODY, Reject,
                                         check_trailers, response_fields,
                                         translate_request)
from pyngora.protocols.h2_send import send_queued

__all__ = ["H2Limits", "H2Server", "RequestRejected", "PREFACE", "translate_request",
           "CONNECTION_SPECIFIC", "NO_ERROR", "PROTOCOL_ERROR", "INTERNAL_ERROR", "CANCEL",
           "REFUSED_STREAM", "ENHANCE_YOUR_CALM", "UNKNOWN_LENGTH_BODY", "response_fields"]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
ENHANCE_YOUR_CALM = 0xB

_MAX_STREAM_ID = 2 ** 31 - 1
_SHUTDOWN_PING = b"pyngora\x00"
# Flood control (see the module doc). One slice of tiny frames is ~1,800 frames: the most a
# flood gets processed past the limit.
FEED_SLICE = 16384
OVERHEAD_PER_STREAM = 50
OVERHEAD_FADE_PER_SECOND = 100.0
_clock = time.monotonic  # (tests move it)
_OVERHEAD = frozenset((h2.events.PingReceived, h2.events.RemoteSettingsChanged,
                       h2.events.PriorityUpdated, h2.events.UnknownFrameReceived,
                       h2.events.WindowUpdated))
_SMALL_WINDOW_UPDATE = 1024  # smaller increments are overhead (clients send 32 KiB and more)


class H2Limits:
    """Per-connection HTTP/2 limits (from the service's ``limits`` where they overlap)."""

    __slots__ = ("max_concurrent_streams", "max_header_list_size", "stream_window",
                 "connection_window", "max_frame_size", "max_body_bytes",
                 "max_premature_resets", "max_overhead_frames")

    def __init__(self, max_concurrent_streams: int = 100, max_header_list_size: int = 65536,
                 stream_window: int = 256 * 1024, connection_window: int = 1024 * 1024,
                 max_frame_size: int = 16384, max_body_bytes: Optional[int] = None,
                 max_premature_resets: int = 100, max_overhead_frames: int = 1000) -> None:
        self.max_concurrent_streams = max_concurrent_streams
        self.max_header_list_size = max_header_list_size
        # The stream window bounds what one request may have buffered unread; the connection
        # window bounds the total per connection (memory bounded whatever the body sizes).
        self.stream_window = stream_window
        self.connection_window = max(connection_window, 65535)
        self.max_frame_size = max_frame_size
        self.max_body_bytes = max_body_bytes
        self.max_premature_resets = max_premature_resets
        self.max_overhead_frames = max_overhead_frames


class RequestRejected:
    """The adapter refused a request itself: ``status`` > 0 was answered (400, 413, 501),
    ``status`` 0 means the stream was reset (``error_code``). ``reason`` is for the log."""

    __slots__ = ("stream_id", "status", "error_code", "reason")

    def __init__(self, stream_id: int, status: int, error_code: int, reason: str) -> None:
        self.stream_id = stream_id
        self.status = status
        self.error_code = error_code
        self.reason = reason

    def __repr__(self) -> str:
        return f"RequestRejected({self.stream_id}, {self.status}, {self.error_code}, {self.reason!r})"


class _Stream:
    """Our bookkeeping for one stream (the h2 library keeps the protocol state)."""

    __slots__ = ("out", "out_bytes", "end", "trailers", "ended", "remote_done", "body_bytes",
                 "rejected", "reset", "length")

    def __init__(self) -> None:
        self.out: deque[bytes] = deque()
        self.out_bytes = 0
        self.end = False          # the response end is queued (after ``out``)
        self.trailers: Optional[list[tuple[bytes, bytes]]] = None
        self.ended = False        # END_STREAM (or a reset) went to h2: nothing more to send
        self.remote_done = False  # the request body is complete (or the stream was reset)
        self.body_bytes = 0
        self.rejected = False     # body refused (413): further DATA is acknowledged and dropped
        self.reset = False
        self.length: Optional[int] = None  # the request's content-length, when it has one


class H2Server:
    """The server side of one HTTP/2 connection (see the module docstring for decisions).

    ``closed`` becomes True when the connection is over for the protocol (fatal error, or the
    final GOAWAY sent and every stream done): write ``data_to_send()`` then close the socket.
    ``active`` is the number of requests handed out and not yet ``release``d.
    """

    __slots__ = ("limits", "conn", "streams", "active", "closed", "error_code", "_out",
                 "_goaway_last", "_shutdown", "_streams_opened", "_premature", "_overhead",
                 "_overhead_at", "_last_sid")

    def __init__(self, limits: Optional[H2Limits] = None) -> None:
        self.limits = limits = limits or H2Limits()
        config = h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_inbound_headers=False,
            normalize_inbound_headers=False, validate_outbound_headers=False,
            normalize_outbound_headers=False)
        self.conn = H2Conn(config=config)
        hpack_cache.install(self.conn)  # (repeated header blocks: see the module)
        # MAX_CONCURRENT_STREAMS is left out of the first SETTINGS frame and sent by
        # ``initiate`` in a second one: h2 enforces initial values at once (a connection
        # error), but a client cannot know the limit before it reads our SETTINGS; until it
        # ACKs them, ``active`` refuses the excess with REFUSED_STREAM instead.
        self.conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: limits.stream_window,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: limits.max_frame_size,
        })
        self.streams: dict[int, _Stream] = {}
        self.active = 0
        self.closed = False
        self.error_code: Optional[int] = None
        self._out = bytearray()
        self._goaway_last: Optional[int] = None  # the final GOAWAY's last stream id, once sent
        # The highest stream whose request we took up (h2's highest_inbound_stream_id may
        # already count one later in the batch being handled).
        self._last_sid = 0
        self._shutdown = False                   # the first (2^31-1) GOAWAY was sent
        self._streams_opened = 0
        self._premature = 0
        self._overhead = 0.0  # frames that cost work and carried no request (the module doc)
        self._overhead_at = 0.0  # when _overhead was last counted

    # ------------------------------------------------------------------ connection
    def initiate(self) -> None:
        """Queue our SETTINGS and the connection window increase (call once, first)."""
        conn = self.conn
        conn.initiate_connection()
        conn.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS:
                              self.limits.max_concurrent_streams})
        # The hpack decoder enforces the header list size as soon as we say it.
        conn.decoder.max_header_list_size = self.limits.max_header_list_size
        extra = self.limits.connection_window - 65535
        if extra > 0:
            conn.increment_flow_control_window(extra)

    def data_to_send(self) -> bytes:
        """Bytes to write to the socket now (empty when there is nothing)."""
        data = self.conn.data_to_send()
        if self._out:
            data = bytes(self._out) + data
            self._out.clear()
        return data

    def _take(self) -> None:
        """Move h2's queued frames into ours, so a frame we build goes after them."""
        data = self.conn.data_to_send()
        if data:
            self._out += data

    def _recode_goaway(self, code: int) -> None:
        """h2 just queued its GOAWAY (no debug data) last, after the frames it made before the
        error: that GOAWAY is sent with ``code`` instead."""
        self._take()
        out = self._out
        # 9-byte frame header (length 8, type GOAWAY, no flags, stream 0), last id, code.
        if len(out) >= 17 and out[-17:-8] == b"\x00\x00\x08\x07\x00\x00\x00\x00\x00":
            out[-4:] = code.to_bytes(4, "big")
            self.error_code = code

    def _goaway(self, last: int, code: int) -> None:
        self._take()
        f = GoAwayFrame(0)
        f.last_stream_id = last
        f.error_code = code
        self._out += f.serialize()

    def begin_shutdown(self) -> None:
        """Graceful stop, step 1: GOAWAY(2^31-1) and a PING; its ACK triggers step 2."""
        if self._shutdown or self.closed:
            return
        self._shutdown = True
        self._goaway(_MAX_STREAM_ID, NO_ERROR)
        p = PingFrame(0)
        p.opaque_data = _SHUTDOWN_PING
        self._out += p.serialize()

    def goaway(self, code: int = NO_ERROR, settle: bool = True) -> None:
        """Graceful stop, step 2 (also the fallback when the PING is not answered): the final
        GOAWAY; streams up to the last one taken up finish, later ones are refused
        (REFUSED_STREAM: the client may send them again). ``settle``: end the connection now
        if nothing is in flight (False while a batch of frames is being handled: its later
        requests still get their refusal, and the batch's end settles)."""
        if self._goaway_last is not None or self.closed:
            return
        self._shutdown = True
        last = self._last_sid
        self._goaway_last = last
        self._goaway(last, code)
        if settle:
            self._check_done()

    def _fatal(self, code: int) -> None:
        """End the connection now (abuse): GOAWAY ``code``; nothing more is processed."""
        if self.closed:
            return
        if self._goaway_last is None:
            self._goaway_last = self.conn.highest_inbound_stream_id
            self._goaway(self._goaway_last, code)
        self.closed = True
        self.error_code = code

    def _check_done(self) -> None:
        if self._goaway_last is not None and not self.streams and self.active == 0:
            self.closed = True

    @property
    def shutting_down(self) -> bool:
        """A GOAWAY went out (or came in): no new streams will be accepted for long."""
        return self._shutdown

    @property
    def goaway_sent(self) -> bool:
        """The final GOAWAY went out (or the client's came in): the connection ends when
        its streams are done."""
        return self._goaway_last is not None

    def is_idle(self) -> bool:
        """No request in progress and nothing left to send on any stream."""
        return self.active == 0 and not self.streams

    # ------------------------------------------------------------------ input
    def feed(self, data: bytes) -> list:
        """Process bytes from the client; return the events for the connection layer."""
        if self.closed:
            return []
        if len(data) <= FEED_SLICE:
            return self._feed(data)
        out: list = []
        view = memoryview(data)
        for i in range(0, len(data), FEED_SLICE):
            out += self._feed(bytes(view[i:i + FEED_SLICE]))
            if self.closed:
                break
        return out

    def _feed(self, data: bytes) -> list:
        # h2 drops its unsent frames when a GOAWAY arrives: take them first.
        self._take()
        try:
            h2_events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # h2 queued GOAWAY with the right code (PROTOCOL_ERROR, FRAME_SIZE_ERROR, ...),
            # except for a header block HPACK could not decode.
            self.closed = True
            self.error_code = int(getattr(exc, "error_code", PROTOCOL_ERROR) or PROTOCOL_ERROR)
            if self.error_code == PROTOCOL_ERROR and isinstance(exc.__cause__, HPACKError):
                self._recode_goaway(COMPRESSION_ERROR)
            return [ConnectionClosed(self.conn.highest_inbound_stream_id)]
        out: list = []
        new = 0
        for ev in h2_events:
            cls = ev.__class__
            if cls in _OVERHEAD:
                if cls is not h2.events.WindowUpdated or ev.delta < _SMALL_WINDOW_UPDATE:
                    new += 1
            elif cls is h2.events.DataReceived and not ev.flow_controlled_length \
                    and ev.stream_ended is None:
                new += 1  # an empty DATA frame that ends nothing
        if new:
            now = _clock()
            faded = self._overhead - (now - self._overhead_at) * OVERHEAD_FADE_PER_SECOND
            overhead = self._overhead = (faded if faded > 0.0 else 0.0) + new
            self._overhead_at = now
            if (overhead >= self.limits.max_overhead_frames
                    and overhead > OVERHEAD_PER_STREAM * self._streams_opened):
                self._fatal(ENHANCE_YOUR_CALM)
                return [ConnectionClosed(self.conn.highest_inbound_stream_id)]
        for ev in h2_events:
            cls = ev.__class__
            if cls is h2.events.RequestReceived:
                self._on_request(ev, out)
            elif cls is h2.events.DataReceived:
                self._on_data(ev, out)
            elif cls is h2.events.TrailersReceived:
                self._on_trailers(ev, out)
            elif cls is h2.events.StreamReset:
                self._on_reset(ev, out)
            elif cls is h2.events.WindowUpdated or cls is h2.events.RemoteSettingsChanged:
                self._flush_all()
            elif cls is h2.events.PingAckReceived:
                if ev.ping_data == _SHUTDOWN_PING:
                    # (HEADERS after the ACK in the same read come after this GOAWAY's last)
                    self.goaway(settle=False)
            elif cls is h2.events.ConnectionTerminated:
                self._on_goaway(ev, out)
            if self.closed:
                break
        self._check_done()
        return out

    def _on_request(self, ev: h2.events.RequestReceived, out: list) -> None:
        sid = ev.stream_id
        end = ev.stream_ended is not None
        self._streams_opened += 1
        if self._goaway_last is not None and sid > self._goaway_last:
            self._refuse(sid, REFUSED_STREAM, "stream opened after GOAWAY", out, premature=False)
            return
        self._last_sid = sid
        if self.active >= self.limits.max_concurrent_streams:
            self._refuse(sid, REFUSED_STREAM, "too many concurrent streams", out)
            return
        s = _Stream()
        s.remote_done = end
        self.streams[sid] = s
        try:
            head = translate_request(ev.headers, sid, end, self.limits.max_body_bytes)
            s.length = head.content_length
        except Reject as rej:
            if rej.status == 0:
                del self.streams[sid]
                self._refuse(sid, PROTOCOL_ERROR, rej.reason, out)
                return
            self._premature += 1
            s.rejected = True
            self.send_head(sid, rej.status, [(b"content-length", b"0"),
                                              (b"cache-control", b"private, no-store")], True)
            out.append(RequestRejected(sid, rej.status, NO_ERROR, rej.reason))
            self._abuse_check()
            return
        self.active += 1
        out.append(head)
        if end:
            out.append(MessageEnd(None, sid))

    def _refuse(self, sid: int, code: int, reason: str, out: list, premature: bool = True) -> None:
        try:
            self.conn.reset_stream(sid, code)
        except h2.exceptions.ProtocolError:
            pass
        out.append(RequestRejected(sid, 0, code, reason))
        if premature:
            self._premature += 1
            self._abuse_check()

    def _abuse_check(self) -> None:
        p = self._premature
        if p >= self.limits.max_premature_resets and p * 2 > self._streams_opened:
            self._fatal(ENHANCE_YOUR_CALM)

    def _on_data(self, ev: h2.events.DataReceived, out: list) -> None:
        sid = ev.stream_id
        data = ev.data
        flow = ev.flow_controlled_length
        s = self.streams.get(sid)
        conn = self.conn
        if s is None or s.rejected or s.ended:
            # Nobody will read it (refused, answered already): hand the window back now.
            if flow:
                conn.acknowledge_received_data(flow, sid)
            if s is not None and ev.stream_ended is not None:
                s.remote_done = True
                self._maybe_forget(sid, s)
            return
        if flow > len(data):
            conn.acknowledge_received_data(flow - len(data), sid)  # padding
        s.body_bytes += len(data)
        limit = self.limits.max_body_bytes
        if limit is not None and s.body_bytes > limit:
            s.rejected = True
            conn.acknowledge_received_data(len(data), sid)
            out.append(RequestRejected(sid, 413, NO_ERROR, "request body too large"))
            return
        if data:
            out.append(Data(data, sid))
        if ev.stream_ended is not None:
            s.remote_done = True
            out.append(MessageEnd(None, sid))

    def _on_trailers(self, ev: h2.events.TrailersReceived, out: list) -> None:
        sid = ev.stream_id
        s = self.streams.get(sid)
        if s is None:
            return
        s.remote_done = True
        if s.rejected or s.ended:
            self._maybe_forget(sid, s)
            return
        try:
            if s.length is not None and s.body_bytes != s.length:
                # RFC 9113 8.1.1, whatever ends the stream: the h2 library compares the length
                # with the DATA only when a DATA frame ends it. Passed on, the origin would
                # read the next request on the pooled connection as the rest of this body.
                raise Reject(0, f"{s.body_bytes} body bytes for a content-length of {s.length}")
            trailers = check_trailers(ev.headers)
        except Reject as rej:
            s.rejected = True
            self.reset(sid, PROTOCOL_ERROR)
            out.append(RequestRejected(sid, 400, PROTOCOL_ERROR, rej.reason))
            return
        out.append(MessageEnd(trailers, sid))

    def _on_reset(self, ev: h2.events.StreamReset, out: list) -> None:
        sid = ev.stream_id
        s = self.streams.pop(sid, None)
        if s is None:
            return
        if not s.ended:
            self._premature += 1  # reset before its response ended
        s.ended = s.reset = s.remote_done = True
        out.append(StreamReset(sid, int(ev.error_code)))
        self._abuse_check()

    def _on_goaway(self, ev: h2.events.ConnectionTerminated, out: list) -> None:
        if ev.error_code:
            self.closed = True
            self.error_code = int(ev.error_code)
        else:
            # A graceful GOAWAY from the client: our in-flight responses may still go out, but
            # h2's state machine closes on it; reopen it (h2 issue #1181).
            state = getattr(self.conn.state_machine, "state", None)
            if self.streams and state is not None:
                self.conn.state_machine.state = h2.connection.ConnectionState.SERVER_OPEN
            if self._goaway_last is None:
                self._shutdown = True
                self._goaway_last = self.conn.highest_inbound_stream_id
        out.append(ConnectionClosed(ev.last_stream_id or 0))

    # ------------------------------------------------------------------ output
    def send_head(self, sid: int, status: int, fields: Iterable[tuple[bytes, bytes]],
                  end: bool = False) -> None:
        """The response head. ``fields``: lower-case names, no connection-specific ones (see
        ``response_fields``). ``end``: no body follows."""
        s = self.streams.get(sid)
        if s is None or s.ended:
            return
        headers = [(b":status", b"%d" % status)]
        headers.extend(fields)
        self.conn.send_headers(sid, headers, end_stream=end)
        if end:
            self._ended(sid, s)

    def send_informational(self, sid: int, status: int,
                           fields: Iterable[tuple[bytes, bytes]] = ()) -> None:
        """A 1xx before the final response (100 Continue, 103 Early Hints)."""
        s = self.streams.get(sid)
        if s is None or s.ended:
            return
        headers = [(b":status", b"%d" % status)]
        headers.extend(fields)
        self.conn.send_headers(sid, headers, end_stream=False)

    def send_body(self, sid: int, data: bytes, end: bool = False) -> None:
        """Queue body bytes; they go out as the flow-control windows allow. ``end``: they
        are the last ones (END_STREAM rides on the last DATA frame)."""
        s = self.streams.get(sid)
        if s is None or s.ended or s.end:
            return
        if data:
            s.out.append(data)
            s.out_bytes += len(data)
        if end:
            s.end = True
        self._flush(sid, s)

    def send_end(self, sid: int, trailers: Optional[Iterable[tuple[bytes, bytes]]] = None) -> None:
        """End the response (with trailers) once the queued body has gone out."""
        s = self.streams.get(sid)
        if s is None or s.ended or s.end:
            return
        s.end = True
        s.trailers = list(trailers) if trailers else None
        self._flush(sid, s)

    def pending(self, sid: int) -> int:
        """Body bytes of ``sid`` queued and not yet framed (0 once the stream is gone)."""
        s = self.streams.get(sid)
        return s.out_bytes if s is not None else 0

    def reset(self, sid: int, code: int = CANCEL) -> None:
        """Reset one stream (an aborted response, a cancelled handler)."""
        s = self.streams.pop(sid, None)
        if s is None:
            return
        s.ended = s.reset = True
        try:
            self.conn.reset_stream(sid, code)
        except h2.exceptions.ProtocolError:
            pass  # already closed at the protocol level
        self._check_done()

    def consumed(self, sid: int, n: int) -> None:
        """The application read ``n`` body bytes of ``sid``: give the window back."""
        if n > 0 and not self.closed:
            try:
                self.conn.acknowledge_received_data(n, sid)
            except h2.exceptions.ProtocolError:
                pass

    def release(self, sid: int) -> None:
        """The handler of ``sid`` is done (its response is queued or the stream was reset):
        it no longer counts against the concurrent-stream limit."""
        if self.active > 0:
            self.active -= 1
        self._check_done()

    def _flush_all(self) -> None:
        for sid, s in list(self.streams.items()):
            if s.out or s.end:
                self._flush(sid, s)

    def _flush(self, sid: int, s: _Stream) -> None:
        if not s.ended and send_queued(self.conn, sid, s):
            self._ended(sid, s)

    def _ended(self, sid: int, s: _Stream) -> None:
        s.ended = True
        s.out.clear()
        s.out_bytes = 0
        self._maybe_forget(sid, s)

    def _maybe_forget(self, sid: int, s: _Stream) -> None:
        if not s.ended:
            return
        if not s.remote_done:
            # Answered before the whole request arrived: ask the client to stop sending
            # (RFC 9113 8.1, RST_STREAM NO_ERROR after a complete response).
            try:
                self.conn.reset_stream(sid, NO_ERROR)
            except h2.exceptions.ProtocolError:
                pass
        self.streams.pop(sid, None)
        self._check_done()
