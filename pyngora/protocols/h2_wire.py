"""The server side of HTTP/2's wire, sans-IO: frames, stream states, flow control and HPACK.

:class:`H2Wire` cuts frames from the client's bytes, keeps RFC 9113's rules (frame sizes,
stream states and identifiers, SETTINGS, both flow-control windows, header blocks across
CONTINUATION), and hands what a server acts on to its subclass through ``_on_*`` methods:
``protocols/h2.py``'s ``H2Server`` (request semantics, limits, abuse, shutdown). The frames it
sends are built into one output buffer (``_out``).

Why our own frame layer rather than ``h2.connection.H2Connection`` (which pyngora's upstream
HTTP/2 client still uses): on the downstream request path the library cost ~120 us of CPU
per stream in a proxy with nothing else on top (frame objects, an event object per frame, a
state machine walked per event, trace-log formatting of every frame); this layer does the
same work in a few attribute updates per frame, which is what let the h2 scenario of
``tests/bench/`` reach its target (``tests/bench/RESULTS.md``). HPACK stays the ``hpack``
package (h2's own), with ``hpack_cache``'s coders. ``tests/unit/test_h2_wire.py`` checks this
layer against the library frame by frame on valid and invalid input.

Decisions where the RFC leaves a choice:

- A stream-level flow-control violation is a connection error (RFC 9113 5.4.1 allows one
  for any stream error).
- Frames on a stream we reset are ignored (its DATA still counts against, and is returned to,
  the connection window): the client may not have seen our RST_STREAM yet (RFC 9113 5.1).
  DATA or HEADERS on a stream closed otherwise is a connection error STREAM_CLOSED. The last
  :data:`RESET_MEMORY` closed streams are remembered; frames on an older one are ignored
  too (telling would take memory per stream for the connection's life; they are counted
  as overhead). An id the client jumped over is closed (RFC 9113 5.1.1): HEADERS on it is
  PROTOCOL_ERROR, DATA STREAM_CLOSED; the last :data:`SKIPPED_MEMORY` jumps are remembered,
  as ranges.
- A header block spread over more than :data:`MAX_CONTINUATIONS` CONTINUATION frames, or
  larger than twice the header list limit before decoding, ends the connection
  (PROTOCOL_ERROR): the CONTINUATION flood.
- A header block that does not decode, or decodes past the header list limit, ends it with
  COMPRESSION_ERROR (RFC 9113 4.3: HPACK state is lost).
- Our receive windows are returned in batches, as the h2 library does: once half of a window
  was read by the application (or sooner when the window is shut), one WINDOW_UPDATE.
"""
from __future__ import annotations

import struct
from collections import deque
from typing import Optional

from hpack.exceptions import HPACKError

from pyngora.protocols.h2_frames import (ACK, CANCEL, COMPRESSION_ERROR, CONTINUATION, DATA,
                                         DEFAULT_WINDOW, END_HEADERS, END_STREAM,
                                         ENHANCE_YOUR_CALM, FLOW_CONTROL_ERROR,
                                         FRAME_SIZE_ERROR, GOAWAY, HEADERS, INTERNAL_ERROR,
                                         MAX_WINDOW, NO_ERROR, PADDED, PING, PREFACE, PRIORITY,
                                         PRIORITY_FLAG, PROTOCOL_ERROR, PUSH_PROMISE,
                                         REFUSED_STREAM, RST_STREAM, S_ENABLE_PUSH,
                                         S_HEADER_TABLE_SIZE, S_INITIAL_WINDOW_SIZE,
                                         S_MAX_CONCURRENT_STREAMS, S_MAX_FRAME_SIZE,
                                         S_MAX_HEADER_LIST_SIZE, SETTINGS, SETTINGS_ACK,
                                         STREAM_CLOSED, WINDOW_UPDATE, ConnectionError_,
                                         WireStream, frame, head, u32)
from pyngora.protocols.h2_settings import ENTRIES_PER_OVERHEAD, read_settings
from pyngora.protocols.hpack_cache import CachingDecoder, CachingEncoder

