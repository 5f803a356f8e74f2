"""Floods from an HTTP/2 origin (the 2019 HTTP/2 DoS family, turned around): the proxy, an
HTTP/2 client to ``h2: true`` upstreams, must bound them as its downstream side does.

A scripted origin over real loopback sockets (raw frames, hpack for the one response head)
sends endless PINGs (each asks a PING ACK), SETTINGS (each an ACK and a settings walk) or
empty DATA while a request is in flight. Expected (``protocols/h2_client.py``): the upstream
connection ends with GOAWAY ENHANCE_YOUR_CALM after a bounded number of frames and the
request fails at once with 502 (before: every frame was answered until ``read_timeout``,
504). Keep-alive PINGs and a burst under the limit stay harmless. And an origin that floods
without reading cannot make the worker buffer ACKs without bound: the proxy stops reading
it while its write buffer is full.
"""
from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any, Optional

import hpack

from pyngora.proxy import Session
from pyngora.upstreams.dial import WRITE_HIGH_WATER
from pyngora.upstreams.h2_connector import READ_PAUSE_BUFFER
from pyngora.upstreams.peer import HttpPeer, PeerOptions
from tests.protocol.test_h2_upstream_origin import ToH2, proxy_to
from tests.protocol.test_http_app_helpers import Client, run

DATA, HEADERS, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x4, 0x6, 0x7
ENHANCE_YOUR_CALM = 0xB
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_OVERHEAD_FRAMES = 1000  # h2_client.MAX_OVERHEAD_FRAMES (the downstream default too)


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return struct.pack("!I", len(payload))[1:] + bytes((ftype, flags)) + \
        struct.pack("!I", sid) + payload


PING_FRAME = frame(PING, 0, 0, b"floodme!")
SETTINGS_FRAME = frame(SETTINGS, 0, 0)


class FloodOrigin:
    """An HTTP/2 origin that answers request number ``flood_on`` with ``flood(sid)`` frames,
    sent ``count`` times (or until the proxy's GOAWAY), then ``answer`` (a 200 "ok") if
    asked; the others get 200 "ok" at once. ``reading`` False: once the flood starts, the
    origin reads nothing more."""

    def __init__(self, flood: Any, count: int, answer: bool = False, reading: bool = True,
                 rate: Optional[float] = None, head_first: bool = False,
                 rcvbuf: Optional[int] = None, flood_on: int = 1) -> None:
        self.flood_on = flood_on
        self.flood = flood
        self.count = count
        self.answer = answer
        self.reading = reading
        self.rate = rate  # frames per second (None: as fast as the socket takes them)
        self.head_first = head_first  # the response HEADERS before the flood
        self.rcvbuf = rcvbuf
        self.requests = 0
        self.conns = 0
        self.sent = 0
        self.ping_acks = 0
        self.settings_acks = 0
        self.goaway: Optional[int] = None
        self.eof = asyncio.Event()
        self.flood_task: Optional[asyncio.Task] = None
        self.stalled = False  # the proxy stopped reading the flood
        self.server: Optional[asyncio.AbstractServer] = None
        self.port = 0

    async def start(self) -> "FloodOrigin":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.bind(("127.0.0.1", 0))
        self.server = await asyncio.start_server(self._serve, sock=sock)
        self.port = sock.getsockname()[1]
        return self

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.flood_task is not None:
            self.flood_task.cancel()

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.conns += 1
        try:
            assert await r.readexactly(len(PREFACE)) == PREFACE
            w.write(frame(SETTINGS, 0, 0))
            enc = hpack.Encoder()
            while True:
                head = await r.readexactly(9)
                length = int.from_bytes(head[:3], "big")
                ftype, flags = head[3], head[4]
                sid = struct.unpack("!I", head[5:9])[0] & 0x7FFFFFFF
                payload = await r.readexactly(length)
                if ftype == SETTINGS and not flags & 1:
                    w.write(frame(SETTINGS, 1, 0))
                elif ftype == SETTINGS:
                    self.settings_acks += 1
                elif ftype == PING and flags & 1:
                    self.ping_acks += 1
                elif ftype == GOAWAY:
                    self.goaway = struct.unpack("!I", payload[4:8])[0]
                elif ftype == HEADERS and self.requests + 1 == self.flood_on:
                    self.requests += 1
                    self.flood_task = asyncio.ensure_future(self._flood(w, sid, enc))
                    if not self.reading:
                        await self.flood_task
                        await self.eof.wait()
                        return
                elif ftype == HEADERS:  # the others (the back-pressure test's warm-up)
                    self.requests += 1
                    w.write(self._ok(enc, sid))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.eof.set()
            w.close()

    def _ok(self, enc: hpack.Encoder, sid: int, head: bool = True) -> bytes:
        out = b""
        if head:
            out += frame(HEADERS, 0x4, sid, enc.encode([(b":status", b"200"),
                                                        (b"content-length", b"2")]))
        return out + frame(DATA, 0x1, sid, b"ok")

    async def _flood(self, w: asyncio.StreamWriter, sid: int, enc: hpack.Encoder) -> None:
        if self.head_first:
            w.write(frame(HEADERS, 0x4, sid, enc.encode([(b":status", b"200")])))
        one = self.flood(sid)
        batch = 1 if self.rate else 500
        try:
            while self.sent < self.count and self.goaway is None and not w.is_closing():
                n = min(batch, self.count - self.sent)
                w.write(one * n)
                self.sent += n
                try:
                    await asyncio.wait_for(w.drain(), 2.0)
                except TimeoutError:
                    self.stalled = True  # the proxy reads nothing more from us
                    return
                if self.rate:
                    await asyncio.sleep(1 / self.rate)
            if self.answer and self.goaway is None:
                w.write(self._ok(enc, sid, not self.head_first))
        except ConnectionError:
            pass


