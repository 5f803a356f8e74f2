"""Shared helpers for the HTTP/2 tests (no tests here): a small asyncio HTTP/2 client built on
the h2 library, so the tests see frames the way a client does."""
from __future__ import annotations

import asyncio
import ssl
from typing import Optional

import h2.config
import h2.connection
import h2.events


class StreamResult:
    __slots__ = ("headers", "informational", "body", "trailers", "ended", "reset", "done",
                 "received")

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.informational: list[list[tuple[bytes, bytes]]] = []
        self.body = bytearray()
        self.trailers: list[tuple[bytes, bytes]] = []
        self.ended = False
        self.reset: Optional[int] = None
        self.done = asyncio.Event()
        self.received = asyncio.Event()  # set on every DATA (for slow readers)

    @property
    def status(self) -> int:
        return int(dict(self.headers)[b":status"])

    def header(self, name: bytes) -> Optional[bytes]:
        return dict(self.headers).get(name)


class H2Client:
    """``await H2Client.connect(port)``; ``sid = await c.request(...)``; ``await c.wait(sid)``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 auto_ack: bool = True) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None))
        self.streams: dict[int, StreamResult] = {}
        self.goaways: list[h2.events.ConnectionTerminated] = []
        self.goaway_event = asyncio.Event()
        self.auto_ack = auto_ack
        self.closed = asyncio.Event()
        self.window_opened = asyncio.Event()
        self.task: Optional[asyncio.Task[None]] = None
        self._buf = bytearray()

    @classmethod
    async def connect(cls, port: int, settings: Optional[dict] = None, auto_ack: bool = True,
                      ssl_ctx: Optional[ssl.SSLContext] = None,
                      server_hostname: Optional[str] = None) -> "H2Client":
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ssl_ctx,
                                             server_hostname=server_hostname)
        c = cls(r, w, auto_ack)
        c.conn.initiate_connection()
        if settings:
            c.conn.update_settings(settings)
        c.flush()
        c.task = asyncio.ensure_future(c._read())
        return c

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def _read(self) -> None:
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                self._feed(data)
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed.set()
            for s in self.streams.values():
                s.done.set()

    def _feed(self, data: bytes) -> None:
        # Frame by frame: h2 closes its state machine on a GOAWAY (h2 issue #1181), while a
        # real client goes on with the streams the GOAWAY lets through.
        self._buf += data
        buf = self._buf
        pos = 0
        while len(buf) - pos >= 9:
            n = 9 + int.from_bytes(buf[pos:pos + 3], "big")
            if len(buf) - pos < n:
                break
            frame = bytes(buf[pos:pos + n])
            pos += n
            if self.goaways:
                self.conn.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
            for ev in self.conn.receive_data(frame):
                self._event(ev)
        del buf[:pos]
        self.flush()

    def _event(self, ev: object) -> None:
        sid = getattr(ev, "stream_id", None)
        s = self.streams.get(sid) if sid else None
        if isinstance(ev, h2.events.ResponseReceived) and s is not None:
            s.headers = list(ev.headers)
        elif isinstance(ev, h2.events.InformationalResponseReceived) and s is not None:
            s.informational.append(list(ev.headers))
        elif isinstance(ev, h2.events.DataReceived) and s is not None:
            s.body += ev.data
            s.received.set()
            if self.auto_ack and ev.flow_controlled_length:
                self.conn.acknowledge_received_data(ev.flow_controlled_length, sid)
        elif isinstance(ev, h2.events.TrailersReceived) and s is not None:
            s.trailers = list(ev.headers)
        elif isinstance(ev, h2.events.StreamEnded) and s is not None:
            s.ended = True
            s.done.set()
        elif isinstance(ev, h2.events.StreamReset) and s is not None:
            s.reset = int(ev.error_code)
            s.done.set()
        elif isinstance(ev, h2.events.WindowUpdated):
            self.window_opened.set()
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaways.append(ev)
            self.goaway_event.set()

    def start(self, method: str = "GET", path: str = "/", headers: tuple = (),
              end: bool = True, authority: str = "test") -> int:
        sid = self.conn.get_next_available_stream_id()
        fields = [(b":method", method.encode()), (b":scheme", b"http"),
                  (b":authority", authority.encode()), (b":path", path.encode())]
        fields += [(n.encode() if isinstance(n, str) else n, v.encode() if isinstance(v, str) else v)
                   for n, v in headers]
        self.streams[sid] = StreamResult()
        self.conn.send_headers(sid, fields, end_stream=end)
        self.flush()
        return sid

    async def send_body(self, sid: int, data: bytes, end: bool = True) -> None:
        """Send ``data`` as the windows allow (waits for WINDOW_UPDATEs)."""
        view = memoryview(data)
        while view:
            window = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            if window <= 0:
                self.window_opened.clear()
                await asyncio.wait_for(self.window_opened.wait(), 20)
                continue
            n = min(window, len(view))
            self.conn.send_data(sid, bytes(view[:n]))
            view = view[n:]
            self.flush()
            await self.writer.drain()
        if end:
            self.conn.end_stream(sid)
            self.flush()

    async def wait(self, sid: int, timeout: float = 20.0) -> StreamResult:
        s = self.streams[sid]
        await asyncio.wait_for(s.done.wait(), timeout)
        return s

    async def request(self, method: str = "GET", path: str = "/", body: bytes = b"",
                      headers: tuple = ()) -> StreamResult:
        sid = self.start(method, path, headers, end=not body)
        if body:
            await self.send_body(sid, body)
        return await self.wait(sid)

    def reset(self, sid: int, code: int = 0x8) -> None:
        self.conn.reset_stream(sid, code)
        self.flush()

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass
