"""Headers, RequestHeader and ResponseHeader (pyngora/headers.py): no event loop needed."""
from __future__ import annotations

import pytest

from pyngora.headers import Headers, RequestHeader, ResponseHeader


def sample() -> Headers:
    return Headers([(b"Host", b"a"), (b"Set-Cookie", b"x=1"), (b"X-Case", b"v"),
                    (b"set-cookie", b"y=2")])


def test_order_and_case_preserved() -> None:
    h = sample()
    assert list(h) == [(b"Host", b"a"), (b"Set-Cookie", b"x=1"), (b"X-Case", b"v"),
                       (b"set-cookie", b"y=2")]
    assert h.keys() == [b"Host", b"Set-Cookie", b"X-Case", b"set-cookie"]
    assert len(h) == 4 and bool(h)
    assert not Headers() and len(Headers()) == 0


def test_case_insensitive_lookup_bytes_and_str() -> None:
    h = sample()
    assert h.get(b"HOST") == b"a" and h.get("host") == b"a"
    assert h.get("missing") is None and h.get("missing", b"d") == b"d"
    assert h.get_all("SET-COOKIE") == [b"x=1", b"y=2"]
    assert h.get_all("nope") == []
    assert "x-case" in h and b"X-CASE" in h and "nope" not in h and 42 not in h


def test_set_replaces_all_at_first_position() -> None:
    h = sample()
    h.set("set-cookie", "z=3")
    assert h.items() == [(b"Host", b"a"), (b"set-cookie", b"z=3"), (b"X-Case", b"v")]
    h.set(b"New", b"1")
    assert h.items()[-1] == (b"New", b"1")
    h.insert_header("new", 2)
    assert h.get_all("NEW") == [b"2"]


def test_add_and_remove() -> None:
    h = sample()
    h.add("Set-Cookie", "w=4")
    h.append_header("Via", "1.1 pyngora")
    assert h.get_all("set-cookie") == [b"x=1", b"y=2", b"w=4"]
    assert h.remove("SET-COOKIE") == 3
    assert h.remove("set-cookie") == 0
    assert h.remove_header("via") == 1
    assert h.items() == [(b"Host", b"a"), (b"X-Case", b"v")]
    assert h.get("x-case") == b"v"  # the lowercase index stays in step


def test_remove_names_one_pass() -> None:
    h = sample()
    assert h.remove_names({b"host", b"x-case"}) == 2
    assert h.get_all("set-cookie") == [b"x=1", b"y=2"] and "host" not in h
    assert h.remove_names(frozenset({b"absent"})) == 0


def test_copy_is_independent() -> None:
    h = sample()
    c = h.copy()
    c.add("X-New", "1")
    c.remove("host")
    assert "x-new" not in h and h.get("host") == b"a"
    assert c == c.copy() and c != h


def test_serialize() -> None:
    assert Headers().serialize() == b""
    h = Headers([("A", "1"), ("b", "two words")])
    assert h.serialize() == b"A: 1\r\nb: two words\r\n"


def test_str_values_latin1_and_int() -> None:
    h = Headers([("X-Name", "caf\u00e9"), ("Content-Length", 12)])
    assert h.get("x-name") == b"caf\xe9" and h.get("content-length") == b"12"


@pytest.mark.parametrize("value", ["a\r\nInjected: 1", "a\nb", "a\x00b"])
def test_values_with_cr_lf_nul_rejected(value: str) -> None:
    h = Headers()
    with pytest.raises(ValueError):
        h.add("X", value)
    with pytest.raises(ValueError):
        h.set("X", value)
    assert len(h) == 0


@pytest.mark.parametrize("name", ["", "Bad Name", "Bad:Name", "X\r\n", "caf\u00e9"])
def test_bad_names_rejected(name: str) -> None:
    with pytest.raises(ValueError):
        Headers().add(name, "v")


def test_request_header() -> None:
    req = RequestHeader("GET", "/a?b=1", "1.1", [("Host", "example.com")])
    assert req.get("host") == b"example.com" and req.path == "/a"
    req.insert_header("X-A", "1")
    req.append_header("X-A", "2")
    assert req.headers.get_all("x-a") == [b"1", b"2"]
    assert req.remove_header("x-a") == 2
    req.set_uri("/new")
    req.set_method("POST")
    assert (req.method, req.uri, req.version) == ("POST", "/new", "1.1")
    assert RequestHeader("GET", "/", b"1.0").version == "1.0"
    assert len(RequestHeader("GET", "/").headers) == 0
    shared = Headers([("A", "1")])
    assert RequestHeader("GET", "/", headers=shared).headers is shared
    assert "RequestHeader" in repr(req)


def test_response_header() -> None:
    resp = ResponseHeader.build(200, [("Content-Type", "text/plain")])
    assert (resp.status, resp.reason, resp.version) == (200, None, "1.1")
    assert resp.get("content-type") == b"text/plain"
    resp.insert_header("Server", "pyngora")
    resp.append_header("Vary", "a")
    resp.append_header("Vary", "b")
    assert resp.remove_header("vary") == 2
    resp.reason = "Fine"
    resp.set_status(404)
    assert resp.status == 404 and resp.reason is None
    with pytest.raises(ValueError):
        resp.set_status(42)
    assert ResponseHeader.build(204).headers.items() == []
    assert "ResponseHeader" in repr(resp)
