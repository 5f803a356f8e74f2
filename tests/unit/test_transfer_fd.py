"""The socket hand-over protocol (pyngora/upgrade/transfer_fd.py), with real Unix sockets.

Both masters live in this process: the old side runs in a thread, the new side in the test.
Every test checks that /proc/self/fd holds as many descriptors after as before.
"""

from __future__ import annotations

import array
import fcntl
import itertools
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyngora.upgrade.listen_fds import adopt_systemd_sockets

from pyngora.upgrade.transfer_fd import (
    MAGIC,
    HandoverResult,
    TransferError,
    UpgradeListener,
    make_key,
    send_sockets,
    split_key,
)

ROOT = Path(__file__).resolve().parents[2]


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


HAS_V6 = has_ipv6()


@pytest.fixture()
def tmp() -> Iterator[str]:
    # A short directory: Unix socket paths are limited to 107 bytes.
    d = tempfile.mkdtemp(prefix="pyng-", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_fd_leak() -> Iterator[None]:
    before = fd_count()
    yield
    assert fd_count() == before, "file descriptors leaked"


class OldSide(threading.Thread):
    """The old master's send_sockets, in a thread; ``result`` once joined."""

    def __init__(self, path: str, socks: dict[str, socket.socket], timeout: float = 10.0,
                 ready_timeout: float | None = None) -> None:
        super().__init__(daemon=True)
        self.args = (path, socks, timeout, ready_timeout)
        self.result: HandoverResult | None = None

    def run(self) -> None:
        self.result = send_sockets(*self.args)

    def finish(self) -> HandoverResult:
        self.join(30)
        assert not self.is_alive()
        assert self.result is not None
        return self.result


def listen_tcp(host: str, family: int, port: int = 0, reuseport: bool = False) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host, port))
    s.listen(64)
    return s


def make_sockets(n: int, tmp: str) -> dict[str, socket.socket]:
    """n listening sockets: TCP v4, pinned SO_REUSEPORT slots of one address, Unix, v6."""
    socks: dict[str, socket.socket] = {}
    kinds = itertools.cycle(["v4", "pinned", "unix", "v6"])
    while len(socks) < n:
        kind = next(kinds)
        i = len(socks)
        if kind == "v4" or (kind == "v6" and not HAS_V6):
            s = listen_tcp("127.0.0.1", socket.AF_INET)
            socks[make_key("proxy", f"127.0.0.1:{s.getsockname()[1]}", "*")] = s
        elif kind == "v6":
            s = listen_tcp("::1", socket.AF_INET6)
            socks[make_key("proxy", f"[::1]:{s.getsockname()[1]}", "*")] = s
        elif kind == "unix":
            path = os.path.join(tmp, f"u{i}.sock")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(path)
            s.listen(16)
            socks[make_key("api", f"unix:{path}", "*")] = s
        else:
            first = listen_tcp("127.0.0.1", socket.AF_INET, reuseport=True)
            port = first.getsockname()[1]
            socks[make_key("pinned", f"127.0.0.1:{port}", 0)] = first
            for slot in range(1, min(3, n - i)):
                s = listen_tcp("127.0.0.1", socket.AF_INET, port, reuseport=True)
                socks[make_key("pinned", f"127.0.0.1:{port}", slot)] = s
    return socks


def close_all(*groups: dict[str, socket.socket] | list[socket.socket]) -> None:
    for group in groups:
        for s in (group.values() if isinstance(group, dict) else group):
            s.close()


def connect_to(sock: socket.socket) -> socket.socket:
    c = socket.socket(sock.family, socket.SOCK_STREAM)
    c.settimeout(10)
    c.connect(sock.getsockname())
    return c


