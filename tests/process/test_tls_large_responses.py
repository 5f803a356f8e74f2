"""Large whole responses through the proxy to a TLS client, with real processes and curl.

The express lane and the fast path hand a large body on as a view of the upstream's read,
written behind its head in one ``writelines`` (``Exchange.write_whole``). A TLS transport
writes such a list its own way (it encrypts, then writes), so the bytes a TLS client gets are
checked here, byte for byte, on one kept-alive connection (the lane takes a request from its
third sighting), and over plain HTTP for comparison.

The origin writes each response in one write, so the proxy reads it whole and takes that path
(this test failed when ``write_whole`` dropped a view's first byte); which path a response
took is counted in-process, in tests/protocol/test_proxy_express.py.
"""
from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from tests.support import free_port, self_signed_cert

pytestmark = pytest.mark.skipif(shutil.which("curl") is None or shutil.which("openssl") is None,
                                reason="curl and openssl are needed")

# Around the view threshold (h1_splice.VIEW_ABOVE, 4 KiB) and write-at-once (16 KiB), and 64 KiB.
SIZES = (4096, 4097, 16 * 1024 + 1, 64 * 1024)
BODIES = {f"/b{n}": os.urandom(n) for n in SIZES}


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = BODIES[self.path]
        # One write for head and body, as nginx's sendfile does: the proxy reads it whole.
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: keep-alive\r\n"
                         b"\r\n%s" % (len(body), body))
        self.wfile.flush()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def origin():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def _config(tmp: Path, tls_port: int, plain_port: int, origin: int, cert: str, key: str) -> str:
    return f"""
pid_file: {tmp}/p.pid
upgrade_sock: {tmp}/u.sock
error_log: {tmp}/error.log
services:
  - name: proxy
    type: http_proxy
    threads: 1
    listeners:
      - {{address: "127.0.0.1:{tls_port}", tls: {{cert: {cert}, key: {key}}}}}
      - "127.0.0.1:{plain_port}"
    upstreams:
      - name: origin
        backends: [{{addr: "127.0.0.1:{origin}"}}]
"""


def test_large_whole_responses_reach_tls_and_plain_clients_intact(
        tmp_path: Path, pyngora_factory, origin: int) -> None:
    cert, key = self_signed_cert(tmp_path, "large.test")
    tls_port, plain_port = free_port(), free_port()
    p = pyngora_factory(_config(tmp_path, tls_port, plain_port, origin, cert, key)).start()
    p.wait_serving(tls_port)
    p.wait_serving(plain_port)
    for base in (f"https://127.0.0.1:{tls_port}", f"http://127.0.0.1:{plain_port}"):
        for path, body in BODIES.items():
            out = tmp_path / "out"
            # Five times on one connection: learnt on the 2nd, taken by the lane from the 3rd.
            args = ["curl", "-sS", "-k", "--http1.1", "--max-time", "20"]
            for i in range(5):
                args += ["-o", f"{out}{i}", base + path]
            r = subprocess.run(args + ["-w", "%{num_connects} "], capture_output=True,
                               text=True, timeout=60, stdin=subprocess.DEVNULL)
            assert r.returncode == 0, r.stderr + p.output()
            assert r.stdout.split() == ["1", "0", "0", "0", "0"], r.stdout  # one connection
            for i in range(5):
                got = Path(f"{out}{i}").read_bytes()
                assert hashlib.sha256(got).digest() == hashlib.sha256(body).digest(), \
                    (base, path, i, len(got))
