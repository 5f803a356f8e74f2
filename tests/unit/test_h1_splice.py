"""take_whole (protocols/h1_splice.py): the raw reading of whole plain responses that the
proxy's fast path sends on as they came. Whatever it takes must be what the full parser would
have accepted, cut of exactly the hop-by-hop fields; whatever is not plain it must decline;
and a verdict remembered for a head must be the one judging it again would give."""
from __future__ import annotations

from typing import Optional

import pytest

from pyngora.protocols.h1 import H1Limits
from pyngora.protocols import h1_splice
from pyngora.protocols.h1_splice import take_whole

OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"


def flat(taken: Optional[h1_splice.Whole]) -> Optional[tuple[int, bytes, int, bool]]:
    """take_whole's answer as (status, the bytes sent downstream, body length, keep-alive)."""
    if taken is None:
        return None
    status, head, body, keep_alive = taken
    return status, head + bytes(body), len(body), keep_alive


def take(data: bytes, limits: Optional[H1Limits] = None) -> Optional[tuple[int, bytes, int, bool]]:
    """take_whole, judged afresh and then from what it remembered: both must agree."""
    h1_splice._KNOWN.clear()
    limits = limits or H1Limits()
    first = flat(take_whole(data, limits))
    assert flat(take_whole(data, limits)) == first
    return first


def test_a_plain_response_is_taken_as_it_came() -> None:
    assert take(OK) == (200, OK, 5, True)


@pytest.mark.parametrize("size", [0, 5, h1_splice.VIEW_ABOVE, h1_splice.VIEW_ABOVE + 1, 65536])
def test_a_large_body_is_a_view_of_the_read_and_a_small_one_bytes(size: int) -> None:
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size
    data = head[:-2] + b"Connection: keep-alive\r\n\r\n" + body
    h1_splice._KNOWN.clear()
    status, out, got, keep_alive = take_whole(data, H1Limits())  # type: ignore[misc]
    assert (status, out, bytes(got), keep_alive) == (200, head, body, True)
    if size > h1_splice.VIEW_ABOVE:  # not copied: the view is of the very bytes read
        assert isinstance(got, memoryview) and got.obj is data
    else:
        assert type(got) is bytes


@pytest.mark.parametrize("fields", [
    b"Connection: keep-alive\r\n",
    b"connection: Keep-Alive\r\nKeep-Alive: timeout=5, max=100\r\n",
    b"CONNECTION: keep-alive\r\n",
    b"Connection: keep-alive\r\nConnection: keep-alive\r\n",
])
def test_hop_by_hop_fields_are_cut_and_nothing_else(fields: bytes) -> None:
    data = (b"HTTP/1.1 404 Not Found\r\nServer: o\r\n" + fields
            + b"Content-Length: 3\r\nX-After: 1\r\n\r\nnop")
    assert take(data) == (404, b"HTTP/1.1 404 Not Found\r\nServer: o\r\nContent-Length: 3\r\n"
                               b"X-After: 1\r\n\r\nnop", 3, True)


def test_connection_close_is_cut_and_says_the_upstream_closes() -> None:
    data = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    assert take(data) == (200, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 2, False)


def test_a_body_that_holds_hop_by_hop_names_is_not_touched() -> None:
    body = b"\r\nConnection: keep-alive\r\n"
    data = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    assert take(data) == (200, data, len(body), True)


@pytest.mark.parametrize("data", [
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",                      # not HTTP/1.1
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\nok",                                           # ends at close
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nok",                      # more to come
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n",    # bytes after it
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n",                            # head not whole
    b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 103 Early Hints\r\nLink: <a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: X-Secret\r\nX-Secret: 1\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Upgrade\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTE: trailers\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTrailer: X-T\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nUpgrade: h2c\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nProxy-Connection: close\r\nContent-Length: 0\r\n\r\n",  # llhttp: close
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nClose: x\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n",                        # no reason phrase
    b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",                     # not digits
    b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nX: 1\nY: 2\r\nContent-Length: 2\r\n\r\nok",        # a bare LF
    b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
    b"SPDY/9 what\r\n\r\n",
])
def test_what_is_not_plain_is_declined(data: bytes) -> None:
    assert take(data) is None


@pytest.mark.parametrize("bad", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",  # llhttp: duplicate
    b"HTTP/1.1 200 OK\r\nBad Name: 1\r\nContent-Length: 2\r\n\r\nok",        # llhttp: field syntax
    b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 2\r\n\r\nok",          # llhttp: NUL in value
])
def test_malformed_is_declined(bad: bytes) -> None:
    assert take(bad) is None


def test_the_same_head_with_another_body_length_or_limits_is_judged_for_itself() -> None:
    h1_splice._KNOWN.clear()
    limits = H1Limits()
    assert flat(take_whole(OK, limits)) == (200, OK, 5, True)
    assert take_whole(OK[:-1], limits) is None      # the body is not all here yet
    assert take_whole(OK + b"x", limits) is None    # a byte after the response
    assert take_whole(OK, H1Limits(max_headers=1)) is None
    assert flat(take_whole(OK, limits)) == (200, OK, 5, True)


def test_what_it_remembers_is_bounded() -> None:
    h1_splice._KNOWN.clear()
    for i in range(h1_splice._KNOWN_MAX + 10):
        data = b"HTTP/1.1 200 OK\r\nX-N: %d\r\nContent-Length: 0\r\n\r\n" % i
        assert flat(take_whole(data, H1Limits())) == (200, data, 0, True)
    assert len(h1_splice._KNOWN) <= h1_splice._KNOWN_MAX
    h1_splice._KNOWN.clear()
    big = b"HTTP/1.1 200 OK\r\nX-Big: " + b"v" * 3000 + b"\r\nContent-Length: 0\r\n\r\n"
    assert flat(take_whole(big, H1Limits())) == (200, big, 0, True)
    assert not h1_splice._KNOWN  # judged, not kept


def test_limits_of_the_full_parser_apply() -> None:
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(5))
    data = b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 0\r\n\r\n"
    assert take(data, H1Limits(max_headers=6)) is not None
    assert take(data, H1Limits(max_headers=5)) is None
    assert take(data, H1Limits(max_header_bytes=40)) is None
