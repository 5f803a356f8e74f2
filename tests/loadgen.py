"""A small load client for zero-downtime tests: keep-alive clients plus a new connection per
request, counting every failure. Bounded: it stops when told, or at ``max_seconds``.

HTTP's own rule is honoured and nothing more: a request on a reused keep-alive connection that
the server closed while idle (no byte of a response came back) may be retried once on a new
connection; every other error counts as a failure.
"""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Stats:
    ok: int = 0
    failed: int = 0
    idle_retries: int = 0
    errors: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, ok: bool, err: str = "") -> None:
        with self.lock:
            if ok:
                self.ok += 1
            else:
                self.failed += 1
                if len(self.errors) < 20:
                    self.errors.append(err)


def _read_response(sock: socket.socket, buf: bytes) -> tuple[int, bytes, bool]:
    """Read one Content-Length response; returns (status, leftover, got_any_byte)."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("EOF before response head" if not buf else "EOF in head")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    close = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        n = name.strip().lower()
        if n == b"content-length":
            length = int(value)
        elif n == b"connection" and value.strip().lower() == b"close":
            close = True
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("EOF in body")
        rest += chunk
    return status, rest[length:], close


class Load:
    """``with Load(port, keepalive=4, churn=2) as load: ...``; then look at ``load.stats``."""

    def __init__(self, port: int, keepalive: int = 4, churn: int = 2, path: str = "/",
                 max_seconds: float = 120.0, host: str = "127.0.0.1") -> None:
        self.addr = (host, port)
        self.request = f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode()
        self.request_close = f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode()
        self.stats = Stats()
        self.stop_event = threading.Event()
        self.deadline = time.monotonic() + max_seconds
        self.threads = [threading.Thread(target=self._keepalive, daemon=True) for _ in range(keepalive)]
        self.threads += [threading.Thread(target=self._churn, daemon=True) for _ in range(churn)]

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def running(self) -> bool:
        return not self.stop_event.is_set() and time.monotonic() < self.deadline

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(30)

    def wait_requests(self, n: int, timeout: float = 30.0) -> None:
        """Block until ``n`` more requests succeeded (proof the load really runs)."""
        target = self.stats.ok + n
        end = time.monotonic() + timeout
        while self.stats.ok < target:
            if time.monotonic() > end:
                raise AssertionError(f"load stalled at {self.stats.ok} ok, {self.stats.failed} failed: {self.stats.errors}")
            time.sleep(0.01)

    def _keepalive(self) -> None:
        sock = None
        buf = b""
        reused = False
        while self.running():
            try:
                if sock is None:
                    sock = socket.create_connection(self.addr, timeout=30)
                    buf, reused = b"", False
                sock.sendall(self.request)
                status, buf, close = _read_response(sock, buf)
                self.stats.add(status == 200, f"status {status}")
                reused = True
                if close:
                    sock.close()
                    sock = None
            except (ConnectionError, OSError) as e:
                if sock is not None:
                    sock.close()
                sock = None
                if reused and ("EOF before response head" in str(e) or isinstance(
                        e, (ConnectionResetError, BrokenPipeError))):
                    with self.stats.lock:
                        self.stats.idle_retries += 1
                    continue  # the server closed an idle keep-alive connection: retry is HTTP's rule
                self.stats.add(False, f"keepalive: {e!r}")
        if sock is not None:
            sock.close()

    def _churn(self) -> None:
        while self.running():
            try:
                with socket.create_connection(self.addr, timeout=30) as sock:
                    sock.sendall(self.request_close)
                    status, _, _ = _read_response(sock, b"")
                    self.stats.add(status == 200, f"status {status}")
            except (ConnectionError, OSError) as e:
                self.stats.add(False, f"churn: {e!r}")
