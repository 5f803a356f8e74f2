"""The process room with real processes: titles, respawn, work stealing, signals, daemon mode."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.process.apps import SERVER_APP
from tests.support import (ROOT, alive, children_of, free_port, get, port_open, title,
                           wait_for)


def _app(tmp_path, port: int, **env: str):
    (tmp_path / "pidapp.py").write_text(SERVER_APP)
    conf = tmp_path / "server.yaml"
    conf.write_text(f"pid_file: {tmp_path}/p.pid\nupgrade_sock: {tmp_path}/u.sock\n"
                    f"grace_period_seconds: 20\nerror_log: {tmp_path}/error.log\n")
    full_env = dict(os.environ, PORT=str(port), SLOW_MARK=str(tmp_path / "slow.mark"),
                    PYTHONPATH=f"{ROOT}:{tmp_path}", PYTHONUNBUFFERED="1", **env)
    return conf, full_env


class App:
    """pidapp.py run as a master in its own session."""

    def __init__(self, tmp_path, **env: str) -> None:
        self.port = free_port()
        self.tmp = tmp_path
        self.conf, self.env = _app(tmp_path, self.port, **env)
        self.out = open(tmp_path / "stdout.log", "ab")
        self.proc = subprocess.Popen([sys.executable, str(tmp_path / "pidapp.py"), "-c",
                                      str(self.conf)], env=self.env, stdout=self.out,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def serving(self) -> "App":
        wait_for(lambda: self.proc.poll() is None and len(self.workers()) ==
                 int(self.env.get("THREADS", "2")) and port_open(self.port), 20,
                 f"master + workers ({self.log()})")
        return self

    def workers(self) -> list[int]:
        return [p for p in children_of(self.proc.pid) if "pyngora: worker" in title(p)]

    def log(self) -> str:
        p = self.tmp / "error.log"
        return p.read_text() if p.exists() else ""

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self.out.close()


@pytest.fixture
def app_factory(tmp_path):
    apps: list[App] = []

    def make(**env: str) -> App:
        a = App(tmp_path, **env)
        apps.append(a)
        return a
    yield make
    for a in apps:
        a.close()


def test_titles_master_workers_background(app_factory) -> None:
    app = app_factory(THREADS="3", BG="1").serving()
    assert title(app.proc.pid).startswith("pyngora: master -c ")
    assert sorted(title(p) for p in app.workers()) == [
        "pyngora: worker web/0", "pyngora: worker web/1", "pyngora: worker web/2"]
    # a child takes its title right after fork: wait for it rather than race it
    assert wait_for(lambda: [title(p) for p in children_of(app.proc.pid)
                             if "background" in title(p)], 10, "the background title") == [
        "pyngora: background sleeper"]


def test_a_background_service_stopped_alone_by_sigterm_is_restarted(app_factory) -> None:
    """A background service that returns because it was asked to stop (SIGTERM to its own
    process) is restarted: only a start that returns on its own has finished its work."""
    app = app_factory(THREADS="1", BG="1").serving()

    def sleeper() -> list[int]:
        return [p for p in children_of(app.proc.pid) if title(p) == "pyngora: background sleeper"]

    (victim,) = wait_for(sleeper, 10, "the background process")
    os.kill(victim, signal.SIGTERM)
    wait_for(lambda: not alive(victim), 10, "the background process to stop")
    (new,) = wait_for(sleeper, 10, "its replacement")
    assert new != victim


def test_a_dependency_never_ready_is_named_in_the_log(app_factory) -> None:
    """Clients queue on the listener the master holds while a service waits for its
    dependency: the error log says which service waits for which, and keeps saying it."""
    app = app_factory(THREADS="1", NEVER_READY_DEP="1", PYNGORA_WAIT_WARN_SECONDS="0.5")
    line = "wait for their dependencies to be ready"
    wait_for(lambda: app.log().count(line) >= 2, 20, "the waiting service named twice")
    assert "web (for stuck)" in app.log() and app.workers() == []


def test_killed_worker_is_replaced_and_queued_connection_answered(app_factory) -> None:
    app = app_factory(THREADS="1").serving()
    (victim,) = app.workers()
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: not alive(victim), 5, "the worker to die")
    # The master still holds the listening socket: this connection waits in its queue.
    s = socket.create_connection(("127.0.0.1", app.port), timeout=10)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    started = time.monotonic()
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    assert data.startswith(b"HTTP/1.1 200"), data
    (new,) = wait_for(app.workers, 5, "a replacement worker")
    assert new != victim and data.endswith(str(new).encode())
    assert time.monotonic() - started < 5  # the replacement took over well within the back-off cap


@pytest.mark.parametrize("stealing", ["1", "0"])
def test_every_worker_serves(app_factory, stealing: str) -> None:
    app = app_factory(THREADS="2", WORK_STEALING=stealing).serving()
    workers = set(app.workers())

    def one(_: int) -> int:
        status, headers, _body = get(app.port, "/busy", headers={"Connection": "close"})
        assert status == 200
        return int(headers["x-pid"])

    with ThreadPoolExecutor(16) as pool:
        pids = list(pool.map(one, range(120)))
    counts = {p: pids.count(p) for p in workers}
    print(f"work_stealing={stealing} distribution: {counts}")
    assert set(pids) == workers, counts


def _listening_inode(port: int) -> str:
    """The socket inode of the TCP socket listening on 127.0.0.1:``port`` (/proc/net/tcp)."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            cols = line.split()
            if cols[1] == want and cols[3] == "0A":  # 0A: LISTEN
                return f"socket:[{cols[9]}]"
    raise AssertionError(f"nothing listens on port {port}")


