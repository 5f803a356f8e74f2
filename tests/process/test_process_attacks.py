"""An operator's bad day, with real processes and signals: a second master on the same ports,
a reload that switches work_stealing, a stop sent in the middle of an upgrade, a stranger on
upgrade_sock, a pid file directory that vanishes during an upgrade, a signal storm. Each test
failed before the fix it covers (see the README's "Attack reviews")."""
from __future__ import annotations

import array
import json
import os
import shutil
import signal
import socket
import struct
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from pyngora.upgrade.transfer_fd import MAGIC, TransferError, UpgradeListener
from tests.support import Pyngora, alive, children_of, free_port, get, port_open, title, wait_for


def _conf(tmp: Path, port: int, *, name: str = "a", threads: int = 2, stealing: bool = True,
          more: str = "", upgrade_timeout: float = 10, pid_dir: str = "") -> str:
    """A static origin on ``port`` (and the listeners in ``more``), with files named ``name``."""
    return (f"pid_file: {pid_dir or tmp}/{name}.pid\nupgrade_sock: {tmp}/{name}.sock\n"
            f"error_log: {tmp}/{name}.log\nmetrics_dir: {tmp}/{name}-m\n"
            f"grace_period_seconds: 5\ngraceful_shutdown_timeout_seconds: 1\n"
            f"upgrade_timeout_seconds: {upgrade_timeout}\n"
            f"threads: {threads}\nwork_stealing: {str(stealing).lower()}\n"
            f"services:\n  - name: origin\n    type: static\n"
            f"    listeners: ['127.0.0.1:{port}'{more}]\n    body: hi\n")


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Pyngora]]:
    """``start(text, *args, name=)``: a master in its own session; every one killed at the end."""
    made: list[Pyngora] = []

    def make(text: str, *args: str, name: str = "a.yaml") -> Pyngora:
        p = Pyngora(tmp_path, text, args, name=name)
        made.append(p)
        return p.start()
    yield make
    for p in made:
        p.stop()


def _log(tmp: Path, name: str = "a") -> str:
    path = tmp / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def _workers(pid: int) -> list[int]:
    return [c for c in children_of(pid) if title(c).startswith("pyngora: worker")]


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _serving(p: Pyngora, port: int, workers: int, log: Path | None = None) -> None:
    """Wait until ``p`` has ``workers`` workers and says it serves (every one accepts) in
    ``log`` (by default the error_log _conf names after the file: a.yaml logs to a.log)."""
    p.wait_serving(port)
    wait_for(lambda: len(_workers(p.pid)) == workers, 10, f"{workers} workers")
    log = log or p.conf_path.with_name(p.conf_path.stem + ".log")
    wait_for(lambda: log.exists() and f"serving: {workers} processes, pid {p.pid}"
             in log.read_text(errors="replace"), 20, "the master's 'serving' line")


def _unix_get(path: str) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        return data


# --------------------------------------------------------------------------- listeners


def test_a_second_pinned_master_on_the_same_port_is_refused(tmp_path, start) -> None:
    """Two pinned (SO_REUSEPORT) masters of one user on one port: the kernel let the second
    join the first one's group, and it silently took half of the connections."""
    port = free_port()
    first = start(_conf(tmp_path, port, stealing=False))
    _serving(first, port, 2)
    second = start(_conf(tmp_path, port, name="b", stealing=False), name="b.yaml")
    assert second.wait_exit(20) == 1
    assert "address already in use" in _log(tmp_path, "b")
    assert alive(first.pid) and get(port)[0] == 200


def test_a_pinned_reload_may_respell_or_widen_its_address(tmp_path, start) -> None:
    """(A review's finding on the check above.) A pinned reload from 127.0.0.1:P to
    localhost:P or 0.0.0.0:P was refused as "address already in use (another process
    listens on it)": the probe bind met this master's own socket. It serves again."""
    port = free_port()
    conf = tmp_path / "a.yaml"
    p = start(_conf(tmp_path, port, stealing=False))
    _serving(p, port, 2)
    for gen, host in enumerate(["localhost", "0.0.0.0"], start=2):
        conf.write_text(_conf(tmp_path, port, stealing=False).replace(
            f"'127.0.0.1:{port}'", f"'{host}:{port}'"))
        p.signal(signal.SIGHUP)
        wait_for(lambda: f"generation {gen} serves" in _log(tmp_path)
                 or "reload refused" in _log(tmp_path), 15, f"generation {gen} ({host})")
        assert "reload refused" not in _log(tmp_path), _log(tmp_path)
        assert get(port)[0] == 200