def is_cloexec(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


# --------------------------------------------------------------------------- success


@pytest.mark.parametrize("n", [1, 40, 300])
def test_transfer_many_sockets(n: int, tmp: str) -> None:
    socks = make_sockets(n, tmp)
    assert len(socks) == n
    # Connections queued before the transfer must be accepted on the received sockets.
    shared = [k for k, s in socks.items() if k.endswith("/*")][:30]
    clients = [connect_to(socks[k]) for k in shared]
    received: dict[str, socket.socket] = {}
    path = os.path.join(tmp, "upgrade.sock")
    try:
        with UpgradeListener(path) as listener:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            old = OldSide(path, socks)
            old.start()
            conn, received = listener.accept_sockets(timeout=10)
            with conn:
                assert conn.peer_pid == os.getpid()
                assert set(received) == set(socks)
                for key, s in received.items():
                    orig = socks[key]
                    # Same kernel socket: a socket's inode is its identity.
                    assert os.fstat(s.fileno()).st_ino == os.fstat(orig.fileno()).st_ino
                    assert (s.family, s.type) == (orig.family, orig.type)
                    assert s.getsockname() == orig.getsockname()
                    assert is_cloexec(s.fileno())
                    assert not s.getblocking() and not os.get_blocking(s.fileno())
                for key in shared:
                    received[key].settimeout(10)
                    accepted, _ = received[key].accept()
                    accepted.close()
                conn.send_ready()
            result = old.finish()
        assert result == HandoverResult(True, "ready", True)
        assert not os.path.exists(path)
    finally:
        close_all(socks, received, clients)


def test_pinned_slots_of_one_address_keep_their_keys(tmp: str) -> None:
    first = listen_tcp("127.0.0.1", socket.AF_INET, reuseport=True)
    port = first.getsockname()[1]
    socks = {make_key("p", f"127.0.0.1:{port}", 0): first}
    for slot in (1, 2, 3):
        socks[make_key("p", f"127.0.0.1:{port}", slot)] = listen_tcp(
            "127.0.0.1", socket.AF_INET, port, reuseport=True)
    received: dict[str, socket.socket] = {}
    path = os.path.join(tmp, "u.sock")
    try:
        with UpgradeListener(path) as listener:
            old = OldSide(path, socks)
            old.start()
            conn, received = listener.accept_sockets(timeout=10)
            with conn:
                conn.send_ready()
            assert old.finish().ok
        assert sorted(received) == sorted(socks)
        for key, s in received.items():
            assert os.fstat(s.fileno()).st_ino == os.fstat(socks[key].fileno()).st_ino
    finally:
        close_all(socks, received)


def test_zero_sockets(tmp: str) -> None:
    path = os.path.join(tmp, "u.sock")
    with UpgradeListener(path) as listener:
        old = OldSide(path, {})
        old.start()
        conn, received = listener.accept_sockets(timeout=10)
        with conn:
            assert received == {}
            conn.send_ready()
        assert old.finish().ok


def test_old_side_starts_before_new_side_listens(tmp: str) -> None:
    socks = make_sockets(3, tmp)
    path = os.path.join(tmp, "late.sock")
    received: dict[str, socket.socket] = {}
    old = OldSide(path, socks, timeout=20)
    old.start()
    try:
        # Let the old side fail a few connects first; the outcome is the same either way.
        old.join(0.3)
        with UpgradeListener(path) as listener:
            conn, received = listener.accept_sockets(timeout=20)
            with conn:
                conn.send_ready()
        assert old.finish().ok
        assert set(received) == set(socks)
    finally:
        old.join(30)
        close_all(socks, received)


# --------------------------------------------------------------------------- new side failures


def test_new_side_without_old_master_times_out(tmp: str) -> None:
    path = os.path.join(tmp, "u.sock")
    with UpgradeListener(path) as listener:
        with pytest.raises(TransferError, match="no old master"):
            listener.accept_sockets(timeout=0.3)


def test_a_waiting_connection_evicted_in_the_batch_that_reads_it_is_skipped(
        tmp: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """(A review's finding.) The listener and a waiting connection readable in one select
    batch: accepting the newcomer evicted (closed) the oldest waiting one, and the same batch
    then read that closed connection's key: ValueError out of accept_sockets, a traceback
    for the -u master. With one connection allowed to wait, A (accepted first, its byte
    already there) and B (pending) are ready together; A must be skipped, and the wait end
    as usual (no old master)."""
    import pyngora.upgrade.transfer_fd as transfer_fd
    monkeypatch.setattr(transfer_fd, "_MAX_WAITING", 1)
    path = os.path.join(tmp, "u.sock")
    with UpgradeListener(path) as listener:
        a = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        a.connect(path)
        a.sendall(b"x")
        b = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        b.connect(path)
        try:
            with pytest.raises(TransferError, match="no old master"):
                listener.accept_sockets(timeout=0.5)
        finally:
            a.close()
            b.close()


def raw_peer(path: str, chunks: list[tuple[bytes, list[int]]]) -> socket.socket:
    """Connect like an old master and send hand-made bytes (with FDs); returns the socket."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    for data, fds in chunks:
        if fds:
            s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            s.sendall(data)
    return s


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return struct.pack("!cI", kind, len(payload)) + payload


def manifest(entries: list[tuple[str, int, int]]) -> bytes:
    doc = {"version": 1, "sockets": [{"key": k, "family": f, "type": t} for k, f, t in entries]}
    return frame(b"M", json.dumps(doc).encode())


def batch(first: int, count: int) -> bytes:
    return frame(b"F", struct.pack("!II", first, count))


TCP = (socket.AF_INET, socket.SOCK_STREAM)


def expect_refused(path: str, chunks: list[tuple[bytes, list[int]]], match: str) -> str:
    """Send ``chunks`` as a bad old master, close, and check the new side refuses it."""
    with UpgradeListener(path) as listener:
        peer = raw_peer(path, chunks)
        peer.close()
        with pytest.raises(TransferError, match=match) as info:
            listener.accept_sockets(timeout=0.5)
    return str(info.value)


def test_garbage_peer(tmp: str) -> None:
    r, w = os.pipe()
    try:
        expect_refused(os.path.join(tmp, "u.sock"),
                       [(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", [r, w])], "bad magic")
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("payload, match", [
    (frame(b"M", b"{not json"), "not valid JSON"),
    (frame(b"M", b'{"version": 2, "sockets": []}'), "unsupported version"),
    (frame(b"M", b'{"version": 1, "sockets": [{"key": "nokey", "family": 2, "type": 1}]}'),
     "bad socket key"),
    (manifest([("a/b:1/*", *TCP), ("a/b:1/*", *TCP)]), "duplicate key"),
    (frame(b"Z", b""), "unexpected message"),
    (struct.pack("!cI", b"M", 1 << 30), "too large"),
])
def test_bad_manifest(tmp: str, payload: bytes, match: str) -> None:
    expect_refused(os.path.join(tmp, "u.sock"), [(MAGIC + payload, [])], match)


def test_peer_closes_mid_transfer(tmp: str) -> None:
    socks = make_sockets(3, tmp)
    first = list(socks.values())[0].fileno()
    entries = [(k, int(s.family), int(s.type)) for k, s in socks.items()]
    try:
        expect_refused(os.path.join(tmp, "u.sock"),
                       [(MAGIC + manifest(entries), []), (batch(0, 1), [first])],
                       "closed the connection")
    finally:
        close_all(socks)


@pytest.mark.parametrize("announced, attached, match", [
    (1, 2, "2 descriptors arrived"),      # more FDs than the manifest says
    (1, 0, "only 0 descriptors"),         # a batch without its FDs
    (2, 2, "does not follow"),            # a batch beyond the manifest
])
def test_fd_count_disagrees_with_manifest(tmp: str, announced: int, attached: int,
                                          match: str) -> None:
    s1 = listen_tcp("127.0.0.1", socket.AF_INET)
    s2 = listen_tcp("127.0.0.1", socket.AF_INET)
    fds = [s1.fileno(), s2.fileno()][:attached]
    chunks = [(MAGIC + manifest([("p/x:1/*", *TCP)]), []), (batch(0, announced), fds)]
    try:
        expect_refused(os.path.join(tmp, "u.sock"), chunks, match)
    finally:
        close_all([s1, s2])


def test_descriptor_not_matching_manifest(tmp: str) -> None:
    s = listen_tcp("127.0.0.1", socket.AF_INET)
    r, w = os.pipe()
    try:
        path = os.path.join(tmp, "u.sock")
        expect_refused(path, [(MAGIC + manifest([("p/x:1/*", socket.AF_INET6, 1)]), []),
                              (batch(0, 1), [s.fileno()])], "manifest says family")
        expect_refused(path, [(MAGIC + manifest([("p/x:1/*", *TCP)]), []),
                              (batch(0, 1), [r])], "not a socket")
    finally:
        s.close()
        os.close(r)
        os.close(w)


def test_garbage_then_real_old_master(tmp: str) -> None:
    path = os.path.join(tmp, "u.sock")
    socks = make_sockets(2, tmp)
    received: dict[str, socket.socket] = {}
    try:
        with UpgradeListener(path) as listener:
            raw_peer(path, [(b"hello", [])]).close()   # queued first, refused, then ...
            old = OldSide(path, socks)
            old.start()
            conn, received = listener.accept_sockets(timeout=10)   # ... the real one
            with conn:
                conn.send_ready()
            assert old.finish().ok
        assert set(received) == set(socks)
    finally:
        close_all(socks, received)


def test_out_of_descriptors_truncates_and_cleans_up(tmp: str) -> None:
    """MSG_CTRUNC (EMFILE while receiving): an error, and every FD that arrived is closed."""
    script = textwrap.dedent("""
        import json, os, resource, socket, sys, threading
        from pyngora.upgrade.transfer_fd import TransferError, UpgradeListener, send_sockets
        socks = {}
        for i in range(40):
            s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(1)
            socks[f"p/127.0.0.1:{s.getsockname()[1]}/*"] = s
        before = len(os.listdir("/proc/self/fd"))
        listener = UpgradeListener(sys.argv[1])
        # Room for the two ends of the connection and a few of the 40 descriptors only.
        top = max(int(x) for x in os.listdir("/proc/self/fd"))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (top + 8, hard))
        out = {}
        t = threading.Thread(target=lambda: out.update(r=send_sockets(sys.argv[1], socks, 10)))
        t.start()
        try:
            listener.accept_sockets(timeout=1.5)
            error = ""
        except TransferError as e:
            error = str(e)
        t.join()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        listener.close()
        after = len(os.listdir("/proc/self/fd"))
        print(json.dumps({"error": error, "before": before, "after": after,
                          "old": [out["r"].ok, out["r"].reason]}))
    """)
    proc = subprocess.run([sys.executable, "-c", script, os.path.join(tmp, "u.sock")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert "truncated" in report["error"]
    assert report["after"] == report["before"]
    assert report["old"][0] is False and "truncated" in report["old"][1]


# --------------------------------------------------------------------------- old side failures


def test_old_side_without_new_master_keeps_its_sockets(tmp: str) -> None:
    socks = make_sockets(2, tmp)
    try:
        result = send_sockets(os.path.join(tmp, "nobody.sock"), socks, timeout=0.3)
        assert not result.ok and not result.delivered
        assert "timed out connecting" in result.reason
        for s in socks.values():
            assert s.fileno() >= 0 and s.getsockname()
    finally:
        close_all(socks)


def test_new_master_reports_failure(tmp: str) -> None:
    path = os.path.join(tmp, "u.sock")
    socks = make_sockets(2, tmp)
    received: dict[str, socket.socket] = {}
    try:
        with UpgradeListener(path) as listener:
            old = OldSide(path, socks)
            old.start()
            conn, received = listener.accept_sockets(timeout=10)
            with conn:
                conn.send_failed("workers cannot boot")
            result = old.finish()
        assert not result.ok and result.delivered
        assert "workers cannot boot" in result.reason
    finally:
        close_all(socks, received)


def test_old_side_gives_up_waiting_then_new_side_learns_it(tmp: str) -> None:
    path = os.path.join(tmp, "u.sock")
    socks = make_sockets(1, tmp)
    received: dict[str, socket.socket] = {}
    try:
        with UpgradeListener(path) as listener:
            old = OldSide(path, socks, ready_timeout=0.3)
            old.start()
            conn, received = listener.accept_sockets(timeout=10)
            with conn:
                result = old.finish()
                assert not result.ok and result.delivered
                assert "timed out waiting for the new master's ready" in result.reason
                # No commit will come: the new master must not believe it took over.
                with pytest.raises(TransferError):
                    conn.send_ready(timeout=5)
    finally:
        close_all(socks, received)


def test_new_side_closes_without_answer(tmp: str) -> None:
    path = os.path.join(tmp, "u.sock")
    socks = make_sockets(1, tmp)
    received: dict[str, socket.socket] = {}
    try:
        with UpgradeListener(path) as listener:
            old = OldSide(path, socks)
            old.start()
            conn, received = listener.accept_sockets(timeout=10)
            conn.close()
            result = old.finish()
        assert not result.ok and "closed the connection" in result.reason
    finally:
        close_all(socks, received)


def test_new_side_disappears_mid_transfer(tmp: str) -> None:
    path = os.path.join(tmp, "u.sock")
    socks = make_sockets(250, tmp)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    old = OldSide(path, socks)
    old.start()
    try:
        conn, _ = srv.accept()
        conn.close()                   # gone before (or while) the batches arrive
        result = old.finish()
        assert not result.ok
    finally:
        old.join(30)
        srv.close()
        close_all(socks)


def test_garbage_new_side(tmp: str) -> None:
    """Something else listens on upgrade_sock and answers nonsense, with FDs even."""
    path = os.path.join(tmp, "u.sock")
    socks = make_sockets(1, tmp)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    old = OldSide(path, socks)
    old.start()
    r, w = os.pipe()
    try:
        conn, _ = srv.accept()
        with conn:
            conn.sendmsg([b"HTTP/1.1 200 OK\r\n\r\n"],
                         [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
            result = old.finish()
        assert not result.ok and "unexpected message" in result.reason
    finally:
        old.join(30)
        srv.close()
        os.close(r)
        os.close(w)
        close_all(socks)


def test_bad_key_is_a_result_not_an_exception(tmp: str) -> None:
    s = listen_tcp("127.0.0.1", socket.AF_INET)
    try:
        result = send_sockets(os.path.join(tmp, "u.sock"), {"no-slot": s}, timeout=0.1)
        assert not result.ok and "bad socket key" in result.reason
    finally:
        s.close()


# --------------------------------------------------------------------------- listener, keys


def test_listener_removes_stale_socket_and_refuses_live_or_foreign_files(tmp: str) -> None:
    path = os.path.join(tmp, "u.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()                      # the file stays: a stale socket
    with UpgradeListener(path) as live:
        with pytest.raises(TransferError, match="another process is listening"):
            UpgradeListener(path)
        # The probe connection of the refused listener must not break the live one.
        with pytest.raises(TransferError, match="no old master"):
            live.accept_sockets(timeout=0.2)
    assert not os.path.exists(path)
    Path(path).write_text("not a socket")
    with pytest.raises(TransferError, match="not a socket"):
        UpgradeListener(path)
    assert Path(path).read_text() == "not a socket"


def test_listener_close_leaves_a_successor_alone(tmp: str) -> None:
    path = os.path.join(tmp, "u.sock")
    first = UpgradeListener(path)
    os.unlink(path)
    second = UpgradeListener(path)
    first.close()
    assert os.path.exists(path)
    second.close()
    assert not os.path.exists(path)


def test_keys() -> None:
    assert split_key("proxy/127.0.0.1:6188/0") == ("proxy", "127.0.0.1:6188", "0")
    assert split_key("api/unix:/run/p/a.sock/*") == ("api", "unix:/run/p/a.sock", "*")
    assert split_key(make_key("s", "[::1]:80", 3)) == ("s", "[::1]:80", "3")
    for bad in ["", "a", "a/b", "a//1", "/b/1", "a/b/", "a/b/x"]:
        with pytest.raises(ValueError):
            split_key(bad)


# --------------------------------------------------------------------------- systemd


def test_listen_fds_for_another_pid_or_absent_is_ignored_and_unset() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
    assert adopt_systemd_sockets(env) == []
    assert env == {}
    assert adopt_systemd_sockets({}) == []
    assert adopt_systemd_sockets({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}) == []
    with pytest.raises(TransferError):
        adopt_systemd_sockets({"LISTEN_PID": "x", "LISTEN_FDS": "1"})


STAGE2 = textwrap.dedent("""
    import fcntl, json, os
    from pyngora.upgrade.listen_fds import adopt_systemd_sockets
    socks = adopt_systemd_sockets()
    report = {
        "names": [s.getsockname() for s in socks],
        "cloexec": [bool(fcntl.fcntl(s.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
                    for s in socks],
        "fds": [s.fileno() for s in socks],
        "blocking": [os.get_blocking(s.fileno()) for s in socks],
        "env": [k for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES") if k in os.environ],
    }
    socks[0].settimeout(10)
    conn, _ = socks[0].accept()   # the connection queued before we were started
    conn.sendall(b"adopted")
    conn.close()
    print(json.dumps(report))
""")

# Like systemd: put the inherited sockets at 3.., set LISTEN_PID to the pid that will run
# the program, then exec it (exec keeps the pid).
STAGE1 = textwrap.dedent("""
    import os, sys
    fds = [os.dup(int(x)) for x in sys.argv[1:]]
    for i, fd in enumerate(fds):
        if fd != 3 + i:
            os.dup2(fd, 3 + i)
        os.set_inheritable(3 + i, True)   # os.dup made it CLOEXEC
    for fd in set(fds + [int(x) for x in sys.argv[1:]]) - set(range(3, 3 + len(fds))):
        os.close(fd)
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ["LISTEN_FDS"] = str(len(fds))
    os.environ["LISTEN_FDNAMES"] = ":".join(["web"] * len(fds))
    os.execv(sys.executable, [sys.executable, "-c", os.environ.pop("STAGE2")])
""")


def test_listen_fds_adoption_in_a_real_child(tmp: str) -> None:
    tcp = listen_tcp("127.0.0.1", socket.AF_INET)
    unix_path = os.path.join(tmp, "sd.sock")
    uds = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    uds.bind(unix_path)
    uds.listen(4)
    client = connect_to(tcp)
    env = dict(os.environ, STAGE2=STAGE2, PYTHONPATH=str(ROOT))
    try:
        proc = subprocess.run(
            [sys.executable, "-c", STAGE1, str(tcp.fileno()), str(uds.fileno())],
            pass_fds=[tcp.fileno(), uds.fileno()], env=env, cwd=ROOT,
            capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert report["fds"] == [3, 4]
        assert report["names"] == [list(tcp.getsockname()), unix_path]
        assert report["cloexec"] == [True, True]
        assert report["blocking"] == [False, False]
        assert report["env"] == []
        assert client.recv(16) == b"adopted"
    finally:
        close_all([tcp, uds, client])
