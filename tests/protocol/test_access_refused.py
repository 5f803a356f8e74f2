"""Requests refused before any phase ran get their access line (as nginx logs its 400s, 408s,
413s and 414/431s): malformed HTTP/1 heads, the header timeout's 408, HTTP/2 streams refused
for their headers. Connections that send nothing, and streams reset without an answer, get
none. Real proxy services on loopback sockets, the access log a real file."""
from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import h2.config
import h2.connection
import h2.events
import pytest

from pyngora import log
from pyngora.config.schema import LimitsConf, ServerConf
from pyngora.proxy import ProxyHttp, Session, http_proxy_service
from pyngora.upstreams.peer import HttpPeer

from tests.protocol.test_http_app import static
from tests.protocol.test_http_app_helpers import Client, run, serving


class ToOrigin(ProxyHttp):
    def __init__(self, port: int) -> None:
        self.port = port

    async def upstream_peer(self, session: Session, ctx: Any) -> HttpPeer:
        return HttpPeer(f"127.0.0.1:{self.port}")


@pytest.fixture
def access_log(tmp_path: Path) -> Iterator[Path]:
    """The access log on, to a file, as a worker has it; put back as it was after."""
    saved = (list(log.ERROR.handlers), log.ERROR.level, log.ERROR.propagate,
             list(log.ACCESS.handlers), log._access_on, log._error_path, log._access_path)
    path = tmp_path / "access.log"
    log.setup(str(tmp_path / "error.log"), "info", str(path))
    try:
        yield path
    finally:
        for h in log.ERROR.handlers + log.ACCESS.handlers:
            h.close()
        log.ERROR.handlers[:] = saved[0]
        log.ERROR.setLevel(saved[1])
        log.ERROR.propagate = saved[2]
        log.ACCESS.handlers[:] = saved[3]
        log._access_on, log._error_path, log._access_path = saved[4:]


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def wait_lines(path: Path, n: int, timeout: float = 5.0) -> list[str]:
    """The access log once it has ``n`` lines (fails after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while len(lines_of(path)) < n:
        assert time.monotonic() < deadline, f"wanted {n} access lines: {lines_of(path)}"
        await asyncio.sleep(0.01)
    return lines_of(path)


async def refused(port: int, raw: bytes) -> int:
    """Send ``raw`` on a fresh connection; the status of the answer (the server closes)."""
    c = await Client.connect(port)
    try:
        await c.send(raw)
        status, _, _ = await c.read_head()
        assert await c.at_eof()
        return status
    finally:
        c.close()


BIG = b"a" * 70000
CASES = [  # (what the client sends, the status, the request field of the combined line)
    (b"GET /x HTTP/1.1\r\n\r\n", 400, '"GET /x HTTP/1.1"'),  # no Host
    (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", 400,  # TLS to a plain port: raw, escaped
     r'"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03"'),
    (b"GET /big HTTP/1.1\r\nHost: t\r\nX-Big: " + BIG + b"\r\n\r\n", 431,
     '"GET /big HTTP/1.1"'),
    (b"GET /" + BIG + b" HTTP/1.1\r\nHost: t\r\n\r\n", 431, None),  # the line itself too long
    (b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n", 413,
     '"POST /up HTTP/1.1"'),
    (b"POST /te HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n", 400,
     '"POST /te HTTP/1.1"'),
    (b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n", 501,
     '"CONNECT a.test:443 HTTP/1.1"'),
    (b"GET /q\"\\ HTTP/3.0\r\nHost: t\r\n\r\n", 505, r'"GET /q\"\\ HTTP/3.0"'),
]


@pytest.mark.parametrize("raw,status,field", CASES,
                         ids=["no-host", "garbage", "431-head", "431-line", "413",
                              "te-gzip", "connect", "505"])
def test_a_refused_head_gets_one_combined_line(access_log: Path, raw: bytes, status: int,
                                                field: Optional[str]) -> None:
    async def main() -> list[str]:
        svc = http_proxy_service(None, ToOrigin(1), limits=LimitsConf(max_body_bytes=10))
        async with serving(svc) as (port, _):
            assert await refused(port, raw) == status
            return await wait_lines(access_log, 1)

    line, = run(main())
    assert line.startswith("127.0.0.1 - - ["), line
    assert f' {status} 0 "-" "-" ' in line and line.endswith(' "-"'), line
    assert line.isascii() and line.isprintable(), line
    if field is not None:
        assert f'] {field} {status} ' in line, line
    else:  # cut at 4 KiB of the line, never the whole 70 KB
        assert '] "GET /aaaa' in line and len(line) < 4096 + 200, len(line)


def test_json_lines_and_a_normal_request_beside_them(access_log: Path) -> None:
    async def main() -> list[str]:
        async with serving(static("hello")) as (oport, _):
            svc = http_proxy_service(None, ToOrigin(oport), name="edge")
            async with serving(svc, ServerConf(access_log_format="json")) as (port, _):
                assert await refused(port, b"GET /nohost HTTP/1.1\r\n\r\n") == 400
                await wait_lines(access_log, 1)
                assert await refused(port, b"\x00\xffjunk\r\n\r\n") == 400
                await wait_lines(access_log, 2)
                c = await Client.connect(port)
                assert (await c.request("GET", "/ok")).status == 200
                c.close()
                return await wait_lines(access_log, 3)

    nohost, junk, ok = (json.loads(x) for x in run(main()))
    assert (nohost["method"], nohost["uri"], nohost["protocol"]) == ("GET", "/nohost", "HTTP/1.1")
    assert (nohost["status"], nohost["body_bytes_sent"], nohost["upstream"]) == (400, 0, None)
    assert nohost["service"] == "edge" and "Host" in nohost["error"]
    assert nohost["remote_addr"] == "127.0.0.1" and nohost["user_agent"] is None
    assert (junk["method"], junk["uri"], junk["status"]) == (None, "\x00\xffjunk", 400)
    assert (ok["uri"], ok["status"]) == ("/ok", 200)
    assert set(nohost) == set(ok)  # the same keys as any request's line


def test_the_header_timeout_logs_408_with_the_head_so_far(access_log: Path) -> None:
    async def main() -> list[str]:
        svc = http_proxy_service(None, ToOrigin(1),
                                 limits=LimitsConf(header_read_timeout_seconds=0.3))
        async with serving(svc) as (port, _):
            for part in (b"GET /slow HTTP/1.1\r\nHost: t\r\nX-A: 1\r\n", b"GET /sl"):
                c = await Client.connect(port)
                await c.send(part)
                status, _, _ = await c.read_head()
                assert status == 408
                c.close()
            return await wait_lines(access_log, 2)

    # (the version shows once the parser passed a header field: llhttp keeps the last
    # request's until then)
    whole, partial = run(main())
    assert '"GET /slow HTTP/1.1" 408 0 "-" "-" 0.300 "-"' in whole, whole
    assert '"GET /sl" 408 0 ' in partial, partial


def test_connections_without_a_request_get_no_line(access_log: Path) -> None:
    """nginx logs nothing for a connection that sends no byte (browsers' spare ones), whether
    the client closes it or the server times it out; the request after them is logged."""
    async def main() -> list[str]:
        async with serving(static("hello")) as (oport, _):
            svc = http_proxy_service(None, ToOrigin(oport),
                                     limits=LimitsConf(header_read_timeout_seconds=0.2))
            async with serving(svc) as (port, ctx):
                idle = await Client.connect(port)
                quick = await Client.connect(port)
                quick.close()
                assert await idle.at_eof()  # closed silently by the header timeout
                idle.close()
                while len(ctx.connections):  # both gone: a line for either is written now
                    await asyncio.sleep(0.01)
                c = await Client.connect(port)
                assert (await c.request("GET", "/after")).status == 200
                c.close()
                return await wait_lines(access_log, 1)

    line, = run(main())
    assert '"GET /after HTTP/1.1" 200 5 ' in line


def test_a_bad_request_pipelined_behind_a_good_one(access_log: Path) -> None:
    async def main() -> list[str]:
        async with serving(static("hello")) as (oport, _):
            async with serving(http_proxy_service(None, ToOrigin(oport))) as (port, _):
                c = await Client.connect(port)
                await c.send(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\nGET /b HTTP/1.1\r\n\r\n")
                assert (await c.read_response()).status == 200
                assert (await c.read_head())[0] == 400
                c.close()
                return await wait_lines(access_log, 2)

    # (the refusal goes out, and is logged, as the good response ends; the engine writes
    # that one's line a moment later, when its request task resumes)
    bad, good = sorted(run(main()), key=lambda line: " 200 " in line)
    assert '"GET /a HTTP/1.1" 200 5 ' in good
    # as the parser saw it; its time is since its head began (a loaded machine: a few ms)
    assert re.search(r'"GET /b HTTP/1\.1" 400 0 "-" "-" 0\.0\d\d "-"$', bad), bad


async def _h2_streams(port: int, heads: list[list[tuple[bytes, bytes]]]) -> list[Any]:
    """Each header list as a stream (sent unvalidated, one after the other); for each, its
    :status, or "reset" when the stream was reset without an answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False))
    conn.initiate_connection()
    writer.write(conn.data_to_send())
    out: list[Any] = []
    try:
        for i, fields in enumerate(heads):
            sid = 1 + 2 * i
            conn.send_headers(sid, fields, end_stream=True)
            writer.write(conn.data_to_send())
            status: Any = None
            while status is None or status == "head":
                data = await asyncio.wait_for(reader.read(65536), 10)
                assert data, "the connection closed"
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                        status = int(dict(ev.headers)[b":status"])
                    elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                        status = status if isinstance(status, int) else "reset"
                writer.write(conn.data_to_send())
            out.append(status)
    finally:
        writer.close()
    return out


def test_h2_streams_refused_with_a_status_get_a_line_resets_none(access_log: Path) -> None:
    base = [(b":scheme", b"http"), (b":authority", b"t")]

    async def main() -> tuple[list[Any], list[str]]:
        async with serving(static("hello")) as (oport, _):
            async with serving(http_proxy_service(None, ToOrigin(oport)), h2c=True) as (port, _):
                got = await _h2_streams(port, [
                    [(b":method", b"get"), (b":path", b"/lower")] + base,   # 400
                    [(b":method", b"GET"), (b":path", b"/p"), (b":bogus", b"x")] + base,  # RST
                    [(b":method", b"GET"), (b":path", b"/ok")] + base,      # 200
                ])
                # (one connection's streams are handled in order: a line for the reset
                # one would be written before the 200's)
                return got, await wait_lines(access_log, 2)

    got, lines = run(main())
    assert got == [400, "reset", 200]
    assert len(lines) == 2, lines
    assert '"-" 400 0 "-" "-" 0.000 "-"' in lines[0], lines
    assert '"GET /ok HTTP/2" 200 5 ' in lines[1], lines
