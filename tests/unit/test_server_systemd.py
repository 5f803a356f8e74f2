"""pyngora.server.systemd against a real AF_UNIX datagram socket (no systemd needed)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyngora.server import systemd


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound datagram socket standing in for systemd's notify socket."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    try:
        yield sock
    finally:
        sock.close()


def _recv(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.split("\n"))


def test_no_socket_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.under_systemd() is False
    assert systemd.notify("READY=1") is False
    assert systemd.ready() is False
    assert systemd.watchdog_ping() is False


def test_unsupported_address_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert systemd.under_systemd() is False
    assert systemd.notify("READY=1") is False


def test_missing_socket_file_returns_false(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert systemd.notify("READY=1") is False


def test_ready_with_status(receiver: socket.socket) -> None:
    assert systemd.under_systemd() is True
    assert systemd.ready("2 workers, generation 1") is True
    assert _recv(receiver) == {"READY": "1", "STATUS": "2 workers, generation 1"}


def test_status_is_one_line(receiver: socket.socket) -> None:
    assert systemd.status("line one\nline two") is True
    assert _recv(receiver) == {"STATUS": "line one line two"}


def test_reloading_carries_monotonic_usec(receiver: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert systemd.reloading() is True
    msg = _recv(receiver)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert msg["RELOADING"] == "1"
    assert before <= int(msg["MONOTONIC_USEC"]) <= after


def test_stopping(receiver: socket.socket) -> None:
    assert systemd.stopping() is True
    assert _recv(receiver) == {"STOPPING": "1"}


def test_mainpid_and_ready_in_one_datagram(receiver: socket.socket) -> None:
    assert systemd.mainpid() is True
    assert _recv(receiver) == {"MAINPID": str(os.getpid()), "READY": "1"}
    assert systemd.mainpid(4242, ready=False) is True
    assert _recv(receiver) == {"MAINPID": "4242"}


def test_credentials_name_the_sender(receiver: socket.socket) -> None:
    """systemd decides who spoke from SCM_CREDENTIALS; the kernel must attach ours."""
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    assert systemd.watchdog_ping() is True
    data, ancdata, _flags, _addr = receiver.recvmsg(4096, socket.CMSG_SPACE(12))
    assert data == b"WATCHDOG=1"
    creds = [d for level, kind, d in ancdata if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
    assert creds and int.from_bytes(creds[0][:4], "little") == os.getpid()


def test_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"pyngora-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("READY=1") is True
        assert sock.recv(64) == b"READY=1"
    finally:
        sock.close()


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    assert systemd.watchdog_interval() == 5.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 5.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_interval() is None
    assert systemd.watchdog_interval(any_pid=True) == 5.0
    monkeypatch.setenv("WATCHDOG_PID", "junk")
    assert systemd.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "-5", "", "abc"):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert systemd.watchdog_interval() is None


def test_no_third_party_imports() -> None:
    """A leaf: the master imports it before forking, it must stay stdlib-only."""
    import ast

    tree = ast.parse(Path(systemd.__file__).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names <= {"__future__", "os", "socket", "time"}
