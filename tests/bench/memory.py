"""Memory figures of a bench run: idle RSS of each process, and N idle keep-alive connections
held on one worker (RSS growth per connection).

Runs inside the benchmark driver, against servers it started; the client sockets live in the
driver process, whose RLIMIT_NOFILE the driver raised first.
"""
from __future__ import annotations

import select
import socket
import time
from dataclasses import dataclass
from typing import Optional

from tests.bench.tools import fd_count, rss_kib

__all__ = ["IdleConnResult", "hold_idle_connections"]

_REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: pyngora-bench\r\n\r\n"


@dataclass
class IdleConnResult:
    """What holding ``opened`` idle keep-alive connections did to one worker."""
    wanted: int
    opened: int
    held: int            # still open (not readable = not closed by the server) after the pause
    sample_ok: int       # of the re-used sample, how many answered a second request
    sample: int
    rss_before_kib: int
    rss_after_kib: int
    rss_after_close_kib: Optional[int]
    fds_before: Optional[int]
    fds_after: Optional[int]
    error: str = ""

    @property
    def per_conn_bytes(self) -> float:
        """RSS growth per held connection, in bytes."""
        if not self.opened:
            return float("nan")
        return (self.rss_after_kib - self.rss_before_kib) * 1024.0 / self.opened


def _read_response(sock: socket.socket) -> int:
    """Read one Content-Length response from a blocking socket; returns its status."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("EOF before the response head")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("EOF in the response body")
        rest += chunk
    return status


def hold_idle_connections(port: int, worker_pid: int, n: int, pause: float = 2.0,
                          batch: int = 500) -> IdleConnResult:
    """Open ``n`` connections to ``port``, make one request on each, keep them all open and
    idle, and measure ``worker_pid``'s RSS and FD count before and after.

    After ``pause`` seconds the connections are checked (none may have been closed by the
    server) and every 100th one makes a second request. All client sockets are closed before
    returning; the RSS after close is measured after a short settle.
    """
    socks: list[socket.socket] = []
    before = rss_kib(worker_pid) or 0
    fds_before = fd_count(worker_pid)
    error = ""
    try:
        while len(socks) < n:
            fresh: list[socket.socket] = []
            try:
                for _ in range(min(batch, n - len(socks))):
                    s = socket.create_connection(("127.0.0.1", port), timeout=10)
                    fresh.append(s)
                for s in fresh:
                    s.sendall(_REQUEST)
                for s in fresh:
                    status = _read_response(s)
                    if status != 200:
                        raise ConnectionError(f"status {status}")
            except OSError as e:
                error = f"after {len(socks) + len(fresh)} connections: {e!r}"
                socks.extend(fresh)
                break
            socks.extend(fresh)
        time.sleep(pause)
        after = rss_kib(worker_pid) or 0
        fds_after = fd_count(worker_pid)
        # A socket the server closed is readable (EOF); an idle held one is not.
        # poll, not select: these descriptors are far above FD_SETSIZE.
        poller = select.poll()
        for s in socks:
            poller.register(s, select.POLLIN)
        closed = len(poller.poll(0))
        sample = socks[::100]
        ok = 0
        for s in sample:
            try:
                s.sendall(_REQUEST)
                if _read_response(s) == 200:
                    ok += 1
            except OSError:
                pass
    finally:
        for s in socks:
            s.close()
    time.sleep(min(pause, 1.0))
    return IdleConnResult(n, len(socks), len(socks) - closed, ok, len(sample), before, after,
                          rss_kib(worker_pid), fds_before, fds_after, error)
