"""Shared helpers for the HTTP/2 upstream tests (no tests here): an HTTP/2 origin written with
the h2 library over real loopback sockets, and a proxy service in front of it.

The origin answers by path:
  /echo      200, the request body back; request headers reflected as x-got-NAME
  /slow      holds the response until ``origin.release`` is set (counts concurrent streams)
  /big?N     200 with N bytes, sent as the flow-control windows allow (``sent`` counts)
  /grpc      a gRPC unary answer: the message back, trailer grpc-status 0
  /refuse    RST_STREAM REFUSED_STREAM the first time, then like /echo
  /goaway    like /slow, but first sends GOAWAY(last = the previous stream): this stream is
             refused by GOAWAY and must be retried elsewhere
"""
from __future__ import annotations

import asyncio
import contextlib
import ssl
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import GoAwayFrame

from pyngora.config.schema import LimitsConf, ServerConf, parse_address
from pyngora.proxy import ProxyHttp, Session, http_proxy_service
from pyngora.services.base import WorkerContext
from pyngora.services.h2_dispatch import protocol_factory
from pyngora.services.http_app import HttpSettings
from pyngora.upstreams.peer import HttpPeer, PeerOptions
from tests.support import self_signed_cert


class _Conn:
    def __init__(self, origin: "H2Origin", reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.origin = origin
        self.reader = reader
        self.writer = writer
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None))
        self.requests: dict[int, dict[str, Any]] = {}
        self.window = asyncio.Event()
        self.active = 0
        self.max_active = 0
        self.goaway_sent = False

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def serve(self) -> None:
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.origin.max_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self.origin.window_size})
        self.h2.initiate_connection()
        self.flush()
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                for ev in self.h2.receive_data(data):
                    t = self.event(ev)
                    if t is not None:
                        tasks.add(t)
                        t.add_done_callback(tasks.discard)
                self.flush()
        except (ConnectionError, OSError):
            pass
        finally:
            for t in tasks:
                t.cancel()
            self.writer.close()

    def event(self, ev: Any) -> Optional["asyncio.Task[None]"]:
        if isinstance(ev, h2.events.RequestReceived):
            self.requests[ev.stream_id] = {"headers": dict(ev.headers), "body": bytearray(),
                                           "trailers": None}
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.origin.max_active = max(self.origin.max_active, self.active)
            # (h2 also reports END_STREAM on HEADERS as a StreamEnded event: answered there)
        elif isinstance(ev, h2.events.DataReceived):
            self.requests[ev.stream_id]["body"] += ev.data
            # the app "reads" slowly when asked to: the window comes back later
            if self.origin.ack_body:
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            else:
                self.origin.unacked.append((self, ev.flow_controlled_length, ev.stream_id))
        elif isinstance(ev, h2.events.TrailersReceived):
            self.requests[ev.stream_id]["trailers"] = dict(ev.headers)
        elif isinstance(ev, h2.events.StreamEnded):
            return asyncio.ensure_future(self.respond(ev.stream_id))
        elif isinstance(ev, h2.events.StreamReset):
            self.origin.resets.append(ev.error_code)
            self.active -= 1
        elif isinstance(ev, h2.events.WindowUpdated):
            self.window.set()
        return None

    async def send(self, sid: int, data: bytes, end: bool) -> None:
        view = memoryview(data)
        while view:
            n = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size,
                    len(view))
            if n <= 0:
                self.origin.blocked.set()
                self.window.clear()
                await self.window.wait()
                continue
            self.h2.send_data(sid, bytes(view[:n]))
            self.origin.sent += n
            view = view[n:]
            self.flush()
            await self.writer.drain()
        if end:
            self.h2.end_stream(sid)
            self.flush()

    async def respond(self, sid: int) -> None:
        req = self.requests[sid]
        self.origin.seen.append(req)
        path = req["headers"][b":path"]
        try:
            if path == b"/refuse" and not self.origin.refused_once:
                self.origin.refused_once = True
                self.h2.reset_stream(sid, 0x7)
                self.flush()
                return
            if path == b"/goaway" and not self.origin.goaways:
                self.goaway_sent = True
                f = GoAwayFrame(0)
                f.last_stream_id = sid - 2  # this one was not processed
                f.error_code = 0
                self.writer.write(self.h2.data_to_send() + f.serialize())
                self.origin.goaways += 1
                await self.origin.release.wait()
                return
            if path in (b"/slow", b"/goaway"):
                await self.origin.release.wait()
            if path == b"/drain-goaway":
                # graceful GOAWAY while this stream is in flight; the stream still finishes
                self.goaway_sent = True
                f = GoAwayFrame(0)
                f.last_stream_id = sid
                f.error_code = 0
                self.writer.write(self.h2.data_to_send() + f.serialize())
                self.origin.goaways += 1
                await self.origin.release.wait()
            if path.startswith(b"/status?"):  # any :status value, valid or not
                value = path.partition(b"?")[2]
                self.h2.send_headers(sid, [(b":status", value)],
                                     end_stream=not value.startswith(b"1"))  # 1xx: no end
                self.flush()
                return
            if path.startswith(b"/big"):
                n = int(path.partition(b"?")[2])
                self.h2.send_headers(sid, [(b":status", b"200"),
                                           (b"content-length", str(n).encode())])
                await self.send(sid, b"x" * n, True)
                return
            if path.startswith(b"/grpc"):
                self.h2.send_headers(sid, [(b":status", b"200"),
                                           (b"content-type", b"application/grpc")])
                body = bytes(req["body"])
                await self.send(sid, body, False)
                self.h2.send_headers(sid, [(b"grpc-status", b"0"), (b"grpc-message", b"ok")],
                                     end_stream=True)
                self.flush()
                return
            fields = [(b":status", b"200"), (b"x-stream", str(sid).encode()),
                      (b"x-conn", str(id(self)).encode())]
            for k, v in req["headers"].items():
                if not k.startswith(b":"):
                    fields.append((b"x-got-" + k, v))
            fields.append((b"x-got-authority", req["headers"].get(b":authority", b"")))
            self.h2.send_headers(sid, fields)
            await self.send(sid, bytes(req["body"]), req["trailers"] is None)
            if req["trailers"] is not None:
                self.h2.send_headers(sid, [(b"x-trailer-back", b"yes")], end_stream=True)
                self.flush()
        except h2.exceptions.StreamClosedError:
            pass  # the proxy reset the stream (a timeout, a client gone)
        finally:
            self.active -= 1


