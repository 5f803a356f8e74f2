"""Sans-IO HTTP/2 server side: bytes in, pyngora events out, over ``protocols/h2_wire.py``.

No asyncio here (DESIGN's one-way doors): the asyncio edge is ``services/h2_app.py``. One
:class:`H2Server` per downstream connection. ``feed(data)`` returns the same events as the
HTTP/1 parser (RequestHead, Data, MessageEnd, each with its ``stream_id``) plus StreamReset,
ConnectionClosed and :class:`RequestRejected`; the responses go in through ``send_head``,
``send_body``, ``send_end``; ``data_to_send()`` says what to write to the socket.

Decisions where the RFCs leave a choice (documented in the report and tests):

- Request translation and validation (what is malformed, what gets 400, 413 or 501):
  ``protocols/h2_fields.py``, whose names are re-exported here.
- Frames, stream states, flow control and HPACK: ``protocols/h2_wire.py`` (H2Server is its
  subclass); this module decides what a request is and what the server does about it.
- Content-Length not matching the DATA received (more, or less at END_STREAM) ends the whole
  connection (GOAWAY PROTOCOL_ERROR): RFC 9113 5.4.1 lets a stream error be treated as a
  connection error, and a client lying about lengths does not deserve its other streams.
  Trailers ending a body short of its length are a stream error (400 and RST_STREAM).
- Concurrency: SETTINGS_MAX_CONCURRENT_STREAMS is advertised; streams beyond it whose
  handlers still run (the client reset them, but our work goes on: the "rapid reset" attack)
  are refused with RST_STREAM REFUSED_STREAM, which a client may retry. A client that opens
  more streams than it was told (after acknowledging the SETTINGS) gets GOAWAY
  PROTOCOL_ERROR: a connection error, which RFC 9113 5.4.1 allows for a stream error.
  A header block that does not decode (HPACK) ends the connection with COMPRESSION_ERROR
  (RFC 9113 4.3).
- Abuse: every stream the client resets before its response ended, and every refused or
  malformed stream, counts as "premature"; past ``max_premature_resets`` and more than half of
  all streams, the connection ends with GOAWAY ENHANCE_YOUR_CALM. CONTINUATION floods are
  bounded by the wire (64 frames per header block) and by ``max_header_list_size``.
- Floods of frames that cost work and carry no request (the 2019 HTTP/2 DoS family: PING,
  SETTINGS, PRIORITY, unknown types, empty or padding-only DATA, tiny WINDOW_UPDATEs,
  GOAWAYs; a SETTINGS frame one more per ten entries): each counts as "overhead", which
  fades by ``OVERHEAD_FADE_PER_SECOND`` (a long-lived gRPC stream's keepalive PINGs never
  add up); past ``max_overhead_frames`` and more than ``OVERHEAD_PER_STREAM`` per
  stream the client opened plus two per DATA frame sent (a WINDOW_UPDATE and a PING may
  answer each: grpc-go's BDP estimator on a server stream), GOAWAY ENHANCE_YOUR_CALM. Input
  is taken in slices of ``FEED_SLICE`` bytes, checked between slices, so one read of tiny
  frames cannot hold the worker's loop for long before the connection is ended. (The PING and SETTINGS ACKs such a flood asks for are
  bounded by the connection, which stops reading while the client does not read them.)
- Graceful shutdown (RFC 9113 6.8): GOAWAY with the last stream id 2^31-1 and a PING; on the
  PING's ACK, a second GOAWAY with the last stream actually seen. Streams up to it finish.
"""
from __future__ import annotations

import time
from collections import deque
from functools import partial
from typing import Callable, Iterable, Optional

from pyngora.protocols.events import ConnectionClosed, Data, MessageEnd, StreamReset
# Re-exported: this module was the home of the field rules before they got their own.
from pyngora.protocols.h2_fields import (CONNECTION_SPECIFIC, UNKNOWN_LENGTH_BODY, Reject,
                                         check_trailers, response_fields,
                                         translate_request)
from pyngora.protocols.h2_send import send_queued
from pyngora.protocols.h2_wire import (CANCEL, ENHANCE_YOUR_CALM, INTERNAL_ERROR, NO_ERROR,
                                       PREFACE, PROTOCOL_ERROR, REFUSED_STREAM,
                                       S_INITIAL_WINDOW_SIZE, S_MAX_CONCURRENT_STREAMS,
                                       S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE,
                                       ConnectionError_, H2Wire, WireStream)

