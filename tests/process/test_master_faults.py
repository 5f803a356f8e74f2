"""What an operator gets wrong must not take the server down: a reload whose workers cannot
start, a log directory gone at SIGUSR1, a reload whose new listener cannot be bound, a
relative -c with -d, a pinned service shrunk by a reload."""
from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.support import (ROOT, alive, children_of, free_port, get, kill_daemon, port_open,
                           title, wait_for)

BOOM = '''
class Boom:
    """Fails its first cycle, before it could say it is ready (a prober that cannot start)."""

    async def start_with_ready_notifier(self, shutdown, ready):
        raise RuntimeError("this app cannot start")


class LateBoom:
    """Says it is ready, then dies at once, every time."""

    async def start(self, shutdown):
        raise RuntimeError("this app dies after its start")


class OneShot:
    """A job that runs once and returns (each run leaves a line in runs.txt)."""

    async def start(self, shutdown):
        import os
        with open(os.path.join(os.path.dirname(__file__), "runs.txt"), "a") as f:
            f.write("ran\\n")
'''


def _static(port: int, extra_service: str = "", listeners: str = "", threads: int = 1,
            stealing: bool = True) -> str:
    more = f", {listeners}" if listeners else ""
    return (f"pid_file: p.pid\nupgrade_sock: u.sock\nerror_log: logs/error.log\n"
            f"metrics_dir: m\nthreads: {threads}\nwork_stealing: {str(stealing).lower()}\n"
            f"grace_period_seconds: 20\n"
            f"services:\n  - name: origin\n    type: static\n"
            f"    listeners: ['127.0.0.1:{port}'{more}]\n    body: hi\n{extra_service}")


class Daemon:
    """pyngora -d run from ``tmp`` with a RELATIVE -c path (paths in the file are relative)."""

    def __init__(self, tmp) -> None:
        self.tmp = tmp
        (tmp / "logs").mkdir()
        self.env = dict(os.environ, PYTHONPATH=f"{ROOT}:{tmp}")

    def write(self, text: str) -> None:
        (self.tmp / "c.yaml").write_text(text)

    def cmd(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pyngora", "-c", "c.yaml", *args],
                              cwd=self.tmp, env=self.env, capture_output=True, text=True,
                              timeout=60)

    @property
    def pid(self) -> int:
        return int((self.tmp / "p.pid").read_text())

    def log(self) -> str:
        logs = list((self.tmp).glob("logs*/error.log"))
        return "".join(p.read_text() for p in logs)

    def kill(self) -> None:
        kill_daemon(self.tmp / "p.pid")


def test_reload_whose_workers_cannot_start_keeps_the_old_generation(tmp_path) -> None:
    (tmp_path / "boomapp.py").write_text(BOOM)
    port = free_port()
    d = Daemon(tmp_path)
    d.write(_static(port))
    try:
        assert d.cmd("-d").returncode == 0
        master = d.pid
        workers = set(children_of(master))
        d.write(_static(port, "  - {name: bg, type: background, app: 'boomapp:Boom'}\n"))
        assert d.cmd("-t").returncode == 0  # it validates: only running it shows the problem
        assert d.cmd("-s", "reload").returncode == 0  # relative -c, daemon in /: still found
        wait_for(lambda: "reload failed" in d.log(), 30, "the failed reload in the log")
        assert alive(master) and get(port)[0] == 200
        assert workers <= set(children_of(master))
        d.write(_static(port))
        assert d.cmd("-s", "reload").returncode == 0  # a good reload still works afterwards
        wait_for(lambda: not (workers & set(children_of(master))), 30, "the next generation")
        assert get(port)[0] == 200
    finally:
        d.kill()


