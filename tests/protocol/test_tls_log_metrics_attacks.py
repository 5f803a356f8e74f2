"""Attacks on downstream TLS, the logs and the metrics (2026-11-29), each written as the
behaviour wanted, each failing before its fix. Found against a running ``python -m pyngora``
with openssl s_client, curl, raw and TLS sockets, h2 clients and promtool:

1. A certificate file replaced by a bad one, then a worker restart (kill -9, a crash) without
   a reload: the restarted worker read the file again, failed to boot ("[SSL] PEM lib",
   naming no file) five times, and the master gave up on the whole server. Workers now load
   the bytes the master kept once they passed their checks (``pem_store``), and a load
   that fails names the files.
2. Combined access log: bytes >= 0x80 in a field (HTTP/2 lets them through in values) were
   written as the Latin-1 characters they are not (``\\xff`` -> ``ÿ``) while 0x80-0x9f were
   escaped; now every byte outside printable ASCII is ``\\xHH`` (nginx's way), and the line is
   ASCII.
3. Error log: raw ESC, CR, C1 controls and Unicode line separators/bidi overrides reached
   it, and a line was as long as the client's URI and Host (over HTTP/2 an indexed header
   costs one byte a request); now escaped, and lines cut at ``log.MAX_ERROR_LINE``.
4. Metrics: one unreadable file in metrics_dir (empty, torn, a non-JSON key, a foreign gauge
   mode) failed every scrape (500/503) for as long as it lay there, or added samples with a
   pid label to counters; a dead process's corrupt file made the master's archiving raise
   (its files stayed for ever); a corrupt ``used`` field made the reader allocate 2 GiB.
5. Metrics: status codes from an origin (httpbin's /status/N echoes the client) made up to
   900 series per service and per backend; now registered codes, classes and ``000``.
6. Metrics: every scrape rendered anew: 500 concurrent scrapes took 3 s, and 50 clients
   pipelining scrapes without reading kept a real scrape waiting 8 s; scrapes within
   ``RENDER_REUSE_SECONDS`` now share one render (both encodings from the same one).

Tried and found sound (no test here beyond what other files have): a client that sends
nothing or trickles its ClientHello a byte a second (closed after uvloop's 60 s handshake
timeout, 2,000 of them at once while normal clients were served in under 10 ms), garbage
or plaintext HTTP to the TLS port (now nginx's plain 400; TLS 1.0/1.1 the protocol_version
alert: test_tls_port_hygiene.py),
renegotiation (refused), odd SNI (uppercase, trailing dot, long, non-ASCII, unknown: the
default certificate or the right one), ALPN with only unknown protocols (HTTP/1.1), a
half-close after the handshake (answered, then closed), session resumption (TLS 1.2
cache), CR/LF/NUL/ESC in targets and fields over HTTP/1 (400) and HTTP/2 (RST or 400), JSON
lines (valid, one line), 500 concurrent scrapes and a killed exporter (respawned), counters
over reloads and kill -9 with one scraper (never backwards).
"""
from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import shutil
import ssl
import struct
import subprocess
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Optional

import h2.config
import h2.connection
import h2.events
import pytest

from pyngora import log
from pyngora.metrics import exporter, multiproc, registry
from pyngora.metrics.service import RENDER_REUSE_SECONDS, PrometheusApp, PrometheusService
from pyngora.config import pem_store
from pyngora.protocols import tls
from pyngora.proxy import http_proxy_service
from tests.protocol.test_http_app import static
from tests.protocol.test_http_app_helpers import Client, run, serving
from tests.unit.test_metrics_service import mdir  # noqa: F401  (a fixture: 42 requests flushed)
from tests.unit.test_proxy_access import Capture  # (a proxy that keeps its access lines)
from tests.support import self_signed_cert

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


# --------------------------------------------------------------------------- 1. TLS
def _served_cert(ctx: ssl.SSLContext, server_name: str = "a.test") -> bytes:
    """The DER certificate ``ctx`` shows a client, through a real handshake in memory."""
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    cobj = client.wrap_bio(c_in, c_out, server_hostname=server_name)
    sobj = ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for obj in (cobj, sobj):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if cobj.version() and sobj.version():
            break
    cert = cobj.getpeercert(binary_form=True)
    assert cert, "the handshake did not complete"
    return cert


@pytest.fixture
def kept(monkeypatch: pytest.MonkeyPatch) -> dict:
    """pem_store's kept bytes, empty for the test and restored after it."""
    fresh: dict = {}
    monkeypatch.setattr(pem_store, "_checked", fresh)
    monkeypatch.setattr(pem_store, "_staged", None)
    return fresh


