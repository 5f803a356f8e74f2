#!/usr/bin/python3
"""Slow origin for the systemd e2e test (stdlib only; runs inside the container).

``GET /slow`` answers after ``--delay`` seconds (``/slow?delay=S``: S), so a request proxied through
pyngora is still in flight while the test reloads or stops the service.
``GET /inflight`` answers the number of /slow requests now being served: the
test awaits ``>= 1`` instead of sleeping. Usage: origin.py HOST:PORT [--delay S]
"""

from __future__ import annotations

import argparse
import http.server
import threading
import time

_lock = threading.Lock()
_inflight = 0


class Handler(http.server.BaseHTTPRequestHandler):
    """One request per connection; bodies carry no secrets, only facts."""

    protocol_version = "HTTP/1.1"
    delay = 2.0

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        global _inflight
        if self.path.startswith("/inflight"):
            with _lock:
                n = _inflight
            self._answer(f"{n}\n".encode())
            return
        if self.path.startswith("/slow"):
            with _lock:
                _inflight += 1
            try:
                # /slow?delay=S overrides --delay for one request
                _, _, query = self.path.partition("?delay=")
                time.sleep(float(query) if query else self.delay)
                self._answer(b"slow response complete\n")
            finally:
                with _lock:
                    _inflight -= 1
            return
        self._answer(b"origin\n")

    def log_message(self, fmt: str, *args: object) -> None:
        pass


def main() -> None:
    """Serve until SIGTERM (systemd-run stops the transient unit)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("address")
    ap.add_argument("--delay", type=float, default=2.0)
    a = ap.parse_args()
    host, _, port = a.address.rpartition(":")
    Handler.delay = a.delay
    srv = http.server.ThreadingHTTPServer((host, int(port)), Handler)
    srv.daemon_threads = True
    srv.serve_forever()


if __name__ == "__main__":
    main()