def test_sigusr1_with_the_log_directory_gone_keeps_serving(tmp_path) -> None:
    port = free_port()
    d = Daemon(tmp_path)
    d.write(_static(port))
    try:
        assert d.cmd("-d").returncode == 0
        master = d.pid
        (tmp_path / "logs").rename(tmp_path / "logs.old")
        assert d.cmd("-s", "reopen").returncode == 0
        (tmp_path / "logs").mkdir()  # the operator notices and fixes it
        assert d.cmd("-s", "reopen").returncode == 0
        wait_for(lambda: (tmp_path / "logs" / "error.log").exists(), 10, "the reopened log")
        assert alive(master) and get(port)[0] == 200
    finally:
        d.kill()


def test_sigusr1_while_workers_boot_kills_none(tmp_path) -> None:
    """logrotate's reopen may land during a reload, a respawn or the start: a booting worker
    (its loop's handler not installed yet) must not die of SIGUSR1's default action."""
    port = free_port()
    d = Daemon(tmp_path)
    d.write(_static(port, threads=2))
    try:
        assert d.cmd("-d").returncode == 0
        master = d.pid
        for _ in range(3):
            before = set(children_of(master))
            os.kill(master, signal.SIGHUP)
            for _ in range(40):  # every 10 ms across the new generation's boot
                os.kill(master, signal.SIGUSR1)
                subprocess.run(["sleep", "0.01"])
            wait_for(lambda: not (before & set(children_of(master))), 30, "the new generation")
        text = (tmp_path / "logs" / "error.log").read_text()
        assert f"exited with -{int(signal.SIGUSR1)}" not in text, text[-2000:]
        assert alive(master) and get(port)[0] == 200
    finally:
        d.kill()


def test_a_background_service_whose_start_returns_is_done_not_crashed(tmp_path) -> None:
    """Pingora calls a BackgroundService's start once: returning ends it. It used to be
    restarted as a crash, and 5 quick returns stopped the whole server with exit 3."""
    (tmp_path / "boomapp.py").write_text(BOOM)
    port = free_port()
    d = Daemon(tmp_path)
    d.write(_static(port, "  - {name: job, type: background, app: 'boomapp:OneShot'}\n"))
    runs = tmp_path / "runs.txt"
    try:
        assert d.cmd("-d").returncode == 0
        master = d.pid
        wait_for(lambda: "background job" in d.log() and "finished" in d.log(), 30,
                 "the job's end in the log")
        # A restart would come within 0.1 s (the first back-off); give it ten times that.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            assert runs.read_text() == "ran\n", runs.read_text()
            time.sleep(0.05)
        assert "restarting" not in d.log() and "retry" not in d.log(), d.log()[-2000:]
        assert alive(master) and get(port)[0] == 200
    finally:
        d.kill()


@pytest.mark.parametrize("daemon", [False, True])
def test_an_unwritable_pid_file_is_one_clear_line(tmp_path, daemon: bool) -> None:
    """Like a port in use: the reason in one line (the launcher prints it with -d), exit 1,
    no traceback."""
    port = free_port()
    d = Daemon(tmp_path)
    d.write(_static(port).replace("pid_file: p.pid", "pid_file: no-such-dir/p.pid"))
    r = d.cmd(*(["-d"] if daemon else []))
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "cannot write pid_file" in out and "No such file or directory" in out, out
    assert "Traceback" not in out, out
    assert not port_open(port)


def test_a_worker_near_its_descriptor_limit_stops_accepting_and_resets_nobody(tmp_path) -> None:
    """At EMFILE libuv accepts and closes every queued connection, also those another worker
    of the same queue could serve. A worker near its limit stops accepting instead: the other
    takes the queue, nobody is reset, and new clients are served."""
    port = free_port()
    d = Daemon(tmp_path)
    d.write(_static(port, threads=2))

    def low_limit() -> None:  # hard = soft: the master cannot raise it
        resource.setrlimit(resource.RLIMIT_NOFILE, (160, 160))

    r = subprocess.run([sys.executable, "-m", "pyngora", "-c", "c.yaml", "-d"], cwd=tmp_path,
                       env=d.env, capture_output=True, text=True, timeout=60,
                       preexec_fn=low_limit)
    held: list[socket.socket] = []
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        for _ in range(170):  # more than one worker can hold, fewer than both
            held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        for c in held:  # a request on each: a reset one would fail here
            c.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        for c in held:
            assert c.recv(4096).startswith(b"HTTP/1.1 200 "), "a held connection was reset"
        assert get(port)[0] == 200
    finally:
        for c in held:
            c.close()
        d.kill()


