"""Raw-socket helpers for the reliability tests: origins that misbehave on purpose, a
WebSocket echo origin, an HTTP/1 response reader that tells a clean answer from a cut one,
and per-process FD/RSS readings from /proc.

Everything is real sockets on loopback; every thread is a daemon with a bounded life, and
every origin is closed by ``stop()`` (the tests call it in ``finally``).
"""
from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
import threading
import time
from typing import Callable, Optional

Handler = Callable[[socket.socket, int], None]


class RawOrigin:
    """A loopback listener that runs ``handler(conn, n)`` in a thread per accepted connection
    (``n`` counts connections from 0). ``connections`` says how many were accepted."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port: int = self.sock.getsockname()[1]
        self.connections = 0
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                n = self.connections
                self.connections += 1
                self._conns.append(conn)
            threading.Thread(target=self._run, args=(conn, n), daemon=True).start()

    def _run(self, conn: socket.socket, n: int) -> None:
        conn.settimeout(30)  # a handler never outlives the test by much
        try:
            self.handler(conn, n)
        except OSError:
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()
        with self._lock:
            for c in self._conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._conns.clear()


def read_request_head(conn: socket.socket, buf: bytes = b"") -> tuple[bytes, bytes]:
    """Read one request head (bodies are not expected); returns (head, leftover). b"" at EOF."""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            return b"", b""
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def reset(conn: socket.socket) -> None:
    """Close with RST (SO_LINGER 0) rather than FIN."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


class Reply:
    """What ``read_reply`` saw: ``status`` (0: no status line), ``headers`` (lowercase names),
    ``body``, ``complete`` (the framing said the message ended), ``error`` (why it stopped)."""

    __slots__ = ("status", "headers", "body", "complete", "error", "raw_head")

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""
        self.complete = False
        self.error = ""
        self.raw_head = b""


def read_reply(sock: socket.socket, buf: bytes = b"", head_request: bool = False
               ) -> tuple[Reply, bytes]:
    """Read one HTTP/1.1 response, checking it is well-formed. Never raises for a cut or reset
    connection: it says so in ``error``. ``socket.timeout`` does propagate (a hang is a bug)."""
    r = Reply()
    try:
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                r.error = "EOF before head"
                return r, buf
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        r.raw_head = head
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") or not parts[1].isdigit() \
                or len(parts[1]) != 3:
            r.error = f"bad status line {lines[0]!r}"
            return r, buf
        r.status = int(parts[1])
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip() or b" " in name:
                r.error = f"bad header line {line!r}"
                return r, buf
            r.headers[name.decode("latin-1").lower()] = value.strip().decode("latin-1")
        if head_request or r.status in (204, 304) or r.status < 200:
            r.complete = True
            return r, buf
        te = r.headers.get("transfer-encoding")
        if te is not None:
            if te.lower() != "chunked":
                r.error = f"bad transfer-encoding {te!r}"
                return r, buf
            body = []
            while True:
                while b"\r\n" not in buf:
                    chunk = sock.recv(65536)
                    if not chunk:
                        r.error = "EOF in chunk size"
                        r.body = b"".join(body)
                        return r, buf
                    buf += chunk
                line, _, buf = buf.partition(b"\r\n")
                size = int(line.split(b";")[0], 16)
                while len(buf) < size + 2:
                    chunk = sock.recv(65536)
                    if not chunk:
                        r.error = "EOF in chunk"
                        r.body = b"".join(body) + buf
                        return r, b""
                    buf += chunk
                if size == 0:
                    # no trailers expected from pyngora's own answers; skip them if any
                    while not buf.startswith(b"\r\n"):
                        if b"\r\n\r\n" in buf:
                            buf = buf[buf.index(b"\r\n\r\n") + 2:]
                            break
                        chunk = sock.recv(65536)
                        if not chunk:
                            r.error = "EOF in trailers"
                            return r, buf
                        buf += chunk
                    buf = buf[2:]
                    r.body = b"".join(body)
                    r.complete = True
                    return r, buf
                body.append(buf[:size])
                buf = buf[size + 2:]
        cl = r.headers.get("content-length")
        if cl is None:
            # close-delimited
            parts_: list[bytes] = [buf]
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                parts_.append(chunk)
            r.body = b"".join(parts_)
            r.complete = True
            return r, b""
        n = int(cl)
        while len(buf) < n:
            chunk = sock.recv(65536)
            if not chunk:
                r.error = f"EOF in body after {len(buf)} of {n} bytes"
                r.body = buf
                return r, b""
            buf += chunk
        r.body, buf = buf[:n], buf[n:]
        r.complete = True
        return r, buf
    except (ConnectionResetError, BrokenPipeError) as e:
        r.error = f"reset: {e!r}"
        return r, b""