__all__ = ["H2Limits", "H2Server", "RequestRejected", "PREFACE", "translate_request",
           "CONNECTION_SPECIFIC", "NO_ERROR", "PROTOCOL_ERROR", "INTERNAL_ERROR", "CANCEL",
           "REFUSED_STREAM", "ENHANCE_YOUR_CALM", "UNKNOWN_LENGTH_BODY", "response_fields"]

_MAX_STREAM_ID = 2 ** 31 - 1
_SHUTDOWN_PING = b"pyngora\x00"
# Flood control (see the module doc). One slice of tiny frames is ~1,800 frames: the most a
# flood gets processed past the limit.
FEED_SLICE = 16384
OVERHEAD_PER_STREAM = 50
OVERHEAD_FADE_PER_SECOND = 100.0
_clock = time.monotonic  # (tests move it)


def feed_in_slices(data: bytes, feed: Callable[[bytes], list], closed: Callable[[], bool]) -> list:
    """``feed`` ``data`` FEED_SLICE bytes at a time, so that each slice's frames are judged
    (overhead, limits) before the next is parsed, until ``closed()``; all slices' events.
    Both sides of the proxy use it: clients here, origins in ``h2_client``."""
    out: list = []
    view = memoryview(data)
    for i in range(0, len(data), FEED_SLICE):
        out += feed(bytes(view[i:i + FEED_SLICE]))
        if closed():
            break
    return out


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
    """Our bookkeeping for one stream (``h2_wire.WireStream`` keeps the protocol state)."""

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


