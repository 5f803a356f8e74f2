"""ResponseParser (the upstream side): framing by request method, 1xx, 101, EOF, bad framing.

Sans-IO: no event loop, bytes in and events out.
"""
from __future__ import annotations

import pytest

from pyngora.headers import Headers
from pyngora.protocols.events import Data, InformationalResponse, MessageEnd, ResponseHead
from pyngora.protocols.h1 import (H1Limits, ProtocolError, ResponseParser, encode_chunk,
                                  encode_last_chunk, serialize_response_head)



def normalize(events: list, tunnel: bool = False) -> list[tuple]:
    """Events as comparable tuples (Data after an upgrade counts as tunnel bytes)."""
    out: list[tuple] = []
    for ev in events:
        if isinstance(ev, ResponseHead):
            out.append(("rhead", ev.status, ev.reason, ev.version, ev.headers.items(),
                        ev.keep_alive, ev.body, ev.content_length))
        elif isinstance(ev, InformationalResponse):
            out.append(("info", ev.status, ev.headers.items()))
        elif isinstance(ev, Data):
            out.append(("tunnel" if tunnel else "data", ev.data))
        elif isinstance(ev, MessageEnd):
            out.append(("end", ev.trailers.items() if ev.trailers is not None else None))
        else:  # pragma: no cover
            out.append(("other", repr(ev)))
    return out


def coalesce(items: list[tuple]) -> list[tuple]:
    """Merge adjacent data/tunnel pieces: how bytes are split is not part of the result."""
    out: list[tuple] = []
    for item in items:
        if item[0] in ("data", "tunnel"):
            if not item[1]:
                continue
            if out and out[-1][0] == item[0]:
                out[-1] = (item[0], out[-1][1] + item[1])
                continue
        out.append(item)
    return out


def kinds(events: list) -> list[str]:
    return [type(e).__name__ for e in events]


def run(method: bytes, chunks: list[bytes], eof: bool = False) -> list[tuple]:
    """Feed ``chunks`` for one request made with ``method``; tunnel bytes count as ("tunnel", ...)."""
    p = ResponseParser()
    p.start(method)
    out: list[tuple] = []
    for chunk in chunks:
        was = p.upgraded
        out += normalize(p.feed(chunk), tunnel=was)
        if p.upgraded:
            out.append(("tunnel", p.take_trailing()))
    if eof:
        out += normalize(p.feed_eof())
    return coalesce(out)


def every_split(method: bytes, raw: bytes, eof: bool = False) -> list[tuple]:
    whole = run(method, [raw], eof)
    for i in range(1, len(raw)):
        assert run(method, [raw[:i], raw[i:]], eof) == whole, f"split at {i}"
    assert run(method, [raw[i:i + 1] for i in range(len(raw))], eof) == whole
    return whole


def test_length_body_and_reuse() -> None:
    p = ResponseParser()
    for i in range(3):
        p.start(b"GET")
        ev = p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-I: %d\r\n\r\nhello" % i)
        assert kinds(ev) == ["ResponseHead", "Data", "MessageEnd"]
        head = ev[0]
        assert isinstance(head, ResponseHead)
        assert (head.status, head.reason, head.version) == (200, b"OK", "1.1")
        assert head.body == "length" and head.content_length == 5 and head.keep_alive
        assert head.headers.get("x-i") == b"%d" % i
        assert p.reusable


def test_head_response_with_content_length_has_no_body() -> None:
    ev = every_split(b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
    assert ev[0][6] == "none" and ev[0][7] == 1234
    assert ev[1] == ("end", None) and len(ev) == 2
    # the same parser then reads a normal response
    p = ResponseParser()
    p.start(b"HEAD")
    assert kinds(p.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")) == [
        "ResponseHead", "MessageEnd"]
    assert p.reusable
    p.start(b"GET")
    ev = p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert kinds(ev) == ["ResponseHead", "Data", "MessageEnd"]


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses(status: int) -> None:
    raw = b"HTTP/1.1 %d X\r\nContent-Length: 10\r\n\r\n" % status
    ev = every_split(b"GET", raw)
    assert ev[0][1] == status and ev[0][6] == "none"
    assert ev[1] == ("end", None) and len(ev) == 2


def test_chunked_with_trailers() -> None:
    raw = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
           b"5;e=1\r\nhello\r\n1\r\n!\r\n0\r\nX-Sum: 7\r\n\r\n")
    ev = every_split(b"GET", raw)
    assert ev[0][6] == "chunked"
    assert ev[1] == ("data", b"hello!")
    assert ev[2] == ("end", [(b"X-Sum", b"7")])


