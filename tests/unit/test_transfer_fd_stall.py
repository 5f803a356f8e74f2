"""Peers that begin the socket hand-over and then stall (pyngora/upgrade/transfer_fd.py), with
real Unix sockets; both masters in this process, the old side in a thread.

The attack (2026-11-29 review): a connection to ``upgrade_sock`` that sent the right magic
(or a byte of it) was then read with blocking reads until the new master's deadline, and the
real old master queued behind it was never read: a peer that stalls, or trickles a byte a
second, made every upgrade fail. Now connections are read side by side and one that began
must finish within ``_TRANSFER_SECONDS``. The other direction is bounded too: a new side that
accepts and then stalls costs the old master its deadlines, never more.
"""

from __future__ import annotations

import array
import os
import select
import socket
import threading
import time

import pytest

import pyngora.upgrade.transfer_fd as transfer_fd
from pyngora.upgrade.transfer_fd import (MAGIC, TransferError, UpgradeListener, make_key,
                                         send_sockets)
from tests.unit.test_transfer_fd import (TCP, OldSide, batch, close_all,  # noqa: F401
                                         frame, make_sockets, manifest, no_fd_leak, tmp)


class Trickler(threading.Thread):
    """Connects to ``path`` and sends ``data`` one byte every ``every`` seconds, watching
    for an answer; ``answer`` (what the new side sent) and ``answered_after`` (seconds after
    the first byte) once it came or the peer closed."""

    def __init__(self, path: str, data: bytes, every: float) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.data = data
        self.every = every
        self.answer: bytes | None = None
        self.answered_after: float | None = None
        self.done = threading.Event()

    def run(self) -> None:
        first = time.monotonic()
        try:
            for i in range(len(self.data)):
                if self.done.is_set():
                    return
                self.sock.sendall(self.data[i:i + 1])
                if select.select([self.sock], [], [], self.every)[0]:
                    self.answer = self.sock.recv(4096)
                    self.answered_after = time.monotonic() - first
                    return
        except OSError:
            self.answered_after = time.monotonic() - first
        finally:
            self.sock.close()

    def stop(self) -> None:
        self.done.set()
        self.join(10)


def stalled_peer(path: str, data: bytes) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(data)
    return s


ONE_SOCKET = manifest([("p/127.0.0.1:1/*", *TCP)])


@pytest.mark.parametrize("stall", ["magic", "a byte of magic", "half a manifest",
                                   "manifest without its descriptors", "trickle"])
