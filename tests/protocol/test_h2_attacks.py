"""HTTP/2 attacks on a running proxy, over real loopback sockets, that its other tests did not
cover (an attack review, 2026-11-29). In-process, as test_smuggling_attacks: a YAML
``http_proxy`` with ``h2c`` in front of the scripted HTTP/1 origin of test_proxy_fast_path,
talked to with raw frames (hpack encodes the header blocks); and, for the upstream side, the
proxy of test_h2_upstream_origin in front of a raw HTTP/2 origin that sends whatever frames a
test scripts. Each failed before its fix:

1. Floods that did not count (the 2019 HTTP/2 DoS family; the others are in
   tests/unit/test_h2_protocol.py): DATA frames carrying only padding (the padding comes back
   to the client at once, so such a flood never runs out of window), GOAWAY frames (each
   also an event for the connection layer), and SETTINGS frames of thousands of
   INITIAL_WINDOW_SIZE entries, each of which walked every open stream (16 KiB of input held
   the worker ~27 ms with 100 streams open, and counted as one frame). Each now ends the
   connection with GOAWAY ENHANCE_YOUR_CALM.
2. A method HTTP/1 refuses with 400 (``FOO``, ``PRI``, ``G!T``) reached the origin over
   HTTP/2. It now gets 400 too (README, "HTTP behaviour").
3. From an HTTP/2 origin, what an HTTP/1 origin could not send went on to the client: a
   control character in a field value, a field name that is no token, framing fields
   (Content-Length, Host) in trailers, and 1xx heads without bound (HEADERS are not
   flow-controlled: 3,000 103s all reached a client, and would have filled the worker's
   memory for one that does not read). Each now makes the response malformed: 502, or the
   client's response cut short once its head went out.
"""
from __future__ import annotations

import asyncio
import struct
from typing import Any, Callable, Optional

import hpack
import pytest

from pyngora.protocols import h1
from pyngora.protocols.h2_fields import HTTP1_METHODS, Reject, translate_request
from pyngora.protocols.h2_frames import (ACK, CONTINUATION, DATA, END_HEADERS, END_STREAM,
                                         ENHANCE_YOUR_CALM, GOAWAY, HEADERS, PADDED, PREFACE,
                                         RST_STREAM, S_INITIAL_WINDOW_SIZE, SETTINGS,
                                         SETTINGS_ACK, frame, u32)

from tests.protocol.test_h2_upstream_origin import proxy_to
from tests.protocol.test_http_app_helpers import run, serving
from tests.protocol.test_proxy_fast_path import proxy_service, start_origin

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
WAIT = 10.0  # seconds for an answer that, before the fixes, never came


# -- a raw HTTP/2 client -------------------------------------------------------------------

class RawClient:
    """Raw frames to the proxy; reads the frames it answers (``frames``), decoding header
    blocks (``heads``: stream id -> the fields of its first HEADERS)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.frames: list[tuple[int, int, int, bytes]] = []
        self.heads: dict[int, list[tuple[bytes, bytes]]] = {}
        self.eof = False
        self._buf = b""

    @classmethod
    async def connect(cls, port: int) -> "RawClient":
        """Connected, preface and an empty SETTINGS sent, the server's SETTINGS ACKed."""
        r, w = await asyncio.open_connection("127.0.0.1", port)
        c = cls(r, w)
        w.write(PREFACE + frame(SETTINGS, 0, 0) + SETTINGS_ACK + SETTINGS_ACK)
        return c

    def request(self, sid: int, method: bytes = b"GET", path: bytes = b"/x",
                end: bool = True) -> bytes:
        """One HEADERS frame opening ``sid`` (bytes, for the caller to send)."""
        block = self.encoder.encode([(b":method", method), (b":scheme", b"http"),
                                     (b":authority", b"t"), (b":path", path)])
        return frame(HEADERS, END_HEADERS | (END_STREAM if end else 0), sid, block)

    async def send(self, data: bytes) -> None:
        """Write ``data``; a connection the server already ended is no error (what it
        answered is still read)."""
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, OSError):
            pass

    async def until(self, cond: Callable[[], bool], timeout: float = WAIT) -> bool:
        """Read frames until ``cond()`` holds (True) or the connection ends (``cond()``)."""
        async def loop() -> bool:
            while not cond():
                try:
                    data = await self.reader.read(65536)
                except (ConnectionError, OSError):
                    data = b""
                if not data:
                    self.eof = True
                    return cond()
                self._take(data)
            return True
        return await asyncio.wait_for(loop(), timeout)

    def _take(self, data: bytes) -> None:
        buf = self._buf + data
        i = 0
        while len(buf) - i >= 9:
            n = int.from_bytes(buf[i:i + 3], "big")
            if len(buf) - i < 9 + n:
                break
            typ, flags = buf[i + 3], buf[i + 4]
            sid = int.from_bytes(buf[i + 5:i + 9], "big") & 0x7FFFFFFF
            payload = buf[i + 9:i + 9 + n]
            i += 9 + n
            self.frames.append((typ, flags, sid, payload))
            if typ == HEADERS and sid not in self.heads:  # (our requests: no CONTINUATION)
                self.heads[sid] = list(self.decoder.decode(payload, raw=True))
        self._buf = buf[i:]

    def goaway_code(self) -> Optional[int]:
        """The error code of the first GOAWAY the server sent, or None."""
        for typ, _, _, payload in self.frames:
            if typ == GOAWAY:
                return int.from_bytes(payload[4:8], "big")
        return None

    def status(self, sid: int) -> Optional[int]:
        fields = dict(self.heads.get(sid, ()))
        return int(fields[b":status"]) if b":status" in fields else None

    def reset(self, sid: int) -> bool:
        return any(t == RST_STREAM and s == sid for t, _, s, _ in self.frames)

    def close(self) -> None:
        self.writer.close()


