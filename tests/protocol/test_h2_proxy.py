"""HTTP/2 downstream through the proxy engine, in-process: h2 client -> ProxyService (h2c
listener, via services/h2_dispatch.py) -> HTTP/1 origin. The ProxyHttp phases run unchanged
over HTTP/2."""
from __future__ import annotations

import asyncio
from typing import Any

from pyngora.config.schema import LimitsConf, ServerConf, parse_address
from pyngora.headers import ResponseHeader
from pyngora.proxy import ProxyHttp, Session, http_proxy_service
from pyngora.services.base import WorkerContext
from pyngora.services.h2_dispatch import protocol_factory
from pyngora.services.http_app import HttpSettings
from pyngora.upstreams.peer import HttpPeer, PeerOptions

from tests.protocol.test_h2_helpers import H2Client
from tests.protocol.test_http_app import static
from tests.protocol.test_http_app_helpers import AppService, EchoApp, run, serving


class ToPort(ProxyHttp):
    def __init__(self, port: int) -> None:
        self.port = port
        self.phases: list[str] = []

    async def request_filter(self, session: Session, ctx: Any) -> bool:
        self.phases.append("request_filter")
        if session.req_header.uri == "/deny":
            await session.respond_error(403)
            return True
        return False

    async def upstream_peer(self, session: Session, ctx: Any) -> HttpPeer:
        self.phases.append("upstream_peer")
        return HttpPeer(f"127.0.0.1:{self.port}",
                        options=PeerOptions(read_timeout=10, connection_timeout=2))

    async def response_filter(self, session: Session, resp: ResponseHeader, ctx: Any) -> None:
        self.phases.append("response_filter")
        resp.insert_header("X-Via-H2", session.req_header.version)


async def _proxy(origin_port: int) -> tuple[Any, ToPort, asyncio.AbstractServer, WorkerContext]:
    loop = asyncio.get_running_loop()
    proxy = ToPort(origin_port)
    svc = http_proxy_service(None, proxy, limits=LimitsConf())
    ctx = WorkerContext(svc, 0, 0, ServerConf(), loop)
    await svc.start_worker(ctx)
    app = ctx.state["http_app"]
    factory = protocol_factory(app, HttpSettings(LimitsConf()), parse_address("127.0.0.1:0", h2c=True),
                               ctx.connections, None, loop)
    server = await loop.create_server(factory, "127.0.0.1", 0)
    return svc, proxy, server, ctx


def test_h2_through_the_proxy_to_an_http1_origin() -> None:
    async def main() -> None:
        async with serving(static("origin says hi")) as (origin, _):
            svc, proxy, server, ctx = await _proxy(origin)
            port = server.sockets[0].getsockname()[1]
            try:
                c = await H2Client.connect(port)
                results = await asyncio.gather(*(c.request("GET", f"/{i}") for i in range(10)))
                for r in results:
                    assert r.status == 200 and bytes(r.body) == b"origin says hi"
                    assert r.header(b"x-via-h2") == b"2" and r.header(b"x-origin") == b"yes"
                    assert r.header(b"connection") is None
                assert proxy.phases.count("response_filter") == 10
                r = await c.request("GET", "/deny")
                assert r.status == 403
                await c.close()
            finally:
                server.close()
                ctx.connections.abort_all()
                await svc.stop_worker(ctx)
    run(main())


def test_h2_request_bodies_through_the_proxy() -> None:
    async def main() -> None:
        async with serving(AppService(EchoApp())) as (origin, _):
            svc, proxy, server, ctx = await _proxy(origin)
            port = server.sockets[0].getsockname()[1]
            try:
                c = await H2Client.connect(port)
                body = b"0123456789" * 30000
                r = await c.request("POST", "/len", body, (("content-length", str(len(body))),))
                assert r.status == 200 and bytes(r.body) == body
                assert r.header(b"x-target") == b"/len"
                # no Content-Length: the length is only known at END_STREAM
                r = await c.request("POST", "/stream", b"abc" * 1000)
                assert r.status == 200 and bytes(r.body) == b"abc" * 1000
                await c.close()
            finally:
                server.close()
                ctx.connections.abort_all()
                await svc.stop_worker(ctx)
    run(main())
