"""RequestParser behaviour beyond the corpus: pipelining, limits, upgrades, EOF, serialisers.

Sans-IO: no event loop, bytes in and events out.
"""
from __future__ import annotations

import pytest

from pyngora.headers import Headers
from pyngora.protocols.events import Data, MessageEnd, RequestHead
from pyngora.protocols.h1 import (H2_PREFACE, H1Limits, ProtocolError, RequestParser,
                                  encode_chunk, encode_last_chunk, origin_form,
                                  remove_hop_by_hop, serialize_request_head)

GET = b"GET /x HTTP/1.1\r\nHost: example.com\r\n\r\n"


def kinds(events: list) -> list[str]:
    return [type(e).__name__ for e in events]


def test_simple_get_fields() -> None:
    p = RequestParser()
    ev = p.feed(b"GET /a?b=1 HTTP/1.1\r\nHost: example.com\r\nX-Case: Value\r\n\r\n")
    assert kinds(ev) == ["RequestHead", "MessageEnd"]
    head = ev[0]
    assert isinstance(head, RequestHead)
    assert (head.method, head.target, head.version) == (b"GET", b"/a?b=1", "1.1")
    assert head.headers.items() == [(b"Host", b"example.com"), (b"X-Case", b"Value")]
    assert head.headers.get("x-case") == b"Value"
    assert head.keep_alive and head.body == "none" and head.content_length is None
    assert not head.expect_continue and not head.upgrade
    assert ev[1].trailers is None
    assert not p.in_message