def test_reload_switches_work_stealing_both_ways(tmp_path, start) -> None:
    """Shared and pinned sockets of one address cannot be bound side by side: such a reload
    was refused with "address already in use". Now the new mode takes one socket over, binds
    the rest, and the master holds as many descriptors as before."""
    port = free_port()
    conf = tmp_path / "a.yaml"
    p = start(_conf(tmp_path, port, stealing=False))
    _serving(p, port, 2)
    before = _fds(p.pid)
    for gen, (threads, stealing) in enumerate([(3, True), (3, False), (1, True), (2, False)],
                                              start=2):
        conf.write_text(_conf(tmp_path, port, threads=threads, stealing=stealing))
        p.signal(signal.SIGHUP)
        wait_for(lambda: f"generation {gen} serves" in _log(tmp_path), 15,
                 f"generation {gen} ({threads} threads, work_stealing {stealing})")
        assert "reload refused" not in _log(tmp_path)
        wait_for(lambda: len(_workers(p.pid)) == threads, 15, "the old generation gone")
        assert get(port)[0] == 200
    wait_for(lambda: _fds(p.pid) == before, 5, "the master's descriptors back to the start")


def test_a_pinned_service_shares_its_unix_listener(tmp_path, start) -> None:
    """A Unix socket has no SO_REUSEPORT: a pinned service with 2 threads and a unix listener
    did not start ("another process is listening on it": its own slot 0)."""
    port = free_port()
    path = tmp_path / "s.sock"
    p = start(_conf(tmp_path, port, stealing=False, more=f", 'unix:{path}'"))
    _serving(p, port, 2)
    for _ in range(4):
        assert _unix_get(str(path)).startswith(b"HTTP/1.1 200")
    p.signal(signal.SIGTERM)
    assert p.wait_exit(20) == 0
    assert not path.exists()


# --------------------------------------------------------------------------- upgrades


def test_sigterm_stops_a_new_master_still_waiting_for_the_old_one(tmp_path, start) -> None:
    """A -u master waiting on upgrade_sock sat out upgrade_timeout_seconds (30 s by default)
    before it heard SIGTERM, then exited 1."""
    port = free_port()
    new = start(_conf(tmp_path, port, upgrade_timeout=30), "-u")
    wait_for(lambda: (tmp_path / "a.sock").exists(), 10, "upgrade_sock")
    sent = time.monotonic()
    new.signal(signal.SIGTERM)
    assert new.wait_exit(10) == 0
    assert time.monotonic() - sent < 5
    assert not (tmp_path / "a.sock").exists()
    assert "stopped while waiting for the old master" in _log(tmp_path), _log(tmp_path)


def hand_over_past(tmp_path, start, strangers: int, say: Callable[[list], None]) -> None:
    """An upgrade with ``strangers`` clients connected to the new master's upgrade_sock
    before the old master (``say`` sends what they send): the old master must still hand
    over within 8 s of its SIGQUIT, and the new one serve."""
    port = free_port()
    old = start(_conf(tmp_path, port, upgrade_timeout=10))
    _serving(old, port, 2)
    new = start(_conf(tmp_path, port, upgrade_timeout=10), "-u", name="b.yaml")
    sock_path = str(tmp_path / "a.sock")
    wait_for(lambda: os.path.exists(sock_path), 10, "upgrade_sock")
    peers = [socket.socket(socket.AF_UNIX) for _ in range(strangers)]
    try:
        for peer in peers:
            peer.connect(sock_path)
        say(peers)
        old.signal(signal.SIGQUIT)
        wait_for(lambda: "the new master is ready; draining" in _log(tmp_path), 8,
                 "the hand-over past the strangers")
        assert old.wait_exit(20) == 0
        assert alive(new.pid) and get(port)[0] == 200
    finally:
        for peer in peers:
            peer.close()


def test_strangers_on_upgrade_sock_do_not_hold_up_the_upgrade(tmp_path, start) -> None:
    """A client that connects to upgrade_sock and says nothing (or 2 bytes of garbage) held
    the new master until its deadline: the old master, queued behind it, kept serving and
    the upgrade failed."""
    hand_over_past(tmp_path, start, 2, lambda peers: peers[1].sendall(b"hi"))


