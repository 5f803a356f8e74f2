"""``translate_request`` remembers the header lists it judged (protocols/h2_fields.py): a repeat
must give what a first judgement gives, with its own field objects, and a refused list must
be refused every time."""
from __future__ import annotations

import pytest
from hpack import HeaderTuple, NeverIndexedHeaderTuple

from pyngora.protocols import h2_fields
from pyngora.protocols.h1_wire import serialize_request_head
from pyngora.protocols.h2_fields import Reject, translate_request

GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/a?b"),
       (b":authority", b"example.test"), (b"user-agent", b"t/1"), (b"cookie", b"a=1"),
       (b"accept", b"*/*"), (b"cookie", b"b=2")]


def _same(a: object, b: object) -> None:
    for name in ("method", "target", "version", "body", "content_length", "expect_continue",
                 "upgrade", "raw"):
        assert getattr(a, name) == getattr(b, name), name
    assert list(a.headers.items()) == list(b.headers.items())  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def _fresh_table() -> None:
    h2_fields._JUDGED.clear()


def test_a_repeated_list_gives_what_its_first_judgement_gave() -> None:
    first = translate_request(list(GET), 1, True)
    assert h2_fields._JUDGED  # judged once, kept
    again = translate_request(list(GET), 3, True)
    _same(first, again)
    assert again.stream_id == 3
    assert list(again.headers.items()) == [(b"host", b"example.test"), (b"user-agent", b"t/1"),
                                           (b"accept", b"*/*"), (b"cookie", b"a=1; b=2")]
    # The HTTP/1.1 head a body-less request makes, for the fast path to send as it is.
    assert again.raw == serialize_request_head(b"GET", b"/a?b", again.headers)
    again.headers.add(b"x-edit", b"1")  # each head is its own: editing one leaves the next
    assert b"x-edit" not in translate_request(list(GET), 5, True).headers


def test_a_repeat_keeps_its_own_field_objects() -> None:
    plain = [HeaderTuple(n, v) for n, v in GET]
    translate_request(plain, 1, True)
    secret = [NeverIndexedHeaderTuple(n, v) if n == b"user-agent" else HeaderTuple(n, v)
              for n, v in GET]
    head = translate_request(secret, 3, True)
    (ua,) = [f for f in head.headers._items if f[0] == b"user-agent"]
    assert type(ua) is NeverIndexedHeaderTuple


def test_end_stream_and_the_body_limit_are_part_of_the_judgement() -> None:
    post = [(b":method", b"POST")] + GET[1:] + [(b"content-length", b"10")]
    empty = post[:-1] + [(b"content-length", b"0")]
    assert translate_request(list(empty), 1, True).body == "none"
    for sid in (1, 3):  # a length its DATA (none) cannot add up to: malformed, each time
        with pytest.raises(Reject) as e:
            translate_request(list(post), sid, True)
        assert e.value.status == 0
    head = translate_request(list(post), 3, False)
    assert head.body == "length" and head.content_length == 10 and head.raw is None
    with pytest.raises(Reject) as e:
        translate_request(list(post), 5, False, max_body_bytes=5)
    assert e.value.status == 413


def test_a_refused_list_is_refused_every_time() -> None:
    bad = GET + [(b"connection", b"keep-alive")]
    for sid in (1, 3):
        with pytest.raises(Reject) as e:
            translate_request(list(bad), sid, True)
        assert e.value.status == 0
    assert not h2_fields._JUDGED


def test_large_lists_are_judged_each_time() -> None:
    big = GET + [(b"x-big", b"v" * 4096)]
    _same(translate_request(list(big), 1, True), translate_request(list(big), 3, True))
    long_path = [(b":path", b"/" + b"p" * 4096) if n == b":path" else (n, v) for n, v in GET]
    translate_request(list(long_path), 5, True)  # (the path counts, and raw repeats it)
    assert not h2_fields._JUDGED