def _socket_links(pid: int) -> dict[str, int]:
    """{'socket:[inode]': how many of ``pid``'s descriptors point at it}."""
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:  # a connection (the readiness probe's) closing meanwhile
            pass
    return {link: links.count(link) for link in links if link.startswith("socket:")}


def test_pinned_workers_have_their_own_sockets(app_factory) -> None:
    app = app_factory(THREADS="2", WORK_STEALING="0").serving()
    a, b = (set(_socket_links(p)) for p in app.workers())
    assert a and b and not (a & b), (a, b)


@pytest.mark.parametrize("stealing", ["1", "0"])
def test_idle_workers_listen_through_one_handle(app_factory, stealing: str) -> None:
    """server/accepting.py: an idle worker polls each listening socket through one server
    handle (extra ones would each waste an accept() per new connection), and keeps one more
    descriptor of it for the drain; under churn it adds handles (tests/protocol/
    test_accepting.py)."""
    app = app_factory(THREADS="2", WORK_STEALING=stealing).serving()
    shared = _listening_inode(app.port) if stealing == "1" else None
    workers = app.workers()
    assert len(workers) == 2

    def handles_of(pid: int) -> list[int]:
        counts = _socket_links(pid)
        if shared is not None:
            return [counts.get(shared, 0)]
        return [n for n in counts.values() if n > 1]  # pinned: its own SO_REUSEPORT socket

    for pid in workers:  # the port answers once one worker is ready; the other may still boot
        wait_for(lambda: handles_of(pid) == [2], 10, f"worker {pid} to listen through 1 handle")
    assert get(app.port, "/")[0] == 200


def test_sigterm_finishes_inflight_request_then_exits(app_factory) -> None:
    app = app_factory(THREADS="1", SLOW="1.5").serving()
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(r=get(app.port, "/slow")))
    t.start()
    wait_for(lambda: (app.tmp / "slow.mark").exists(), 10, "the slow request to start")
    app.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: not port_open(app.port), 10, "the listener to close")
    t.join(20)
    status, _, body = result["r"]
    assert (status, body) == (200, b"slow done")
    assert app.proc.wait(20) == 0
    assert not (app.tmp / "p.pid").exists()


def test_sigint_stops_at_once(app_factory) -> None:
    app = app_factory(THREADS="2", SLOW="60").serving()
    errors: list = []

    def slow() -> None:
        try:
            get(app.port, "/slow", timeout=30)
        except Exception as e:  # the fast stop cuts it: that is the point
            errors.append(e)
    t = threading.Thread(target=slow)
    t.start()
    wait_for(lambda: (app.tmp / "slow.mark").exists(), 10, "the slow request to start")
    app.proc.send_signal(signal.SIGINT)
    assert app.proc.wait(15) == 0
    t.join(15)
    assert errors, "the in-flight request should have been cut by the fast stop"
    assert not app.workers()