class _ShortRead(ToH2):
    """read_timeout 5 s: the code before the fix answers 504 after it, not 30 s later."""

    async def upstream_peer(self, session: Session, ctx: Any) -> HttpPeer:
        return HttpPeer(f"127.0.0.1:{self.port}", options=PeerOptions(
            read_timeout=5, connection_timeout=2, alpn=("h2",)))


async def _flooded(flood: Any, count: int, **kw: Any) -> tuple[FloodOrigin, int, float]:
    """One GET through the proxy to a flooding origin: (origin, status, seconds taken)."""
    origin = await FloodOrigin(flood, count, **kw).start()
    loop = asyncio.get_running_loop()
    try:
        async with proxy_to(origin.port, _ShortRead(origin.port)) as (port, app):
            c = await Client.connect(port)
            t0 = loop.time()
            try:
                r = await asyncio.wait_for(c.request("GET", "/"), 15)
                status = r.status
            except (asyncio.IncompleteReadError, ConnectionError):
                status = 0  # the response was cut short (its head went out already)
            took = loop.time() - t0
            c.close()
            if status != 200:  # the proxy closed the connection
                await asyncio.wait_for(origin.eof.wait(), 10)
            return origin, status, took
    finally:
        origin.close()


def test_ping_flood_ends_the_upstream_connection_with_enhance_your_calm() -> None:
    async def main() -> None:
        origin, status, took = await _flooded(lambda sid: PING_FRAME, 200_000)
        assert origin.goaway == ENHANCE_YOUR_CALM
        assert status == 502 and took < 4  # at once, not after read_timeout (504)
        assert origin.conns == 1  # not retried: the engine retries no HTTP/2 error
        # bounded: the limit and a read's worth of slices, not the 200,000 sent
        assert origin.ping_acks < 4 * MAX_OVERHEAD_FRAMES, origin.ping_acks
    run(main())


