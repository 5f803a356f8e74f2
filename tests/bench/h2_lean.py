"""What a lean HTTP/2 proxy costs in this layout: the floor column of the bench's h2 scenario.

    PYNGORA_FLOOR_H2_PORT=P python -m tests.bench.h2_lean STATIC_PORT PROXY_PORT ORIGIN_PORT BODY

(``python -m tests.bench.run --floor --floor-module tests.bench.h2_lean`` sets the variable.)
The static and HTTP/1 proxy ports are lean_cached.py's; the h2c (prior knowledge) port is a
proxy written for this measurement, in the shape an HTTP/2 fast path in pyngora would take:

- frames are cut from the read with slices and ``int.from_bytes`` (no frame objects, no
  stream state machine): HEADERS (padding and priority skipped), DATA (credited back at once),
  SETTINGS, PING, WINDOW_UPDATE, RST_STREAM, GOAWAY; a header block in CONTINUATION frames,
  or a protocol error, closes the connection (no h2load sends one);
- HPACK through the ``hpack`` package (h2's own), with what pyngora's HTTP/1 express lane
  keeps: a header block seen before, while the decoder's dynamic table has not changed,
  maps straight to the HTTP/1 head to send upstream; a response head seen before maps to its
  encoded block while the encoder's table has not changed (HPACK state is per connection, so
  both tables are per connection);
- upstream: HTTP/1.1 over a pool of idle connections bounded at pyngora's default (128), as
  pyngora does; a new connection is dialled when none is idle; whole plain responses are
  taken with ``h1_splice.take_whole``, others are buffered until whole (the origin's small
  response always comes in one read);
- the response HEADERS and DATA frames go out within the client's flow-control windows
  (held until its WINDOW_UPDATE otherwise), batched into one write per loop iteration.

No limits, timeouts, metrics, header validation or error answers: an experiment that says
what the interpreter allows an HTTP/2 proxy here, not a proxy.
"""
from __future__ import annotations

import asyncio
import os
import sys
from typing import Any, Optional

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import uvloop
from hpack import Decoder, Encoder

from pyngora.protocols import hpack_cache
from pyngora.protocols.h1 import H1Limits
from pyngora.protocols.h1_splice import take_whole
from tests.bench import lean
from tests.bench.floor import Static, response
from tests.bench.lean_cached import Down as H1Down

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
POOL: list["Up"] = []
POOL_MAX = 128
LIMITS = H1Limits()
_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                  b"transfer-encoding", b"upgrade", b"host"))
# Our SETTINGS (MAX_CONCURRENT_STREAMS 100) and a connection window raised by 1 MiB.
_SETTINGS = (b"\x00\x00\x06\x04\x00\x00\x00\x00\x00" + b"\x00\x03" + (100).to_bytes(4, "big")
             + b"\x00\x00\x04\x08\x00\x00\x00\x00\x00" + (1 << 20).to_bytes(4, "big"))
_SETTINGS_ACK = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"


