"""Sans-IO HTTP/2 client side (the proxy talking to an ``h2: true`` upstream).

No asyncio here (DESIGN's one-way doors): the asyncio edge is ``upstreams/h2_connector.py``.
One :class:`H2ClientConn` per upstream connection, over ``h2.connection.H2Connection``.
Requests go in as HTTP/1-style heads (``request_fields`` translates them); responses come out
as the same events the HTTP/1 response parser gives (InformationalResponse, ResponseHead,
Data, MessageEnd with trailers), each with its ``stream_id``, plus StreamReset,
:class:`SettingsChanged` and :class:`GoAway`. ``data_to_send()`` says what to write.

Decisions (documented in the report and tests):

- Back-pressure both ways: request body bytes wait in a per-stream queue until the upstream's
  flow-control windows let them out (``pending(sid)`` says how much waits, the caller's
  ``drain`` waits on it); response bytes are acknowledged (WINDOW_UPDATE) only when the
  caller says it consumed them (``consumed``), so a slow client slows the upstream down.
- A graceful GOAWAY (NO_ERROR) from the upstream keeps the connection open for the streams it
  lets through (h2's state machine would close at once: h2 issue #1181, so the GOAWAY frame is
  handled here); no new stream is opened after it. Streams above its last stream id were
  never processed (RFC 9113 6.8) and are reported in :class:`GoAway` ``refused``.
- Response fields are validated by h2 (upper-case names, connection-specific fields and bad
  pseudo-headers are connection errors: a broken upstream is answered 502). What h2 lets
  through and an HTTP/1 origin could not send (llhttp refuses it: a field name that is no
  token, a control character in a value), and trailers HTTP/1 trailers may not hold
  (Content-Length, Host, TE...), make the response malformed: the stream is reset (502, or
  the client's response cut short once its head went out), never passed on to a client.
- 1xx heads before the final one are bounded as from an HTTP/1 origin
  (``h1_response.MAX_CONTINUES``): ``max_header_list_size`` bytes in all and a few
  ``100 Continue``. HEADERS are not flow-controlled: an origin flooding 103s to a client that
  does not read would otherwise fill the worker's memory.
- Floods (the 2019 HTTP/2 DoS family, from the origin's side): every frame that costs work
  and carries no response (PING and PING ACK, SETTINGS and one more per ten entries, PRIORITY,
  GOAWAY, unknown types, empty DATA without END_STREAM, a frame on a stream that is gone --
  except DATA up to the window each stream we reset had: it was in flight --, a WINDOW_UPDATE
  under 1 KiB that lets nothing out) counts as overhead, with the downstream side's rule
  (``protocols/h2.py``): it fades by ``OVERHEAD_FADE_PER_SECOND``, and past
  ``MAX_OVERHEAD_FRAMES`` and more than ``OVERHEAD_PER_STREAM`` per request plus two per
  request DATA frame we sent on the connection (a WINDOW_UPDATE and a PING may answer each:
  grpc-go's BDP estimator), it ends with GOAWAY ENHANCE_YOUR_CALM (a :class:`GoAway` with a
  ``reason``: 502 for the requests in flight, as for any protocol error). Input is fed in
  ``FEED_SLICE`` slices, checked between slices, so one read of tiny frames is cut short.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Iterable, Optional

import h2.config
import h2.errors
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import (AltSvcFrame, DataFrame, ExtensionFrame, GoAwayFrame, PingFrame,
                              PriorityFrame, SettingsFrame)

from pyngora.headers import Headers
from pyngora.protocols import hpack_cache
from pyngora.protocols.events import (Data, InformationalResponse, MessageEnd, ResponseHead,
                                      StreamReset)
# The downstream side's flood rule, shared so both sides of the proxy judge a peer alike.
from pyngora.protocols.h2 import (FEED_SLICE, OVERHEAD_FADE_PER_SECOND, OVERHEAD_PER_STREAM,
                                   feed_in_slices)
from pyngora.protocols.h1_response import MAX_CONTINUES
from pyngora.protocols.h2_conn import H2Conn
from pyngora.protocols.h2_fields import Reject, check_trailers
from pyngora.protocols.h2_send import send_queued

__all__ = ["H2ClientConn", "GoAway", "SettingsChanged", "request_fields", "H2ClientError",
           "NO_ERROR", "PROTOCOL_ERROR", "REFUSED_STREAM", "CANCEL", "ENHANCE_YOUR_CALM",
           "MAX_OVERHEAD_FRAMES"]

NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
REFUSED_STREAM = 0x7
CANCEL = 0x8
ENHANCE_YOUR_CALM = 0xB

# Overhead frames an upstream connection may send before the per-request allowance counts
# (the downstream side's ``H2Limits.max_overhead_frames`` default).
MAX_OVERHEAD_FRAMES = 1000
# Frames that always count as overhead (SETTINGS counts by its size, below).
_OVERHEAD_FRAMES = (PingFrame, GoAwayFrame, PriorityFrame, ExtensionFrame, AltSvcFrame)
# A SETTINGS frame costs one more per this many payload bytes (ten entries, as downstream).
_SETTINGS_BYTES_PER_OVERHEAD = 60
_SMALL_WINDOW_UPDATE = 1024
_clock = time.monotonic  # (tests may move it)

# Fields of an HTTP/1 request that mean nothing (or something dangerous) in HTTP/2
# (RFC 9113 8.2.2); ``host`` becomes ``:authority``; ``te`` is kept only as "trailers".
_DROP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                   b"upgrade", b"host", b"te"))
# What a response field may hold beyond h2's own checks (which refuse upper case, bytes up to
# SP and from DEL in names, and NUL, CR, LF in values): a name is a token (RFC 9110 5.1), a
# value holds no other control character (HTAB aside). translate(None, these) leaves the
# bad bytes.
_NAME_CHARS = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz:"
_CTL = bytes(range(0x00, 0x09)) + bytes(range(0x0A, 0x20)) + b"\x7f"


class H2ClientError(Exception):
    """A request could not be started (no stream id left, the peer's stream limit, a field
    h2 refuses). Nothing of the request was sent: ``retry`` is always safe."""


class GoAway:
    """The upstream sent GOAWAY (or the connection failed: ``error_code`` != 0).

    ``refused`` lists our open streams above ``last_stream_id``: never processed, retryable.
    """

    __slots__ = ("last_stream_id", "error_code", "refused", "reason")

    def __init__(self, last_stream_id: int, error_code: int, refused: list[int],
                 reason: str = "") -> None:
        self.last_stream_id = last_stream_id
        self.error_code = error_code
        self.refused = refused
        self.reason = reason  # set when we ended the connection (the upstream broke HTTP/2)


class SettingsChanged:
    """The upstream's SETTINGS arrived (the first one says its concurrent-stream limit)."""

    __slots__ = ("max_concurrent_streams",)

    def __init__(self, max_concurrent_streams: int) -> None:
        self.max_concurrent_streams = max_concurrent_streams


class _Connection(H2Conn):
    """h2's connection, except that a graceful GOAWAY does not close it for the streams
    already open (h2 issue #1181; RFC 9113 6.8 lets them finish), and that it counts the
    frames that cost work and carried no response in ``overhead`` (the module docstring),
    which :meth:`H2ClientConn.feed` takes after each slice."""

    # (h2's H2Connection has no __slots__; the first += makes each per instance)
    overhead = 0
    # Bytes of DATA the upstream may still send on streams we reset: what it could have in
    # flight when the RST went out (the window each had), not a flood: a streaming response
    # of many small frames, cancelled by its client, must not end the shared connection.
    reset_credit = 0

    def _receive_frame(self, frame):  # type: ignore[no-untyped-def, override]
        """Called by h2 for each frame received: h2's handling, then the frame's overhead.
        Returns h2's events."""
        events = super()._receive_frame(frame)
        cls = frame.__class__
        if cls is DataFrame:
            if not events:
                # A stream that is gone: h2 answers each with RST_STREAM and gives the window
                # back, so flow control does not bound them; only what was in flight is free.
                n = frame.flow_controlled_length
                if n and self.reset_credit >= n:
                    self.reset_credit -= n
                else:
                    self.overhead += 1
            elif not frame.data and "END_STREAM" not in frame.flags:
                self.overhead += 1
        elif cls is SettingsFrame:
            self.overhead += 1 + frame.body_len // _SETTINGS_BYTES_PER_OVERHEAD
        elif cls in _OVERHEAD_FRAMES or not events:
            # (no event: HEADERS, RST_STREAM or WINDOW_UPDATE on a stream that is gone)
            self.overhead += 1
        return events

    def _receive_goaway_frame(self, frame):  # type: ignore[no-untyped-def, override]
        if frame.error_code:
            return super()._receive_goaway_frame(frame)
        ev = h2.events.ConnectionTerminated()
        ev.error_code = h2.errors.ErrorCodes.NO_ERROR  # type: ignore[attr-defined]
        ev.last_stream_id = frame.last_stream_id
        ev.additional_data = frame.additional_data or None
        return [], [ev]