def _stall(path: bytes, n: int) -> bytes:
    """The origin's script: stall every request (its stream stays open at the proxy)."""
    return b"STALL"


async def _flood_ends_with_calm(opening: Callable[[RawClient], bytes],
                                flood: Callable[[RawClient], bytes], streams: int = 1) -> int:
    """``streams`` requests whose origin never answers (open streams, a live connection),
    then ``flood``: the GOAWAY code the server ended the connection with."""
    server, oport, _ = await start_origin(_stall)
    conf, svc = proxy_service(oport)
    try:
        async with serving(svc, conf, h2c=True) as (port, ctx):
            c = await RawClient.connect(port)
            try:
                await c.send(b"".join(opening(c) if i == 0 else c.request(2 * i + 1, end=False)
                                      for i in range(streams)))
                await c.send(flood(c))
                await c.until(lambda: c.goaway_code() is not None)
                code = c.goaway_code()
                assert code is not None, "the flood was taken without end"
                return code
            finally:
                c.close()
    finally:
        server.close()


# -- 1. floods that did not count ------------------------------------------------------------

def test_a_flood_of_data_frames_carrying_only_padding_gets_goaway() -> None:
    """A stream with a body to come, then 30,000 DATA frames of one byte: the pad length
    (0), nothing else. Each is returned to the client's window at once, and carries no byte
    to any reader: overhead, as empty DATA frames are."""
    code = run(_flood_ends_with_calm(
        lambda c: c.request(1, b"POST", end=False),
        lambda c: frame(DATA, PADDED, 1, b"\x00") * 30000))
    assert code == ENHANCE_YOUR_CALM


def test_a_flood_of_goaway_frames_gets_goaway() -> None:
    """A client's graceful GOAWAY is news once; 20,000 of them on a connection with a stream
    in flight are a flood (each was also an event for the connection layer)."""
    code = run(_flood_ends_with_calm(
        lambda c: c.request(1, end=False),
        lambda c: frame(GOAWAY, 0, 0, u32(0) + u32(0)) * 20000))
    assert code == ENHANCE_YOUR_CALM


def test_settings_frames_of_thousands_of_entries_get_goaway() -> None:
    """With streams open, every SETTINGS_INITIAL_WINDOW_SIZE entry walked them all: 60
    frames of 2,730 alternating window sizes each (16 KiB) were 60 frames of overhead of the
    1,000 allowed, and ~27 ms of the worker each with 100 streams. Now a frame is applied
    once and counts one more per ten entries: the connection ends well within 60."""
    entries = b"".join(struct.pack(">HI", S_INITIAL_WINDOW_SIZE, 65535 + i % 2)
                       for i in range(2730))
    code = run(_flood_ends_with_calm(lambda c: c.request(1, end=False),
                                     lambda c: frame(SETTINGS, 0, 0, entries) * 60,
                                     streams=4))
    assert code == ENHANCE_YOUR_CALM


