"""Harness self-check: a tiny stand-in for the ``pyngora`` command.

NOT the product. It speaks just enough of SPEC sections 2-4 (``-c FILE [-d]
[-u] [-t]``, ``-s upgrade|stop|...``, hand-over of listening sockets over
``upgrade_sock``, socket activation, sd_notify through pyngora.server.systemd)
to prove that tests/systemd (the nspawn harness and its scenario) and the unit
files in systemd/ are right, independently of the real server. Run it with
``PYNGORA_E2E_STANDIN=1 pytest tests/process/test_systemd_e2e.py``.

One process per master (threads, no workers); ``static`` services answer
their body, ``http_proxy`` services forward GET to their first backend.
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from typing import Any

import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from pyngora.server import systemd  # noqa: E402  (the module under test)

SIGNALS = {"reload": signal.SIGHUP, "stop": signal.SIGTERM, "quit": signal.SIGQUIT,
           "fast-stop": signal.SIGINT, "reopen": signal.SIGUSR1}


def log(msg: str) -> None:
    """stderr: the journal in the foreground, error_log once daemonized."""
    print(f"standin[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)


SERVER_KEYS = {  # SPEC section 5; anything else is an error, as in pyngora
    "version", "daemon", "error_log", "pid_file", "upgrade_sock", "user", "group", "working_directory",
    "threads", "work_stealing", "ca_file", "grace_period_seconds", "graceful_shutdown_timeout_seconds",
    "upstream_keepalive_pool_size", "max_retries", "upgrade_timeout_seconds", "access_log",
    "access_log_format", "log_level", "metrics_dir", "services",
}


def load(path: str) -> dict[str, Any]:
    """The YAML config with SPEC defaults for the keys the stand-in uses;
    SystemExit(1) on an unknown server key."""
    with open(path) as f:
        conf = yaml.safe_load(f) or {}
    unknown = sorted(k for k in conf if k not in SERVER_KEYS and not str(k).startswith("x-"))
    if unknown:
        print(f"{path}: unknown keys {unknown}", file=sys.stderr)
        raise SystemExit(1)
    conf.setdefault("pid_file", "/tmp/pyngora.pid")
    conf.setdefault("upgrade_sock", "/tmp/pyngora_upgrade.sock")
    conf.setdefault("upgrade_timeout_seconds", 30)
    conf.setdefault("services", [])
    return conf


def parse_addr(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def make_handler(svc: dict[str, Any]) -> type[http.server.BaseHTTPRequestHandler]:
    """A request handler class for one configured service."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802
            if svc.get("type") == "http_proxy":
                host, port = parse_addr(svc["upstreams"][0]["backends"][0]["addr"])
                conn = http.client.HTTPConnection(host, port, timeout=60)
                conn.request("GET", self.path)
                resp = conn.getresponse()
                status, body = resp.status, resp.read()
                conn.close()
            else:
                status, body = int(svc.get("status", 200)), str(svc.get("body", "")).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args: object) -> None:
            pass

    return Handler


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = False  # server_close() joins in-flight requests: the drain
    block_on_close = True


class Master:
    """Listeners by key ``service/address/0``, one HTTP server thread each."""

    def __init__(self, conf: dict[str, Any]) -> None:
        self.conf = conf
        self.sockets: dict[str, socket.socket] = {}
        self.servers: list[Server] = []
        self.quit = threading.Event()
        self.draining = False

    def keys(self) -> list[tuple[str, dict[str, Any], str]]:
        out = []
        for s in self.conf["services"]:
            for lst in s.get("listeners", []):
                address = lst if isinstance(lst, str) else lst["address"]
                out.append((f"{s['name']}/{address}/0", s, address))
        return out

    def bind(self, adopted: dict[str, socket.socket]) -> None:
        """Adopt passed sockets (upgrade / LISTEN_FDS), bind the rest."""
        for key, _svc, address in self.keys():
            sock = adopted.pop(key, None)
            if sock is None:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(parse_addr(address))
                sock.listen(1024)
            # Old and new master accept on the same socket during an upgrade: a
            # blocking accept() that loses the race would hang for good.
            sock.setblocking(False)
            self.sockets[key] = sock

    def serve(self) -> None:
        for key, svc, address in self.keys():
            srv = Server(parse_addr(address), make_handler(svc), bind_and_activate=False)
            srv.socket.close()
            srv.socket = self.sockets[key]
            self.servers.append(srv)
            threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def drain(self) -> None:
        """Stop accepting, let in-flight requests finish."""
        for srv in self.servers:
            srv.shutdown()
        for srv in self.servers:
            srv.server_close()