def test_sigusr1_reopens_error_log(app_factory) -> None:
    app = app_factory(THREADS="1").serving()
    log = app.tmp / "error.log"
    rotated = app.tmp / "error.log.1"
    log.rename(rotated)
    app.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: log.exists() and "reopened" in log.read_text(), 10, "a new error.log")


def test_boot_failing_service_exits_3(app_factory) -> None:
    app = app_factory(THREADS="1", FAIL_BG="1")
    assert app.proc.wait(30) == 3
    text = app.log()
    assert "pyngora: background doomed" in text and "times in a row" in text, text
    assert "this background task cannot boot" in text


def _yaml_static(tmp_path, port: int, extra: str = "") -> str:
    return (f"pid_file: {tmp_path}/y.pid\nupgrade_sock: {tmp_path}/yu.sock\n"
            f"error_log: {tmp_path}/y.log\n{extra}"
            f"services:\n  - name: origin\n    type: static\n"
            f"    listeners: ['127.0.0.1:{port}']\n    body: hello\n")


def test_taken_port_fails_clearly(tmp_path, pyngora_factory) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        p = pyngora_factory(_yaml_static(tmp_path, port)).start()
        assert p.wait_exit(20) == 1
        why = f"cannot listen on 127.0.0.1:{port} for service 'origin': address already in use"
        assert why in (tmp_path / "y.log").read_text()
        # in the foreground the operator's terminal says it too, not only error_log
        assert why in p.output() and "y.log" in p.output(), p.output()
    finally:
        holder.close()


def test_daemon_mode_pid_file(tmp_path, pyngora_factory) -> None:
    port = free_port()
    p = pyngora_factory(_yaml_static(tmp_path, port))
    r = p.run("-d")
    assert r.returncode == 0, r.stderr
    pid = int((tmp_path / "y.pid").read_text())
    p.extra_pgids.add(os.getpgid(pid))
    # the launcher returned only once the master serves: no waiting needed
    assert get(port)[0] == 200
    assert title(pid).startswith("pyngora: master")
    again = p.run("-d")
    assert again.returncode == 1 and f"already runs as pid {pid}" in again.stderr
    assert p.run("-s", "stop").returncode == 0
    wait_for(lambda: not alive(pid), 20, "the daemon to stop")
    assert not (tmp_path / "y.pid").exists()


def test_daemon_launcher_reports_failure(tmp_path, pyngora_factory) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        p = pyngora_factory(_yaml_static(tmp_path, holder.getsockname()[1]))
        r = p.run("-d")
        assert r.returncode == 1 and "address already in use" in r.stderr
    finally:
        holder.close()


def test_workers_exit_when_master_dies(app_factory) -> None:
    app = app_factory(THREADS="2").serving()
    workers = app.workers()
    os.kill(app.proc.pid, signal.SIGKILL)
    app.proc.wait(5)
    for w in workers:
        wait_for(lambda: not alive(w), 10, f"worker {w} to exit")


