"""A real pyngora's TLS listener and the clients that do not speak modern TLS to it, with the
real tools: ``curl http://`` to the TLS port gets nginx's plain-text 400 (it was "Empty
reply from server"), counted in ``pyngora_requests_total``; ``openssl s_client -tls1_1`` and
a raw TLS 1.1 ClientHello get the ``protocol_version`` alert (the connection used to end
without it); ``curl -k https://`` is served over HTTP/1.1 and HTTP/2 as before."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.process.test_metrics_e2e import scrape
from tests.process.test_tls_log_metrics_process_attacks import _serves, _tls_get, _tls_site
from tests.protocol.test_tls_port_hygiene import _client_hello
from tests.support import free_port, self_signed_cert, wait_for

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("curl") is None,
                                reason="openssl and curl are needed")


def _curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "20", *args], capture_output=True,
                          text=True, timeout=30)


def _code_400(metrics: int) -> float:
    return sum(v for k, v in scrape(metrics).items()
               if k.startswith("pyngora_requests_total{") and 'service="site"' in k
               and 'code="400"' in k)


def test_plain_http_and_old_tls_to_a_real_tls_listener(tmp_path: Path, pyngora_factory) -> None:
    cert, key = self_signed_cert(tmp_path, "tls.test")
    port, metrics = free_port(), free_port()
    conf = _tls_site(tmp_path, port, cert, key, 'body: "hi"') + (
        "  - name: metrics\n    type: prometheus\n"
        f"    listeners: ['127.0.0.1:{metrics}']\n")
    p = pyngora_factory(conf).start()
    p.wait_serving(port)
    p.wait_serving(metrics)
    wait_for(lambda: _serves(lambda: _tls_get(port, b"hi")), 20, "the worker serving TLS")

    start = time.monotonic()
    r = _curl("-i", f"http://127.0.0.1:{port}/")
    assert r.returncode == 0, r.stderr  # (it was 52: "Empty reply from server")
    assert r.stdout.startswith("HTTP/1.1 400 Bad Request"), r.stdout
    assert r.stdout.endswith("\n\nThe plain HTTP request was sent to HTTPS port\n"), r.stdout
    assert "Connection: close" in r.stdout
    assert time.monotonic() - start < 5  # curl closes on Connection: close, at once
    wait_for(lambda: _code_400(metrics) == 1, 10, "the 400 counted")

    for flag in ("--http1.1", "--http2"):
        r = _curl("-k", flag, "-o", "/dev/null", "-w", "%{http_code} %{http_version}",
                  f"https://127.0.0.1:{port}/")
        assert r.returncode == 0 and r.stdout == ("200 1.1" if flag == "--http1.1" else "200 2"), \
            (flag, r.stdout, r.stderr)

    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(_client_hello(0x0302))
        alert = s.recv(64)
    assert alert[:1] == b"\x15" and alert[3:7] == b"\x00\x02\x02\x46", alert  # protocol_version

    r = subprocess.run(["openssl", "s_client", "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0",
                        "-connect", f"127.0.0.1:{port}"], capture_output=True, text=True,
                       input="", timeout=30)
    if "no protocols available" not in r.stderr and "unknown option" not in r.stderr:
        assert "alert protocol version" in r.stderr and "alert number 70" in r.stderr, r.stderr
    assert _code_400(metrics) == 1 and p.proc.poll() is None, p.output()