def listen_fds() -> dict[str, socket.socket]:
    """Sockets passed by systemd, keyed like our own, matched by address."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return {}
    n = int(os.environ.get("LISTEN_FDS", "0"))
    out = {}
    for fd in range(3, 3 + n):
        sock = socket.socket(fileno=fd)
        host, port = sock.getsockname()[:2]
        out[f"{host}:{port}"] = sock
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    return out


def receive_upgrade(conf: dict[str, Any], on_listening: Any) -> tuple[socket.socket, dict[str, socket.socket]]:
    """Bind upgrade_sock, wait for the old master, take its sockets."""
    path = conf["upgrade_sock"]
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    os.chmod(path, 0o600)
    lsock.listen(1)
    lsock.settimeout(conf["upgrade_timeout_seconds"])
    on_listening()
    conn, _ = lsock.accept()
    lsock.close()
    conn.settimeout(conf["upgrade_timeout_seconds"])
    msg, fds, _flags, _addr = socket.recv_fds(conn, 65536, 256)
    keys = json.loads(msg)
    return conn, {k: socket.socket(fileno=fd) for k, fd in zip(keys, fds)}


def send_upgrade(master: Master) -> bool:
    """SIGQUIT side: hand every socket to the new master, True once it is ready."""
    conf = master.conf
    deadline = time.monotonic() + conf["upgrade_timeout_seconds"]
    while True:
        try:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(conf["upgrade_sock"])
            break
        except OSError as exc:
            conn.close()
            if time.monotonic() > deadline:
                log(f"upgrade failed, keep serving: {exc}")
                return False
            time.sleep(0.1)
    keys = list(master.sockets)
    socket.send_fds(conn, [json.dumps(keys).encode()], [master.sockets[k].fileno() for k in keys])
    conn.settimeout(conf["upgrade_timeout_seconds"])
    try:
        ok = conn.recv(16) == b"ready"
    except OSError:
        ok = False
    conn.close()
    return ok


def write_pid(path: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(f"{os.getpid()}\n")
    os.rename(path + ".tmp", path)


def run_master(conf: dict[str, Any], upgrade: bool, notify_parent: Any) -> int:
    """The master: bind or adopt, serve, notify, then wait for a signal."""
    master = Master(conf)
    # Signals are blocked (in every thread, which inherit the mask) and taken
    # with sigtimedwait below: no handler, so nothing can deadlock on a lock
    # that the interrupted code holds.
    sigs = {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1}
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    conn = None
    if upgrade:
        conn, adopted = receive_upgrade(conf, lambda: notify_parent(True))
    else:
        passed = listen_fds()
        adopted = {k: passed.pop(a) for k, _s, a in master.keys() if a in passed}
    master.bind(adopted)
    master.serve()
    if upgrade:
        systemd.mainpid(status="stand-in serving (upgraded)")  # re-parented already (-d)
        write_pid(conf["pid_file"])
        assert conn is not None
        conn.sendall(b"ready")
        conn.close()
    else:
        write_pid(conf["pid_file"])
        systemd.ready("stand-in serving")
        notify_parent(True)
    while True:
        info = signal.sigtimedwait(sigs, 1.0)
        if info is not None:
            sig = info.si_signo
            if sig in (signal.SIGTERM, signal.SIGINT):
                systemd.stopping()
                master.drain()
                return 0
            if sig == signal.SIGQUIT and send_upgrade(master):
                log("handed over, draining")  # no sd_notify from an old master
                master.drain()
                return 0
            if sig == signal.SIGHUP:
                systemd.reloading()
                systemd.ready("stand-in serving (reloaded)")


def daemonize(body: Any) -> int:
    """Double fork; the launcher returns 0 once ``body`` reports success."""
    r, w = os.pipe()
    if os.fork() == 0:
        os.close(r)
        os.setsid()
        parent = os.getpid()
        if os.fork() != 0:
            os._exit(0)
        # Wait to be re-parented (to PID 1 under systemd) before any MAINPID=.
        for _ in range(500):
            if os.getppid() != parent:
                break
            time.sleep(0.01)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)

        def report(ok: bool) -> None:
            os.write(w, b"1" if ok else b"0")

        code = 1
        try:
            code = body(report)
        finally:
            os._exit(code)
    os.close(w)
    os.wait()
    return 0 if os.read(r, 1) == b"1" else 1


def signal_master(conf: dict[str, Any], name: str) -> int:
    """``-s NAME``: talk to the master named by pid_file."""
    with open(conf["pid_file"]) as f:
        old = int(f.read().strip())
    if name != "upgrade":
        os.kill(old, SIGNALS[name])
        return 0
    args = [sys.executable, os.path.abspath(__file__), "-c", CONF_PATH, "-u", "-d"]
    pid = os.fork()
    if pid == 0:
        os.execv(args[0], args)
    if os.waitpid(pid, 0)[1] != 0:
        log("new master did not start")
        return 1
    os.kill(old, signal.SIGQUIT)
    deadline = time.monotonic() + conf["upgrade_timeout_seconds"] + 5
    while time.monotonic() < deadline:
        try:
            with open(conf["pid_file"]) as f:
                new = int(f.read().strip() or 0)
        except (OSError, ValueError):
            new = 0
        if new and new != old:
            return 0
        time.sleep(0.05)
    log("new master did not take over")
    return 1


CONF_PATH = ""


def main() -> int:
    global CONF_PATH
    ap = argparse.ArgumentParser(prog="pyngora")
    ap.add_argument("-c", "--conf", required=True)
    ap.add_argument("-d", "--daemon", action="store_true")
    ap.add_argument("-u", "--upgrade", action="store_true")
    ap.add_argument("-t", "--test", action="store_true")
    ap.add_argument("-s", dest="signal", choices=["upgrade", *SIGNALS])
    a = ap.parse_args()
    CONF_PATH = os.path.abspath(a.conf)
    conf = load(CONF_PATH)
    if a.test:
        print(f"configuration {a.conf} is ok")
        return 0
    if a.signal:
        return signal_master(conf, a.signal)

    def body(report: Any) -> int:
        if a.daemon and conf.get("error_log"):
            fd = os.open(conf["error_log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
        return run_master(conf, a.upgrade, report)

    if a.daemon:
        return daemonize(body)
    return body(lambda ok: None)


if __name__ == "__main__":
    sys.exit(main())
