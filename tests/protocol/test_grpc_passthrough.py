"""gRPC passes through (issue 6 point 6): an h2 client -> the proxy (h2c listener, the YAML
``http_proxy`` with an ``h2: true`` upstream group) -> an HTTP/2 origin, with a gRPC-like
exchange: ``content-type: application/grpc``, ``te: trailers``, a length-prefixed message,
and the ``grpc-status`` trailer; trailers both ways."""
from __future__ import annotations

import struct

from pyngora.config.loader import parse_text
from pyngora.proxy.declarative import build_proxy
from tests.protocol.test_h2_helpers import H2Client
from tests.protocol.test_h2_upstream_origin import H2Origin, proxy_to
from tests.protocol.test_http_app_helpers import run


def _declarative(origin_port: int):  # type: ignore[no-untyped-def]
    conf = parse_text(f"""version: 1
services:
  - name: grpc
    type: http_proxy
    listeners: ["127.0.0.1:0"]
    upstreams:
      - name: svc
        h2: true
        backends: [{{addr: "127.0.0.1:{origin_port}"}}]
""", "<test>")
    return build_proxy(conf.services[0].spec)


def _grpc_message(payload: bytes) -> bytes:
    """gRPC's framing: 1 byte compressed flag, 4 bytes big-endian length, the message."""
    return struct.pack(">BI", 0, len(payload)) + payload


def test_grpc_unary_call_through_h2_both_sides() -> None:
    async def main() -> None:
        origin = await H2Origin().start()
        try:
            async with proxy_to(origin.port, _declarative(origin.port)) as (port, app):
                c = await H2Client.connect(port)
                msg = _grpc_message(b"\x0a\x05hello")
                res = await c.request("POST", "/grpc.test.Echo/Say", msg, (
                    ("content-type", "application/grpc"), ("te", "trailers"),
                    ("grpc-timeout", "5S")))
                assert res.status == 200 and res.reset is None
                assert res.header(b"content-type") == b"application/grpc"
                assert bytes(res.body) == msg
                assert dict(res.trailers) == {b"grpc-status": b"0", b"grpc-message": b"ok"}
                got = origin.seen[-1]["headers"]
                assert got[b"te"] == b"trailers"
                assert got[b"content-type"] == b"application/grpc"
                assert got[b":method"] == b"POST" and got[b":path"] == b"/grpc.test.Echo/Say"
                assert bytes(origin.seen[-1]["body"]) == msg
                # the upstream connection speaks HTTP/2 and is reused for the next call
                res = await c.request("POST", "/grpc.test.Echo/Say", msg, (
                    ("content-type", "application/grpc"), ("te", "trailers")))
                assert dict(res.trailers)[b"grpc-status"] == b"0"
                assert len(origin.conns) == 1
                await c.close()
        finally:
            origin.close()
    run(main())


def test_request_trailers_reach_the_h2_upstream() -> None:
    async def main() -> None:
        origin = await H2Origin().start()
        try:
            async with proxy_to(origin.port, _declarative(origin.port)) as (port, app):
                c = await H2Client.connect(port)
                sid = c.start("POST", "/echo", (("te", "trailers"),), end=False)
                await c.send_body(sid, _grpc_message(b"abc"), end=False)
                c.conn.send_headers(sid, [(b"x-req-trailer", b"1")], end_stream=True)
                c.flush()
                res = await c.wait(sid)
                assert res.status == 200 and bytes(res.body) == _grpc_message(b"abc")
                assert origin.seen[-1]["trailers"] == {b"x-req-trailer": b"1"}
                assert dict(res.trailers) == {b"x-trailer-back": b"yes"}
                await c.close()
        finally:
            origin.close()
    run(main())


def test_no_te_from_the_client_sends_none_upstream() -> None:
    async def main() -> None:
        origin = await H2Origin().start()
        try:
            async with proxy_to(origin.port, _declarative(origin.port)) as (port, app):
                c = await H2Client.connect(port)
                res = await c.request("GET", "/echo")
                assert res.status == 200
                assert b"te" not in origin.seen[-1]["headers"]
                await c.close()
        finally:
            origin.close()
    run(main())


def test_declarative_h2_group_asks_for_h2() -> None:
    proxy = _declarative(1)
    group = proxy.groups["svc"]
    assert group.peer("127.0.0.1:1").options.alpn == ("h2",)