def test_a_peer_that_begins_and_stalls_does_not_hold_up_the_old_master(
        tmp: str, stall: str) -> None:
    """Before: the new side read the stalled peer until its deadline (10 s here), then gave
    up without reading the old master queued behind it: TransferError, upgrade failed."""
    path = os.path.join(tmp, "u.sock")
    socks = make_sockets(3, tmp)
    received: dict[str, socket.socket] = {}
    peer: socket.socket | None = None
    trickler: Trickler | None = None
    try:
        with UpgradeListener(path) as listener:
            if stall == "trickle":
                trickler = Trickler(path, MAGIC + ONE_SOCKET, every=0.3)
                trickler.start()
            else:
                data = {"magic": MAGIC, "a byte of magic": MAGIC[:1],
                        "half a manifest": MAGIC + ONE_SOCKET[:len(ONE_SOCKET) // 2],
                        "manifest without its descriptors": MAGIC + ONE_SOCKET}[stall]
                peer = stalled_peer(path, data)
            time.sleep(0.3)  # the stalled peer is read first (its bytes are there first)
            old = OldSide(path, socks)
            old.start()
            t0 = time.monotonic()
            conn, received = listener.accept_sockets(timeout=10)
            took = time.monotonic() - t0
            with conn:
                conn.send_ready()
            assert old.finish().ok
        assert set(received) == set(socks)
        assert took < 3, took  # at once, not at the stalled peer's (or the wait's) end
    finally:
        if trickler is not None:
            trickler.stop()
        if peer is not None:
            peer.close()
        close_all(socks, received)


def test_a_trickling_peer_is_dropped_soon_after_its_first_byte(
        tmp: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer sending the magic and a manifest a byte every 0.2 s (each byte is progress, so
    an idle timer would never fire) is answered ``failed`` and closed once the transfer
    bound (1 s here) passed, and the wait goes on to its end, naming why."""
    monkeypatch.setattr(transfer_fd, "_TRANSFER_SECONDS", 1.0, raising=False)
    path = os.path.join(tmp, "u.sock")
    with UpgradeListener(path) as listener:
        trickler = Trickler(path, MAGIC + ONE_SOCKET, every=0.2)
        trickler.start()
        try:
            with pytest.raises(TransferError, match="did not finish within 1s"):
                listener.accept_sockets(timeout=3)
        finally:
            trickler.stop()
    assert trickler.answered_after is not None and trickler.answered_after < 2.5, \
        trickler.answered_after
    assert trickler.answer is not None and trickler.answer[:1] == b"X"


def test_a_transfer_begun_before_the_deadline_may_end_after_it(
        tmp: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bound works both ways: an old master whose first byte comes before the deadline
    (1.0 s of 2 s) and the rest after it (2.4 s) still hands over: the wait is not cut off at
    the deadline while a transfer that began is within its bound (min(timeout,
    _TRANSFER_SECONDS) = 2 s from the first byte's read). Both margins are 0.6 s or more, for
    a loaded machine (bin/test runs this beside the soak)."""
    monkeypatch.setattr(transfer_fd, "_TRANSFER_SECONDS", 3.0, raising=False)
    path = os.path.join(tmp, "u.sock")
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    key = make_key("p", f"127.0.0.1:{lsock.getsockname()[1]}", "*")
    body = MAGIC + manifest([(key, *TCP)])
    received: dict[str, socket.socket] = {}
    with UpgradeListener(path) as listener:
        late = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        late.connect(path)

        def send_late() -> None:
            time.sleep(1.0)
            late.sendall(body[:1])
            time.sleep(1.4)
            late.sendall(body[1:])
            late.sendmsg([batch(0, 1)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                          array.array("i", [lsock.fileno()]))])
        t = threading.Thread(target=send_late, daemon=True)
        t.start()
        try:
            conn, received = listener.accept_sockets(timeout=2.0)
            conn.close()
            assert set(received) == {key}
        finally:
            t.join(10)
            late.close()
            lsock.close()
            close_all(received)


# --------------------------------------------------------------------------- other direction


def fake_new_side(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(4)
    return s


def test_a_new_side_that_accepts_and_reads_nothing_costs_the_old_master_its_deadline(
        tmp: str) -> None:
    """The manifest is larger than the socket's buffers, so the send itself blocks: the old
    master gives up at its deadline with a reason, and keeps its sockets."""
    path = os.path.join(tmp, "u.sock")
    server = fake_new_side(path)
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    # 20,000 keys for one socket: a manifest of about a megabyte
    socks = {make_key("p", f"127.0.0.1:{i}", "*"): lsock for i in range(20000)}
    try:
        t0 = time.monotonic()
        result = send_sockets(path, socks, timeout=1.0)
        took = time.monotonic() - t0
        assert not result.ok and not result.delivered
        assert "timed out sending the sockets" in result.reason, result.reason
        assert took < 1.0 + 2.0, took
        assert lsock.fileno() >= 0 and lsock.getsockname()[1] > 0  # still ours, still open
    finally:
        server.close()
        lsock.close()


def test_a_new_side_that_takes_everything_then_trickles_its_answer_is_given_up(
        tmp: str) -> None:
    """A new side that reads the whole transfer and then sends its ``ready`` frame a byte
    every 0.4 s: the old master's wait for the answer has a deadline (``ready_timeout``),
    not one per byte."""
    path = os.path.join(tmp, "u.sock")
    server = fake_new_side(path)
    socks = make_sockets(2, tmp)
    stop = threading.Event()

    def new_side() -> None:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(5)
            got = b""
            while len(got) < len(MAGIC) + 5:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                got += chunk
            for byte in frame(b"R"):
                if stop.wait(0.4):
                    return
                conn.sendall(bytes((byte,)))
            stop.wait(5)
    t = threading.Thread(target=new_side, daemon=True)
    t.start()
    try:
        t0 = time.monotonic()
        result = send_sockets(path, socks, timeout=5.0, ready_timeout=1.0)
        took = time.monotonic() - t0
        assert not result.ok and result.delivered
        assert "timed out waiting for the new master's ready" in result.reason, result.reason
        assert took < 1.0 + 2.0, took
    finally:
        stop.set()
        t.join(10)
        server.close()
        close_all(socks)