def test_unix_listener_stale_path_and_mode(tmp_path, pyngora_factory) -> None:
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # leaves a socket file nobody listens on, as after a crash
    conf = (f"pid_file: {tmp_path}/u.pid\nupgrade_sock: {tmp_path}/uu.sock\n"
            f"services:\n  - name: origin\n    type: static\n"
            f"    listeners: [{{address: 'unix:{path}', mode: '0600'}}]\n    body: over unix\n")
    p = pyngora_factory(conf).start()

    def answer() -> bytes:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(path))
        except OSError:
            return b""
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        s.close()
        return data
    data = wait_for(answer, 20, "the unix listener")
    assert data.endswith(b"over unix")
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    p.signal(signal.SIGTERM)
    assert p.wait_exit(20) == 0
    assert not path.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_workers_drop_to_user_and_group(tmp_path, pyngora_factory) -> None:
    # Run from a copy of the package in the test's own directory, which only root may read
    # (pytest makes it 0700): a module a worker imported after dropping to nobody fails here,
    # wherever the checkout lives.
    shutil.copytree(ROOT / "pyngora", tmp_path / "pyngora",
                    ignore=shutil.ignore_patterns("__pycache__"))
    os.chmod(tmp_path, 0o700)
    port, proxy_port = free_port(), free_port()
    wd = tmp_path / "wd"
    wd.mkdir()
    p = pyngora_factory(_yaml_static(tmp_path, port, f"user: nobody\ngroup: nogroup\n"
                                     f"working_directory: {wd}\n")
                        + f"  - name: proxy\n    type: http_proxy\n"
                          f"    listeners: ['127.0.0.1:{proxy_port}']\n"
                          f"    upstreams: [{{name: o, backends: [{{addr: '127.0.0.1:{port}'}}]}}]\n"
                        ).start()
    p.wait_serving(port)
    p.wait_serving(proxy_port)
    assert get(port)[0] == 200
    for _ in range(3):  # a dial, then the fast path on the pooled connection
        assert get(proxy_port)[0] == 200
    assert "failed to boot" not in (tmp_path / "y.log").read_text()
    workers = wait_for(lambda: len(p.workers()) == 2 and p.workers(), 10, "the workers")
    import grp
    import pwd
    for worker in workers:
        status = open(f"/proc/{worker}/status").read()
        uid_line = next(l for l in status.splitlines() if l.startswith("Uid:"))
        gid_line = next(l for l in status.splitlines() if l.startswith("Gid:"))
        assert uid_line.split()[1:] == [str(pwd.getpwnam("nobody").pw_uid)] * 4
        assert gid_line.split()[1] == str(grp.getgrnam("nogroup").gr_gid)
    assert os.readlink(f"/proc/{p.pid}/cwd") == str(wd)
    # the master keeps its rights (it rebinds on reload and owns the pid file)
    assert open(f"/proc/{p.pid}/status").read().count("Uid:\t0\t0\t0\t0") == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_workers_that_dropped_root_follow_a_log_rotation(tmp_path, pyngora_factory) -> None:
    """logrotate renames the logs and sends SIGUSR1 (``-s reopen``): the master creates the
    new files and gives them to ``user``, as nginx does, so the workers move to them. They
    used to keep writing to the rotated files (their reopen was refused: the new error log
    was root's, and the log directory, like /var/log/nginx, is writable by root only)."""
    import pwd
    logs = Path(tempfile.mkdtemp(prefix="pyngora-logs-"))  # 0700 tmp_path: nobody can't enter
    try:
        os.chmod(logs, 0o755)
        origin, port = free_port(), free_port()  # the access log is the proxy's
        p = pyngora_factory(
            f"pid_file: {tmp_path}/y.pid\nupgrade_sock: {tmp_path}/yu.sock\n"
            f"error_log: {logs}/error.log\naccess_log: {logs}/access.log\n"
            f"user: nobody\ngroup: nogroup\nthreads: 1\n"
            f"services:\n  - name: origin\n    type: static\n"
            f"    listeners: ['127.0.0.1:{origin}']\n    body: hello\n"
            f"  - name: proxy\n    type: http_proxy\n    listeners: ['127.0.0.1:{port}']\n"
            f"    upstreams: [{{name: o, backends: [{{addr: '127.0.0.1:{origin}'}}]}}]\n").start()
        p.wait_serving(port)
        assert get(port, "/before")[0] == 200
        wait_for(lambda: b"/before" in (logs / "access.log").read_bytes(), 10, "the access line")
        (logs / "access.log").rename(logs / "access.log.1")
        (logs / "error.log").rename(logs / "error.log.1")
        p.signal(signal.SIGUSR1)
        wait_for(lambda: b"logs reopened" in (logs / "error.log").read_bytes()
                 if (logs / "error.log").exists() else False, 10, "the master's new error log")
        nobody = pwd.getpwnam("nobody").pw_uid
        for name in ("error.log", "access.log"):
            assert (logs / name).stat().st_uid == nobody, name

        def moved() -> bool:  # the worker reopens when it gets the signal: ask until it did
            get(port, "/after")
            return b"/after" in (logs / "access.log").read_bytes()
        wait_for(moved, 10, "access lines in the new file")
        assert b"cannot reopen" not in (logs / "error.log.1").read_bytes()
    finally:
        shutil.rmtree(logs, ignore_errors=True)