@needs_openssl
def test_a_restarted_worker_serves_the_checked_certificate_when_the_file_broke(
        tmp_path: Path, kept: dict) -> None:
    cert, key = self_signed_cert(tmp_path, "a.test")
    sni_cert, sni_key = self_signed_cert(tmp_path, "b.test")
    conf = SimpleNamespace(cert=cert, key=key, alpn=("h2", "http/1.1"),
                           sni=(SimpleNamespace(server_name="b.test", cert=sni_cert,
                                                key=sni_key),))
    assert tls.tls_problems(conf) == []
    pem_store.remember([conf, None])  # the master, once the configuration passed (None: plain)
    good = ssl.PEM_cert_to_DER_cert(Path(cert).read_text())
    good_sni = ssl.PEM_cert_to_DER_cert(Path(sni_cert).read_text())
    # An operator's wrong cp, a half-written renewal: no reload, then a worker restarts.
    Path(cert).write_text("garbage\n")
    Path(sni_key).write_bytes(b"")
    ctx = tls.server_context(conf)
    assert _served_cert(ctx, "a.test") == good
    assert _served_cert(ctx, "b.test") == good_sni
    # A reload's check still sees the broken file, and says which.
    problems = tls.check_tls(conf)
    assert any(cert in p for p in problems), problems


@needs_openssl
def test_the_bytes_checked_are_the_bytes_kept_and_only_the_last_good_ones(
        tmp_path: Path, kept: dict) -> None:
    """(A review's finding.) The master re-read the files after the check child had passed
    them, so a file replaced in between was kept unchecked; a pair a reload dropped stayed
    in memory (its key too) for good; a read error left older bytes. Now ``stage`` reads
    the bytes once, the check judges those, ``commit`` keeps exactly them -- or, when the
    check failed, the last good set."""
    cert, key = self_signed_cert(tmp_path, "a.test")
    good = ssl.PEM_cert_to_DER_cert(Path(cert).read_text())
    conf = SimpleNamespace(cert=cert, key=key, alpn=(), sni=())
    pem_store.stage([conf])
    Path(cert).write_text("garbage\n")  # replaced between the read and the check
    assert tls.tls_problems(conf) == []  # the staged bytes are what is judged ...
    pem_store.commit(True)
    assert _served_cert(tls.server_context(conf), "a.test") == good  # ... and kept
    other_cert, other_key = self_signed_cert(tmp_path, "b.test")
    other = SimpleNamespace(cert=other_cert, key=other_key, alpn=(), sni=())
    pem_store.stage([other])
    pem_store.commit(False)  # a reload whose check failed: the last good set stays
    assert list(pem_store._checked) == [(cert, key)]
    pem_store.remember([other])  # a reload that passed and no longer names the first pair
    assert list(pem_store._checked) == [(other_cert, other_key)]


@needs_openssl
def test_a_certificate_that_does_not_load_is_named(tmp_path: Path, kept: dict) -> None:
    cert, key = self_signed_cert(tmp_path, "a.test")
    Path(cert).write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(ssl.SSLError) as info:
        tls.server_context(SimpleNamespace(cert=cert, key=key, alpn=(), sni=()))
    assert cert in str(info.value) and key in str(info.value)  # was "[SSL] PEM lib (_ssl.c)"


def test_the_master_keeps_pem_bytes_without_loading_ssl() -> None:
    """The master stages and commits the bytes: that must load neither ssl (5.6 MiB of RSS)
    nor the protocols room (tests/process/test_footprint.py checks the whole master)."""
    code = ("import sys; import pyngora.config.pem_store as p; p.remember([]); "
            "print('ssl' in sys.modules or 'pyngora.protocols' in sys.modules)")
    out = subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