# (error codes, SETTINGS identifiers and ``frame`` re-exported for the server and tests)
__all__ = ["H2Wire", "WireStream", "ConnectionError_", "PREFACE", "MAX_CONTINUATIONS",
           "RESET_MEMORY", "SKIPPED_MEMORY", "ENCODER_TABLE_MAX", "NO_ERROR", "PROTOCOL_ERROR",
           "INTERNAL_ERROR", "FLOW_CONTROL_ERROR", "STREAM_CLOSED", "FRAME_SIZE_ERROR",
           "REFUSED_STREAM", "CANCEL", "COMPRESSION_ERROR", "ENHANCE_YOUR_CALM",
           "S_HEADER_TABLE_SIZE", "S_ENABLE_PUSH", "S_MAX_CONCURRENT_STREAMS",
           "S_INITIAL_WINDOW_SIZE", "S_MAX_FRAME_SIZE", "S_MAX_HEADER_LIST_SIZE", "frame"]

MAX_CONTINUATIONS = 64
RESET_MEMORY = 256
SKIPPED_MEMORY = 16
ENCODER_TABLE_MAX = 4096
_SMALL_WINDOW_UPDATE = 1024  # smaller increments that send nothing count as overhead


class H2Wire:
    """The frame layer of one downstream HTTP/2 connection (see the module docstring).

    ``wire_streams``: the streams not yet closed at both ends. ``highest_inbound``: the
    highest stream id the client opened. ``wire_error``: the code of the connection error
    that ended it, or None. Subclasses implement the ``_on_*`` methods; each runs while a
    frame is being handled and may send frames or reset streams.
    """

    __slots__ = ("_out", "_buf", "_preface_seen", "_settings_seen", "decoder", "encoder",
                 "wire_streams", "highest_inbound", "wire_error", "send_window",
                 "_recv_window", "_recv_max", "_recv_read", "_local_initial",
                 "_local_max_streams", "_max_inbound_frame", "_pending_settings",
                 "peer_initial", "peer_max_frame", "_block", "_block_sid", "_block_flags",
                 "_block_frames", "_block_limit", "_recent", "_skipped", "_fresh_overhead",
                 "data_frames_sent")

    def __init__(self, header_list_size: int) -> None:
        self._out = bytearray()
        self._buf = b""
        self._preface_seen = False
        self._settings_seen = False
        self.decoder = CachingDecoder(header_list_size)
        self.encoder = CachingEncoder()
        self.wire_streams: dict[int, WireStream] = {}
        self.highest_inbound = 0
        self.wire_error: Optional[int] = None
        self.send_window = DEFAULT_WINDOW        # the connection's, as the client allows
        self._recv_window = DEFAULT_WINDOW       # the connection's, as we allow
        self._recv_max = DEFAULT_WINDOW
        self._recv_read = 0
        # Our settings take effect when the client acknowledges them (RFC 9113 6.5.3).
        self._local_initial = DEFAULT_WINDOW
        self._local_max_streams: Optional[int] = None
        self._max_inbound_frame = 16384
        self._pending_settings: deque[dict[int, int]] = deque()
        self.peer_initial = DEFAULT_WINDOW
        self.peer_max_frame = 16384
        self._block: Optional[bytearray] = None  # a header block awaiting CONTINUATION
        self._block_sid = 0
        self._block_flags = 0
        self._block_frames = 0
        self._block_limit = 2 * header_list_size
        self._recent: dict[int, bool] = {}  # closed streams: sid -> we reset it
        self._skipped: list[tuple[int, int]] = []  # ids the client jumped over (ranges)
        self._fresh_overhead = 0  # frames that carried no request, since the caller looked
        self.data_frames_sent = 0  # each raises the flood allowance (h2.py: BDP pings)

    # ------------------------------------------------------------------ sending
    def send_settings(self, settings: dict[int, int]) -> None:
        """Queue a SETTINGS frame; its values apply to us once the client ACKs it."""
        payload = b"".join(struct.pack(">HI", k, v) for k, v in settings.items())
        self._out += frame(SETTINGS, 0, 0, payload)
        self._pending_settings.append(dict(settings))

    def open_connection_window(self, size: int) -> None:
        """Raise the connection's receive window to ``size`` (once, at the start)."""
        extra = size - self._recv_max
        if extra > 0:
            self._recv_max = size
            self._recv_window += extra
            self._out += frame(WINDOW_UPDATE, 0, 0, u32(extra))

    def send_headers(self, sid: int, ws: WireStream, fields: list, end: bool) -> None:
        """A header block (split into CONTINUATION frames past the client's frame size)."""
        block = self.encoder.encode(fields)
        flags = END_STREAM if end else 0
        limit = self.peer_max_frame
        out = self._out
        n = len(block)
        if n <= limit:
            out += head(n >> 16, n & 0xFFFF, HEADERS, flags | END_HEADERS, sid)
            out += block
        else:
            out += frame(HEADERS, flags, sid, block[:limit])
            for i in range(limit, n, limit):
                part = block[i:i + limit]
                out += frame(CONTINUATION, END_HEADERS if i + limit >= n else 0, sid, part)
        if end:
            self._local_end(sid, ws)

    def send_data(self, sid: int, ws: WireStream, data: bytes, end: bool) -> None:
        """One DATA frame; the caller kept within ``window(ws)``."""
        n = len(data)
        self.send_window -= n
        ws.send_window -= n
        self.data_frames_sent += 1
        out = self._out
        out += head(n >> 16, n & 0xFFFF, DATA, END_STREAM if end else 0, sid)
        if n:
            out += data
        if end:
            self._local_end(sid, ws)

    def window(self, ws: WireStream) -> int:
        """How many body bytes may go out on ``ws`` in the next DATA frame."""
        w = self.send_window
        if ws.send_window < w:
            w = ws.send_window
        return w if w < self.peer_max_frame else self.peer_max_frame

    def _local_end(self, sid: int, ws: WireStream) -> None:
        ws.local_closed = True
        if ws.remote_closed:
            self._forget(sid, False)

    def reset_stream(self, sid: int, code: int) -> None:
        """RST_STREAM ``code`` on a stream still open at either end (else nothing)."""
        if sid not in self.wire_streams:
            return
        self._forget(sid, True)
        self._out += frame(RST_STREAM, 0, sid, u32(code))

    def send_goaway(self, last: int, code: int) -> None:
        self._out += frame(GOAWAY, 0, 0, u32(last) + u32(code))

    def send_ping(self, data: bytes) -> None:
        self._out += frame(PING, 0, 0, data)

    def data_read(self, sid: int, n: int) -> None:
        """``n`` flow-controlled bytes of ``sid`` were read (or dropped): both windows may
        be returned to the client (in batches, see the module docstring)."""
        read = self._recv_read + n
        window = self._recv_window
        if read >= self._recv_max // 2 or (window == 0 and read > 1024):
            self._recv_read = 0
            self._recv_window = window + read
            self._out += frame(WINDOW_UPDATE, 0, 0, u32(read))
        else:
            self._recv_read = read
        ws = self.wire_streams.get(sid)
        if ws is None or ws.remote_closed:
            return  # nothing more will come on it: its window does not matter
        ws.recv_read += n
        self._return_window(sid, ws)

    def _return_window(self, sid: int, ws: WireStream) -> None:
        """WINDOW_UPDATE for what ``ws`` read, once it is half its window, or over 1 KiB
        while the window is shut. Called again when our INITIAL_WINDOW_SIZE takes effect:
        a smaller one shuts the window (even below 0) with nothing more to read."""
        read = ws.recv_read
        if read >= ws.recv_max // 2 or (ws.recv_window <= 0 and read > 1024):
            ws.recv_read = 0
            ws.recv_window += read
            self._out += frame(WINDOW_UPDATE, 0, sid, u32(read))

    # ------------------------------------------------------------------ receiving
    def receive(self, data: bytes) -> None:
        """Handle the client's bytes: the ``_on_*`` methods run frame by frame. Raises
        nothing: a connection error queues its GOAWAY, sets ``wire_error`` and calls
        ``_on_connection_error``."""
        if self.wire_error is not None:
            return
        try:
            self._receive(data)
        except ConnectionError_ as exc:
            self.wire_error = exc.code
            self._buf = b""
            self.send_goaway(self.highest_inbound, exc.code)
            self._on_connection_error(exc.code, str(exc))

    def _receive(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        if not self._preface_seen:
            if len(buf) < 24:
                if not PREFACE.startswith(buf):
                    raise ConnectionError_(PROTOCOL_ERROR, "not the HTTP/2 preface")
                self._buf = buf
                return
            if buf[:24] != PREFACE:
                raise ConnectionError_(PROTOCOL_ERROR, "not the HTTP/2 preface")
            self._preface_seen = True
            buf = buf[24:]
        i = 0
        n = len(buf)
        limit = self._max_inbound_frame
        while n - i >= 9:
            length = buf[i] << 16 | buf[i + 1] << 8 | buf[i + 2]
            if length > limit:
                raise ConnectionError_(FRAME_SIZE_ERROR, f"a frame of {length} bytes")
            end = i + 9 + length
            if end > n:
                break
            typ = buf[i + 3]
            flags = buf[i + 4]
            sid = (buf[i + 5] << 24 | buf[i + 6] << 16 | buf[i + 7] << 8 | buf[i + 8]) \
                & 0x7FFFFFFF
            payload = buf[i + 9:end]
            i = end
            if self._block is not None and (typ != CONTINUATION or sid != self._block_sid):
                raise ConnectionError_(PROTOCOL_ERROR, "a header block cut by another frame")
            if not self._settings_seen:
                if typ != SETTINGS or flags & ACK:
                    raise ConnectionError_(PROTOCOL_ERROR, "the preface's SETTINGS missing")
                self._settings_seen = True
            if typ == DATA:
                self._data(sid, flags, payload)
            elif typ == HEADERS:
                self._headers(sid, flags, payload)
            elif typ == WINDOW_UPDATE:
                self._window_update(sid, payload)
            elif typ == CONTINUATION:
                self._continuation(sid, flags, payload)
            elif typ == RST_STREAM:
                self._rst(sid, payload)
            elif typ == SETTINGS:
                self._settings(sid, flags, payload)
                limit = self._max_inbound_frame
            elif typ == PING:
                self._ping(sid, flags, payload)
            elif typ == PRIORITY:
                self._priority(sid, payload)
            elif typ == GOAWAY:
                if sid:
                    raise ConnectionError_(PROTOCOL_ERROR, "GOAWAY on a stream")
                if length < 8:
                    raise ConnectionError_(FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes")
                self._fresh_overhead += 1  # one is news; a stream of them, a flood
                self._on_goaway(int.from_bytes(payload[:4], "big") & 0x7FFFFFFF,
                                int.from_bytes(payload[4:8], "big"))
            elif typ == PUSH_PROMISE:
                raise ConnectionError_(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
            else:
                self._fresh_overhead += 1  # an unknown type: ignored (RFC 9113 5.5)
            if self.wire_error is not None:
                return
        self._buf = buf[i:] if i < n else b""

    def _closed_stream(self, sid: int, what: str) -> None:
        """A DATA or HEADERS frame on a stream not open. Ignored (counted as overhead) if we
        reset the stream, or if it closed too long ago to tell how; a connection error
        STREAM_CLOSED if it closed lately at both ends, PROTOCOL_ERROR if it is idle."""
        if sid > self.highest_inbound or not sid & 1:
            raise ConnectionError_(PROTOCOL_ERROR, f"{what} on idle stream {sid}")
        by_us = self._recent.get(sid)
        if by_us is False:
            raise ConnectionError_(STREAM_CLOSED, f"{what} on closed stream {sid}")
        if by_us is None:
            for low, high in self._skipped:
                if low <= sid <= high:  # closed by RFC 9113 5.1.1; opening it: PROTOCOL_ERROR
                    raise ConnectionError_(PROTOCOL_ERROR if what == "HEADERS" else STREAM_CLOSED,
                                           f"{what} on skipped stream {sid}")
        self._fresh_overhead += 1

    def _forget(self, sid: int, by_us: bool) -> None:
        """``sid`` is closed: remember for a while how (see ``_closed_stream``)."""
        del self.wire_streams[sid]
        recent = self._recent
        recent[sid] = by_us
        if len(recent) > RESET_MEMORY:
            del recent[next(iter(recent))]

    def _data(self, sid: int, flags: int, payload: bytes) -> None:
        if not sid:
            raise ConnectionError_(PROTOCOL_ERROR, "DATA on stream 0")
        flow = len(payload)
        if flow > self._recv_window:
            raise ConnectionError_(FLOW_CONTROL_ERROR, "DATA past the connection window")
        self._recv_window -= flow
        if flags & PADDED:
            if not flow or payload[0] >= flow:
                raise ConnectionError_(PROTOCOL_ERROR, "padding longer than the frame")
            payload = payload[1:flow - payload[0]]
        ws = self.wire_streams.get(sid)
        if ws is None:
            self._closed_stream(sid, "DATA")
            self.data_read(sid, flow)  # nobody reads it: the connection window comes back
            return
        if ws.remote_closed:
            self.data_read(sid, flow)
            self._stream_error(sid, STREAM_CLOSED)
            return
        if flow > ws.recv_window:
            raise ConnectionError_(FLOW_CONTROL_ERROR, f"DATA past stream {sid}'s window")
        ws.recv_window -= flow
        end = flags & END_STREAM
        if end:
            ws.remote_closed = True
            if ws.local_closed:
                self._forget(sid, False)
        elif not payload:
            # A DATA frame that carries nothing and ends nothing (empty, or padding only:
            # padding is returned to the client at once, so it costs the flood no window)
            self._fresh_overhead += 1
        self._on_data(sid, payload, flow, bool(end))

    def _headers(self, sid: int, flags: int, payload: bytes) -> None:
        if not sid or not sid & 1:
            raise ConnectionError_(PROTOCOL_ERROR, f"HEADERS on stream {sid}")
        if flags & (PADDED | PRIORITY_FLAG):
            start = 0
            stop = len(payload)
            if flags & PADDED:
                if not stop or payload[0] >= stop:
                    raise ConnectionError_(PROTOCOL_ERROR, "padding longer than the frame")
                stop -= payload[0]
                start = 1
            if flags & PRIORITY_FLAG:
                if stop - start < 5:
                    raise ConnectionError_(FRAME_SIZE_ERROR, "HEADERS too short for priority")
                if int.from_bytes(payload[start:start + 4], "big") & 0x7FFFFFFF == sid:
                    raise ConnectionError_(PROTOCOL_ERROR, "a stream depending on itself")
                start += 5
            payload = payload[start:stop]
        if not flags & END_HEADERS:
            self._block = bytearray(payload)
            self._block_sid = sid
            self._block_flags = flags
            self._block_frames = 0
            return
        self._header_block(sid, flags, payload)

    def _continuation(self, sid: int, flags: int, payload: bytes) -> None:
        block = self._block
        if block is None:
            raise ConnectionError_(PROTOCOL_ERROR, "CONTINUATION without HEADERS")
        block += payload
        self._block_frames += 1
        if self._block_frames > MAX_CONTINUATIONS or len(block) > self._block_limit:
            raise ConnectionError_(PROTOCOL_ERROR, "a header block too long or in too many "
                                                   "CONTINUATION frames")
        if flags & END_HEADERS:
            self._block = None
            self._header_block(sid, self._block_flags, bytes(block))

    def _header_block(self, sid: int, flags: int, block: bytes) -> None:
        # Decoded first, whatever becomes of the stream: HPACK state is the connection's.
        try:
            fields = self.decoder.decode(block, raw=True)
        except HPACKError as exc:
            raise ConnectionError_(COMPRESSION_ERROR, f"header block: {exc}") from exc
        end = bool(flags & END_STREAM)
        ws = self.wire_streams.get(sid)
        if ws is not None:  # trailers
            if ws.remote_closed:
                self._stream_error(sid, STREAM_CLOSED)
                return
            if not end:
                raise ConnectionError_(PROTOCOL_ERROR, "a second HEADERS without END_STREAM")
            ws.remote_closed = True
            if ws.local_closed:
                self._forget(sid, False)
            self._on_headers(sid, fields, True, True)
            return
        if sid <= self.highest_inbound:
            self._closed_stream(sid, "HEADERS")
            return
        most = self._local_max_streams
        if most is not None and len(self.wire_streams) >= most:
            # (before it counts as the highest: the GOAWAY says it was not processed)
            raise ConnectionError_(PROTOCOL_ERROR, "more streams than SETTINGS allowed")
        if sid > self.highest_inbound + 2:
            skipped = self._skipped
            skipped.append((self.highest_inbound + 2, sid - 2))
            if len(skipped) > SKIPPED_MEMORY:
                del skipped[0]
        self.highest_inbound = sid
        ws = self.wire_streams[sid] = WireStream(self.peer_initial, self._local_initial)
        if end:
            ws.remote_closed = True
        self._on_headers(sid, fields, end, False)

    def _stream_error(self, sid: int, code: int) -> None:
        self.reset_stream(sid, code)
        self._on_stream_error(sid, code)

    def _rst(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionError_(FRAME_SIZE_ERROR, "RST_STREAM not 4 bytes")
        if not sid:
            raise ConnectionError_(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if sid > self.highest_inbound or not sid & 1:
            raise ConnectionError_(PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
        if sid in self.wire_streams:
            self._forget(sid, False)
            self._on_rst(sid, int.from_bytes(payload, "big"))
        else:
            self._fresh_overhead += 1  # closed already: it may cross ours, or be a flood

    def _window_update(self, sid: int, payload: bytes) -> None:
        """A small increment (under 1 KiB) that sends nothing counts as overhead (the 2019
        floods); one that lets waiting data go out is a client reading with a small window,
        which it may choose (nginx serves it too)."""
        if len(payload) != 4:
            raise ConnectionError_(FRAME_SIZE_ERROR, "WINDOW_UPDATE not 4 bytes")
        inc = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if not sid:
            if not inc:
                raise ConnectionError_(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            w = self.send_window + inc
            if w > MAX_WINDOW:
                raise ConnectionError_(FLOW_CONTROL_ERROR, "the connection window past 2^31-1")
            was = self.send_window
            self.send_window = w
            # Each flush leaves the connection window at 0 or every waiting stream shut by
            # its own: if it was open, this update can move nothing (and walks no stream).
            if (was > 0 or not self._on_window(0)) and inc < _SMALL_WINDOW_UPDATE:
                self._fresh_overhead += 1
            return
        ws = self.wire_streams.get(sid)
        if ws is None:
            if sid > self.highest_inbound or not sid & 1:
                raise ConnectionError_(PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
            self._fresh_overhead += 1
            return  # closed: it may cross our END_STREAM or RST_STREAM (RFC 9113 6.9)
        if not inc:
            self._stream_error(sid, PROTOCOL_ERROR)
            return
        w = ws.send_window + inc
        if w > MAX_WINDOW:
            self._stream_error(sid, FLOW_CONTROL_ERROR)
            return
        ws.send_window = w
        if not self._on_window(sid) and inc < _SMALL_WINDOW_UPDATE:
            self._fresh_overhead += 1

    def _settings(self, sid: int, flags: int, payload: bytes) -> None:
        if sid:
            raise ConnectionError_(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise ConnectionError_(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            if self._pending_settings:
                self._settings_acked(self._pending_settings.popleft())
            else:
                self._fresh_overhead += 1  # an ACK of nothing
            return
        values, top = read_settings(payload)  # (folded, applied once: see h2_settings)
        self._fresh_overhead += 1 + len(payload) // (6 * ENTRIES_PER_OVERHEAD)
        opened = False
        value = values.get(S_INITIAL_WINDOW_SIZE)
        if value is not None:
            streams = self.wire_streams
            if streams and top > self.peer_initial and top - self.peer_initial + max(
                    ws.send_window for ws in streams.values()) > MAX_WINDOW:
                raise ConnectionError_(FLOW_CONTROL_ERROR, "a stream window past 2^31-1")
            delta = value - self.peer_initial
            if delta:
                self.peer_initial = value
                for ws in streams.values():
                    ws.send_window += delta
                opened = delta > 0
        value = values.get(S_MAX_FRAME_SIZE)
        if value is not None:
            self.peer_max_frame = value
            opened = True
        value = values.get(S_HEADER_TABLE_SIZE)
        if value is not None:
            # The client's decoder may hold that much; our encoder keeps to the default
            # at most (RFC 7541 4.2 lets it use less): a bigger table would be memory
            # per connection, and hpack searches it field by field on every response.
            self.encoder.header_table_size = min(value, ENCODER_TABLE_MAX)
        self._out += SETTINGS_ACK
        if opened:
            self._on_window(0)

    def _settings_acked(self, settings: dict[int, int]) -> None:
        for ident, value in settings.items():
            if ident == S_INITIAL_WINDOW_SIZE:
                delta = value - self._local_initial
                self._local_initial = value
                for sid, ws in self.wire_streams.items():
                    ws.recv_window += delta
                    ws.recv_max = value
                    if not ws.remote_closed:
                        self._return_window(sid, ws)
            elif ident == S_MAX_CONCURRENT_STREAMS:
                self._local_max_streams = value
            elif ident == S_MAX_FRAME_SIZE:
                self._max_inbound_frame = value

    def _ping(self, sid: int, flags: int, payload: bytes) -> None:
        if sid:
            raise ConnectionError_(PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise ConnectionError_(FRAME_SIZE_ERROR, "PING not 8 bytes")
        if flags & ACK:
            self._fresh_overhead += 1  # (we send one PING per connection, at shutdown)
            self._on_ping_ack(payload)
        else:
            self._fresh_overhead += 1
            self._out += frame(PING, ACK, 0, payload)

    def _priority(self, sid: int, payload: bytes) -> None:
        if not sid:
            raise ConnectionError_(PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:
            raise ConnectionError_(FRAME_SIZE_ERROR, "PRIORITY not 5 bytes")
        self._fresh_overhead += 1
        if int.from_bytes(payload[:4], "big") & 0x7FFFFFFF == sid:
            if sid in self.wire_streams:
                self._stream_error(sid, PROTOCOL_ERROR)
            elif sid > self.highest_inbound:
                raise ConnectionError_(PROTOCOL_ERROR, "a stream depending on itself")

    # ------------------------------------------------------------------ the subclass's
    def _on_headers(self, sid: int, fields: list, end: bool, trailers: bool) -> None:
        """A header block: a new request (``trailers`` False) or its trailers."""
        raise NotImplementedError

    def _on_data(self, sid: int, data: bytes, flow: int, end: bool) -> None:
        """Body bytes of ``sid`` (``flow``: the frame's flow-controlled length, padding
        included; return it with ``data_read`` once read)."""
        raise NotImplementedError

    def _on_rst(self, sid: int, code: int) -> None:
        """The client reset ``sid``."""
        raise NotImplementedError

    def _on_stream_error(self, sid: int, code: int) -> None:
        """We reset ``sid`` (RST_STREAM ``code`` sent) for the client's protocol error."""
        raise NotImplementedError

    def _on_window(self, sid: int) -> bool:
        """The client opened ``sid``'s send window (0: the connection's or every stream's).
        Returns whether that sent anything."""
        raise NotImplementedError

    def _on_ping_ack(self, data: bytes) -> None:
        raise NotImplementedError

    def _on_goaway(self, last: int, code: int) -> None:
        raise NotImplementedError

    def _on_connection_error(self, code: int, reason: str) -> None:
        """The connection ended on a connection error (its GOAWAY is queued)."""
        raise NotImplementedError