def test_reload_with_an_unbindable_listener_leaves_nothing_behind(tmp_path) -> None:
    port, extra = free_port(), free_port()
    holder = __import__("socket").socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    d = Daemon(tmp_path)
    d.write(_static(port))
    try:
        assert d.cmd("-d").returncode == 0
        d.write(_static(port, listeners=f"'127.0.0.1:{extra}', "
                                        f"'127.0.0.1:{holder.getsockname()[1]}'"))
        assert d.cmd("-s", "reload").returncode == 0
        wait_for(lambda: "reload refused" in d.log(), 20, "the refusal")
        assert not port_open(extra)  # bound by the refused attempt, then closed again
        assert get(port)[0] == 200
    finally:
        holder.close()
        d.kill()


def test_pinned_service_shrunk_by_reload_never_hangs_a_connection(tmp_path) -> None:
    port = free_port()
    d = Daemon(tmp_path)
    d.write(_static(port, threads=4, stealing=False))
    try:
        assert d.cmd("-d").returncode == 0
        master = d.pid
        old = set(children_of(master))
        d.write(_static(port, threads=1, stealing=False))
        assert d.cmd("-s", "reload").returncode == 0
        wait_for(lambda: len(set(children_of(master)) - old) == 1, 20, "the new worker")
        wait_for(lambda: not (set(children_of(master)) & old), 20, "the old workers to go")
        # the dropped SO_REUSEPORT slots are closed: no connection is hashed to a dead queue
        for _ in range(40):
            assert get(port, timeout=5)[0] == 200
    finally:
        d.kill()


def test_service_failing_after_a_served_reload_never_stops_the_others(tmp_path) -> None:
    (tmp_path / "boomapp.py").write_text(BOOM)
    port = free_port()
    d = Daemon(tmp_path)
    d.write(_static(port))
    try:
        assert d.cmd("-d").returncode == 0
        master = d.pid
        d.write(_static(port, "  - {name: bg, type: background, app: 'boomapp:LateBoom'}\n"))
        assert d.cmd("-s", "reload").returncode == 0
        # "retrying" once the new generation served; "reload failed" when the service died
        # before the master saw it ready (both in one pass of the master's loop, five times)
        wait_for(lambda: "retrying every 5 s" in d.log() or "reload failed" in d.log(), 30,
                 "the crash loop to be noticed")
        assert alive(master) and get(port)[0] == 200
    finally:
        d.kill()


def test_a_crash_loop_after_a_daemon_reported_serving_never_stops_the_others(tmp_path) -> None:
    """``-d`` exits 0 once the master serves: the launcher's caller (a script, an old master
    on upgrade) has acted on it, so a service that then crash-loops is retried every 5 s
    instead of exit 3 taking every other service down (SPEC 2 and 4: never an outage)."""
    (tmp_path / "boomapp.py").write_text(BOOM)
    port = free_port()
    d = Daemon(tmp_path)
    d.write(_static(port, "  - {name: bg, type: background, app: 'boomapp:LateBoom'}\n"))
    try:
        assert d.cmd("-d").returncode == 0
        master = d.pid
        wait_for(lambda: "retrying every 5 s" in d.log(), 30, "the crash loop to be noticed")
        assert alive(master) and get(port)[0] == 200
    finally:
        d.kill()


HANG = '''
import os, signal, time


class Hang:
    """Never says it is ready: its first cycle blocks the worker's loop for good (a prober
    stuck on a dead DNS server, say). It leaves the pids a test must see gone."""

    async def start_with_ready_notifier(self, shutdown, ready):
        with open(os.environ["HANG_PIDS"], "w") as f:
            f.write(f"{os.getpid()} {os.getppid()} {os.getpgrp()}")
        if os.environ.get("HANG_MASTER"):
            os.kill(os.getppid(), signal.SIGSTOP)  # the master itself hangs
        time.sleep(3600)
'''


