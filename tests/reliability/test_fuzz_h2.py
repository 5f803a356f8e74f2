"""Hypothesis-driven random and mutated HTTP/2 frame sequences, against the sans-IO server
(``protocols/h2.py`` over ``protocols/h2_wire.py``) and against the running server (h2c).

Properties: ``feed`` never raises; what the server writes always parses as HTTP/2 frames
within the client's frame size; how the client's bytes are split across reads changes
nothing (events and output byte for byte); the running server never loses a worker and
answers a PING after any input unless it ended the connection with GOAWAY. Examples are
bounded, so the file runs in well under 30 s.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Iterator

import hpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyngora.protocols.events import Data, RequestHead
from pyngora.protocols.h2 import H2Limits, H2Server
from pyngora.protocols.h2_wire import PREFACE, frame
from tests.support import Pyngora, free_port, wait_for

EXAMPLES = int(os.environ.get("PYNGORA_FUZZ_EXAMPLES", "300"))
RANDOM = os.environ.get("PYNGORA_FUZZ_RANDOM") == "1"
GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"h"), (b":path", b"/a")]
POST = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"h"), (b":path", b"/")]
SETTINGS = frame(4, 0, 0)
SIDS = [0, 1, 2, 3, 5, 7, 9, 0x7FFFFFFF]
KNOWN_TYPES = range(10)


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """A client's bytes after the preface: mostly well-formed requests and control frames,
    with frames of random types, flags, ids and payloads, and noise, mixed in."""
    enc = hpack.Encoder()
    out = [SETTINGS] if draw(st.integers(0, 9)) else []
    sid = -1
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["request", "request", "post", "control", "control",
                                     "frame", "noise"]))
        if kind in ("request", "post"):
            sid = draw(st.sampled_from([sid + 2, sid + 2, sid + 4, max(sid, 1), 2]))
        if kind == "request":
            fields = list(GET)
            if draw(st.booleans()):
                fields.append((draw(st.binary(max_size=8)), draw(st.binary(max_size=8))))
            prio = draw(st.sampled_from([0, 0x20]))  # with priority: 5 bytes first
            block = enc.encode(fields)
            out.append(frame(1, 0x5 | prio, sid, (b"\0\0\0\0\x10" if prio else b"") + block))
        elif kind == "post":
            out.append(frame(1, 0x4, sid, enc.encode(POST)))
            for _ in range(draw(st.integers(0, 3))):
                out.append(frame(0, draw(st.sampled_from([0, 0, 1, 8, 9])), sid,
                                 draw(st.sampled_from([b"", b"\x01abc", b"x" * 1000]))))
        elif kind == "control":
            out.append(draw(st.sampled_from([
                frame(6, 0, 0, b"12345678"), frame(6, 1, 0, b"12345678"),
                frame(8, 0, 0, b"\0\0\x10\0"), frame(8, 0, max(sid, 1), b"\0\0\x10\0"),
                frame(2, 0, 11, b"\0\0\0\0\x10"), frame(3, 0, max(sid, 1), b"\0\0\0\x08"),
                frame(4, 0, 0, b"\0\x04\0\0\0\x10"), frame(4, 0, 0, b"\0\x01\0\0\0\0"),
                frame(4, 1, 0), frame(0xEE, 0, 0, b"ext")])))
        elif kind == "frame":
            typ = draw(st.sampled_from(list(KNOWN_TYPES) + [0xEE]))
            flags = draw(st.integers(0, 255))
            size = draw(st.sampled_from([0, 1, 4, 5, 6, 8, 12, 30]))
            payload = draw(st.binary(min_size=size, max_size=size))
            out.append(frame(typ, flags, draw(st.sampled_from(SIDS)), payload))
        else:
            out.append(draw(st.binary(min_size=1, max_size=30)))
    return b"".join(out)


def _run(chunks: list[bytes]) -> tuple[list[str], bytes]:
    """Feed ``chunks``, then act as the application would: answer each request, read each
    body (after the last chunk, so that the split alone can differ). Returns the events (as
    text) and every byte the server wrote."""
    srv = H2Server(H2Limits(stream_window=1024, connection_window=65535))
    srv.initiate()
    events: list = []
    out = bytearray(srv.data_to_send())
    for chunk in chunks:
        events += srv.feed(chunk)
        out += srv.data_to_send()
        if srv.closed:
            break
    for ev in events:
        if isinstance(ev, RequestHead):
            srv.send_head(ev.stream_id, 200, [(b"x", b"y")])
            srv.send_body(ev.stream_id, b"z" * 100, end=True)
            srv.release(ev.stream_id)
        elif isinstance(ev, Data):
            srv.consumed(ev.stream_id, len(ev.data))
    out += srv.data_to_send()
    return [_text(ev) for ev in events], bytes(out)


def _text(ev: object) -> str:
    if isinstance(ev, RequestHead):
        return f"head {ev.stream_id} {ev.method!r} {ev.target!r} {ev.headers.items()}"
    slots = [a for c in type(ev).__mro__ for a in getattr(c, "__slots__", ())]
    return f"{type(ev).__name__} {[getattr(ev, a, None) for a in slots]}"


def _check_frames(out: bytes) -> None:
    """Whole frames only, of known types, within the default frame size, on sane ids."""
    i = 0
    while i < len(out):
        assert len(out) - i >= 9, out[i:]
        n = int.from_bytes(out[i:i + 3], "big")
        typ, sid = out[i + 3], int.from_bytes(out[i + 5:i + 9], "big")
        assert n <= 16384 and typ in KNOWN_TYPES and typ != 5, (n, typ)
        assert not sid >> 31
        if typ in (4, 6, 7):
            assert sid == 0
        elif typ in (0, 1, 3, 9):
            assert sid % 2 == 1
        i += 9 + n
    assert i == len(out)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM,
          suppress_health_check=[HealthCheck.too_slow])
@given(frames(), st.lists(st.integers(0, 400), max_size=6))
def test_frames_never_crash_and_any_split_gives_the_same_answer(data: bytes,
                                                                 cuts: list[int]) -> None:
    raw = PREFACE + data
    whole = _run([raw])
    _check_frames(whole[1])
    edges = [0] + sorted(c for c in cuts if c < len(raw)) + [len(raw)]
    assert _run([raw[a:b] for a, b in zip(edges, edges[1:])]) == whole


# -- against the running server ----------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[int, Pyngora]]:
    tmp = tmp_path_factory.mktemp("fuzz_h2")
    port = free_port()
    conf = (f"pid_file: {tmp}/p.pid\nupgrade_sock: {tmp}/u.sock\nmetrics_dir: {tmp}/m\n"
            f"threads: 2\nservices:\n"
            f"  - name: origin\n    type: static\n"
            f"    listeners: [{{address: '127.0.0.1:{port}', h2c: true}}]\n"
            f"    body: fuzzed\n")
    p = Pyngora(Path(tmp), conf).start()
    try:
        p.wait_serving(port)
        wait_for(lambda: len(p.workers()) == 2, 20, "2 workers")
        yield port, p
    finally:
        p.stop()


_PROBE = b"fuzzprob"


def _answers_probe(port: int, data: bytes) -> str:
    """Send the fuzz, then a PING: the server handles frames in order, so its ACK (or a
    GOAWAY or the connection's end before it) says everything before was handled. Every
    frame read on the way must be whole and of a known type."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(PREFACE + data + frame(6, 0, 0, _PROBE))
        except OSError:
            return "cut"  # refused mid-write: the server ended the connection
        buf = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return "cut"
            if not chunk:
                return "eof"  # (after the client's own GOAWAY, or ours)
            buf += chunk
            if frame(6, 1, 0, _PROBE) in buf:
                return "answered"
            _check_prefix(buf)


def _check_prefix(buf: bytes) -> None:
    i = 0
    while len(buf) - i >= 9:
        n = int.from_bytes(buf[i:i + 3], "big")
        assert buf[i + 3] in KNOWN_TYPES, buf[i:i + 9]
        if buf[i + 3] == 7:  # GOAWAY: the end, the probe will not be answered
            raise _Ended
        i += 9 + n


class _Ended(Exception):
    pass


WORKERS: dict[str, list[int]] = {}


@settings(max_examples=min(EXAMPLES, 150), deadline=None, derandomize=not RANDOM,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(frames())
def test_server_answers_or_ends_with_goaway(server, data: bytes) -> None:
    port, p = server
    WORKERS.setdefault("first", sorted(p.workers()))
    try:
        how = _answers_probe(port, data)
    except _Ended:
        how = "goaway"
    SEEN[how] = SEEN.get(how, 0) + 1


SEEN: dict[str, int] = {}  # how each fuzzed connection ended, printed by the last test


def test_server_survived_the_h2_fuzz(server) -> None:
    """Runs after the fuzz (pytest keeps file order): same workers, still serving h2c."""
    port, p = server
    workers = WORKERS.setdefault("first", sorted(p.workers()))
    print(f"\nh2 fuzz: {dict(sorted(SEEN.items()))}; workers unchanged")
    assert len(workers) == 2 and sorted(p.workers()) == workers
    enc = hpack.Encoder()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(PREFACE + SETTINGS + frame(1, 0x5, 1, enc.encode(GET)))
        buf = b""
        while b"fuzzed" not in buf:
            chunk = s.recv(65536)
            assert chunk, buf
            buf += chunk
    assert "Traceback" not in p.output()
