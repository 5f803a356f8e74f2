"""Soak: mixed load through a 2-worker proxy while it is upgraded, reloaded and has workers
killed with -9, on issue 9's schedule: 3 minutes; ``-s upgrade`` every 20 s, SIGHUP every 30 s,
``kill -9`` of a worker every 15 s (8 upgrades, 5 reloads, 11 kills; at 60 s and 120 s all three
fall in the same instant, in the order kill, SIGHUP, upgrade).

bin/test runs exactly that. ``PYNGORA_SOAK_SECONDS=60`` (any value) shortens a local run: every
period scales by SECONDS / 180, so the same events happen in less time. ``PYNGORA_SOAK_SEED``
replays one run's choice of victims (the seed is printed).

The load (``Mixed``): keep-alive and churn GETs, 256 KiB uploads (one connection each), 1 MiB
downloads on a keep-alive connection, and WebSocket echo sessions through the proxy.

What is asserted (the issue's points):
- 0 failed requests, except those on the killed worker's own connections. Which connections a
  worker owned is read from /proc as it dies: it is stopped (SIGSTOP, awaited until the kernel
  says "T", so it can accept nothing more), its socket inodes are matched to /proc/net/tcp, the
  client ports found there are remembered, then SIGKILL. A client failure on one of those ports,
  on a connection opened before that kill and failing after it, is counted apart and reported,
  each owned connection at most once; any other failure fails the test. A keep-alive request
  that finds its reused connection closed before any byte of an answer is sent again (HTTP's
  own rule) and counted as ``idle-retry``; the report says how many of those were a killed
  worker's.
- Every event happened on schedule (counts), every upgrade succeeded, every old master and
  every worker it or a reload replaced exited (tracked by pid and start time, not title).
- No FD or memory growth, start to end: master + workers, idle (every client connection
  closed, and the server's side of each one gone: 0 is the bound), before the load (after a
  short warm-up of every request kind) and after it. Descriptors are split in two: pooled
  connections to the origins, bounded by concurrency (a worker opens one only when none is
  idle, so it holds at most one per client thread: more means connections are lost instead of
  pooled or closed), and everything else (listeners, pipes, epoll, logs), which must come back
  to the start count within ``OTHER_FD_SLACK``. That catches a listener duplicated at each
  upgrade or reload (the hand-over would carry it on to the end) and a descriptor leaked per
  request or connection; a single descriptor leaked per kill or reload in a master that lives
  20 s stays under it. RSS must stay within ``RSS_BOUND_KIB`` of the start: a retained 1 MiB
  body, or a few KiB per request over the 7,000-30,000 requests the last generation serves,
  breaks it; measured growth is 0-7 MiB (a worker's RSS levels off under load: 220,000
  requests in 2 minutes took one from 33 to 34-35 MiB, no trend). The processes differ after
  upgrades: the comparison is of the whole server, idle, before and after.
"""
from __future__ import annotations

import http.server
import os
import random
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple, Optional

import pytest

from tests.process.test_upgrade import Daemon
from tests.reliability.rawnet import (TCP_LISTEN, RawOrigin, fd_count, proc_start, proc_state,
                                      read_reply, rss_kib, socket_inodes, tcp_table,
                                      wait_until, ws_echo_handler, ws_frame, ws_read_frame)
from tests.support import children_of, free_port, get, title, wait_for

FULL = 180.0
SOAK_SECONDS = float(os.environ.get("PYNGORA_SOAK_SECONDS", str(FULL)))
SCALE = SOAK_SECONDS / FULL
UPGRADE_EVERY, RELOAD_EVERY, KILL_EVERY = 20 * SCALE, 30 * SCALE, 15 * SCALE
SEED = int(os.environ.get("PYNGORA_SOAK_SEED", str(int(time.time()) % 100000)))
BIG = 1024 * 1024
UPLOAD = 256 * 1024
CLIENT_THREADS = 7          # Mixed's threads: the most requests a worker can have at once
OTHER_FD_SLACK = 4          # whole server: the fixed descriptors come back to their count
RSS_BOUND_KIB = 20 * 1024   # whole server (3 processes); measured growth is 0-7 MiB
WARM_UP = {"get": 1000, "churn": 300, "upload": 300, "download": 300, "ws-session": 30}
WORKER_TITLE = "pyngora: worker proxy/"


