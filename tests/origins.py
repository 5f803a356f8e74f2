"""Real origin servers for process tests: threaded HTTP/1.1 servers on loopback that say who
they are and count what reached them (connections, requests)."""
from __future__ import annotations

import http.server
import threading
from typing import Optional


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.server.count("connections")  # type: ignore[attr-defined]
        self.server.track(self.request)  # type: ignore[attr-defined]

    def do_GET(self) -> None:
        srv = self.server
        srv.count("requests")  # type: ignore[attr-defined]
        body = srv.name.encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Origin", srv.name)  # type: ignore[attr-defined]
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args: object) -> None:
        pass


class Origin:
    """``Origin("a").start()``; ``stop()`` closes its listener (connections are refused)."""

    def __init__(self, name: str, port: int = 0) -> None:
        self.name = name
        self.port = port
        self.counts = {"connections": 0, "requests": 0}
        self._lock = threading.Lock()
        self._server: Optional[http.server.ThreadingHTTPServer] = None
        self._conns: list = []

    def start(self) -> "Origin":
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), _Handler)
        srv.daemon_threads = True
        srv.name = self.name  # type: ignore[attr-defined]
        srv.count = self._count  # type: ignore[attr-defined]
        srv.track = self._conns.append  # type: ignore[attr-defined]
        self.port = srv.server_address[1]
        self._server = srv
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return self

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        import socket
        for conn in self._conns:  # a dead origin drops its keep-alive connections too
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._conns.clear()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"
