"""protocols/h2.py without an event loop: the h2 library plays the client, bytes go straight
from one side to the other."""
from __future__ import annotations

from typing import Any, Optional

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import pytest
from hyperframe.frame import (DataFrame, ExtensionFrame, HeadersFrame, PingFrame, PriorityFrame,
                              RstStreamFrame, SettingsFrame, WindowUpdateFrame)

from pyngora.protocols import h2 as h2p
from pyngora.protocols.events import ConnectionClosed, Data, MessageEnd, RequestHead, StreamReset
from pyngora.protocols.h2 import (ENHANCE_YOUR_CALM, FEED_SLICE, NO_ERROR, PROTOCOL_ERROR,
                                  REFUSED_STREAM, H2Limits, H2Server, RequestRejected,
                                  response_fields)

GET = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"example.com"),
       (b":path", b"/a?b=1")]


class Pair:
    """A server under test and an h2 client, wired back to back."""

    def __init__(self, limits: Optional[H2Limits] = None, client_settings: Any = None) -> None:
        self.server = H2Server(limits)
        self.server.initiate()
        cfg = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.client = h2.connection.H2Connection(cfg)
        self.client.initiate_connection()
        if client_settings:
            self.client.update_settings(client_settings)
        self.events: list = []
        self.cevents: list = []
        self.pump()

    def pump(self, rounds: int = 20) -> None:
        """Move bytes both ways until neither side has anything to say."""
        for _ in range(rounds):
            moved = False
            data = self.client.data_to_send()
            if data:
                moved = True
                self.events += self.server.feed(data)
            data = self.server.data_to_send()
            if data:
                moved = True
                self._client_feed(data)
            if not moved:
                return

    def _client_feed(self, data: bytes) -> None:
        """Frame by frame, so that the h2 client keeps going after a graceful GOAWAY (its
        state machine closes on one: h2 issue #1181; real clients finish their streams)."""
        view = memoryview(data)
        while view:
            n = 9 + int.from_bytes(view[:3], "big")
            evs = self.client.receive_data(bytes(view[:n]))
            view = view[n:]
            self.cevents += evs
            if any(isinstance(e, h2.events.ConnectionTerminated) and e.error_code == 0
                   for e in evs):
                self.client.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN

    def take(self) -> list:
        ev, self.events = self.events, []
        return ev

    def ctake(self) -> list:
        ev, self.cevents = self.cevents, []
        return ev


def _resp(p: Pair, sid: int, status: int = 200, body: bytes = b"ok") -> None:
    p.server.send_head(sid, status, [(b"content-length", str(len(body)).encode())])
    p.server.send_body(sid, body, end=True)
    p.server.release(sid)
    p.pump()


def test_request_and_response_events() -> None:
    p = Pair()
    p.client.send_headers(1, GET + [(b"cookie", b"a=1"), (b"accept", b"*/*"), (b"cookie", b"b=2")],
                          end_stream=True)
    p.pump()
    head, end = p.take()
    assert isinstance(head, RequestHead) and isinstance(end, MessageEnd)
    assert (head.method, head.target, head.version, head.body) == (b"GET", b"/a?b=1", "2", "none")
    assert head.stream_id == 1 and end.stream_id == 1
    assert head.headers.items() == [(b"host", b"example.com"), (b"accept", b"*/*"),
                                    (b"cookie", b"a=1; b=2")]
    _resp(p, 1, body=b"hello")
    evs = p.ctake()
    resp = [e for e in evs if isinstance(e, h2.events.ResponseReceived)][0]
    assert dict(resp.headers)[b":status"] == b"200"
    assert b"".join(e.data for e in evs if isinstance(e, h2.events.DataReceived)) == b"hello"
    assert any(isinstance(e, h2.events.StreamEnded) for e in evs)
    assert p.server.is_idle()


def test_post_body_with_trailers_both_ways() -> None:
    p = Pair()
    p.client.send_headers(3, [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/grpc"),
                              (b"host", b"h"), (b"te", b"trailers"),
                              (b"content-type", b"application/grpc")])
    p.client.send_data(3, b"abc")
    p.client.send_headers(3, [(b"grpc-timeout", b"1S")], end_stream=True)
    p.pump()
    head, data, end = p.take()
    assert head.body == "chunked" and head.content_length is None
    assert head.headers.get(b"host") == b"h" and head.headers.get(b"te") == b"trailers"
    assert isinstance(data, Data) and data.data == b"abc"
    assert end.trailers.items() == [(b"grpc-timeout", b"1S")]
    p.server.send_head(3, 200, response_fields([(b"Content-Type", b"application/grpc"),
                                                (b"Connection", b"close")]))
    p.server.send_body(3, b"xyz")
    p.server.send_end(3, [(b"grpc-status", b"0")])
    p.pump()
    evs = p.ctake()
    resp = [e for e in evs if isinstance(e, h2.events.ResponseReceived)][0]
    assert resp.headers == [(b":status", b"200"), (b"content-type", b"application/grpc")]
    trailers = [e for e in evs if isinstance(e, h2.events.TrailersReceived)][0]
    assert trailers.headers == [(b"grpc-status", b"0")]