@pytest.mark.parametrize("size_line", [b"5 ;e=1", b"5\t;e", b"5  ;e", b"5 "])
def test_whitespace_before_a_chunk_extension_is_accepted(size_line: bytes) -> None:
    """RFC 9112 7.1.1: ``chunk-ext = *( BWS ";" ... )``; nginx takes it too."""
    raw = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
           + size_line + b"\r\nhello\r\n0\r\n\r\n")
    ev = every_split(b"GET", raw)
    assert ev[1:] == [("data", b"hello"), ("end", None)]


def test_read_to_eof() -> None:
    raw = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it"
    ev = every_split(b"GET", raw, eof=True)
    assert ev[0][6] == "close" and ev[0][5] is False
    assert ev[1:] == [("data", b"all of it"), ("end", None)]
    p = ResponseParser()
    p.start(b"GET")
    p.feed(raw)
    p.feed_eof()
    assert not p.reusable


def test_continue_then_200() -> None:
    raw = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
           b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    ev = every_split(b"POST", raw)
    assert ev[0] == ("info", 100, [])
    assert ev[1] == ("info", 103, [(b"Link", b"</a>")])
    assert ev[2][0] == "rhead" and ev[2][1] == 200
    assert ev[3:] == [("data", b"ok"), ("end", None)]


def test_101_with_trailing_bytes() -> None:
    raw = (b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
           b"\r\n\x81\x02hi")
    ev = every_split(b"GET", raw)
    assert ev[0][1] == 101 and ev[1] == ("end", None)
    assert ev[2] == ("tunnel", b"\x81\x02hi")
    p = ResponseParser()
    p.start(b"GET")
    p.feed(raw)
    assert p.upgraded and not p.reusable
    assert p.take_trailing() == b"\x81\x02hi"
    assert kinds(p.feed(b"more")) == ["Data"]
    assert p.feed_eof() == []


def test_101_without_connection_header_is_still_a_switch() -> None:
    ev = run(b"GET", [b"HTTP/1.1 101 Switching Protocols\r\n\r\nxyz"])
    assert ev[0][1] == 101 and ev[-1] == ("tunnel", b"xyz")


def test_connect_2xx_is_a_tunnel_non_2xx_has_a_body() -> None:
    ev = every_split(b"CONNECT", b"HTTP/1.1 200 Connection Established\r\n\r\n\x16\x03")
    assert ev[0][6] == "none" and ev[1] == ("end", None) and ev[2] == ("tunnel", b"\x16\x03")
    ev = run(b"CONNECT", [b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno"])
    assert ev[1:] == [("data", b"no"), ("end", None)]


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Le",
    b"",
])
def test_truncated_at_eof_is_502(raw: bytes) -> None:
    p = ResponseParser()
    p.start(b"GET")
    p.feed(raw)
    assert p.response_started is bool(raw)
    with pytest.raises(ProtocolError) as info:
        p.feed_eof()
    assert info.value.status == 502


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5,5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\nContent-Length: 1\n\na",
    b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad Header: 1\r\n\r\n",
    b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nZ\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nContent-Length: 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5 5\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n 5\r\nhello\r\n0\r\n\r\n",
    b"SSH-2.0-OpenSSH_9.0\r\n\r\n",
])
def test_bad_upstream_framing_is_502(raw: bytes) -> None:
    for chunks in ([raw], [raw[i:i + 1] for i in range(len(raw))]):
        p = ResponseParser()
        p.start(b"GET")
        with pytest.raises(ProtocolError) as info:
            for c in chunks:
                p.feed(c)
        assert info.value.status == 502
        with pytest.raises(ProtocolError):
            p.feed(b"x")