def request(port: int, raw: bytes, timeout: float = 10.0) -> Reply:
    """Send ``raw`` on a new connection and read one reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(raw)
        return read_reply(s)[0]


# -- WebSocket (just what an echo needs: unmasked server frames, masked client frames) --------
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B85"


def ws_accept(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


def ws_frame(payload: bytes, mask: bool, opcode: int = 2) -> bytes:
    head = bytes([0x80 | opcode])
    n = len(payload)
    mbit = 0x80 if mask else 0
    if n < 126:
        head += bytes([mbit | n])
    elif n < 65536:
        head += bytes([mbit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mbit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i & 3] for i, b in enumerate(payload))


def ws_read_frame(sock: socket.socket, buf: bytes) -> tuple[Optional[int], bytes, bytes]:
    """Read one frame: (opcode or None at EOF, payload, leftover)."""
    def need(n: int) -> bool:
        nonlocal buf
        while len(buf) < n:
            chunk = sock.recv(65536)
            if not chunk:
                return False
            buf += chunk
        return True
    if not need(2):
        return None, b"", buf
    opcode, b1 = buf[0] & 0x0F, buf[1]
    n, off = b1 & 0x7F, 2
    if n == 126:
        if not need(4):
            return None, b"", buf
        n, off = struct.unpack("!H", buf[2:4])[0], 4
    elif n == 127:
        if not need(10):
            return None, b"", buf
        n, off = struct.unpack("!Q", buf[2:10])[0], 10
    masked = b1 & 0x80
    key = b""
    if masked:
        if not need(off + 4):
            return None, b"", buf
        key, off = buf[off:off + 4], off + 4
    if not need(off + n):
        return None, b"", buf
    payload, buf = buf[off:off + n], buf[off + n:]
    if masked:
        payload = bytes(b ^ key[i & 3] for i, b in enumerate(payload))
    return opcode, payload, buf


def ws_echo_handler(conn: socket.socket, n: int) -> None:
    """A WebSocket echo origin (also answers plain GETs with 200 "ok" for health checks)."""
    buf = b""
    while True:
        head, buf = read_request_head(conn, buf)
        if not head:
            return
        low = head.lower()
        if b"upgrade: websocket" not in low:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            continue
        key = b""
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"sec-websocket-key:"):
                key = line.split(b":", 1)[1].strip()
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + ws_accept(key) +
                     b"\r\n\r\n")
        while True:
            op, payload, buf = ws_read_frame(conn, buf)
            if op is None:
                return
            if op == 8:
                conn.sendall(ws_frame(payload[:2], mask=False, opcode=8))
                return
            conn.sendall(ws_frame(payload, mask=False, opcode=op))


# -- process readings -----------------------------------------------------------------------
def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def proc_state(pid: int) -> str:
    """The one-letter state in /proc/PID/stat ("R", "S", "T" stopped, "Z"...); "" if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def proc_start(pid: int) -> int:
    """The process's start time (clock ticks since boot; /proc/PID/stat field 22), 0 if gone.
    With the pid it names one process for good: pids are reused, (pid, start) pairs are not."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets ``pid`` holds open (empty if it is gone)."""
    out = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in names:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out.add(link[8:-1])
    return out


TCP_LISTEN = "0A"


def tcp_table() -> dict[str, tuple[int, int, str]]:
    """The IPv4 TCP sockets of this network namespace, from /proc/net/tcp:
    inode -> (local port, remote port, state in hex: "01" established, "0A" listen...).
    Sockets no process holds any more (TIME_WAIT) have inode 0 and are left out."""
    out: dict[str, tuple[int, int, str]] = {}
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            if len(parts) > 9 and parts[9] != "0":
                out[parts[9]] = (int(parts[1].split(":")[1], 16),
                                 int(parts[2].split(":")[1], 16), parts[3])
    return out


def wait_until(cond: Callable[[], object], timeout: float, interval: float = 0.02) -> object:
    """Like tests.support.wait_for, but returns the last value instead of raising."""
    end = time.monotonic() + timeout
    v = cond()
    while not v and time.monotonic() < end:
        time.sleep(interval)
        v = cond()
    return v