def test_content_length_request_is_length_framed() -> None:
    p = Pair()
    p.client.send_headers(1, [(b":method", b"PUT"), (b":scheme", b"https"), (b":path", b"/"),
                              (b":authority", b"h"), (b"content-length", b"3")])
    p.client.send_data(1, b"abc", end_stream=True)
    p.pump()
    head = p.take()[0]
    assert head.body == "length" and head.content_length == 3


def test_flow_control_10mb_upload_and_download_with_small_windows() -> None:
    """10 MB each way through 16 KiB stream windows: the server holds no more than its window
    unread, and sends no more than the client's window allows."""
    size = 10 * 1024 * 1024
    lim = H2Limits(stream_window=16384, connection_window=65535)
    p = Pair(lim, {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 16384})
    p.client.send_headers(1, [(b":method", b"POST"), (b":scheme", b"https"), (b":path", b"/up"),
                              (b":authority", b"h"), (b"content-length", str(size).encode())])
    p.pump()
    assert isinstance(p.take()[0], RequestHead)
    payload = bytes(range(256)) * 64  # 16 KiB
    sent = received = 0
    rounds = 0
    got_end = False
    while not got_end:
        rounds += 1
        assert rounds < 10000
        window = p.client.local_flow_control_window(1)
        if sent < size and window > 0:
            n = min(window, size - sent, p.client.max_outbound_frame_size, len(payload))
            p.client.send_data(1, payload[:n], end_stream=sent + n == size)
            sent += n
        p.pump()
        unread = 0
        for ev in p.take():
            if isinstance(ev, Data):
                unread += len(ev.data)
            elif isinstance(ev, MessageEnd):
                got_end = True
        # never more than the advertised stream window in flight unread
        assert unread <= 16384
        received += unread
        p.server.consumed(1, unread)  # the app read it: WINDOW_UPDATE goes out
        if sent < size:
            assert sent - received <= 16384
    assert received == size
    # download: 10 MB queued at once, delivered only as the client reads
    p.server.send_head(1, 200, [(b"content-length", str(size).encode())])
    # (not uniform bytes: the frames are views into it, and their order and offsets count)
    body = bytes(range(256)) * (size // 256) + b"\x01" * (size % 256)
    p.server.send_body(1, body, end=True)
    p.pump()
    down = 0
    got = bytearray()
    ended = False
    rounds = 0
    while not ended:
        rounds += 1
        assert rounds < 10000
        assert p.server.pending(1) >= size - down - 65535 * 2
        n = 0
        for ev in p.ctake():
            if isinstance(ev, h2.events.DataReceived):
                n += len(ev.data)
                got += ev.data
                p.client.acknowledge_received_data(ev.flow_controlled_length, 1)
            elif isinstance(ev, h2.events.StreamEnded):
                ended = True
        down += n
        p.pump()
    assert down == size and p.server.pending(1) == 0
    assert got == body


def test_client_reset_mid_body() -> None:
    p = Pair()
    p.client.send_headers(1, [(b":method", b"POST"), (b":scheme", b"https"), (b":path", b"/"),
                              (b":authority", b"h")])
    p.client.send_data(1, b"part")
    p.pump()
    assert [type(e) for e in p.take()] == [RequestHead, Data]
    p.client.reset_stream(1, 0x8)
    p.pump()
    (ev,) = p.take()
    assert isinstance(ev, StreamReset) and ev.stream_id == 1 and ev.error_code == 0x8
    # writing to the reset stream is a no-op, the connection lives on
    p.server.send_head(1, 200, [])
    p.server.release(1)
    p.client.send_headers(3, GET, end_stream=True)
    p.pump()
    assert isinstance(p.take()[0], RequestHead)


def test_response_before_the_body_ends_resets_with_no_error() -> None:
    p = Pair()
    p.client.send_headers(1, [(b":method", b"POST"), (b":scheme", b"https"), (b":path", b"/"),
                              (b":authority", b"h")])
    p.client.send_data(1, b"x" * 100)
    p.pump()
    p.take()
    _resp(p, 1, 413, b"")
    evs = p.ctake()
    resets = [e for e in evs if isinstance(e, h2.events.StreamReset)]
    assert resets and resets[0].error_code == NO_ERROR
    assert any(isinstance(e, h2.events.ResponseReceived) for e in evs)


def test_too_many_streams_refused_before_settings_ack() -> None:
    """A client that opens streams before it has our SETTINGS gets REFUSED_STREAM for those
    beyond the limit (retryable), not a dead connection."""
    p = Pair.__new__(Pair)
    p.server = H2Server(H2Limits(max_concurrent_streams=5))
    p.server.initiate()
    p.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                    header_encoding=None))
    p.client.initiate_connection()
    p.events, p.cevents = [], []
    for i in range(8):
        p.client.send_headers(1 + 2 * i, GET, end_stream=True)
    p.events += p.server.feed(p.client.data_to_send())  # before the client sees our SETTINGS
    heads = [e for e in p.events if isinstance(e, RequestHead)]
    refused = [e for e in p.events if isinstance(e, RequestRejected)]
    assert len(heads) == 5 and len(refused) == 3
    assert all(r.error_code == REFUSED_STREAM and r.status == 0 for r in refused)
    p.pump()
    resets = [e for e in p.ctake() if isinstance(e, h2.events.StreamReset)]
    assert sorted(r.stream_id for r in resets) == [11, 13, 15]
    assert not p.server.closed
    # after the responses, new streams are accepted again
    p.take()
    for h in heads:
        _resp(p, h.stream_id)
    p.client.send_headers(17, GET, end_stream=True)
    p.pump()
    assert any(isinstance(e, RequestHead) and e.stream_id == 17 for e in p.take())