def test_settings_flood_ends_the_upstream_connection_with_enhance_your_calm() -> None:
    async def main() -> None:
        origin, status, took = await _flooded(lambda sid: SETTINGS_FRAME, 200_000)
        assert origin.goaway == ENHANCE_YOUR_CALM
        assert status == 502 and took < 4
        assert origin.settings_acks < 4 * MAX_OVERHEAD_FRAMES, origin.settings_acks
    run(main())


def test_empty_data_flood_ends_the_upstream_connection_with_enhance_your_calm() -> None:
    """Empty DATA frames without END_STREAM on the response being streamed: no bytes, so no
    flow control bounds them. The client's response is cut short (its head went out)."""
    async def main() -> None:
        origin, status, took = await _flooded(lambda sid: frame(DATA, 0, sid), 300_000,
                                              head_first=True)
        assert origin.goaway == ENHANCE_YOUR_CALM
        assert status == 0 and took < 4
        assert origin.sent < 300_000  # the proxy stopped reading: the flood ended early
    run(main())


def test_keepalive_pings_and_a_burst_under_the_limit_are_answered() -> None:
    """A gRPC-style keep-alive (PINGs every 50 ms, all ACKed) and a burst of half the limit
    leave the connection alone: the response arrives, no GOAWAY."""
    async def main() -> None:
        origin, status, _ = await _flooded(lambda sid: PING_FRAME, 30, answer=True, rate=20)
        assert status == 200 and origin.goaway is None and origin.ping_acks == 30
        burst = MAX_OVERHEAD_FRAMES // 2
        origin, status, _ = await _flooded(lambda sid: PING_FRAME, burst, answer=True)
        assert status == 200 and origin.goaway is None and origin.ping_acks == burst
    run(main(), timeout=40)


def test_an_origin_that_floods_and_never_reads_does_not_grow_the_write_buffer() -> None:
    """The flood allowance grows with the requests a connection carried (50 each): after
    2,000 requests an origin may burst 100,000 PINGs. If it reads none of the ACKs, the
    proxy must stop reading it once its write buffer is full (before: every PING was read and
    its ACK buffered, 1.6 MiB here, without bound in general)."""
    async def main() -> None:
        warmup = 2000
        n = 95_000
        origin = await FloodOrigin(lambda sid: PING_FRAME, n, reading=False, rcvbuf=4096,
                                   flood_on=warmup + 1).start()
        try:
            async with proxy_to(origin.port, _ShortRead(origin.port)) as (port, app):
                clients = [await Client.connect(port) for _ in range(20)]

                async def warm(c: Client) -> None:
                    for _ in range(warmup // 20):
                        assert (await c.request("GET", "/ok")).status == 200
                await asyncio.gather(*(warm(c) for c in clients))
                sessions = [s for ss in app.h2_connector.sessions.values() for s in ss]
                assert len(sessions) == 1 and origin.requests == warmup
                session = sessions[0]
                # Loopback's kernel buffers grow to megabytes and would hide the proxy's own
                # buffer: pin ours small (the origin pinned its receive buffer).
                session.transport.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
                flooded = asyncio.ensure_future(clients[0].request("GET", "/flood"))
                peak = 0
                while origin.flood_task is None or not origin.flood_task.done():
                    peak = max(peak, session.transport.get_write_buffer_size())
                    await asyncio.sleep(0.002)
                for _ in range(100):  # what the kernel holds of the flood still comes in
                    peak = max(peak, session.transport.get_write_buffer_size())
                    await asyncio.sleep(0.002)
                assert origin.goaway is None  # under the allowance: not a calm matter
                assert peak > WRITE_HIGH_WATER  # the ACKs did pile up...
                # ...to a full buffer and at most one read's ACKs on top, and no further:
                # the proxy stopped reading the origin (before: 1.5 MiB here)
                assert peak <= READ_PAUSE_BUFFER + 300 * 1024, peak
                assert session.write_paused and not session.transport.is_reading()
                flooded.cancel()
                for c in clients:
                    c.close()
        finally:
            origin.eof.set()
            origin.close()
    run(main(), timeout=60)