def test_parser_is_reused_across_keepalive_requests() -> None:
    p = RequestParser()
    for i in range(50):
        ev = p.feed(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
        assert ev[0].target == b"/%d" % i


def test_many_pipelined_requests_in_one_feed() -> None:
    p = RequestParser()
    ev = p.feed(GET * 200)
    assert kinds(ev) == ["RequestHead", "MessageEnd"] * 200


def test_content_length_body_split() -> None:
    p = RequestParser()
    ev = p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhello")
    assert kinds(ev) == ["RequestHead", "Data"]
    assert ev[0].body == "length" and ev[0].content_length == 10
    assert p.in_message
    ev = p.feed(b"world" + GET)
    assert kinds(ev) == ["Data", "MessageEnd", "RequestHead", "MessageEnd"]
    assert ev[0].data == b"world"


def test_zero_content_length() -> None:
    ev = RequestParser().feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
    assert kinds(ev) == ["RequestHead", "MessageEnd"]
    assert ev[0].body == "length" and ev[0].content_length == 0


def test_chunked_with_trailers() -> None:
    raw = (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"3;ext=1\r\nabc\r\n0\r\nX-Sum: 42\r\n\r\n")
    ev = RequestParser().feed(raw)
    assert kinds(ev) == ["RequestHead", "Data", "MessageEnd"]
    assert ev[0].body == "chunked" and ev[0].content_length is None
    assert ev[2].trailers.items() == [(b"X-Sum", b"42")]


def test_error_keeps_events_of_earlier_pipelined_requests() -> None:
    p = RequestParser()
    with pytest.raises(ProtocolError) as info:
        p.feed(GET + b"GET / HTTP/1.1\r\n\r\n")  # second one lacks Host
    assert info.value.status == 400
    assert kinds(info.value.events) == ["RequestHead", "MessageEnd"]
    with pytest.raises(ProtocolError):
        p.feed_eof()


def test_expect_continue_only_on_http11() -> None:
    raw = b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n"
    assert RequestParser().feed(raw)[0].expect_continue is True
    raw10 = b"PUT / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n"
    assert RequestParser().feed(raw10)[0].expect_continue is False


@pytest.mark.parametrize("raw,keep", [
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", True),
    (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", False),
    (b"GET / HTTP/1.0\r\n\r\n", False),
    (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True),
])
def test_keep_alive(raw: bytes, keep: bool) -> None:
    assert RequestParser().feed(raw)[0].keep_alive is keep


def test_bytes_after_connection_close_are_ignored() -> None:
    p = RequestParser()
    ev = p.feed(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" + GET)
    assert kinds(ev) == ["RequestHead", "MessageEnd"]
    assert p.feed(GET) == []
    assert p.feed_eof() == []


def test_websocket_upgrade_then_tunnel() -> None:
    p = RequestParser()
    ev = p.feed(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\n"
                b"Upgrade: websocket\r\n\r\nFRAME1")
    assert kinds(ev) == ["RequestHead", "MessageEnd"]
    assert ev[0].upgrade is True
    assert p.upgraded
    assert p.take_trailing() == b"FRAME1"
    assert p.take_trailing() == b""
    ev = p.feed(b"FRAME2")
    assert kinds(ev) == ["Data"] and ev[0].data == b"FRAME2"
    assert p.feed_eof() == []


def test_upgrade_header_without_connection_upgrade_is_plain_request() -> None:
    p = RequestParser()
    ev = p.feed(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n")
    assert ev[0].upgrade is False and not p.upgraded


def test_connect_is_not_supported() -> None:
    p = RequestParser()
    with pytest.raises(ProtocolError) as e:
        p.feed(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n\x16\x03")
    assert e.value.status == 501


@pytest.mark.parametrize("option", [b"content-length", b"keep-alive, Content-Length",
                                    b"Transfer-Encoding", b"close,host"])
def test_connection_may_not_name_framing_or_host(option: bytes) -> None:
    """A proxy removes what Connection names: these would leave the forwarded request without
    its framing (the body then read as the next request) or its Host."""
    p = RequestParser()
    with pytest.raises(ProtocolError) as e:
        p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nConnection: " + option +
               b"\r\nContent-Length: 2\r\n\r\nhi")
    assert e.value.status == 400


@pytest.mark.parametrize("option", [b"keep-alive", b"Upgrade, HTTP2-Settings", b"x-trace, close"])
def test_connection_options_that_name_other_fields_pass(option: bytes) -> None:
    ev = RequestParser().feed(b"POST / HTTP/1.1\r\nHost: a\r\nConnection: " + option +
                              b"\r\nContent-Length: 2\r\n\r\nhi")
    assert [e.__class__.__name__ for e in ev] == ["RequestHead", "Data", "MessageEnd"]


def test_many_pipelined_upgrade_requests_with_a_body_in_one_read() -> None:
    """Each takes a turn of feed's loop, not a level of recursion (a review found a
    RecursionError at ~500 of them in one 48 KB read)."""
    one = (b"POST /u HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: x\r\n"
           b"Content-Length: 2\r\n\r\nhi")
    ev = RequestParser().feed(one * 3000)
    heads = [e for e in ev if isinstance(e, RequestHead)]
    assert len(heads) == 3000 and not any(h.upgrade for h in heads)
    assert sum(len(e.data) for e in ev if isinstance(e, Data)) == 6000


def test_a_websocket_handshake_with_content_length_0_is_still_an_upgrade() -> None:
    p = RequestParser()
    ev = p.feed(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                b"Content-Length: 0\r\n\r\n\x81\x80")
    assert ev[0].upgrade and p.upgraded and p.take_trailing() == b"\x81\x80"


def test_absolute_form_becomes_origin_form() -> None:
    ev = RequestParser().feed(b"GET http://Example.com:80/admin/x?q=1 HTTP/1.1\r\n"
                              b"Host: example.com\r\n\r\n")
    assert ev[0].target == b"/admin/x?q=1" and ev[0].raw is None  # the client's bytes differ
    ev = RequestParser().feed(b"GET http://a.test HTTP/1.0\r\n\r\n")
    assert ev[0].target == b"/" and ev[0].headers.get(b"host") == b"a.test"
    ev = RequestParser().feed(b"OPTIONS http://a.test:80 HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert ev[0].target == b"*"  # RFC 9112 3.2.4: the server, not its root


@pytest.mark.parametrize("split", [None, 40, 75, 90])
@pytest.mark.parametrize("framing,body", [(b"Content-Length: 5", b"hello"),
                                          (b"Transfer-Encoding: chunked", b"5\r\nhello\r\n0\r\n\r\n")])
def test_an_upgrade_request_with_a_body_is_an_ordinary_request(split, framing, body) -> None:
    """llhttp stops at the head of any upgrade request; one with a body gets it parsed, its
    Upgrade dropped, and the next request after it is parsed too (RFC 9110 7.8)."""
    data = (b"POST /e HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n" + framing +
            b"\r\n\r\n" + body + b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
    p = RequestParser()
    parts = [data] if split is None else [data[:split], data[split:]]
    ev = [e for part in parts for e in p.feed(part)]
    assert not p.upgraded and ev[0].upgrade is False
    assert b"".join(e.data for e in ev if e.__class__.__name__ == "Data") == b"hello"
    names = [e.__class__.__name__ for e in ev if e.__class__.__name__ != "Data"]
    assert names == ["RequestHead", "MessageEnd", "RequestHead", "MessageEnd"]
    assert ev[-2].target == b"/next"


def test_eof_between_requests_is_clean() -> None:
    p = RequestParser()
    p.feed(GET)
    assert p.feed_eof() == []
    assert RequestParser().feed_eof() == []


def test_eof_mid_head_is_400() -> None:
    p = RequestParser()
    p.feed(b"GET / HTTP/1.1\r\nHo")
    assert p.in_message
    with pytest.raises(ProtocolError) as info:
        p.feed_eof()
    assert info.value.status == 400


def test_header_limit_counts_bytes_across_feeds() -> None:
    p = RequestParser(H1Limits(max_header_bytes=1000))
    p.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: ")
    with pytest.raises(ProtocolError) as info:
        for _ in range(20):
            p.feed(b"a" * 100)
    assert info.value.status == 431


def test_header_limit_after_pipelined_request_in_same_feed() -> None:
    # The partial second head shares its feed with a complete request: it is not refused
    # for the bytes of the first one.
    p = RequestParser(H1Limits(max_header_bytes=200))
    body = b"x" * 500
    ev = p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 500\r\n\r\n" + body
                + b"GET / HTTP/1.1\r\nHo")
    assert kinds(ev) == ["RequestHead", "Data", "MessageEnd"]
    ev = p.feed(b"st: a\r\n\r\n")
    assert kinds(ev) == ["RequestHead", "MessageEnd"]


def test_header_limit_exact_boundary() -> None:
    head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    RequestParser(H1Limits(max_header_bytes=len(head) + 16)).feed(head)
    with pytest.raises(ProtocolError) as info:
        RequestParser(H1Limits(max_header_bytes=20)).feed(head)
    assert info.value.status == 431


def test_max_headers() -> None:
    raw = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: 1\r\n" * 9 + b"\r\n"
    RequestParser(H1Limits(max_headers=10)).feed(raw)
    with pytest.raises(ProtocolError) as info:
        RequestParser(H1Limits(max_headers=9)).feed(raw)
    assert info.value.status == 431


def test_body_limit_allows_exact_size() -> None:
    limits = H1Limits(max_body_bytes=5)
    ev = RequestParser(limits).feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
    assert kinds(ev) == ["RequestHead", "Data", "MessageEnd"]
    ev = RequestParser(limits).feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                                    b"\r\n5\r\nhello\r\n0\r\n\r\n")
    assert kinds(ev) == ["RequestHead", "Data", "MessageEnd"]


def test_body_limit_chunked_streaming_413() -> None:
    p = RequestParser(H1Limits(max_body_bytes=5))
    p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    with pytest.raises(ProtocolError) as info:
        p.feed(b"3\r\ndef\r\n")
    assert info.value.status == 413


def test_trailing_whitespace_is_not_part_of_value() -> None:
    ev = RequestParser().feed(b"GET / HTTP/1.1\r\nHost: a \r\nX:  v w\t \r\n\r\n")
    assert ev[0].headers.items() == [(b"Host", b"a"), (b"X", b"v w")]


def test_absolute_form_default_port_matches() -> None:
    ev = RequestParser().feed(b"GET https://a.example:443/p HTTP/1.1\r\nHost: a.example\r\n\r\n")
    assert ev[0].target == b"/p"
    with pytest.raises(ProtocolError):
        RequestParser().feed(b"GET http://a.example:8080/ HTTP/1.1\r\nHost: a.example\r\n\r\n")


def test_http10_without_host_is_fine() -> None:
    ev = RequestParser().feed(b"GET / HTTP/1.0\r\n\r\n")
    assert ev[0].version == "1.0" and "host" not in ev[0].headers


def test_ipv6_host() -> None:
    ev = RequestParser().feed(b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n")
    assert ev[0].headers.get(b"host") == b"[::1]:8080"


def test_serialized_request_round_trips() -> None:
    headers = Headers([("Host", "example.com"), ("X-A", "1"), ("Transfer-Encoding", "chunked")])
    raw = (serialize_request_head(b"POST", b"/up?x=1", headers) + encode_chunk(b"hello")
           + encode_chunk(b"") + encode_chunk(b" world") + encode_last_chunk(Headers([("X-T", "9")])))
    ev = RequestParser().feed(raw)
    assert kinds(ev) == ["RequestHead", "Data", "Data", "MessageEnd"]
    assert ev[0].method == b"POST" and ev[0].target == b"/up?x=1"
    assert ev[0].headers == headers
    assert b"".join(e.data for e in ev if isinstance(e, Data)) == b"hello world"
    end = ev[-1]
    assert isinstance(end, MessageEnd) and end.trailers.items() == [(b"X-T", b"9")]


def test_serialize_request_head_str_and_version() -> None:
    raw = serialize_request_head(b"GET", b"/", Headers([("Host", "a")]), b"1.0")
    assert raw == b"GET / HTTP/1.0\r\nHost: a\r\n\r\n"
    assert encode_last_chunk() == b"0\r\n\r\n"
    assert encode_chunk(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"


def test_remove_hop_by_hop() -> None:
    h = Headers([("Host", "a"), ("Connection", "keep-alive, X-Secret , x-other"),
                 ("Keep-Alive", "timeout=5"), ("X-Secret", "1"), ("X-Other", "2"),
                 ("Proxy-Connection", "close"), ("TE", "trailers"), ("Trailer", "X-T"),
                 ("Transfer-Encoding", "chunked"), ("Upgrade", "websocket"), ("X-Kept", "3"),
                 ("Connection", "X-Too")])
    h.add("X-Too", "4")
    remove_hop_by_hop(h)
    assert h.items() == [(b"Host", b"a"), (b"X-Kept", b"3")]
    plain = Headers([("Host", "a")])
    remove_hop_by_hop(plain)
    assert plain.items() == [(b"Host", b"a")]


def test_http10_absolute_form_without_host() -> None:
    ev = RequestParser().feed(b"GET http://a.example/x HTTP/1.0\r\n\r\n")
    assert ev[0].target == b"/x" and ev[0].headers.get(b"host") == b"a.example"


@pytest.mark.parametrize("target,expected", [
    (b"/p?q=1", b"/p?q=1"), (b"*", b"*"), (b"a.example:443", b"a.example:443"),
    (b"http://a.example/p?q=1", b"/p?q=1"), (b"http://a.example", b"/"),
    (b"https://a.example?q=1", b"/?q=1"), (b"http://a.example:8080/", b"/"),
])
def test_origin_form(target: bytes, expected: bytes) -> None:
    assert origin_form(target) == expected


def test_h2_preface_is_505() -> None:
    with pytest.raises(ProtocolError) as info:
        RequestParser().feed(H2_PREFACE)
    assert info.value.status == 505 and "HTTP/2" in info.value.reason


def test_invalid_host_values_are_remembered_only_when_valid() -> None:
    ok = b"GET / HTTP/1.1\r\nHost: cache-me.example:8080\r\n\r\n"
    for _ in range(3):
        assert RequestParser().feed(ok)[0].headers.get("host") == b"cache-me.example:8080"
    for _ in range(2):
        with pytest.raises(ProtocolError):
            RequestParser().feed(b"GET / HTTP/1.1\r\nHost: bad host\r\n\r\n")


def test_endless_trailer_is_bounded() -> None:
    p = RequestParser(H1Limits(max_header_bytes=1000))
    p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"1\r\na\r\n0\r\nX-Trailer: ")
    with pytest.raises(ProtocolError) as info:
        for _ in range(20):
            p.feed(b"b" * 100)
    assert info.value.status == 431


def test_slow_chunked_upload_is_not_a_stall() -> None:
    p = RequestParser(H1Limits(max_header_bytes=100))
    p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    got = 0
    for _ in range(100):
        for ev in p.feed(b"5\r\nhello\r\n"):
            got += len(ev.data)
    assert got == 500


# -- RequestHead.raw: the exact bytes of a body-less HTTP/1.1 request that came alone -------

def test_raw_is_the_request_when_it_came_alone_in_one_feed() -> None:
    p = RequestParser()
    for _ in range(3):  # and again on the same keep-alive connection
        ev = p.feed(GET)
        assert ev[0].raw == GET


@pytest.mark.parametrize("feeds", [
    [GET + GET],                                                     # pipelined
    [GET + b"GET /y HTTP/1.1\r\n"],                                  # the next one begun
    [GET[:10], GET[10:]],                                            # split across reads
    [b"GET /x HTTP/1.0\r\nHost: example.com\r\n\r\n"],               # HTTP/1.0
    [b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"],   # a (zero) body
    [b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nab"],
    [b"\r\n" + GET],                                                 # an empty line first
    [GET + b"\r\n"],                                                 # and after
])
def test_raw_is_none_unless_the_request_was_alone_whole_and_bodyless(feeds: list[bytes]) -> None:
    p = RequestParser()
    heads = [e for data in feeds for e in p.feed(data) if isinstance(e, RequestHead)]
    assert heads and all(h.raw is None for h in heads)


# -- repeated heads: what parsing gave is reused, and only where parsing would give it -------

def test_a_repeated_head_gives_what_parsing_it_gives_in_fields_of_its_own() -> None:
    from pyngora.protocols import h1
    h1._SEEN.clear()
    p = RequestParser()
    first = p.feed(GET)
    assert GET in h1._SEEN
    again = p.feed(GET)
    assert kinds(again) == ["RequestHead", "MessageEnd"] and again[1].trailers is None
    a, b = first[0], again[0]
    for attr in RequestHead.__slots__:
        if attr != "headers":
            assert getattr(a, attr) == getattr(b, attr), attr
    assert a.headers.items() == b.headers.items()
    b.headers.add(b"X-Edited", b"1")  # a phase editing one request's fields
    assert p.feed(GET)[0].headers.items() == [(b"Host", b"example.com")]


def test_a_repeated_head_is_parsed_again_under_other_limits_or_mid_request() -> None:
    from pyngora.protocols import h1
    h1._SEEN.clear()
    RequestParser().feed(GET)
    with pytest.raises(ProtocolError) as err:
        RequestParser(H1Limits(max_header_bytes=20)).feed(GET)
    assert err.value.status == 431
    p = RequestParser()
    p.feed(b"GET /y")  # a request begun: the bytes that follow continue it
    with pytest.raises(ProtocolError):
        p.feed(GET)  # "GET /yGET /x HTTP/1.1..." is no request line


def test_a_repeated_head_that_closes_closes_as_parsing_it_does() -> None:
    from pyngora.protocols import h1
    h1._SEEN.clear()
    closing = b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    for _ in range(2):  # parsed, then remembered
        p = RequestParser()
        ev = p.feed(closing)
        assert kinds(ev) == ["RequestHead", "MessageEnd"] and not ev[0].keep_alive
        assert p.feed(GET) == []  # bytes after a request that closes the connection
        assert closing in h1._SEEN


@pytest.mark.parametrize("data", [
    b"GET /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * 3000 + b"\r\n\r\n",
    b"GET /x HTTP/1.0\r\nHost: a\r\n\r\n",
])
def test_heads_that_expect_or_are_big_are_not_remembered(data: bytes) -> None:
    from pyngora.protocols import h1
    h1._SEEN.clear()
    RequestParser().feed(data)
    assert not h1._SEEN


def test_what_it_remembers_is_bounded() -> None:
    from pyngora.protocols import h1
    h1._SEEN.clear()
    for i in range(h1._SEEN_MAX + 10):
        RequestParser().feed(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
    assert 0 < len(h1._SEEN) <= h1._SEEN_MAX