def _raw_request(encoder: hpack.Encoder, sid: int, fields: list, end: bool = True) -> bytes:
    f = HeadersFrame(sid)
    f.data = encoder.encode(fields)
    f.flags.add("END_HEADERS")
    if end:
        f.flags.add("END_STREAM")
    return f.serialize()


def _read_frames(data: bytes) -> tuple[dict[int, int], dict[int, bytes]]:
    """The server's RST_STREAM codes and response :status per stream, straight from the
    bytes (the h2 client knows nothing of streams opened with raw frames)."""
    from hyperframe.frame import Frame
    dec = hpack.Decoder()
    resets: dict[int, int] = {}
    statuses: dict[int, bytes] = {}
    view = memoryview(data)
    while len(view) >= 9:
        frame, length = Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9:9 + length])
        view = view[9 + length:]
        if isinstance(frame, RstStreamFrame):
            resets[frame.stream_id] = frame.error_code
        elif isinstance(frame, HeadersFrame):
            statuses[frame.stream_id] = dict(dec.decode(frame.data, raw=True))[b":status"]
    return resets, statuses


def test_bad_headers_are_stream_errors_or_400() -> None:
    p = Pair()
    enc = hpack.Encoder()  # raw frames: the h2 client would refuse to send these
    cases = [
        (GET + [(b"x-a", b"va\x00l")], 0),
        (GET + [(b"x-a", b"line\nbreak")], 0),
        (GET + [(b"connection", b"keep-alive")], 0),
        (GET + [(b"transfer-encoding", b"chunked")], 0),
        (GET + [(b"te", b"gzip")], 0),
        (GET + [(b"X-Upper", b"v")], 0),
        (GET + [(b"x-a", b" padded")], 0),
        ([(b"x-a", b"1")] + GET, 0),                       # pseudo-header after a field
        (GET + [(b":path", b"/again")], 0),                # duplicate pseudo-header
        ([(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"h")], 0),  # no :path
        (GET[:2] + [(b":path", b"/")], 400),               # no :authority, no Host
        (GET + [(b"host", b"other.example")], 400),        # :authority and Host disagree
        (GET[:3] + [(b":path", b"/caf\xc3\xa9")], 400),    # non-ASCII target
        ([(b":method", b"CONNECT"), (b":authority", b"h:443")], 501),
        (GET + [(b"x-a", b"a\x01b")], 0),                # control characters, as HTTP/1
        (GET + [(b"x-a", b"a\x7fb")], 0),
        ([(b":method", b"get")] + GET[1:], 400),          # "get" is no GET (HTTP/1: 400)
        (GET + [(b"content-length", b"0"), (b"content-length", b"0")], 400),
        (GET[:3] + [(b":path", b"/admin#frag")], 400),    # a fragment, as HTTP/1
    ]
    data = b"".join(_raw_request(enc, 1 + 2 * i, f) for i, (f, _) in enumerate(cases))
    p.events += p.server.feed(data)
    evs = p.take()
    assert not any(isinstance(e, RequestHead) for e in evs)
    rej = {e.stream_id: e for e in evs if isinstance(e, RequestRejected)}
    for i, (_, status) in enumerate(cases):
        r = rej[1 + 2 * i]
        assert r.status == status, (i, r)
        if status == 0:
            assert r.error_code == PROTOCOL_ERROR
    resets, statuses = _read_frames(p.server.data_to_send())
    for i, (_, status) in enumerate(cases):
        sid = 1 + 2 * i
        if status == 0:
            assert resets[sid] == PROTOCOL_ERROR
        else:
            assert statuses[sid] == str(status).encode()
    assert not p.server.closed  # 19 bad requests of 19 streams, under the abuse threshold