def test_sigterm_during_a_hand_over_lets_the_new_master_take_over(tmp_path, start) -> None:
    """SIGQUIT then SIGTERM at once: the old master's workers drained before the hand-over
    ended and it exited mid-way; the new master, holding every socket, got no commit and
    gave up too: nobody served. Now the stop waits for the hand-over's outcome."""
    port = free_port()
    old = start(_conf(tmp_path, port))
    _serving(old, port, 2)
    new = start(_conf(tmp_path, port), "-u", name="b.yaml")
    wait_for(lambda: (tmp_path / "a.sock").exists(), 10, "upgrade_sock")
    old.signal(signal.SIGQUIT)
    old.signal(signal.SIGTERM)
    assert old.wait_exit(20) == 0
    assert "the new master is ready; draining" in _log(tmp_path)
    wait_for(lambda: port_open(port), 5, "the new master serving")
    assert alive(new.pid) and get(port)[0] == 200
    assert int((tmp_path / "a.pid").read_text()) == new.pid


def test_a_pid_file_directory_gone_never_takes_the_service_down(tmp_path, start) -> None:
    """The new master wrote pid_file after the old one had committed to drain, and died of
    the OSError when its directory was gone: an outage. Now a -u master that cannot write it
    refuses at its start (the old master keeps serving), and one that loses it later serves
    on without it."""
    port = free_port()
    run = tmp_path / "run"
    run.mkdir()
    text = _conf(tmp_path, port, threads=1, pid_dir=str(run))
    old = start(text)
    _serving(old, port, 1)
    shutil.rmtree(run)
    refused = start(text, "-u", name="b.yaml")
    assert refused.wait_exit(10) == 1
    assert f"cannot write pid_file {run}/a.pid" in _log(tmp_path)
    run.mkdir()
    new = start(text, "-u", name="c.yaml")
    wait_for(lambda: (tmp_path / "a.sock").exists(), 10, "upgrade_sock")
    shutil.rmtree(run)  # after the new master's check, before its pid file
    old.signal(signal.SIGQUIT)
    assert old.wait_exit(20) == 0
    wait_for(lambda: "serving without it" in _log(tmp_path), 5, "the pid file error")
    assert alive(new.pid) and get(port)[0] == 200


def _raw_old_master(path: str, sock: socket.socket) -> socket.socket:
    """Hand ``sock`` over on ``path`` as an old master would (one key, one descriptor)."""
    entry = {"key": "origin/127.0.0.1:1/*", "family": int(sock.family), "type": int(sock.type)}
    body = json.dumps({"version": 1, "sockets": [entry]}).encode()
    peer = socket.socket(socket.AF_UNIX)
    peer.connect(path)
    peer.sendall(MAGIC + struct.pack("!cI", b"M", len(body)) + body)
    fds = array.array("i", [sock.fileno()])
    peer.sendmsg([struct.pack("!cI", b"F", 8) + struct.pack("!II", 0, 1)],
                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    return peer


def test_a_socket_that_does_not_listen_is_not_adopted(tmp_path) -> None:
    """A bound socket that does not listen passed the family/type check; the workers'
    create_server would listen() on it while the configured address had nobody."""
    path = str(tmp_path / "u.sock")
    idle = socket.socket()
    idle.bind(("127.0.0.1", 0))
    try:
        with UpgradeListener(path) as listener:
            peer = _raw_old_master(path, idle)
            with pytest.raises(TransferError, match="not listening"):
                listener.accept_sockets(timeout=1)
            peer.close()
    finally:
        idle.close()


# --------------------------------------------------------------------------- signal storms


def test_a_signal_storm_leaves_one_generation_and_no_leak(tmp_path, start) -> None:
    """SIGHUP x50 in bursts, SIGUSR1 with the log's directory gone, SIGQUIT twice with no
    new master: one master, its workers, the descriptors it started with, no zombie."""
    port = free_port()
    (tmp_path / "logs").mkdir()
    text = _conf(tmp_path, port).replace(f"error_log: {tmp_path}/a.log",
                                          f"error_log: {tmp_path}/logs/a.log")
    text = text.replace("upgrade_timeout_seconds: 10", "upgrade_timeout_seconds: 1")
    p = start(text)
    _serving(p, port, 2, tmp_path / "logs" / "a.log")
    before = _fds(p.pid)
    for _ in range(5):
        for _ in range(10):
            p.signal(signal.SIGHUP)
        time.sleep(0.05)  # bursts the master sees apart (one reload each, at most)
    shutil.rmtree(tmp_path / "logs")
    p.signal(signal.SIGUSR1)
    p.signal(signal.SIGQUIT)
    p.signal(signal.SIGQUIT)
    assert get(port)[0] == 200

    def settled() -> bool:
        kids = children_of(p.pid)
        return len(kids) == 2 and all(alive(k) for k in kids) and _fds(p.pid) == before
    wait_for(settled, 30, "one generation of 2 workers and the master's first descriptors")
    assert alive(p.pid) and get(port)[0] == 200
    p.signal(signal.SIGTERM)
    assert p.wait_exit(20) == 0
