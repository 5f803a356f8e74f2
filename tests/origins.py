"""Real origin servers for process tests: threaded HTTP/1.1 servers on loopback that say who
they are and count what reached them (connections, requests)."""
from __future__ import annotations

import http.server
import socket
import threading
from typing import Optional


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.server.origin._opened(self.request)  # type: ignore[attr-defined]

    def do_GET(self) -> None:
        origin = self.server.origin  # type: ignore[attr-defined]
        origin._busy(self.request)
        body = origin.name.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Origin", origin.name)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        if origin._served(self.request):
            self.close_connection = True  # stopping: this was the connection's last answer

    do_HEAD = do_GET

    def log_message(self, *args: object) -> None:
        pass


class Origin:
    """``Origin("a").start()``; ``stop()`` stops it like a server shutting down: the listener
    closes (new connections are refused), a request being answered gets its answer, idle
    keep-alive connections are closed."""

    def __init__(self, name: str, port: int = 0) -> None:
        self.name = name
        self.port = port
        self.counts = {"connections": 0, "requests": 0}
        self._lock = threading.Lock()
        self._server: Optional[http.server.ThreadingHTTPServer] = None
        # connection -> requests answered (negated, minus one, while answering one)
        self._conns: dict[socket.socket, int] = {}
        self._stopping = False

    def start(self) -> "Origin":
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), _Handler)
        srv.daemon_threads = True
        srv.origin = self  # type: ignore[attr-defined]
        self.port = srv.server_address[1]
        self._server = srv
        self._stopping = False
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return self

    def _opened(self, conn: socket.socket) -> None:
        with self._lock:
            self.counts["connections"] += 1
            self._conns[conn] = 0

    def _busy(self, conn: socket.socket) -> None:
        with self._lock:
            if conn in self._conns:
                self._conns[conn] = -abs(self._conns[conn]) - 1  # negative: answering now

    def _served(self, conn: socket.socket) -> bool:
        """Count an answer; True when the connection must close (the origin is stopping)."""
        with self._lock:
            self.counts["requests"] += 1
            self._conns[conn] = abs(self._conns.get(conn, 0))
            return self._stopping

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            # Close the keep-alive connections that answered before and wait for their next
            # request. A brand-new connection is about to carry its first request: it gets
            # that answer, then closes.
            idle = [c for c, n in self._conns.items() if n > 0]
            self._conns.clear()
        for conn in idle:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"
