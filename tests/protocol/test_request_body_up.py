"""The request body's way up (proxy/request_body_up.py) on a real upstream connection: a body
that ends short of its Content-Length never leaves that connection usable.

Both request parsers end a body at its Content-Length or fail the request, so no client can
make this happen today; the check is the last line against the desync that two HTTP/2 bugs
once caused (the rest of the body read from the next client's request on a pooled
connection). The exchange here is a stand-in that ends its body early, as those bugs did;
the origin and the upstream connection are real (127.0.0.1, port 0).
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import Optional

import pytest

from pyngora.errors import Error, ErrorType
from pyngora.headers import Headers
from pyngora.protocols.events import MessageEnd, RequestHead
from pyngora.proxy.engine import Plan
from pyngora.proxy.phases import ProxyHttp
from pyngora.proxy.request_body_up import send_request_body
from pyngora.proxy.session import Session
from pyngora.upstreams import HttpPeer
from pyngora.upstreams.connector import Connector

pytestmark = pytest.mark.timeout(30)


class _ShortBody:
    """An exchange whose client body ends after ``pieces`` (whatever its Content-Length)."""

    def __init__(self, content_length: int, pieces: list[bytes]) -> None:
        self.head = RequestHead(b"POST", b"/", "1.1", Headers(), True, "length",
                                content_length, False, False)
        self.client_addr = self.server_addr = ("127.0.0.1", 0)
        self.scheme = "http"
        self.trailers = None
        self._pieces: deque[Optional[bytes]] = deque(pieces)
        self._pieces.append(None)

    async def read_body(self) -> Optional[bytes]:
        return self._pieces.popleft()


async def _send(content_length: int, pieces: list[bytes]) -> tuple[Optional[BaseException],
                                                                     bytes, bool, bool]:
    """(the sender's error, the bytes the origin got, whether the origin saw the connection
    closed, whether it may be pooled once the origin's answer is read)."""
    got = bytearray()
    closed = asyncio.Event()

    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The head, the body, then an answer; or the connection's end, whichever comes first.
        await reader.readuntil(b"\r\n\r\n")
        while len(got) < content_length and (data := await reader.read(65536)):
            got.extend(data)
        if len(got) >= content_length:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        if not await reader.read(65536):
            closed.set()
        writer.close()

    server = await asyncio.start_server(origin, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    conn = await Connector().get(HttpPeer(f"127.0.0.1:{port}"))
    session = Session(_ShortBody(content_length, pieces))  # type: ignore[arg-type]
    conn.send_head(b"POST", b"/", Headers([(b"Content-Length", b"%d" % content_length)]))
    err: Optional[BaseException] = None
    try:
        await send_request_body(ProxyHttp(), Plan(ProxyHttp), session, conn, False, None)
    except Error as e:
        err = e
    else:
        while (await asyncio.wait_for(conn.read_event(), 10)).__class__ is not MessageEnd:
            pass
    reusable = conn.can_reuse()
    conn.close()
    await asyncio.wait_for(closed.wait(), 10)
    server.close()
    return err, bytes(got), closed.is_set(), reusable


def test_a_body_short_of_its_length_closes_the_upstream_connection() -> None:
    err, got, closed, reusable = asyncio.run(_send(10, [b"abc", b"de"]))
    assert isinstance(err, Error) and err.etype is ErrorType.InternalError
    assert "5 bytes, its Content-Length 10" in str(err)
    assert got == b"abcde" and closed and not reusable


def test_a_body_longer_than_its_length_closes_it_too() -> None:
    err, got, closed, reusable = asyncio.run(_send(3, [b"abcdef"]))
    assert isinstance(err, Error) and "6 bytes, its Content-Length 3" in str(err)
    assert closed and not reusable


def test_a_whole_body_goes_up_and_leaves_it_usable() -> None:
    err, got, _, reusable = asyncio.run(_send(5, [b"abc", b"de"]))
    assert err is None and got == b"abcde" and reusable
