"""Test support: start real pyngora processes on free loopback ports and talk to them.

Nothing here mocks a socket or a process: `Pyngora` runs `python -m pyngora` in its own
session, and `stop()` kills only that process group.
"""
from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def _port_candidates() -> list[int]:
    """Ports below (or above) the kernel's ephemeral range, this process's share of them.

    Not bind(0): that port is in the ephemeral range, where any client's connect() may take
    it as its local port between the probe and the server's bind -- and the soak, running
    beside the unit and protocol tests (bin/test), opens ~150 connections a second. bin/test
    gives each concurrent lane its own share (PYNGORA_TEST_PORT_LANE of
    PYNGORA_TEST_PORT_LANES), so two lanes never hand out the same port either."""
    lo, hi = 32768, 60999
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        pass
    if lo > 12000:
        span = range(10000, lo)
    elif hi < 63000:
        span = range(hi + 1, 65536)
    else:
        return []  # no room outside it: the kernel picks (bind(0))
    lanes = max(1, int(os.environ.get("PYNGORA_TEST_PORT_LANES", "1")))
    lane = int(os.environ.get("PYNGORA_TEST_PORT_LANE", "0")) % lanes
    mine = list(span[lane::lanes])
    # A random start: the previous run's ports may linger in TIME_WAIT.
    start = int.from_bytes(os.urandom(2), "big") % len(mine)
    return mine[start:] + mine[:start]


_CANDIDATES: Optional[list[int]] = None
_NEXT = 0


def free_port() -> int:
    """A loopback port nobody listens on right now, and that no client can take as its local
    port meanwhile (see ``_port_candidates``); each one handed out once per run."""
    global _CANDIDATES, _NEXT
    if _CANDIDATES is None:
        _CANDIDATES = _port_candidates()
    while _NEXT < len(_CANDIDATES):
        port = _CANDIDATES[_NEXT]
        _NEXT += 1
        with socket.socket() as s:
            try:  # no SO_REUSEADDR: a port with TIME_WAIT leftovers or a wildcard listener
                s.bind(("127.0.0.1", port))  # is skipped as well
            except OSError:
                continue
        return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond: Callable[[], object], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.02) -> object:
    """Poll ``cond`` until it returns something truthy; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def read_request_head(sock: socket.socket) -> Optional[bytes]:
    """What a blocking test origin received up to the end of a request head (the head and
    anything after it); None if the client closed first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return None
        data += chunk
    return data


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def get(port: int, path: str = "/", host: str = "127.0.0.1", timeout: float = 10.0,
        method: str = "GET", headers: Optional[dict] = None, body: Optional[bytes] = None
        ) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def self_signed_cert(directory: Path, name: str = "localhost", days: int = 2) -> tuple[str, str]:
    """A self-signed certificate for ``name`` (also valid for 127.0.0.1, and usable as its own
    CA), made by the openssl CLI: (``name``.pem, ``name``.key) in ``directory``. The caller
    skips when openssl is missing."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", str(days), "-subj", f"/CN={name}",
                    "-addext", f"subjectAltName=DNS:{name},IP:127.0.0.1",
                    "-addext", "basicConstraints=critical,CA:TRUE"],
                   check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


def children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def kill_daemon(pid_file: Path) -> None:
    """SIGKILL the master named by ``pid_file`` and its children (a test's cleanup after a
    ``-d`` master, which no Popen holds); nothing when the file is gone or stale."""
    try:
        with open(pid_file) as f:
            pid = int(f.read())
    except (OSError, ValueError):
        return
    for child in children_of(pid):
        os.kill(child, signal.SIGKILL)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Pyngora:
    """One pyngora master started from a YAML text in ``workdir``."""

    def __init__(self, workdir: Path, config: str, args: tuple[str, ...] = (),
                 env: Optional[dict] = None, name: str = "pyngora.yaml") -> None:
        self.workdir = workdir
        self.conf_path = workdir / name
        self.conf_path.write_text(config)
        self.args = args
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), str(workdir), self.env.get("PYTHONPATH", "")) if p)
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = workdir / f"{name}.out"
        self.extra_pgids: set[int] = set()

    def cmd(self, *extra: str) -> list[str]:
        return [PY, "-m", "pyngora", "-c", str(self.conf_path), *extra]

    def start(self, *extra: str) -> "Pyngora":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd(*self.args, *extra), cwd=self.workdir,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self.env,
                                     start_new_session=True)
        return self

    def run(self, *extra: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run a short pyngora command (-t, -s, -d) to completion."""
        return subprocess.run(self.cmd(*extra), cwd=self.workdir, env=self.env,
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def wait_serving(self, port: int, timeout: float = 20.0) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"pyngora exited with {self.proc.returncode}:\n{self.output()}")
            return port_open(port)
        wait_for(ready, timeout, f"port {port} to serve")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def workers(self) -> list[int]:
        return [p for p in children_of(self.pid) if "worker" in title(p)]

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Kill what this test started: the master's process group and any extra ones."""
        pgids = set(self.extra_pgids)
        if self.proc is not None:
            pgids.add(self.proc.pid)
        for pgid in pgids:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.proc is not None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        if hasattr(self, "_log"):
            self._log.close()
