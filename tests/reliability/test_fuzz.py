"""Hypothesis-driven random and mutated requests, against the sans-IO h1 parser and against
the running server (a static service and a proxy in front of it, 2 workers each).

Properties: the parser only ever answers events or ProtocolError, and how the bytes are split
(pipelined streams included) changes nothing; the server never crashes, no worker dies (the
worker pids are the same at the end), and every byte it sends back parses as valid HTTP/1.1
responses. Examples are bounded (a few hundred), so the file runs in well under 30 s.
"""
from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyngora.protocols.events import Data, MessageEnd, RequestHead
from pyngora.protocols.h1 import H1Limits, ProtocolError, RequestParser
from tests.reliability.rawnet import read_reply
from tests.support import Pyngora, free_port, get, wait_for

DATA = Path(__file__).resolve().parent.parent / "data"
VALID = [p.read_bytes() for p in sorted((DATA / "h1_valid").glob("*.http"))]
MALFORMED = [p.read_bytes()[:2000] for p in sorted((DATA / "h1_malformed").glob("*.http"))]
SIMPLE = [b"GET /a?b=c HTTP/1.1\r\nHost: t\r\nAccept: */*\r\n\r\n",
          b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
          b"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
          b"3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n",
          b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n",
          b"GET / HTTP/1.0\r\n\r\n"]
# PYNGORA_FUZZ_EXAMPLES=N PYNGORA_FUZZ_RANDOM=1 for a longer, fresh-seeded run by hand.
SERVER_EXAMPLES = int(os.environ.get("PYNGORA_FUZZ_EXAMPLES", "300"))
RANDOM = os.environ.get("PYNGORA_FUZZ_RANDOM") == "1"
NOISE = b"\r\n \t:;,\x00\x7f\xff0aAzZ-/?#%\"GETHTP1."


def _outcome(chunks: list[bytes], limits: H1Limits) -> tuple[list[tuple], int]:
    """Events as tuples (data merged) and the error status (0: none)."""
    p = RequestParser(limits)
    out: list[tuple] = []
    status = 0

    def add(events: list) -> None:
        for ev in events:
            if isinstance(ev, RequestHead):
                out.append(("head", ev.method, ev.target, ev.headers.items(), ev.body))
            elif isinstance(ev, Data):
                if out and out[-1][0] == "data":
                    out[-1] = ("data", out[-1][1] + ev.data)
                elif ev.data:
                    out.append(("data", ev.data))
            elif isinstance(ev, MessageEnd):
                out.append(("end",))
            else:
                raise AssertionError(f"unexpected event {ev!r}")
    try:
        for c in chunks:
            add(p.feed(c))
            if p.upgraded:
                break
        p.feed_eof()
    except ProtocolError as err:
        assert err.status in (400, 413, 431, 501, 505), err
        add(err.events)  # what the failing feed completed before the error
        status = err.status
    return out, status


def _split(raw: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0] + sorted(cuts) + [len(raw)]
    return [raw[a:b] for a, b in zip(edges, edges[1:])]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes] = VALID + SIMPLE + MALFORMED) -> bytes:
    raw = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "dup"]))
        pos = draw(st.integers(0, max(len(raw) - 1, 0)))
        byte = draw(st.sampled_from(NOISE))
        if op == "flip" and raw:
            raw[pos] = byte
        elif op == "insert":
            raw.insert(pos, byte)
        elif op == "dup" and raw:
            end = min(len(raw), pos + draw(st.integers(1, 40)))
            raw[pos:pos] = raw[pos:end]
        elif raw:
            del raw[pos]
    return bytes(raw)


LIMITS = H1Limits(max_header_bytes=4096, max_headers=50, max_body_bytes=4096)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(), st.lists(st.integers(0, 3000), max_size=6))
def test_parser_split_does_not_change_the_outcome(raw: bytes, cuts: list[int]) -> None:
    cuts = [c for c in cuts if c <= len(raw)]
    assert _outcome(_split(raw, cuts), LIMITS) == _outcome([raw], LIMITS)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(SIMPLE[:4]), min_size=20, max_size=400),
       st.lists(st.integers(0, 10**6), min_size=1, max_size=8))
def test_parser_pipelined_stream_any_split(reqs: list[bytes], cuts: list[int]) -> None:
    """Many small pipelined requests, cut anywhere, with a small head limit: every request
    comes out (the bug this guards: the head-size count charged a whole feed to one head)."""
    limits = H1Limits(max_header_bytes=256, max_headers=20, max_body_bytes=4096)
    raw = b"".join(reqs)
    cuts = [c % (len(raw) + 1) for c in cuts]  # anywhere in the stream
    events, status = _outcome(_split(raw, cuts), limits)
    assert status == 0
    assert sum(1 for e in events if e[0] == "head") == len(reqs)