class _Stream:
    """Our bookkeeping for one request stream (the h2 library keeps the protocol state)."""

    __slots__ = ("out", "out_bytes", "end", "trailers", "local_done", "remote_done",
                 "head_done", "head_request", "interim", "continues")

    def __init__(self, head_request: bool) -> None:
        self.out: deque[bytes] = deque()
        self.out_bytes = 0
        self.end = False            # the request end is queued (after ``out``)
        self.trailers: Optional[list[tuple[bytes, bytes]]] = None
        self.local_done = False     # END_STREAM went to h2
        self.remote_done = False    # the response ended (or the stream was reset)
        self.head_done = False      # the final (non-1xx) response head arrived
        self.head_request = head_request
        self.interim = 0            # bytes of 1xx heads so far (bounded: module docstring)
        self.continues = 0          # 100 Continue among them


def request_fields(method: bytes, target: bytes, scheme: bytes, authority: bytes,
                   headers: Iterable[tuple[bytes, bytes]], te_trailers: bool = False
                   ) -> list[tuple[bytes, bytes]]:
    """An HTTP/1-style request head -> an HTTP/2 header list.

    Names lower-cased; connection-specific fields dropped; the first Host becomes
    ``:authority`` (``authority`` when there is none); ``te: trailers`` sent when
    ``te_trailers`` (gRPC needs it, RFC 9113 8.2.2 allows only that value)."""
    host: Optional[bytes] = None
    regular: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        lname = name.lower()
        if lname in _DROP:
            if lname == b"host" and host is None:
                host = value
            continue
        regular.append((lname, value))
    fields = [(b":method", method), (b":scheme", scheme), (b":authority", host or authority),
              (b":path", target)]
    if te_trailers:
        fields.append((b"te", b"trailers"))
    fields.extend(regular)
    return fields


def _response_head(fields: Iterable[tuple[bytes, bytes]]
                   ) -> tuple[int, Headers, Optional[int], int]:
    """A response (or 1xx) header list h2 validated -> (status, the regular fields, the
    content-length, the head's size as HTTP/1 would count it). The status is 0 when it is
    no three-digit code, or when a field holds what an HTTP/1 origin could not send (see
    ``_NAME_CHARS``): the caller refuses the response as malformed."""
    status = 0
    items: list[tuple[bytes, bytes]] = []
    keys: list[bytes] = []
    values: list[bytes] = []
    length: Optional[int] = None
    for name, value in fields:
        values.append(value)
        if name == b":status":
            # three digits (RFC 9110 15); anything else stays 0, which the caller refuses
            status = int(value) if len(value) == 3 and value.isdigit() else 0
            continue
        if name[:1] == b":":
            continue  # h2 already refused unknown pseudo-headers
        if name == b"content-length":
            length = int(value)
        items.append((name, value))
        keys.append(name)
    # What an HTTP/1 origin could not send, checked over all the fields at once (two
    # translates a response, not two a field): a name byte that is no token character, a
    # control byte in a value. (":" passes the name check: pseudo-headers are h2's to judge.)
    names = b":status" + b"".join(keys)
    joined = b"".join(values)
    if names.translate(None, _NAME_CHARS) or len(joined.translate(None, _CTL)) != len(joined):
        status = 0
    size = 32 + len(names) + len(joined) + 4 * len(values)
    return status, Headers._from_parser(items, keys), length, size