class H2Server(H2Wire):
    """The server side of one HTTP/2 connection (see the module docstring for decisions).

    ``closed`` becomes True when the connection is over for the protocol (fatal error, or the
    final GOAWAY sent and every stream done): write ``data_to_send()`` then close the socket.
    ``active`` is the number of requests handed out and not yet ``release``d.
    """

    __slots__ = ("limits", "streams", "active", "closed", "error_code", "_events",
                 "_goaway_last", "_shutdown", "_streams_opened", "_premature", "_overhead",
                 "_overhead_at", "_last_sid")

    def __init__(self, limits: Optional[H2Limits] = None) -> None:
        self.limits = limits = limits or H2Limits()
        super().__init__(limits.max_header_list_size)
        self.streams: dict[int, _Stream] = {}
        self.active = 0
        self.closed = False
        self.error_code: Optional[int] = None
        self._events: list = []  # what the frames being handled make, for ``feed``
        self._goaway_last: Optional[int] = None  # the final GOAWAY's last stream id, once sent
        self._last_sid = 0  # the highest stream whose request we took up
        self._shutdown = False                   # the first (2^31-1) GOAWAY was sent
        self._streams_opened = 0
        self._premature = 0
        self._overhead = 0.0  # frames that cost work and carried no request (the module doc)
        self._overhead_at = 0.0  # when _overhead was last counted

    # ------------------------------------------------------------------ connection
    def initiate(self) -> None:
        """Queue our SETTINGS and the connection window increase (call once, first).

        MAX_CONCURRENT_STREAMS goes in a second SETTINGS frame: it binds the client (a
        connection error past it) only once the client ACKs it, and until then ``active``
        refuses the excess with REFUSED_STREAM, which a client may retry."""
        limits = self.limits
        self.send_settings({S_MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
                            S_INITIAL_WINDOW_SIZE: limits.stream_window,
                            S_MAX_FRAME_SIZE: limits.max_frame_size})
        self.send_settings({S_MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams})
        self.open_connection_window(limits.connection_window)

    def data_to_send(self) -> bytes:
        """Bytes to write to the socket now (empty when there is nothing)."""
        out = self._out
        if not out:
            return b""
        data = bytes(out)
        out.clear()
        return data

    def begin_shutdown(self) -> None:
        """Graceful stop, step 1: GOAWAY(2^31-1) and a PING; its ACK triggers step 2."""
        if self._shutdown or self.closed:
            return
        self._shutdown = True
        self.send_goaway(_MAX_STREAM_ID, NO_ERROR)
        self.send_ping(_SHUTDOWN_PING)

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
        self.send_goaway(last, code)
        if settle:
            self._check_done()

    def _fatal(self, code: int) -> None:
        """End the connection now (abuse): GOAWAY ``code``; nothing more is processed."""
        if self.closed:
            return
        # Also after a graceful GOAWAY (ours, or the client's: none of ours went out then):
        # the client learns why (RFC 9113 6.8 allows more than one, the last id not higher).
        if self._goaway_last is None:
            self._goaway_last = self.highest_inbound
        self.send_goaway(self._goaway_last, code)
        self.closed = True
        self.error_code = code
        self.wire_error = code  # (the wire stops reading)
        self._drop_streams()

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
        return feed_in_slices(data, self._feed, lambda: self.closed)

    def _feed(self, data: bytes) -> list:
        self._events = out = []
        self.receive(data)
        new = self._fresh_overhead
        if new and not self.closed:
            self._fresh_overhead = 0
            now = _clock()
            faded = self._overhead - (now - self._overhead_at) * OVERHEAD_FADE_PER_SECOND
            overhead = self._overhead = (faded if faded > 0.0 else 0.0) + new
            self._overhead_at = now
            if (overhead >= self.limits.max_overhead_frames and overhead
                    > OVERHEAD_PER_STREAM * self._streams_opened + 2 * self.data_frames_sent):
                self._fatal(ENHANCE_YOUR_CALM)
                out.append(ConnectionClosed(self.highest_inbound))
        self._events = []
        self._check_done()
        return out

    def _on_connection_error(self, code: int, reason: str) -> None:
        self.closed = True
        self.error_code = code
        self._drop_streams()
        self._events.append(ConnectionClosed(self.highest_inbound))

    def _drop_streams(self) -> None:
        """The connection ended (our GOAWAY with an error is queued): nothing more may be
        sent on any stream, so every ``send_*`` is a no-op from now on."""
        self.streams.clear()
        self.wire_streams.clear()

    def _on_headers(self, sid: int, fields: list, end: bool, trailers: bool) -> None:
        if trailers:
            self._on_trailers(sid, fields)
            return
        out = self._events
        self._streams_opened += 1
        if self._goaway_last is not None and sid > self._goaway_last:
            self._refuse(sid, REFUSED_STREAM, "stream opened after GOAWAY", premature=False)
            return
        self._last_sid = sid
        if self.active >= self.limits.max_concurrent_streams:
            self._refuse(sid, REFUSED_STREAM, "too many concurrent streams")
            return
        s = _Stream()
        s.remote_done = end
        self.streams[sid] = s
        try:
            head = translate_request(fields, sid, end, self.limits.max_body_bytes)
            s.length = head.content_length
        except Reject as rej:
            if rej.status == 0:
                del self.streams[sid]
                self._refuse(sid, PROTOCOL_ERROR, rej.reason)
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

    def _refuse(self, sid: int, code: int, reason: str, premature: bool = True) -> None:
        self.reset_stream(sid, code)
        self._events.append(RequestRejected(sid, 0, code, reason))
        if premature:
            self._premature += 1
            self._abuse_check()

    def _abuse_check(self) -> None:
        p = self._premature
        if p >= self.limits.max_premature_resets and p * 2 > self._streams_opened:
            self._fatal(ENHANCE_YOUR_CALM)

    def _on_data(self, sid: int, data: bytes, flow: int, end: bool) -> None:
        s = self.streams.get(sid)
        if s is None or s.rejected or s.ended:
            # Nobody will read it (refused, answered already): hand the window back now.
            if flow:
                self.data_read(sid, flow)
            if s is not None and end:
                s.remote_done = True
                self._maybe_forget(sid, s)
            return
        n = len(data)
        if flow > n:
            self.data_read(sid, flow - n)  # padding
        got = s.body_bytes = s.body_bytes + n
        length = s.length
        if length is not None and (got > length or end and got != length):
            # RFC 9113 8.1.1: malformed. A connection error (as the h2 library made it): a
            # client lying about lengths does not deserve its other streams.
            raise ConnectionError_(PROTOCOL_ERROR, f"{got} body bytes for a content-length "
                                                   f"of {length}")
        limit = self.limits.max_body_bytes
        if limit is not None and got > limit:
            s.rejected = True
            self.data_read(sid, n)
            self._events.append(RequestRejected(sid, 413, NO_ERROR, "request body too large"))
            return
        if n:
            self._events.append(Data(data, sid))
        if end:
            s.remote_done = True
            self._events.append(MessageEnd(None, sid))

    def _on_trailers(self, sid: int, fields: list) -> None:
        s = self.streams.get(sid)
        if s is None:
            return
        s.remote_done = True
        if s.rejected or s.ended:
            self._maybe_forget(sid, s)
            return
        try:
            if s.length is not None and s.body_bytes != s.length:
                # RFC 9113 8.1.1, whatever ends the stream. Passed on, the origin would read
                # the next request on the pooled connection as the rest of this body.
                raise Reject(0, f"{s.body_bytes} body bytes for a content-length of {s.length}")
            trailers = check_trailers(fields)
        except Reject as rej:
            s.rejected = True
            self.reset(sid, PROTOCOL_ERROR)
            self._events.append(RequestRejected(sid, 400, PROTOCOL_ERROR, rej.reason))
            return
        self._events.append(MessageEnd(trailers, sid))

    def _on_rst(self, sid: int, code: int) -> None:
        s = self.streams.pop(sid, None)
        if s is None:
            return
        if not s.ended:
            self._premature += 1  # reset before its response ended
        s.ended = s.reset = s.remote_done = True
        self._events.append(StreamReset(sid, code))
        self._abuse_check()

    def _on_stream_error(self, sid: int, code: int) -> None:
        # We reset it for the client's error: for the application, as if the client had.
        self._on_rst(sid, code)

    def _on_window(self, sid: int) -> bool:
        before = len(self._out)
        if sid:
            s = self.streams.get(sid)
            if s is not None and (s.out or s.end):
                self._flush(sid, s)
        else:
            for sid, s in list(self.streams.items()):
                if s.out or s.end:
                    self._flush(sid, s)
        return len(self._out) > before

    def _on_ping_ack(self, data: bytes) -> None:
        if data == _SHUTDOWN_PING:
            # (HEADERS after the ACK in the same read come after this GOAWAY's last)
            self.goaway(settle=False)

    def _on_goaway(self, last: int, code: int) -> None:
        if code:
            self.closed = True
            self.error_code = code
            self.wire_error = code  # (nothing more is read)
            self._drop_streams()
        else:
            draining = self._shutdown
            if self._goaway_last is None:
                # A graceful GOAWAY from the client: our in-flight responses still go out.
                self._shutdown = True
                self._goaway_last = self.highest_inbound
            if draining:
                return  # the connection layer drains already: a repeat tells it nothing
        self._events.append(ConnectionClosed(last))

    # ------------------------------------------------------------------ output
    def send_head(self, sid: int, status: int, fields: Iterable[tuple[bytes, bytes]],
                  end: bool = False) -> None:
        """The response head. ``fields``: lower-case names, no connection-specific ones (see
        ``response_fields``). ``end``: no body follows."""
        s = self.streams.get(sid)
        ws = self.wire_streams.get(sid)
        if s is None or s.ended or ws is None:
            return
        headers = [(b":status", b"%d" % status)]
        headers.extend(fields)
        self.send_headers(sid, ws, headers, end)
        if end:
            self._ended(sid, s)

    def send_informational(self, sid: int, status: int,
                           fields: Iterable[tuple[bytes, bytes]] = ()) -> None:
        """A 1xx before the final response (100 Continue, 103 Early Hints)."""
        s = self.streams.get(sid)
        ws = self.wire_streams.get(sid)
        if s is None or s.ended or ws is None:
            return
        headers = [(b":status", b"%d" % status)]
        headers.extend(fields)
        self.send_headers(sid, ws, headers, False)

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
        self.reset_stream(sid, code)
        self._check_done()

    def consumed(self, sid: int, n: int) -> None:
        """The application read ``n`` body bytes of ``sid``: give the window back."""
        if n > 0 and not self.closed:
            self.data_read(sid, n)

    def release(self, sid: int) -> None:
        """The handler of ``sid`` is done (its response is queued or the stream was reset):
        it no longer counts against the concurrent-stream limit."""
        if self.active > 0:
            self.active -= 1
        self._check_done()

    def _flush(self, sid: int, s: _Stream) -> None:
        """Send what ``sid`` has queued as far as the windows allow, then its end."""
        if s.ended:
            return
        ws = self.wire_streams.get(sid)
        if ws is None:
            return  # reset meanwhile
        if send_queued(s, partial(self.window, ws), partial(self.send_data, sid, ws),
                       partial(self._finish, sid, ws)):
            self._ended(sid, s)

    def _finish(self, sid: int, ws: WireStream, trailers: Optional[list]) -> None:
        if trailers is not None:
            self.send_headers(sid, ws, trailers, True)
        else:
            self.send_data(sid, ws, b"", True)

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
            self.reset_stream(sid, NO_ERROR)
        self.streams.pop(sid, None)
        self._check_done()