def test_parser_ten_thousand_pipelined_in_big_feeds() -> None:
    """The 10,000-request regression at the parser, with the default 64 KiB head limit: fed
    in pieces over 64 KiB (one socket read brings up to 256 KiB), each cut in mid-request.
    It used to charge a whole piece to the head left incomplete at its end, and answer 431
    after ~7,000 requests."""
    raw = b"".join(b"GET /item/%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(10000))
    for size in (70001, 100003, 262144):
        p = RequestParser(H1Limits())
        heads = 0
        for i in range(0, len(raw), size):
            heads += sum(1 for ev in p.feed(raw[i:i + size]) if isinstance(ev, RequestHead))
        assert heads == 10000, size


# -- against the running server ----------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[list[int], Pyngora]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    port, pport = free_port(), free_port()
    conf = (f"pid_file: {tmp}/p.pid\nupgrade_sock: {tmp}/u.sock\nmetrics_dir: {tmp}/m\n"
            f"threads: 2\nservices:\n"
            f"  - name: origin\n    type: static\n    listeners: ['127.0.0.1:{port}']\n"
            f"    body: fuzzed\n"
            f"    limits: {{max_header_bytes: 8192, max_body_bytes: 65536, "
            f"header_read_timeout_seconds: 2}}\n"
            f"  - name: proxy\n    type: http_proxy\n    listeners: ['127.0.0.1:{pport}']\n"
            f"    upstream: origin\n    upstreams:\n      - name: origin\n"
            f"        backends: [{{addr: '127.0.0.1:{port}'}}]\n"
            f"        timeouts: {{read_seconds: 2}}\n"
            f"    limits: {{max_header_bytes: 8192, max_body_bytes: 65536, "
            f"header_read_timeout_seconds: 2}}\n")
    p = Pyngora(tmp, conf).start()
    try:
        p.wait_serving(port)
        p.wait_serving(pport)
        wait_for(lambda: len(p.workers()) == 4, 20, "2 workers per service")
        wait_for(lambda: get(port)[0] == 200 and get(pport)[0] == 200, 20, "both answer")
        yield [port, pport], p
    finally:
        p.stop()


def _exchange(port: int, raw: bytes) -> list[int]:
    """Send ``raw``, half-close, read every response until EOF; each must be valid HTTP."""
    statuses = []
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        try:
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may refuse and close before reading it all
        buf = b""
        heads = raw.count(b"HEAD ")
        for _ in range(200):
            r, buf = read_reply(s, buf, head_request=False)
            if r.status == 0 and r.error in ("EOF before head",) and not buf:
                break  # clean end
            if r.error.startswith("reset") and r.status == 0 and not buf:
                break  # a refused request may be followed by RST of unread bytes
            # A response to a HEAD has no body but may carry Content-Length; one that is
            # otherwise incomplete must be because the proxy's origin answer was cut.
            if not r.complete and heads and r.status and "EOF in body" in r.error:
                break
            assert r.complete and r.status, (r.status, r.error, r.raw_head, raw[:200])
            assert 100 <= r.status <= 599
            statuses.append(r.status)
            if r.headers.get("connection", "").lower() == "close":
                break
    return statuses


@st.composite
def wire(draw: st.DrawFn) -> bytes:
    """A request stream: mutated, pipelined, or pure noise (HEAD excluded: its response framing
    cannot be checked without knowing which response answers it)."""
    kind = draw(st.sampled_from(["mutated", "pipelined", "noise"]))
    seeds = [s for s in VALID + SIMPLE + MALFORMED if not s.startswith(b"HEAD")
             and b"Upgrade" not in s and not s.startswith(b"CONNECT")]
    if kind == "noise":
        return draw(st.binary(min_size=1, max_size=200))
    if kind == "pipelined":
        return b"".join(draw(st.lists(mutated(seeds), min_size=2, max_size=5)))
    return draw(mutated(seeds))


@settings(max_examples=SERVER_EXAMPLES, deadline=None, derandomize=not RANDOM,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(wire(), st.booleans())
def test_server_answers_fuzz_with_valid_http(server, raw: bytes, via_proxy: bool) -> None:
    ports, p = server
    for status in _exchange(ports[1] if via_proxy else ports[0], raw):
        SEEN[status] = SEEN.get(status, 0) + 1


SEEN: dict[int, int] = {}  # status -> count over the fuzz run, printed by the last test


def test_server_survived_the_fuzz(server) -> None:
    """Runs after the fuzz (pytest keeps file order): same workers, still serving."""
    ports, p = server
    workers = WORKERS.setdefault("first", sorted(p.workers()))
    print(f"\nfuzz: statuses seen {dict(sorted(SEEN.items()))}; workers unchanged")
    assert len(workers) == 4
    assert sorted(p.workers()) == workers
    assert get(ports[0])[0] == 200 and get(ports[1])[0] == 200
    unexpected, known = _log_problems(p.output())
    print(f"fuzz: {known} known unretrieved _send_body_task exceptions in the log "
          f"(reported: proxy/engine.py)")
    assert not unexpected, unexpected[:3]


# Log records that are expected and harmless. (ProxyEngine._send_body_task's exception once
# went unretrieved when a request body turned out malformed mid-stream; fixed, so the list is
# empty and such a record now fails the test.)
KNOWN: tuple[str, ...] = ()


def _log_problems(text: str) -> tuple[list[str], int]:
    """The log records with a traceback or ERROR that are not KNOWN, and how many were."""
    records = re.split(r"\n(?=\d{4}-\d\d-\d\d |Task exception)", text)
    unexpected, known = [], 0
    for r in records:
        if "Traceback" in r or " ERROR " in r or "CRITICAL" in r:
            if any(k in r.split("Traceback")[0] for k in KNOWN):
                known += 1
            else:
                unexpected.append(r[:2000])
    return unexpected, known


WORKERS: dict[str, list[int]] = {}


@pytest.fixture(autouse=True, scope="module")
def _record_workers(server) -> Iterator[None]:
    """Remember the worker pids before any fuzz runs (compared by the last test)."""
    WORKERS["first"] = sorted(server[1].workers())
    yield