def test_a_settings_frame_still_takes_its_last_window_size_and_its_peak() -> None:
    """Folding a frame's entries changes nothing a client can see: the last
    INITIAL_WINDOW_SIZE is the one in force (a download sent within it), and a value
    on the way that would push a window past 2^31-1 is still FLOW_CONTROL_ERROR."""
    from pyngora.protocols.h2 import H2Server
    from pyngora.protocols.h2_frames import FLOW_CONTROL_ERROR, WINDOW_UPDATE

    def settings(*values: int) -> bytes:
        return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", S_INITIAL_WINDOW_SIZE, v)
                                              for v in values))
    enc = hpack.Encoder()
    req = frame(HEADERS, END_HEADERS | END_STREAM, 1, enc.encode(
        [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"t"), (b":path", b"/")]))
    s = H2Server()
    s.initiate()
    s.feed(PREFACE + frame(SETTINGS, 0, 0) + frame(SETTINGS, ACK, 0) * 2 + req)
    s.feed(settings(10, 1_000_000, 100))
    s.data_to_send()
    s.send_head(1, 200, [])
    s.send_body(1, b"x" * 1000)  # (no end: the stream stays open, 900 bytes queued)
    sent = [p for t, _, _, p in _frames(s.data_to_send()) if t == DATA]
    assert sum(len(p) for p in sent) == 100  # the last value, not the peak nor the first
    # a window raised by WINDOW_UPDATE, then a frame whose peak (not last) overflows it
    s.feed(frame(WINDOW_UPDATE, 0, 1, u32(10000)) + settings(2 ** 31 - 1, 100))
    assert s.closed and s.error_code == FLOW_CONTROL_ERROR


def _frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    out = []
    i = 0
    while len(data) - i >= 9:
        n = int.from_bytes(data[i:i + 3], "big")
        out.append((data[i + 3], data[i + 4], int.from_bytes(data[i + 5:i + 9], "big"),
                    data[i + 9:i + 9 + n]))
        i += 9 + n
    return out


# -- 2. methods HTTP/1 refuses ---------------------------------------------------------------

@pytest.mark.parametrize("method", [b"FOO", b"PRI", b"G!T", b"SETUP", b"GET_PARAMETER"])
def test_a_method_http1_refuses_gets_400_over_http2_and_never_reaches_the_origin(
        method: bytes) -> None:
    async def main() -> tuple[Optional[int], bool, list[bytes]]:
        server, oport, stats = await start_origin(lambda path, n: ANSWER)
        conf, svc = proxy_service(oport)
        try:
            async with serving(svc, conf, h2c=True) as (port, ctx):
                c = await RawClient.connect(port)
                try:
                    await c.send(c.request(1, method) + c.request(3))
                    await c.until(lambda: 1 in c.heads and 3 in c.heads)
                    assert c.status(3) == 200  # (the connection goes on)
                    return c.status(1), c.reset(1), list(stats["heads"])
                finally:
                    c.close()
        finally:
            server.close()

    status, reset, heads = run(main())
    assert [h.split(b" ")[0] for h in heads] == [b"GET"], f"{method!r} reached the origin"
    assert status == 400 and not reset


def test_http2_takes_exactly_the_methods_http1_takes() -> None:
    """The parity the method rule rests on, method by method (llhttp's list and more):
    over HTTP/1 each is parsed or refused with 400; over HTTP/2 translated or refused with
    400 (CONNECT aside: 501 over both, when HTTP/1 gets it in authority form)."""
    candidates = set(HTTP1_METHODS) | {b"PRI", b"FOO", b"DESCRIBE", b"ANNOUNCE", b"SETUP",
                                       b"PLAY", b"PAUSE", b"TEARDOWN", b"GET_PARAMETER",
                                       b"SET_PARAMETER", b"REDIRECT", b"RECORD", b"FLUSH",
                                       b"BREW", b"M-SEARCH", b"G!T"}
    for method in sorted(candidates):
        try:
            h1.RequestParser().feed(method + b" /x HTTP/1.1\r\nHost: t\r\n\r\n")
            http1 = True
        except h1.ProtocolError as exc:
            assert exc.status == 400, method
            http1 = False
        fields = [(b":method", method), (b":scheme", b"http"), (b":authority", b"t"),
                  (b":path", b"/x")]
        try:
            translate_request(fields, 1, True)
            http2 = True
        except Reject as rej:
            assert rej.status == 400, (method, rej.status)
            http2 = False
        assert http1 == http2, (method, http1, http2)


# -- 3. a malicious HTTP/2 origin -------------------------------------------------------------

class RawOrigin:
    """An HTTP/2 origin that answers each request HEADERS with ``script(sid, encoder)``:
    raw frames (a list: written one after the other, draining between)."""

    def __init__(self, script: Callable[[int, hpack.Encoder], list[bytes]]) -> None:
        self.script = script
        self.server: Any = None
        self.port = 0

    async def start(self) -> "RawOrigin":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        enc = hpack.Encoder()
        w.write(frame(SETTINGS, 0, 0))
        buf = b""
        try:
            while True:
                data = await r.read(65536)
                if not data:
                    break
                buf += data
                if buf.startswith(PREFACE):
                    buf = buf[len(PREFACE):]
                while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
                    n = int.from_bytes(buf[:3], "big")
                    typ, flags = buf[3], buf[4]
                    sid = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
                    buf = buf[9 + n:]
                    if typ == SETTINGS and not flags & ACK:
                        w.write(SETTINGS_ACK)
                    elif typ == HEADERS:
                        for chunk in self.script(sid, enc):
                            w.write(chunk)
                            await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()

    def close(self) -> None:
        self.server.close()