# --------------------------------------------------------------------------- 2. access log
async def _h2_get(port: int, headers: list[tuple[bytes, bytes]]) -> int:
    """One HTTP/2 (prior knowledge) GET with ``headers`` sent unvalidated; its :status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False))
    conn.initiate_connection()
    conn.send_headers(1, [(b":method", b"GET"), (b":scheme", b"http"),
                          (b":authority", b"t"), (b":path", b"/h2")] + headers,
                      end_stream=True)
    writer.write(conn.data_to_send())
    status = 0
    try:
        while True:
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data, "the connection closed before the response ended"
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = int(dict(ev.headers)[b":status"])
                if isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                    return status
            writer.write(conn.data_to_send())
    finally:
        writer.close()


def test_access_lines_stay_one_ascii_line_whatever_the_bytes() -> None:
    hostile_ua = b"\xff\xfe caf\xc3\xa9"  # obs-text (HTTP/2 lets it through), Latin-1 printable

    async def main() -> list[tuple[str, str]]:
        async with serving(static("hello")) as (oport, _):
            cap = Capture(oport)
            async with serving(http_proxy_service(None, cap), h2c=True) as (pport, _):
                assert await _h2_get(pport, [(b"user-agent", hostile_ua),
                                             (b"referer", b'r"\\q')]) == 200
                c = await Client.connect(pport)
                await c.request("GET", '/p"\\', headers=(("User-Agent", "\t"),))
                return cap.lines

    (combined, js), (combined1, js1) = run(main())
    assert combined.isascii() and combined.isprintable(), combined
    assert r'"\xff\xfe caf\xc3\xa9"' in combined  # was "ÿþ cafÃ©"
    assert r'"r\"\\q"' in combined
    assert combined1.isascii() and combined1.isprintable(), combined1
    assert r'"GET /p\"\\ HTTP/1.1"' in combined1
    for line in (js, js1):
        assert "\n" not in line and line.isascii()
    assert json.loads(js)["user_agent"] == hostile_ua.decode("latin-1")


# --------------------------------------------------------------------------- 3. error log
@pytest.fixture
def error_log(tmp_path: Path) -> Iterator[Path]:
    """The error log set up to a file, as a worker has it; put back as it was after."""
    saved = (list(log.ERROR.handlers), log.ERROR.level, log.ERROR.propagate,
             list(log.ACCESS.handlers), log._access_on)
    path = tmp_path / "error.log"
    log.setup(str(path), "info", "off")
    try:
        yield path
    finally:
        for h in log.ERROR.handlers:
            h.close()
        log.ERROR.handlers[:] = saved[0]
        log.ERROR.setLevel(saved[1])
        log.ERROR.propagate = saved[2]
        log.ACCESS.handlers[:] = saved[3]
        log._access_on = saved[4]


def test_error_log_escapes_controls_and_cuts_long_lines(error_log: Path) -> None:
    host = "h\x1b[2J\x1b]0;owned\x07\rFAKE\x9b31m\u2028x\u202egnp.exe\x00" + "A" * 100_000
    log.ERROR.warning("Fail to proxy: %s, status: %s, tries: %d, %s", "upstream down", 502, 1,
                      f"GET /, Host: {host}")
    log.ERROR.error("reload refused:\nfile:1: a\nfile:2: b")  # lines of its own stay lines
    try:
        raise ValueError("boom")
    except ValueError:
        log.ERROR.exception("handler failed")
    raw = error_log.read_bytes()
    text = raw.decode("utf-8")
    for bad in ("\x1b", "\r", "\x07", "\x00", "\x9b", "\u2028", "\u202e"):
        assert bad not in text, repr(bad)
    assert r"h\x1b[2J\x1b]0;owned\x07\x0dFAKE\x9b31m\u2028x\u202egnp.exe\x00AAA" in text
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= log.MAX_ERROR_LINE + 60
    assert "characters cut" in lines[0]
    assert "file:1: a" in lines and "file:2: b" in lines
    assert any(line.startswith("ValueError: boom") for line in lines)
    assert len(raw) < 20_000  # 100 KB of Host made 100 KB of log


# --------------------------------------------------------------------------- 4-6. metrics
def _junk(d: str) -> dict[str, bytes]:
    """Files that prometheus-client's reader chokes on, under names it would read."""
    bad_key = b"abcd"
    entry = struct.pack("<i", len(bad_key)) + bad_key + b"    " + struct.pack("<dd", 1.0, 0.0)
    files = {
        "counter_999990.db": b"",  # a prometheus-client file being created
        "counter_999991.db": struct.pack("<i", 8 + len(entry)) + b"\0" * 4 + entry,  # not JSON
        "counter_999992.db": struct.pack("<i", 0x7FFFFFFF) + b"\0" * 4,  # used past the end
        "histogram_999993.db": struct.pack("<i", 64) + b"\0" * 4 + b"\x10" * 20,  # torn
    }
    for name, data in files.items():
        Path(d, name).write_bytes(data)
    good = Path(d, f"counter_{os.getpid()}-pyngora.db").read_bytes()
    Path(d, "gauge_weird_999994.db").write_bytes(good)  # a mode prometheus-client lacks
    os.mkdir(os.path.join(d, "counter_999995.db"))
    return files


