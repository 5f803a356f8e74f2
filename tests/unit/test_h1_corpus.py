"""Replays tests/data/h1_malformed and tests/data/h1_valid through the sans-IO RequestParser.

Malformed files are named ``STATUS_what_it_is.http``: each must raise ProtocolError with that
status, fed whole and fed one byte at a time (the parser then sees EOF, so that truncated
requests fail too). Valid files must give the same events whatever the split.
No event loop: bytes in, events out.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from pyngora.protocols.events import Data, InformationalResponse, MessageEnd, RequestHead, ResponseHead
from pyngora.protocols.h1 import H1Limits, ProtocolError, RequestParser

DATA = Path(__file__).resolve().parent.parent / "data"
MALFORMED = sorted((DATA / "h1_malformed").glob("*.http"))
VALID = sorted((DATA / "h1_valid").glob("*.http"))
LIMITS = H1Limits(max_header_bytes=65536, max_headers=100, max_body_bytes=1024)


def normalize(events: list, tunnel: bool = False) -> list[tuple]:
    """Events as comparable tuples."""
    out: list[tuple] = []
    for ev in events:
        if isinstance(ev, RequestHead):
            out.append(("head", ev.method, ev.target, ev.version, ev.headers.items(),
                        ev.keep_alive, ev.body, ev.content_length, ev.expect_continue,
                        ev.upgrade))
        elif isinstance(ev, ResponseHead):
            out.append(("rhead", ev.status, ev.reason, ev.version, ev.headers.items(),
                        ev.keep_alive, ev.body, ev.content_length))
        elif isinstance(ev, InformationalResponse):
            out.append(("info", ev.status, ev.headers.items()))
        elif isinstance(ev, Data):
            out.append(("tunnel" if tunnel else "data", ev.data))
        elif isinstance(ev, MessageEnd):
            out.append(("end", ev.trailers.items() if ev.trailers is not None else None))
        else:  # pragma: no cover - the h1 parser emits nothing else
            out.append(("other", repr(ev)))
    return out


def coalesce(items: list[tuple]) -> list[tuple]:
    """Merge adjacent data (and tunnel) pieces: how a body is split is not part of the result."""
    out: list[tuple] = []
    for item in items:
        if item[0] in ("data", "tunnel") and out and out[-1][0] == item[0]:
            out[-1] = (item[0], out[-1][1] + item[1])
        elif item[0] in ("data", "tunnel") and not item[1]:
            continue
        else:
            out.append(item)
    return out


def replay(parser, chunks: list[bytes]) -> list[tuple]:
    """Feed ``chunks`` then EOF; the tunnel bytes after an upgrade count as ("tunnel", ...)."""
    out: list[tuple] = []
    for chunk in chunks:
        was_upgraded = parser.upgraded
        out += normalize(parser.feed(chunk), tunnel=was_upgraded)
        if parser.upgraded:
            out.append(("tunnel", parser.take_trailing()))
    out += normalize(parser.feed_eof(), tunnel=parser.upgraded)
    return coalesce(out)


def expected_status(path: Path) -> int:
    return int(path.name.split("_", 1)[0])


def test_corpus_is_big_enough() -> None:
    assert len(MALFORMED) >= 40
    assert len(VALID) >= 10


@pytest.mark.parametrize("path", MALFORMED, ids=lambda p: p.stem)
def test_malformed_whole(path: Path) -> None:
    raw = path.read_bytes()
    parser = RequestParser(LIMITS)
    with pytest.raises(ProtocolError) as info:
        parser.feed(raw)
        parser.feed_eof()
    assert info.value.status == expected_status(path), info.value.reason
    # a dead parser stays dead
    with pytest.raises(ProtocolError):
        parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")


@pytest.mark.parametrize("path", MALFORMED, ids=lambda p: p.stem)
def test_malformed_byte_by_byte(path: Path) -> None:
    raw = path.read_bytes()
    parser = RequestParser(LIMITS)
    with pytest.raises(ProtocolError) as info:
        for i in range(len(raw)):
            parser.feed(raw[i:i + 1])
        parser.feed_eof()
    assert info.value.status == expected_status(path), info.value.reason


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_every_split(path: Path) -> None:
    raw = path.read_bytes()
    whole = replay(RequestParser(LIMITS), [raw])
    assert whole and whole[0][0] == "head"
    for i in range(1, len(raw)):
        assert replay(RequestParser(LIMITS), [raw[:i], raw[i:]]) == whole, f"split at {i}"
    assert replay(RequestParser(LIMITS), [raw[i:i + 1] for i in range(len(raw))]) == whole


def _heads(path: str) -> list[tuple]:
    raw = (DATA / "h1_valid" / path).read_bytes()
    return replay(RequestParser(LIMITS), [raw])


def test_valid_semantics() -> None:
    """Spot checks that the valid corpus parses to what it means, not only consistently."""
    ev = _heads("pipelined_sequence.http")
    heads = [e for e in ev if e[0] == "head"]
    assert [h[2] for h in heads] == [b"/1", b"/2", b"/3", b"/4"]
    assert [h[6] for h in heads] == ["none", "length", "chunked", "none"]
    assert heads[-1][5] is False  # Connection: close
    assert ("data", b"abc") in ev and ("data", b"xyz") in ev

    ev = _heads("chunked_extensions_trailers.http")
    assert ev[1] == ("data", b"hello world")
    assert ev[2] == ("end", [(b"X-Checksum", b"abc123"), (b"X-Other", b"1")])

    ev = _heads("websocket_upgrade_trailing.http")
    assert ev[0][9] is True and ev[1] == ("end", None)
    assert ev[2] == ("tunnel", b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58")

    ev = _heads("http10_keepalive.http")
    assert [e[5] for e in ev if e[0] == "head"] == [True, False]

    ev = _heads("http10_no_host_close.http")
    assert len([e for e in ev if e[0] == "head"]) == 1  # bytes after a closing request are ignored

    ev = _heads("expect_100_continue.http")
    assert ev[0][8] is True and ev[1] == ("data", b"data")

    ev = _heads("leading_crlf_and_ows.http")
    assert ev[0][4] == [(b"Host", b"example.com"), (b"X-Pad", b"spaced value"),
                        (b"X-Obs-Text", b"caf\xe9"), (b"X-Empty", b"")]

    assert _heads("options_asterisk.http")[0][2] == b"*"
    assert _heads("absolute_form_matching_host.http")[0][2] == b"/path?x=1"  # origin-form
    assert _heads("content_length_leading_zeros.http")[0][7] == 5


# -- fuzzing: whatever the bytes, the parsers answer events or ProtocolError, nothing else ----
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pyngora.protocols.h1 import ResponseParser  # noqa: E402

SEEDS = [p.read_bytes() for p in VALID] + [p.read_bytes()[:2000] for p in MALFORMED]


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    raw = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(raw) - 1, 0)))
        byte = draw(st.sampled_from(b"\r\n \t:;,\x00\x7f\xff0aAzZ-"))
        if op == "flip" and raw:
            raw[pos] = byte
        elif op == "insert":
            raw.insert(pos, byte)
        elif raw:
            del raw[pos]
    cuts = sorted(draw(st.lists(st.integers(0, len(raw)), max_size=4)))
    return bytes(raw), cuts


def _split(raw: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0] + cuts + [len(raw)]
    return [raw[a:b] for a, b in zip(edges, edges[1:])]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_fuzz_request_parser_only_raises_protocol_error(case: tuple[bytes, list[int]]) -> None:
    raw, cuts = case
    p = RequestParser(LIMITS)
    try:
        for chunk in _split(raw, cuts):
            p.feed(chunk)
        p.feed_eof()
    except ProtocolError as err:
        assert err.status in (400, 413, 431, 501, 505)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.sampled_from([b"GET", b"HEAD", b"CONNECT", b"POST"]))
def test_fuzz_response_parser_only_raises_protocol_error(raw: bytes, method: bytes) -> None:
    for prefix in (b"", b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"):
        p = ResponseParser()
        p.start(method)
        try:
            p.feed(prefix + raw)
            p.feed_eof()
        except ProtocolError as err:
            assert err.status == 502