@pytest.mark.parametrize("master_hangs", [False, True], ids=["service-hangs", "master-hangs"])
def test_daemon_launcher_gives_up_on_a_master_that_never_reports(tmp_path,
                                                                  master_hangs) -> None:
    """``pyngora -d`` waits PYNGORA_START_TIMEOUT (60 s by default), then stops the master
    (SIGINT; SIGKILL to its process group when that is not enough) and exits 1: no orphan."""
    (tmp_path / "hangapp.py").write_text(HANG)
    port = free_port()
    d = Daemon(tmp_path)
    d.env["PYNGORA_START_TIMEOUT"] = "3"
    d.env["HANG_PIDS"] = str(tmp_path / "hang.pids")
    if master_hangs:
        d.env["HANG_MASTER"] = "1"
    d.write("graceful_shutdown_timeout_seconds: 1\n" + _static(
        port, "  - {name: bg, type: background, app: 'hangapp:Hang'}\n"))
    pids: list[int] = []
    try:
        out = d.cmd("-d")
        pids = [int(x) for x in (tmp_path / "hang.pids").read_text().split()]
        assert out.returncode == 1, out
        assert "did not report ready within 3s" in out.stderr, out.stderr
        bg, master, _group = pids
        wait_for(lambda: not alive(master) and not alive(bg), 10, "the daemon to be gone")
        # SIGKILL to the group is delivered to each process on its own: the HTTP workers may
        # still be dying when the master and the service are gone, but none may outlive them
        wait_for(lambda: not port_open(port), 10, "every listener of the daemon to close")
        if not master_hangs:  # it stopped itself cleanly
            assert not (tmp_path / "p.pid").exists()
    finally:
        # only what this test started and is still pyngora (p.pid may name a dead master)
        for pid in pids[:2]:
            if alive(pid) and title(pid).startswith("pyngora"):
                os.kill(pid, signal.SIGKILL)


def test_reopen_moves_stdout_too_when_daemon_mode_pointed_it_at_the_error_log(tmp_path) -> None:
    """``-d`` points stdout (``access_log: stdout``) and stderr at ``error_log``; after a
    logrotate-style move, SIGUSR1 must move both, or access lines go on into the rotated file."""
    origin, port = free_port(), free_port()
    d = Daemon(tmp_path)
    d.write("access_log: stdout\n" + _static(origin, (
        f"  - {{name: p, type: http_proxy, listeners: ['127.0.0.1:{port}'], "
        f"upstreams: [{{name: o, backends: [{{addr: '127.0.0.1:{origin}'}}]}}]}}\n")))
    log = tmp_path / "logs" / "error.log"
    try:
        assert d.cmd("-d").returncode == 0
        assert get(port, "/before")[0] == 200
        wait_for(lambda: "GET /before " in log.read_text(), 10, "the first access line")
        log.rename(tmp_path / "logs" / "error.log.1")
        assert d.cmd("-s", "reopen").returncode == 0
        wait_for(lambda: log.exists() and log.read_text().count("reopened") >= 1, 10,
                 "the new error log")
        wait_for(lambda: get(port, "/after")[0] == 200 and "GET /after " in log.read_text(),
                 10, "the access line in the new file")
        assert "GET /after " not in (tmp_path / "logs" / "error.log.1").read_text()
    finally:
        d.kill()


def test_a_unix_listener_removed_by_reload_leaves_no_socket_file(tmp_path) -> None:
    port = free_port()
    d = Daemon(tmp_path)
    sock = tmp_path / "gone.sock"
    d.write(_static(port, listeners=f"'unix:{sock}'"))
    try:
        assert d.cmd("-d").returncode == 0
        assert sock.exists()
        d.write(_static(port))
        assert d.cmd("-s", "reload").returncode == 0
        wait_for(lambda: not sock.exists(), 20, "the removed listener's socket file to go")
        assert get(port)[0] == 200
    finally:
        d.kill()