def test_junk_in_metrics_dir_leaves_the_scrape_whole(mdir: str, tmp_path: Path,
                                                     error_log: Path) -> None:
    _junk(mdir)
    body, _ = exporter.render(mdir)  # raised (500) or 503'd before
    text = body.decode()
    assert 'pyngora_requests_total{code="200",service="web"} 42.0' in text
    assert 'pid="999994"' not in text
    exporter.render(mdir)  # a second scrape names nothing again
    said = error_log.read_text()
    for name in ("counter_999991.db", "counter_999992.db", "histogram_999993.db",
                 "gauge_weird_999994.db", "counter_999995.db"):
        assert sum(name in line for line in said.splitlines()) == 1, (name, said)
    assert "counter_999990.db" not in said  # empty: nothing to say
    if shutil.which("promtool"):
        out = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True,
                             timeout=30)
        assert out.returncode == 0, out.stdout + out.stderr


def test_a_dead_process_with_a_corrupt_file_is_still_archived(mdir: str) -> None:
    dead = 999_980
    files = multiproc.ProcessFiles(mdir, pid=dead)
    key = registry._current().key(multiproc.METRICS["pyngora_requests_total"], ("web", "200"))
    files.add("counter", key, 8)
    files.write()
    histogram = Path(multiproc.own_path(mdir, "histogram", dead))
    histogram.write_bytes(struct.pack("<i", 64) + b"\0" * 4 + b"\x10" * 20)
    assert multiproc.mark_process_dead(dead, mdir) is True  # raised ValueError before
    left = [n for n in os.listdir(mdir) if str(dead) in n]
    assert left == [], left  # the good file folded, the corrupt one gone
    body, _ = exporter.render(mdir)
    assert b'pyngora_requests_total{code="200",service="web"} 50.0' in body


def test_a_corrupt_used_field_allocates_nothing_big(tmp_path: Path) -> None:
    path = tmp_path / "counter_1.db"
    path.write_bytes(struct.pack("<i", 0x7FFFFFF0) + b"\0" * 4 + b"\0" * 64)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError):
            multiproc.read_file(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak  # read 2 GiB's worth before


def test_status_codes_from_an_origin_make_a_bounded_set_of_series(mdir: str) -> None:
    assert [registry.code_label(c) for c in (200, 404, 499, 502, 299, 599, 600, 999, 99)] == \
        ["200", "404", "499", "502", "2xx", "5xx", "000", "000", "000"]
    svc = registry.service_metrics("web")
    up = registry.upstream_metrics("origin")
    for code in range(100, 1000):  # httpbin's /status/N, asked for every N
        svc.request_done(code, 0.001, 1, 1)
        up.request_done("127.0.0.1:1", code)
    registry.flush()
    body, _ = exporter.render(mdir)
    codes = {line.split('code="')[1].split('"')[0] for line in body.decode().splitlines()
             if line.startswith("pyngora_requests_total{")}
    assert len(codes) <= 69 and {"200", "2xx", "000"} <= codes, sorted(codes)
    upstream_series = [line for line in body.decode().splitlines()
                       if line.startswith("pyngora_upstream_requests_total{")]
    assert len(upstream_series) <= 69


def test_a_flood_of_scrapes_shares_renders_and_never_goes_back(mdir: str) -> None:
    calls: list[int] = []
    counter = iter(range(1, 1_000_000))

    def render(directory: str, accept: Optional[str], **_: Any) -> tuple[bytes, dict]:
        calls.append(1)
        body = f"x_total {next(counter)}\n".encode()
        if exporter.gzip_accepted(accept):  # (the app asks for plain and gzips it now)
            return gzip.compress(body), {"Content-Type": "text/plain", "Content-Encoding": "gzip"}
        return body, {"Content-Type": "text/plain"}

    svc = PrometheusService("metrics")
    svc.new_app = lambda ctx: PrometheusApp(mdir, render=render)  # type: ignore[method-assign]

    async def scrape(port: int, gz: bool) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        extra = b"Accept-Encoding: gzip\r\n" if gz else b""
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + extra + b"Connection: close\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(-1), 10)
        writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        if gz:
            assert b"content-encoding: gzip" in head.lower()
            body = gzip.decompress(body)
        return int(body.split()[1])

    took: list[float] = []

    async def main() -> list[int]:
        async with serving(svc) as (port, _):
            start = time.monotonic()
            flood = await asyncio.gather(*(scrape(port, i % 2 == 0) for i in range(300)))
            seen = [await scrape(port, i % 2 == 0) for i in range(20)]  # one after another
            took.append(time.monotonic() - start)
            return list(flood) + seen

    values = run(main())
    # Rendered at most once per RENDER_REUSE_SECONDS (and once more at each end), however
    # long a loaded machine takes over the 320 scrapes; not once per scrape (320 before).
    assert len(calls) <= took[0] / RENDER_REUSE_SECONDS + 2 and len(calls) < 320, \
        (len(calls), took)
    tail = values[300:]
    assert tail == sorted(tail), tail  # gzip and plain alternate: never an older body