# -- the origin ---------------------------------------------------------------------------------
class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    big = b"d" * BIG

    def do_GET(self) -> None:
        body = self.big if self.path.startswith("/big") else b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        n = int(self.headers.get("Content-Length", "0"))
        got = 0
        while got < n:
            chunk = self.rfile.read(min(65536, n - got))
            if not chunk:
                return
            got += len(chunk)
        body = str(got).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


# -- failure bookkeeping ------------------------------------------------------------------------
@dataclass
class Tally:
    ok: dict[str, int] = field(default_factory=dict)
    # (kind, client port, why, when the connection was opened, when it failed)
    failures: list[tuple[str, int, str, float, float]] = field(default_factory=list)
    opened: dict[int, float] = field(default_factory=dict)  # client port -> connect time
    # idle retries as (client port, opened, when): to tell a killed worker's from a drained one
    retried: list[tuple[int, float, float]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def good(self, kind: str) -> None:
        with self.lock:
            self.ok[kind] = self.ok.get(kind, 0) + 1

    def retry(self, port: int) -> None:
        """A reused keep-alive connection closed before any byte of the answer: HTTP's retry."""
        with self.lock:
            self.ok["idle-retry"] = self.ok.get("idle-retry", 0) + 1
            self.retried.append((port, self.opened.get(port, 0.0), time.monotonic()))

    def connect(self, addr: tuple[str, int]) -> socket.socket:
        """A new client connection, its opening time noted by local port."""
        t = time.monotonic()
        s = socket.create_connection(addr, timeout=30)
        with self.lock:
            self.opened[_local_port(s)] = t
        return s

    def bad(self, kind: str, port: int, why: str) -> None:
        with self.lock:
            opened = self.opened.get(port, 0.0) if port else 0.0
            self.failures.append((kind, port, why, opened, time.monotonic()))


def _local_port(s: Optional[socket.socket]) -> int:
    try:
        return s.getsockname()[1] if s is not None else 0
    except OSError:
        return 0


class Mixed:
    """The clients: 3 keep-alive GET, 1 churn GET (a connection per request), 1 keep-alive
    1 MiB download, 1 upload (256 KiB, a connection each), 1 WebSocket echo. Every failure
    is recorded with the client's local port, so it can be matched to a killed worker.
    (tests/loadgen.py's Load does the same load but keeps no ports, hence this class.)"""

    def __init__(self, port: int, deadline: float) -> None:
        """``deadline`` (monotonic) is a safety cap only: the load runs until ``join``."""
        self.addr = ("127.0.0.1", port)
        self.tally = Tally()
        self.stop = threading.Event()
        self.deadline = deadline
        upload = os.urandom(UPLOAD)
        jobs: list[tuple] = [(self._websockets, ())]
        jobs += [(self._keepalive, ("get", b"/", 2))] * 3
        jobs += [(self._keepalive, ("download", b"/big", BIG))]
        jobs += [(self._one_per_connection, ("churn", b"GET / HTTP/1.1\r\nHost: t\r\n"
                                             b"Connection: close\r\n\r\n", b"ok"))]
        jobs += [(self._one_per_connection, ("upload", b"POST /up HTTP/1.1\r\nHost: t\r\n"
                                             b"Connection: close\r\nContent-Length: %d\r\n\r\n"
                                             % UPLOAD + upload, str(UPLOAD).encode()))]
        self.threads = [threading.Thread(target=f, args=a, daemon=True) for f, a in jobs]

    def running(self) -> bool:
        return not self.stop.is_set() and time.monotonic() < self.deadline

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _one_per_connection(self, kind: str, raw: bytes, expect: bytes) -> None:
        """A new connection per request (churn, uploads): no idle-close race is possible, so
        any error is a failure (unless the connection was a killed worker's)."""
        while self.running():
            s = None
            try:
                s = self.tally.connect(self.addr)
                s.sendall(raw)
                r, _ = read_reply(s)
                if r.complete and r.status == 200 and r.body == expect:
                    self.tally.good(kind)
                else:
                    self.tally.bad(kind, _local_port(s), f"{r.status} {r.error} {r.body[:40]!r}")
            except OSError as e:
                self.tally.bad(kind, _local_port(s), repr(e))
            finally:
                if s is not None:
                    s.close()

    def _keepalive(self, kind: str, path: bytes, length: int) -> None:
        """Requests on a kept-alive connection. HTTP's own rule, and nothing more, is honoured:
        when a reused connection ends before any byte of the answer (the server closed it
        idle), the request is sent again on a new one (counted as ``idle-retry``)."""
        s: Optional[socket.socket] = None
        buf, reused = b"", False
        req = b"GET " + path + b" HTTP/1.1\r\nHost: t\r\n\r\n"
        while self.running():
            try:
                if s is None:
                    s = self.tally.connect(self.addr)
                    buf, reused = b"", False
                s.sendall(req)
                r, buf = read_reply(s, buf)
                if r.status == 0 and reused and not buf and (
                        r.error == "EOF before head" or r.error.startswith("reset")):
                    self.tally.retry(_local_port(s))
                    s.close()
                    s = None
                    continue
                if r.complete and r.status == 200 and len(r.body) == length:
                    self.tally.good(kind)
                    reused = True
                    if r.headers.get("connection", "").lower() == "close":
                        s.close()
                        s = None
                else:
                    self.tally.bad(kind, _local_port(s), f"{r.status} {r.error}")
                    s.close()
                    s = None
            except OSError as e:
                if reused and s is not None and not buf and isinstance(
                        e, (BrokenPipeError, ConnectionResetError)):
                    # the send itself found the idle connection closed: HTTP's retry too
                    self.tally.retry(_local_port(s))
                    s.close()
                    s = None
                    continue
                self.tally.bad(kind, _local_port(s), repr(e))
                if s is not None:
                    s.close()
                s = None
        if s is not None:
            s.close()

    def _websockets(self) -> None:
        while self.running():
            s = None
            try:
                s = self.tally.connect(self.addr)
                s.sendall(b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
                buf = b""
                while b"\r\n\r\n" not in buf:
                    chunk = s.recv(65536)
                    if not chunk:
                        raise ConnectionError("EOF before 101")
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 101"):
                    raise ConnectionError(f"no 101: {head[:60]!r}")
                for i in range(20):
                    msg = os.urandom(random.randint(1, 3000))
                    s.sendall(ws_frame(msg, mask=True))
                    op, payload, buf = ws_read_frame(s, buf)
                    if op is None or payload != msg:
                        raise ConnectionError(f"echo {i}: op {op}, {len(payload)} bytes")
                    self.tally.good("ws-message")
                s.sendall(ws_frame(b"\x03\xe8", mask=True, opcode=8))
                op, _, buf = ws_read_frame(s, buf)
                if op != 8:
                    raise ConnectionError(f"close not echoed: op {op}")
                self.tally.good("ws-session")
            except OSError as e:
                self.tally.bad("websocket", _local_port(s), repr(e))
            finally:
                if s is not None:
                    s.close()


# -- /proc: processes, who owns which connection, the footprint ------------------------------
Proc = tuple[int, int]  # (pid, start time): one process, even after its pid is reused


def _ident(pid: int) -> Proc:
    return pid, proc_start(pid)


def _same(p: Proc) -> bool:
    """Is the process ``p`` names still there (not exited, its pid not reused)?"""
    return p[1] != 0 and proc_start(p[0]) == p[1] and proc_state(p[0]) not in ("", "Z")


def _workers(master: int) -> list[int]:
    return [p for p in children_of(master) if title(p).startswith(WORKER_TITLE)]


def _client_ports_of(pid: int, server_port: int) -> set[int]:
    """The remote (client) ports of the TCP connections to ``server_port`` that ``pid`` holds."""
    inodes, table = socket_inodes(pid), tcp_table()
    return {remote for inode, (local, remote, state) in table.items()
            if inode in inodes and local == server_port and state != TCP_LISTEN}


class Held(NamedTuple):
    """One server process's footprint: descriptors by kind, and RSS."""
    role: str
    pid: int
    pooled: int   # TCP connections to the origins (the upstream pool)
    client: int   # the server's side of client connections
    fixed: int    # everything else: pipes, epoll, log files, one listener copy per process...
    rss_kib: int
    accept: int = 0  # a worker's further copies of the listening socket: its accept handles
                     # and the drain's copy (server/accepting.py: 2 when idle, more under churn)


@dataclass
class Footprint:
    """Master + workers at one moment."""
    procs: list[Held]

    def total(self, what: str) -> int:
        return sum(getattr(p, what) for p in self.procs)

    def line(self) -> str:
        fds = sum(self.total(k) for k in ("pooled", "client", "fixed", "accept"))
        return (f"{fds} FDs ({self.total('fixed')} fixed, {self.total('accept')} accept handle "
                f"copies, {self.total('pooled')} pooled to origins, {self.total('client')} "
                f"client), RSS "
                f"{self.total('rss_kib') / 1024:.1f} MiB, {len(self.procs)} processes "
                f"[" + ", ".join(f"{p.role} {p.fixed}+{p.pooled} FDs {p.rss_kib / 1024:.1f} MiB"
                                 for p in self.procs) + "]")


def _footprint(master: int, port: int, origins: tuple[int, ...]) -> Footprint:
    """Read the footprint of ``master`` and its workers now (from /proc)."""
    table = tcp_table()
    procs = []
    for role, pid in [("master", master)] + [("worker", w) for w in _workers(master)]:
        inodes = socket_inodes(pid)
        pooled = sum(1 for i in inodes if i in table and table[i][1] in origins)
        client = sum(1 for i in inodes if i in table and table[i][0] == port
                     and table[i][2] != TCP_LISTEN)
        accept = _listener_copies(pid, port, table) - 1 if role == "worker" else 0
        fixed = fd_count(pid) - pooled - client - accept
        procs.append(Held(role, pid, pooled, client, fixed, rss_kib(pid), accept))
    return Footprint(procs)


def _listener_copies(pid: int, port: int, table: dict[str, tuple[int, int, str]]) -> int:
    """How many of ``pid``'s descriptors are the socket listening on ``port``."""
    n = 0
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    for fd in names:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        entry = table.get(link[8:-1]) if link.startswith("socket:[") else None
        if entry is not None and entry[0] == port and entry[2] == TCP_LISTEN:
            n += 1
    return n


def _accept_idle(master: int, port: int) -> bool:
    """Every worker is back to one accept handle (on the descriptor it inherited) and the
    drain's copy of the listener."""
    table = tcp_table()
    return all(_listener_copies(w, port, table) == 2 for w in _workers(master))


def _kill_worker(victim: int, port: int) -> Optional[tuple[float, set[int]]]:
    """SIGSTOP ``victim``, wait until it is stopped, read the client connections it holds, then
    SIGKILL it. Returns (the moment of the kill, those clients' ports), or None if the worker
    was gone already. The moment is taken while the worker is stopped and before SIGKILL: every
    connection it owns was opened before it, every failure that the kill causes comes after."""
    who = _ident(victim)
    if not who[1] or not title(victim).startswith(WORKER_TITLE):
        return None  # exited between listing and now
    try:
        os.kill(victim, signal.SIGSTOP)
    except ProcessLookupError:
        return None
    wait_until(lambda: proc_state(victim) in ("T", "t", "Z", ""), 10, 0.005)
    state = proc_state(victim)
    if not _same(who):
        if proc_start(victim):  # the pid went to another process in that instant: let it go
            os.kill(victim, signal.SIGCONT)
        return None
    assert state in ("T", "t"), f"worker {victim} did not stop ({state!r})"
    owned = _client_ports_of(victim, port)
    t = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    return t, owned


def _attribute(failures: list, kills: list[tuple[float, set[int]]]) -> tuple[list, list]:
    """Split failures into (on a killed worker's own connection, others). A failure is the
    victim's when its client port was one the victim held at its kill, the connection was
    opened before that kill and failed after it; each held connection explains one failure."""
    used: set[tuple[int, int]] = set()
    mine, others = [], []
    for f in failures:
        kind, cport, why, opened, failed = f
        hit = next((i for i, (t, ports) in enumerate(kills)
                    if cport in ports and opened <= t <= failed and (i, cport) not in used), None)
        if hit is None:
            others.append(f)
        else:
            used.add((hit, cport))
            mine.append(f)
    return mine, others


def _conf(tmp, port: int, app: int, ws: int, body: str = "a") -> str:
    return (f"pid_file: {tmp}/p.pid\nupgrade_sock: {tmp}/u.sock\nerror_log: {tmp}/error.log\n"
            f"grace_period_seconds: 30\nupgrade_timeout_seconds: 20\n"
            f"metrics_dir: {tmp}/metrics\nthreads: 2\n"
            f"x-generation: {body}\n"
            f"services:\n  - name: proxy\n    type: http_proxy\n"
            f"    listeners: ['127.0.0.1:{port}']\n"
            f"    upstreams:\n"
            f"      - name: app\n        backends: [{{addr: '127.0.0.1:{app}'}}]\n"
            f"      - name: ws\n        backends: [{{addr: '127.0.0.1:{ws}'}}]\n"
            f"    routes:\n      - {{path_prefix: /ws, upstream: ws}}\n"
            f"      - {{path_prefix: /, upstream: app}}\n")


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # a respawned worker opens its pool at once: no SYN drops here

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a killed worker's upstream connections reset here: expected, not news


@pytest.fixture
def origins() -> Iterator[tuple[int, int]]:
    srv = _Server(("127.0.0.1", 0), _Handler)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    ws = RawOrigin(ws_echo_handler)
    try:
        yield srv.server_address[1], ws.port
    finally:
        srv.shutdown()
        srv.server_close()
        ws.stop()


def _run_load(port: int, until: Callable[[dict[str, int]], bool], cap: float) -> Mixed:
    """Run Mixed until ``until(tally)`` holds (at most ``cap`` seconds), then stop it."""
    m = Mixed(port, time.monotonic() + cap + 30)
    m.start()
    try:
        wait_until(lambda: until(m.tally.ok), cap, 0.05)
    finally:
        m.join()
    return m


def _stop_all(ours: set[Proc]) -> None:
    """The test's cleanup: SIGKILL every master and worker it started, and nothing else. Masters
    are stopped first (so none forks a replacement), then their children are read, then all are
    killed; a pid is only signalled while it still names the same process (its start time)."""
    masters = [p for p in ours if _same(p) and "master" in title(p[0])]
    for p in masters:
        os.kill(p[0], signal.SIGSTOP)
    for p in masters:
        ours |= {_ident(c) for c in children_of(p[0])}
    for p in sorted(ours, key=lambda p: "master" not in title(p[0])):
        if _same(p):
            try:
                os.kill(p[0], signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.timeout(int(SOAK_SECONDS) + 240)
def test_soak_upgrade_reload_kill_under_mixed_load(tmp_path, origins) -> None:
    app_port, ws_port = origins
    port = free_port()
    d = Daemon(tmp_path, _conf(tmp_path, port, app_port, ws_port))
    rng = random.Random(SEED)
    kills: list[tuple[float, set[int]]] = []  # (when, client ports the victim held)
    events: list[str] = []
    counts = {"upgrade": 0, "reload": 0, "kill": 0}
    ours: set[Proc] = set()  # every master and worker of this server, ever

    def track(master: int) -> None:
        ours.add(_ident(master))
        ours.update(_ident(w) for w in _workers(master))

    def no_client_sockets() -> bool:
        return _footprint(master, port, origins_).total("client") == 0

    origins_ = (app_port, ws_port)
    try:
        r = d.cmd("-d")
        assert r.returncode == 0, r.stderr + d.log()
        master = d.pid()
        track(master)
        wait_for(lambda: len(_workers(master)) == 2, 20, "2 workers")
        # warm up every path in both workers (their allocators grow to a plateau within the
        # first few thousand requests), then read the idle footprint
        warm = _run_load(port, lambda ok: all(ok.get(k, 0) >= n for k, n in WARM_UP.items()),
                         20)
        assert not warm.tally.failures, warm.tally.failures[:5]
        wait_for(no_client_sockets, 30, "the server to close the warm-up's connections")
        wait_for(lambda: _accept_idle(master, port), 30, "one accept handle per worker again")
        fp0 = _footprint(master, port, origins_)
        track(master)

        t_start = time.monotonic()
        mixed = Mixed(port, t_start + SOAK_SECONDS + 120)
        mixed.start()
        try:
            wait_for(lambda: mixed.tally.ok.get("get", 0) > 20, 20, "the load to flow")
            next_up, next_hup, next_kill = UPGRADE_EVERY, RELOAD_EVERY, KILL_EVERY
            # until every event planned before the end has happened (none is dropped if one
            # ran late), the load running all along
            while min(next_up, next_hup, next_kill) < SOAK_SECONDS - 1e-6 or \
                    time.monotonic() - t_start < SOAK_SECONDS:
                now = time.monotonic() - t_start
                track(master)
                if now >= next_kill:
                    next_kill += KILL_EVERY
                    done, victim = None, 0
                    for _ in range(20):  # a draining worker may exit as it is chosen: again
                        workers = _workers(master)
                        victim = rng.choice(workers) if workers else 0
                        done = _kill_worker(victim, port) if victim else None
                        if done is not None:
                            break
                        time.sleep(0.05)
                    assert done is not None, f"no worker to kill at {now:.1f}s"
                    kills.append(done)
                    counts["kill"] += 1
                    events.append(f"{now:5.1f}s kill -9 worker {victim} ({len(done[1])} client "
                                  f"connections)")
                if now >= next_hup:
                    next_hup += RELOAD_EVERY
                    d.conf.write_text(_conf(tmp_path, port, app_port, ws_port,
                                            f"g{counts['reload'] + 1}"))
                    os.kill(master, signal.SIGHUP)
                    counts["reload"] += 1
                    events.append(f"{now:5.1f}s SIGHUP to {master}")
                if now >= next_up:
                    next_up += UPGRADE_EVERY
                    t0 = time.monotonic()
                    r = d.cmd("-s", "upgrade")
                    assert r.returncode == 0, r.stdout + r.stderr + d.log()[-3000:]
                    new = d.pid()
                    assert new != master
                    counts["upgrade"] += 1
                    events.append(f"{now:5.1f}s upgrade {master} -> {new} "
                                  f"({time.monotonic() - t0:.1f}s)")
                    master = new
                    track(master)
                time.sleep(0.05)
            t_end = time.monotonic() - t_start
        finally:
            mixed.join()

        # idle again: every replaced master and worker gone (by pid and start time: the
        # titles change and pids are reused), 2 workers, no client connection on either side
        def settled() -> bool:
            track(master)
            current = {_ident(master)} | {_ident(w) for w in _workers(master)}
            return len(current) == 3 and not any(_same(p) for p in ours - current)
        wait_for(settled, 60, "replaced masters and workers to exit")
        wait_for(no_client_sockets, 30, "the server to close the clients' connections")
        wait_for(lambda: _accept_idle(master, port), 30, "one accept handle per worker again")
        fp1 = _footprint(master, port, origins_)

        on_killed, others = _attribute(mixed.tally.failures, kills)
        retried_killed = [x for x in mixed.tally.retried if any(
            x[0] in ports and x[1] <= t <= x[2] for t, ports in kills)]
        ok = mixed.tally.ok
        print(f"\nsoak: {t_end:.0f}s, seed {SEED} (issue schedule x{SCALE:.2f}: upgrade every "
              f"{UPGRADE_EVERY:.1f}s, reload every {RELOAD_EVERY:.1f}s, kill -9 every "
              f"{KILL_EVERY:.1f}s)")
        for e in events:
            print("  " + e)
        print(f"  events: {counts['upgrade']} upgrades, {counts['reload']} reloads, "
              f"{counts['kill']} workers killed holding {sum(len(p) for _, p in kills)} "
              f"client connections; {len(ours)} server processes in all")
        http = sum(ok.get(k, 0) for k in ("get", "churn", "upload", "download"))
        print(f"  answered: {dict(sorted(ok.items()))} ({http} HTTP requests)")
        print(f"  failures on the killed workers' own connections: {len(on_killed)} "
              f"{sorted(f[0] for f in on_killed)}; other failures: {len(others)}")
        for f in others[:10]:
            print(f"    OTHER {f[0]} port {f[1]}: {f[2]} (opened {f[3] - t_start:.1f}s, "
                  f"failed {f[4] - t_start:.1f}s)")
        print(f"  idle retries: {ok.get('idle-retry', 0)}, of which on a killed worker's "
              f"connection: {len(retried_killed)}")
        print(f"  footprint, idle, start: {fp0.line()}")
        print(f"  footprint, idle, end:   {fp1.line()}")
        log_tail = d.log()[-4000:]
        assert not others, (others[:10], log_tail)
        expected = {k: sum(1 for n in range(1, 100) if n * period < SOAK_SECONDS - 1e-6)
                    for k, period in (("upgrade", UPGRADE_EVERY), ("reload", RELOAD_EVERY),
                                      ("kill", KILL_EVERY))}
        assert counts == expected, (counts, expected)
        assert ok.get("get", 0) > 100 and ok.get("churn", 0) > 20 and ok.get("upload", 0) > 5
        assert ok.get("download", 0) > 5 and ok.get("ws-session", 0) > 2, ok
        assert fp1.total("client") == 0, fp1.procs
        assert fp1.total("fixed") <= fp0.total("fixed") + OTHER_FD_SLACK, (fp0.procs, fp1.procs)
        assert all(p.pooled <= CLIENT_THREADS for p in fp1.procs), fp1.procs
        assert fp1.total("rss_kib") <= fp0.total("rss_kib") + RSS_BOUND_KIB, (fp0.procs,
                                                                            fp1.procs)
        assert get(port, "/")[0] == 200
    finally:
        try:
            pid = int((tmp_path / "p.pid").read_text().strip())
        except (OSError, ValueError):
            pid = 0
        if pid and title(pid).startswith(f"pyngora: master -c {tmp_path}"):
            ours.add(_ident(pid))  # in case it failed before it was tracked
        _stop_all(ours)