class H2ClientConn:
    """The client side of one HTTP/2 connection to an upstream.

    ``settings_received`` turns True with the upstream's first SETTINGS; ``goaway`` holds the
    GoAway once one arrived (no new stream after it); ``closed`` is True after a fatal error.
    """

    __slots__ = ("conn", "streams", "settings_received", "goaway", "closed", "stream_window",
                 "connection_window", "max_header_list_size", "streams_opened",
                 "data_frames_sent", "_overhead", "_overhead_at")

    def __init__(self, stream_window: int = 256 * 1024, connection_window: int = 1024 * 1024,
                 max_header_list_size: int = 65536) -> None:
        config = h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_inbound_headers=True,
            normalize_inbound_headers=False, validate_outbound_headers=True,
            normalize_outbound_headers=False)
        self.conn = _Connection(config=config)
        hpack_cache.install(self.conn)
        self.conn.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: max_header_list_size,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
        })
        self.streams: dict[int, _Stream] = {}
        self.settings_received = False
        self.goaway: Optional[GoAway] = None
        self.closed = False
        self.stream_window = stream_window
        self.connection_window = max(connection_window, 65535)
        self.max_header_list_size = max_header_list_size  # (also the bound of 1xx heads)
        self.streams_opened = 0  # requests sent on this connection (the flood allowance)
        self.data_frames_sent = 0  # request DATA frames sent (the flood allowance too)
        self._overhead = 0.0     # overhead frames, fading (the module docstring)
        self._overhead_at = 0.0  # when _overhead was last counted

    # ------------------------------------------------------------------ connection
    def initiate(self) -> None:
        """Queue the preface, our SETTINGS and the connection window increase (call once)."""
        self.conn.initiate_connection()
        extra = self.connection_window - 65535
        if extra > 0:
            self.conn.increment_flow_control_window(extra)

    def data_to_send(self) -> bytes:
        """Bytes to write to the socket now (empty when there is nothing)."""
        return self.conn.data_to_send()

    @property
    def max_concurrent_streams(self) -> int:
        """The upstream's SETTINGS_MAX_CONCURRENT_STREAMS (h2's default until it says)."""
        return self.conn.remote_settings.max_concurrent_streams

    def can_open(self) -> bool:
        """A new stream may be opened (no GOAWAY, no fatal error, ids left)."""
        return not self.closed and self.goaway is None and \
            self.conn.highest_outbound_stream_id < 2 ** 31 - 3

    def close(self, code: int = NO_ERROR) -> None:
        """Say GOAWAY (we open no more streams); the caller closes the socket."""
        if self.closed:
            return
        self.closed = True
        try:
            self.conn.close_connection(code)
        except h2.exceptions.ProtocolError:
            pass

    # ------------------------------------------------------------------ requests
    def start_request(self, fields: list[tuple[bytes, bytes]], end: bool,
                      head_request: bool = False) -> int:
        """Open a stream with ``fields`` (see ``request_fields``); ``end``: no body follows.
        Returns the stream id. Raises H2ClientError when it cannot (nothing was sent)."""
        if not self.can_open():
            raise H2ClientError("the upstream connection takes no new streams")
        conn = self.conn
        try:
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, fields, end_stream=end)
        except h2.exceptions.TooManyStreamsError as exc:
            raise H2ClientError("upstream's concurrent stream limit reached") from exc
        except (h2.exceptions.ProtocolError, ValueError, TypeError) as exc:
            raise H2ClientError(f"cannot send the request: {exc}") from exc
        s = _Stream(head_request)
        s.local_done = s.end = end
        self.streams[sid] = s
        self.streams_opened += 1
        return sid

    def send_body(self, sid: int, data: bytes) -> None:
        """Queue request body bytes; they go out as the flow-control windows allow."""
        s = self.streams.get(sid)
        if s is None or s.end or not data:
            return
        s.out.append(data)
        s.out_bytes += len(data)
        self._flush(sid, s)

    def send_end(self, sid: int, trailers: Optional[list[tuple[bytes, bytes]]] = None) -> None:
        """End the request (with ``trailers``) once the queued body is out."""
        s = self.streams.get(sid)
        if s is None or s.end:
            return
        s.end = True
        s.trailers = trailers or None
        self._flush(sid, s)

    def pending(self, sid: int) -> int:
        """Request body bytes of ``sid`` queued and not yet framed (0 once it is gone)."""
        s = self.streams.get(sid)
        return s.out_bytes if s is not None else 0

    def consumed(self, sid: int, n: int) -> None:
        """The caller forwarded ``n`` response bytes of ``sid``: give the window back."""
        if n > 0 and not self.closed:
            try:
                self.conn.acknowledge_received_data(n, sid)
            except (h2.exceptions.ProtocolError, KeyError):
                pass  # the stream is gone: h2 already returned its connection share

    def reset(self, sid: int, code: int = CANCEL) -> None:
        """Abandon ``sid`` (RST_STREAM unless it already ended on both sides)."""
        s = self.streams.pop(sid, None)
        if s is None or self.closed:
            return
        if s.local_done and s.remote_done:
            return
        try:
            self.conn.reset_stream(sid, code)
        except h2.exceptions.ProtocolError:
            pass
        else:
            if not s.remote_done:  # DATA it sent before our RST arrived is no flood
                self.conn.reset_credit += self.stream_window

    def _malformed(self, sid: int) -> StreamReset:
        """A malformed response (a status that is no three-digit code, a 101): a stream
        error (RFC 9113 8.1.1), reset here, and reported as the upstream's reset (502)."""
        self.reset(sid, PROTOCOL_ERROR)
        return StreamReset(sid, PROTOCOL_ERROR)

    def forget(self, sid: int) -> None:
        """The caller is done with a stream that ended cleanly."""
        s = self.streams.get(sid)
        if s is not None and s.local_done and s.remote_done:
            del self.streams[sid]
        else:
            self.reset(sid)

    def _flush_all(self) -> bool:
        """Send what the windows now let out; returns whether any stream had something."""
        waiting = False
        for sid, s in list(self.streams.items()):
            if (s.out or s.end) and not s.local_done:
                waiting = True
                self._flush(sid, s)
        return waiting

    def _flush(self, sid: int, s: _Stream) -> None:
        if s.local_done or self.closed:
            return
        conn = self.conn
        try:
            if send_queued(s, lambda: min(conn.local_flow_control_window(sid),
                                          conn.max_outbound_frame_size),
                           lambda chunk, end: self._send_data(sid, chunk, end),
                           lambda trailers: conn.send_headers(sid, trailers, end_stream=True)
                           if trailers is not None else conn.end_stream(sid)):
                s.local_done = True
        except h2.exceptions.StreamClosedError:
            # The upstream reset or finished the stream: nothing more goes out on it.
            s.out.clear()
            s.out_bytes = 0
            s.local_done = True

    def _send_data(self, sid: int, chunk: bytes, end: bool) -> None:
        """One DATA frame of a request body; each earns the upstream two overhead frames:
        a receiver may answer DATA with a WINDOW_UPDATE and a PING (grpc-go's BDP estimator
        does, on a client-streaming RPC), which is no flood."""
        self.conn.send_data(sid, chunk, end_stream=end)
        self.data_frames_sent += 1

    # ------------------------------------------------------------------ input
    def feed(self, data: bytes) -> list:
        """Process bytes from the upstream; return events (see the module docstring). A
        protocol error or a flood ends the connection: the last event is then a GoAway with
        its code and a ``reason``."""
        if self.closed:
            return []
        if len(data) <= FEED_SLICE:
            return self._feed(data)
        return feed_in_slices(data, self._feed, lambda: self.closed)

    def _overhead_check(self, out: list) -> None:
        """After each slice: fade the overhead, add the slice's, and end the connection with
        GOAWAY ENHANCE_YOUR_CALM past the limit (a GoAway event with a reason, in ``out``)."""
        conn = self.conn
        new = conn.overhead
        conn.overhead = 0
        now = _clock()
        faded = self._overhead - (now - self._overhead_at) * OVERHEAD_FADE_PER_SECOND
        overhead = self._overhead = (faded if faded > 0.0 else 0.0) + new
        self._overhead_at = now
        allowed = OVERHEAD_PER_STREAM * self.streams_opened + 2 * self.data_frames_sent
        if overhead >= MAX_OVERHEAD_FRAMES and overhead > allowed and not self.closed:
            self.close(ENHANCE_YOUR_CALM)
            out.append(GoAway(0, ENHANCE_YOUR_CALM, [],
                              f"flood of frames that carry no response ({int(overhead)} PING, "
                              f"SETTINGS, empty DATA... over {self.streams_opened} requests)"))

    def _feed(self, data: bytes) -> list:
        """One slice of ``feed``."""
        try:
            h2_events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.closed = True
            code = int(getattr(exc, "error_code", PROTOCOL_ERROR) or PROTOCOL_ERROR)
            return [GoAway(0, code, [], str(exc) or exc.__class__.__name__)]
        out: list = []
        streams = self.streams
        for ev in h2_events:
            cls = ev.__class__
            sid = getattr(ev, "stream_id", 0)
            if cls is h2.events.DataReceived:
                s = streams.get(sid)
                flow = ev.flow_controlled_length or 0
                n = len(ev.data)
                if s is None:
                    if flow:
                        self.consumed(sid, flow)  # nobody reads it any more
                    continue
                if flow > n:
                    self.consumed(sid, flow - n)  # padding
                if n:
                    out.append(Data(ev.data, sid))
            elif cls is h2.events.ResponseReceived:
                s = streams.get(sid)
                if s is None:
                    continue
                s.head_done = True
                end = ev.stream_ended is not None
                status, headers, length, _ = _response_head(ev.headers)
                if not 200 <= status <= 599:
                    out.append(self._malformed(sid))
                    continue
                if end or s.head_request or status in (204, 304):
                    body = "none"
                elif length is not None:
                    body = "length"
                else:
                    body = "stream"
                out.append(ResponseHead(status, b"", "2", headers, True, body, length, sid))
            elif cls is h2.events.InformationalResponseReceived:
                s = streams.get(sid)
                if s is not None:
                    status, headers, _, size = _response_head(ev.headers)
                    s.interim += size
                    if status == 100:
                        s.continues += 1
                    if not 100 <= status <= 199 or status == 101 or \
                            s.interim > self.max_header_list_size or \
                            s.continues > MAX_CONTINUES:  # (no 101 in HTTP/2: RFC 9113 8.6)
                        out.append(self._malformed(sid))
                        continue
                    out.append(InformationalResponse(status, headers, sid))
            elif cls is h2.events.TrailersReceived:
                s = streams.get(sid)
                if s is not None and not s.remote_done:
                    try:
                        trailers = check_trailers(ev.headers)
                    except Reject:
                        out.append(self._malformed(sid))
                        continue
                    s.remote_done = True
                    out.append(MessageEnd(trailers, sid))
            elif cls is h2.events.StreamEnded:
                s = streams.get(sid)
                if s is not None and not s.remote_done:
                    s.remote_done = True
                    out.append(MessageEnd(None, sid))
            elif cls is h2.events.StreamReset:
                s = streams.pop(sid, None)
                if s is not None:
                    s.remote_done = s.local_done = True
                    out.append(StreamReset(sid, int(ev.error_code)))
            elif cls is h2.events.RemoteSettingsChanged:
                self.settings_received = True
                out.append(SettingsChanged(self.max_concurrent_streams))
                self._flush_all()
            elif cls is h2.events.WindowUpdated:
                if not self._flush_all() and ev.delta < _SMALL_WINDOW_UPDATE:
                    self.conn.overhead += 1  # a tiny increment that lets nothing out
            elif cls is h2.events.ConnectionTerminated:
                code = int(ev.error_code or 0)
                last = ev.last_stream_id or 0
                refused = sorted(sid for sid in streams if sid > last)
                self.goaway = GoAway(last, code, refused)
                if code:
                    self.closed = True
                out.append(self.goaway)
        if self.conn.overhead:
            self._overhead_check(out)
        return out