def _head(enc: hpack.Encoder, sid: int, fields: list[tuple[bytes, bytes]],
          end: bool = False) -> bytes:
    return frame(HEADERS, END_HEADERS | (END_STREAM if end else 0), sid, enc.encode(fields))


async def _h1_through(script: Callable[[int, hpack.Encoder], list[bytes]]) -> bytes:
    """One HTTP/1 GET through the proxy to a RawOrigin: all the client got until the proxy
    closed the connection or WAIT seconds passed."""
    origin = await RawOrigin(script).start()
    try:
        async with proxy_to(origin.port) as (port, app):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            try:
                return await asyncio.wait_for(r.read(-1), WAIT)
            finally:
                w.close()
    finally:
        origin.close()


@pytest.mark.parametrize("name,value", [
    (b"x-a", b"a\x1bb"),      # ESC
    (b"x-a", b"a\x7f"),       # DEL
    (b"x-a", b"a\x01b"),
    (b"x(a)", b"v"),          # a name that is no token
    (b'x"a', b"v"),
    (b"x{a}", b"v"),
])
def test_a_field_an_http1_origin_could_not_send_is_502_from_an_h2_origin(
        name: bytes, value: bytes) -> None:
    """llhttp refuses these in an HTTP/1 origin's response (502); from an HTTP/2 origin h2's
    own checks let them through, and they went on to the HTTP/1 client as they were."""
    got = run(_h1_through(lambda sid, enc: [
        _head(enc, sid, [(b":status", b"200"), (name, value), (b"content-length", b"2")]),
        frame(DATA, END_STREAM, sid, b"ok")]))
    assert got.startswith(b"HTTP/1.1 502 "), got
    assert name not in got


def test_an_h2_origin_1xx_flood_is_bounded_as_from_an_http1_origin() -> None:
    """3,000 103s (about 150 KB of heads) before the answer: over max_header_bytes (64 KiB)
    of interim heads in all, as llhttp's side bounds them. The client gets some, then the
    stream fails (502 or a cut), never all 3,000 and the 200."""
    hint = [(b":status", b"103"), (b"link", b"</style.css>; rel=preload")]
    got = run(_h1_through(lambda sid, enc: [
        b"".join(_head(enc, sid, hint) for _ in range(300)) for _ in range(10)] + [
        _head(enc, sid, [(b":status", b"200"), (b"content-length", b"2")]),
        frame(DATA, END_STREAM, sid, b"ok")]))
    assert b"HTTP/1.1 200" not in got
    assert 0 < got.count(b"HTTP/1.1 103 ") < 3000


def test_more_than_five_100_continue_from_an_h2_origin_is_502() -> None:
    got = run(_h1_through(lambda sid, enc: [
        _head(enc, sid, [(b":status", b"100")]) * 6,
        _head(enc, sid, [(b":status", b"200"), (b"content-length", b"2")]),
        frame(DATA, END_STREAM, sid, b"ok")]))
    assert got.startswith(b"HTTP/1.1 502 "), got


@pytest.mark.parametrize("name,value", [
    (b"content-length", b"5"),
    (b"host", b"evil"),
    (b"trailer", b"x-t"),
    (b"x-t", b"a\x1bb"),
])
def test_h2_origin_trailers_http1_trailers_may_not_hold_are_not_forwarded(
        name: bytes, value: bytes) -> None:
    """As from an HTTP/1 origin (its trailers with these are refused): the client's chunked
    response is cut short (no last chunk), and the field never reaches it."""
    got = run(_h1_through(lambda sid, enc: [
        _head(enc, sid, [(b":status", b"200")]) + frame(DATA, 0, sid, b"ok"),
        _head(enc, sid, [(name, value)], end=True)]))
    assert got.startswith(b"HTTP/1.1 200 "), got
    head, _, body = got.partition(b"\r\n\r\n")
    assert b"0\r\n" not in body.split(b"ok\r\n", 1)[-1], got  # no last chunk: cut short
    assert name + b": " + value not in body, got


def test_an_endless_continuation_from_an_h2_origin_is_502() -> None:
    """A response header block that never ends: h2 bounds its CONTINUATION frames (the
    upstream side of CVE-2024-27316), the client gets 502 and no worker memory grows."""
    got = run(_h1_through(lambda sid, enc: [
        frame(HEADERS, 0, sid, enc.encode([(b":status", b"200")]))] + [
        frame(CONTINUATION, 0, sid, b"") * 1000 for _ in range(100)]))
    assert got.startswith(b"HTTP/1.1 502 "), got