def test_head_too_large_is_502() -> None:
    p = ResponseParser(H1Limits(max_header_bytes=100))
    p.start(b"GET")
    with pytest.raises(ProtocolError) as info:
        p.feed(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 200)
    assert info.value.status == 502


def test_unsolicited_bytes_make_the_connection_not_reusable() -> None:
    p = ResponseParser()
    p.start(b"GET")
    ev = p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\naEXTRA")
    assert kinds(ev) == ["ResponseHead", "Data", "MessageEnd"]
    assert not p.reusable
    p = ResponseParser()
    p.start(b"GET")
    p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
    assert p.reusable
    assert p.feed(b"late") == []
    assert not p.reusable
    p = ResponseParser()
    p.start(b"HEAD")
    p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody")
    assert not p.reusable


def test_connection_close_response_not_reusable() -> None:
    p = ResponseParser()
    p.start(b"GET")
    ev = p.feed(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    assert ev[0].keep_alive is False and not p.reusable


def test_serialized_response_round_trips() -> None:
    headers = Headers([("Server", "pyngora"), ("Transfer-Encoding", "chunked")])
    raw = (serialize_response_head(200, None, headers) + encode_chunk(b"abc")
           + encode_last_chunk(Headers([("X-T", "1")])))
    assert raw.startswith(b"HTTP/1.1 200 OK\r\nServer: pyngora\r\n")
    p = ResponseParser()
    p.start(b"GET")
    ev = p.feed(raw)
    assert kinds(ev) == ["ResponseHead", "Data", "MessageEnd"]
    assert ev[0].headers == headers and ev[1].data == b"abc"
    assert ev[2].trailers.items() == [(b"X-T", b"1")]


def test_serialize_response_head_reasons() -> None:
    h = Headers()
    assert serialize_response_head(404, None, h) == b"HTTP/1.1 404 Not Found\r\n\r\n"
    assert serialize_response_head(431, None, h, b"1.0").startswith(
        b"HTTP/1.0 431 Request Header Fields Too Large\r\n")
    assert serialize_response_head(299, None, h) == b"HTTP/1.1 299 Unknown\r\n\r\n"
    assert serialize_response_head(200, b"Fine", h) == b"HTTP/1.1 200 Fine\r\n\r\n"
    assert serialize_response_head(200, None, Headers([("Content-Length", 0)])) == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")


def test_informational_event_type() -> None:
    p = ResponseParser()
    p.start(b"GET")
    ev = p.feed(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert len(ev) == 1 and isinstance(ev[0], InformationalResponse) and ev[0].status == 100
    assert p.response_started and not p.reusable
    ev = p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(ev[0], ResponseHead) and isinstance(ev[1], MessageEnd)
    assert not any(isinstance(e, Data) for e in ev)


def test_start_before_the_previous_response_ended_is_a_bug() -> None:
    p = ResponseParser()
    p.start(b"GET")
    p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
    with pytest.raises(RuntimeError):
        p.start(b"GET")


def test_leading_blank_lines_before_status_line() -> None:
    ev = run(b"GET", [b"\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"])
    assert ev[0][1] == 200 and ev[1:] == [("data", b"x"), ("end", None)]


def test_endless_upstream_trailer_is_bounded() -> None:
    p = ResponseParser(H1Limits(max_header_bytes=1000))
    p.start(b"GET")
    p.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\nX-T: ")
    with pytest.raises(ProtocolError) as info:
        for _ in range(20):
            p.feed(b"b" * 100)
    assert info.value.status == 502


def test_too_many_upstream_header_fields_is_502() -> None:
    p = ResponseParser(H1Limits(max_headers=3))
    p.start(b"GET")
    with pytest.raises(ProtocolError) as info:
        p.feed(b"HTTP/1.1 200 OK\r\n" + b"X: 1\r\n" * 4 + b"\r\n")
    assert info.value.status == 502
    p = ResponseParser(H1Limits(max_headers=3))
    p.start(b"GET")
    assert p.feed(b"HTTP/1.1 200 OK\r\n" + b"X: 1\r\n" * 2 + b"Content-Length: 0\r\n\r\n")