class H2Origin:
    def __init__(self, max_streams: int = 100, window_size: int = 65535,
                 ssl_ctx: Optional[ssl.SSLContext] = None) -> None:
        self.ssl_ctx = ssl_ctx
        self.max_streams = max_streams
        self.window_size = window_size
        self.conns: list[_Conn] = []
        self.seen: list[dict[str, Any]] = []
        self.resets: list[int] = []
        self.release = asyncio.Event()
        self.blocked = asyncio.Event()
        self.sent = 0
        self.max_active = 0
        self.goaways = 0
        self.refused_once = False
        self.ack_body = True
        self.unacked: list[tuple[_Conn, int, int]] = []
        self.server: Optional[asyncio.AbstractServer] = None
        self.port = 0

    async def start(self) -> "H2Origin":
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            c = _Conn(self, r, w)
            self.conns.append(c)
            await c.serve()
        self.server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=self.ssl_ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def ack_all(self) -> None:
        for c, n, sid in self.unacked:
            try:
                c.h2.acknowledge_received_data(n, sid)
                c.flush()
            except Exception:
                pass
        self.unacked.clear()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for c in self.conns:
            c.writer.close()


def server_tls(tmp: Path, alpn: tuple[str, ...] = ("h2",)) -> ssl.SSLContext:
    """A server TLS context with a fresh self-signed certificate (openssl) and ``alpn``."""
    cert, key = tmp / "localhost.pem", tmp / "localhost.key"
    if not cert.exists():
        self_signed_cert(tmp)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert), str(key))
    ctx.set_alpn_protocols(list(alpn))
    return ctx


class ToH2(ProxyHttp):
    """Every request to the origin over HTTP/2 (prior knowledge, or TLS with ALPN h2)."""

    def __init__(self, port: int, tls: bool = False) -> None:
        self.port = port
        self.tls = tls

    async def upstream_peer(self, session: Session, ctx: Any) -> HttpPeer:
        return HttpPeer(f"127.0.0.1:{self.port}", tls=self.tls, options=PeerOptions(
            read_timeout=10, connection_timeout=2, alpn=("h2",), verify_cert=False,
            verify_hostname=False))


@contextlib.asynccontextmanager
async def proxy_to(origin_port: int, proxy: Optional[ProxyHttp] = None
                   ) -> AsyncIterator[tuple[int, Any]]:
    """A proxy service (HTTP/1 and h2c downstream) in front of the origin; yields (port, app)."""
    loop = asyncio.get_running_loop()
    svc = http_proxy_service(None, proxy or ToH2(origin_port), limits=LimitsConf())
    ctx = WorkerContext(svc, 0, 0, ServerConf(), loop)
    await svc.start_worker(ctx)
    app = ctx.state["http_app"]
    factory = protocol_factory(app, HttpSettings(LimitsConf()),
                               parse_address("127.0.0.1:0", h2c=True), ctx.connections, None,
                               loop)
    server = await loop.create_server(factory, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], app
    finally:
        server.close()
        ctx.connections.abort_all()
        if app.h2_connector is not None:
            app.h2_connector.close_all()
        await svc.stop_worker(ctx)