def _frame(typ: int, flags: int, sid: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((typ, flags)) + sid.to_bytes(4, "big") \
        + payload


def _table_mark(table: Any) -> tuple[int, Any, int]:
    """What changes whenever an HPACK table does (an insert adds at the front)."""
    dyn = table.dynamic_entries
    return len(dyn), dyn[0] if dyn else None, table.maxsize


class Up(asyncio.Protocol):
    """One upstream HTTP/1.1 connection, serving one stream at a time."""

    __slots__ = ("transport", "down", "sid", "buf")

    def __init__(self) -> None:
        self.transport: Any = None
        self.down: Optional[H2Down] = None
        self.sid = 0
        self.buf = b""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.buf:
            data = self.buf + data
        whole = take_whole(data, LIMITS)
        if whole is None:
            self.buf = data  # (not whole yet: the bench's origin never gets here)
            return
        self.buf = b""
        status, head, body, keep = whole
        down, self.down = self.down, None
        if keep and len(POOL) < POOL_MAX:
            POOL.append(self)
        else:
            self.transport.close()
        if down is not None:
            down.respond(self.sid, status, head, bytes(body))

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if self in POOL:
            POOL.remove(self)
        if self.down is not None:
            self.down.reset(self.sid)


class H2Down(asyncio.Protocol):
    """One client connection (h2c, prior knowledge)."""

    __slots__ = ("transport", "buf", "preface", "dec", "enc", "dgen", "egen", "dcache",
                 "ecache", "out", "flushing", "live", "window", "initial", "max_frame",
                 "windows", "held", "loop")

    def __init__(self) -> None:
        self.transport: Any = None
        self.buf = b""
        self.preface = False
        self.dec = Decoder()
        self.enc = Encoder()
        self.dgen = self.egen = 0
        self.dcache: dict[bytes, tuple[int, bytes]] = {}   # block -> (dgen, HTTP/1 head)
        self.ecache: dict[bytes, tuple[int, bytes]] = {}   # HTTP/1 head -> (egen, block)
        self.out = bytearray()
        self.flushing = False
        self.live: set[int] = set()      # streams whose response is to come
        self.window = 65535              # the connection's send window
        self.initial = 65535             # the client's SETTINGS_INITIAL_WINDOW_SIZE
        self.max_frame = 16384
        self.windows: dict[int, int] = {}  # per-stream send windows of live streams
        self.held: list[tuple[int, bytes]] = []  # DATA waiting for window: (sid, body)
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self._write(_SETTINGS)

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.live.clear()

    def _write(self, data: bytes) -> None:
        self.out += data
        if not self.flushing:
            self.flushing = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flushing = False
        if self.out:
            self.transport.write(bytes(self.out))
            self.out.clear()

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if not self.preface:
            if len(buf) < 24:
                self.buf = buf
                return
            if buf[:24] != PREFACE:
                self.transport.close()
                return
            self.preface = True
            buf = buf[24:]
        i, n = 0, len(buf)
        while n - i >= 9:
            length = int.from_bytes(buf[i:i + 3], "big")
            end = i + 9 + length
            if end > n:
                break
            typ, flags = buf[i + 3], buf[i + 4]
            sid = int.from_bytes(buf[i + 5:i + 9], "big") & 0x7FFFFFFF
            payload = buf[i + 9:end]
            i = end
            if typ == 1:
                self._headers(sid, flags, payload)
            elif typ == 0:
                if length:  # credit the client back at once
                    inc = length.to_bytes(4, "big")
                    self._write(_frame(8, 0, 0, inc) + _frame(8, 0, sid, inc))
            elif typ == 8:
                self._window_update(sid, int.from_bytes(payload, "big") & 0x7FFFFFFF)
            elif typ == 4:
                if not flags & 1:
                    self._settings(payload)
            elif typ == 6:
                if not flags & 1:
                    self._write(_frame(6, 1, 0, payload))
            elif typ == 3:
                self.live.discard(sid)
                self.windows.pop(sid, None)
            elif typ == 7 or typ == 9:  # GOAWAY; CONTINUATION (not supported here)
                self._flush()
                self.transport.close()
                return
        self.buf = buf[i:]

    def _settings(self, payload: bytes) -> None:
        for j in range(0, len(payload) - 5, 6):
            ident = int.from_bytes(payload[j:j + 2], "big")
            value = int.from_bytes(payload[j + 2:j + 6], "big")
            if ident == 4:
                delta = value - self.initial
                self.initial = value
                for sid in self.windows:
                    self.windows[sid] += delta
            elif ident == 5:
                self.max_frame = value
        self._write(_SETTINGS_ACK)
        self._release_held()

    def _window_update(self, sid: int, inc: int) -> None:
        if sid == 0:
            self.window += inc
        elif sid in self.windows:
            self.windows[sid] += inc
        else:
            return
        self._release_held()

    def _headers(self, sid: int, flags: int, block: bytes) -> None:
        if flags & 0x8:  # PADDED
            block = block[1:len(block) - block[0]]
        if flags & 0x20:  # PRIORITY
            block = block[5:]
        if not flags & 0x4:  # END_HEADERS missing: CONTINUATION follows
            self.transport.close()
            return
        hit = self.dcache.get(block)
        if hit is not None and hit[0] == self.dgen:
            head = hit[1]
        else:
            head = self._learn_request(block)
        self.live.add(sid)
        self.windows[sid] = self.initial
        if POOL:
            up = POOL.pop()
            up.down, up.sid = self, sid
            up.transport.write(head)
        else:
            self.loop.create_task(self._dial(sid, head))

    def _learn_request(self, block: bytes) -> bytes:
        table = self.dec.header_table
        before = _table_mark(table)
        fields = self.dec.decode(block, raw=True)
        pseudo = {n: v for n, v in fields if n[:1] == b":"}
        lines = [b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (pseudo[b":method"], pseudo[b":path"],
                                                      pseudo.get(b":authority", b""))]
        lines += [b"%s: %s\r\n" % (n, v) for n, v in fields
                  if n[:1] != b":" and n not in _HOP]
        lines.append(b"\r\n")
        head = b"".join(lines)
        if _table_mark(table) != before:
            self.dgen += 1  # what was kept was decoded against another table
        elif len(self.dcache) < 512:
            self.dcache[block] = (self.dgen, head)
        return head

    async def _dial(self, sid: int, head: bytes) -> None:
        try:
            _, up = await self.loop.create_connection(Up, "127.0.0.1", lean.ORIGIN[0])
        except OSError:
            self.reset(sid)
            return
        up.down, up.sid = self, sid
        up.transport.write(head)

    def _encode(self, status: int, head: bytes) -> bytes:
        hit = self.ecache.get(head)
        if hit is not None and hit[0] == self.egen:
            return hit[1]
        table = self.enc.header_table
        before = _table_mark(table)
        fields = [(b":status", b"%d" % status)]
        for line in head.split(b"\r\n")[1:]:
            if line:
                name, _, value = line.partition(b":")
                fields.append((name.strip().lower(), value.strip()))
        block = self.enc.encode(fields)
        if _table_mark(table) != before:
            self.egen += 1
        elif len(self.ecache) < 512:
            self.ecache[head] = (self.egen, block)
        return block

    def respond(self, sid: int, status: int, head: bytes, body: bytes) -> None:
        """The upstream's whole response to stream ``sid``: HEADERS, then DATA (END_STREAM)."""
        if sid not in self.live:
            return  # reset by the client meanwhile
        block = self._encode(status, head)
        if not body:
            self.live.discard(sid)
            self.windows.pop(sid, None)
            self._write(_frame(1, 0x5, sid, block))
            return
        self._write(_frame(1, 0x4, sid, block))
        self.held.append((sid, body))
        self._release_held()

    def _release_held(self) -> None:
        held = self.held
        if not held:
            return
        keep = []
        for sid, body in held:
            if sid not in self.live:
                continue
            while body:
                n = min(len(body), self.max_frame, self.window, self.windows[sid])
                if n <= 0:
                    break
                self.window -= n
                self.windows[sid] -= n
                last = n == len(body)
                self._write(_frame(0, 1 if last else 0, sid, body[:n]))
                body = body[n:]
            if body:
                keep.append((sid, body))
            else:
                self.live.discard(sid)
                self.windows.pop(sid, None)
        self.held = keep

    def reset(self, sid: int) -> None:
        """The upstream failed this stream: RST_STREAM INTERNAL_ERROR."""
        if sid in self.live:
            self.live.discard(sid)
            self.windows.pop(sid, None)
            self._write(_frame(3, 0, sid, (2).to_bytes(4, "big")))


class H2LibDown(asyncio.Protocol):
    """The same proxy over ``h2.connection.H2Connection`` (pyngora's configuration: every
    optional validation off) instead of the frame code above: what the h2 library costs in
    an otherwise lean proxy (``PYNGORA_FLOOR_H2=library``)."""

    __slots__ = ("transport", "conn", "live", "flushing", "loop", "held")

    def __init__(self) -> None:
        self.transport: Any = None
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_inbound_headers=False,
            normalize_inbound_headers=False, validate_outbound_headers=False,
            normalize_outbound_headers=False))
        if os.environ.get("PYNGORA_FLOOR_HPACK") != "plain":
            hpack_cache.install(self.conn)  # (as pyngora's H2Server)
        self.live: set[int] = set()
        self.held: dict[int, bytes] = {}
        self.flushing = False
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        conn = self.conn
        conn.initiate_connection()
        conn.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100})
        conn.increment_flow_control_window(1 << 20)
        self._later()

    def _later(self) -> None:
        if not self.flushing:
            self.flushing = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flushing = False
        data = self.conn.data_to_send()
        if data:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._flush()
            self.transport.close()
            return
        for ev in events:
            cls = ev.__class__
            if cls is h2.events.RequestReceived:
                fields = ev.headers
                pseudo = {n: v for n, v in fields if n[:1] == b":"}
                lines = [b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (
                    pseudo[b":method"], pseudo[b":path"], pseudo.get(b":authority", b""))]
                lines += [b"%s: %s\r\n" % (n, v) for n, v in fields
                          if n[:1] != b":" and n not in _HOP]
                lines.append(b"\r\n")
                self._forward(ev.stream_id, b"".join(lines))
            elif cls is h2.events.DataReceived:
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif cls is h2.events.StreamReset:
                self.live.discard(ev.stream_id)
                self.held.pop(ev.stream_id, None)
            elif cls is h2.events.WindowUpdated or cls is h2.events.RemoteSettingsChanged:
                for sid in list(self.held):
                    self._send(sid, self.held.pop(sid))
            elif cls is h2.events.ConnectionTerminated:
                self._flush()
                self.transport.close()
                return
        self._later()

    def _forward(self, sid: int, head: bytes) -> None:
        self.live.add(sid)
        if POOL:
            up = POOL.pop()
            up.down, up.sid = self, sid
            up.transport.write(head)
        else:
            self.loop.create_task(H2Down._dial(self, sid, head))  # type: ignore[arg-type]

    def respond(self, sid: int, status: int, head: bytes, body: bytes) -> None:
        if sid not in self.live:
            return
        fields = [(b":status", b"%d" % status)]
        for line in head.split(b"\r\n")[1:]:
            if line:
                name, _, value = line.partition(b":")
                fields.append((name.strip().lower(), value.strip()))
        self.conn.send_headers(sid, fields, end_stream=not body)
        if body:
            self._send(sid, body)
        else:
            self.live.discard(sid)
        self._later()

    def _send(self, sid: int, body: bytes) -> None:
        conn = self.conn
        while body:
            n = min(len(body), conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            if n <= 0:
                self.held[sid] = body
                return
            conn.send_data(sid, body[:n], end_stream=n == len(body))
            body = body[n:]
        self.live.discard(sid)

    def reset(self, sid: int) -> None:
        if sid in self.live:
            self.live.discard(sid)
            self.conn.reset_stream(sid, 2)
            self._later()


async def _main(static_port: int, proxy_port: int, origin_port: int, body: bytes,
                h2_port: Optional[int]) -> None:
    lean.ORIGIN[0] = origin_port
    loop = asyncio.get_running_loop()
    ok, closing = response(body, False), response(body, True)
    servers = [await loop.create_server(lambda: Static(ok, closing), "127.0.0.1", static_port,
                                        backlog=1024),
               await loop.create_server(H1Down, "127.0.0.1", proxy_port, backlog=1024)]
    if h2_port:
        down = H2LibDown if os.environ.get("PYNGORA_FLOOR_H2") == "library" else H2Down
        servers.append(await loop.create_server(down, "127.0.0.1", h2_port, backlog=1024))
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.install()
    port = os.environ.get("PYNGORA_FLOOR_H2_PORT")
    asyncio.run(_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                      sys.argv[4].encode(), int(port) if port else None))