def test_bad_trailers_and_content_length_mismatch() -> None:
    p = Pair()
    p.client.send_headers(1, [(b":method", b"POST"), (b":scheme", b"https"), (b":path", b"/"),
                              (b":authority", b"h")])
    p.pump()
    p.take()
    enc = p.client.encoder
    f = HeadersFrame(1)
    f.data = enc.encode([(b"content-length", b"5")])
    f.flags.add("END_HEADERS")
    f.flags.add("END_STREAM")
    p.events += p.server.feed(f.serialize())
    (r,) = p.take()
    assert isinstance(r, RequestRejected) and r.status == 400 and r.error_code == PROTOCOL_ERROR
    # Content-Length not matching DATA: the library ends the connection
    p.client.send_headers(3, [(b":method", b"POST"), (b":scheme", b"https"), (b":path", b"/"),
                              (b":authority", b"h"), (b"content-length", b"10")])
    p.client.send_data(3, b"short", end_stream=True)
    p.pump()
    assert any(isinstance(e, ConnectionClosed) for e in p.take())
    assert p.server.closed and p.server.error_code == PROTOCOL_ERROR
    assert any(isinstance(e, h2.events.ConnectionTerminated) for e in p.ctake())


def test_body_above_max_body_bytes() -> None:
    p = Pair(H2Limits(max_body_bytes=10))
    p.client.send_headers(1, GET[:1] + [(b":scheme", b"https"), (b":path", b"/"),
                                        (b":authority", b"h"), (b"content-length", b"11")])
    p.client.send_headers(3, [(b":method", b"POST"), (b":scheme", b"https"), (b":path", b"/"),
                              (b":authority", b"h")])
    p.client.send_data(3, b"x" * 11)
    p.pump()
    evs = p.take()
    rej = [e for e in evs if isinstance(e, RequestRejected)]
    assert [(r.stream_id, r.status) for r in rej] == [(1, 413), (3, 413)]


def test_rapid_reset_flood_gets_goaway() -> None:
    p = Pair(H2Limits(max_concurrent_streams=100, max_premature_resets=50))
    # the handlers of reset streams are "still running" (nobody calls release)
    for i in range(300):
        sid = 1 + 2 * i
        p.client.send_headers(sid, GET, end_stream=True)
        p.client.reset_stream(sid, 0x8)
        p.pump()
        if p.server.closed:
            break
    assert p.server.closed and p.server.error_code == ENHANCE_YOUR_CALM
    goaway = [e for e in p.ctake() if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaway and goaway[-1].error_code == ENHANCE_YOUR_CALM
    assert sid < 2 * 60  # stopped after about max_premature_resets streams


def _frames(kind: str, n: int) -> bytes:
    """``n`` frames of one kind a flood is made of, as raw bytes."""
    out = []
    for i in range(n):
        if kind == "ping":
            f: Any = PingFrame(0)
            f.opaque_data = b"%08d" % (i % 10**8)
        elif kind == "settings":
            f = SettingsFrame(0)
        elif kind == "priority":
            f = PriorityFrame(3 + 2 * (i % 1000))
            f.depends_on, f.stream_weight = 0, 1
        elif kind == "window_update":
            f = WindowUpdateFrame(0)
            f.window_increment = 1
        elif kind == "empty_data":
            f = DataFrame(1)
        else:
            f = ExtensionFrame(0xEE, 0, 0, b"")
        out.append(f.serialize())
    return b"".join(out)


@pytest.mark.parametrize("kind", ["ping", "settings", "priority", "window_update",
                                  "empty_data", "unknown"])
def test_a_flood_of_frames_that_carry_no_request_gets_goaway(kind: str) -> None:
    """The 2019 HTTP/2 floods: each frame costs work and asks for nothing. 100,000 of them in
    256 KiB reads: the connection ends with ENHANCE_YOUR_CALM after about the limit plus one
    slice of input, not after all of them (one read is taken a slice at a time)."""
    p = Pair()
    p.client.send_headers(1, GET)  # a stream open for the empty DATA frames
    p.pump()
    blob = _frames(kind, 100_000)
    fed = 0
    for i in range(0, len(blob), 262144):
        p.events += p.server.feed(blob[i:i + 262144])
        fed += 1
        if p.server.closed:
            break
    assert p.server.closed and p.server.error_code == ENHANCE_YOUR_CALM, kind
    assert fed == 1  # the first read did it
    assert p.server._overhead < 1000 + FEED_SLICE // 9  # at most one slice past the limit
    frames = p.server.data_to_send()
    assert b"\x00\x00\x00\x0b" in frames  # GOAWAY's error code, ENHANCE_YOUR_CALM


def test_a_long_lived_stream_s_keepalive_pings_never_add_up(monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """One gRPC-style stream for hours, a PING and a message every 10 s: overhead fades with
    time, so 5,000 PINGs over ~14 h end nothing (a counter that never went down did, at the
    1,000th)."""
    now = [1000.0]
    monkeypatch.setattr(h2p, "_clock", lambda: now[0])
    p = Pair()
    p.client.send_headers(1, GET)
    p.pump()
    for i in range(5000):
        p.client.ping(b"%08d" % i)
        p.client.send_data(1, b"m")
        p.pump()
        now[0] += 10.0
        p.client.increment_flow_control_window(1)  # (the server acknowledges as it reads)
    assert not p.server.closed


def test_the_usual_control_frames_of_a_busy_client_are_not_a_flood() -> None:
    """A browser-like client: PRIORITY frames with its requests, a PING now and then, big
    WINDOW_UPDATEs for its downloads, its SETTINGS changed once: 300 requests go through."""
    p = Pair()
    for i in range(300):
        sid = 1 + 2 * i
        p.client.send_headers(sid, GET, end_stream=True)
        p.client.prioritize(sid, weight=32)
        if i % 10 == 0:
            p.client.ping(b"%08d" % i)
        if i == 50:
            p.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
        p.pump()
        _resp(p, sid, body=b"x" * 40000)
        p.client.increment_flow_control_window(40000)
        p.pump()
    assert not p.server.closed


def test_a_client_cancelling_now_and_then_is_not_abuse() -> None:
    p = Pair(H2Limits(max_premature_resets=10))
    for i in range(60):
        sid = 1 + 2 * i
        p.client.send_headers(sid, GET, end_stream=True)
        p.pump()
        if i % 4 == 0:
            p.client.reset_stream(sid, 0x8)
            p.pump()
            p.server.release(sid)
        else:
            _resp(p, sid)
    assert not p.server.closed


def test_continuation_flood_ends_the_connection() -> None:
    from hyperframe.frame import ContinuationFrame
    p = Pair()
    f = HeadersFrame(1)
    f.data = b""
    data = f.serialize()
    for _ in range(200):
        c = ContinuationFrame(1)
        c.data = b"\x00" * 100
        data += c.serialize()
    p.events += p.server.feed(data)
    assert p.server.closed and p.server.error_code == PROTOCOL_ERROR


def test_oversized_header_list_ends_the_connection() -> None:
    p = Pair(H2Limits(max_header_list_size=4096))
    p.client.send_headers(1, GET + [(b"x-big", b"a" * 8000)], end_stream=True)
    p.pump()
    assert p.server.closed


def test_graceful_goaway_lets_streams_finish() -> None:
    p = Pair()
    p.client.send_headers(1, GET, end_stream=True)
    p.pump()
    p.take()
    p.server.begin_shutdown()
    p.pump()  # GOAWAY(2^31-1), PING -> the client ACKs -> final GOAWAY(1)
    goaways = [e for e in p.ctake() if isinstance(e, h2.events.ConnectionTerminated)]
    assert [g.last_stream_id for g in goaways] == [2 ** 31 - 1, 1]
    assert p.server.goaway_sent and not p.server.closed
    # the in-flight stream still completes
    _resp(p, 1, body=b"done")
    evs = p.ctake()
    assert b"".join(e.data for e in evs if isinstance(e, h2.events.DataReceived)) == b"done"
    assert p.server.closed


def test_stream_after_final_goaway_is_refused() -> None:
    p = Pair()
    p.client.send_headers(1, GET, end_stream=True)
    p.pump()
    p.take()
    p.server.goaway()
    p.pump()
    p.client.send_headers(3, GET, end_stream=True)
    p.pump()
    (r,) = p.take()
    assert isinstance(r, RequestRejected) and r.error_code == REFUSED_STREAM
    _resp(p, 1)
    assert p.server.closed


def test_raw_rst_for_unknown_stream_is_harmless() -> None:
    p = Pair()
    f = RstStreamFrame(1)
    f.error_code = 8
    p.events += p.server.feed(f.serialize())
    assert p.server.closed  # RST on an idle stream is a connection error (RFC 9113 6.4)


def test_response_fields_send_one_content_length_or_none() -> None:
    """A filter that added a second Content-Length: equal values go once, differing ones not
    at all (a client fails a stream on two lengths, RFC 9113 8.1.1)."""
    same = response_fields([(b"Content-Length", b"5"), (b"X", b"1"), (b"content-length", b"5 ")])
    assert same == [(b"x", b"1"), (b"content-length", b"5")]
    other = response_fields([(b"Content-Length", b"5"), (b"content-length", b"3")])
    assert other == []
    assert response_fields([(b"Content-Length", b"5")]) == [(b"content-length", b"5")]
    assert response_fields([(b"Content-Length", b"5")], drop_length=True) == []


def test_headers_right_after_the_shutdown_ping_ack_are_refused_not_dropped() -> None:
    """A client that sends the PING ACK and a new HEADERS in one write: the final GOAWAY's
    last stream id counted that stream (h2 had parsed it), then the connection closed before
    the stream was taken up: no response and no RST, so the client could not know whether
    it was processed. Now it is refused (REFUSED_STREAM, safe to retry)."""
    p = Pair()
    p.client.send_headers(1, GET, end_stream=True)
    p.pump()
    p.take()
    _resp(p, 1)
    p.ctake()
    p.server.begin_shutdown()
    data = p.server.data_to_send()  # GOAWAY(2^31-1) and the PING, not yet answered
    p._client_feed(data)
    p.ctake()
    p.client.send_headers(3, GET, end_stream=True)  # after the PING ACK, in the same write
    p.events += p.server.feed(p.client.data_to_send())
    assert [(type(e), getattr(e, "error_code", None)) for e in p.take()] == [
        (RequestRejected, REFUSED_STREAM)]
    p._client_feed(p.server.data_to_send())
    evs = p.ctake()
    goaways = [e.last_stream_id for e in evs if isinstance(e, h2.events.ConnectionTerminated)]
    resets = [(e.stream_id, e.error_code) for e in evs if isinstance(e, h2.events.StreamReset)]
    assert goaways == [1] and resets == [(3, REFUSED_STREAM)]
    assert p.server.closed


def test_bdp_pings_of_a_grpc_go_client_on_a_server_stream_are_no_flood(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """grpc-go's BDP estimator answers the first DATA after each PING ACK with a connection
    WINDOW_UPDATE and a PING: a server-streaming RPC of small messages, 100 a second, brings
    two overhead frames per message against a fade of 100 a second. Each DATA frame sent
    earns two (the rule used to end such a stream after ~10 s, at the 1,000th message); a
    PING flood with no DATA still ends the connection."""
    now = [1000.0]
    monkeypatch.setattr(h2p, "_clock", lambda: now[0])
    p = Pair()
    p.client.send_headers(1, GET)
    p.pump()
    p.take()
    p.server.send_head(1, 200, [])
    for i in range(3000):
        now[0] += 0.01
        p.server.send_body(1, b"\x00\x00\x00\x00\x05tick!")
        p.pump()
        for ev in p.ctake():
            if isinstance(ev, h2.events.DataReceived):
                p.client.acknowledge_received_data(ev.flow_controlled_length, 1)
        p.client.increment_flow_control_window(10)  # the estimator's connection update
        p.client.ping(b"%08d" % i)
        p.pump()
        assert not p.server.closed, i
    p.client.send_headers(3, GET)  # a flood after it: no DATA earns it anything
    p.pump()
    for i in range(20000):
        p.client.ping(b"f%07d" % i)
    p.pump()
    assert p.server.closed and p.server.error_code == ENHANCE_YOUR_CALM
