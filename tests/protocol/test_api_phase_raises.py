"""Each of the 17 ``ProxyHttp`` phases raising in turn, against a real proxy and origin on
loopback (the Python API attack review, 2026-11-29; its other cases are in
test_api_misuse_attacks.py): that request gets its 5xx -- a raising ``logging`` leaves the
response alone --, ``logging`` still runs once, and the next connection is served as before.
"""
from __future__ import annotations

import asyncio
from typing import Any, Optional

import pytest

from pyngora.config.schema import ServerConf
from pyngora.errors import Error, ErrorType
from pyngora.proxy import ProxyHttp, Session, http_proxy_service
from pyngora.upstreams.peer import HttpPeer, PeerOptions

from tests.protocol.test_api_misuse_attacks import until
from tests.protocol.test_http_app_helpers import Client, run, serving
from tests.protocol.test_proxy_engine import port_of, raw_origin


class Raises(ProxyHttp):
    """Every phase raises when the request's X-Raise names it (a bug in user code)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.logged = 0

    @staticmethod
    def _boom(session: Session, phase: str) -> None:
        if session.req_header.get("x-raise") == phase.encode():
            raise RuntimeError(f"bug in {phase}")

    def new_ctx(self) -> Any:
        return {}

    async def early_request_filter(self, session: Session, ctx: Any) -> None:
        self._boom(session, "early_request_filter")

    async def request_filter(self, session: Session, ctx: Any) -> bool:
        self._boom(session, "request_filter")
        return False

    async def proxy_upstream_filter(self, session: Session, ctx: Any) -> bool:
        self._boom(session, "proxy_upstream_filter")
        return True

    async def upstream_peer(self, session: Session, ctx: Any) -> HttpPeer:
        self._boom(session, "upstream_peer")
        if session.req_header.get("x-raise") in (b"fail_to_proxy", b"request_summary"):
            raise Error.new(ErrorType.ConnectRefused)  # (a failure for them to handle)
        port = 1 if session.req_header.get("x-raise") == b"fail_to_connect" else self.port
        return HttpPeer(f"127.0.0.1:{port}", options=PeerOptions(read_timeout=5))

    async def connected_to_upstream(self, session: Session, reused: bool, peer: HttpPeer,
                                    ctx: Any) -> None:
        self._boom(session, "connected_to_upstream")

    async def fail_to_connect(self, session: Session, peer: HttpPeer, ctx: Any,
                              e: Error) -> Error:
        self._boom(session, "fail_to_connect")
        return e

    async def upstream_request_filter(self, session: Session, up: Any, ctx: Any) -> None:
        self._boom(session, "upstream_request_filter")
        if session.req_header.get("x-raise") == b"error_while_proxy":
            up.set_uri("/cut")  # the origin hangs up on it

    async def request_body_filter(self, session: Session, body: Optional[bytes],
                                  end_of_stream: bool, ctx: Any) -> Optional[bytes]:
        self._boom(session, "request_body_filter")
        return body

    async def upstream_response_filter(self, session: Session, resp: Any, ctx: Any) -> None:
        self._boom(session, "upstream_response_filter")

    async def response_filter(self, session: Session, resp: Any, ctx: Any) -> None:
        self._boom(session, "response_filter")

    async def upstream_response_body_filter(self, session: Session, body: Optional[bytes],
                                            end_of_stream: bool, ctx: Any) -> Optional[bytes]:
        self._boom(session, "upstream_response_body_filter")
        return body

    async def response_body_filter(self, session: Session, body: Optional[bytes],
                                   end_of_stream: bool, ctx: Any) -> Optional[bytes]:
        self._boom(session, "response_body_filter")
        return body

    async def error_while_proxy(self, peer: HttpPeer, session: Session, e: Error, ctx: Any,
                                client_reused: bool) -> Error:
        self._boom(session, "error_while_proxy")
        return e

    async def fail_to_proxy(self, session: Session, e: Error, ctx: Any) -> int:
        self._boom(session, "fail_to_proxy")
        await session.respond_error(e.status)
        return e.status

    async def logging(self, session: Session, e: Optional[Error], ctx: Any) -> None:
        self.logged += 1
        self._boom(session, "logging")

    def request_summary(self, session: Session, ctx: Any) -> str:
        self._boom(session, "request_summary")
        return session.request_summary()


@pytest.mark.parametrize("phase,status", [
    ("early_request_filter", 500), ("request_filter", 500), ("proxy_upstream_filter", 500),
    ("upstream_peer", 500), ("connected_to_upstream", 500), ("fail_to_connect", 500),
    ("upstream_request_filter", 500), ("request_body_filter", 500),
    ("upstream_response_filter", 500), ("response_filter", 500),
    ("upstream_response_body_filter", 500), ("response_body_filter", 500),
    ("error_while_proxy", 500), ("fail_to_proxy", 500), ("request_summary", 500),
    ("logging", 200),
])
def test_a_phase_that_raises_costs_its_request_only(phase: str, status: int) -> None:
    """Each phase raising in turn: that request gets its 5xx (logging's: nothing changes),
    logging still runs once, and the worker serves the next connection as before."""
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        while True:
            head = await r.readuntil(b"\r\n\r\n")
            if head.startswith(b"POST /cut"):
                return
            if head.startswith(b"POST"):
                await r.readuntil(b"0\r\n\r\n")  # (request_body_filter: it goes up chunked)
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async def main() -> None:
        server, _ = await raw_origin(handler)
        proxy = Raises(port_of(server))
        async with serving(http_proxy_service(None, proxy), ServerConf(max_retries=0)) \
                as (pport, _):
            c = await Client.connect(pport)
            r = await c.request("POST", "/", b"hi", headers=(("X-Raise", phase),))
            assert (r.status, r.body) == (status, b"ok" if status == 200 else b""), r.status
            await until(lambda: proxy.logged == 1, "logging")
            c = await Client.connect(pport)
            r = await c.request("POST", "/", b"hi")
            assert (r.status, r.body) == (200, b"ok")
            c.close()
        server.close()
    run(main())
