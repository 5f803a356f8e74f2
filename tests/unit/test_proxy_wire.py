"""proxy/wire.upstream_head: the client's own bytes go upstream only when they are, byte for
byte, what serialising ``upstream_fields`` would send (for heads written the canonical way)."""
from __future__ import annotations

from typing import Optional

import pytest

from pyngora.protocols.events import RequestHead
from pyngora.protocols.h1 import RequestParser, serialize_request_head
from pyngora.proxy.wire import upstream_fields, upstream_head
from pyngora.upstreams.peer import HttpPeer


def parsed(data: bytes) -> RequestHead:
    head = RequestParser().feed(data)[0]
    assert isinstance(head, RequestHead)
    return head


def serialised(head: RequestHead) -> bytes:
    return serialize_request_head(head.method, head.target,
                                  upstream_fields(head.headers, HttpPeer("127.0.0.1:1")))


@pytest.mark.parametrize("data", [
    b"GET /a?b HTTP/1.1\r\nHost: t\r\nAccept: */*\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: t\r\nConnection: keep-alive\r\nUser-Agent: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nconnection: Keep-Alive\r\nHost: t\r\nConnection: close\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
])
def test_the_raw_head_is_what_serialising_would_send(data: bytes) -> None:
    head = parsed(data)
    assert upstream_head(head) == serialised(head)


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\nHost: t\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: t\r\nKeep-Alive: timeout=5\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: t\r\nTE: trailers\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: t\r\nProxy-Connection: keep-alive\r\n\r\n",
])
def test_a_head_with_more_to_drop_is_serialised(data: bytes) -> None:
    assert upstream_head(parsed(data)) is None


def test_no_raw_bytes_no_raw_head() -> None:
    p = RequestParser()
    head: Optional[RequestHead] = None
    for part in (b"GET / HTTP/1.1\r\nHo", b"st: t\r\n\r\n"):
        events = p.feed(part)
        if events:
            head = events[0]  # type: ignore[assignment]
    assert head is not None and head.raw is None and upstream_head(head) is None
